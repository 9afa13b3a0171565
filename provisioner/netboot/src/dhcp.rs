//! DHCP for netboot: proxyDHCP (boot information only, next to an existing DHCP server) and
//! authoritative (addresses from a pool too). dhcproto does the wire format; the decisions
//! below are pure functions of the request, the backend's answer and the pool.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use kiln_spec::inventory::{NetbootMode, format_mac};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Decision};
use crate::leases::{self, LeasePool};
use crate::trace::{EventKind, Trace};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// PXE boot server port: proxyDHCP requests after the client has its address.
pub const PXE_PORT: u16 = 4011;

/// Where boot files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSettings {
    pub server_ip: Ipv4Addr,
    /// `http://10.0.0.1:8080`, no trailing slash.
    pub http_base: String,
    /// iPXE for BIOS PXE ROMs (TFTP), e.g. `undionly.kpxe`.
    pub bios_file: String,
    /// iPXE for x86-64 UEFI (TFTP, or HTTP for UEFI HTTP boot), e.g. `ipxe.efi`.
    pub efi_file: String,
}

/// Network parameters the authoritative server hands out with an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressSettings {
    pub subnet_mask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSettings {
    pub mode: NetbootMode,
    pub boot: BootSettings,
    pub addressing: AddressSettings,
}

/// What the request says about the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub mac: [u8; 6],
    pub message: MessageType,
    /// RFC 4578 option 93.
    pub arch: Option<u16>,
    /// Vendor class `PXEClient…` or `HTTPClient…` (firmware netboot).
    pub pxe: bool,
    /// iPXE itself (user class "iPXE" or option 175): it gets the HTTP script.
    pub ipxe: bool,
}

/// Reads the fields the decisions need. `None` for anything that is not an Ethernet
/// BOOTREQUEST with a message type.
pub fn classify(msg: &Message) -> Option<Client> {
    if msg.opcode() != Opcode::BootRequest || msg.hlen() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(msg.chaddr());
    let message = msg.opts().msg_type()?;
    let arch = match msg.opts().get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => Some(u16::from(*a)),
        _ => None,
    };
    let pxe = matches!(
        msg.opts().get(OptionCode::ClassIdentifier),
        Some(DhcpOption::ClassIdentifier(v)) if v.starts_with(b"PXEClient") || v.starts_with(b"HTTPClient")
    );
    let user_class_ipxe = matches!(
        msg.opts().get(OptionCode::UserClass),
        Some(DhcpOption::UserClass(v)) if user_classes(v).any(|c| c == b"iPXE")
    );
    let ipxe = user_class_ipxe || msg.opts().get(OptionCode::Unknown(175)).is_some();
    Some(Client {
        mac,
        message,
        arch,
        pxe,
        ipxe,
    })
}

