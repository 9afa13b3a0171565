//! Any datagram through kiln-bmc's RMCP/RMCP+ decoders (outside and inside a session), the
//! IPMI message and RAKP parsers, and the FRU and sensor record readers: typed errors, never a panic.
#![no_main]

use std::sync::OnceLock;

use kiln_bmc::ipmi::wire;
use kiln_bmc::ipmi::{CipherSuite, SessionKeys, parse_fru_identity, parse_full_sensor_record};
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static [SessionKeys; 2] {
    static K: OnceLock<[SessionKeys; 2]> = OnceLock::new();
    K.get_or_init(|| {
        [
            SessionKeys::derive(CipherSuite::Suite3, &[7; 20]),
            SessionKeys::derive(CipherSuite::Suite17, &[7; 32]),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode(data, None);
    for k in keys() {
        if let Ok(p) = wire::decode(data, Some(k)) {
            let _ = wire::parse_ipmb_response(&p.payload);
        }
    }
    let _ = wire::parse_ipmb_response(data);
    let _ = wire::parse_open_session_response(data);
    let _ = wire::parse_rakp2(data);
    let _ = wire::parse_rakp4(data);
    let _ = wire::parse_auth_capabilities(data);
    let _ = parse_fru_identity(data);
    if let Some(sensor) = parse_full_sensor_record(data) {
        let _ = sensor.reading(data);
    }
});
