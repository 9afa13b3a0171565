#!/usr/bin/env bash
# Builds the netboot test bundle: a Debian kernel (from the linux-image .deb) and a small
# busybox initramfs whose /init prints a marker with the kernel command line to the serial
# console, then powers off. Cached under $KILN_CACHE/fixtures, keyed by kernel and busybox
# versions and this script's hash. Prints the bundle directory.
set -euo pipefail

cache="${KILN_CACHE:-$HOME/.cache/kiln}/fixtures"
kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kernel_pkg" ] || { echo "netboot-fixtures: cannot resolve linux-image-amd64 (apt-get update?)" >&2; exit 1; }
kernel_ver=$(apt-cache policy "$kernel_pkg" | awk '/Candidate:/ {print $2}')
busybox=/bin/busybox
# grep reads the whole list: with -q it could exit at the match and busybox die of SIGPIPE,
# which pipefail reports as a failure.
[ -x "$busybox" ] && "$busybox" --list | grep -x poweroff > /dev/null \
  || { echo "netboot-fixtures: needs busybox-static (scripts/install-deps.sh)" >&2; exit 1; }
busybox_ver=$(dpkg-query -W -f='${Version}' busybox-static)
self_hash=$(sha256sum "$0" | cut -c1-12)
out="$cache/netboot-$kernel_pkg-$kernel_ver-busybox-$busybox_ver-$self_hash"
# Test binaries run this in parallel: one builds, the others wait and reuse its result.
mkdir -p "$cache"
exec 9>"$cache/.netboot.lock"
flock 9
if [ -f "$out/.done" ]; then
  echo "$out"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt downloads as _apt
(cd "$work" && apt-get download -qq "$kernel_pkg=$kernel_ver" >&2)
dpkg-deb --fsys-tarfile "$work"/*.deb | tar -x -C "$work" --wildcards './boot/vmlinuz-*'

root="$work/initramfs"
mkdir -p "$root/bin" "$root/proc" "$root/dev"
cp "$busybox" "$root/bin/busybox"
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
echo "KILN-NETBOOT-MARKER $(/bin/busybox cat /proc/cmdline)" > /dev/ttyS0
/bin/busybox poweroff -f
INIT
chmod 755 "$root/init"
mkdir -p "$work/bundle"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/bundle/initrd.img"
cp "$work"/boot/vmlinuz-* "$work/bundle/vmlinuz"
# The iPXE script names a rootfs too; this bundle's initramfs never fetches it.
head -c 1048576 /dev/urandom > "$work/bundle/rootfs.squashfs"
# A build manifest (the format `kiln build` writes, paths relative to a build's output
# directory): `kiln pxe serve` puts its digests on the kernel command line.
{
  printf '{"kiln_version":"fixture","spec_sha256":"","suite":"","mirror":"","kernel":"%s",' "$kernel_ver"
  printf '"kernel_args":[],"rootfs_cache_key":"","packages":[],"artifacts":['
  sep=""
  for f in vmlinuz initrd.img rootfs.squashfs; do
    printf '%s{"path":"pxe/%s","size":%d,"sha256":"%s"}' "$sep" "$f" \
      "$(stat -c %s "$work/bundle/$f")" "$(sha256sum "$work/bundle/$f" | cut -d' ' -f1)"
    sep=","
  done
  printf ']}\n'
} > "$work/bundle/manifest.json"

mkdir -p "$cache"
rm -rf "$out"
cp -r "$work/bundle" "$out"
touch "$out/.done"
echo "$out"
