//! An RMCP+ session over UDP (tokio): establishment (RAKP), privilege raise, request/response
//! with retransmission, close. Written here rather than on ipmi-rs's blocking `Rmcp`
//! transport, which only speaks suite 3, cannot retransmit, and unwraps malformed RAKP 4
//! replies; the command layer is ipmi-rs's `IpmiCommand` trait.

use std::net::SocketAddr;
use std::time::Duration;

use ipmi_rs::connection::IpmiCommand;
use rand::RngCore;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::crypto::{CipherSuite, RakpContext, SessionKeys};
use super::wire::{self, Packet, WireError};
use crate::{BmcError, Result};

/// Administrator privilege: power and boot commands need it.
const PRIV_ADMIN: u8 = 0x04;
/// Name-only user lookup (how ipmitool asks, and what BMCs expect by default).
const NAME_ONLY_LOOKUP: u8 = 0x10;

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub addr: SocketAddr,
    pub label: String,
    pub username: String,
    pub password: crate::Password,
    pub suite: CipherSuite,
    pub timeout: Duration,
    pub retries: u32,
}

/// An established, authenticated and encrypted session at administrator privilege.
#[derive(Debug)]
pub struct Session {
    socket: UdpSocket,
    cfg: SessionConfig,
    keys: SessionKeys,
    managed_session_id: u32,
    sequence: u32,
    rq_seq: u8,
}

/// One exchange: how to build the datagram for an attempt and how to recognise its answer.
/// `accept` returns `Ok(None)` for datagrams that belong to something else (late replies).
async fn exchange<T>(
    socket: &UdpSocket,
    cfg: &SessionConfig,
    what: &str,
    mut build: impl FnMut() -> Vec<u8>,
    mut accept: impl FnMut(&[u8]) -> std::result::Result<Option<T>, BmcError>,
) -> Result<T> {
    let mut last_malformed: Option<BmcError> = None;
    let mut buf = vec![0u8; 2048];
    for attempt in 0..=cfg.retries {
        if attempt > 0 {
            tracing::debug!(bmc = %cfg.label, what, attempt, "retransmitting");
        }
        socket
            .send(&build())
            .await
            .map_err(|e| unreachable(cfg, &e))?;
        let deadline = Instant::now() + cfg.timeout;
        loop {
            let received = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(unreachable(cfg, &e)),
                Ok(Ok(n)) => n,
            };
            match accept(&buf[..received]) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e @ BmcError::Protocol(_)) => {
                    tracing::debug!(bmc = %cfg.label, what, error = %e, "discarding reply");
                    last_malformed = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
    }
    Err(last_malformed.unwrap_or_else(|| BmcError::Timeout {
        target: cfg.label.clone(),
        after: cfg.timeout * (cfg.retries + 1),
    }))
}

fn unreachable(cfg: &SessionConfig, e: &std::io::Error) -> BmcError {
    BmcError::Unreachable {
        target: cfg.label.clone(),
        reason: e.to_string(),
    }
}

fn malformed(what: &str, e: WireError) -> BmcError {
    BmcError::Protocol(format!("{what}: {e}"))
}

/// Sends Get Channel Authentication Capabilities outside a session. Tells whether the BMC
/// speaks IPMI 2.0 at all; also a cheap liveness check.
async fn auth_capabilities(
    socket: &UdpSocket,
    cfg: &SessionConfig,
) -> Result<wire::AuthCapabilities> {
    // Channel 0x0E (this one) with bit 7: ask for the IPMI 2.0 extended data.
    let msg = wire::ipmb_request(0x06, 0x38, 0, &[0x8E, PRIV_ADMIN]);
    let packet = wire::encode_v15_sessionless(&msg);
    exchange(
        socket,
        cfg,
        "get channel authentication capabilities",
        || packet.clone(),
        |data| {
            let p = wire::decode(data, None).map_err(|e| malformed("capabilities", e))?;
            let r =
                wire::parse_ipmb_response(&p.payload).map_err(|e| malformed("capabilities", e))?;
            if r.cmd != 0x38 {
                return Ok(None);
            }
            if r.completion_code != 0 {
                return Err(BmcError::BmcError {
                    command: "get channel authentication capabilities".into(),
                    code: r.completion_code,
                });
            }
            wire::parse_auth_capabilities(&r.data)
                .map(Some)
                .map_err(|e| malformed("capabilities", e))
        },
    )
    .await
}

impl Session {
    /// Opens a session: capabilities, Open Session, RAKP 1–4, Set Session Privilege Level.
    pub async fn open(cfg: SessionConfig) -> Result<Session> {
        let bind: SocketAddr = if cfg.addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("valid address")
        } else {
            "[::]:0".parse().expect("valid address")
        };
        let socket = UdpSocket::bind(bind)
            .await
            .map_err(|e| unreachable(&cfg, &e))?;
        socket
            .connect(cfg.addr)
            .await
            .map_err(|e| unreachable(&cfg, &e))?;

