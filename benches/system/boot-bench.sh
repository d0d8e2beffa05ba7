#!/usr/bin/env bash
# System benchmark: a stock Debian 12 VM (GRUB, the stock initramfs, systemd
# to multi-user.target; scripts/make-vm-image.sh --stock) booted by qemu
# under software emulation from each of these, one after the other, in the
# same run:
#
#   local        the raw image as a local file (no network): the target
#   serve        `ferry serve` on loopback: every read is a request, no WAN
#   nbdkit       nbdkit's file plugin on loopback, with its stats filter,
#                which counts what the guest reads (bytes and requests)
#   nbdkit-wan   nbdkit behind the emulated WAN: every read pays the link
#   edge-cold    a ferry edge through the WAN, fresh cache, no boot plan
#                (--prefetch-budget 0, --profile-window 0): demand reads and
#                the file-aware group pushes only
#   edge-first   fresh origin state and cache: the first boot of the volume,
#                planned from the boot files the origin finds in the image;
#                its reads are recorded as the volume's boot profile
#   edge-again   the same origin, a fresh cache: planned from that profile
#   edge-hotspot a second volume, a copy of the image under another name, on
#                the same origin, a fresh cache, never profiled itself: planned
#                from the hotspots of the first volume's profile
#   copy-first   nbdcopy from nbdkit through the WAN to a local file, then a
#                local boot: what a user does without ferry
#   staging-serve a diskless VM (only a NIC and the disk `ferry staging-image`
#                writes): iPXE sanboots `ferry serve --iscsi` on loopback (a
#                writable copy of the image), the guest's initramfs logs in
#                from the iBFT; the no-WAN figure for the next row
#   staging-edge the same diskless VM booting from an edge through the WAN
#                (iSCSI, --isolated so the guest's writes stay on the edge),
#                fresh cache, planned from edge-first's profile
#
# Measured per boot: seconds from qemu's start to the guest's FERRY-BOOT-OK
# line on its serial console (the marker service runs after multi-user.target),
# the bytes that crossed the emulated link towards the edge (its own
# counters), and for edges the demand bytes (reads the guest waited for) and
# the pushed bytes. Ratios of boot times are to `serve` of the same round
# (loopback NBD, the no-WAN figure with the same qemu block driver) and to
# `local`; link bytes are compared with what the guest read (nbdkit's stats).
#
# Targets (issue 14): edge-again <= 1.05x serve, edge-first <= 1.25x,
# edge-hotspot <= 1.15x; link bytes <= 1.2x (edge-again) and <= 1.5x
# (edge-first) what the guest read. staging-edge is compared with
# staging-serve: the diskless path reads through iPXE and the guest's own
# iSCSI initiator (over qemu's user-mode network), not qemu's NBD driver.
#
# Usage: benches/system/boot-bench.sh
# Environment:
#   ROUNDS        rounds of every row but nbdkit-wan and copy-first (default 3)
#   SLOW_ROUNDS   rounds of nbdkit-wan and copy-first (default 1: each takes
#                 minutes)
#   ROWS          subset of the rows above, in the order to run (default all)
#   DELAY_MS      one-way delay of the emulated link (default 25)
#   MBIT          its bandwidth, each way (default 100)
#   BOOT_TIMEOUT  seconds a boot may take (default 900)
#   QEMU_MEM_MIB  guest memory (default 512)
#   FERRY_BIN     ferry binary (default: the dev build in CARGO_TARGET_DIR)
#   OUT           Markdown report (default /tmp/boot-bench-DATE.md); consoles,
#                 logs, statuses and raw numbers go to ${OUT%.md}.raw/
#   WORK_DIR      scratch (origin state, caches, copies; removed at exit)
#
# Method: every boot uses qemu's snapshot=on, so the guest's writes go to a
# temporary overlay and every boot starts from the same image; the image is
# read once before the run so every server finds it in the page cache. Each
# row of a round uses its own emulated link (the emulator shapes each TCP
# connection on its own) and, for edges, its own fresh cache.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BENCH=boot-bench
ROUNDS=${ROUNDS:-3}
SLOW_ROUNDS=${SLOW_ROUNDS:-1}
ALL_ROWS="local serve nbdkit nbdkit-wan edge-cold edge-first edge-again edge-hotspot copy-first staging-serve staging-edge"
ROWS=${ROWS:-$ALL_ROWS}
DELAY_MS=${DELAY_MS:-25}
MBIT=${MBIT:-100}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-900}
QEMU_MEM_MIB=${QEMU_MEM_MIB:-512}
WORK_DIR=${WORK_DIR:-/tmp}
OUT=${OUT:-/tmp/boot-bench-$(date +%Y%m%d-%H%M%S).md}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}
RAW=${OUT%.md}.raw
NBDKIT_OPTS=-r
# shellcheck source=lib.sh
source "$HERE/lib.sh"

