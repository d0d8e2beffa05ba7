#!/usr/bin/env bash
# System benchmark: a ferry edge (local encrypted cache, write-behind journal)
# attached to a ferry origin through an emulated WAN, against the same image
# served by nbdkit's file plugin behind the same emulated link (so the baseline
# pays the WAN on every request), and, for cached reads, against `ferry serve`
# on the local image (no WAN at all).
#
# Jobs (fio's nbd engine or nbdcopy, one NBD connection each):
#   write4k-qd1             4 KiB random writes, depth 1: p99 completion latency,
#                           edge vs nbdkit over the WAN. Target: edge p99 < 1 ms.
#   randread4k-qd32-cached  4 KiB random reads, depth 32, over the first HOT_MIB
#                           after one sequential pass through the edge: IOPS,
#                           edge vs `ferry serve` on the local image. Target: >= 0.8x.
#   coldread-seq            sequential read of a COLD_MIB image through a fresh
#                           edge (new cache dir, every round) with nbdcopy: MB/s,
#                           edge vs nbdkit over the WAN, and vs the link's rate.
# plus the bytes each path sent over its emulated link (from the emulators'
# exit lines: every job gets its own emulators).
#
# Usage: benches/system/edge-bench.sh
# Environment:
#   SIZE_MIB   image for write4k-qd1 and randread4k-qd32-cached (default 1024)
#   HOT_MIB    region warmed once and then re-read at random (default 256)
#   COLD_MIB   image for coldread-seq (default 256: at 100 Mbit/s a GiB takes
#              ~90 s per server per round)
#   DELAY_MS   one-way delay of the emulated links (default 25)
#   MBIT       bandwidth of the emulated links, each way (default 100)
#   RUNTIME    seconds per fio job (default 10)
#   ROUNDS     rounds; in each, a job runs on the edge and on its baseline back
#              to back, order alternating per round (default 3)
#   WRITE_IOPS rate cap of write4k-qd1 (fio --rate_iops), for both servers.
#              Default: half the link's bandwidth in 4 KiB writes (1525 at
#              100 Mbit/s), a write load the link can ship; 0 = uncapped (the
#              edge then absorbs ~40k writes/s, ~160 MB/s of journal, and each
#              round's flush ships it at the link's 12.5 MB/s: minutes).
#   RPO        the edge's --rpo in seconds (default 5)
#   JOURNAL_MIB the edge's --journal-size in MiB (default 1024)
#   EDGE_ARGS  extra arguments for every `ferry edge` (e.g. "--cache-memory 512M":
#              whether the hot region fits the edge's memory tier of decrypted
#              chunks decides randread4k-qd32-cached)
#   JOBS       subset of "write4k-qd1 randread4k-qd32-cached coldread-seq" (default: all)
#   OUT        Markdown report (default /tmp/edge-bench-DATE.md); fio JSON, edge
#              status snapshots, server logs and raw numbers go to ${OUT%.md}.raw/
#   WORK_DIR   where the scratch directory (images, origin state, edge caches
#              and journals) is made; removed at exit (default /tmp)
#   FERRY_BIN  ferry binary (default: release build in $CARGO_TARGET_DIR, built here)
#
# Fairness and method:
# - The emulated link shapes every TCP connection on its own (nothing is
#   shared between connections), and the edge talks to its origin over one
#   connection, so every client here uses one NBD connection (fio
#   --numjobs=1, nbdcopy --connections=1); otherwise a baseline with N
#   connections would get N links' worth of bandwidth.
# - Images are random data, fully allocated, and in the page cache for every
#   server (just written); `sync` before every job, so none pays for the
#   writeback of the one before.
# - write4k-qd1: fio writes fresh random data every time (--refill_buffers):
#   the link compresses (zstd), and with fio's reused buffer the shipped
#   batches would shrink to almost nothing. The edge is flushed (`ferry edge
#   flush`) after every round, so each round starts with an empty journal;
#   the flush time and the bytes shipped are reported. nbdkit writes to its
#   own copy of the image.
# - randread4k-qd32-cached: a fresh edge reads the hot region once
#   sequentially (fio 1 MiB, depth 8), then once more to check that the second
#   pass is served from the cache (cache hit ratio from `ferry edge status`);
#   `ferry serve` gets the same two passes. Its link bytes include the warm-up.
# - coldread-seq: nbdcopy to null:, timed by its wall time (the edge has
#   attached before; nbdkit's NBD handshake crosses the WAN and is included,
#   a few round trips). The edge's copy is then read back from its cache and
#   checked against the image's SHA-256.
# - Ratios are medians of the per-round ratios of back-to-back runs (this
#   machine's noise drifts over minutes); absolute numbers are medians too.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SIZE_MIB=${SIZE_MIB:-1024}
HOT_MIB=${HOT_MIB:-256}
COLD_MIB=${COLD_MIB:-256}
DELAY_MS=${DELAY_MS:-25}
MBIT=${MBIT:-100}
RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
RPO=${RPO:-5}
JOURNAL_MIB=${JOURNAL_MIB:-1024}
JOBS=${JOBS:-"write4k-qd1 randread4k-qd32-cached coldread-seq"}
read -r -a EDGE_EXTRA <<< "${EDGE_ARGS:-}"
WORK_DIR=${WORK_DIR:-/tmp}
OUT=${OUT:-/tmp/edge-bench-$(date +%Y%m%d-%H%M%S).md}
if [ -z "${WRITE_IOPS:-}" ]; then
  WRITE_IOPS=$(awk -v m="$MBIT" 'BEGIN { printf "%d", m * 1e6 / 8 / 4096 / 2 }')
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}

