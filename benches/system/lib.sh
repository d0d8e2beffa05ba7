# Shared helpers of the system benchmarks (sourced, not run).
#
# The sourcing script sets BENCH (its name, for messages) and RAW (where
# logs go) before calling these.

die() { echo "$BENCH: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*"; }

# whole_numbers VAR...: dies unless each variable holds a whole number.
whole_numbers() {
  local v
  for v in "$@"; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
  done
}

# require_tools TOOL...: dies naming the first one missing.
require_tools() {
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null || die "missing $t: run scripts/install-deps.sh"
  done
}

# ferry_binary [release]: unless FERRY_BIN is set, builds ferry (the test
# command's dev build, one RocksDB compile for both; or a release build)
# and sets FERRY_BIN to it.
ferry_binary() {
  if [ -z "${FERRY_BIN:-}" ]; then
    if [ "${1:-}" = release ]; then
      (cd "$ROOT" && cargo build --release --locked -p ferry)
      FERRY_BIN=$CARGO_TARGET_DIR/release/ferry
    else
      (cd "$ROOT" && cargo build --workspace --all-targets --locked)
      FERRY_BIN=$CARGO_TARGET_DIR/debug/ferry
    fi
  fi
  [ -x "$FERRY_BIN" ] || die "ferry binary $FERRY_BIN missing"
}

# fresh_raw: RAW and OUT's folder made; dies if RAW holds an earlier run.
fresh_raw() {
  if [ -e "$RAW" ] && [ -n "$(ls -A "$RAW" 2>/dev/null)" ]; then
    die "$RAW exists and is not empty: remove it or choose another OUT"
  fi
  mkdir -p "$RAW" "$(dirname "$OUT")"
}

# Everything started is recorded here and stopped at exit.
declare -A PID_OF=()
STARTED=()

# stop_proc NAME [SECONDS]: SIGTERM, wait (default 60 s: an edge drains its
# NBD clients and syncs its journal), then SIGKILL.
stop_proc() {
  local name=$1 pid=${PID_OF[$1]:-} i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < ${2:-60} * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$BENCH: $name (pid $pid) ignored SIGTERM; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  unset "PID_OF[$name]"
}

# stop_all: stops everything started, newest first.
stop_all() {
  local i
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
    stop_proc "${STARTED[i]}" 20
  done
}

# spawn NAME WHAT CMD...: runs CMD in the background (stdout to
# $RAW/NAME.stdout, stderr to $RAW/NAME.log) and waits for its
# `listening WHAT ADDR` line; sets ADDR. Fails if CMD exits first.
spawn() {
  local name=$1 what=$2 i pid
  shift 2
  local out=$RAW/$name.stdout errlog=$RAW/$name.log
  : > "$out"
  "$@" > "$out" 2>> "$errlog" &
  pid=$!
  PID_OF[$name]=$pid
  STARTED+=("$name")
  for ((i = 0; i < 600; i++)); do
    ADDR=$(sed -n "s/^listening $what //p" "$out" | head -1)
    [ -n "$ADDR" ] && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null || true
      unset "PID_OF[$name]"
      echo "$BENCH: $name exited before listening; its log:" >&2
      tail -20 "$errlog" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "$BENCH: $name did not print 'listening $what' within 60 s" >&2
  tail -20 "$errlog" >&2
  return 1
}

# start_work: a scratch directory WORK under WORK_DIR; at exit everything
# started is stopped and WORK removed, and a failure points at $RAW.
start_work() {
  WORK=$(mktemp -d "$WORK_DIR/$BENCH.XXXXXX")
  trap finish_work EXIT
  trap 'exit 130' INT TERM
}

finish_work() {
  local rc=$?
  trap - EXIT INT TERM
  stop_all
  rm -rf "$WORK"
  [ "$rc" -eq 0 ] || echo "$BENCH: failed (exit $rc); logs in $RAW" >&2
  exit "$rc"
}

# start_link NAME TARGET: an emulated WAN in front of TARGET (DELAY_MS each
# way, MBIT each way, QUEUE_KIB buffered per direction when set); sets LINK.
start_link() {
  local queue=()
  [ -z "${QUEUE_KIB:-}" ] || queue=(--queue-kib "$QUEUE_KIB")
  spawn "$1" link "$FERRY_BIN" link-emulator --listen 127.0.0.1:0 --target "$2" \
    --delay-ms "$DELAY_MS" --mbit "$MBIT" "${queue[@]}"
  LINK=$ADDR
}

# link_bytes_down NAME: the bytes emulator NAME carried towards its client,
# as its last count line says (it logs one at exit and on SIGUSR1).
link_bytes_down() {
  sed 's/\x1b\[[0-9;]*m//g' "$RAW/$1.log" | sed -n 's/.*bytes_to_client=\([0-9]*\).*/\1/p' | tail -1
}

# start_nbdkit NAME FILE [--filter=F...] [PARAM=VALUE...]: `nbdkit file`
# serving FILE on loopback (filters go before the plugin, parameters after
# it), probed directly, not through a link that would count the probe;
# sets NBDKIT_ADDR. Extra nbdkit options (-r) in NBDKIT_OPTS.
start_nbdkit() {
  local name=$1 file=$2 port i filters=() params=() x opts=()
  shift 2
  for x in "$@"; do
    if [[ $x == --filter=* ]]; then filters+=("$x"); else params+=("$x"); fi
  done
  read -r -a opts <<< "${NBDKIT_OPTS:-}"
  port=$(free_port)
  nbdkit --exit-with-parent -f -i 127.0.0.1 -p "$port" "${opts[@]}" "${filters[@]}" \
    file file="$file" "${params[@]}" >> "$RAW/$name.log" 2>&1 &
  PID_OF[$name]=$!
  STARTED+=("$name")
  for ((i = 0; i < 300; i++)); do
    nbdinfo --size "nbd://127.0.0.1:$port" >/dev/null 2>&1 && { NBDKIT_ADDR=127.0.0.1:$port; return 0; }
    kill -0 "${PID_OF[$name]}" 2>/dev/null || { tail -20 "$RAW/$name.log" >&2; die "$name died"; }
    sleep 0.1
  done
  die "$name did not come up"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

make_image() { # PATH MIB
  log "creating $1 ($2 MiB of random data)"
  head -c "$(($2 << 20))" /dev/urandom > "$1"
}

# median N...: the median of the numbers given.
median() {
  printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END {
    if (NR == 0) { print "nan"; exit }
    if (NR % 2) print a[(NR + 1) / 2]; else printf "%.6g\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# pct FILE P: the read completion-latency percentile P (50, 99) of fio's
# JSON output FILE, in ms. fio may note the signal that ended it first.
pct() {
  python3 - "$1" "$2" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]["read"]
p = j["clat_ns"]["percentile"]
key = min(p, key=lambda k: abs(float(k) - float(sys.argv[2])))
print("%.1f" % (p[key] / 1e6))
PY
}
