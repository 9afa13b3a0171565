#!/usr/bin/env bash
# Installs the Debian packages kiln's build and test suite use.
# Idempotent: a second run only checks. Needs root (or sudo) on a Debian 12 machine.
set -euo pipefail

packages=(
  # image build
  mmdebstrap debootstrap squashfs-tools xorriso mtools dosfstools e2fsprogs cpio zstd
  grub-pc-bin grub-efi-amd64-bin grub-common systemd-boot-efi gdisk busybox-static
  kmod binutils
  # virtual lab
  qemu-system-x86 qemu-utils ovmf seabios ipxe-qemu ipxe iproute2
  # BMC and netboot peers
  openipmi ipmitool dnsmasq tftp-hpa curl isc-dhcp-client
  # the virtual rack's BMCs make PXE one-time over QMP (lab/src/ipmi_sim.rs); benches/fleet.sh
  python3 bc time
  # benchmark peers (benches/netboot.sh, benches/build.sh); benches/install.sh builds
  # coreos-installer from its crate, which links these
  nginx mkosi libzstd-dev libssl-dev liblzma-dev pkg-config
  # misc
  ca-certificates python3-venv jq
  # node agent tests (systemctl --root, useradd --root)
  systemd passwd
  # the appliance's Kubernetes node runtime, run for real by tests/kubernetes_node.rs
  containerd runc containernetworking-plugins catatonit iptables conntrack
  # a site's registry mirror, pulled through by a worker in tests/kubernetes_node.rs
  docker-registry
  # disk safety tests: real signatures made by the real tools (and libblkid to read them)
  util-linux cryptsetup-bin xfsprogs btrfs-progs bcache-tools ntfs-3g ceph-osd
  # the native Ceph node, run for real by tests/ceph_node.rs (ceph-volume needs udevadm;
  # QEMU opens RBD images through qemu-block-extra)
  ceph-mon ceph-mgr udev qemu-block-extra
  # the fleet web view, driven in headless Chromium by tests/fleet_web.rs; promtool checks
  # every /metrics output and the Grafana dashboard's queries (tests/metrics_check.rs)
  chromium chromium-driver prometheus
)

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "kiln: installing Debian packages: ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # The peers' own services are not wanted: tests and benches start them when they need them.
  "${sudo_cmd[@]}" systemctl disable --now dnsmasq nginx containerd docker-registry ceph.target prometheus prometheus-node-exporter >/dev/null 2>&1 || true
fi
