#!/usr/bin/env bash
# System benchmark: one edge daemon serving N volumes (clones of one base)
# against N separate single-volume `ferry edge` processes, on the same
# origin, the same machine, in the same run.
#
#   1. An origin exports the base image under 2N names (the clones, N for
#      each side; reads only, so they can share the file).
#   2. The daemon: one `ferry edge --config` with one cache and one NBD
#      listener; the N volumes are added through the API (`ferry volume
#      add`). Its memory, descriptors and threads are read before and after
#      the adds: the per-volume cost.
#   3. The separate edges: N processes, each with its own cache directory,
#      as before this daemon existed (default cache sizes for both).
#   4. Both warmed by reading every volume once (nbdcopy to null:), then,
#      ROUNDS times and alternating: fio, 4 KiB random reads at depth 8 on
#      all N volumes at once for RUNTIME seconds; aggregate IOPS. Memory is
#      each side's total resident set (VmRSS summed over its processes)
#      after the rounds.
# Targets: the daemon's IOPS >= 1.0x the separate processes', with at most
# a quarter of their memory.
#
# Usage: benches/system/multi-volume-bench.sh
# Environment:
#   VOLUMES   how many volumes (default 50)
#   SIZE_MIB  the base image (default 128)
#   RUNTIME   seconds per fio round (default 20)
#   ROUNDS    rounds per side (default 3; medians reported)
#   FERRY_BIN ferry binary (default: the dev build in CARGO_TARGET_DIR)
#   OUT       Markdown report (default /tmp/multi-volume-bench-DATE.md)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BENCH=multi-volume-bench
VOLUMES=${VOLUMES:-50}
SIZE_MIB=${SIZE_MIB:-128}
RUNTIME=${RUNTIME:-20}
ROUNDS=${ROUNDS:-3}
WORK_DIR=${WORK_DIR:-/tmp}
OUT=${OUT:-/tmp/multi-volume-bench-$(date +%Y%m%d-%H%M%S).md}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}
RAW=${OUT%.md}.raw
# shellcheck source=lib.sh
source "$HERE/lib.sh"

whole_numbers VOLUMES SIZE_MIB RUNTIME ROUNDS
require_tools fio nbdcopy python3 awk
ferry_binary
fresh_raw
start_work
# Fifty edges and their clients need more than the default 1024 descriptors.
ulimit -n 65536 2>/dev/null || true

cat > "$RAW/meta.txt" <<EOF
VOLUMES=$VOLUMES SIZE_MIB=$SIZE_MIB RUNTIME=$RUNTIME ROUNDS=$ROUNDS FERRY_BIN=$FERRY_BIN
REVISION=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
EOF

BASE=$WORK/base.img
make_image "$BASE" "$SIZE_MIB"
EXPORTS=()
# c0.. for the daemon, s0.. for the separate edges: an origin lets one
# edge hold a volume at a time.
for ((i = 0; i < VOLUMES; i++)); do EXPORTS+=(--export "c$i=$BASE" --export "s$i=$BASE"); done
spawn origin origin "$FERRY_BIN" origin --listen 127.0.0.1:0 "${EXPORTS[@]}" \
  --state-dir "$WORK/origin" --no-tls
ORIGIN=$ADDR

# proc_sum FIELD PID...: a /proc/PID/status field (VmRSS in KiB, Threads)
# or the open descriptors (fds), summed over the processes.
proc_sum() {
  local field=$1 sum=0 p v
  shift
  for p in "$@"; do
    case $field in
      fds) v=$(find "/proc/$p/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l) ;;
      *) v=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0) ;;
    esac
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}

log "the daemon: one edge, $VOLUMES volumes through the API"
cat > "$WORK/edge.toml" <<EOF
cache_dir = "$WORK/daemon-cache"
cache_size = "$((SIZE_MIB * 2))M"
nbd = ["127.0.0.1:0"]
[link]
no_tls = true
EOF
spawn daemon api "$FERRY_BIN" edge --config "$WORK/edge.toml"
API=$ADDR
DAEMON_NBD=$(sed -n 's/^listening nbd //p' "$RAW/daemon.stdout" | head -1)
DPID=${PID_OF[daemon]}
# The first volume opens the cache: the per-volume cost counts from there.
"$FERRY_BIN" volume add c0 --origin "$ORIGIN" --api "$API" >/dev/null
sleep 1
R0=$(proc_sum VmRSS "$DPID"); F0=$(proc_sum fds "$DPID"); T0=$(proc_sum Threads "$DPID")
start=$(now)
for ((i = 1; i < VOLUMES; i++)); do
  "$FERRY_BIN" volume add "c$i" --origin "$ORIGIN" --api "$API" >/dev/null ||
    die "adding c$i failed"