whole_numbers ROUNDS SLOW_ROUNDS BOOT_TIMEOUT QEMU_MEM_MIB
for r in $ROWS; do
  [[ " $ALL_ROWS " == *" $r "* ]] || die "unknown row $r ($ALL_ROWS)"
done
has_row() { [[ " $ROWS " == *" $1 "* ]]; }
# edge-again boots from edge-first's profile, edge-hotspot from its hotspots.
if has_row edge-again || has_row edge-hotspot || has_row staging-edge; then
  has_row edge-first || die "edge-again, edge-hotspot and staging-edge need edge-first (it records the profile)"
fi
require_tools qemu-system-x86_64 nbdkit nbdcopy nbdinfo python3 awk
ferry_binary
fresh_raw
start_work

IMG=$("$ROOT/scripts/make-vm-image.sh" --stock | tail -1)
[ -f "$IMG" ] || die "no stock image ($IMG)"
IMG_ALLOC=$(($(du -k "$IMG" | cut -f1) * 1024))
cat "$IMG" > /dev/null
# The hotspot volume: the same bytes under another name (a copy, so the
# origin cannot tell it is the same file).
IMG2=$WORK/copy.img
if has_row edge-hotspot; then cp --sparse=always "$IMG" "$IMG2"; cat "$IMG2" > /dev/null; fi
REV=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
cat > "$RAW/meta.txt" <<EOF
ROUNDS=$ROUNDS SLOW_ROUNDS=$SLOW_ROUNDS ROWS=$ROWS DELAY_MS=$DELAY_MS MBIT=$MBIT
IMG=$IMG ($IMG_ALLOC bytes allocated)
REVISION=$REV FERRY_BIN=$FERRY_BIN
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
EOF

# --- one boot -------------------------------------------------------------

# boot LABEL DRIVE: boots qemu from DRIVE; sets BOOT_SECS (qemu start to the
# marker) and GUEST_UPTIME (the guest's own clock at the marker).
boot() {
  boot_with "$1" -drive "file=$2,format=raw,if=virtio,snapshot=on"
}

# boot_diskless LABEL STAGING: a VM with only STAGING and a NIC on qemu's
# user-mode network (10.0.2.2 is this machine's loopback).
boot_diskless() {
  boot_with "$1" -drive "file=$2,format=raw,if=virtio,snapshot=on" -nic user,model=virtio-net-pci
}

