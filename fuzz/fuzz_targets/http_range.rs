//! Any Range header against any length: a partial answer always lies inside the file; any
//! requested name resolves only below the served root; and any bytes a client sends as a
//! request head are either refused or read as a head no longer than they are.
#![no_main]

use kiln_netboot::download::parse_head;
use kiln_netboot::http::{RangeRequest, parse_range};
use kiln_netboot::jail::resolve;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], u64)| {
    let (bytes, len) = input;
    let header = &*String::from_utf8_lossy(bytes);
    if let RangeRequest::Partial { start, end } = parse_range(Some(header), len) {
        assert!(
            start <= end && end < len,
            "{header:?} over {len}: {start}-{end}"
        );
    }
    let root = std::env::temp_dir();
    if let Ok(path) = resolve(&root, header) {
        assert!(
            path.starts_with(&root),
            "{header:?} resolved to {}",
            path.display()
        );
    }
    if let Some(head) = parse_head(bytes) {
        assert!(
            head.len <= bytes.len(),
            "{header:?}: a head of {} bytes",
            head.len
        );
    }
});
