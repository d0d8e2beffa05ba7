#!/usr/bin/env bash
# System benchmark: ferry's iSCSI target vs tgt (tgtd, rdwr backing store),
# same image, same machine, same initiators (libiscsi's iscsi-perf and
# qemu-img bench through QEMU's libiscsi driver), one TCP connection each.
#
# Jobs:
#   perf-randread-4k-qd32  iscsi-perf -r -m 32 -b 8: random 4 KiB READ(16)s,
#                          32 in flight, for RUNTIME seconds
#   perf-read-1m-qd8       iscsi-perf -m 8 -b 2048: sequential 1 MiB reads,
#                          8 in flight, for RUNTIME seconds
#   qemu-read-4k-qd32      qemu-img bench, 4 KiB, depth 32  (sequential: qemu-img
#   qemu-write-4k-qd32     qemu-img bench -w, 4 KiB, depth 32  bench has no random
#   qemu-read-1m-qd8       qemu-img bench, 1 MiB, depth 8      mode; it steps by
#   qemu-write-1m-qd8      qemu-img bench -w, 1 MiB, depth 8   the request size
#                                                              and wraps at the end)
# (-b counts 512-byte blocks, the block size both targets report for the
# image; the script checks it.)
#
# Usage: benches/system/iscsi-bench.sh
# Environment:
#   RUNTIME   seconds per iscsi-perf run, and the time a qemu-img bench run
#             takes on average over the two targets (default 10)
#   ROUNDS    rounds; in each, every job runs on both targets back to back,
#             order rotating per round (default 3)
#   JOBS      subset of the jobs above (default: all)
#   SIZE      image size (default 1G), fully allocated with random data;
#             the image is nbd-bench.sh's bench.img when that has this size
#   BENCH_DIR where the image and results live (default $HOME/.cache/ferry/bench)
#   QEMU_COUNT_4K, QEMU_COUNT_1M
#             request counts of the qemu-img bench jobs; by default they are
#             calibrated once, before round 1, so that the two targets' runs
#             of a job together take about 2 x RUNTIME
#   TGT_CONTROL_PORT  tgtd's management instance number (-C; default: the
#             first unused from 4242); its socket is /var/run/tgtd/socket.N
#   OUT       also write the Markdown report to this file
#   FERRY_BIN ferry binary (default: release build in $CARGO_TARGET_DIR, built here)
#
# Fairness choices:
# - Both targets go through the page cache: ferry's file engine (io_uring,
#   no O_DIRECT) and tgt's default rdwr backing store (pread/pwrite from its
#   16 I/O threads, no O_DIRECT). qemu-img bench runs with -t none, which for
#   the iscsi driver means: write cache on, no FUA, no flushes.
# - Both serve the same image file at once (an idle target costs nothing),
#   and each job runs on both back to back, so the runs being compared are
#   seconds apart; the order alternates every round.
# - The image is read once (cat > /dev/null) before the targets start, and
#   `sync` runs before every job, so no run pays for the writeback of the
#   one before (the 1 MiB write job dirties the whole image).
# - No header or data digests: libiscsi (both initiators) offers
#   HeaderDigest=None,CRC32C and both targets pick the first they support.
# - Numbers are medians over ROUNDS; ratios are the median of the per-round
#   ratios of back-to-back runs. The server's CPU time per request (from
#   /proc/PID/stat, all threads) is reported too: client and target share
#   the machine's cores.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-1G}
BENCH_DIR=${BENCH_DIR:-$HOME/.cache/ferry/bench}
ALL_JOBS="perf-randread-4k-qd32 perf-read-1m-qd8 qemu-read-4k-qd32 qemu-write-4k-qd32 qemu-read-1m-qd8 qemu-write-1m-qd8"
JOBS=${JOBS:-$ALL_JOBS}
SERVERS="ferry tgt"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}

die() { echo "iscsi-bench: $*" >&2; exit 1; }

for v in RUNTIME ROUNDS; do
  [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -ge 1 ] || die "$v must be a whole number >= 1 (got '${!v}')"
