//! Network root for stage-1: a DHCP lease on the first Ethernet interface that gets one, then
//! one HTTP/1.0 GET of the squashfs into a tmpfs. The Debian kernel has no IP autoconfiguration
//! (`CONFIG_IP_PNP` is unset), so stage-1 speaks DHCP itself. The URL's host must be an IP
//! address: there is no resolver this early.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use super::{Stage1Error, say};

/// An address lease: what the interface is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub server: Ipv4Addr,
}

fn fetch_err(msg: impl Into<String>) -> Stage1Error {
    Stage1Error::Fetch(msg.into())
}

/// `http://HOST[:PORT]/PATH` → (socket address, path). HOST must be an IPv4 address.
pub fn parse_http_url(url: &str) -> Result<(SocketAddr, String), Stage1Error> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| fetch_err(format!("{url}: only http:// is supported")))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| fetch_err(format!("{url}: bad port {p:?}")))?,
        ),
        None => (hostport, 80),
    };
    let ip: Ipv4Addr = host.parse().map_err(|_| {
        fetch_err(format!(
            "{url}: the host must be an IPv4 address, not {host:?}"
        ))
    })?;
    Ok((
        SocketAddr::V4(SocketAddrV4::new(ip, port)),
        path.to_string(),
    ))
}

/// Status code and `Content-Length` of an HTTP response head (the lines before the blank one).
pub fn parse_response_head(head: &str) -> Result<(u16, Option<u64>), Stage1Error> {
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or("");
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| fetch_err(format!("not an HTTP response: {status_line:?}")))?;
    let length = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    });
    Ok((code, length))
}

/// DHCPDISCOVER asking for a broadcast reply (the interface has no address yet).
pub fn discover(xid: u32, mac: &[u8; 6]) -> Message {
    let mut m = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        mac,
    );
    m.set_flags(Flags::default().set_broadcast());
    m.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Discover));
    m.opts_mut().insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
    ]));
    m
}

/// DHCPREQUEST for the address in `offer`.
pub fn request(xid: u32, mac: &[u8; 6], offer: &Message) -> Result<Message, Stage1Error> {
    let server = match offer.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ => return Err(fetch_err("DHCP offer without a server identifier")),
    };
    let mut m = discover(xid, mac);
    m.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Request));
    m.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
    m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
    Ok(m)
}

/// The lease an ACK grants.
pub fn lease_from_ack(ack: &Message) -> Result<Lease, Stage1Error> {
    let opts = ack.opts();
    let netmask = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(m)) => *m,
        _ => Ipv4Addr::new(255, 255, 255, 0),
    };
    let router = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    };
    let server = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ => ack.siaddr(),
    };
    if ack.yiaddr().is_unspecified() {
        return Err(fetch_err("DHCP ACK without an address"));
    }
    Ok(Lease {
        address: ack.yiaddr(),
        netmask,
        router,
        server,
    })
}

/// Fetches `url` into `dest` after configuring the network.
/// Fetches the root image to `dest` and checks it against `sha256` (hex) while it streams;
/// on a mismatch the file is removed and the error names both digests.
pub(super) fn fetch_root(url: &str, sha256: &str, dest: &Path) -> Result<(), Stage1Error> {
    let (addr, path) = parse_http_url(url)?;
    ifconfig::up("lo").map_err(|e| fetch_err(format!("bringing up lo: {e}")))?;
    let start = Instant::now();
    let (iface, lease) = loop {
        if let Some(found) = ethernet_interfaces()
            .into_iter()
            .find_map(|(name, mac)| dhcp(&name, &mac).ok().map(|l| (name, l)))
        {
            break found;
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(Stage1Error::Timeout {
                what: "a DHCP lease on any Ethernet interface".into(),
                secs: 120,
            });
        }
    };
    say(&format!(
        "{iface}: address {} netmask {} router {}",
        lease.address,
        lease.netmask,
        lease.router.map_or("none".into(), |r| r.to_string())
    ));
    ifconfig::configure(&iface, &lease)
        .map_err(|e| fetch_err(format!("configuring {iface}: {e}")))?;
    say(&format!("fetching {url}"));
    // Through a provisioner restart or a network hiccup: only the server's "no" is final.
    let start = Instant::now();
    let mut pause = Duration::from_secs(1);
    let actual = loop {
        match http_get(addr, &path, dest) {
            Ok(digest) => break digest,
            Err(Fetch::Transient(e)) if start.elapsed() + pause < crate::FETCH_PATIENCE => {
                say(&format!("{e}; trying again in {}s", pause.as_secs()));
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(15));
            }
            Err(Fetch::Transient(e) | Fetch::Final(e)) => return Err(e),
        }
    };
    if !actual.eq_ignore_ascii_case(sha256) {
        let _ = std::fs::remove_file(dest);
        return Err(Stage1Error::Digest {
            url: url.to_string(),
            expected: sha256.to_string(),
            actual,
        });
    }
    say(&format!("verified sha256 {actual}"));
    Ok(())
}

