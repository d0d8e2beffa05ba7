#!/usr/bin/env bash
# System benchmark: the edge-origin link under load, through an emulated WAN
# whose path buffers data (a bounded queue per direction, as socket buffers
# and a router queue do).
#
# Jobs, each on a fresh edge (empty cache), fio's nbd engine, one NBD
# connection per fio job:
#   alone        cold 4 KiB random reads, depth 1, over the first half of the
#                image: latency p50/p99. Every read makes the origin push the
#                rest of its 1 MiB group, so pushes stream the whole time.
#                Target: p99 <= RTT + 25 ms.
#   with-writer  the same reads while a second fio job writes 1 MiB blocks
#                at depth 4 to the second half, faster than the link can
#                ship (the shipper is busy the whole time).
#                Target: p99 <= p99 alone + 30 ms.
#   write-back   a sustained writer (1 MiB, depth 4) for WB_SECS: the rate
#                the origin applies batches at against the link's bandwidth
#                (target >= 0.9x), the age of the oldest unshipped write
#                sampled every second (bounded, and shown), and reconnects
#                (target: zero on a healthy link).
# With FERRY_OLD_BIN (a ferry binary of an earlier revision), every job
# also runs on it, back to back with the current binary, through the same
# emulator: the before/after of the same run.
#
# Usage: benches/system/link-bench.sh
# Environment:
#   SIZE_MIB    image size (default 2048: reads stay cold for a whole job)
#   DELAY_MS    one-way delay (default 25)
#   MBIT        bandwidth each way (default 100)
#   QUEUE_KIB   the path's buffer per direction (default 4096)
#   RUNTIME     seconds of the read jobs (default 30)
#   ROUNDS      rounds of the read jobs (default 3; medians reported)
#   WB_SECS     seconds of the write-back job (default 300)
#   RPO         the edge's --rpo (default 1)
#   JOURNAL_MIB the edge's --journal-size in MiB (default 256)
#   FERRY_BIN   ferry binary (default: release build, built here)
#   FERRY_OLD_BIN  an earlier ferry binary to compare with (optional)
#   OUT         Markdown report (default /tmp/link-bench-DATE.md); raw
#               numbers and logs in ${OUT%.md}.raw/
#   WORK_DIR    scratch directory parent (default /tmp)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BENCH=link-bench
SIZE_MIB=${SIZE_MIB:-2048}
DELAY_MS=${DELAY_MS:-25}
MBIT=${MBIT:-100}
QUEUE_KIB=${QUEUE_KIB:-4096}
RUNTIME=${RUNTIME:-30}
ROUNDS=${ROUNDS:-3}
WB_SECS=${WB_SECS:-300}
RPO=${RPO:-1}
JOURNAL_MIB=${JOURNAL_MIB:-256}
WORK_DIR=${WORK_DIR:-/tmp}
OUT=${OUT:-/tmp/link-bench-$(date +%Y%m%d-%H%M%S).md}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}
RAW=${OUT%.md}.raw
# shellcheck source=lib.sh
source "$HERE/lib.sh"

whole_numbers SIZE_MIB QUEUE_KIB RUNTIME ROUNDS WB_SECS JOURNAL_MIB
require_tools fio python3 awk
ferry_binary release
BINS=(new)
if [ -n "${FERRY_OLD_BIN:-}" ]; then
  [ -x "$FERRY_OLD_BIN" ] || die "FERRY_OLD_BIN $FERRY_OLD_BIN missing"
  BINS=(new old)
fi
bin_of() { if [ "$1" = old ]; then echo "$FERRY_OLD_BIN"; else echo "$FERRY_BIN"; fi; }

fresh_raw
start_work

RTT_MS=$(awk -v d="$DELAY_MS" 'BEGIN { print 2 * d }')
LINK_BPS=$(awk -v m="$MBIT" 'BEGIN { printf "%d", m * 1e6 / 8 }')
HALF=$((SIZE_MIB / 2))
cat > "$RAW/meta.txt" <<EOF
SIZE_MIB=$SIZE_MIB DELAY_MS=$DELAY_MS MBIT=$MBIT QUEUE_KIB=$QUEUE_KIB RUNTIME=$RUNTIME
ROUNDS=$ROUNDS WB_SECS=$WB_SECS RPO=$RPO JOURNAL_MIB=$JOURNAL_MIB
FERRY_BIN=$FERRY_BIN FERRY_OLD_BIN=${FERRY_OLD_BIN:-}
REVISION=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
EOF

IMG=$WORK/vm.img
make_image "$IMG" "$SIZE_MIB"

