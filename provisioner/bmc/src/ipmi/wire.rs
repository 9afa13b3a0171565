//! RMCP / IPMI LAN packet encoding and decoding (pure; no IO). Every decoder takes arbitrary
//! bytes from the network and returns a [`WireError`] instead of panicking (fuzzed by
//! `fuzz/fuzz_targets/rmcp_decode.rs`).

use super::crypto::SessionKeys;

/// RMCP header for IPMI class messages, no RMCP ACK (sequence 0xFF).
const RMCP_IPMI: [u8; 4] = [0x06, 0x00, 0xFF, 0x07];
const AUTH_TYPE_NONE: u8 = 0x00;
const AUTH_TYPE_RMCP_PLUS: u8 = 0x06;

pub const PAYLOAD_IPMI: u8 = 0x00;
pub const PAYLOAD_OPEN_SESSION_REQUEST: u8 = 0x10;
pub const PAYLOAD_OPEN_SESSION_RESPONSE: u8 = 0x11;
pub const PAYLOAD_RAKP1: u8 = 0x12;
pub const PAYLOAD_RAKP2: u8 = 0x13;
pub const PAYLOAD_RAKP3: u8 = 0x14;
pub const PAYLOAD_RAKP4: u8 = 0x15;

/// Our software ID as requester (remote console 0x81) and the BMC's responder address.
const REQUESTER_ADDR: u8 = 0x81;
const BMC_ADDR: u8 = 0x20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("packet too short ({0} bytes)")]
    Short(usize),
    #[error("not an RMCP IPMI packet")]
    NotIpmi,
    #[error("unknown session authentication type {0:#04x}")]
    AuthType(u8),
    #[error("payload length {declared} does not match the {actual} bytes received")]
    Length { declared: usize, actual: usize },
    #[error("integrity check failed")]
    Integrity,
    #[error("cannot decrypt the payload")]
    Decrypt,
    #[error("payload is {0}, session expected it {1}")]
    SecurityMismatch(&'static str, &'static str),
    #[error("IPMI message checksum mismatch")]
    Checksum,
    #[error("{0}")]
    Field(String),
}

/// A decoded LAN packet: which session it belongs to and its (decrypted) payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub payload_type: u8,
    pub session_id: u32,
    pub sequence: u32,
    pub payload: Vec<u8>,
}

/// An IPMI v1.5 session-less packet (used before any session exists).
pub fn encode_v15_sessionless(message: &[u8]) -> Vec<u8> {
    let mut out = RMCP_IPMI.to_vec();
    out.push(AUTH_TYPE_NONE);
    out.extend_from_slice(&[0; 4]); // session sequence
    out.extend_from_slice(&[0; 4]); // session id
    out.push(message.len() as u8);
    out.extend_from_slice(message);
    out
}

/// An RMCP+ packet; with `keys` the payload is encrypted and the packet authenticated.
pub fn encode_v20(
    payload_type: u8,
    session_id: u32,
    sequence: u32,
    payload: &[u8],
    keys: Option<(&SessionKeys, [u8; 16])>,
) -> Vec<u8> {
    let mut out = RMCP_IPMI.to_vec();
    out.push(AUTH_TYPE_RMCP_PLUS);
    let flags = if keys.is_some() { 0xC0 } else { 0x00 };
    out.push(flags | payload_type);
    out.extend_from_slice(&session_id.to_le_bytes());
    out.extend_from_slice(&sequence.to_le_bytes());
    let body = match keys {
        Some((k, iv)) => k.encrypt(payload, iv),
        None => payload.to_vec(),
    };
    out.extend_from_slice(&(body.len() as u16).to_le_bytes());
    out.extend_from_slice(&body);
    if let Some((k, _)) = keys {
        // Integrity pad so that auth type … next header is a multiple of 4 bytes.
        let covered = out.len() - RMCP_IPMI.len() + 2;
        let pad = (4 - covered % 4) % 4;
        out.extend(std::iter::repeat_n(0xFF, pad));
        out.push(pad as u8);
        out.push(0x07); // next header
        let code = k.auth_code(&out[RMCP_IPMI.len()..]);
        out.extend_from_slice(&code);
    }
    out
}

