#!/usr/bin/env bash
# System benchmark: migrating a volume's storage over an emulated WAN.
#
# One sparse image (SIZE_MIB, DATA_MIB of it allocated, scattered in 1 MiB
# pieces; half of the pieces random bytes, half base64 text, which
# compresses about 4:3 as a disk's files do) behind `ferry link-emulator`
# (DELAY_MS each way, MBIT each way, QUEUE_KIB buffered per direction).
# Per round, side by side through the same emulator settings:
#   nbdcopy      `nbdkit file` serves the image; `nbdcopy --connections=1
#                --destination-is-zero` copies it into a new sparse file
#                through the link (it skips holes and zeroes too). One
#                connection: the emulator gives every connection a link of
#                its own, and ferry's edge uses one.
#   ferry        `ferry origin` + `ferry edge` (fresh cache); `ferry migrate
#                start` copies the volume into a new sparse file; timed from
#                the start to the `mirrored` stage.
#   ferry+reads  the same, with fio's 4 KiB random reads at depth 1 over the
#                whole volume through the edge while the copy runs: demand
#                read latency p50/p99 (target p99 <= RTT + 2 ms).
#   moveback     after the `ferry` copy: cut over, CHANGE_MIB of 4 KiB random
#                writes on the edge (fio, each block once, fresh random data),
#                then `ferry moveback`: bytes to the origin over the link
#                against the bytes changed (target <= 1.1x plus signatures).
#   nbdcopy back the copy-everything way home: `nbdcopy` of the edge's copy
#                through the same link into a fresh image that `nbdkit file`
#                serves (it skips holes too).
# Every copy is checked against the image (`cmp`); after a move back, the
# origin's image against the edge's copy. Reported: medians of ROUNDS rounds
# of time, bytes over the link (the emulator's count, towards the copier),
# and their ratio to DATA_MIB / bandwidth (target <= 1.1x).
#
# Usage: benches/system/migrate-bench.sh
# Environment:
#   SIZE_MIB    volume size (default 2048)
#   DATA_MIB    allocated MiB (default 591, as the Debian test disk)
#   IMAGE       use this raw image instead of the synthetic one
#   DELAY_MS    one-way delay (default 25)
#   MBIT        bandwidth each way (default 100)
#   QUEUE_KIB   the path's buffer per direction (default 4096)
#   ROUNDS      rounds (default 3; medians reported)
#   CHANGE_MIB  MiB the guest changes before the move back (default 64)
#   FERRY_BIN   ferry binary (default: the dev-profile build, built here)
#   OUT         Markdown report (default /tmp/migrate-bench-DATE.md); raw
#               numbers and logs in ${OUT%.md}.raw/
#   WORK_DIR    scratch directory parent (default /tmp)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BENCH=migrate-bench
SIZE_MIB=${SIZE_MIB:-2048}
DATA_MIB=${DATA_MIB:-591}
DELAY_MS=${DELAY_MS:-25}
MBIT=${MBIT:-100}
QUEUE_KIB=${QUEUE_KIB:-4096}
ROUNDS=${ROUNDS:-3}
CHANGE_MIB=${CHANGE_MIB:-64}
WORK_DIR=${WORK_DIR:-/tmp}
OUT=${OUT:-/tmp/migrate-bench-$(date +%Y%m%d-%H%M%S).md}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}
RAW=${OUT%.md}.raw
# shellcheck source=lib.sh
source "$HERE/lib.sh"

whole_numbers SIZE_MIB DATA_MIB QUEUE_KIB ROUNDS CHANGE_MIB
[ "$DATA_MIB" -le "$SIZE_MIB" ] || die "DATA_MIB exceeds SIZE_MIB"
require_tools fio nbdkit nbdcopy python3 awk base64 cmp
ferry_binary
fresh_raw
start_work

RTT_MS=$(awk -v d="$DELAY_MS" 'BEGIN { print 2 * d }')
LINK_BPS=$(awk -v m="$MBIT" 'BEGIN { printf "%d", m * 1e6 / 8 }')

if [ -n "${IMAGE:-}" ]; then
  [ -f "$IMAGE" ] || die "IMAGE $IMAGE is not a file"
  IMG=$IMAGE
  SIZE_MIB=$(($(stat -c %s "$IMG") >> 20))
  DATA_MIB=$(($(stat -c %b "$IMG") * $(stat -c %B "$IMG") >> 20))
else
  IMG=$WORK/vm.img
  log "creating $IMG: $SIZE_MIB MiB, $DATA_MIB MiB of it data"
  truncate -s "${SIZE_MIB}M" "$IMG"
  # Piece i of DATA_MIB goes to MiB (i * stride) mod SIZE_MIB, a stride
  # coprime to the size, so the data is spread over the whole volume.
  python3 - "$IMG" "$SIZE_MIB" "$DATA_MIB" <<'PY'