# boot_with LABEL QEMU-DEVICE-ARGS...
boot_with() {
  local label=$1 console=$RAW/$1.console pid start i
  shift
  : > "$console"
  qemu-system-x86_64 -accel tcg -m "$QEMU_MEM_MIB" -smp 1 -nodefaults -display none \
    -no-reboot -serial "file:$console" "$@" \
    < /dev/null > "$RAW/$label.qemu.stdout" 2> "$RAW/$label.qemu.stderr" &
  pid=$!
  start=$(now)
  BOOT_SECS=""
  for ((i = 0; i < BOOT_TIMEOUT * 10; i++)); do
    if grep -q 'FERRY-BOOT-OK' "$console" 2>/dev/null; then
      BOOT_SECS=$(elapsed "$start")
      break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$BOOT_SECS" ]; then
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    tail -c 3000 "$console" >&2 || true
    tail -5 "$RAW/$label.qemu.stderr" >&2 || true
    die "$label: no FERRY-BOOT-OK (qemu exited or ${BOOT_TIMEOUT}s passed); console in $console"
  fi
  GUEST_UPTIME=$(sed -n 's/.*FERRY-BOOT-OK.* uptime=\([0-9.]*\).*/\1/p' "$console" | head -1)
  # The guest powers off after the marker; qemu exits (-no-reboot).
  for ((i = 0; i < 600; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# --- servers ----------------------------------------------------------------

# stop_link NAME: stops the emulator; sets LINK_DOWN (bytes it carried
# towards the client: what the WAN cost the boot).
stop_link() {
  stop_proc "$1"
  LINK_DOWN=$(link_bytes_down "$1")
  [ -n "$LINK_DOWN" ] || die "link emulator $1 did not log its byte counts (see $RAW/$1.log)"
}

ORIGIN_STATE=""
start_origin() { # NAME: a fresh origin state dir; sets ORIGIN, ORIGIN_API
  ORIGIN_STATE=$WORK/$1.state
  rm -rf "$ORIGIN_STATE"
  local exports=(--export "vol=$IMG")
  has_row edge-hotspot && exports+=(--export "vol2=$IMG2")
  spawn "$1" origin "$FERRY_BIN" origin --listen 127.0.0.1:0 "${exports[@]}" \
    --state-dir "$ORIGIN_STATE" --no-tls
  ORIGIN=$ADDR
  ORIGIN_API=$(sed -n 's/^listening api //p' "$RAW/$1.stdout" | head -1)
  [ -n "$ORIGIN_API" ] || ORIGIN_API=$ORIGIN_STATE/api.sock
}

# start_edge NAME VOLUME ORIGIN ARGS...: a fresh cache; sets EDGE_NBD,
# EDGE_ISCSI (with --iscsi in ARGS), EDGE_API.
# Retries while the origin still holds the volume for the previous edge.
start_edge() {
  local name=$1 vol=$2 origin=$3 try
  shift 3
  rm -rf "$WORK/$name.cache"
  for try in 1 2 3 4 5; do
    if spawn "$name" api "$FERRY_BIN" edge --origin "$origin" --volume "$vol" \
      --cache-dir "$WORK/$name.cache" --cache-size 4G --nbd 127.0.0.1:0 --no-tls "$@"; then
      EDGE_API=$ADDR
      EDGE_NBD=$(sed -n 's/^listening nbd //p' "$RAW/$name.stdout" | head -1)
      EDGE_ISCSI=$(sed -n 's/^listening iscsi //p' "$RAW/$name.stdout" | head -1)
      [ -n "$EDGE_NBD" ] || die "$name printed no 'listening nbd' line"
      return 0
    fi
    grep -qi 'attached by edge\|busy' "$RAW/$name.log" || die "$name failed to start"
    sleep 1
  done
  die "$name could not attach $vol"
}

# staging_image TAG PORT: the staging disk for volume vol on the iSCSI
# portal at PORT of this machine; sets STAGING.
staging_image() {
  STAGING=$WORK/$1.staging.img
  "$FERRY_BIN" staging-image vol --portal "10.0.2.2:$2" --out "$STAGING" \
    > "$RAW/$1.staging" || die "$1: ferry staging-image failed"
}

json_get() { # FILE PYTHON-EXPRESSION-ON-j
  python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1"
}

# --- the rows -------------------------------------------------------------

declare -A SECS=() DOWN=() DEMAND=() PUSHED=() UPTIME=()
record() { # ROW SECS [DOWN DEMAND PUSHED]
  SECS[$1]="${SECS[$1]:-} $2"
  UPTIME[$1]="${UPTIME[$1]:-} ${GUEST_UPTIME:-nan}"
  [ -z "${3:-}" ] || DOWN[$1]="${DOWN[$1]:-} $3"
  [ -z "${4:-}" ] || DEMAND[$1]="${DEMAND[$1]:-} $4"
  [ -z "${5:-}" ] || PUSHED[$1]="${PUSHED[$1]:-} $5"
  log "  $1: ${2}s${3:+, link ${3} B}${4:+, demand ${4} B}${5:+, pushed ${5} B}"
}

GUEST_READ_BYTES=""
GUEST_READ_OPS=""
run_row() { # ROW ROUND
  local row=$1 r=$2 tag=$1-$2
  case $row in
    local)
      boot "$tag" "$IMG"
      record "$row" "$BOOT_SECS"
      ;;
    serve)
      local port
      port=$(free_port)
      spawn "$tag-serve" nbd "$FERRY_BIN" serve --export "vol=$IMG" --read-only \
        --nbd "127.0.0.1:$port"
      boot "$tag" "nbd://$ADDR/vol"
      stop_proc "$tag-serve"
      record "$row" "$BOOT_SECS"
      ;;
    nbdkit)
      start_nbdkit "$tag-nbdkit" "$IMG" --filter=stats statsfile="$RAW/$tag.stats" statsappend=false
      boot "$tag" "nbd://$NBDKIT_ADDR"
      stop_proc "$tag-nbdkit"
      # "read: 3812 ops, 1.2 s, 88.06 MiB, ...": to 0.01 MiB, enough here.
      read -r GUEST_READ_OPS GUEST_READ_BYTES < <(python3 - "$RAW/$tag.stats" <<'PY'
import re, sys
unit = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
for line in open(sys.argv[1]):
    m = re.match(r"read: (\d+) ops, [\d.]+ s, ([\d.]+) (bytes|KiB|MiB|GiB)", line)
    if m:
        print(m[1], round(float(m[2]) * unit[m[3]]))
        break
else:
    print("", "")
PY
)
      record "$row" "$BOOT_SECS"
      ;;
    nbdkit-wan)
      start_nbdkit "$tag-nbdkit" "$IMG"
      start_link "$tag-link" "$NBDKIT_ADDR"
      boot "$tag" "nbd://$LINK"
      stop_link "$tag-link"
      stop_proc "$tag-nbdkit"
      record "$row" "$BOOT_SECS" "$LINK_DOWN"
      ;;
    copy-first)
      start_nbdkit "$tag-nbdkit" "$IMG"
      start_link "$tag-link" "$NBDKIT_ADDR"
      local start copy
      start=$(now)
      nbdcopy --connections=1 "nbd://$LINK" "$WORK/copied.img" || die "nbdcopy failed"
      copy=$(elapsed "$start")
      stop_link "$tag-link"
      stop_proc "$tag-nbdkit"
      boot "$tag" "$WORK/copied.img"
      rm -f "$WORK/copied.img"
      log "  $row: copy ${copy}s"
      record "$row" "$(awk -v a="$copy" -v b="$BOOT_SECS" 'BEGIN { printf "%.3f", a + b }')" "$LINK_DOWN"
      ;;
    staging-serve)
      local port copy=$WORK/staging-copy.img
      cp --sparse=always "$IMG" "$copy"
      port=$(free_port)
      spawn "$tag-serve" iscsi "$FERRY_BIN" serve --export "vol=$copy" --iscsi "127.0.0.1:$port"
      staging_image "$tag" "${ADDR##*:}"
      boot_diskless "$tag" "$STAGING"
      stop_proc "$tag-serve"
      rm -f "$copy"
      record "$row" "$BOOT_SECS"
      ;;
    edge-* | staging-edge)
      local vol=vol args=()
      case $row in
        edge-cold) args=(--prefetch-budget 0 --profile-window 0) ;;
        edge-first) ;;
        edge-again) args=(--profile-window 0) ;;
        edge-hotspot) vol=vol2 args=(--profile-window 0) ;;
        staging-edge) args=(--profile-window 0 --isolated --iscsi 127.0.0.1:0) ;;
      esac
      # edge-cold and edge-first start from an origin that never saw a boot.
      if [ "$row" = edge-cold ] || [ "$row" = edge-first ]; then
        stop_proc origin
        start_origin origin
      fi
      start_link "$tag-link" "$ORIGIN"
      start_edge "$tag-edge" "$vol" "$LINK" "${args[@]}"
      if [ "$row" = staging-edge ]; then
        staging_image "$tag" "${EDGE_ISCSI##*:}"
        boot_diskless "$tag" "$STAGING"
      else
        boot "$tag" "nbd://$EDGE_NBD/$vol"
      fi
      if [ "$row" = edge-first ]; then
        "$FERRY_BIN" edge profile stop "$vol" --api "$EDGE_API" > "$RAW/$tag.profile-stop" ||
          die "$tag: profile stop failed"
      fi
      "$FERRY_BIN" edge status --api "$EDGE_API" --json > "$RAW/$tag.status.json" ||
        die "$tag: edge status failed"
      local v demand pushed
      v="[x for x in j['volumes'] if x['name'] == '$vol'][0] if 'volumes' in j else j"
      demand=$(json_get "$RAW/$tag.status.json" "($v)['link']['demand_bytes']")
      pushed=$(json_get "$RAW/$tag.status.json" "($v)['link']['push_bytes']")
      stop_proc "$tag-edge"
      stop_link "$tag-link"
      rm -rf "$WORK/$tag-edge.cache"
      if [ "$row" = edge-first ]; then
        local i n=0
        for ((i = 0; i < 100; i++)); do
          "$FERRY_BIN" origin profiles "$vol" --api "$ORIGIN_API" --json > "$RAW/$tag.profiles.json" 2>/dev/null &&
            n=$(json_get "$RAW/$tag.profiles.json" "len(j['profiles'])") && [ "$n" -ge 1 ] && break
          sleep 0.2
        done
        [ "$n" -ge 1 ] || die "$tag: the origin stored no profile for $vol"
      fi
      if [ "$row" = edge-hotspot ]; then
        "$FERRY_BIN" origin profiles "$vol" --api "$ORIGIN_API" --json > "$RAW/$tag.profiles.json" || true
      fi
      record "$row" "$BOOT_SECS" "$LINK_DOWN" "$demand" "$pushed"
      ;;
  esac
}