/// Decodes one UDP datagram. `keys` are the session's keys once it is established: then
/// session packets must be authenticated and encrypted, and the AuthCode is verified.
pub fn decode(data: &[u8], keys: Option<&SessionKeys>) -> Result<Packet, WireError> {
    if data.len() < 5 {
        return Err(WireError::Short(data.len()));
    }
    if data[0] != 0x06 || data[3] & 0x1F != 0x07 {
        return Err(WireError::NotIpmi);
    }
    let body = &data[4..];
    match body[0] {
        AUTH_TYPE_NONE => {
            // v1.5: auth type, sequence (4), session id (4), length (1), message.
            if body.len() < 10 {
                return Err(WireError::Short(data.len()));
            }
            let sequence = u32::from_le_bytes([body[1], body[2], body[3], body[4]]);
            let session_id = u32::from_le_bytes([body[5], body[6], body[7], body[8]]);
            let len = body[9] as usize;
            let msg = &body[10..];
            if msg.len() < len {
                return Err(WireError::Length {
                    declared: len,
                    actual: msg.len(),
                });
            }
            Ok(Packet {
                payload_type: PAYLOAD_IPMI,
                session_id,
                sequence,
                payload: msg[..len].to_vec(),
            })
        }
        AUTH_TYPE_RMCP_PLUS => decode_v20(body, keys),
        other => Err(WireError::AuthType(other)),
    }
}

fn decode_v20(body: &[u8], keys: Option<&SessionKeys>) -> Result<Packet, WireError> {
    if body.len() < 12 {
        return Err(WireError::Short(body.len() + 4));
    }
    let encrypted = body[1] & 0x80 != 0;
    let authenticated = body[1] & 0x40 != 0;
    let payload_type = body[1] & 0x3F;
    let session_id = u32::from_le_bytes([body[2], body[3], body[4], body[5]]);
    let sequence = u32::from_le_bytes([body[6], body[7], body[8], body[9]]);
    let len = u16::from_le_bytes([body[10], body[11]]) as usize;
    let rest = &body[12..];
    if rest.len() < len {
        return Err(WireError::Length {
            declared: len,
            actual: rest.len(),
        });
    }
    let raw = &rest[..len];
    let in_session = session_id != 0;
    let keys = match keys {
        Some(k) if in_session => {
            if !encrypted || !authenticated {
                return Err(WireError::SecurityMismatch(
                    "in the clear",
                    "encrypted and authenticated",
                ));
            }
            Some(k)
        }
        _ => {
            if encrypted || authenticated {
                return Err(WireError::SecurityMismatch(
                    "encrypted or authenticated",
                    "in the clear",
                ));
            }
            None
        }
    };
    let Some(keys) = keys else {
        return Ok(Packet {
            payload_type,
            session_id,
            sequence,
            payload: raw.to_vec(),
        });
    };
    // Trailer: pad (0–3 × 0xFF), pad length, next header, AuthCode.
    let trailer = &rest[len..];
    let icv_len = keys.suite.icv_len();
    if trailer.len() < 2 + icv_len {
        return Err(WireError::Short(body.len() + 4));
    }
    let covered_end = body.len() - icv_len;
    let pad_len = body[covered_end - 2] as usize;
    if 12 + len + pad_len + 2 != covered_end {
        return Err(WireError::Field(
            "integrity pad length is inconsistent".into(),
        ));
    }
    let code = keys.auth_code(&body[..covered_end]);
    if code != body[covered_end..] {
        return Err(WireError::Integrity);
    }
    let payload = keys.decrypt(raw).ok_or(WireError::Decrypt)?;
    Ok(Packet {
        payload_type,
        session_id,
        sequence,
        payload,
    })
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// An IPMI LAN request message to the BMC (IPMI 2.0 §13.8).
pub fn ipmb_request(netfn: u8, cmd: u8, rq_seq: u8, data: &[u8]) -> Vec<u8> {
    let head = [BMC_ADDR, netfn << 2];
    let mut out = head.to_vec();
    out.push(checksum(&head));
    let start = out.len();
    out.extend_from_slice(&[REQUESTER_ADDR, (rq_seq & 0x3F) << 2, cmd]);
    out.extend_from_slice(data);
    let sum = checksum(&out[start..]);
    out.push(sum);
    out
}

/// A response message from the BMC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpmbResponse {
    pub netfn: u8,
    pub cmd: u8,
    pub rq_seq: u8,
    pub completion_code: u8,
    pub data: Vec<u8>,
}