        let caps = auth_capabilities(&socket, &cfg).await?;
        if !caps.ipmi20 {
            return Err(BmcError::Unsupported(
                "IPMI 2.0 (RMCP+) on this LAN channel".into(),
            ));
        }

        let (console_session_id, tag, console_random) = {
            let mut rng = rand::rng();
            let mut random = [0u8; 16];
            rng.fill_bytes(&mut random);
            (rng.next_u32() | 1, (rng.next_u32() & 0x3F) as u8, random)
        };
        let request = wire::open_session_request(tag, console_session_id, cfg.suite);
        let open = exchange(
            &socket,
            &cfg,
            "open session",
            || wire::encode_v20(wire::PAYLOAD_OPEN_SESSION_REQUEST, 0, 0, &request, None),
            |data| {
                let p = decode_handshake(data, wire::PAYLOAD_OPEN_SESSION_RESPONSE)?;
                let Some(p) = p else { return Ok(None) };
                let r = wire::parse_open_session_response(&p.payload)
                    .map_err(|e| malformed("open session response", e))?;
                if r.tag != tag {
                    return Ok(None);
                }
                Ok(Some(r))
            },
        )
        .await?;
        if open.status != 0 {
            let reason = wire::rakp_status_meaning(open.status);
            return Err(match open.status {
                0x04..=0x07 | 0x10 | 0x11 => {
                    BmcError::Unsupported(format!("cipher suite {} ({reason})", cfg.suite.id()))
                }
                0x09 | 0x0A => BmcError::Auth(reason.into()),
                _ => BmcError::BmcError {
                    command: format!("open session ({reason})"),
                    code: open.status,
                },
            });
        }
        let expected = [
            cfg.suite.authentication_algorithm(),
            cfg.suite.integrity_algorithm(),
            cfg.suite.confidentiality_algorithm(),
        ];
        if open.algorithms != expected || open.console_session_id != console_session_id {
            return Err(BmcError::Protocol(format!(
                "open session response names algorithms {:?} / session {:#x}, asked for {expected:?} / {console_session_id:#x}",
                open.algorithms, open.console_session_id
            )));
        }

        let role = PRIV_ADMIN | NAME_ONLY_LOOKUP;
        let username = cfg.username.as_bytes().to_vec();
        if username.len() > 16 {
            return Err(BmcError::Auth(
                "user names are at most 16 bytes in IPMI".into(),
            ));
        }
        let rakp1 = wire::rakp1(
            tag,
            open.managed_session_id,
            &console_random,
            role,
            &username,
        );
        let rakp2 = exchange(
            &socket,
            &cfg,
            "RAKP 1",
            || wire::encode_v20(wire::PAYLOAD_RAKP1, 0, 0, &rakp1, None),
            |data| {
                let Some(p) = decode_handshake(data, wire::PAYLOAD_RAKP2)? else {
                    return Ok(None);
                };
                let r = wire::parse_rakp2(&p.payload).map_err(|e| malformed("RAKP 2", e))?;
                Ok((r.tag == tag).then_some(r))
            },
        )
        .await?;
        if rakp2.status != 0 {
            let reason = wire::rakp_status_meaning(rakp2.status);
            return Err(match rakp2.status {
                0x0A | 0x0C | 0x0D | 0x0F | 0x09 => {
                    BmcError::Auth(format!("user {:?}: {reason}", cfg.username))
                }
                _ => BmcError::BmcError {
                    command: format!("RAKP 1 ({reason})"),
                    code: rakp2.status,
                },
            });
        }
        let ctx = RakpContext {
            suite: cfg.suite,
            console_session_id,
            managed_session_id: open.managed_session_id,
            console_random,
            managed_random: rakp2.managed_random,
            managed_guid: rakp2.managed_guid,
            role,
            username,
        };
        let password = cfg.password.expose().as_bytes();
        if rakp2.auth_code.len() != cfg.suite.hmac_len()
            || rakp2.auth_code != ctx.rakp2_auth_code(password)
        {
            // Tell the BMC so it frees the half-open session, then report a wrong password.
            let fail = wire::rakp3(tag, 0x0F, open.managed_session_id, &[]);
            let _ = socket
                .send(&wire::encode_v20(wire::PAYLOAD_RAKP3, 0, 0, &fail, None))
                .await;
            return Err(BmcError::Auth(format!(
                "the BMC does not accept the password of user {:?}",
                cfg.username
            )));
        }

        let rakp3 = wire::rakp3(
            tag,
            0,
            open.managed_session_id,
            &ctx.rakp3_auth_code(password),
        );
        let sik = ctx.session_integrity_key(password);
        let rakp4 = exchange(
            &socket,
            &cfg,
            "RAKP 3",
            || wire::encode_v20(wire::PAYLOAD_RAKP3, 0, 0, &rakp3, None),
            |data| {
                let Some(p) = decode_handshake(data, wire::PAYLOAD_RAKP4)? else {
                    return Ok(None);
                };
                let r = wire::parse_rakp4(&p.payload).map_err(|e| malformed("RAKP 4", e))?;
                Ok((r.tag == tag).then_some(r))
            },
        )
        .await?;
        if rakp4.status != 0 {
            return Err(BmcError::Auth(format!(
                "RAKP 4: {}",
                wire::rakp_status_meaning(rakp4.status)
            )));
        }
        if rakp4.icv != ctx.rakp4_icv(&sik) {
            return Err(BmcError::Auth(
                "the BMC could not prove it knows the password (RAKP 4 check value)".into(),
            ));
        }

