#!/usr/bin/env bash
# Image write throughput: `kiln install` writing a root image into slot A of a disk image
# (streamed with sha256, synced, read back and verified) against
#   - `dd` writing the same bytes to the same offset of the same target (conv=fsync), alone
#     and followed by a read-back sha256 of what it wrote;
#   - coreos-installer (`install --image-file`, built with `cargo install` into
#     $KILN_CACHE/tools) writing the same image to a loop device, where kiln then writes too.
#     It needs udev to settle the device: a systemd-udevd runs for it in a mount namespace of
#     its own (a tmpfs /run), and stops after each run.
# Prints MiB/s of each and the ratios.
# Usage: benches/install.sh [IMAGE]   (default: out/pxe/rootfs.squashfs, else 512 MiB of
# random bytes). Measures KILN_BIN=PATH, else a release build. Needs jq and root.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

kiln=$(release_kiln)
runs="${RUNS:-5}"

coreos_installer_version=0.27.0
coreos_installer="$KILN_CACHE/tools/bin/coreos-installer"
if ! "$coreos_installer" --version 2>/dev/null | grep -qF "$coreos_installer_version"; then
  echo "building coreos-installer $coreos_installer_version into $KILN_CACHE/tools"
  cargo install -q --locked --root "$KILN_CACHE/tools" --version "$coreos_installer_version" coreos-installer
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/kiln-bench-install.XXXXXX")"
loop=""
trap '[ -z "$loop" ] || losetup -d "$loop"; rm -rf "$work"' EXIT
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

{ bench_spec; cat <<YAML; } > "$work/kiln.yaml"
  hostname: bench-{mac}
  install:
    espSize: 64MiB
    slotSize: ${slot_mib}MiB
    stateSize: 64MiB
    wipe: always
YAML

# Slot A starts after 1 MiB of GPT space, BIOSBOOT (1 MiB) and the ESP (64 MiB).
slot_offset=$(( (1 + 1 + 64) << 20 ))
echo "image: $img_bytes bytes; target: $disk (sparse file, $(df --output=fstype "$work" | tail -1))"

# A fresh loop device (with partition scanning, which coreos-installer asks for) over a new
# sparse file.
fresh_loop() {
  [ -z "$loop" ] || losetup -d "$loop"
  rm -f "$work/loop.raw"; truncate -s "$disk_bytes" "$work/loop.raw"
  loop=$(losetup -P --show -f "$work/loop.raw")
  sync
}
# Seconds coreos-installer takes to install the image onto $loop, udevd running beside it.
coreos_installer_seconds() {
  unshare -m --propagation private bash -euc '
    mount -t tmpfs kiln-bench-run /run
    /lib/systemd/systemd-udevd --resolve-names=never 2>/dev/null & udevd=$!
    for _ in $(seq 100); do [ -S /run/udev/control ] && break; sleep 0.05; done
    start=$(date +%s.%N)
    "$1" install --image-file "$2" --insecure "$3" > "$4" 2>&1 || { cat "$4" >&2; exit 1; }
    end=$(date +%s.%N)
    kill "$udevd"; wait "$udevd" || true
    awk -v s="$start" -v e="$end" "BEGIN {print e - s}"' \
    _ "$coreos_installer" "$image" "$loop" "$work/coreos-installer.log"
}

# The image MiB/s kiln reports for installing onto $1 (a disk image file or a loop device).
kiln_rate() {
  "$kiln" install --spec "$work/kiln.yaml" --disk-image "$1" --image "$image" \
    --output json --progress json 2>/dev/null | jq -r 'select(.event == "done") | .image_mib_per_second'
}

kiln_rates=(); dd_rates=(); ddv_rates=(); loop_kiln_rates=(); coi_rates=()
rate_of() { awk -v b="$img_bytes" -v s="$1" -v e="$2" 'BEGIN {print b / 1048576 / (e - s)}'; }
cat "$image" > /dev/null   # both read the image from the page cache
for i in $(seq "$runs"); do
  # Each write starts with nothing of the last one still being written back.
  rm -f "$disk"; truncate -s "$disk_bytes" "$disk"; sync
  start=$(date +%s.%N)
  dd if="$image" of="$disk" bs=4M seek="$slot_offset" oflag=seek_bytes conv=notrunc,fsync status=none
  end=$(date +%s.%N)
  dd_rates+=("$(rate_of "$start" "$end")")
  # The same write plus what kiln adds: read the slot back from the device (O_DIRECT, past
  # the page cache) and hash it.
  dd if="$disk" bs=1M skip="$slot_offset" count="$img_bytes" iflag=direct,skip_bytes,count_bytes \
    status=none | sha256sum > /dev/null
  verified=$(date +%s.%N)
  ddv_rates+=("$(rate_of "$start" "$verified")")

  # Each write starts with nothing of the last one still being written back.
  rm -f "$disk"; truncate -s "$disk_bytes" "$disk"; sync
  rate=$(kiln_rate "$disk")
  kiln_rates+=("$rate")
  printf 'run %d: dd %.1f MiB/s, dd + read-back sha256 %.1f MiB/s, kiln %.1f MiB/s\n' \
    "$i" "${dd_rates[-1]}" "${ddv_rates[-1]}" "$rate"

  fresh_loop
  coi_rates+=("$(rate_of 0 "$(coreos_installer_seconds)")")
  fresh_loop
  rate=$(kiln_rate "$loop")
  loop_kiln_rates+=("$rate")
  printf 'run %d on a loop device: coreos-installer %.1f MiB/s, kiln %.1f MiB/s\n' \
    "$i" "${coi_rates[-1]}" "$rate"
done
dd_med=$(printf '%s\n' "${dd_rates[@]}" | median)
ddv_med=$(printf '%s\n' "${ddv_rates[@]}" | median)
kiln_med=$(printf '%s\n' "${kiln_rates[@]}" | median)
coi_med=$(printf '%s\n' "${coi_rates[@]}" | median)
loop_kiln_med=$(printf '%s\n' "${loop_kiln_rates[@]}" | median)
ratio() { awk -v k="$1" -v d="$2" 'BEGIN {print k / d}'; }
printf '\nmedian of %d runs (MiB/s):\n' "$runs"
printf '  dd write + fsync                    %8.1f\n' "$dd_med"
printf '  dd write + fsync + read-back sha256 %8.1f\n' "$ddv_med"
printf '  kiln (hash, write, fsync, verify)   %8.1f\n' "$kiln_med"
printf 'on a loop device:\n'
printf '  coreos-installer (write, fsync)     %8.1f\n' "$coi_med"
printf '  kiln (hash, write, fsync, verify)   %8.1f\n' "$loop_kiln_med"
printf 'kiln/dd = %.2f, kiln/(dd + verify) = %.2f, kiln/coreos-installer = %.2f\n' \
  "$(ratio "$kiln_med" "$dd_med")" "$(ratio "$kiln_med" "$ddv_med")" \
  "$(ratio "$loop_kiln_med" "$coi_med")"
record "image write with read-back verification" MiB/s higher "$kiln_med" "dd write + fsync" "$dd_med" 0.45
record "image write with read-back verification" MiB/s higher "$kiln_med" "dd write + fsync + read-back sha256" "$ddv_med" 1.0
record "image write with read-back verification, loop device" MiB/s higher "$loop_kiln_med" \
  "coreos-installer $coreos_installer_version (no read-back)" "$coi_med" 1.0