import base64, math, os, sys
path, size, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stride = 7919
while math.gcd(stride, size) != 1:
    stride += 2
with open(path, "r+b") as f:
    for i in range(data):
        f.seek(((i * stride) % size) << 20)
        if i % 2:
            f.write(base64.b64encode(os.urandom(3 << 18)))
        else:
            f.write(os.urandom(1 << 20))
PY
fi
cat > "$RAW/meta.txt" <<EOF
SIZE_MIB=$SIZE_MIB DATA_MIB=$DATA_MIB IMAGE=${IMAGE:-synthetic} DELAY_MS=$DELAY_MS MBIT=$MBIT
QUEUE_KIB=$QUEUE_KIB ROUNDS=$ROUNDS FERRY_BIN=$FERRY_BIN
REVISION=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
EOF

link() { start_link "link-$1" "$2"; } # TAG TARGET: sets LINK

# link_counts TAG: sets UP and DOWN, the bytes the running emulator has
# relayed towards the origin and back so far (it logs them on SIGUSR1).
link_counts() {
  local log=$RAW/link-$1.log n i
  n=$(grep -c 'bytes_to_target=' "$log" || true)
  kill -USR1 "${PID_OF[link-$1]}"
  for ((i = 0; i < 50; i++)); do
    [ "$(grep -c 'bytes_to_target=' "$log" || true)" -gt "$n" ] && break
    sleep 0.1
  done
  UP=$(sed -n 's/.*bytes_to_target=\([0-9]*\).*/\1/p' "$log" | tail -1)
  DOWN=$(sed -n 's/.*bytes_to_client=\([0-9]*\).*/\1/p' "$log" | tail -1)
}

# link_bytes TAG: bytes the stopped emulator sent towards the copier.
link_bytes() { link_bytes_down "link-$1"; }

# serve_file TAG FILE: `nbdkit file` serving FILE, behind the emulator;
# sets LINK.
serve_file() {
  start_nbdkit "nbdkit-$1" "$2"
  link "$1" "$NBDKIT_ADDR"
}

check_copy() { # COPY
  cmp -s "$IMG" "$1" || die "$1 differs from the image"
}

run_nbdcopy() { # TAG: sets SECS
  local tag=$1
  serve_file "$tag" "$IMG"
  local copy=$WORK/copy-$tag.raw start
  truncate -s "${SIZE_MIB}M" "$copy"
  start=$(now)
  nbdcopy --connections=1 --destination-is-zero "nbd://$LINK" "$copy" 2> "$RAW/nbdcopy-$tag.log" \
    || die "nbdcopy failed ($tag)"
  SECS=$(elapsed "$start")
  stop_proc "link-$tag"
  stop_proc "nbdkit-$tag"
  check_copy "$copy"
  rm -f "$copy"
}

migration_json() { # SOCK
  "$FERRY_BIN" migrate status vm --api "$1" --json
}
json_key() { # KEY (stdin: JSON, an object or a list of one)
  python3 -c '
import json, sys
j = json.load(sys.stdin)
j = j[0] if isinstance(j, list) else j
print(j[sys.argv[1]])' "$1"
}

# move_back TAG SOCK NBD COPY SERVED: cut over, CHANGE_MIB of random 4 KiB
# writes on the edge, `ferry moveback`; sets MB_SECS, MB_SHIPPED, MB_SIGS,
# MB_UP, MB_DOWN; the origin's image SERVED must then equal the copy.
move_back() {
  local tag=$1 sock=$2 nbd=$3 copy=$4 served=$5 start up0 down0
  "$FERRY_BIN" migrate cutover vm --api "$sock" --json > "$RAW/cutover-$tag.json"
  fio --name=changes --ioengine=nbd --uri="nbd://$nbd/vm" --rw=randwrite --bs=4k \
    --iodepth=16 --size="${SIZE_MIB}M" --io_size="${CHANGE_MIB}M" --randrepeat=0 \
    --refill_buffers --output-format=json --output="$RAW/changes-$tag.json" > /dev/null \
    || die "fio's writes failed ($tag)"
  link_counts "$tag"
  up0=$UP down0=$DOWN
  start=$(now)
  "$FERRY_BIN" moveback vm --api "$sock" --json > "$RAW/moveback-$tag.json" \
    || die "ferry moveback failed ($tag)"
  MB_SECS=$(elapsed "$start")
  link_counts "$tag"
  MB_UP=$((UP - up0))
  MB_DOWN=$((DOWN - down0))
  MB_SHIPPED=$(json_key bytes_shipped < "$RAW/moveback-$tag.json")
  MB_SIGS=$(json_key signature_bytes < "$RAW/moveback-$tag.json")
  cmp -s "$served" "$copy" || die "after the move back the origin's image differs from the copy"
}

