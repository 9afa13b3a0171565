//! `kiln node upgrade --image URL`: a signed bundle served by a real HTTP server (Python's
//! `http.server` on loopback) is fetched and checked file by file; a bundle whose initrd was
//! swapped after signing, or signed by a key the node does not trust, is refused; an unsigned
//! one only where the node's spec allows it.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_installer::upgrade::{self, ImageRef, Trust, UpgradeError};
use kiln_spec::signing::SigningKey;
use sha2::Digest;

/// `python3 -m http.server` serving `dir` on a free loopback port; killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn serve(dir: &Path) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .arg("--directory")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 serves the bundle");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the HTTP server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bundle of three small files with a manifest signed by `key`.
fn bundle(dir: &Path, key: &SigningKey) {
    std::fs::create_dir_all(dir.join("pxe")).unwrap();
    let mut artifacts = Vec::new();
    for (rel, content) in [
        (upgrade::ROOTFS, b"root image".as_slice()),
        (upgrade::KERNEL, b"kernel"),
        (upgrade::INITRD, b"initrd"),
    ] {
        std::fs::write(dir.join(rel), content).unwrap();
        artifacts.push(serde_json::json!({
            "path": rel,
            "size": content.len(),
            "sha256": hex::encode(sha2::Sha256::digest(content)),
        }));
    }
    let manifest = serde_json::json!({
        "kiln_version": "0.1.0", "spec_sha256": "00", "suite": "bookworm", "mirror": "m",
        "kernel": "6.1.0", "kernel_args": ["console=ttyS0"], "rootfs_cache_key": "k",
        "artifacts": artifacts, "packages": [],
    });
    let json = serde_json::to_vec_pretty(&manifest).unwrap();
    std::fs::write(dir.join("manifest.json"), &json).unwrap();
    std::fs::write(dir.join("manifest.json.sig"), key.sign(&json)).unwrap();
}

#[test]
fn a_bundle_is_fetched_over_http_and_checked_before_use() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served");
    let key = SigningKey::generate().unwrap();
    bundle(&served, &key);
    let server = Server::serve(&served);
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let patience = Duration::from_secs(5);

    let image = upgrade::fetch_and_verify(
        &ImageRef::parse(&format!("{}/", server.url)),
        &Trust::signed_by(vec![key.public()]),
        &staging,
        patience,
    )
    .unwrap();
    assert_eq!(image.signed_by, key.public().fingerprint());
    assert_eq!(image.manifest.kernel_args, ["console=ttyS0"]);
    assert_eq!(std::fs::read(&image.kernel).unwrap(), b"kernel");
    assert_eq!(std::fs::read(&image.initrd).unwrap(), b"initrd");
    assert_eq!(std::fs::read(&image.rootfs).unwrap(), b"root image");
    assert!(image.rootfs.starts_with(&staging));

    // Another key: refused on the signature, before any file is fetched.
    let other = SigningKey::generate().unwrap();
    let e = upgrade::fetch_and_verify(
        &ImageRef::Url(server.url.clone()),
        &Trust::signed_by(vec![other.public()]),
        &staging,
        patience,
    )
    .unwrap_err();
    assert!(matches!(e, UpgradeError::Untrusted { .. }), "{e}");

    // The initrd swapped after signing: its digest no longer matches the manifest's.
    std::fs::write(served.join(upgrade::INITRD), b"initrd, changed").unwrap();
    let e = upgrade::fetch_and_verify(
        &ImageRef::Url(server.url.clone()),
        &Trust::signed_by(vec![key.public()]),
        &staging,
        patience,
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("initrd.img") && msg.contains("sha256"),
        "{msg}"
    );
}

#[test]
fn an_unsigned_bundle_is_taken_only_when_allowed_and_a_bad_signature_never() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served");
    let key = SigningKey::generate().unwrap();
    bundle(&served, &key);
    std::fs::remove_file(served.join("manifest.json.sig")).unwrap();
    let server = Server::serve(&served);
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let patience = Duration::from_secs(5);
    let fetch = |unsigned_ok: bool| {
        let trust = Trust {
            keys: vec![key.public()],
            unsigned_ok,
        };
        upgrade::fetch_and_verify(
            &ImageRef::Url(server.url.clone()),
            &trust,
            &staging,
            patience,
        )
    };

    let e = fetch(false).unwrap_err();
    assert!(e.to_string().contains("manifest.json.sig"), "{e}");
    let image = fetch(true).unwrap();
    assert_eq!(image.signed_by, upgrade::UNSIGNED);
    assert_eq!(std::fs::read(&image.kernel).unwrap(), b"kernel");

    // A signature that is there must verify, allowed or not.
    let other = SigningKey::generate().unwrap();
    let json = std::fs::read(served.join("manifest.json")).unwrap();
    std::fs::write(served.join("manifest.json.sig"), other.sign(&json)).unwrap();
    let e = fetch(true).unwrap_err();
    assert!(matches!(e, UpgradeError::Untrusted { .. }), "{e}");
}
