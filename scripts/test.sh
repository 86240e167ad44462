#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs the whole test suite:
# unit tests, tiny guests on real KVM, and tern processes booting the test guest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh debug
swift build --build-tests 2>&1 | grep -E "error|warning:" && { echo "test: the build has errors or warnings" >&2; exit 1; }
swift test 2>&1 | grep -v "^\[" 
exit "${PIPESTATUS[0]}"
