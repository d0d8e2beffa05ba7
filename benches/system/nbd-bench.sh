#!/usr/bin/env bash
# System benchmark: ferry vs nbdkit (file plugin) vs qemu-nbd, same image, same
# fio jobs through fio's nbd engine (libnbd, one TCP connection per job).
#
# Usage: benches/system/nbd-bench.sh
# Environment:
#   SERVERS   servers to run, in this order inside each round
#             (default "ferry nbdkit qemu-nbd"; e.g. SERVERS="nbdkit qemu-nbd")
#   RUNTIME   seconds per fio job (default 10)
#   ROUNDS    rounds; in each, every job runs on every server back to back
#             (order rotating per round), so noise hits all alike (default 3)
#   SIZE      image size (default 1G), fully allocated with random data
#   BENCH_DIR where the image and results live, on local disk
#             (default $HOME/.cache/ferry/bench)
#   JOBS      subset of jobs (default: all of randread-4k-qd32 randwrite-4k-qd32
#             read-1m-qd8 write-1m-qd8 randread-4k-qd1)
#   OUT       also write the Markdown report to this file
#   FERRY_BIN ferry binary (default: release build in $CARGO_TARGET_DIR, built here)
#
# Fairness choices:
# - ferry serves through the page cache (no O_DIRECT). nbdkit's file plugin does
#   the same by default (cache=default). qemu-nbd is run with
#   --cache=writeback --aio=threads: page cache, no O_DIRECT, no io_uring, the
#   closest match (qemu-nbd's own defaults, spelled out).
# - qemu-nbd gets --shared=8 so it accepts more than one client; each fio job
#   still uses a single connection (--numjobs=1).
# - The page cache is not dropped (that needs root and hurts whoever runs next);
#   instead the image is read once (cat > /dev/null) before the servers start,
#   so every server starts warm.
# - `sync` before every job, so no job pays for the writeback of the one before
#   (the 1 MiB write job dirties the whole image).
# - Medians over ROUNDS of IOPS, MiB/s and p99 completion latency.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SERVERS=${SERVERS:-"ferry nbdkit qemu-nbd"}
RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-1G}
BENCH_DIR=${BENCH_DIR:-$HOME/.cache/ferry/bench}
JOBS=${JOBS:-"randread-4k-qd32 randwrite-4k-qd32 read-1m-qd8 write-1m-qd8 randread-4k-qd1"}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}

for t in fio nbdinfo python3; do
  command -v "$t" >/dev/null || { echo "missing $t: run scripts/install-deps.sh" >&2; exit 1; }
done
for s in $SERVERS; do
  case $s in
    ferry) ;;
    nbdkit) command -v nbdkit >/dev/null || { echo "missing nbdkit" >&2; exit 1; } ;;
    qemu-nbd) command -v qemu-nbd >/dev/null || { echo "missing qemu-nbd" >&2; exit 1; } ;;
    *) echo "unknown server $s (ferry|nbdkit|qemu-nbd)" >&2; exit 1 ;;
  esac
done

if [[ " $SERVERS " == *" ferry "* ]]; then
  if [ -z "${FERRY_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release -p ferry)
    FERRY_BIN=$CARGO_TARGET_DIR/release/ferry
  fi
  [ -x "$FERRY_BIN" ] || { echo "ferry binary $FERRY_BIN missing" >&2; exit 1; }
fi

mkdir -p "$BENCH_DIR"
IMG=$BENCH_DIR/bench.img
SIZE_BYTES=$(numfmt --from=iec "$SIZE")
if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" -ne "$SIZE_BYTES" ] \
  || [ $(( $(stat -c %b "$IMG") * 512 )) -lt "$SIZE_BYTES" ]; then
  echo "creating $IMG ($SIZE, random, fully allocated)"
  head -c "$SIZE_BYTES" /dev/urandom > "$IMG.tmp"
  mv "$IMG.tmp" "$IMG"
fi
RES=$(mktemp -d "$BENCH_DIR/results.XXXXXX")
echo "results in $RES"

declare -A SERVER_PIDS=() URIS=()
stop_servers() {
  local pid
  for pid in "${SERVER_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${SERVER_PIDS[@]}"; do
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  SERVER_PIDS=()
}
trap stop_servers EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_server NAME -> records its pid in SERVER_PIDS and its URI in URIS
start_server() {
  local name=$1 port log=$RES/$1.log
  case $name in
    ferry)
      local out=$RES/ferry.stdout
      : > "$out"
      "$FERRY_BIN" serve "$IMG" --name bench --nbd 127.0.0.1:0 > "$out" 2>> "$log" &
      SERVER_PID=$!
      for _ in $(seq 300); do
        grep -q '^listening nbd ' "$out" && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.1
      done
      port=$(sed -n 's/^listening nbd 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out" | head -1)
      [ -n "$port" ] || { echo "ferry did not report a port" >&2; cat "$log" >&2; exit 1; }
      ;;
    nbdkit)
      port=$(free_port)
      nbdkit -f -i 127.0.0.1 -p "$port" file file="$IMG" 2>> "$log" &
      SERVER_PID=$!
      ;;
    qemu-nbd)
      port=$(free_port)
      qemu-nbd -f raw -t -b 127.0.0.1 -p "$port" -x bench --shared=8 \
        --cache=writeback --aio=threads "$IMG" 2>> "$log" &
      SERVER_PID=$!
      ;;
  esac
  SERVER_PIDS[$name]=$SERVER_PID
  URIS[$name]=nbd://127.0.0.1:$port/bench
  for _ in $(seq 300); do
    nbdinfo --size "${URIS[$name]}" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "$name died" >&2; cat "$log" >&2; exit 1; }
    sleep 0.1
  done
  echo "$name did not come up" >&2
  exit 1
}