# nbdcopy_back TAG COPY: sets BACK_SECS and BACK_WIRE, the time nbdcopy
# takes to copy COPY through the link into a fresh image and the bytes it
# sent.
nbdcopy_back() {
  local tag=$1 copy=$2 dest=$WORK/back-$1.raw start
  truncate -s "${SIZE_MIB}M" "$dest"
  serve_file "$tag" "$dest"
  start=$(now)
  nbdcopy --connections=1 --destination-is-zero "$copy" "nbd://$LINK" 2> "$RAW/nbdcopy-$tag.log" \
    || die "nbdcopy failed ($tag)"
  BACK_SECS=$(elapsed "$start")
  stop_proc "link-$tag"
  BACK_WIRE=$(sed -n 's/.*bytes_to_target=\([0-9]*\).*/\1/p' "$RAW/link-$tag.log" | tail -1)
  stop_proc "nbdkit-$tag"
  cmp -s "$copy" "$dest" || die "$dest differs from the copy"
  rm -f "$dest"
}

run_ferry() { # TAG WITH_READS: sets SECS, MIG_WIRE, FROM_LINK, P50, P99 (and MB_*, BACK_SECS)
  local tag=$1 reads=$2 served=$IMG
  if [ "$reads" = 0 ]; then
    # The move back writes into the origin's image: a copy of its own, so
    # every run starts from the same disk.
    served=$WORK/origin-$tag.img
    cp --sparse=always "$IMG" "$served"
  fi
  spawn "origin-$tag" origin "$FERRY_BIN" origin --listen 127.0.0.1:0 --export "vm=$served" \
    --state-dir "$WORK/origin-$tag" --no-tls
  link "$tag" "$ADDR"
  local sock=$WORK/edge-$tag.sock copy=$WORK/copy-$tag.raw
  spawn "edge-$tag" api "$FERRY_BIN" edge --origin "$LINK" --volume vm \
    --cache-dir "$WORK/cache-$tag" --cache-size "${SIZE_MIB}M" --nbd 127.0.0.1:0 \
    --api "$sock" --no-tls
  local nbd
  nbd=$(sed -n 's/^listening nbd //p' "$RAW/edge-$tag.stdout" | head -1)
  for ((i = 0; i < 600; i++)); do
    [ "$("$FERRY_BIN" volume list --api "$sock" --json | python3 -c '
import json, sys; print(json.load(sys.stdin)["volumes"][0]["state"])')" = up ] && break
    sleep 0.1
  done
  local start fpid=
  start=$(now)
  "$FERRY_BIN" migrate start vm --target "$copy" --api "$sock" --json > "$RAW/start-$tag.json"
  if [ "$reads" = 1 ]; then
    fio --name=reads --ioengine=nbd --uri="nbd://$nbd/vm" --rw=randread --bs=4k \
      --iodepth=1 --time_based --runtime=3600 --norandommap --randrepeat=0 \
      --output-format=json --output="$RAW/reads-$tag.json" > /dev/null &
    fpid=$!
  fi
  while [ "$(migration_json "$sock" | json_key stage)" != mirrored ]; do
    sleep 0.2
  done
  SECS=$(elapsed "$start")
  link_counts "$tag"
  MIG_WIRE=$DOWN
  if [ -n "$fpid" ]; then
    kill -INT "$fpid" 2>/dev/null || true
    wait "$fpid" || true
    P50=$(pct "$RAW/reads-$tag.json" 50)
    P99=$(pct "$RAW/reads-$tag.json" 99)
  fi
  migration_json "$sock" > "$RAW/done-$tag.json"
  FROM_LINK=$(json_key bytes_from_link < "$RAW/done-$tag.json")
  check_copy "$copy"
  if [ "$reads" = 0 ]; then
    move_back "$tag" "$sock" "$nbd" "$copy" "$served"
  fi
  stop_proc "edge-$tag"
  stop_proc "link-$tag"
  stop_proc "origin-$tag"
  if [ "$reads" = 0 ]; then
    nbdcopy_back "back-$tag" "$copy"
  fi
  rm -rf "$copy" "$WORK/cache-$tag" "$WORK/origin-$tag" "$WORK/origin-$tag.img"
}


declare -A R=()
for ((round = 1; round <= ROUNDS; round++)); do
  log "round $round/$ROUNDS: nbdcopy"
  run_nbdcopy "nbdcopy-$round"
  R[nbdcopy.secs.$round]=$SECS
  R[nbdcopy.wire.$round]=$(link_bytes "nbdcopy-$round")
  log "  $SECS s, $(( ${R[nbdcopy.wire.$round]} >> 20 )) MiB over the link"

  log "round $round/$ROUNDS: ferry migrate"
  run_ferry "ferry-$round" 0
  R[ferry.secs.$round]=$SECS
  R[ferry.wire.$round]=$MIG_WIRE
  R[ferry.data.$round]=$FROM_LINK
  log "  $SECS s, $(( ${R[ferry.wire.$round]} >> 20 )) MiB over the link"
  R[mb.secs.$round]=$MB_SECS
  R[mb.up.$round]=$MB_UP
  R[mb.down.$round]=$MB_DOWN
  R[mb.shipped.$round]=$MB_SHIPPED
  R[mb.sigs.$round]=$MB_SIGS
  R[back.secs.$round]=$BACK_SECS
  R[back.wire.$round]=$BACK_WIRE
  log "  move back: $MB_SECS s, $(( MB_UP >> 20 )) MiB to the origin for $CHANGE_MIB MiB changed; nbdcopy back: $BACK_SECS s"

  log "round $round/$ROUNDS: ferry migrate with demand reads"
  run_ferry "reads-$round" 1
  R[reads.secs.$round]=$SECS
  R[reads.wire.$round]=$MIG_WIRE
  R[reads.p50.$round]=$P50
  R[reads.p99.$round]=$P99
  log "  $SECS s, reads p50 $P50 ms p99 $P99 ms"
done

col() { # KEY: the values of all rounds
  local r out=()
  for ((r = 1; r <= ROUNDS; r++)); do out+=("${R[$1.$r]}"); done
  echo "${out[@]}"
}
med() { median $(col "$1"); }
mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }
ideal=$(awk -v d="$DATA_MIB" -v bps="$LINK_BPS" 'BEGIN { printf "%.1f", d * 1048576 / bps }')
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