/// Ethernet interfaces as (name, MAC), from sysfs.
fn ethernet_interfaces() -> Vec<(String, [u8; 6])> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let read = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
        if read("type").trim() != "1" {
            continue;
        }
        let bytes: Vec<u8> = read("address")
            .trim()
            .split(':')
            .filter_map(|b| u8::from_str_radix(b, 16).ok())
            .collect();
        if let Ok(mac) = <[u8; 6]>::try_from(bytes) {
            out.push((name, mac));
        }
    }
    out.sort();
    out
}

/// One DHCP exchange on `iface` (DISCOVER → OFFER → REQUEST → ACK), a few tries.
fn dhcp(iface: &str, mac: &[u8; 6]) -> Result<Lease, Stage1Error> {
    ifconfig::up(iface).map_err(|e| fetch_err(format!("bringing up {iface}: {e}")))?;
    let sock = ifconfig::dhcp_socket(iface)
        .map_err(|e| fetch_err(format!("DHCP socket on {iface}: {e}")))?;
    let server = SocketAddr::from((Ipv4Addr::BROADCAST, 67));
    let xid = std::process::id() ^ u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]);
    for attempt in 0..4u32 {
        let offer = exchange(
            &sock,
            server,
            &discover(xid, mac),
            xid,
            MessageType::Offer,
            attempt,
        )?;
        let Some(offer) = offer else { continue };
        let ack = exchange(
            &sock,
            server,
            &request(xid, mac, &offer)?,
            xid,
            MessageType::Ack,
            attempt,
        )?;
        if let Some(ack) = ack {
            return lease_from_ack(&ack);
        }
    }
    Err(fetch_err(format!("no DHCP answer on {iface}")))
}

fn exchange(
    sock: &UdpSocket,
    server: SocketAddr,
    msg: &Message,
    xid: u32,
    want: MessageType,
    attempt: u32,
) -> Result<Option<Message>, Stage1Error> {
    let mut buf = Vec::new();
    msg.encode(&mut Encoder::new(&mut buf))
        .map_err(|e| fetch_err(format!("encoding DHCP: {e}")))?;
    sock.send_to(&buf, server)
        .map_err(|e| fetch_err(format!("sending DHCP: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(2 + u64::from(attempt) * 2);
    let mut rx = [0u8; 1500];
    while Instant::now() < deadline {
        let n = match sock.recv(&mut rx) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(fetch_err(format!("receiving DHCP: {e}"))),
        };
        // Anything that is not our answer (other clients' traffic, garbage) is skipped.
        if let Ok(reply) = Message::decode(&mut Decoder::new(&rx[..n]))
            && reply.xid() == xid
            && reply.opts().has_msg_type(want)
        {
            return Ok(Some(reply));
        }
    }
    Ok(None)
}

/// GET into `dest`; returns the body's sha256 (hex).
/// A failed download: worth another try, or not.
enum Fetch {
    Transient(Stage1Error),
    Final(Stage1Error),
}

fn http_get(addr: SocketAddr, path: &str, dest: &Path) -> Result<String, Fetch> {
    use sha2::Digest;
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| Fetch::Transient(fetch_err(format!("{what}: {e}")))
    };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(30))
        .map_err(io(&format!("connecting to {addr}")))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io("setting a timeout"))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: kiln-stage1\r\n\r\n"
    )
    .map_err(io("sending the request"))?;
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader
            .read_line(&mut line)
            .map_err(io("reading the response"))?
            == 0
        {
            return Err(Fetch::Transient(fetch_err(
                "the server closed the connection before the body",
            )));
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        head.push_str(&line);
    }
    let (code, length) = parse_response_head(&head).map_err(Fetch::Final)?;
    if code != 200 {
        let e = fetch_err(format!("http://{addr}{path}: HTTP status {code}"));
        return Err(if code >= 500 {
            Fetch::Transient(e)
        } else {
            Fetch::Final(e)
        });
    }
    let mut file = std::fs::File::create(dest)
        .map_err(|e| Fetch::Final(fetch_err(format!("creating {}: {e}", dest.display()))))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut hasher = sha2::Sha256::new();
    let mut total = 0u64;
    let mut next_report = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(io("reading the body"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .map_err(|e| Fetch::Final(fetch_err(format!("writing {}: {e}", dest.display()))))?;
        total += n as u64;
        if total >= next_report {
            say(&format!("fetched {} MiB", total >> 20));
            next_report += 32 << 20;
        }
    }
    if let Some(len) = length
        && len != total
    {
        return Err(Fetch::Transient(fetch_err(format!(
            "got {total} of {len} bytes"
        ))));
    }
    say(&format!("fetched {} MiB, done", total >> 20));
    Ok(hex::encode(hasher.finalize()))
}

