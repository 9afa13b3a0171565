#!/usr/bin/env bash
# Netboot benchmarks, kiln against the usual peers, same client, same files, same run:
#   TFTP: one 30 MB download with curl (blksize 512, 1468 and 8192) vs dnsmasq's TFTP server,
#         and a rack booting: 500 downloads of the iPXE loader, 50 at a time
#   HTTP: 50 concurrent curl downloads of a 32 MB initrd vs nginx serving the same directory
#   DHCP: full DORA transactions per second (a load client with 64 in flight) vs dnsmasq
# Everything runs in two network namespaces joined by a veth; medians of 3 runs; ratios are
# kiln / peer (above 1: kiln is faster). Not a CI gate. Needs root. KILN_BIN=PATH skips the
# release build and measures that binary.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

for tool in dnsmasq nginx curl python3 ip; do
  command -v "$tool" >/dev/null || { echo "bench: $tool missing (scripts/install-deps.sh)" >&2; exit 1; }
done
kiln=$(release_kiln)

srv="kbsrv$$"
cli="kbcli$$"
work=$(mktemp -d)
chmod 755 "$work"  # nginx workers run as nobody and must read the files
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$srv" 2>/dev/null || true
  ip netns del "$cli" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$srv"
ip netns add "$cli"
ip -n "$srv" link set lo up
ip -n "$cli" link set lo up
ip -n "$srv" link add br0 type bridge stp_state 0 forward_delay 0
ip -n "$srv" addr add 10.44.0.1/16 dev br0
ip -n "$srv" link set br0 up
ip -n "$srv" link add vs type veth peer name eth0 netns "$cli"
ip -n "$srv" link set vs master br0 up
ip -n "$cli" addr add 10.44.0.2/16 dev eth0
ip -n "$cli" link set eth0 up
in_srv() { ip netns exec "$srv" "$@"; }
in_cli() { ip netns exec "$cli" "$@"; }

files="$work/files"
mkdir -p "$files"
head -c $((30 * 1024 * 1024)) /dev/urandom > "$files/big.bin"
head -c $((32 * 1024 * 1024)) /dev/urandom > "$files/initrd.img"
cp /usr/lib/ipxe/undionly.kpxe /usr/lib/ipxe/snponly.efi "$files/"
cp "$files/snponly.efi" "$files/ipxe.efi"
cat > "$work/fleet.yaml" <<EOF
apiVersion: kiln.dev/v1alpha1
kind: Inventory
spec:
  nodes:
    - name: bench-01
      bootMACs: ["02:00:00:00:00:01"]
EOF

# `kiln pxe serve` serves each node its config from a spec and checks the files against a build
# manifest; the benchmark serves plain files, so both are minimal.
bench_spec > "$work/spec.yaml"
artifact() { jq -nc --arg p "$1" --arg s "$(sha256sum < "$2" | cut -d' ' -f1)" --argjson n "$(stat -c %s "$2")" '{path: $p, size: $n, sha256: $s}'; }
jq -n --argjson a "[$(artifact pxe/vmlinuz "$files/snponly.efi"),$(artifact pxe/initrd.img "$files/initrd.img"),$(artifact pxe/rootfs.squashfs "$files/big.bin")]" \
  '{kiln_version: "bench", spec_sha256: "", suite: "", mirror: "", kernel: "", kernel_args: [],
    rootfs_cache_key: "", packages: [], artifacts: $a}' > "$work/manifest.json"

now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -g | sed -n 2p; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }

# `ip netns exec` execs the server: $! is the server itself.
start_srv() { ip netns exec "$srv" "$@" >"$work/bg.log" 2>&1 & bg=$!; pids+=("$bg"); }
stop_bg() { kill -TERM "$bg"; wait "$bg" 2>/dev/null || true; }
wait_port() {  # wait_port PROTO PORT
  for _ in $(seq 100); do
    if in_srv ss -lnH "$1" "sport = :$2" | grep -q .; then return 0; fi
    sleep 0.1
  done
  echo "bench: nothing listening on $1 port $2" >&2; cat "$work/bg.log" >&2; exit 1
}
start_kiln() {
  start_srv "$kiln" pxe serve --interface br0 --artifacts "$files" --ipxe-dir "$files" \
    --inventory "$work/fleet.yaml" --spec "$work/spec.yaml" --manifest "$work/manifest.json" \
    --state "$work/state-$1" --unknown-macs discovery --mode "$@"
  wait_port -t 8080
}