/// RFC 3004 user classes are length-prefixed; iPXE also sends the bare string "iPXE".
fn user_classes(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut list = Vec::new();
    let mut rest = v;
    while let [len, tail @ ..] = rest {
        let len = usize::from(*len);
        if len == 0 || len > tail.len() {
            list.clear();
            break;
        }
        list.push(&tail[..len]);
        rest = &tail[len..];
    }
    if list.is_empty() {
        list.push(v);
    }
    list.into_iter()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootFile {
    /// A file name on this server's TFTP service.
    Tftp(String),
    /// A full URL (iPXE script, or iPXE itself for UEFI HTTP boot).
    Http { url: String, http_client: bool },
}

impl BootFile {
    pub fn name(&self) -> &str {
        match self {
            BootFile::Tftp(f) => f,
            BootFile::Http { url, .. } => url,
        }
    }
}

/// The URL of the per-MAC iPXE script.
pub fn script_url(http_base: &str, mac: &[u8; 6]) -> String {
    format!(
        "{http_base}/boot/{}/boot.ipxe",
        format_mac(mac).replace(':', "-")
    )
}

/// Chooses the boot file: iPXE gets its script over HTTP (so it does not chain-load itself
/// again), firmware gets the iPXE build for its architecture. `Ok(None)`: not a netboot client
/// (it may still get an address). `Err`: a netboot client this server cannot serve.
pub fn boot_file(client: &Client, boot: &BootSettings) -> Result<Option<BootFile>, String> {
    if client.ipxe {
        return Ok(Some(BootFile::Http {
            url: script_url(&boot.http_base, &client.mac),
            http_client: false,
        }));
    }
    if !client.pxe {
        return Ok(None);
    }
    match client.arch.unwrap_or(0) {
        0 => Ok(Some(BootFile::Tftp(boot.bios_file.clone()))),
        7 | 9 => Ok(Some(BootFile::Tftp(boot.efi_file.clone()))),
        16 => Ok(Some(BootFile::Http {
            url: format!("{}/ipxe/{}", boot.http_base, boot.efi_file),
            http_client: true,
        })),
        other => Err(format!(
            "client architecture {other} ({}) has no iPXE build here",
            crate::trace::arch_name(other)
        )),
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Reply {
        msg: Box<Message>,
        to: SocketAddrV4,
        boot_file: Option<String>,
    },
    /// Not for this server (another server's transaction, a non-PXE client in proxy mode).
    Silent,
    /// A client this server chose not to answer, with the reason (shown in the trace).
    Ignored(String),
}

/// Answers one decoded request that arrived on `port` from `src`. `pool` is the authoritative
/// server's pool (`None` in proxy mode); `now` is in Unix seconds. The bool says whether the
/// pool's bound leases changed (to persist them).
pub fn handle(
    settings: &DhcpSettings,
    backend: &dyn Backend,
    pool: Option<&mut LeasePool>,
    msg: &Message,
    port: u16,
    src: SocketAddrV4,
    now: u64,
) -> (Outcome, bool) {
    let Some(client) = classify(msg) else {
        return (Outcome::Silent, false);
    };
    let decision = backend.lookup(&client.mac);
    if decision == Decision::Ignore {
        return (
            Outcome::Ignored("MAC is not in the inventory (unknown-macs: ignore)".into()),
            false,
        );
    }
    let boot = match boot_file(&client, &settings.boot) {
        Ok(b) => b,
        Err(why) => return (Outcome::Ignored(why), false),
    };
    if port == PXE_PORT {
        // Boot-server request (after a proxy offer): boot information, no address.
        return match (client.message, boot) {
            (MessageType::Request | MessageType::Inform, Some(b)) => {
                let mut reply = base_reply(msg, &client, MessageType::Ack, settings);
                add_boot(&mut reply, &b, settings);
                (
                    reply_to(reply, SocketAddrV4::new(*src.ip(), src.port()), Some(b)),
                    false,
                )
            }
            _ => (Outcome::Silent, false),
        };
    }
    match (settings.mode, pool) {
        (NetbootMode::Proxy, _) | (NetbootMode::Dhcp, None) => {
            let (MessageType::Discover, Some(b)) = (client.message, boot) else {
                return (Outcome::Silent, false);
            };
            let mut reply = base_reply(msg, &client, MessageType::Offer, settings);
            add_boot(&mut reply, &b, settings);
            (reply_to(reply, destination(msg, false), Some(b)), false)
        }
        (NetbootMode::Dhcp, Some(pool)) => authoritative(settings, pool, msg, &client, boot, now),
    }
}

fn authoritative(
    settings: &DhcpSettings,
    pool: &mut LeasePool,
    msg: &Message,
    client: &Client,
    boot: Option<BootFile>,
    now: u64,
) -> (Outcome, bool) {
    let requested = match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    match client.message {
        MessageType::Discover => match pool.offer(&client.mac, requested, now) {
            Ok(ip) => {
                let mut reply = base_reply(msg, client, MessageType::Offer, settings);
                reply.set_yiaddr(ip);
                add_lease_options(&mut reply, settings, Some(pool.lease_secs()));
                if let Some(b) = &boot {
                    add_boot(&mut reply, b, settings);
                }
                // Offers are transient: nothing to persist yet.
                (reply_to(reply, destination(msg, false), boot), false)
            }
            Err(e) => (Outcome::Ignored(e.to_string()), false),
        },
        MessageType::Request => {
            if server_id.is_some_and(|id| id != settings.boot.server_ip) {
                return (Outcome::Silent, false);
            }
            let Some(ip) =
                requested.or_else(|| Some(msg.ciaddr()).filter(|ip| !ip.is_unspecified()))
            else {
                return (Outcome::Ignored("request names no address".into()), false);
            };
            match pool.bind(&client.mac, ip, now) {
                Ok(_) => {
                    let mut reply = base_reply(msg, client, MessageType::Ack, settings);
                    reply.set_yiaddr(ip);
                    add_lease_options(&mut reply, settings, Some(pool.lease_secs()));
                    if let Some(b) = &boot {
                        add_boot(&mut reply, b, settings);
                    }
                    (reply_to(reply, destination(msg, false), boot), true)
                }
                Err(e) => {
                    let mut reply = base_reply(msg, client, MessageType::Nak, settings);
                    reply.opts_mut().insert(DhcpOption::Message(e.to_string()));
                    (reply_to(reply, destination(msg, true), None), false)
                }
            }
        }
        MessageType::Release => (Outcome::Silent, pool.release(&client.mac, msg.ciaddr())),
        MessageType::Decline => {
            if let Some(ip) = requested {
                pool.decline(&client.mac, ip, now);
                return (Outcome::Silent, true);
            }
            (Outcome::Silent, false)
        }
        MessageType::Inform => {
            let mut reply = base_reply(msg, client, MessageType::Ack, settings);
            add_lease_options(&mut reply, settings, None);
            if let Some(b) = &boot {
                add_boot(&mut reply, b, settings);
            }
            (reply_to(reply, destination(msg, false), boot), false)
        }
        _ => (Outcome::Silent, false),
    }
}

fn reply_to(msg: Message, to: SocketAddrV4, boot: Option<BootFile>) -> Outcome {
    Outcome::Reply {
        msg: Box::new(msg),
        to,
        boot_file: boot.map(|b| b.name().to_string()),
    }
}

/// RFC 2131 4.1: via the relay if any, unicast to a configured client, else broadcast (a
/// client without an address cannot answer ARP).
fn destination(req: &Message, nak: bool) -> SocketAddrV4 {
    if !req.giaddr().is_unspecified() {
        SocketAddrV4::new(req.giaddr(), SERVER_PORT)
    } else if !nak && !req.ciaddr().is_unspecified() {
        SocketAddrV4::new(req.ciaddr(), CLIENT_PORT)
    } else {
        SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT)
    }
}

fn base_reply(req: &Message, client: &Client, kind: MessageType, s: &DhcpSettings) -> Message {
    let mut m = Message::default();
    m.set_opcode(Opcode::BootReply)
        .set_htype(req.htype())
        .set_xid(req.xid())
        .set_flags(req.flags())
        .set_giaddr(req.giaddr())
        .set_chaddr(&client.mac);
    if kind != MessageType::Nak {
        m.set_siaddr(s.boot.server_ip);
    }
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ServerIdentifier(s.boot.server_ip));
    // PXE clients match replies on their machine UUID.
    if let Some(uuid @ DhcpOption::ClientMachineIdentifier(_)) =
        req.opts().get(OptionCode::ClientMachineIdentifier)
    {
        opts.insert(uuid.clone());
    }
    m
}