pub fn parse_ipmb_response(msg: &[u8]) -> Result<IpmbResponse, WireError> {
    if msg.len() < 8 {
        return Err(WireError::Short(msg.len()));
    }
    if checksum(&msg[..2]) != msg[2] || checksum(&msg[3..msg.len() - 1]) != msg[msg.len() - 1] {
        return Err(WireError::Checksum);
    }
    Ok(IpmbResponse {
        netfn: msg[1] >> 2,
        rq_seq: msg[4] >> 2,
        cmd: msg[5],
        completion_code: msg[6],
        data: msg[7..msg.len() - 1].to_vec(),
    })
}

/// Get Channel Authentication Capabilities (App 0x38) answer, the fields kiln uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthCapabilities {
    pub channel: u8,
    pub ipmi20: bool,
    pub anonymous_login: bool,
}

pub fn parse_auth_capabilities(data: &[u8]) -> Result<AuthCapabilities, WireError> {
    if data.len() < 8 {
        return Err(WireError::Field(format!(
            "channel authentication capabilities need 8 bytes, got {}",
            data.len()
        )));
    }
    Ok(AuthCapabilities {
        channel: data[0] & 0x0F,
        // Extended capabilities present (byte 1 bit 7) and IPMI 2.0 supported (byte 3 bit 1).
        ipmi20: data[1] & 0x80 != 0 && data[3] & 0x02 != 0,
        anonymous_login: data[2] & 0x01 != 0,
    })
}