done
ADD_SECS=$(elapsed "$start")
sleep 2
R1=$(proc_sum VmRSS "$DPID"); F1=$(proc_sum fds "$DPID"); T1=$(proc_sum Threads "$DPID")
n=$((VOLUMES > 1 ? VOLUMES - 1 : 1))
PER_RSS_KIB=$(( (R1 - R0) / n ))
PER_FDS=$(awk -v a="$F0" -v b="$F1" -v n="$n" 'BEGIN { printf "%.1f", (b - a) / n }')
PER_THREADS=$(awk -v a="$T0" -v b="$T1" -v n="$n" 'BEGIN { printf "%.2f", (b - a) / n }')
log "daemon: $VOLUMES volumes added in ${ADD_SECS}s; per volume ${PER_RSS_KIB} KiB RSS, $PER_FDS fds, $PER_THREADS threads (idle)"

log "the separate edges: $VOLUMES processes"
SEP_PIDS=()
SEP_URIS=()
for ((i = 0; i < VOLUMES; i++)); do
  spawn "edge$i" nbd "$FERRY_BIN" edge --origin "$ORIGIN" --volume "s$i" \
    --cache-dir "$WORK/sep-cache-$i" --cache-size "$((SIZE_MIB * 2))M" \
    --nbd 127.0.0.1:0 --no-tls
  SEP_URIS+=("nbd://$ADDR/s$i")
  SEP_PIDS+=("${PID_OF[edge$i]}")
done
DAEMON_URIS=()
for ((i = 0; i < VOLUMES; i++)); do DAEMON_URIS+=("nbd://$DAEMON_NBD/c$i"); done

warm() { # URI...
  local u
  for u in "$@"; do nbdcopy "$u" null: || die "warming $u failed"; done
}
log "warming: every volume read once through each side"
start=$(now); warm "${DAEMON_URIS[@]}"; WARM_DAEMON=$(elapsed "$start")
start=$(now); warm "${SEP_URIS[@]}"; WARM_SEP=$(elapsed "$start")

jobfile() { # FILE URI...
  local f=$1 i=0 u
  shift
  {
    printf '[global]\nioengine=nbd\nrw=randread\nbs=4k\niodepth=8\ntime_based=1\nruntime=%s\ngroup_reporting=1\n' "$RUNTIME"
    for u in "$@"; do printf '[v%d]\nuri=%s\n' "$i" "$u"; i=$((i + 1)); done
  } > "$f"
}
jobfile "$WORK/daemon.fio" "${DAEMON_URIS[@]}"
jobfile "$WORK/sep.fio" "${SEP_URIS[@]}"
iops_of() { # JSON
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(round(sum(x["read"]["iops"] for x in j["jobs"])))' "$1"
}
D_IOPS=(); S_IOPS=()
for ((r = 1; r <= ROUNDS; r++)); do
  for side in daemon sep; do
    fio --output-format=json --output="$RAW/$side-$r.json" "$WORK/$side.fio" >/dev/null ||
      die "fio ($side, round $r) failed"
    v=$(iops_of "$RAW/$side-$r.json")
    log "round $r $side: $v IOPS"
    if [ "$side" = daemon ]; then D_IOPS+=("$v"); else S_IOPS+=("$v"); fi
  done
done
D_MED=$(median "${D_IOPS[@]}")
S_MED=$(median "${S_IOPS[@]}")
D_RSS=$(proc_sum VmRSS "$DPID"); S_RSS=$(proc_sum VmRSS "${SEP_PIDS[@]}")
D_FDS=$(proc_sum fds "$DPID"); S_FDS=$(proc_sum fds "${SEP_PIDS[@]}")
D_THR=$(proc_sum Threads "$DPID"); S_THR=$(proc_sum Threads "${SEP_PIDS[@]}")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "nan"; else printf "%.2f", a / b }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }
DU_D=$(du -sk "$WORK/daemon-cache" | cut -f1)
DU_S=$(du -skc "$WORK"/sep-cache-* | tail -1 | cut -f1)
REV=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)

{
  echo "# multi-volume-bench: one edge daemon vs $VOLUMES separate edges"
  echo
  echo "$VOLUMES volumes, clones of one $SIZE_MIB MiB base, one origin on loopback;"
  echo "fio 4 KiB random reads at depth 8 on all volumes at once, ${RUNTIME}s per"
  echo "round, $ROUNDS rounds per side, alternating; medians. Revision $REV."
  echo
  echo "| | one daemon | $VOLUMES processes | ratio |"
  echo "|---|---:|---:|---:|"
  echo "| aggregate IOPS (median) | $D_MED | $S_MED | $(ratio "$D_MED" "$S_MED")x |"
  echo "| rounds | ${D_IOPS[*]} | ${S_IOPS[*]} | |"
  echo "| resident memory after the rounds | $(mib "$D_RSS") MiB | $(mib "$S_RSS") MiB | $(ratio "$D_RSS" "$S_RSS")x |"
  echo "| file descriptors | $D_FDS | $S_FDS | |"
  echo "| threads | $D_THR | $S_THR | |"
  echo "| cache on disk | $(mib "$DU_D") MiB | $(mib "$DU_S") MiB | |"
  echo "| warm-up (read every volume once) | ${WARM_DAEMON}s | ${WARM_SEP}s | |"
  echo
  echo "Per volume in the daemon (idle, after the first): ${PER_RSS_KIB} KiB resident,"
  echo "$PER_FDS file descriptors, $PER_THREADS threads; $VOLUMES adds took ${ADD_SECS}s."
} > "$OUT"
cat "$OUT"
