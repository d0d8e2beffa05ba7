#!/usr/bin/env bash
# The README's quick start: install what the build and the demo's suggested
# clients need (apt-get), build ferry in release mode, and run `ferry demo`.
# Extra arguments go to `ferry demo` (e.g. --size-mib 256 --nbd 127.0.0.1:0).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/install-deps.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}"
exec cargo run --release --locked -p ferry -- demo "$@"