die() { echo "edge-bench: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*"; }

for v in SIZE_MIB HOT_MIB COLD_MIB RUNTIME ROUNDS WRITE_IOPS JOURNAL_MIB; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
for v in DELAY_MS MBIT RPO; do
  [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$v must be a number (got '${!v}')"
done
[ "$ROUNDS" -ge 1 ] && [ "$RUNTIME" -ge 1 ] || die "ROUNDS and RUNTIME must be at least 1"
[ "$HOT_MIB" -ge 1 ] && [ "$HOT_MIB" -le "$SIZE_MIB" ] || die "HOT_MIB must be within 1..SIZE_MIB"
[ "$COLD_MIB" -ge 1 ] || die "COLD_MIB must be at least 1"
awk -v m="$MBIT" 'BEGIN { exit !(m > 0) }' || die "MBIT must be above 0"
has_job() { [[ " $JOBS " == *" $1 "* ]]; }
for j in $JOBS; do
  case $j in
    write4k-qd1 | randread4k-qd32-cached | coldread-seq) ;;
    *) die "unknown job $j (write4k-qd1 | randread4k-qd32-cached | coldread-seq)" ;;
  esac
done
for t in fio nbdinfo nbdcopy nbdkit python3 sha256sum awk; do
  command -v "$t" >/dev/null || die "missing $t: run scripts/install-deps.sh"
done

if [ -z "${FERRY_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release --locked -p ferry)
  FERRY_BIN=$CARGO_TARGET_DIR/release/ferry
fi
[ -x "$FERRY_BIN" ] || die "ferry binary $FERRY_BIN missing"

RAW=${OUT%.md}.raw
if [ -e "$RAW" ] && [ -n "$(ls -A "$RAW" 2>/dev/null)" ]; then
  die "$RAW exists and is not empty: remove it or choose another OUT"
fi
mkdir -p "$RAW" "$(dirname "$OUT")"
WORK=$(mktemp -d "$WORK_DIR/edge-bench.XXXXXX")
START_TIME=$(date +%s)
log "scratch in $WORK, raw results in $RAW"

# --- processes: everything started is recorded here and stopped at exit ---
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
    echo "edge-bench: $name (pid $pid) ignored SIGTERM; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  unset "PID_OF[$name]"
}

cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
    stop_proc "${STARTED[i]}" 20
  done
  rm -rf "$WORK"
  [ "$rc" -eq 0 ] || echo "edge-bench: failed (exit $rc); logs in $RAW" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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
      echo "edge-bench: $name exited before listening; its log:" >&2
      tail -20 "$errlog" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "edge-bench: $name did not print 'listening $what' within 60 s" >&2
  tail -20 "$errlog" >&2
  return 1
}

# start_link NAME TARGET: an emulated WAN in front of TARGET; sets LINK.
start_link() {
  spawn "$1" link "$FERRY_BIN" link-emulator --listen 127.0.0.1:0 --target "$2" \
    --delay-ms "$DELAY_MS" --mbit "$MBIT"
  LINK=$ADDR
}

# stop_link NAME LABEL: stops the emulator and records its byte counts in
# $RAW/link.LABEL.txt as "bytes_to_target bytes_to_client".
stop_link() {
  stop_proc "$1"
  local counts
  counts=$(sed 's/\x1b\[[0-9;]*m//g' "$RAW/$1.log" |
    sed -n 's/.*link emulator stopped.*bytes_to_target=\([0-9]*\) bytes_to_client=\([0-9]*\).*/\1 \2/p' |
    tail -1)
  [ -n "$counts" ] || die "link emulator $1 did not log its byte counts (see $RAW/$1.log)"
  echo "$counts" > "$RAW/link.$2.txt"
}