done
for v in QEMU_COUNT_4K QEMU_COUNT_1M; do
  [ -z "${!v:-}" ] || [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number"
done
for j in $JOBS; do
  [[ " $ALL_JOBS " == *" $j "* ]] || die "unknown job $j ($ALL_JOBS)"
done
for t in iscsi-perf qemu-img tgtd tgtadm python3 numfmt; do
  command -v "$t" >/dev/null || die "missing $t (packages libiscsi-bin, qemu-utils + qemu-block-extra, tgt)"
done
qemu-img --help | grep -q 'Supported formats:.* iscsi' \
  || die "qemu-img has no iscsi driver (install qemu-block-extra)"

if [ -z "${FERRY_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -p ferry)
  FERRY_BIN=$CARGO_TARGET_DIR/release/ferry
fi
[ -x "$FERRY_BIN" ] || die "ferry binary $FERRY_BIN missing"

mkdir -p "$BENCH_DIR"
IMG=$BENCH_DIR/bench.img
SIZE_BYTES=$(numfmt --from=iec "$SIZE")
if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" -ne "$SIZE_BYTES" ] \
  || [ $(( $(stat -c %b "$IMG") * 512 )) -lt "$SIZE_BYTES" ]; then
  echo "creating $IMG ($SIZE, random, fully allocated)"
  head -c "$SIZE_BYTES" /dev/urandom > "$IMG.tmp"
  mv "$IMG.tmp" "$IMG"
fi
RES=$(mktemp -d "$BENCH_DIR/iscsi-results.XXXXXX")
echo "results in $RES"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# --- the targets: started once, stopped at exit ---
FERRY_PID= TGT_PID= TGT_C=
declare -A URLS=() PIDS=()

stop_targets() {
  if [ -n "$TGT_PID" ]; then
    # tgtd -f ignores SIGTERM: delete the target, then the daemon.
    tgtadm -C "$TGT_C" --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
    tgtadm -C "$TGT_C" --op delete --mode system >/dev/null 2>&1 || true
    for _ in $(seq 50); do kill -0 "$TGT_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$TGT_PID" 2>/dev/null || true
    wait "$TGT_PID" 2>/dev/null || true
    rm -f "/var/run/tgtd/socket.$TGT_C" "/var/run/tgtd/socket.$TGT_C.lock"
    TGT_PID=
  fi
  if [ -n "$FERRY_PID" ]; then
    kill -TERM "$FERRY_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$FERRY_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$FERRY_PID" 2>/dev/null || true
    wait "$FERRY_PID" 2>/dev/null || true
    FERRY_PID=
  fi
}
trap stop_targets EXIT
trap 'exit 130' INT TERM

start_ferry() {
  local out=$RES/ferry.stdout port
  : > "$out"
  "$FERRY_BIN" serve "$IMG" --name bench --iscsi 127.0.0.1:0 > "$out" 2>> "$RES/ferry.log" &
  FERRY_PID=$!
  for _ in $(seq 300); do
    grep -q '^listening iscsi ' "$out" && break
    kill -0 "$FERRY_PID" 2>/dev/null || { cat "$RES/ferry.log" >&2; die "ferry died"; }
    sleep 0.1
  done
  port=$(sed -n 's/^listening iscsi 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out" | head -1)
  [ -n "$port" ] || { cat "$RES/ferry.log" >&2; die "ferry did not report an iSCSI port"; }
  URLS[ferry]=iscsi://127.0.0.1:$port/iqn.2026-11.dev.ferry:bench/0
  PIDS[ferry]=$FERRY_PID
}

start_tgt() {
  local port iqn=iqn.2026-11.dev.ferry.bench:tgt
  if pgrep -x tgtd >/dev/null; then
    echo "note: other tgtd instances run ($(pgrep -x tgtd | tr '\n' ' ')); using a separate control socket and portal"
  fi
  TGT_C=${TGT_CONTROL_PORT:-4242}
  if [ -z "${TGT_CONTROL_PORT:-}" ]; then
    while [ -e "/var/run/tgtd/socket.$TGT_C" ]; do TGT_C=$((TGT_C + 1)); done
  fi
  [ ! -e "/var/run/tgtd/socket.$TGT_C" ] || die "tgtd control socket $TGT_C is in use"
  port=$(free_port)
  tgtd -f -C "$TGT_C" --iscsi "portal=127.0.0.1:$port" >> "$RES/tgtd.log" 2>&1 &
  TGT_PID=$!
  for _ in $(seq 100); do
    tgtadm -C "$TGT_C" --op show --mode sys >/dev/null 2>&1 && break
    kill -0 "$TGT_PID" 2>/dev/null || { cat "$RES/tgtd.log" >&2; die "tgtd died"; }
    sleep 0.1
  done
  tgtadm -C "$TGT_C" --lld iscsi --op new --mode target --tid 1 -T "$iqn"
  tgtadm -C "$TGT_C" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$IMG"
  tgtadm -C "$TGT_C" --lld iscsi --op bind --mode target --tid 1 -I ALL
  tgtadm -C "$TGT_C" --lld iscsi --op show --mode target > "$RES/tgt-target.txt"
  grep -q 'Backing store type: rdwr' "$RES/tgt-target.txt" || die "tgt LUN 1 is not rdwr (see $RES/tgt-target.txt)"
  URLS[tgt]=iscsi://127.0.0.1:$port/$iqn/1
  PIDS[tgt]=$TGT_PID
}

# CPU seconds (user + system, all threads) a process has used so far.
cpu_seconds() {
  local tck
  tck=$(getconf CLK_TCK)
  awk -v t="$tck" '{ sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / t }' "/proc/$1/stat"
}

# --- jobs ---
# run_perf SERVER RANDOM(0|1) DEPTH BLOCKS LOG -> prints "ops/s bytes-per-op"
run_perf() {
  local server=$1 random=$2 depth=$3 blocks=$4 log=$5 args=() bs iops
  [ "$random" = 1 ] && args+=(-r)
  # -t: iscsi-perf stops itself after RUNTIME s; timeout is only a safety net.
  if ! timeout -s INT $((RUNTIME + 30)) iscsi-perf "${args[@]}" -m "$depth" -b "$blocks" -t "$RUNTIME" \
    "${URLS[$server]}" > "$log" 2>&1; then
    cat "$log" >&2
    die "iscsi-perf failed against $server"
  fi
  # "capacity is N blocks or B byte", then \r-separated progress lines and
  # finally "iops average N (M MB/s)".
  bs=$(sed -n 's/^capacity is \([0-9]*\) blocks or \([0-9]*\) byte.*/\2 \1/p' "$log" | awk '{ print $1 / $2 }')
  [ "$bs" = 512 ] || die "$server reports block size '$bs', expected 512 (see $log)"
  iops=$(tr '\r' '\n' < "$log" | sed -n 's/^iops average \([0-9]*\) .*/\1/p' | tail -1)
  [ -n "$iops" ] || die "no 'iops average' in $log"
  echo "$iops $((blocks * bs))"
}

# run_qemu SERVER WRITE(0|1) DEPTH SIZE COUNT LOG -> prints "ops/s bytes-per-op"
run_qemu() {
  local server=$1 write=$2 depth=$3 size=$4 count=$5 log=$6 args=() secs
  [ "$write" = 1 ] && args+=(-w)
  if ! qemu-img bench -f raw -t none "${args[@]}" -c "$count" -d "$depth" -s "$size" \
    "${URLS[$server]}" > "$log" 2>&1; then
    cat "$log" >&2
    die "qemu-img bench failed against $server"
  fi
  secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p' "$log")
  [ -n "$secs" ] || die "no 'Run completed' in $log"
  awk -v c="$count" -v s="$secs" -v b="$size" 'BEGIN { printf "%.1f %d\n", c / s, b }'
}

# job_spec JOB -> "perf RANDOM DEPTH BLOCKS" or "qemu WRITE DEPTH SIZE"
job_spec() {
  case $1 in
    perf-randread-4k-qd32) echo "perf 1 32 8" ;;
    perf-read-1m-qd8) echo "perf 0 8 2048" ;;
    qemu-read-4k-qd32) echo "qemu 0 32 4096" ;;
    qemu-write-4k-qd32) echo "qemu 1 32 4096" ;;
    qemu-read-1m-qd8) echo "qemu 0 8 1048576" ;;
    qemu-write-1m-qd8) echo "qemu 1 8 1048576" ;;
  esac
}