# --- TFTP -------------------------------------------------------------------------------
tftp_run() {  # blksize -> seconds
  local t0 t1
  t0=$(now)
  in_cli curl -fsS --tftp-blksize "$1" -o "$work/tftp.out" tftp://10.44.0.1/big.bin
  t1=$(now)
  cmp -s "$work/tftp.out" "$files/big.bin" || { echo "bench: TFTP download differs" >&2; exit 1; }
  python3 -c "print($t1 - $t0)"
}
tftp_rack_run() {  # -> seconds for 500 downloads of undionly.kpxe, 50 in flight
  local t0 t1
  t0=$(now)
  seq 500 | in_cli xargs -P 50 -I{} curl -fsS --tftp-blksize 1468 -o /dev/null tftp://10.44.0.1/undionly.kpxe
  t1=$(now)
  python3 -c "print($t1 - $t0)"
}
# CPU seconds (user + system) the server process has used so far.
srv_cpu() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$bg/stat"; }
# The rack figure's clients are 50 curl processes on the same two cores as the server, so the
# wall-clock rate is bounded by process start-up: the server's CPU per download tells the
# servers apart where the rate cannot.
tftp_rack_measure() {  # -> rack_secs: median of three rack runs; rack_cpu_ms: per download
  local c0 c1
  c0=$(srv_cpu)
  rack_secs=$(median "$(tftp_rack_run)" "$(tftp_rack_run)" "$(tftp_rack_run)")
  c1=$(srv_cpu)
  rack_cpu_ms=$(python3 -c "print(f'{($c1 - $c0) * 1000 / 1500:.3f}')")
}
declare -A tftp_kiln tftp_dnsmasq
tftp_sizes="512 1468 8192"
start_kiln proxy
for b in $tftp_sizes; do tftp_kiln[$b]=$(median "$(tftp_run $b)" "$(tftp_run $b)" "$(tftp_run $b)"); done
tftp_rack_measure
tftp_rack_kiln=$rack_secs tftp_rack_cpu_kiln=$rack_cpu_ms
stop_bg
start_srv dnsmasq --no-daemon --conf-file=/dev/null --port=0 --user=root --interface=br0 \
  --bind-interfaces --enable-tftp --tftp-root="$files" --pid-file=
wait_port -u 69
for b in $tftp_sizes; do tftp_dnsmasq[$b]=$(median "$(tftp_run $b)" "$(tftp_run $b)" "$(tftp_run $b)"); done
tftp_rack_measure
tftp_rack_dnsmasq=$rack_secs tftp_rack_cpu_dnsmasq=$rack_cpu_ms
stop_bg

# --- HTTP -------------------------------------------------------------------------------
http_run() {  # url -> seconds for 50 concurrent downloads
  local t0 t1
  t0=$(now)
  seq 50 | in_cli xargs -P 50 -I{} curl -fsS -o /dev/null "$1"
  t1=$(now)
  python3 -c "print($t1 - $t0)"
}
start_kiln proxy
http_kiln=$(median "$(http_run http://10.44.0.1:8080/artifacts/initrd.img)" \
  "$(http_run http://10.44.0.1:8080/artifacts/initrd.img)" "$(http_run http://10.44.0.1:8080/artifacts/initrd.img)")
stop_bg
cat > "$work/nginx.conf" <<EOF
daemon off;
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  server { listen 10.44.0.1:8081; root $files; }
}
EOF
start_srv nginx -c "$work/nginx.conf" -p "$work"
wait_port -t 8081
http_nginx=$(median "$(http_run http://10.44.0.1:8081/initrd.img)" \
  "$(http_run http://10.44.0.1:8081/initrd.img)" "$(http_run http://10.44.0.1:8081/initrd.img)")
stop_bg

# --- DHCP -------------------------------------------------------------------------------
cat > "$work/dora.py" <<'EOF'
"""DHCP load client: N distinct MACs each do DISCOVER/OFFER/REQUEST/ACK, W in flight,
retransmitting after 1 s. Prints completed transactions per second."""
import random, socket, struct, sys, time

N, W = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
s.bind(("0.0.0.0", 68))
s.setblocking(False)
base = random.randrange(1 << 20)

def packet(i, kind, requested=None, server=None):
    mac = struct.pack("!HI", 0x0200, base + i)
    head = struct.pack("!BBBBIHH4s4s4s4s", 1, 1, 6, 0, base + i, 0, 0x8000,
                       b"\0" * 4, b"\0" * 4, b"\0" * 4, b"\0" * 4)
    opts = bytes([53, 1, kind])
    if requested:
        opts += bytes([50, 4]) + requested + bytes([54, 4]) + server
    return head + mac + b"\0" * 10 + b"\0" * 192 + b"\x63\x82\x53\x63" + opts + b"\xff"

def options(p):
    out, i = {}, 240
    while i < len(p) and p[i] != 255:
        if p[i] == 0:
            i += 1
            continue
        out[p[i]] = p[i + 2:i + 2 + p[i + 1]]
        i += 2 + p[i + 1]
    return out