# site BIN TAG: an origin (of BIN) serving the image as "vm", the emulated
# WAN (always the current binary's emulator) in front of it, and an edge of
# BIN with a fresh cache; sets URI, CTL. Every job gets its own site.
site() {
  local bin=$1 tag=$2
  spawn "origin-$tag" origin "$bin" origin --listen 127.0.0.1:0 --export "vm=$IMG" \
    --state-dir "$WORK/origin-$tag" --no-tls
  local origin=$ADDR
  spawn "link-$tag" link "$FERRY_BIN" link-emulator --listen 127.0.0.1:0 --target "$origin" \
    --delay-ms "$DELAY_MS" --mbit "$MBIT" --queue-kib "$QUEUE_KIB"
  local link=$ADDR
  spawn "edge-$tag" control "$bin" edge --origin "$link" --volume vm --cache-dir "$WORK/cache-$tag" \
    --cache-size "$((SIZE_MIB))M" --journal-size "${JOURNAL_MIB}M" --rpo "$RPO" \
    --nbd 127.0.0.1:0 --no-tls
  CTL=$ADDR
  URI=nbd://$(sed -n 's/^listening nbd //p' "$RAW/edge-$tag.stdout" | head -1)/vm
}

unsite() { # TAG
  stop_proc "edge-$1"
  stop_proc "link-$1"
  stop_proc "origin-$1"
  rm -rf "$WORK/cache-$1" "$WORK/origin-$1"
}

status() { # BIN CTL
  "$1" edge status --control "$2"
}
status_key() { # KEY (stdin: status)
  sed -n "s/^$1: //p" | head -1
}

fio_reads() { # URI OUT SECS
  fio --name=reads --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=1 \
    --size="${HALF}M" --offset=0 --time_based --runtime="$3" --norandommap --randrepeat=0 \
    --numjobs=1 --output-format=json --output="$2" >/dev/null || die "fio reads failed ($2)"
}

fio_writer() { # URI OUT SECS: writes 1 MiB blocks, depth 4, to the second half
  fio --name=writer --ioengine=nbd --uri="$1" --rw=write --bs=1M --iodepth=4 \
    --size="${HALF}M" --offset="${HALF}M" --time_based --runtime="$3" --refill_buffers \
    --numjobs=1 --output-format=json --output="$2" >/dev/null || die "fio writer failed ($2)"
}

reads_done() {
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["total_ios"])' "$1"
}

declare -A R=()
for ((round = 1; round <= ROUNDS; round++)); do
  for b in "${BINS[@]}"; do
    bin=$(bin_of "$b")
    tag=$b-alone-$round
    log "round $round/$ROUNDS, $b: cold 4 KiB reads alone, ${RUNTIME}s"
    site "$bin" "$tag"
    fio_reads "$URI" "$RAW/$tag.json" "$RUNTIME"
    status "$bin" "$CTL" > "$RAW/$tag.status"
    R[$b.alone.p50.$round]=$(pct "$RAW/$tag.json" 50)
    R[$b.alone.p99.$round]=$(pct "$RAW/$tag.json" 99)
    R[$b.alone.ios.$round]=$(reads_done "$RAW/$tag.json")
    R[$b.alone.pushed.$round]=$(status_key bytes_pushed < "$RAW/$tag.status")
    unsite "$tag"

    tag=$b-writer-$round
    log "round $round/$ROUNDS, $b: cold 4 KiB reads with a 1 MiB writer, ${RUNTIME}s"
    site "$bin" "$tag"
    fio_writer "$URI" "$RAW/$tag.writer.json" "$((RUNTIME + 10))" &
    wpid=$!
    sleep 5
    fio_reads "$URI" "$RAW/$tag.json" "$RUNTIME"
    wait "$wpid" || die "the writer failed"
    status "$bin" "$CTL" > "$RAW/$tag.status"
    R[$b.writer.p50.$round]=$(pct "$RAW/$tag.json" 50)
    R[$b.writer.p99.$round]=$(pct "$RAW/$tag.json" 99)
    R[$b.writer.ios.$round]=$(reads_done "$RAW/$tag.json")
    R[$b.writer.connects.$round]=$(status_key link_connects < "$RAW/$tag.status")
    unsite "$tag"
  done
done

