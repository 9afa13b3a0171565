#!/usr/bin/env bash
# Unattended install time under software emulation (as the lab runs machines here):
# `kiln lab install` boots a `test` profile ISO with a blank disk, installs, reboots into the
# installed disk and waits for `kiln-agent ready`, on UEFI and on BIOS. Prints power-on →
# agent ready with each boot's split (firmware + loader, kernel, stage-1, systemd) read from
# the consoles, beside the floor measured in the same run: the ISO's own kernel with a
# busybox initramfs (the netboot fixture's), booted directly by QEMU with the same machine
# flags to a marker, no firmware and no disk.
# Usage: benches/boot.sh [ISO]   (default: builds the test profile into a temporary directory)
# Measures KILN_BIN=PATH (with kiln-init beside it), else a release build. Needs jq, xorriso, root.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

kiln=$(release_kiln)
runs="${RUNS:-3}"
target_seconds=45

work=$(mktemp -d /var/tmp/kiln-bench-boot.XXXXXX)
trap 'rm -rf "$work"' EXIT
iso="${1:-}"
if [ -z "$iso" ]; then
  echo "building the test profile"
  "$kiln" build --profile test --out "$work/build" --output json > /dev/null
  iso="$work/build/kiln.iso"
fi

# The floor: the ISO's kernel, the fixture's busybox initramfs (prints a marker, powers off).
fixture=$(scripts/netboot-fixtures.sh)
xorriso -osirrox on -indev "$iso" -extract /live/vmlinuz "$work/vmlinuz" 2>/dev/null
floor_seconds() {
  local start end
  start=$(date +%s.%N)
  qemu-system-x86_64 -machine q35 -accel tcg,thread=multi -cpu max -m 2048 -smp 2 \
    -display none -vga none -nodefaults -no-reboot -device virtio-rng-pci \
    -serial "file:$work/floor.log" -kernel "$work/vmlinuz" -initrd "$fixture/initrd.img" \
    -append "console=ttyS0 panic=-1"
  end=$(date +%s.%N)
  grep -q KILN-NETBOOT-MARKER "$work/floor.log" || { echo "floor boot printed no marker" >&2; exit 1; }
  awk -v s="$start" -v e="$end" 'BEGIN {print e - s}'
}

floors=()
for i in $(seq "$runs"); do
  floors+=("$(floor_seconds)")
  printf 'floor run %d: kernel + busybox initramfs to a marker in %.1f s\n' "$i" "${floors[-1]}"
done
floor=$(printf '%s\n' "${floors[@]}" | median)

split() {  # a boot split object as one line
  jq -r "$1"' | if . == null then "(no split)" else
    "firmware + loader \(.firmware_loader * 10 | round / 10) s, kernel \(.kernel * 10 | round / 10) s, stage-1 \(.stage1 * 10 | round / 10) s, systemd \(.userspace * 10 | round / 10) s" end' "$2"
}
printf '\n%-5s %9s %9s %9s %9s %9s\n' firmware live install reboot installed total
for fw in uefi bios; do
  totals=()
  for i in $(seq "$runs"); do
    rm -f "$work/disk.img"
    "$kiln" lab install --iso "$iso" --disk "$work/disk.img" --firmware "$fw" --logs "$work" \
      --output json > "$work/$fw-$i.json" 2> "$work/$fw-$i.log" \
      || { cat "$work/$fw-$i.log" >&2; exit 1; }
    totals+=("$(jq -r .total_seconds "$work/$fw-$i.json")")
    jq -r --arg fw "$fw" '"\($fw)  \([.live_boot_seconds, .install_seconds, .reboot_seconds,
      .installed_boot_seconds, .total_seconds] | map(. * 10 | round / 10 | tostring + " s") | join("   "))"' \
      "$work/$fw-$i.json"
    printf '  live boot:      %s\n' "$(split .live_split "$work/$fw-$i.json")"
    printf '  installed boot: %s\n' "$(split .installed_split "$work/$fw-$i.json")"
  done
  total=$(printf '%s\n' "${totals[@]}" | median)
  printf '%s: median power-on → agent ready %.1f s over %d runs (target ≤ %d s); floor %.1f s\n' \
    "$fw" "$total" "$runs" "$target_seconds" "$floor"
  record "unattended ISO install, power-on → agent ready ($fw)" s lower "$total" \
    "issue target (${target_seconds} s)" "$target_seconds" 1.0
done
printf 'floor (bare kernel + busybox initramfs, direct boot): median %.1f s\n' "$floor"
