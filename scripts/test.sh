#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs the whole test suite:
# unit tests, tiny guests on real KVM, and tern processes booting the test guest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh debug
# (A dependency's manifest warning about its own unhandled files is not ours to fix.)
swift build --build-tests 2>&1 | grep -E "error|warning:" | grep -v "which are unhandled; explicitly declare them" \
    && { echo "test: the build has errors or warnings" >&2; exit 1; }
# The suite takes a few minutes; a test that hangs must fail the run, not stall it.
# One test at a time: in parallel, a dozen busy guests and migrations share these
# 2 cores and every timing in the suite stretches (about as fast overall: ~100 s).
limit=${TERN_TEST_TIMEOUT_S:-1200}
# The WAN tests' delaying relay has functional tests of its own (a few seconds, loopback only).
timeout 120 python3 tools/test_delay_relay.py 2>&1 | tail -3
set +e
timeout --kill-after=10 "$limit" swift test --no-parallel 2>&1 | grep -v "^\["
status=${PIPESTATUS[0]}
set -e
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "test: the suite did not finish within $limit s (a test hangs); stopped" >&2
fi
exit "$status"