fn add_lease_options(m: &mut Message, s: &DhcpSettings, lease_secs: Option<u64>) {
    let opts = m.opts_mut();
    opts.insert(DhcpOption::SubnetMask(s.addressing.subnet_mask));
    if let Some(r) = s.addressing.router {
        opts.insert(DhcpOption::Router(vec![r]));
    }
    if !s.addressing.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(s.addressing.dns.clone()));
    }
    if let Some(secs) = lease_secs {
        let secs = u32::try_from(secs).unwrap_or(u32::MAX);
        opts.insert(DhcpOption::AddressLeaseTime(secs));
        opts.insert(DhcpOption::Renewal(secs / 2));
        opts.insert(DhcpOption::Rebinding(secs / 8 * 7));
    }
}

fn add_boot(m: &mut Message, boot: &BootFile, s: &DhcpSettings) {
    let (name, class) = match boot {
        BootFile::Tftp(f) => (f.as_str(), "PXEClient"),
        BootFile::Http { url, http_client } => (
            url.as_str(),
            if *http_client {
                "HTTPClient"
            } else {
                "PXEClient"
            },
        ),
    };
    // The legacy file field holds 127 bytes; option 67 carries longer names.
    if name.len() < 128 {
        m.set_fname_str(name);
    }
    let opts = m.opts_mut();
    opts.insert(DhcpOption::BootfileName(name.as_bytes().to_vec()));
    opts.insert(DhcpOption::ClassIdentifier(class.as_bytes().to_vec()));
    if matches!(boot, BootFile::Tftp(_)) {
        opts.insert(DhcpOption::TFTPServerName(
            s.boot.server_ip.to_string().into_bytes(),
        ));
    }
}

