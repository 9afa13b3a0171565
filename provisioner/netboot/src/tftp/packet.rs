//! TFTP wire format (RFC 1350, options per RFC 2347). Parsing never panics on any input.

/// Option names and values as sent; names compare case-insensitively.
pub type Options = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Rrq {
        filename: String,
        mode: String,
        options: Options,
    },
    Wrq {
        filename: String,
        mode: String,
        options: Options,
    },
    Data {
        block: u16,
        data: Vec<u8>,
    },
    Ack {
        block: u16,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Oack {
        options: Options,
    },
}

/// RFC 1350 and 2347 error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTransferId,
    FileExists,
    NoSuchUser,
    OptionNegotiation,
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTransferId => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionNegotiation => 8,
            ErrorCode::Other(n) => n,
        }
    }

    pub fn from_u16(n: u16) -> ErrorCode {
        match n {
            0 => ErrorCode::NotDefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTransferId,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionNegotiation,
            n => ErrorCode::Other(n),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("packet shorter than its opcode")]
    TooShort,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("{0} is not terminated by a NUL byte")]
    Unterminated(&'static str),
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("option {0:?} has no value")]
    OptionWithoutValue(String),
    #[error("data packet carries more than 65464 bytes")]
    Oversized,
}

const RRQ: u16 = 1;
const WRQ: u16 = 2;
const DATA: u16 = 3;
const ACK: u16 = 4;
const ERROR: u16 = 5;
const OACK: u16 = 6;

/// Largest block size RFC 2348 allows.
pub const MAX_BLKSIZE: usize = 65464;

pub fn parse(buf: &[u8]) -> Result<Packet, ParseError> {
    let (op, rest) = match buf {
        [a, b, rest @ ..] => (u16::from_be_bytes([*a, *b]), rest),
        _ => return Err(ParseError::TooShort),
    };
    match op {
        RRQ | WRQ => {
            let mut fields = Fields(rest);
            let filename = fields.string("file name")?;
            let mode = fields.string("mode")?;
            let options = fields.options()?;
            Ok(if op == RRQ {
                Packet::Rrq {
                    filename,
                    mode,
                    options,
                }
            } else {
                Packet::Wrq {
                    filename,
                    mode,
                    options,
                }
            })
        }
        DATA => match rest {
            [a, b, data @ ..] if data.len() <= MAX_BLKSIZE => Ok(Packet::Data {
                block: u16::from_be_bytes([*a, *b]),
                data: data.to_vec(),
            }),
            [_, _, ..] => Err(ParseError::Oversized),
            _ => Err(ParseError::TooShort),
        },
        ACK => match rest {
            [a, b, ..] => Ok(Packet::Ack {
                block: u16::from_be_bytes([*a, *b]),
            }),
            _ => Err(ParseError::TooShort),
        },
        ERROR => match rest {
            [a, b, msg @ ..] => {
                // Many clients omit the terminating NUL: accept the message either way.
                let end = msg.iter().position(|&c| c == 0).unwrap_or(msg.len());
                Ok(Packet::Error {
                    code: ErrorCode::from_u16(u16::from_be_bytes([*a, *b])),
                    message: String::from_utf8_lossy(&msg[..end]).into_owned(),
                })
            }
            _ => Err(ParseError::TooShort),
        },
        OACK => Ok(Packet::Oack {
            options: Fields(rest).options()?,
        }),
        other => Err(ParseError::UnknownOpcode(other)),
    }
}

struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn string(&mut self, what: &'static str) -> Result<String, ParseError> {
        let end = self
            .0
            .iter()
            .position(|&c| c == 0)
            .ok_or(ParseError::Unterminated(what))?;
        let text = std::str::from_utf8(&self.0[..end]).map_err(|_| ParseError::NotUtf8(what))?;
        self.0 = &self.0[end + 1..];
        Ok(text.to_string())
    }

    fn options(&mut self) -> Result<Options, ParseError> {
        let mut options = Vec::new();
        while !self.0.is_empty() {
            let name = self.string("option name")?;
            if self.0.is_empty() {
                return Err(ParseError::OptionWithoutValue(name));
            }
            let value = self.string("option value")?;
            options.push((name, value));
        }
        Ok(options)
    }
}

impl Packet {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Packet::Rrq {
                filename,
                mode,
                options,
            }
            | Packet::Wrq {
                filename,
                mode,
                options,
            } => {
                let op = if matches!(self, Packet::Rrq { .. }) {
                    RRQ
                } else {
                    WRQ
                };
                out.extend_from_slice(&op.to_be_bytes());
                push_string(&mut out, filename);
                push_string(&mut out, mode);
                push_options(&mut out, options);
            }
            Packet::Data { block, data } => encode_data(*block, data, &mut out),
            Packet::Ack { block } => {
                out.extend_from_slice(&ACK.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                out.extend_from_slice(&ERROR.to_be_bytes());
                out.extend_from_slice(&code.to_u16().to_be_bytes());
                push_string(&mut out, message);
            }
            Packet::Oack { options } => {
                out.extend_from_slice(&OACK.to_be_bytes());
                push_options(&mut out, options);
            }
        }
        out
    }
}

/// Writes a DATA packet into `out` (cleared first), reusing its allocation.
pub fn encode_data(block: u16, data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&DATA.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
    out.extend_from_slice(data);
}

fn push_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn push_options(out: &mut Vec<u8>, options: &Options) {
    for (name, value) in options {
        push_string(out, name);
        push_string(out, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_packet_kind() {
        let packets = [
            Packet::Rrq {
                filename: "ipxe.efi".into(),
                mode: "octet".into(),
                options: vec![
                    ("blksize".into(), "1468".into()),
                    ("tsize".into(), "0".into()),
                ],
            },
            Packet::Wrq {
                filename: "x".into(),
                mode: "netascii".into(),
                options: vec![],
            },
            Packet::Data {
                block: 65535,
                data: vec![1, 2, 3],
            },
            Packet::Ack { block: 0 },
            Packet::Error {
                code: ErrorCode::AccessViolation,
                message: "no".into(),
            },
            Packet::Oack {
                options: vec![("windowsize".into(), "8".into())],
            },
        ];
        for p in packets {
            assert_eq!(parse(&p.encode()).unwrap(), p);
        }
    }

    #[test]
    fn rejects_malformed_packets_with_a_reason() {
        assert_eq!(parse(&[]), Err(ParseError::TooShort));
        assert_eq!(parse(&[0]), Err(ParseError::TooShort));
        assert_eq!(parse(&[0, 9]), Err(ParseError::UnknownOpcode(9)));
        assert_eq!(
            parse(b"\x00\x01file"),
            Err(ParseError::Unterminated("file name"))
        );
        assert_eq!(
            parse(b"\x00\x01file\0octet\0blksize\0"),
            Err(ParseError::OptionWithoutValue("blksize".into()))
        );
        assert_eq!(
            parse(b"\x00\x01\xff\xfe\0octet\0"),
            Err(ParseError::NotUtf8("file name"))
        );
        assert_eq!(parse(&[0, 4, 1]), Err(ParseError::TooShort));
        let mut big = vec![0, 3, 0, 1];
        big.resize(4 + MAX_BLKSIZE + 1, 0);
        assert_eq!(parse(&big), Err(ParseError::Oversized));
    }
}
