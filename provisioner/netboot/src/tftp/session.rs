//! The pure part of a TFTP read transfer: option negotiation (RFC 2347–2349, 7440) and the
//! sender's window bookkeeping, including block-number rollover past 65535.

use std::time::Duration;

use super::packet::{MAX_BLKSIZE, Options};

/// What the server is willing to agree to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_blksize: usize,
    pub max_windowsize: u16,
    /// Retransmission timeout when the client does not ask for one.
    pub default_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_blksize: MAX_BLKSIZE,
            max_windowsize: 64,
            default_timeout: Duration::from_secs(1),
        }
    }
}

/// The transfer parameters after negotiation, and the OACK to send (empty: none, start with
/// DATA 1 as plain RFC 1350).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: usize,
    pub windowsize: u16,
    pub timeout: Duration,
    pub oack: Options,
}

/// Accepts the options the server understands, clamped to `limits`; unknown or out-of-range
/// options are left out of the OACK, which RFC 2347 allows.
pub fn negotiate(requested: &Options, file_size: u64, limits: &Limits) -> Negotiated {
    let mut n = Negotiated {
        blksize: 512,
        windowsize: 1,
        timeout: limits.default_timeout,
        oack: Vec::new(),
    };
    for (name, value) in requested {
        let lname = name.to_ascii_lowercase();
        let Ok(number) = value.trim().parse::<u64>() else {
            continue;
        };
        match lname.as_str() {
            "blksize" if number >= 8 => {
                n.blksize = number.min(limits.max_blksize.min(MAX_BLKSIZE) as u64) as usize;
                n.oack.push((name.clone(), n.blksize.to_string()));
            }
            "windowsize" if number >= 1 => {
                n.windowsize = number.min(u64::from(limits.max_windowsize.max(1))) as u16;
                n.oack.push((name.clone(), n.windowsize.to_string()));
            }
            "timeout" if (1..=255).contains(&number) => {
                n.timeout = Duration::from_secs(number);
                n.oack.push((name.clone(), number.to_string()));
            }
            "tsize" => n.oack.push((name.clone(), file_size.to_string())),
            _ => {}
        }
    }
    n
}

/// Sender state: blocks are numbered from 1 as u64 internally and wrap to 0 after 65535 on
/// the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    blksize: u64,
    windowsize: u64,
    size: u64,
    /// Blocks the client has acknowledged (0 = none yet).
    acked: u64,
    /// Waiting for ACK 0 of the OACK before sending data.
    awaiting_oack_ack: bool,
}

/// What the sender does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send these blocks (internal numbers, inclusive range), then wait for an ACK.
    Send { first: u64, last: u64 },
    /// The last block is acknowledged.
    Done,
    /// Nothing new: keep waiting (a duplicate or stale ACK).
    Wait,
}

impl Transfer {
    pub fn new(size: u64, negotiated: &Negotiated) -> Transfer {
        Transfer {
            blksize: negotiated.blksize as u64,
            windowsize: u64::from(negotiated.windowsize),
            size,
            acked: 0,
            awaiting_oack_ack: !negotiated.oack.is_empty(),
        }
    }

    /// Number of DATA blocks: the last one is always shorter than blksize, maybe empty.
    pub fn blocks(&self) -> u64 {
        self.size / self.blksize + 1
    }

    /// Byte range of block `n` (1-based) in the file.
    pub fn block_range(&self, n: u64) -> (u64, u64) {
        let start = (n - 1) * self.blksize;
        let end = (start + self.blksize).min(self.size);
        (start, end)
    }

    pub fn wire_number(n: u64) -> u16 {
        (n % 65536) as u16
    }

    pub fn awaiting_oack_ack(&self) -> bool {
        self.awaiting_oack_ack
    }

    /// The first window to send (after an OACK, only once ACK 0 arrived).
    pub fn start(&self) -> Step {
        if self.awaiting_oack_ack {
            Step::Wait
        } else {
            self.window()
        }
    }

    fn window(&self) -> Step {
        if self.acked >= self.blocks() {
            return Step::Done;
        }
        let first = self.acked + 1;
        let last = (self.acked + self.windowsize).min(self.blocks());
        Step::Send { first, last }
    }

    /// What to resend after a timeout.
    pub fn resend(&self) -> Option<Step> {
        if self.awaiting_oack_ack {
            None
        } else {
            Some(self.window())
        }
    }