declare -A COUNT=()
[ -n "${QEMU_COUNT_4K:-}" ] && COUNT[4096]=$QEMU_COUNT_4K
[ -n "${QEMU_COUNT_1M:-}" ] && COUNT[1048576]=$QEMU_COUNT_1M

# run_job ROUND SERVER JOB -> appends a row to $RES/runs.tsv
run_job() {
  local round=$1 server=$2 job=$3 kind a b c cpu0 cpu1 res log=$RES/$1.$2.$3.log
  read -r kind a b c <<< "$(job_spec "$job")"
  cpu0=$(cpu_seconds "${PIDS[$server]}")
  if [ "$kind" = perf ]; then
    res=$(run_perf "$server" "$a" "$b" "$c" "$log")
  else
    res=$(run_qemu "$server" "$a" "$b" "$c" "${COUNT[$c]}" "$log")
  fi
  cpu1=$(cpu_seconds "${PIDS[$server]}")
  # wall time of the run, for CPU per request: iscsi-perf runs RUNTIME s,
  # qemu-img bench reports its own.
  local wall=$RUNTIME
  [ "$kind" = qemu ] && wall=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p' "$log")
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$server" "$job" "$res" \
    "$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { print b - a }')" "$wall" | tr ' ' '\t' >> "$RES/runs.tsv"
}

