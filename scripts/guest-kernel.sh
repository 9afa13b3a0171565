#!/usr/bin/env bash
# The test guest's kernel: Debian's cloud kernel package (from the build host's own apt
# sources), unpacked to $KILN_CACHE/guest-kernel/<package version>/ with the virtio modules a
# guest on a virtio disk needs; `current` names the newest. tests/ceph_node.rs boots it with a
# busybox initramfs from RBD and live-migrates it. A no-op when cached.
set -euo pipefail
export KILN_CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
base="$KILN_CACHE/guest-kernel"

package="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')"
[ -n "$package" ] || { echo "guest-kernel: no linux-image-cloud-amd64 in the apt sources" >&2; exit 1; }
version="$(apt-cache policy "$package" | awk '/Candidate:/ {print $2}')"
dir="$base/$package-$version"
if [ -f "$dir/vmlinuz" ]; then
  ln -sfn "$dir" "$base/current"
  exit 0
fi

echo "guest-kernel: fetching $package $version"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$package=$version" 2>/dev/null >/dev/null) \
  || (cd "$work" && apt-get download -q "$package=$version")
dpkg-deb -x "$work"/*.deb "$work/x"
mkdir -p "$dir.tmp/modules"
cp "$work"/x/boot/vmlinuz-* "$dir.tmp/vmlinuz"
# In load order.
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
  cp "$(find "$work/x/lib/modules" -name "$m.ko" | head -1)" "$dir.tmp/modules/"
  echo "$m" >> "$dir.tmp/modules/order"
done
rm -rf "$dir"
mv "$dir.tmp" "$dir"
ln -sfn "$dir" "$base/current"
echo "guest-kernel: $dir"
