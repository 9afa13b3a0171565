//! Shell-style globs, as users write them in disk rules and node selectors: `*` any run of
//! characters (slashes included: by-id paths are matched whole), `?` any one, `[…]` a class.
//! The matching is globset's.

/// Matches `text` against `pattern`. A pattern that is not a valid glob matches nothing
/// (validation reports it with its field path first: [`check_glob`]).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    compile(pattern).is_ok_and(|m| m.is_match(text))
}

/// Why `pattern` is not a valid glob.
pub fn check_glob(pattern: &str) -> Result<(), String> {
    compile(pattern).map(drop)
}

fn compile(pattern: &str) -> Result<globset::GlobMatcher, String> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(false)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{pattern:?} is not a valid glob: {}", e.kind()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob_match("Samsung SSD 9*", "Samsung SSD 990 PRO 1TB"));
        assert!(glob_match(
            "/dev/disk/by-id/nvme-*",
            "/dev/disk/by-id/nvme-eui.0025"
        ));
        assert!(glob_match("S?N*", "S4N123"));
        assert!(glob_match("n?de-0?", "node-01"));
        assert!(glob_match("*-0*1", "rack-0-01"));
        assert!(glob_match("*b*c", "xxbyyc"));
        assert!(glob_match("*", ""));
        assert!(glob_match("node-0[1-3]", "node-02"));
        assert!(!glob_match("node-0[1-3]", "node-04"));
        assert!(!glob_match("QEMU*", "Samsung"));
        assert!(!glob_match("node-*", "worker-1"));
        assert!(!glob_match("a?", "a"));
    }

    #[test]
    fn invalid_globs_are_explained_and_match_nothing() {
        assert!(
            check_glob("disk-[12")
                .unwrap_err()
                .contains("not a valid glob")
        );
        assert!(!glob_match("disk-[12", "disk-[12"));
        assert_eq!(check_glob("S3Z9*"), Ok(()));
    }
}