/// Interface configuration through the classic socket ioctls (no netlink library needed for
/// one address and one route).
#[allow(unsafe_code)]
mod ifconfig {
    use std::net::{Ipv4Addr, UdpSocket};
    use std::os::fd::{AsRawFd, OwnedFd};

    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};

    use super::Lease;

    fn control_socket() -> nix::Result<OwnedFd> {
        socket::socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
    }

    fn ifreq(name: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        req
    }

    fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in and sockaddr have the same size; this is how the API is used.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
    }

    fn ioctl(fd: &OwnedFd, req: libc::Ioctl, arg: *mut libc::c_void) -> std::io::Result<()> {
        // SAFETY: every caller passes a pointer to the struct the request expects, alive for
        // the duration of the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn up(name: &str) -> std::io::Result<()> {
        let fd = control_socket()?;
        let mut req = ifreq(name);
        ioctl(&fd, libc::SIOCGIFFLAGS, (&raw mut req).cast())?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        ioctl(&fd, libc::SIOCSIFFLAGS, (&raw mut req).cast())
    }

    pub fn configure(name: &str, lease: &Lease) -> std::io::Result<()> {
        let fd = control_socket()?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_addr = sockaddr(lease.address);
        ioctl(&fd, libc::SIOCSIFADDR, (&raw mut req).cast())?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_netmask = sockaddr(lease.netmask);
        ioctl(&fd, libc::SIOCSIFNETMASK, (&raw mut req).cast())?;
        if let Some(router) = lease.router {
            // SAFETY: rtentry is plain old data; all-zero is a valid value.
            let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
            rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
            rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
            rt.rt_gateway = sockaddr(router);
            rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
            ioctl(&fd, libc::SIOCADDRT, (&raw mut rt).cast())?;
        }
        Ok(())
    }

    /// A UDP socket on port 68 bound to `name`, able to broadcast before it has an address.
    pub fn dhcp_socket(name: &str) -> std::io::Result<UdpSocket> {
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket::setsockopt(&fd, sockopt::Broadcast, &true)?;
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        socket::setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(name))?;
        socket::bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, 68))?;
        let sock = UdpSocket::from(fd);
        sock.set_read_timeout(Some(std::time::Duration::from_millis(500)))?;
        Ok(sock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls() {
        let (a, p) = parse_http_url("http://10.0.2.2:8080/pxe/rootfs.squashfs").unwrap();
        assert_eq!(
            (a.to_string().as_str(), p.as_str()),
            ("10.0.2.2:8080", "/pxe/rootfs.squashfs")
        );
        let (a, p) = parse_http_url("http://192.168.1.1").unwrap();
        assert_eq!(
            (a.to_string().as_str(), p.as_str()),
            ("192.168.1.1:80", "/")
        );
        assert!(
            parse_http_url("http://boot.example/x")
                .unwrap_err()
                .to_string()
                .contains("IPv4")
        );
        assert!(parse_http_url("http://1.2.3.4:99999/x").is_err());
        assert!(parse_http_url("ftp://1.2.3.4/x").is_err());
    }

    #[test]
    fn response_heads() {
        assert_eq!(
            parse_response_head("HTTP/1.1 200 OK\r\nServer: x\r\ncontent-length: 1234\r\n")
                .unwrap(),
            (200, Some(1234))
        );
        assert_eq!(
            parse_response_head("HTTP/1.0 404 Not Found\r\n").unwrap(),
            (404, None)
        );
        assert!(parse_response_head("SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_response_head("").is_err());
    }

    #[test]
    fn dhcp_exchange_messages() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let d = discover(7, &mac);
        assert!(d.flags().broadcast());
        assert!(d.opts().has_msg_type(MessageType::Discover));
        assert_eq!(d.chaddr(), &mac);

        let mut offer = Message::new_with_id(
            7,
            Ipv4Addr::UNSPECIFIED,
            [10, 0, 2, 15].into(),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        offer
            .opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Offer));
        assert!(
            request(7, &mac, &offer).is_err(),
            "an offer without a server id is refused"
        );
        offer
            .opts_mut()
            .insert(DhcpOption::ServerIdentifier([10, 0, 2, 2].into()));
        let r = request(7, &mac, &offer).unwrap();
        assert!(r.opts().has_msg_type(MessageType::Request));
        assert!(matches!(r.opts().get(OptionCode::RequestedIpAddress),
            Some(DhcpOption::RequestedIpAddress(a)) if *a == Ipv4Addr::new(10, 0, 2, 15)));

        let mut ack = offer.clone();
        ack.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Ack));
        ack.opts_mut()
            .insert(DhcpOption::SubnetMask([255, 255, 255, 0].into()));
        ack.opts_mut()
            .insert(DhcpOption::Router(vec![[10, 0, 2, 2].into()]));
        assert_eq!(
            lease_from_ack(&ack).unwrap(),
            Lease {
                address: [10, 0, 2, 15].into(),
                netmask: [255, 255, 255, 0].into(),
                router: Some([10, 0, 2, 2].into()),
                server: [10, 0, 2, 2].into(),
            }
        );
        // Round trip through the wire format.
        let mut buf = Vec::new();
        ack.encode(&mut Encoder::new(&mut buf)).unwrap();
        let back = Message::decode(&mut Decoder::new(&buf)).unwrap();
        assert_eq!(
            lease_from_ack(&back).unwrap().address,
            Ipv4Addr::new(10, 0, 2, 15)
        );
    }
}