job_args() {
  case $1 in
    randread-4k-qd32) echo "--rw=randread --bs=4k --iodepth=32" ;;
    randwrite-4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    read-1m-qd8) echo "--rw=read --bs=1M --iodepth=8" ;;
    write-1m-qd8) echo "--rw=write --bs=1M --iodepth=8" ;;
    randread-4k-qd1) echo "--rw=randread --bs=4k --iodepth=1" ;;
    *) echo "unknown job $1" >&2; exit 1 ;;
  esac
}

# All servers serve the same image at once (idle ones cost nothing), and
# each job runs on every server back to back, so the runs being compared are
# a few seconds apart: this machine's noise drifts over minutes. The server
# order rotates every round so no server always goes first.
read -r -a ORDER <<< "$SERVERS"
cat "$IMG" > /dev/null # warm the page cache alike for every server
for server in "${ORDER[@]}"; do
  start_server "$server"
done
for round in $(seq "$ROUNDS"); do
  shift_by=$(( (round - 1) % ${#ORDER[@]} ))
  this_round=("${ORDER[@]:shift_by}" "${ORDER[@]:0:shift_by}")
  echo "round $round/$ROUNDS: ${this_round[*]}"
  for job in $JOBS; do
    for server in "${this_round[@]}"; do
      # Every run starts with no dirty pages: otherwise it pays for the
      # writeback of whatever the run before it wrote.
      sync
      # shellcheck disable=SC2046
      fio --name="$job" --ioengine=nbd --uri="${URIS[$server]}" $(job_args "$job") \
        --numjobs=1 --size="$SIZE_BYTES" --time_based --runtime="$RUNTIME" \
        --norandommap --randrepeat=0 --group_reporting \
        --output-format=json --output="$RES/$round.$server.$job.json" >/dev/null
    done
    echo "  $job done"
  done
done
stop_servers

python3 - "$RES" "$SERVERS" "$JOBS" "$RUNTIME" "$ROUNDS" "$SIZE" > "$RES/report.md" <<'PY'
import glob, json, os, statistics, sys
res, servers, jobs, runtime, rounds, size = sys.argv[1:]
servers, jobs = servers.split(), jobs.split()
data = {}  # (server, job) -> list of (iops, mibs, p99_us)
per_round = {}  # (server, job) -> {round: (iops, mibs, p99_us)}
for path in glob.glob(os.path.join(res, "*.json")):
    rnd, server, job = os.path.basename(path)[:-5].split(".", 2)
    text = open(path).read()
    doc = json.loads(text[text.index("{"):])
    j = doc["jobs"][0]
    if j.get("error"):
        sys.exit(f"{path}: fio error {j['error']}")
    side = "write" if "write" in job else "read"
    s = j[side]
    pct = s.get("clat_ns", {}).get("percentile", {})
    p99 = pct.get("99.000000", 0) / 1000.0
    data.setdefault((server, job), []).append((s["iops"], s["bw_bytes"] / 2**20, p99))
    per_round.setdefault((server, job), {})[rnd] = (s["iops"], s["bw_bytes"] / 2**20, p99)

def med(server, job, i):
    v = data.get((server, job))
    return statistics.median(x[i] for x in v) if v else None

def fmt(x, nd=0):
    return "-" if x is None else f"{x:,.{nd}f}"

print(f"## NBD servers, fio nbd engine (median of {rounds} rounds, {runtime}s per job, {size} image)\n")
print("| job | server | IOPS | MiB/s | p99 clat (µs) |")
print("|---|---|---:|---:|---:|")
for job in jobs:
    for server in servers:
        print(f"| {job} | {server} | {fmt(med(server, job, 0))} | {fmt(med(server, job, 1), 1)} | {fmt(med(server, job, 2), 1)} |")
peers = [s for s in servers if s != "ferry"]
if "ferry" in servers and peers:
    print("\nRatios (ferry / peer), the median of the per-round ratios of back-to-back runs:")
    print("throughput > 1 and p99 < 1 are better for ferry.\n")
    hdr = " | ".join(f"IOPS vs {p} | p99 vs {p}" for p in peers)
    print(f"| job | {hdr} |")
    print("|---|" + "---:|" * (2 * len(peers)))
    for job in jobs:
        cells = []
        for p in peers:
            for i in (0, 2):
                f, o = per_round.get(("ferry", job), {}), per_round.get((p, job), {})
                ratios = [f[r][i] / o[r][i] for r in f if r in o and o[r][i]]
                cells.append(f"{statistics.median(ratios):.2f}" if ratios else "-")
        print(f"| {job} | " + " | ".join(cells) + " |")
PY
cat "$RES/report.md"
if [ -n "${OUT:-}" ]; then
  cp "$RES/report.md" "$OUT"
  echo "report written to $OUT"
fi
