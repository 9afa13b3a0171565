#!/usr/bin/env bash
# Image write throughput: `kiln install` writing a root image into slot A of a disk image
# (streamed with sha256, synced, read back and verified) against `dd` writing the same bytes
# to the same offset of the same target (conv=fsync). Prints MiB/s of both and the ratio.
# Usage: benches/install.sh [IMAGE]   (default: out/pxe/rootfs.squashfs, else 512 MiB of
# random bytes). Needs a built kiln (release preferred) and jq.
set -euo pipefail
cd "$(dirname "$0")/.."

export KILN_CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KILN_CACHE/target}"
kiln="$CARGO_TARGET_DIR/release/kiln"
[ -x "$kiln" ] || kiln="$CARGO_TARGET_DIR/debug/kiln"
[ -x "$kiln" ] || { echo "build kiln first (cargo build --release)" >&2; exit 1; }
runs="${RUNS:-3}"

work="$(mktemp -d "${TMPDIR:-/tmp}/kiln-bench-install.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/live"
image="${1:-out/pxe/rootfs.squashfs}"
if [ ! -f "$image" ]; then
  image="$work/live/rootfs.squashfs"
  head -c $((512 << 20)) /dev/urandom > "$image"
fi
cp "$image" "$work/live/rootfs.squashfs" 2>/dev/null || true
image="$work/live/rootfs.squashfs"
printf 'kernel' > "$work/live/vmlinuz"
printf 'initrd' > "$work/live/initrd.img"
img_bytes=$(stat -c %s "$image")
img_mib=$(( (img_bytes + (1 << 20) - 1) >> 20 ))
slot_mib=$(( img_mib + 64 ))
disk_bytes=$(( (slot_mib * 2 + 64 * 2 + 16) << 20 ))
disk="$work/disk.raw"

cat > "$work/kiln.yaml" <<YAML
apiVersion: kiln.dev/v1alpha1
kind: Appliance
metadata:
  name: bench
spec:
  profile: test
  hostname: bench-{mac}
  install:
    espSize: 64MiB
    slotSize: ${slot_mib}MiB
    stateSize: 64MiB
    wipe: always
YAML
cat > "$work/hw.json" <<JSON
{"firmware":"uefi","disks":[{"devPath":"$disk","sizeBytes":$disk_bytes,"transport":"virtio"}],
 "nics":[{"name":"ens3","mac":"52:54:00:00:00:01"}]}
JSON

# Slot A starts after 1 MiB of GPT space, BIOSBOOT (1 MiB) and the ESP (64 MiB).
slot_offset=$(( (1 + 1 + 64) << 20 ))
echo "image: $img_bytes bytes; target: $disk (sparse file, $(df --output=fstype "$work" | tail -1))"

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
kiln_rates=(); dd_rates=()
cat "$image" > /dev/null   # both read the image from the page cache
for i in $(seq "$runs"); do
  rm -f "$disk"; truncate -s "$disk_bytes" "$disk"
  start=$(date +%s.%N)
  dd if="$image" of="$disk" bs=4M seek="$slot_offset" oflag=seek_bytes conv=notrunc,fsync status=none
  end=$(date +%s.%N)
  dd_rates+=("$(awk -v b="$img_bytes" -v s="$start" -v e="$end" 'BEGIN {print b / 1048576 / (e - s)}')")

  rm -f "$disk"; truncate -s "$disk_bytes" "$disk"
  rate=$("$kiln" install --spec "$work/kiln.yaml" --inventory "$work/hw.json" --image "$image" \
      --progress json 2>/dev/null | jq -r 'select(.event == "done") | .image_mib_per_second')
  kiln_rates+=("$rate")
  printf 'run %d: dd %.1f MiB/s, kiln %.1f MiB/s\n' "$i" "${dd_rates[-1]}" "$rate"
done
dd_med=$(printf '%s\n' "${dd_rates[@]}" | median)
kiln_med=$(printf '%s\n' "${kiln_rates[@]}" | median)
printf '\nmedian of %d: dd %.1f MiB/s, kiln (write + fsync + read-back verify) %.1f MiB/s, kiln/dd = %.2f\n' \
  "$runs" "$dd_med" "$kiln_med" "$(awk -v k="$kiln_med" -v d="$dd_med" 'BEGIN {print k / d}')"