        let mut session = Session {
            socket,
            keys: SessionKeys::derive(cfg.suite, &sik),
            cfg,
            managed_session_id: open.managed_session_id,
            sequence: 0,
            rq_seq: 0,
        };
        session.execute(SetSessionPrivilege(PRIV_ADMIN)).await?;
        tracing::debug!(bmc = %session.cfg.label, suite = session.cfg.suite.id(), "session open");
        Ok(session)
    }

    pub fn suite(&self) -> CipherSuite {
        self.cfg.suite
    }

    /// Sends `command` and parses its answer; a non-zero completion code is a
    /// [`BmcError::BmcError`].
    pub async fn execute<C>(&mut self, command: C) -> Result<C::Output>
    where
        C: IpmiCommand,
        C::Error: std::fmt::Debug,
    {
        let name = std::any::type_name::<C>()
            .rsplit("::")
            .next()
            .unwrap_or("command")
            .to_string();
        let message: ipmi_rs::connection::Message = command.into();
        let (netfn, cmd) = (message.netfn_raw(), message.cmd());
        let response = self.raw(&name, netfn, cmd, message.data()).await?;
        C::parse_success_response(&response)
            .map_err(|e| BmcError::Protocol(format!("{name} answer: {e:?}")))
    }

    /// Sends one request and returns the response data after the completion code.
    pub async fn raw(&mut self, name: &str, netfn: u8, cmd: u8, data: &[u8]) -> Result<Vec<u8>> {
        self.rq_seq = (self.rq_seq + 1) & 0x3F;
        let rq_seq = self.rq_seq;
        let msg = wire::ipmb_request(netfn, cmd, rq_seq, data);
        let Session {
            socket,
            cfg,
            keys,
            managed_session_id,
            sequence,
            ..
        } = self;
        let response = exchange(
            socket,
            cfg,
            name,
            || {
                // Each transmission gets a fresh session sequence number (replay window).
                *sequence = sequence.wrapping_add(1).max(1);
                let mut iv = [0u8; 16];
                rand::rng().fill_bytes(&mut iv);
                wire::encode_v20(
                    wire::PAYLOAD_IPMI,
                    *managed_session_id,
                    *sequence,
                    &msg,
                    Some((keys, iv)),
                )
            },
            |data| {
                let p = wire::decode(data, Some(keys)).map_err(|e| malformed(name, e))?;
                if p.payload_type != wire::PAYLOAD_IPMI {
                    return Ok(None);
                }
                let r = wire::parse_ipmb_response(&p.payload).map_err(|e| malformed(name, e))?;
                if r.rq_seq != rq_seq || r.cmd != cmd || r.netfn != (netfn | 1) {
                    return Ok(None);
                }
                Ok(Some(r))
            },
        )
        .await?;
        if response.completion_code != 0 {
            return Err(BmcError::BmcError {
                command: name.to_string(),
                code: response.completion_code,
            });
        }
        Ok(response.data)
    }

    /// Closes the session (App 0x3C) so the BMC frees its slot.
    pub async fn close(mut self) -> Result<()> {
        let id = self.managed_session_id.to_le_bytes();
        self.raw("close session", 0x06, 0x3C, &id).await.map(drop)
    }
}

/// Decodes a pre-session datagram; `Ok(None)` when it is some other payload type.
fn decode_handshake(data: &[u8], want: u8) -> std::result::Result<Option<Packet>, BmcError> {
    let p = wire::decode(data, None).map_err(|e| malformed("session setup", e))?;
    Ok((p.payload_type == want).then_some(p))
}

/// Set Session Privilege Level (App 0x3B). Sessions start at user privilege; BMCs refuse
/// chassis control below administrator/operator.
#[derive(Debug)]
pub struct SetSessionPrivilege(pub u8);

impl From<SetSessionPrivilege> for ipmi_rs::connection::Message {
    fn from(v: SetSessionPrivilege) -> Self {
        ipmi_rs::connection::Message::new_request(ipmi_rs::connection::NetFn::App, 0x3B, vec![v.0])
    }
}

impl IpmiCommand for SetSessionPrivilege {
    type Output = u8;
    type Error = ipmi_rs::connection::NotEnoughData;

    fn parse_success_response(data: &[u8]) -> std::result::Result<u8, Self::Error> {
        data.first()
            .map(|p| p & 0x0F)
            .ok_or(ipmi_rs::connection::NotEnoughData)
    }
}
