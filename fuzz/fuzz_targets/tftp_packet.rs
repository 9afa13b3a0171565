//! Any datagram through the TFTP parser: no panic; what parses re-encodes to the same packet;
//! option negotiation stays within RFC limits.
#![no_main]

use kiln_netboot::tftp::packet::{MAX_BLKSIZE, Packet, parse};
use kiln_netboot::tftp::session::{Limits, Transfer, negotiate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = parse(data) else { return };
    assert_eq!(parse(&packet.encode()).as_ref(), Ok(&packet));
    if let Packet::Rrq { options, .. } = &packet {
        let n = negotiate(options, data.len() as u64 * 1000, &Limits::default());
        assert!((8..=MAX_BLKSIZE).contains(&n.blksize));
        assert!(n.windowsize >= 1);
        let mut t = Transfer::new(data.len() as u64 * 1000, &n);
        // Any ACK sequence keeps the transfer consistent.
        for pair in data.chunks(2) {
            let block = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            t.on_ack(block);
            assert!(t.bytes_acked() <= data.len() as u64 * 1000);
        }
    }
});
