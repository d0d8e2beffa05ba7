#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 10).
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail

seconds="${1:-10}"
case "$seconds" in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/../fuzz"

# Sanitizer builds on nightly: keep them apart from the workspace's target
# dir, and outside the clone so CI runs in fresh clones reuse them.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/ferry/fuzz-target}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz..." >&2
    cargo install cargo-fuzz --locked
fi

for target in $(cargo +nightly fuzz list); do
    echo "=== fuzzing $target for ${seconds}s ===" >&2
    cargo +nightly fuzz run "$target" -- -max_total_time="$seconds"
done
