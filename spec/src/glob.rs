//! Shell-style globs, as users write them in disk rules and node selectors.

/// Matches `text` against `pattern`, where `*` is any run of characters and `?` any one.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and how much of the text it has swallowed so far: on a mismatch,
    // let it swallow one more character and retry (linear backtracking, no recursion).
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

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
        assert!(!glob_match("QEMU*", "Samsung"));
        assert!(!glob_match("node-*", "worker-1"));
        assert!(!glob_match("a?", "a"));
    }
}