# start_edge NAME VOLUME CACHE_DIR ORIGIN: sets EDGE_URI and EDGE_CTL. Retries
# while the origin still holds the volume for the previous edge (it notices
# that edge's disconnection one link delay later).
start_edge() {
  local name=$1 vol=$2 dir=$3 origin=$4 try nbd
  for try in 1 2 3 4 5; do
    if spawn "$name" control "$FERRY_BIN" edge --origin "$origin" --volume "$vol" \
      --cache-dir "$dir" --cache-size "$((CACHE_MIB))M" --journal-size "${JOURNAL_MIB}M" \
      --rpo "$RPO" --nbd 127.0.0.1:0 --no-tls "${EDGE_EXTRA[@]}"; then
      EDGE_CTL=$ADDR
      nbd=$(sed -n 's/^listening nbd //p' "$RAW/$name.stdout" | head -1)
      [ -n "$nbd" ] || die "$name printed no 'listening nbd' line"
      EDGE_URI=nbd://$nbd/$vol
      return 0
    fi
    grep -qi 'attached by edge\|busy' "$RAW/$name.log" || die "$name failed to start"
    log "  $name: the origin still holds $vol for the previous edge; retrying ($try/5)"
    sleep 1
  done
  die "$name could not attach $vol"
}

edge_status() { # CONTROL LABEL
  "$FERRY_BIN" edge status --control "$1" > "$RAW/status.$2.txt"
}
status_get() { # LABEL KEY
  sed -n "s/^$2: //p" "$RAW/status.$1.txt"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_nbdkit NAME IMAGE [nbdkit options]: sets NBDKIT_ADDR.
start_nbdkit() {
  local name=$1 img=$2 port i
  shift 2
  port=$(free_port)
  nbdkit -f -i 127.0.0.1 -p "$port" "$@" file file="$img" 2>> "$RAW/$name.log" &
  PID_OF[$name]=$!
  STARTED+=("$name")
  # Probe it directly, not through its link: the link counts bytes.
  for ((i = 0; i < 300; i++)); do
    nbdinfo --size "nbd://127.0.0.1:$port" >/dev/null 2>&1 && { NBDKIT_ADDR=127.0.0.1:$port; return 0; }
    kill -0 "${PID_OF[$name]}" 2>/dev/null || { tail -20 "$RAW/$name.log" >&2; die "$name died"; }
    sleep 0.1
  done
  die "$name did not come up"
}

# run_fio OUTFILE URI ARGS...: one fio job, one NBD connection, JSON output.
run_fio() {
  local out=$1 uri=$2
  shift 2
  fio --name=job --ioengine=nbd --uri="$uri" --numjobs=1 --norandommap --randrepeat=0 \
    --group_reporting --output-format=json --output="$out" "$@" >/dev/null \
    || die "fio failed ($out)"
}

# order_for ROUND A B: A then B in odd rounds, B then A in even ones.
order_for() { if (($1 % 2)); then echo "$2 $3"; else echo "$3 $2"; fi; }

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

make_image() { # PATH MIB
  log "creating $1 ($2 MiB of random data)"
  head -c "$(($2 << 20))" /dev/urandom > "$1"
}

CACHE_MIB=$((SIZE_MIB > COLD_MIB ? SIZE_MIB : COLD_MIB))
cat > "$RAW/meta.txt" <<EOF
SIZE_MIB=$SIZE_MIB
HOT_MIB=$HOT_MIB
COLD_MIB=$COLD_MIB
DELAY_MS=$DELAY_MS
MBIT=$MBIT
RUNTIME=$RUNTIME
ROUNDS=$ROUNDS
WRITE_IOPS=$WRITE_IOPS
RPO=$RPO
JOURNAL_MIB=$JOURNAL_MIB
CACHE_MIB=$CACHE_MIB
JOBS=$JOBS
FERRY_BIN=$FERRY_BIN
EDGE_ARGS=${EDGE_ARGS:-}
REVISION=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
EOF

# --- images and the origin ---
IMG=$WORK/bench.img
COLD_IMG=$WORK/cold.img
EXPORTS=()
if has_job write4k-qd1 || has_job randread4k-qd32-cached; then
  make_image "$IMG" "$SIZE_MIB"
  EXPORTS+=(--export "bench=$IMG")
fi
if has_job write4k-qd1; then
  cp "$IMG" "$WORK/nbdkit.img"
fi
if has_job coldread-seq; then
  make_image "$COLD_IMG" "$COLD_MIB"
  COLD_SHA=$(sha256sum "$COLD_IMG" | cut -d' ' -f1)
  EXPORTS+=(--export "cold=$COLD_IMG")
fi
spawn origin origin "$FERRY_BIN" origin --listen 127.0.0.1:0 "${EXPORTS[@]}" \
  --state-dir "$WORK/origin-state" --no-tls
ORIGIN=$ADDR
log "origin on $ORIGIN; links: ${DELAY_MS} ms each way, ${MBIT} Mbit/s each way"

# --- write4k-qd1: edge vs nbdkit over the WAN ---
if has_job write4k-qd1; then
  log "write4k-qd1: 4 KiB random writes, depth 1, ${RUNTIME}s, rate cap ${WRITE_IOPS} IOPS (0: none)"
  start_nbdkit nbdkit-w "$WORK/nbdkit.img"
  start_link link-w-nbdkit "$NBDKIT_ADDR"
  declare -A URI=([nbdkit]=nbd://$LINK/bench)
  start_link link-w-edge "$ORIGIN"
  start_edge edge-w bench "$WORK/edge-w" "$LINK"
  URI[edge]=$EDGE_URI
  rate=()
  [ "$WRITE_IOPS" -eq 0 ] || rate=(--rate_iops="$WRITE_IOPS")
  for round in $(seq "$ROUNDS"); do
    for server in $(order_for "$round" edge nbdkit); do
      sync
      [ "$server" != edge ] || edge_status "$EDGE_CTL" "write.$round.before"
      run_fio "$RAW/fio.write4k-qd1.$round.$server.json" "${URI[$server]}" \
        --rw=randwrite --bs=4k --iodepth=1 --size="${SIZE_MIB}M" --refill_buffers \
        --time_based --runtime="$RUNTIME" "${rate[@]}"
      if [ "$server" = edge ]; then
        edge_status "$EDGE_CTL" "write.$round.after"
        # The edge's resident memory: the journal keeps written data in memory.
        ps -o rss= -p "${PID_OF[edge-w]}" | tr -d ' ' > "$RAW/rss.write.$round.txt"
        t0=$(now)
        "$FERRY_BIN" edge flush --control "$EDGE_CTL" >/dev/null || die "ferry edge flush failed"
        elapsed "$t0" > "$RAW/flush.$round.txt"
        edge_status "$EDGE_CTL" "write.$round.flushed"
      fi
    done
    log "  round $round/$ROUNDS done (edge flush $(cat "$RAW/flush.$round.txt") s)"
  done
  stop_proc edge-w
  stop_link link-w-edge write4k-qd1.edge
  stop_proc nbdkit-w
  stop_link link-w-nbdkit write4k-qd1.nbdkit
  rm -f "$WORK/nbdkit.img"
  rm -rf "$WORK/edge-w"
fi

# --- randread4k-qd32-cached: warmed edge vs ferry serve on the local image ---
if has_job randread4k-qd32-cached; then
  log "randread4k-qd32-cached: warming the first $HOT_MIB MiB through a fresh edge"
  spawn serve-r nbd "$FERRY_BIN" serve "$IMG" --name bench --read-only --nbd 127.0.0.1:0
  declare -A URI=([serve]=nbd://$ADDR/bench)
  start_link link-r-edge "$ORIGIN"
  start_edge edge-r bench "$WORK/edge-r" "$LINK"
  URI[edge]=$EDGE_URI
  warm=(--rw=read --bs=1M --iodepth=8 --size="${HOT_MIB}M")
  edge_status "$EDGE_CTL" read.start
  run_fio "$RAW/fio.warm.edge.json" "${URI[edge]}" "${warm[@]}"
  edge_status "$EDGE_CTL" read.warmed
  run_fio "$RAW/fio.check.edge.json" "${URI[edge]}" "${warm[@]}"
  edge_status "$EDGE_CTL" read.checked
  run_fio "$RAW/fio.warm.serve.json" "${URI[serve]}" "${warm[@]}"
  run_fio "$RAW/fio.check.serve.json" "${URI[serve]}" "${warm[@]}"
  hits=$(($(status_get read.checked cache_hits) - $(status_get read.warmed cache_hits)))
  misses=$(($(status_get read.checked cache_misses) - $(status_get read.warmed cache_misses)))
  fetched=$(($(status_get read.checked bytes_fetched) - $(status_get read.warmed bytes_fetched)))
  ratio=$(awk -v h="$hits" -v m="$misses" 'BEGIN { printf "%.3f", (h + m) ? h / (h + m) : 0 }')
  log "  second pass: cache hit ratio $ratio ($hits hits, $misses misses, $fetched bytes fetched)"
  if awk -v r="$ratio" 'BEGIN { exit !(r < 0.9) }'; then
    echo "edge-bench: WARNING: the second pass over the hot region was not mostly cache hits" >&2
  fi
  for round in $(seq "$ROUNDS"); do
    for server in $(order_for "$round" edge serve); do
      sync
      [ "$server" != edge ] || edge_status "$EDGE_CTL" "read.$round.before"
      run_fio "$RAW/fio.randread4k-qd32-cached.$round.$server.json" "${URI[$server]}" \
        --rw=randread --bs=4k --iodepth=32 --size="${HOT_MIB}M" \
        --time_based --runtime="$RUNTIME"
      [ "$server" != edge ] || edge_status "$EDGE_CTL" "read.$round.after"
    done
    log "  round $round/$ROUNDS done"
  done
  stop_proc edge-r
  stop_link link-r-edge randread4k-qd32-cached.edge
  stop_proc serve-r
  rm -rf "$WORK/edge-r"
fi

# --- coldread-seq: fresh edge vs nbdkit over the WAN ---
if has_job coldread-seq; then
  log "coldread-seq: nbdcopy of a $COLD_MIB MiB image, fresh edge every round"
  start_nbdkit nbdkit-c "$COLD_IMG" -r
  for round in $(seq "$ROUNDS"); do
    for server in $(order_for "$round" edge nbdkit); do
      sync
      if [ "$server" = edge ]; then
        start_link "link-c-edge-$round" "$ORIGIN"
        start_edge "edge-c-$round" cold "$WORK/edge-c-$round" "$LINK"
        edge_status "$EDGE_CTL" "cold.$round.start"
        t0=$(now)
        nbdcopy --connections=1 "$EDGE_URI" null: || die "nbdcopy from the edge failed"
        elapsed "$t0" > "$RAW/cold.$round.edge.txt"
        edge_status "$EDGE_CTL" "cold.$round.copied"
        # Read it back (from the cache now) and check every byte.
        sha=$(nbdcopy --connections=1 "$EDGE_URI" - | sha256sum | cut -d' ' -f1)
        edge_status "$EDGE_CTL" "cold.$round.verified"
        if [ "$sha" = "$COLD_SHA" ]; then
          echo ok > "$RAW/cold.$round.verify.txt"
        else
          echo "MISMATCH $sha" > "$RAW/cold.$round.verify.txt"
          echo "edge-bench: WARNING: the edge returned different data (sha256 $sha, image $COLD_SHA)" >&2
        fi
        stop_proc "edge-c-$round"
        stop_link "link-c-edge-$round" "coldread-seq.$round.edge"
        rm -rf "$WORK/edge-c-$round"
      else
        start_link "link-c-nbdkit-$round" "$NBDKIT_ADDR"
        t0=$(now)
        nbdcopy --connections=1 "nbd://$LINK/cold" null: || die "nbdcopy from nbdkit failed"
        elapsed "$t0" > "$RAW/cold.$round.nbdkit.txt"
        stop_link "link-c-nbdkit-$round" "coldread-seq.$round.nbdkit"
      fi
    done
    log "  round $round/$ROUNDS done (edge $(cat "$RAW/cold.$round.edge.txt") s, nbdkit $(cat "$RAW/cold.$round.nbdkit.txt") s)"
  done
  stop_proc nbdkit-c
fi
stop_proc origin
WALL=$(($(date +%s) - START_TIME))
echo "WALL_SECONDS=$WALL" >> "$RAW/meta.txt"

python3 - "$RAW" > "$OUT" <<'PY'
import glob, json, os, re, statistics, sys

raw = sys.argv[1]
meta = dict(l.strip().split("=", 1) for l in open(os.path.join(raw, "meta.txt")) if "=" in l)
rounds = int(meta["ROUNDS"])
jobs = meta["JOBS"].split()
mbit = float(meta["MBIT"])
link_mbs = mbit * 1e6 / 8 / 1e6  # MB/s (10^6 bytes)
MiB = 2**20

def fio(path):
    text = open(path).read()
    doc = json.loads(text[text.index("{"):])
    j = doc["jobs"][0]
    if j.get("error"):
        sys.exit(f"{path}: fio error {j['error']}")
    side = j["write"] if j["write"]["io_bytes"] else j["read"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    us = lambda k: pct.get(k, 0) / 1000.0
    return {"iops": side["iops"], "mibs": side["bw_bytes"] / MiB, "bytes": side["io_bytes"],
            "ios": side["total_ios"], "p50": us("50.000000"), "p99": us("99.000000"),
            "p999": us("99.900000")}

def status(label):
    p = os.path.join(raw, f"status.{label}.txt")
    if not os.path.exists(p):
        return None
    out = {}
    for line in open(p):
        k, _, v = line.partition(": ")
        v = v.strip()
        try:
            out[k] = int(v)
        except ValueError:
            out[k] = v
    return out

def exit_status(name):
    """The `edge status at exit` block an edge logs when it stops."""
    p = os.path.join(raw, f"{name}.log")
    if not os.path.exists(p):
        return None
    text = re.sub(r"\x1b\[[0-9;]*m", "", open(p).read())
    i = text.rfind("edge status at exit:")
    if i < 0:
        return None
    out = {}
    for line in text[i:].splitlines()[1:]:
        k, sep, v = line.partition(": ")
        if not sep or " " in k:
            break
        try:
            out[k] = int(v)
        except ValueError:
            out[k] = v.strip()
    return out

def delta(a, b, key):
    sa, sb = status(a), status(b)
    return None if sa is None or sb is None else sb[key] - sa[key]

def readf(name):
    p = os.path.join(raw, name)
    return open(p).read().strip() if os.path.exists(p) else None

def link(label):
    v = readf(f"link.{label}.txt")
    return tuple(int(x) for x in v.split()) if v else None

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def fmt(x, nd=0):
    return "-" if x is None else f"{x:,.{nd}f}"

def mib(b):
    return "-" if b is None else f"{b / MiB:,.1f} MiB"

def per_round(job, server):
    out = {}
    for r in range(1, rounds + 1):
        p = os.path.join(raw, f"fio.{job}.{r}.{server}.json")
        if os.path.exists(p):
            out[r] = fio(p)
    return out

def ratio_med(a, b, key):
    rs = [a[r][key] / b[r][key] for r in a if r in b and b[r][key]]
    return statistics.median(rs) if rs else None

summary, raw_lines = [], []
wall = int(meta.get("WALL_SECONDS", "0"))
print(f"## ferry edge over an emulated WAN ({meta['DELAY_MS']} ms each way, {meta['MBIT']} Mbit/s)\n")
print(f"Median of {rounds} rounds, {meta['RUNTIME']} s per fio job; {meta['SIZE_MIB']} MiB image "
      f"(hot region {meta['HOT_MIB']} MiB), {meta['COLD_MIB']} MiB cold-read image; "
      f"one NBD connection per client; tree {meta.get('REVISION', '?')}"
      f"{', edge args ' + repr(meta['EDGE_ARGS']) if meta.get('EDGE_ARGS') else ''}; "
      f"run took {wall // 60} min {wall % 60} s.")
print("Ratios are edge / baseline, the median of per-round ratios of back-to-back runs.\n")

if "write4k-qd1" in jobs:
    e, n = per_round("write4k-qd1", "edge"), per_round("write4k-qd1", "nbdkit")
    ep99 = med(x["p99"] for x in e.values())
    np99 = med(x["p99"] for x in n.values())
    rate = int(meta["WRITE_IOPS"])
    verdict = "-" if ep99 is None else ("met" if ep99 < 1000 else "**missed**")
    summary.append(("write4k-qd1: p99 write latency (µs)", fmt(ep99, 1), f"{fmt(np99, 1)} (nbdkit over WAN)",
                    fmt(ratio_med(e, n, "p99"), 4), f"edge p99 < 1 ms: {verdict}"))
    raw_lines.append(f"### write4k-qd1 (4 KiB random writes, depth 1, "
                     f"{'rate cap ' + str(rate) + ' IOPS' if rate else 'no rate cap'})\n")
    raw_lines.append("| server | IOPS | p50 (µs) | p99 (µs) | p99.9 (µs) | p99 per round (µs) |")
    raw_lines.append("|---|---:|---:|---:|---:|---|")
    for name, d in (("edge", e), ("nbdkit over WAN", n)):
        raw_lines.append(f"| {name} | {fmt(med(x['iops'] for x in d.values()))} | "
                         f"{fmt(med(x['p50'] for x in d.values()), 1)} | {fmt(med(x['p99'] for x in d.values()), 1)} | "
                         f"{fmt(med(x['p999'] for x in d.values()), 1)} | "
                         f"{', '.join(fmt(d[r]['p99'], 1) for r in sorted(d))} |")
    raw_lines.append("")
    raw_lines.append("Edge, per round: writes acknowledged, journal left unshipped when the job ended, "
                     "and the flush that shipped the rest:\n")
    raw_lines.append("| round | writes | data written | unshipped at job end | edge RSS at job end | flush (s) | shipped in round | batches |")
    raw_lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(e):
        rss = readf(f"rss.write.{r}.txt")
        raw_lines.append(
            f"| {r} | {e[r]['ios']:,} | {mib(e[r]['bytes'])} | "
            f"{mib((status(f'write.{r}.after') or {}).get('journal_unshipped_bytes'))} | "
            f"{mib(int(rss) * 1024) if rss and rss.isdigit() else '-'} | {readf(f'flush.{r}.txt') or '-'} | "
            f"{mib(delta(f'write.{r}.before', f'write.{r}.flushed', 'bytes_shipped'))} | "
            f"{fmt(delta(f'write.{r}.before', f'write.{r}.flushed', 'batches_shipped'))} |")
    raw_lines.append("")
    raw_lines.append("Bytes over the link, all rounds (edge: attach + shipped batches; nbdkit: every request):\n")
    raw_lines.append("| path | data written | to server | to client | link bytes / data written |")
    raw_lines.append("|---|---:|---:|---:|---:|")
    for name, d, lab in (("edge → origin", e, "write4k-qd1.edge"), ("fio → nbdkit", n, "write4k-qd1.nbdkit")):
        l = link(lab)
        written = sum(x["bytes"] for x in d.values())
        raw_lines.append(f"| {name} | {mib(written)} | {mib(l and l[0])} | {mib(l and l[1])} | "
                         f"{fmt(sum(l) / written, 3) if l and written else '-'} |")
    raw_lines.append("")

if "randread4k-qd32-cached" in jobs:
    e, s = per_round("randread4k-qd32-cached", "edge"), per_round("randread4k-qd32-cached", "serve")
    eiops = med(x["iops"] for x in e.values())
    siops = med(x["iops"] for x in s.values())
    r = ratio_med(e, s, "iops")
    verdict = "-" if r is None else ("met" if r >= 0.8 else "**missed**")
    summary.append(("randread4k-qd32-cached: IOPS", fmt(eiops), f"{fmt(siops)} (ferry serve, local)",
                    fmt(r, 2), f">= 0.8x: {verdict}"))
    raw_lines.append(f"### randread4k-qd32-cached (4 KiB random reads, depth 32, first {meta['HOT_MIB']} MiB)\n")
    raw_lines.append("| server | IOPS | MiB/s | p50 (µs) | p99 (µs) | IOPS per round |")
    raw_lines.append("|---|---:|---:|---:|---:|---|")
    for name, d in (("edge (warm cache)", e), ("ferry serve (local)", s)):
        raw_lines.append(f"| {name} | {fmt(med(x['iops'] for x in d.values()))} | "
                         f"{fmt(med(x['mibs'] for x in d.values()), 1)} | {fmt(med(x['p50'] for x in d.values()), 1)} | "
                         f"{fmt(med(x['p99'] for x in d.values()), 1)} | "
                         f"{', '.join(fmt(d[k]['iops']) for k in sorted(d))} |")
    raw_lines.append("")
    def hit(a, b):
        h, m = delta(a, b, "cache_hits"), delta(a, b, "cache_misses")
        return None if h is None or not (h + m) else h / (h + m)
    warm = fio(os.path.join(raw, "fio.warm.edge.json"))
    check = fio(os.path.join(raw, "fio.check.edge.json"))
    lines = [
        ("warm pass (1 MiB sequential reads, depth 8)", f"{fmt(warm['mibs'] * MiB / 1e6, 1)} MB/s",
         fmt(hit("read.start", "read.warmed"), 3), mib(delta("read.start", "read.warmed", "bytes_fetched")),
         mib(delta("read.start", "read.warmed", "bytes_pushed"))),
        ("check pass (the same again)", f"{fmt(check['mibs'] * MiB / 1e6, 1)} MB/s",
         fmt(hit("read.warmed", "read.checked"), 3), mib(delta("read.warmed", "read.checked", "bytes_fetched")),
         mib(delta("read.warmed", "read.checked", "bytes_pushed"))),
    ]
    for k in sorted(e):
        lines.append((f"round {k} (measured)", f"{fmt(e[k]['iops'])} IOPS", fmt(hit(f"read.{k}.before", f"read.{k}.after"), 3),
                      mib(delta(f"read.{k}.before", f"read.{k}.after", "bytes_fetched")),
                      mib(delta(f"read.{k}.before", f"read.{k}.after", "bytes_pushed"))))
    raw_lines.append("Edge, from `ferry edge status` (hit ratio = cache hits / (hits + misses)):\n")
    raw_lines.append("| pass | speed | cache hit ratio | fetched from origin | pushed by origin |")
    raw_lines.append("|---|---:|---:|---:|---:|")
    raw_lines += [f"| {a} | {b} | {c} | {d} | {f} |" for a, b, c, d, f in lines]
    l = link("randread4k-qd32-cached.edge")
    raw_lines.append(f"\nBytes over the edge's link, warm-up included: {mib(l and l[0])} to the origin, "
                     f"{mib(l and l[1])} to the edge (ferry serve: no link).\n")

if "coldread-seq" in jobs:
    cold_mib = int(meta["COLD_MIB"])
    size = cold_mib * MiB
    secs = {srv: {r: float(readf(f"cold.{r}.{srv}.txt")) for r in range(1, rounds + 1)
                  if readf(f"cold.{r}.{srv}.txt")} for srv in ("edge", "nbdkit")}
    mbs = {srv: {r: size / 1e6 / t for r, t in d.items()} for srv, d in secs.items()}
    em, nm = med(mbs["edge"].values()), med(mbs["nbdkit"].values())
    rs = [mbs["edge"][r] / mbs["nbdkit"][r] for r in mbs["edge"] if r in mbs["nbdkit"]]
    r = statistics.median(rs) if rs else None
    summary.append((f"coldread-seq: MB/s ({cold_mib} MiB, s)",
                    f"{fmt(em, 2)} ({fmt(med(secs['edge'].values()), 1)} s)",
                    f"{fmt(nm, 2)} ({fmt(med(secs['nbdkit'].values()), 1)} s) (nbdkit over WAN)",
                    fmt(r, 2),
                    f"link {link_mbs:g} MB/s: edge {fmt(em / link_mbs if em else None, 2)}x, "
                    f"nbdkit {fmt(nm / link_mbs if nm else None, 2)}x"))
    raw_lines.append(f"### coldread-seq (nbdcopy --connections=1 to null:, {cold_mib} MiB, fresh edge every round)\n")
    raw_lines.append("Edge columns: what it fetched on demand and what the origin pushed unasked "
                     "(group pushes), by the end of the copy and in the edge's whole life "
                     "(from its exit status: pushes keep arriving after the copy).\n")
    raw_lines.append("| round | server | seconds | MB/s | link to server | link to client | "
                     "to client / image | fetched | pushed by copy end | pushed in all | verify |")
    raw_lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for k in range(1, rounds + 1):
        for srv in ("edge", "nbdkit"):
            if k not in secs[srv]:
                continue
            l = link(f"coldread-seq.{k}.{srv}")
            fetched = delta(f"cold.{k}.start", f"cold.{k}.copied", "bytes_fetched") if srv == "edge" else None
            pushed = delta(f"cold.{k}.start", f"cold.{k}.copied", "bytes_pushed") if srv == "edge" else None
            at_exit = (exit_status(f"edge-c-{k}") or {}) if srv == "edge" else {}
            ver = readf(f"cold.{k}.verify.txt") if srv == "edge" else "-"
            refetch = delta(f"cold.{k}.copied", f"cold.{k}.verified", "bytes_fetched") if srv == "edge" else None
            if refetch:
                ver = f"{ver} (read-back fetched {mib(refetch)})"
            raw_lines.append(f"| {k} | {srv} | {secs[srv][k]:.2f} | {mbs[srv][k]:.2f} | {mib(l and l[0])} | "
                             f"{mib(l and l[1])} | {fmt(l[1] / size if l else None, 3)} | {mib(fetched)} | "
                             f"{mib(pushed)} | {mib(at_exit.get('bytes_pushed'))} | {ver} |")
    raw_lines.append("")

print("| job | edge | baseline | ratio | target |")
print("|---|---:|---:|---:|---|")
for row in summary:
    print("| " + " | ".join(row) + " |")
print("\n## Raw numbers\n")
print("\n".join(raw_lines))
print(f"Raw files (fio JSON, `ferry edge status` snapshots, logs): {raw}")
PY
cat "$OUT"
log "report written to $OUT (took $((WALL / 60)) min $((WALL % 60)) s)"
