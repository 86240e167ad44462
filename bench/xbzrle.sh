#!/usr/bin/env bash
# XBZRLE encoder/decoder and CRC32C throughput on one core (release build), 64 MiB of pages per pattern.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --product tern-bench 2>&1 | grep -E "error|warning:" || true
.build/release/tern-bench xbzrle
echo
.build/release/tern-bench crc32c