    /// Handles ACK `block` (wire number). An ACK inside the outstanding window moves the
    /// window to just after it (RFC 7440: the client acknowledges the last block it got in
    /// order).
    pub fn on_ack(&mut self, block: u16) -> Step {
        if self.awaiting_oack_ack {
            if block == 0 {
                self.awaiting_oack_ack = false;
                return self.window();
            }
            return Step::Wait;
        }
        let last_sent = (self.acked + self.windowsize).min(self.blocks());
        let acked = (self.acked + 1..=last_sent)
            .rev()
            .find(|&n| Self::wire_number(n) == block);
        match acked {
            Some(n) => {
                self.acked = n;
                self.window()
            }
            None => Step::Wait,
        }
    }

    pub fn bytes_acked(&self) -> u64 {
        (self.acked * self.blksize).min(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[(&str, &str)]) -> Options {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn negotiates_known_options_and_clamps_them() {
        let limits = Limits {
            max_blksize: 1468,
            max_windowsize: 16,
            default_timeout: Duration::from_secs(1),
        };
        let n = negotiate(
            &opts(&[
                ("BLKSIZE", "9000"),
                ("tsize", "0"),
                ("timeout", "3"),
                ("windowsize", "64"),
                ("multicast", "1"),
            ]),
            123_456,
            &limits,
        );
        assert_eq!(n.blksize, 1468);
        assert_eq!(n.windowsize, 16);
        assert_eq!(n.timeout, Duration::from_secs(3));
        assert_eq!(
            n.oack,
            opts(&[
                ("BLKSIZE", "1468"),
                ("tsize", "123456"),
                ("timeout", "3"),
                ("windowsize", "16")
            ])
        );
    }

    #[test]
    fn ignores_invalid_option_values() {
        let n = negotiate(
            &opts(&[("blksize", "4"), ("timeout", "0"), ("windowsize", "x")]),
            10,
            &Limits::default(),
        );
        assert_eq!(n.blksize, 512);
        assert_eq!(n.windowsize, 1);
        assert!(n.oack.is_empty());
    }

    #[test]
    fn plain_transfer_sends_a_final_empty_block_for_exact_multiples() {
        let n = negotiate(&vec![], 1024, &Limits::default());
        let mut t = Transfer::new(1024, &n);
        assert_eq!(t.blocks(), 3);
        assert_eq!(t.start(), Step::Send { first: 1, last: 1 });
        assert_eq!(t.on_ack(1), Step::Send { first: 2, last: 2 });
        assert_eq!(t.on_ack(1), Step::Wait, "duplicate ACK");
        assert_eq!(t.on_ack(2), Step::Send { first: 3, last: 3 });
        assert_eq!(t.block_range(3), (1024, 1024));
        assert_eq!(t.on_ack(3), Step::Done);
    }

    #[test]
    fn windows_advance_from_the_last_acknowledged_block() {
        let n = negotiate(&opts(&[("windowsize", "4")]), 10 * 512, &Limits::default());
        let mut t = Transfer::new(10 * 512, &n);
        assert_eq!(t.start(), Step::Wait, "OACK first");
        assert_eq!(t.on_ack(0), Step::Send { first: 1, last: 4 });
        // Client lost block 3: acknowledges 2, sender restarts at 3.
        assert_eq!(t.on_ack(2), Step::Send { first: 3, last: 6 });
        assert_eq!(t.on_ack(6), Step::Send { first: 7, last: 10 });
        assert_eq!(
            t.on_ack(10),
            Step::Send {
                first: 11,
                last: 11
            }
        );
        assert_eq!(t.on_ack(11), Step::Done);
    }

    #[test]
    fn block_numbers_roll_over_to_zero() {
        let n = negotiate(&opts(&[("blksize", "8")]), 8 * 70_000, &Limits::default());
        let mut t = Transfer::new(8 * 70_000, &n);
        t.on_ack(0);
        for k in 1..=65_536u64 {
            t.on_ack(Transfer::wire_number(k));
        }
        assert_eq!(t.bytes_acked(), 8 * 65_536);
        assert_eq!(Transfer::wire_number(65_536), 0);
        assert_eq!(
            t.on_ack(Transfer::wire_number(65_537)),
            Step::Send {
                first: 65_538,
                last: 65_538
            }
        );
    }
}