# write-back: a sustained writer; sample the edge every second.
for b in "${BINS[@]}"; do
  bin=$(bin_of "$b")
  tag=$b-writeback
  log "$b: sustained writer for ${WB_SECS}s"
  site "$bin" "$tag"
  fio_writer "$URI" "$RAW/$tag.writer.json" "$WB_SECS" &
  wpid=$!
  : > "$RAW/$tag.samples"
  t0=$(now)
  while kill -0 "$wpid" 2>/dev/null; do
    s=$(status "$bin" "$CTL" 2>/dev/null || true)
    age=$(status_key journal_oldest_unshipped_age <<< "$s" | tr -d s)
    shipped=$(status_key bytes_shipped <<< "$s")
    connects=$(status_key link_connects <<< "$s")
    echo "$(elapsed "$t0") ${age:-none} ${shipped:-0} ${connects:-0}" >> "$RAW/$tag.samples"
    sleep 1
  done
  wait "$wpid" || die "the writer failed"
  unsite "$tag"
  # Steady state: from the first sample at which the journal has filled
  # (a minute in) to the end.
  read -r R[$b.wb.rate] R[$b.wb.age.max] R[$b.wb.age.p50] R[$b.wb.reconnects] < <(python3 - "$RAW/$tag.samples" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
rows = [(float(t), a, int(s), int(c)) for t, a, s, c in rows]
steady = [r for r in rows if r[0] >= 60] or rows
t0, _, s0, _ = steady[0]
t1, _, s1, _ = steady[-1]
rate = (s1 - s0) / (t1 - t0) if t1 > t0 else 0
ages = sorted(float(a) for _, a, _, _ in rows if a != "none")
mx = ages[-1] if ages else 0
p50 = ages[len(ages) // 2] if ages else 0
# The first connect is not a reconnect.
print(int(rate), "%.1f" % mx, "%.1f" % p50, max(rows[-1][3] - 1, 0))
PY
  )
done

med() { # KEY-PREFIX
  local vals=() r
  for ((r = 1; r <= ROUNDS; r++)); do vals+=("${R[$1.$r]}"); done
  median "${vals[@]}"
}

{
  echo "# link-bench $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Link: ${DELAY_MS} ms each way (RTT ${RTT_MS} ms), ${MBIT} Mbit/s, ${QUEUE_KIB} KiB of path buffer per direction."
  echo "Image ${SIZE_MIB} MiB; edge --rpo ${RPO} --journal-size ${JOURNAL_MIB}M; ${ROUNDS} rounds of ${RUNTIME} s (medians), write-back ${WB_SECS} s."
  echo
  echo "| job | binary | p50 (ms) | p99 (ms) | reads | target |"
  echo "|---|---|---:|---:|---:|---|"
  for b in "${BINS[@]}"; do
    a50=$(med "$b.alone.p50"); a99=$(med "$b.alone.p99")
    w50=$(med "$b.writer.p50"); w99=$(med "$b.writer.p99")
    echo "| cold 4 KiB QD1 reads, pushes streaming | $b | $a50 | $a99 | $(med "$b.alone.ios") | p99 <= $((RTT_MS + 25)) ms: $(awk -v p="$a99" -v t=$((RTT_MS + 25)) 'BEGIN { print (p <= t) ? "met" : "missed" }') |"
    echo "| the same with a 1 MiB writer | $b | $w50 | $w99 | $(med "$b.writer.ios") | p99 <= $a99 + 30 ms: $(awk -v p="$w99" -v t="$a99" 'BEGIN { print (p <= t + 30) ? "met" : "missed" }') |"
  done
  echo
  echo "| write-back | binary | applied (MB/s) | of the link | oldest unshipped write: max / median (s) | reconnects |"
  echo "|---|---|---:|---:|---:|---:|"
  for b in "${BINS[@]}"; do
    rate=${R[$b.wb.rate]}
    ratio=$(awk -v r="$rate" -v l="$LINK_BPS" 'BEGIN { printf "%.2f", r / l }')
    echo "| ${WB_SECS} s sustained 1 MiB writer | $b | $(awk -v r="$rate" 'BEGIN { printf "%.2f", r / 1e6 }') | ${ratio}x | ${R[$b.wb.age.max]} / ${R[$b.wb.age.p50]} | ${R[$b.wb.reconnects]} |"
  done
  echo
  echo "Pushed during the reads-alone job (bytes, per round): $(for ((r = 1; r <= ROUNDS; r++)); do printf '%s ' "${R[new.alone.pushed.$r]}"; done)"
  echo "Per-round p99 (ms): $(for b in "${BINS[@]}"; do for ((r = 1; r <= ROUNDS; r++)); do printf '%s alone %s, writer %s; ' "$b" "${R[$b.alone.p99.$r]}" "${R[$b.writer.p99.$r]}"; done; done)"
} > "$OUT"
cat "$OUT"
log "report in $OUT"
