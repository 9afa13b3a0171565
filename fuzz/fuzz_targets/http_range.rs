//! Any Range header against any length: a partial answer always lies inside the file; and
//! any requested name resolves only below the served root.
#![no_main]

use kiln_netboot::http::{RangeRequest, parse_range};
use kiln_netboot::jail::resolve;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, u64)| {
    let (header, len) = input;
    if let RangeRequest::Partial { start, end } = parse_range(Some(header), len) {
        assert!(start <= end && end < len, "{header:?} over {len}: {start}-{end}");
    }
    let root = std::env::temp_dir();
    if let Ok(path) = resolve(&root, header) {
        assert!(path.starts_with(&root), "{header:?} resolved to {}", path.display());
    }
});
