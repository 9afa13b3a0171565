//! Golden files under `iso/tests/golden/`; `KILN_BLESS=1 cargo test -p kiln-image` rewrites them.

use std::path::PathBuf;

pub fn check(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(&path, actual).expect("writing golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reading {} (run with KILN_BLESS=1 to create it): {e}",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "output differs from {} (KILN_BLESS=1 to accept)",
        path.display()
    );
}
