//! Where kiln keeps what it can rebuild: the one place the cache directory is resolved.

use std::path::PathBuf;

/// `$KILN_CACHE`, else `~/.cache/kiln`, else `/var/cache/kiln` (no home directory).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("KILN_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/kiln"))
}