{
  echo "# migrate-bench $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Volume $SIZE_MIB MiB, $DATA_MIB MiB allocated (${IMAGE:-synthetic: half random, half base64}); link ${DELAY_MS} ms each way, $MBIT Mbit/s, ${QUEUE_KIB} KiB queue; $ROUNDS rounds, medians (rounds in brackets); load at start $(sed -n 's/.*LOAD=//p' "$RAW/meta.txt"). Allocated bytes / bandwidth = $ideal s."
  echo
  echo "| copier | time (s) | vs allocated / bandwidth | bytes over the link (MiB) |"
  echo "|---|---:|---:|---:|"
  for k in nbdcopy ferry reads; do
    name=$k
    [ "$k" = ferry ] && name="ferry migrate"
    [ "$k" = reads ] && name="ferry migrate + 4 KiB QD1 reads"
    s=$(med "$k.secs")
    echo "| $name | **$s** ($(col "$k.secs")) | $(ratio "$s" "$ideal")x | $(mib "$(med "$k.wire")") |"
  done
  echo
  echo "ferry migrate / nbdcopy: $(ratio "$(med ferry.secs)" "$(med nbdcopy.secs)")x the time. Data bytes the copy took from the link: $(mib "$(med ferry.data)") MiB (before compression)."
  echo
  echo "Demand reads during the copy: p50 $(med reads.p50) ms, p99 **$(med reads.p99) ms** ($(col reads.p99)); target <= RTT + 2 = $((RTT_MS + 2)) ms."
  echo
  changed=$((CHANGE_MIB << 20))
  echo "Move back after $CHANGE_MIB MiB of random 4 KiB writes on the cut-over copy (the origin's image checked equal to the copy):"
  echo
  echo "| way home | time (s) | bytes to the origin (MiB) | vs bytes changed |"
  echo "|---|---:|---:|---:|"
  echo "| nbdcopy of the copy | $(med back.secs) ($(col back.secs)) | $(mib "$(med back.wire)") | $(ratio "$(med back.wire)" "$changed")x |"
  echo "| ferry moveback | **$(med mb.secs)** ($(col mb.secs)) | $(mib "$(med mb.up)") | **$(ratio "$(med mb.up)" "$changed")x** |"
  echo
  echo "ferry moveback: write bytes shipped $(mib "$(med mb.shipped)") MiB ($(ratio "$(med mb.shipped)" "$changed")x the bytes changed), signatures received $(awk -v b="$(med mb.sigs)" 'BEGIN { printf "%.1f", b / 1048576 }') MiB, bytes back over the link $(mib "$(med mb.down)") MiB; target: bytes to the origin <= 1.1x the bytes changed plus signatures."
} > "$OUT"
cat "$OUT"