state, sent, done, nxt = {}, {}, 0, 0
start = time.time()
while done < N:
    while nxt < N and len(state) < W:
        state[nxt] = None
        sent[nxt] = 0
        nxt += 1
    now = time.time()
    for i, st in list(state.items()):
        if now - sent[i] > 1.0:
            s.sendto(packet(i, 1) if st is None else packet(i, 3, *st), ("255.255.255.255", 67))
            sent[i] = now
    try:
        p = s.recv(2048)
    except BlockingIOError:
        time.sleep(0.0005)
        continue
    if len(p) < 240 or p[0] != 2:
        continue
    i = struct.unpack("!I", p[4:8])[0] - base
    if i not in state:
        continue
    kind = options(p).get(53, b"\0")[0]
    if kind == 2 and state[i] is None:
        state[i] = (p[16:20], options(p)[54])
        s.sendto(packet(i, 3, *state[i]), ("255.255.255.255", 67))
        sent[i] = time.time()
    elif kind == 5 and state[i] is not None:
        del state[i]
        done += 1
    elif kind == 6:  # NAK: start over, as a real client does
        state[i] = None
        sent[i] = 0
print(f"{N / (time.time() - start):.1f}")
EOF
dhcp_run() { in_cli python3 "$work/dora.py" 2000 64; }
start_kiln dhcp --pool-start 10.44.1.1 --pool-end 10.44.200.254
dhcp_kiln=$(median "$(dhcp_run)" "$(dhcp_run)" "$(dhcp_run)")
stop_bg
start_srv dnsmasq --no-daemon --conf-file=/dev/null --port=0 --user=root --interface=br0 \
  --bind-interfaces --dhcp-range=10.44.1.1,10.44.200.254,255.255.0.0,1h --no-ping \
  --dhcp-lease-max=100000 --dhcp-leasefile="$work/dnsmasq.leases" --pid-file= --quiet-dhcp
wait_port -u 67
dhcp_dnsmasq=$(median "$(dhcp_run)" "$(dhcp_run)" "$(dhcp_run)")
stop_bg

mbps() { python3 -c "print(f'{$1 / 1048576 / $2:.1f}')"; }
echo
echo "netboot benchmarks (medians of 3; ratio = kiln / peer, above 1 = kiln faster)"
for b in $tftp_sizes; do
  k=$(mbps $((30 * 1048576)) "${tftp_kiln[$b]}")
  d=$(mbps $((30 * 1048576)) "${tftp_dnsmasq[$b]}")
  printf 'TFTP 30 MB, blksize %-5s kiln %7s MB/s   dnsmasq %7s MB/s   ratio %s\n' "$b" "$k" "$d" "$(ratio "$k" "$d")"
  record "TFTP 30 MB, blksize $b" MB/s higher "$k" dnsmasq "$d" 1.0
done
k=$(python3 -c "print(f'{500 / $tftp_rack_kiln:.1f}')")
d=$(python3 -c "print(f'{500 / $tftp_rack_dnsmasq:.1f}')")
printf 'TFTP iPXE loader, 50 at once kiln %7s /s     dnsmasq %7s /s     ratio %s\n' "$k" "$d" "$(ratio "$k" "$d")"
record "TFTP iPXE loader downloads, 50 at once" downloads/s higher "$k" dnsmasq "$d" 1.0
printf 'TFTP iPXE loader, server CPU kiln %7s ms/dl  dnsmasq %7s ms/dl  ratio %s (lower = kiln cheaper)\n' \
  "$tftp_rack_cpu_kiln" "$tftp_rack_cpu_dnsmasq" "$(ratio "$tftp_rack_cpu_kiln" "$tftp_rack_cpu_dnsmasq")"
record "TFTP iPXE loader, server CPU per download" ms lower "$tftp_rack_cpu_kiln" dnsmasq "$tftp_rack_cpu_dnsmasq" 1.0
k=$(mbps $((50 * 32 * 1048576)) "$http_kiln")
n=$(mbps $((50 * 32 * 1048576)) "$http_nginx")
printf 'HTTP 50 x 32 MB concurrent   kiln %7s MB/s   nginx   %7s MB/s   ratio %s\n' "$k" "$n" "$(ratio "$k" "$n")"
record "HTTP 50 concurrent 32 MB downloads" MB/s higher "$k" nginx "$n" 1.0
printf 'DHCP DORA, 2000 clients      kiln %7s tx/s   dnsmasq %7s tx/s   ratio %s\n' "$dhcp_kiln" "$dhcp_dnsmasq" "$(ratio "$dhcp_kiln" "$dhcp_dnsmasq")"
record "DHCP DORA transactions, 2000 clients" tx/s higher "$dhcp_kiln" dnsmasq "$dhcp_dnsmasq" 1.0
