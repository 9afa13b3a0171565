//! `kiln key …`: the ed25519 keys that sign builds, and checking a signed build.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use kiln_spec::signing::{KeyError, PublicKey, SigningKey};

#[derive(Debug, clap::Subcommand)]
pub enum KeyCmd {
    /// Make a signing key: NAME.key (private, mode 0600) and NAME.pub in DIR
    Generate(GenerateArgs),
    /// Check a build's output directory: manifest.json's signature, then every artifact's
    /// size and sha256
    Verify(VerifyArgs),
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Directory for the key files (created when missing)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// File name stem of the key files
    #[arg(long, value_name = "NAME", default_value = "kiln")]
    pub name: String,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The build's output directory (holding manifest.json)
    #[arg(value_name = "DIR")]
    pub artifacts: PathBuf,
    /// The public key the build must be signed with (NAME.pub)
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
}

pub fn run(cmd: KeyCmd) -> anyhow::Result<()> {
    match cmd {
        KeyCmd::Generate(a) => generate(&a),
        KeyCmd::Verify(a) => {
            let key = load_public_key(&a.key)?;
            let manifest = kiln_image::manifest::verify_bundle(&a.artifacts, &key)?;
            println!(
                "{}: signed by {}; {} artifacts match the manifest",
                a.artifacts.display(),
                key.fingerprint(),
                manifest.artifacts.len()
            );
            Ok(())
        }
    }
}

fn generate(a: &GenerateArgs) -> anyhow::Result<()> {
    let (private, public) = (
        a.out.join(format!("{}.key", a.name)),
        a.out.join(format!("{}.pub", a.name)),
    );
    for p in [&private, &public] {
        if p.exists() {
            bail!(
                "{} exists; kiln never replaces a key (images trust its public half)",
                p.display()
            );
        }
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let key = SigningKey::generate()?;
    write_new(&private, key.to_pem().as_bytes(), 0o600)?;
    write_new(&public, key.public().to_pem().as_bytes(), 0o644)?;
    println!(
        "{}: signing key {} (keep it secret)\n{}: its public half",
        private.display(),
        key.public().fingerprint(),
        public.display()
    );
    Ok(())
}

/// Creates `path` with `mode`, never over an existing file.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

pub fn load_signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    load_pem(path, SigningKey::from_pem)
}

pub fn load_public_key(path: &Path) -> anyhow::Result<PublicKey> {
    load_pem(path, PublicKey::from_pem)
}

fn load_pem<T>(path: &Path, parse: fn(&str) -> Result<T, KeyError>) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("loading {}", path.display()))
}
