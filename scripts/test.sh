#!/usr/bin/env bash
# The project's one test command (CI runs it through .ci/run):
#   install deps -> fmt check -> clippy -D warnings -> build -> nextest (with a
#   bounded simulator campaign) -> brief fuzz.
# Nothing is skipped: a missing tool is a failure.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

# Keep builds outside the clone so repeated CI runs in fresh clones reuse them.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}
mkdir -p "$CARGO_TARGET_DIR"
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

declare -a STEPS=()
step() {
  local name=$1
  shift
  echo
  echo "==> $name"
  local start=$SECONDS
  if "$@"; then
    STEPS+=("ok      $name ($((SECONDS - start))s)")
  else
    local rc=$?
    STEPS+=("FAILED  $name ($((SECONDS - start))s, exit $rc)")
    summary
    echo "test.sh: FAILED at: $name" >&2
    exit "$rc"
  fi
}
summary() {
  echo
  echo "==> summary"
  printf '  %s\n' "${STEPS[@]}"
}

step "install dependencies" "$ROOT/scripts/install-deps.sh"
step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
# --all-targets, like clippy and nextest: the same features everywhere, so
# RocksDB's build script (and RocksDB) is compiled once per profile, not once
# per feature set.
step "cargo build" cargo build --workspace --all-targets --locked
export FERRY_BIN="$CARGO_TARGET_DIR/debug/ferry"
if [ ! -x "$FERRY_BIN" ]; then
  echo "test.sh: $FERRY_BIN was not built" >&2
  exit 1
fi
step "cargo nextest" cargo nextest run --workspace --locked --no-fail-fast
if [ -x "$ROOT/scripts/fuzz.sh" ]; then
  step "fuzz (brief)" "$ROOT/scripts/fuzz.sh" 5
elif [ -f "$ROOT/scripts/fuzz.sh" ]; then
  step "fuzz (brief)" bash "$ROOT/scripts/fuzz.sh" 5
fi

summary
echo "test.sh: all steps passed"