/// Decodes a datagram; errors are reasons, never panics.
pub fn decode(buf: &[u8]) -> Result<Message, String> {
    check_option_lengths(buf)?;
    Message::decode(&mut Decoder::new(buf)).map_err(|e| e.to_string())
}

/// Option lengths dhcproto 0.15 assumes rather than checks (a debug assertion or a
/// subtraction that overflows on a short option): such datagrams are refused before decoding.
/// dhcproto joins consecutive occurrences of an option into one (RFC 3396), so the length
/// checked is that of each run of occurrences.
fn check_option_lengths(buf: &[u8]) -> Result<(), String> {
    let check = |run: Option<(u8, usize)>| match run {
        Some((code, n)) => {
            let ok = match code {
                80 => n == 0,
                81 => n >= 3,
                94 => n == 3,
                151 => n >= 1,
                152..=155 => n == 4,
                _ => true,
            };
            if ok {
                Ok(())
            } else {
                Err(format!("option {code} has an invalid length {n}"))
            }
        }
        None => Ok(()),
    };
    // dhcproto reads options after the magic cookie whatever its value.
    let mut rest = buf.get(240..).unwrap_or(&[]);
    // The option being read and the length of its run so far.
    let mut run: Option<(u8, usize)> = None;
    while let [code, tail @ ..] = rest {
        match code {
            0 | 255 => {
                check(run.take())?;
                if *code == 255 {
                    break;
                }
                rest = tail;
            }
            _ => {
                let [len, tail @ ..] = tail else { break };
                let len = usize::from(*len);
                run = match run {
                    Some((c, n)) if c == *code => Some((c, n + len)),
                    other => {
                        check(other)?;
                        Some((*code, len))
                    }
                };
                rest = tail.get(len..).unwrap_or(&[]);
            }
        }
    }
    check(run)
}

fn message_name(t: MessageType) -> String {
    format!("{t:?}").to_ascii_lowercase()
}

/// The IO side: one task per listening socket, sharing the pool.
#[derive(Debug)]
pub struct DhcpServer {
    pub settings: DhcpSettings,
    pub backend: Arc<dyn Backend>,
    /// `Some` in authoritative mode.
    pub pool: Option<Mutex<LeasePool>>,
    pub state_dir: PathBuf,
    pub trace: Arc<Trace>,
}