read -r -a ORDER <<< "$SERVERS"
cat "$IMG" > /dev/null # warm the page cache alike for both targets
start_ferry
start_tgt
echo "ferry: ${URLS[ferry]}"
echo "tgt:   ${URLS[tgt]}"
: > "$RES/runs.tsv"

# Calibrate the qemu-img bench request counts: a probe run on each target,
# then the count at which the two runs together take ~2 x RUNTIME.
for job in $JOBS; do
  read -r kind w d s <<< "$(job_spec "$job")"
  [ "$kind" = qemu ] || continue
  [ -n "${COUNT[$s]:-}" ] && continue
  probe=$(( s == 4096 ? 50000 : 1000 ))
  per_op=0
  for server in "${ORDER[@]}"; do
    sync
    r=$(run_qemu "$server" "$w" "$d" "$s" "$probe" "$RES/calibrate.$server.$job.log")
    per_op=$(awk -v p="$per_op" -v r="${r%% *}" 'BEGIN { print p + 1 / r }')
  done
  COUNT[$s]=$(awk -v p="$per_op" -v t="$RUNTIME" -v m="$probe" 'BEGIN { c = int(2 * t / p); print (c < m ? m : c) }')
  echo "qemu-img bench, $s-byte requests: $((COUNT[$s])) requests per run (calibrated on $job)"
done

for round in $(seq "$ROUNDS"); do
  shift_by=$(( (round - 1) % ${#ORDER[@]} ))
  this_round=("${ORDER[@]:shift_by}" "${ORDER[@]:0:shift_by}")
  echo "round $round/$ROUNDS: ${this_round[*]}"
  for job in $JOBS; do
    for server in "${this_round[@]}"; do
      sync
      run_job "$round" "$server" "$job"
    done
    echo "  $job: $(awk -F'\t' -v r="$round" -v j="$job" \
      '$1 == r && $3 == j { printf "%s %.0f/s  ", $2, $4 }' "$RES/runs.tsv")"
  done
done
stop_targets

python3 - "$RES/runs.tsv" "$JOBS" "$RUNTIME" "$ROUNDS" "$SIZE" "${COUNT[4096]:-}" "${COUNT[1048576]:-}" \
  > "$RES/report.md" <<'PY'
import statistics, sys
path, jobs, runtime, rounds, size, c4k, c1m = sys.argv[1:]
jobs = jobs.split()
runs = {}  # (server, job) -> {round: (ops, mibs, cpu_us_per_op)}
for line in open(path):
    rnd, server, job, ops, bpo, cpu, wall = line.rstrip("\n").split("\t")
    ops, bpo, cpu, wall = float(ops), int(bpo), float(cpu), float(wall)
    runs.setdefault((server, job), {})[rnd] = (ops, ops * bpo / 2**20, 1e6 * cpu / (ops * wall))

def med(server, job, i):
    v = runs.get((server, job), {})
    return statistics.median(x[i] for x in v.values()) if v else None

def ratios(job, i):
    f, t = runs.get(("ferry", job), {}), runs.get(("tgt", job), {})
    return [f[r][i] / t[r][i] for r in sorted(f) if r in t and t[r][i]]

def fmt(x, nd=0):
    return "-" if x is None else f"{x:,.{nd}f}"

print(f"## iSCSI targets: ferry vs tgt (median of {rounds} rounds, {size} image)\n")
print(f"iscsi-perf jobs run {runtime} s each; qemu-img bench jobs run a fixed count "
      f"(4 KiB: {c4k or '-'}, 1 MiB: {c1m or '-'} requests) on both targets.\n")
print("| workload | ferry ops/s | tgt ops/s | ferry MiB/s | tgt MiB/s | ferry/tgt | per-round ratios |")
print("|---|---:|---:|---:|---:|---:|---|")
for job in jobs:
    r = ratios(job, 0)
    print(f"| {job} | {fmt(med('ferry', job, 0))} | {fmt(med('tgt', job, 0))} | "
          f"{fmt(med('ferry', job, 1), 1)} | {fmt(med('tgt', job, 1), 1)} | "
          f"{statistics.median(r):.2f} | {', '.join(f'{x:.2f}' for x in r)} |" if r else
          f"| {job} | - | - | - | - | - | - |")
print("\nTarget CPU time per request (user + system, all threads; µs, median), "
      "on a machine whose cores the initiator shares:\n")
print("| workload | ferry | tgt |")
print("|---|---:|---:|")
for job in jobs:
    print(f"| {job} | {fmt(med('ferry', job, 2), 1)} | {fmt(med('tgt', job, 2), 1)} |")
PY
cat "$RES/report.md"
if [ -n "${OUT:-}" ]; then
  cp "$RES/report.md" "$OUT"
  echo "report written to $OUT"
fi
