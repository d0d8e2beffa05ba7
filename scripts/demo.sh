#!/usr/bin/env bash
# The README's quick start: install what the build and the demo's suggested
# clients need (apt-get), build ferry, and run `ferry demo`.
# Extra arguments go to `ferry demo` (e.g. --size-mib 256 --nbd 127.0.0.1:0).
#
# It builds exactly what the test command builds (the same profile, the
# same targets, so the same features), into the same target directory:
# RocksDB, the slowest part of any build, is compiled once for both quick
# start commands, whichever runs first. The dev profile is optimized (see
# Cargo.toml), ample for a demo over an emulated 100 Mbit/s link.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/install-deps.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}"
cargo build --workspace --all-targets --locked
exec "$CARGO_TARGET_DIR/debug/ferry" demo "$@"