impl DhcpServer {
    pub async fn serve(self: Arc<Self>, socket: UdpSocket, port: u16, shutdown: CancellationToken) {
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, src) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("dhcp: receiving: {e}");
                        continue;
                    }
                },
            };
            let SocketAddr::V4(src) = src else { continue };
            let datagram = &buf[..n];
            // A bug in one request's handling must not take the service down with it.
            let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                decode(datagram).map(|msg| self.answer(&msg, port, src))
            }));
            let answer = match answered {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    tracing::debug!("dhcp: undecodable datagram from {src}: {e}");
                    continue;
                }
                Err(_) => {
                    tracing::error!("dhcp: handling a datagram from {src} panicked; dropped");
                    continue;
                }
            };
            if let Some((reply, to)) = answer
                && let Err(e) = socket.send_to(&reply, to).await
            {
                tracing::warn!("dhcp: sending to {to}: {e}");
            }
        }
    }

    /// Handles one message: trace, pool persistence, encoding.
    fn answer(
        &self,
        msg: &Message,
        port: u16,
        src: SocketAddrV4,
    ) -> Option<(Vec<u8>, SocketAddrV4)> {
        let client = classify(msg)?;
        let mac = format_mac(&client.mac);
        self.trace.record(
            &mac,
            EventKind::DhcpReceived {
                message: message_name(client.message),
                port,
                arch: client.arch,
                ipxe: client.ipxe,
            },
        );
        if !msg.ciaddr().is_unspecified() {
            self.trace.learn(msg.ciaddr().into(), &mac);
        }
        let now = crate::trace::now_ms() / 1000;
        let outcome = {
            let mut guard = self
                .pool
                .as_ref()
                .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()));
            let result = handle(
                &self.settings,
                self.backend.as_ref(),
                guard.as_deref_mut(),
                msg,
                port,
                src,
                now,
            );
            if result.1
                && let Some(pool) = guard.as_deref()
                && let Err(e) = leases::save(&self.state_dir, pool)
            {
                tracing::error!("{e}");
            }
            result.0
        };
        match outcome {
            Outcome::Reply {
                msg: reply,
                to,
                boot_file,
            } => {
                let kind = reply
                    .opts()
                    .msg_type()
                    .map(message_name)
                    .unwrap_or_default();
                let address = Some(reply.yiaddr()).filter(|ip| !ip.is_unspecified());
                if let Some(ip) = address {
                    self.trace.learn(ip.into(), &mac);
                }
                self.trace.record(
                    &mac,
                    EventKind::DhcpSent {
                        message: kind,
                        address,
                        boot_file,
                    },
                );
                match reply.to_vec() {
                    Ok(bytes) => Some((bytes, to)),
                    Err(e) => {
                        tracing::error!("dhcp: encoding reply: {e}");
                        None
                    }
                }
            }
            Outcome::Ignored(reason) => {
                self.trace.record(
                    &mac,
                    EventKind::DhcpIgnored {
                        message: message_name(client.message),
                        reason,
                    },
                );
                None
            }
            Outcome::Silent => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{InventoryBackend, UnknownMacs};
    use dhcproto::v4::Architecture;

    const KNOWN: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const STRANGER: [u8; 6] = [0x52, 0x54, 0, 0, 0, 9];

    fn settings(mode: NetbootMode) -> DhcpSettings {
        DhcpSettings {
            mode,
            boot: BootSettings {
                server_ip: [10, 0, 0, 1].into(),
                http_base: "http://10.0.0.1:8080".into(),
                bios_file: "undionly.kpxe".into(),
                efi_file: "ipxe.efi".into(),
            },
            addressing: AddressSettings {
                subnet_mask: [255, 255, 255, 0].into(),
                router: None,
                dns: vec![],
            },
        }
    }

    fn backend(unknown: UnknownMacs) -> InventoryBackend {
        let inv = kiln_spec::Inventory::from_yaml(
            "apiVersion: kiln.dev/v1alpha1\nkind: Inventory\nspec:\n  nodes:\n    - name: node-01\n      bootMACs: [\"52:54:00:00:00:01\"]\n",
        )
        .unwrap();
        InventoryBackend::new(inv, unknown)
    }

    fn request(
        mac: [u8; 6],
        kind: MessageType,
        arch: Option<u16>,
        class: Option<&[u8]>,
        ipxe: bool,
    ) -> Message {
        let mut m = Message::default();
        m.set_chaddr(&mac).set_xid(7);
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        if let Some(a) = arch {
            o.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(a)));
        }
        if let Some(c) = class {
            o.insert(DhcpOption::ClassIdentifier(c.to_vec()));
        }
        if ipxe {
            o.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        }
        m
    }

    fn client(arch: Option<u16>, pxe: bool, ipxe: bool) -> Client {
        Client {
            mac: KNOWN,
            message: MessageType::Discover,
            arch,
            pxe,
            ipxe,
        }
    }

    #[test]
    fn option_93_and_ipxe_choose_the_boot_file() {
        let b = settings(NetbootMode::Proxy).boot;
        let tftp = |f: &str| Ok(Some(BootFile::Tftp(f.into())));
        assert_eq!(
            boot_file(&client(Some(0), true, false), &b),
            tftp("undionly.kpxe")
        );
        assert_eq!(
            boot_file(&client(None, true, false), &b),
            tftp("undionly.kpxe")
        );
        assert_eq!(
            boot_file(&client(Some(7), true, false), &b),
            tftp("ipxe.efi")
        );
        assert_eq!(
            boot_file(&client(Some(9), true, false), &b),
            tftp("ipxe.efi")
        );
        assert_eq!(
            boot_file(&client(Some(16), true, false), &b),
            Ok(Some(BootFile::Http {
                url: "http://10.0.0.1:8080/ipxe/ipxe.efi".into(),
                http_client: true
            }))
        );
        let script = Ok(Some(BootFile::Http {
            url: "http://10.0.0.1:8080/boot/52-54-00-00-00-01/boot.ipxe".into(),
            http_client: false,
        }));
        assert_eq!(
            boot_file(&client(Some(7), true, true), &b),
            script,
            "iPXE never gets iPXE again"
        );
        assert_eq!(boot_file(&client(None, false, true), &b), script);
        assert_eq!(boot_file(&client(None, false, false), &b), Ok(None));
        assert!(
            boot_file(&client(Some(11), true, false), &b)
                .unwrap_err()
                .contains("ARM64")
        );
    }

    #[test]
    fn user_class_is_read_in_both_encodings_and_option_175_counts() {
        let mut m = request(KNOWN, MessageType::Discover, None, None, false);
        m.opts_mut()
            .insert(DhcpOption::UserClass(b"\x04iPXE\x03foo".to_vec()));
        assert!(classify(&m).unwrap().ipxe);
        let mut m = request(KNOWN, MessageType::Discover, None, None, false);
        m.opts_mut()
            .insert(DhcpOption::Unknown(dhcproto::v4::UnknownOption::new(
                OptionCode::Unknown(175),
                vec![1, 1, 1],
            )));
        assert!(classify(&m).unwrap().ipxe);
        let m = request(KNOWN, MessageType::Discover, None, None, false);
        assert!(!classify(&m).unwrap().ipxe);
    }

    fn reply(outcome: Outcome) -> (Message, SocketAddrV4) {
        match outcome {
            Outcome::Reply { msg, to, .. } => (*msg, to),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    const SRC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);

    #[test]
    fn proxy_offers_boot_information_without_an_address() {
        let s = settings(NetbootMode::Proxy);
        let b = backend(UnknownMacs::Ignore);
        let req = request(
            KNOWN,
            MessageType::Discover,
            Some(7),
            Some(b"PXEClient:Arch:00007"),
            false,
        );
        let (msg, to) = reply(handle(&s, &b, None, &req, SERVER_PORT, SRC, 0).0);
        assert_eq!(msg.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(msg.siaddr(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(msg.fname_str().unwrap().unwrap(), "ipxe.efi");
        assert_eq!(msg.xid(), 7);
        assert_eq!(to, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
        assert!(matches!(
            msg.opts().get(OptionCode::ClassIdentifier),
            Some(DhcpOption::ClassIdentifier(c)) if c == b"PXEClient"
        ));

        // The boot-server request on 4011 is answered to its sender.
        let mut req = request(
            KNOWN,
            MessageType::Request,
            Some(7),
            Some(b"PXEClient"),
            false,
        );
        req.set_ciaddr(Ipv4Addr::new(10, 0, 0, 50));
        let from = SocketAddrV4::new([10, 0, 0, 50].into(), 68);
        let (msg, to) = reply(handle(&s, &b, None, &req, PXE_PORT, from, 0).0);
        assert_eq!(msg.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(to, from);

        // Requests on 67 belong to the real DHCP server; plain clients are not ours.
        assert_eq!(
            handle(&s, &b, None, &req, SERVER_PORT, SRC, 0).0,
            Outcome::Silent
        );
        let plain = request(KNOWN, MessageType::Discover, None, None, false);
        assert_eq!(
            handle(&s, &b, None, &plain, SERVER_PORT, SRC, 0).0,
            Outcome::Silent
        );
    }

    #[test]
    fn unknown_macs_are_ignored_or_sent_to_discovery() {
        let s = settings(NetbootMode::Proxy);
        let req = request(
            STRANGER,
            MessageType::Discover,
            Some(0),
            Some(b"PXEClient"),
            false,
        );
        let (out, _) = handle(
            &s,
            &backend(UnknownMacs::Ignore),
            None,
            &req,
            SERVER_PORT,
            SRC,
            0,
        );
        assert!(matches!(out, Outcome::Ignored(r) if r.contains("not in the inventory")));
        let (out, _) = handle(
            &s,
            &backend(UnknownMacs::Discovery),
            None,
            &req,
            SERVER_PORT,
            SRC,
            0,
        );
        assert_eq!(reply(out).0.fname_str().unwrap().unwrap(), "undionly.kpxe");
    }

    #[test]
    fn authoritative_offers_acks_naks_and_releases() {
        let s = settings(NetbootMode::Dhcp);
        let b = backend(UnknownMacs::Ignore);
        let mut pool = LeasePool::new([10, 0, 0, 100].into(), [10, 0, 0, 110].into(), 600);
        let discover = request(KNOWN, MessageType::Discover, None, None, false);
        let (out, changed) = handle(&s, &b, Some(&mut pool), &discover, SERVER_PORT, SRC, 0);
        let (offer, _) = reply(out);
        assert!(!changed, "offers are not persisted");
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(offer.fname(), None, "not a netboot client: no boot file");
        assert!(matches!(
            offer.opts().get(OptionCode::AddressLeaseTime),
            Some(DhcpOption::AddressLeaseTime(600))
        ));

        let mut req = request(KNOWN, MessageType::Request, None, None, false);
        req.opts_mut()
            .insert(DhcpOption::RequestedIpAddress([10, 0, 0, 100].into()));
        req.opts_mut()
            .insert(DhcpOption::ServerIdentifier([10, 0, 0, 1].into()));
        let (out, changed) = handle(&s, &b, Some(&mut pool), &req, SERVER_PORT, SRC, 1);
        let (ack, to) = reply(out);
        assert!(changed);
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(to.ip(), &Ipv4Addr::BROADCAST);

        // Renewal: unicast to the client's address.
        let mut renew = request(KNOWN, MessageType::Request, None, None, false);
        renew.set_ciaddr(Ipv4Addr::new(10, 0, 0, 100));
        let (ack, to) = reply(handle(&s, &b, Some(&mut pool), &renew, SERVER_PORT, SRC, 2).0);
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(to, SocketAddrV4::new([10, 0, 0, 100].into(), 68));

        // A foreign address is refused; another server's transaction is not ours.
        let mut wrong = request(KNOWN, MessageType::Request, None, None, false);
        wrong
            .opts_mut()
            .insert(DhcpOption::RequestedIpAddress([192, 168, 1, 5].into()));
        let (nak, _) = reply(handle(&s, &b, Some(&mut pool), &wrong, SERVER_PORT, SRC, 3).0);
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        wrong
            .opts_mut()
            .insert(DhcpOption::ServerIdentifier([10, 0, 0, 2].into()));
        assert_eq!(
            handle(&s, &b, Some(&mut pool), &wrong, SERVER_PORT, SRC, 3).0,
            Outcome::Silent
        );

        let mut release = request(KNOWN, MessageType::Release, None, None, false);
        release.set_ciaddr(Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(
            handle(&s, &b, Some(&mut pool), &release, SERVER_PORT, SRC, 4),
            (Outcome::Silent, true)
        );
        assert_eq!(pool.leases().count(), 0);
    }

    #[test]
    fn short_options_that_the_decoder_would_assert_on_are_refused() {
        let mut bytes = request(KNOWN, MessageType::Discover, None, None, false)
            .to_vec()
            .unwrap();
        bytes.pop(); // end marker
        bytes.extend_from_slice(&[81, 1, 0, 255]);
        assert_eq!(
            decode(&bytes).unwrap_err(),
            "option 81 has an invalid length 1"
        );
        let mut split = request(KNOWN, MessageType::Discover, None, None, false)
            .to_vec()
            .unwrap();
        split.pop();
        split.extend_from_slice(&[94, 2, 1, 2, 94, 2, 3, 4, 255]);
        assert_eq!(
            decode(&split).unwrap_err(),
            "option 94 has an invalid length 4"
        );
        // Two right-sized occurrences the decoder joins into one too long (found by fuzzing).
        let mut repeated = request(KNOWN, MessageType::Discover, None, None, false)
            .to_vec()
            .unwrap();
        repeated.pop();
        repeated.extend_from_slice(&[155, 4, 0, 0, 0, 0, 155, 4, 4, 4, 4, 4, 255]);
        assert_eq!(
            decode(&repeated).unwrap_err(),
            "option 155 has an invalid length 8"
        );
        // A run split by a pad is two options.
        let mut padded = request(KNOWN, MessageType::Discover, None, None, false)
            .to_vec()
            .unwrap();
        padded.pop();
        padded.extend_from_slice(&[155, 4, 0, 0, 0, 0, 0, 155, 4, 4, 4, 4, 4, 255]);
        assert!(decode(&padded).is_ok());
    }

    #[test]
    fn undecodable_and_odd_messages_are_refused_without_panicking() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[1; 100]).is_err());
        let mut m = request(KNOWN, MessageType::Discover, None, None, false);
        m.set_opcode(Opcode::BootReply);
        assert_eq!(classify(&m), None, "replies from other servers");
        let mut bytes = request(KNOWN, MessageType::Discover, None, None, false)
            .to_vec()
            .unwrap();
        bytes[2] = 200; // hlen beyond chaddr
        if let Ok(m) = decode(&bytes) {
            assert_eq!(classify(&m), None);
        }
    }
}