for ((r = 1; r <= ROUNDS; r++)); do
  log "round $r of $ROUNDS"
  for row in $ROWS; do
    if [ "$row" = nbdkit-wan ] || [ "$row" = copy-first ]; then
      [ "$r" -le "$SLOW_ROUNDS" ] || continue
    fi
    run_row "$row" "$r"
  done
done

# --- report ---------------------------------------------------------------

med() { # ROW ARRAY-NAME
  local -n a=$2
  # shellcheck disable=SC2086
  [ -n "${a[$1]:-}" ] && median ${a[$1]} || echo ""
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print ""; else printf "%.2fx", a / b }'; }
mb() { awk -v b="$1" 'BEGIN { if (b == "") print ""; else printf "%.1f MB", b / 1e6 }'; }
SERVE=$(med serve SECS)
LOCAL=$(med local SECS)
{
  echo "# boot-bench: a stock Debian 12 VM booted over the emulated WAN"
  echo
  echo "qemu TCG, ${QEMU_MEM_MIB} MiB, virtio-blk, snapshot=on; link ${DELAY_MS} ms each way,"
  echo "${MBIT} Mbit/s; $ROUNDS rounds (nbdkit-wan, copy-first: $SLOW_ROUNDS), medians."
  echo "Image $(basename "$(dirname "$IMG")"): 2 GiB, $(mb "$IMG_ALLOC") allocated. Revision $REV;"
  echo "load average before $(cut -d' ' -f1-3 /proc/loadavg | tr ' ' '/') (2 cores)."
  echo
  [ -z "$GUEST_READ_BYTES" ] ||
    echo "The guest reads $(mb "$GUEST_READ_BYTES") in $GUEST_READ_OPS requests (nbdkit's stats filter)."
  echo
  echo "| row | boot (s) | vs serve | vs local | guest uptime (s) | link bytes | vs guest reads | demand | pushed | rounds (s) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  for row in $ROWS; do
    s=$(med "$row" SECS)
    d=$(med "$row" DOWN)
    echo "| $row | $s | $(ratio "$s" "$SERVE") | $(ratio "$s" "$LOCAL") | $(med "$row" UPTIME) |" \
      "$(mb "$d") | $(ratio "$d" "$GUEST_READ_BYTES") | $(mb "$(med "$row" DEMAND)") |" \
      "$(mb "$(med "$row" PUSHED)") | ${SECS[$row]# } |"
  done
  echo
  echo "Boot: qemu's start to the guest's marker (after multi-user.target)."
  if has_row staging-serve && has_row staging-edge; then
    echo "staging-edge vs staging-serve: $(ratio "$(med staging-edge SECS)" "$(med staging-serve SECS)")."
  fi
  echo "Link bytes: what the emulated link carried towards the guest's side."
  echo "Demand: bytes the edge fetched because the guest waited for them;"
  echo "pushed: bytes the origin sent ahead (plan, file groups)."
  [ ! -f "$RAW/edge-hotspot-1.profiles.json" ] ||
    echo "edge-hotspot's plan: $(json_get "$RAW/edge-hotspot-1.profiles.json" "j.get('plan_from', '?')")."
} > "$OUT"
cat "$OUT"