/// RMCP+ Open Session Request payload.
pub fn open_session_request(
    tag: u8,
    console_session_id: u32,
    suite: super::CipherSuite,
) -> Vec<u8> {
    let mut out = vec![tag, 0x00, 0, 0];
    out.extend_from_slice(&console_session_id.to_le_bytes());
    for (kind, algorithm) in [
        (0x00, suite.authentication_algorithm()),
        (0x01, suite.integrity_algorithm()),
        (0x02, suite.confidentiality_algorithm()),
    ] {
        out.extend_from_slice(&[kind, 0, 0, 0x08, algorithm, 0, 0, 0]);
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSessionResponse {
    pub tag: u8,
    pub status: u8,
    pub console_session_id: u32,
    pub managed_session_id: u32,
    /// Authentication, integrity and confidentiality algorithms the BMC chose.
    pub algorithms: [u8; 3],
}

/// Parses the RAKP/open-session common head: tag, status; a non-zero status carries no more.
pub fn parse_open_session_response(p: &[u8]) -> Result<OpenSessionResponse, WireError> {
    if p.len() < 2 {
        return Err(WireError::Short(p.len()));
    }
    if p[1] != 0 {
        return Ok(OpenSessionResponse {
            tag: p[0],
            status: p[1],
            console_session_id: le32(p, 4).unwrap_or(0),
            managed_session_id: 0,
            algorithms: [0; 3],
        });
    }
    if p.len() < 36 {
        return Err(WireError::Short(p.len()));
    }
    Ok(OpenSessionResponse {
        tag: p[0],
        status: 0,
        console_session_id: le32(p, 4).unwrap_or(0),
        managed_session_id: le32(p, 8).unwrap_or(0),
        algorithms: [p[16] & 0x3F, p[24] & 0x3F, p[32] & 0x3F],
    })
}

fn le32(p: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(p.get(at..at + 4)?.try_into().ok()?))
}

pub fn rakp1(
    tag: u8,
    managed_session_id: u32,
    console_random: &[u8; 16],
    role: u8,
    username: &[u8],
) -> Vec<u8> {
    let mut out = vec![tag, 0, 0, 0];
    out.extend_from_slice(&managed_session_id.to_le_bytes());
    out.extend_from_slice(console_random);
    out.extend_from_slice(&[role, 0, 0, username.len() as u8]);
    out.extend_from_slice(username);
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp2 {
    pub tag: u8,
    pub status: u8,
    pub console_session_id: u32,
    pub managed_random: [u8; 16],
    pub managed_guid: [u8; 16],
    pub auth_code: Vec<u8>,
}

pub fn parse_rakp2(p: &[u8]) -> Result<Rakp2, WireError> {
    if p.len() < 2 {
        return Err(WireError::Short(p.len()));
    }
    if p[1] != 0 {
        return Ok(Rakp2 {
            tag: p[0],
            status: p[1],
            console_session_id: le32(p, 4).unwrap_or(0),
            managed_random: [0; 16],
            managed_guid: [0; 16],
            auth_code: Vec::new(),
        });
    }
    if p.len() < 40 {
        return Err(WireError::Short(p.len()));
    }
    let mut managed_random = [0; 16];
    managed_random.copy_from_slice(&p[8..24]);
    let mut managed_guid = [0; 16];
    managed_guid.copy_from_slice(&p[24..40]);
    Ok(Rakp2 {
        tag: p[0],
        status: 0,
        console_session_id: le32(p, 4).unwrap_or(0),
        managed_random,
        managed_guid,
        auth_code: p[40..].to_vec(),
    })
}

pub fn rakp3(tag: u8, status: u8, managed_session_id: u32, auth_code: &[u8]) -> Vec<u8> {
    let mut out = vec![tag, status, 0, 0];
    out.extend_from_slice(&managed_session_id.to_le_bytes());
    out.extend_from_slice(auth_code);
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp4 {
    pub tag: u8,
    pub status: u8,
    pub console_session_id: u32,
    pub icv: Vec<u8>,
}

pub fn parse_rakp4(p: &[u8]) -> Result<Rakp4, WireError> {
    if p.len() < 2 {
        return Err(WireError::Short(p.len()));
    }
    if p[1] == 0 && p.len() < 8 {
        return Err(WireError::Short(p.len()));
    }
    Ok(Rakp4 {
        tag: p[0],
        status: p[1],
        console_session_id: le32(p, 4).unwrap_or(0),
        icv: p.get(8..).unwrap_or_default().to_vec(),
    })
}

/// RMCP+ / RAKP message status codes (IPMI 2.0 table 13-15).
pub fn rakp_status_meaning(code: u8) -> &'static str {
    match code {
        0x01 => "insufficient resources to create a session",
        0x02 => "invalid session ID",
        0x03 => "invalid payload type",
        0x04 => "invalid authentication algorithm",
        0x05 => "invalid integrity algorithm",
        0x06 => "no matching authentication payload",
        0x07 => "no matching integrity payload",
        0x08 => "inactive session ID",
        0x09 => "invalid role",
        0x0A => "unauthorized role or privilege level requested",
        0x0B => "insufficient resources to create a session at the requested role",
        0x0C => "invalid name length",
        0x0D => "unauthorized name",
        0x0E => "unauthorized GUID",
        0x0F => "invalid integrity check value",
        0x10 => "invalid confidentiality algorithm",
        0x11 => "no cipher suite match with proposed security algorithms",
        0x12 => "illegal or unrecognized parameter",
        _ => "unknown status",
    }
}

#[cfg(test)]
mod tests {
    use super::super::CipherSuite;
    use super::*;

    #[test]
    fn ipmb_request_layout_of_get_device_id() {
        // Get Device ID with rqSeq 1, checksums worked out by hand from IPMI 2.0 §13.8.
        assert_eq!(
            ipmb_request(0x06, 0x01, 1, &[]),
            [0x20, 0x18, 0xC8, 0x81, 0x04, 0x01, 0x7A]
        );
    }

    #[test]
    fn ipmb_response_checksums_are_verified() {
        let good = [0x81, 0x1C, 0x63, 0x20, 0x04, 0x01, 0x00, 0x11, 0x00];
        let mut msg = good.to_vec();
        let sum = checksum(&msg[3..msg.len() - 1]);
        *msg.last_mut().unwrap() = sum;
        let r = parse_ipmb_response(&msg).unwrap();
        assert_eq!(
            (r.netfn, r.cmd, r.rq_seq, r.completion_code),
            (0x07, 0x01, 1, 0)
        );
        assert_eq!(r.data, [0x11]);
        msg[7] ^= 1;
        assert_eq!(parse_ipmb_response(&msg), Err(WireError::Checksum));
    }

    #[test]
    fn session_packets_round_trip_and_tampering_is_caught() {
        let keys = SessionKeys::derive(CipherSuite::Suite17, &[5; 32]);
        let msg = ipmb_request(0x00, 0x01, 3, &[]);
        let pkt = encode_v20(PAYLOAD_IPMI, 0x1234, 7, &msg, Some((&keys, [1; 16])));
        let got = decode(&pkt, Some(&keys)).unwrap();
        assert_eq!(got.payload, msg);
        assert_eq!((got.session_id, got.sequence), (0x1234, 7));
        // The auth-type..next-header span is a multiple of 4.
        assert_eq!((pkt.len() - 4 - CipherSuite::Suite17.icv_len()) % 4, 0);
        for i in 5..pkt.len() {
            let mut bad = pkt.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad, Some(&keys)).is_err(), "flip at {i} accepted");
        }
        let clear = encode_v20(PAYLOAD_IPMI, 0x1234, 7, &msg, None);
        assert!(matches!(
            decode(&clear, Some(&keys)),
            Err(WireError::SecurityMismatch(..))
        ));
    }

    #[test]
    fn truncated_packets_are_errors_at_every_length() {
        let keys = SessionKeys::derive(CipherSuite::Suite3, &[5; 20]);
        let pkt = encode_v20(PAYLOAD_IPMI, 9, 1, &[1, 2, 3], Some((&keys, [2; 16])));
        for n in 0..pkt.len() {
            assert!(decode(&pkt[..n], Some(&keys)).is_err());
        }
        let v15 = encode_v15_sessionless(&[1, 2, 3]);
        for n in 0..v15.len() {
            assert!(decode(&v15[..n], None).is_err());
        }
        assert_eq!(decode(&v15, None).unwrap().payload, [1, 2, 3]);
    }

    #[test]
    fn open_session_request_layout() {
        let p = open_session_request(7, 0x01020304, CipherSuite::Suite17);
        assert_eq!(p.len(), 32);
        assert_eq!(&p[4..8], &[4, 3, 2, 1]);
        assert_eq!((p[12], p[20], p[28]), (0x03, 0x04, 0x01));
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(data: Vec<u8>) {
            let keys = SessionKeys::derive(CipherSuite::Suite3, &[1; 20]);
            let _ = decode(&data, None);
            let _ = decode(&data, Some(&keys));
            let _ = parse_ipmb_response(&data);
            let _ = parse_open_session_response(&data);
            let _ = parse_rakp2(&data);
            let _ = parse_rakp4(&data);
            let _ = parse_auth_capabilities(&data);
        }
    }
}
