//! Embeds the overlay layers (every directory beside this file holding a `layer.yaml`) into
//! the crate, so the `kiln` binary carries them and rendering needs no files at run time.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let mut layers: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("reading the crate directory")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.join("layer.yaml").is_file())
        .collect();
    layers.sort();
    // The whole crate directory, so a new layer is picked up as well as changed files.
    println!("cargo::rerun-if-changed={}", root.display());
    let mut code = String::from(
        "/// (layer, path inside the layer, content)\npub(crate) static EMBEDDED: &[(&str, &str, &[u8])] = &[\n",
    );
    for layer in &layers {
        let name = layer
            .file_name()
            .unwrap()
            .to_str()
            .expect("UTF-8 layer name");
        let mut files = Vec::new();
        walk(layer, &mut files);
        for f in files {
            let rel = f
                .strip_prefix(layer)
                .unwrap()
                .to_str()
                .expect("UTF-8 file names");
            writeln!(
                code,
                "    ({name:?}, {rel:?}, include_bytes!({:?})),",
                f.display().to_string()
            )
            .unwrap();
        }
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("embedded.rs");
    std::fs::write(out, code).expect("writing embedded.rs");
}
