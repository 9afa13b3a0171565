//! Where the installer finds the appliance spec and the image it installs: an explicit file,
//! the spec embedded in the live medium, or `kiln.config=URL` on the kernel command line
//! (fetched with the node's `kiln.token`); the
//! image next to the live kernel on the medium, or, on a netbooted live system, the root image
//! stage-1 fetched and verified plus the kernel and initrd fetched from the same place, each
//! checked against the digest on the kernel command line before anything is written.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_spec::bootargs;
use kiln_spec::enrol::{CONFIG_ARG, PHONE_HOME_ARG, TOKEN_ARG, bearer};

use crate::hardware::MEDIUM_DIR;
use crate::stage1::Cmdline;

/// Where stage-1 keeps the root image it fetched over HTTP (and verified).
pub const NETBOOT_ROOTFS: &str = "/run/kiln/rw/rootfs.squashfs";
/// Where the installer keeps the kernel and initrd it fetches on a netbooted system.
pub const FETCHED_DIR: &str = "/run/kiln/fetched";

/// The spec embedded in the ISO, as mounted in the live system.
pub fn medium_spec() -> PathBuf {
    Path::new(MEDIUM_DIR).join("kiln/spec.yaml")
}

/// The root image on the live medium; the kernel and initrd sit next to it.
pub fn medium_image() -> PathBuf {
    Path::new(MEDIUM_DIR).join("live/rootfs.squashfs")
}

/// Where the spec comes from, in order of precedence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecSource {
    File(PathBuf),
    Url(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "no appliance spec: give --spec FILE, boot a kiln ISO (which embeds {medium}), or put kiln.config=URL on the kernel command line"
    )]
    NoSpec { medium: String },
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("{url}: sha256 is {actual}, the build manifest says {expected}; nothing was written")]
    Digest {
        url: String,
        expected: String,
        actual: String,
    },
    #[error(
        "the live system was netbooted from {root} but the kernel command line has no {arg}=HEX; \
         refusing to install files that cannot be verified"
    )]
    NoDigest { root: String, arg: &'static str },
}

/// The boot files of a netbooted live system: where they are served and their digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetbootImage {
    /// The directory URL the root image came from (`http://10.0.0.1:8080/boot/MAC`).
    pub base_url: String,
    pub digests: bootargs::BootDigests,
}

/// The netboot source named on the kernel command line (`kiln.root=http://…` with the three
/// digests), `None` when the live system did not come over the network.
pub fn netboot_image(cmdline: &str) -> Result<Option<NetbootImage>, SourceError> {
    let cmdline = Cmdline::parse(cmdline);
    let Some(root) = netboot_root(&cmdline) else {
        return Ok(None);
    };
    let digest = |arg: &'static str| {
        cmdline
            .get(arg)
            .map(str::to_string)
            .ok_or_else(|| SourceError::NoDigest {
                root: root.to_string(),
                arg,
            })
    };
    Ok(Some(NetbootImage {
        base_url: root
            .rsplit_once('/')
            .map_or(root, |(dir, _)| dir)
            .to_string(),
        digests: bootargs::BootDigests {
            rootfs: digest(bootargs::ROOT_SHA256)?,
            kernel: digest(bootargs::KERNEL_SHA256)?,
            initrd: digest(bootargs::INITRD_SHA256)?,
        },
    }))
}

fn netboot_root(cmdline: &Cmdline) -> Option<&str> {
    cmdline
        .get("kiln.root")
        .filter(|r| r.starts_with("http://"))
}

/// `true` when the install the kernel command line describes reaches the network: a netbooted
/// live system fetches the image from where it booted, `kiln.config` names the spec's URL and
/// `kiln.phone-home` where progress goes. An install from an ISO reads everything from its
/// medium, so its boot does not wait for a network it never uses.
pub fn uses_network(cmdline: &str) -> bool {
    let cmdline = Cmdline::parse(cmdline);
    netboot_root(&cmdline).is_some()
        || cmdline.get(CONFIG_ARG).is_some()
        || cmdline.get(PHONE_HOME_ARG).is_some()
}

/// Disk consent from the kernel command line (`kiln.wipe=DISK`).
pub fn wipe_consent(cmdline: &str) -> Option<String> {
    Cmdline::parse(cmdline)
        .get(bootargs::WIPE)
        .filter(|d| !d.is_empty())
        .map(str::to_string)
}

/// The runtime the installer's blocking HTTP calls run on, with kiln's one TLS provider
/// installed (a no-op when the process did so already).
pub(crate) fn http_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// An HTTP client for `url`. Plain `http://` negotiates no TLS, so it gets a TLS setup that
/// trusts nothing instead of the system's CA store, which a minimal live image may not carry
/// (the platform verifier refuses to start without one).
pub(crate) fn client_for(url: &str) -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder();
    if url.starts_with("http://") {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        builder.tls_backend_preconfigured(tls)
    } else {
        builder
    }
}

/// Fetches `url` into `dest` while hashing it; a digest other than `sha256` removes the file
/// and is an error naming both. Transport trouble is retried for `patience`
/// ([`crate::FETCH_PATIENCE`] on a node).
pub fn fetch_verified(
    url: &str,
    sha256: &str,
    dest: &Path,
    patience: Duration,
) -> Result<(), SourceError> {
    use sha2::Digest;
    use std::io::Write;
    let fail = |reason: String| SourceError::Fetch {
        url: url.to_string(),
        reason,
    };
    let rt = http_runtime().map_err(|e| fail(e.to_string()))?;
    let client = client_for(url)
        .connect_timeout(std::time::Duration::from_secs(30))
        .read_timeout(std::time::Duration::from_secs(60))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let actual = rt.block_on(patiently(url, patience, || async {
        let mut resp = client
            .get(url)
            .send()
            .await
            .map_err(|e| Attempt::Transient(fail(e.to_string())))?;
        if !resp.status().is_success() {
            return Err(Attempt::by_status(
                resp.status(),
                fail(format!("HTTP {}", resp.status())),
            ));
        }
        let mut file = std::fs::File::create(dest)
            .map_err(|e| Attempt::Final(fail(format!("creating {}: {e}", dest.display()))))?;
        let mut hasher = sha2::Sha256::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| Attempt::Transient(fail(e.to_string())))?
        {
            hasher.update(&chunk);
            file.write_all(&chunk)
                .map_err(|e| Attempt::Final(fail(format!("writing {}: {e}", dest.display()))))?;
        }
        Ok(hex::encode(hasher.finalize()))
    }))?;
    if !actual.eq_ignore_ascii_case(sha256) {
        let _ = std::fs::remove_file(dest);
        return Err(SourceError::Digest {
            url: url.to_string(),
            expected: sha256.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Decides where the spec comes from: `--spec`, then the medium's embedded spec (when it
/// exists), then `kiln.config=URL` from `cmdline`.
pub fn spec_source(
    explicit: Option<&Path>,
    medium_spec_exists: bool,
    cmdline: &str,
) -> Result<SpecSource, SourceError> {
    if let Some(p) = explicit {
        return Ok(SpecSource::File(p.to_path_buf()));
    }
    if medium_spec_exists {
        return Ok(SpecSource::File(medium_spec()));
    }
    if let Some(url) = Cmdline::parse(cmdline).get(CONFIG_ARG) {
        return Ok(SpecSource::Url(url.to_string()));
    }
    Err(SourceError::NoSpec {
        medium: medium_spec().display().to_string(),
    })
}

/// `true` when the kernel command line asks for an unattended install.
pub fn unattended_requested(cmdline: &str) -> bool {
    Cmdline::parse(cmdline).unattended_install()
}

/// The node's enrolment token from the kernel command line (`kiln.token=TOKEN`).
pub fn token(cmdline: &str) -> Option<String> {
    Cmdline::parse(cmdline)
        .get(TOKEN_ARG)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

/// `Authorization: Bearer TOKEN`, kept out of logs.
pub(crate) fn authorization(token: &str) -> Option<reqwest::header::HeaderValue> {
    let mut value = reqwest::header::HeaderValue::from_str(&bearer(token)).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// `HTTP 403 Forbidden: REASON`, with the first line of the server's answer (kiln's servers
/// say why they refuse), cut short.
pub(crate) async fn refusal(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    match body.lines().next().map(str::trim).filter(|l| !l.is_empty()) {
        Some(line) => format!(
            "HTTP {status}: {}",
            line.chars().take(200).collect::<String>()
        ),
        None => format!("HTTP {status}"),
    }
}

/// Fetches a spec over HTTP(S), presenting `token` when given; transport trouble is retried
/// for `patience`.
pub fn fetch_text(
    url: &str,
    token: Option<&str>,
    patience: Duration,
) -> Result<String, SourceError> {
    let bytes = fetch_bytes(url, token, patience)?;
    String::from_utf8(bytes).map_err(|e| SourceError::Fetch {
        url: url.to_string(),
        reason: format!("not UTF-8 text: {e}"),
    })
}

/// Fetches a small document (a spec, a manifest, a signature) into memory; see [`fetch_text`].
pub fn fetch_bytes(
    url: &str,
    token: Option<&str>,
    patience: Duration,
) -> Result<Vec<u8>, SourceError> {
    let fail = |reason: String| SourceError::Fetch {
        url: url.to_string(),
        reason,
    };
    let rt = http_runtime().map_err(|e| fail(e.to_string()))?;
    let client = client_for(url)
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    rt.block_on(patiently(url, patience, || async {
        let mut request = client.get(url);
        if let Some(value) = token.and_then(authorization) {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let resp = request
            .send()
            .await
            .map_err(|e| Attempt::Transient(fail(e.to_string())))?;
        if !resp.status().is_success() {
            let status = resp.status();
            return Err(Attempt::by_status(status, fail(refusal(resp).await)));
        }
        resp.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| Attempt::Transient(fail(e.to_string())))
    }))
}

/// One try of a download: worth another, or not.
enum Attempt {
    Transient(SourceError),
    Final(SourceError),
}

impl Attempt {
    /// A server error may pass; a refusal stands.
    fn by_status(status: reqwest::StatusCode, e: SourceError) -> Attempt {
        if status.is_server_error() {
            Attempt::Transient(e)
        } else {
            Attempt::Final(e)
        }
    }
}

/// Tries `attempt` until it succeeds, fails for good, or `patience` is spent, backing off from
/// 1 to 15 seconds.
async fn patiently<T, F, Fut>(
    url: &str,
    patience: Duration,
    mut attempt: F,
) -> Result<T, SourceError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Attempt>>,
{
    let start = std::time::Instant::now();
    let mut pause = Duration::from_secs(1);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(Attempt::Transient(e)) if start.elapsed() + pause < patience => {
                tracing::warn!("{e}; trying {url} again in {}s", pause.as_secs());
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(15));
            }
            Err(Attempt::Transient(e) | Attempt::Final(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_source_precedence() {
        let cmd = "quiet kiln.config=http://10.0.0.1/n1.yaml kiln.install=auto kiln.token=t0k";
        assert_eq!(
            spec_source(Some(Path::new("/s.yaml")), true, cmd).unwrap(),
            SpecSource::File("/s.yaml".into())
        );
        assert_eq!(
            spec_source(None, true, cmd).unwrap(),
            SpecSource::File(medium_spec())
        );
        assert_eq!(
            spec_source(None, false, cmd).unwrap(),
            SpecSource::Url("http://10.0.0.1/n1.yaml".into())
        );
        let err = spec_source(None, false, "quiet").unwrap_err().to_string();
        assert!(err.contains("--spec FILE"), "{err}");
        assert!(unattended_requested(cmd));
        assert!(!unattended_requested("kiln.install=manual"));
        assert_eq!(token(cmd).as_deref(), Some("t0k"));
        assert_eq!(token("kiln.token= quiet"), None);
    }

    #[test]
    fn only_installs_that_reach_the_network_wait_for_it() {
        let iso = "kiln.root=live:KILN console=ttyS0 kiln.install=auto";
        assert!(!uses_network(iso));
        assert!(!uses_network(""));
        for netboot in [
            "kiln.root=http://10.0.0.1/boot/m/rootfs.squashfs kiln.install=auto",
            "kiln.root=live:KILN kiln.config=http://10.0.0.1/config/m",
            "kiln.root=live:KILN kiln.phone-home=http://10.0.0.1/phone-home/m",
        ] {
            assert!(uses_network(netboot), "{netboot}");
        }
    }

    #[test]
    fn netboot_sources_need_every_digest() {
        let sha = |c: char| c.to_string().repeat(64);
        let line = format!(
            "kiln.root=http://10.0.0.1:8080/boot/52-54-00-00-00-01/rootfs.squashfs \
             kiln.root.sha256={} kiln.kernel.sha256={} kiln.initrd.sha256={} kiln.wipe=/dev/vdb",
            sha('a'),
            sha('b'),
            sha('c')
        );
        let img = netboot_image(&line).unwrap().unwrap();
        assert_eq!(img.base_url, "http://10.0.0.1:8080/boot/52-54-00-00-00-01");
        assert_eq!(img.digests.kernel, sha('b'));
        assert_eq!(wipe_consent(&line).as_deref(), Some("/dev/vdb"));
        let err = netboot_image(&line.replace("kiln.initrd.sha256", "x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no kiln.initrd.sha256=HEX"), "{err}");
        assert_eq!(netboot_image("kiln.root=live:KILN_LIVE").unwrap(), None);
        assert_eq!(wipe_consent("quiet kiln.wipe="), None);
    }

    #[test]
    fn fetches_are_verified() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).unwrap();
                s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nkernel",
                )
                .unwrap();
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("vmlinuz");
        let url = format!("http://{addr}/vmlinuz");
        let wrong = "0".repeat(64);
        let err = fetch_verified(&url, &wrong, &dest, Duration::ZERO).unwrap_err();
        let SourceError::Digest { actual, .. } = err else {
            panic!("{err}")
        };
        assert!(!dest.exists(), "a file that failed its digest is removed");
        fetch_verified(&url, &actual, &dest, Duration::ZERO).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"kernel");
    }

    #[test]
    fn specs_are_fetched_over_http() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let answers: [&[u8]; 2] = [
                b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\nkind: Appliance",
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 28\r\nConnection: close\r\n\r\nthe token is not this node's",
            ];
            let mut requests = Vec::new();
            for answer in answers {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap();
                requests.push(String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase());
                s.write_all(answer).unwrap();
            }
            requests
        });
        let url = format!("http://{addr}/n1.yaml");
        let patience = Duration::from_secs(60);
        assert_eq!(
            fetch_text(&url, Some("t0k"), patience).unwrap(),
            "kind: Appliance"
        );
        // A refusal stands at once, however patient the caller.
        let err = fetch_text(&url, None, patience).unwrap_err().to_string();
        assert!(
            err.ends_with("HTTP 403 Forbidden: the token is not this node's"),
            "{err}"
        );
        let requests = server.join().unwrap();
        assert!(requests[0].starts_with("get /n1.yaml "));
        assert!(
            requests[0].contains("\r\nauthorization: bearer t0k\r\n"),
            "{}",
            requests[0]
        );
        assert!(!requests[1].contains("authorization"), "{}", requests[1]);
        let err = fetch_text("http://127.0.0.1:1/x", None, Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("fetching http://127.0.0.1:1/x:"), "{err}");
    }

    #[test]
    fn transport_trouble_is_tried_again_until_the_server_answers() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let answers: [&[u8]; 3] = [
                b"",
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\nkind: Appliance",
            ];
            for answer in answers {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).unwrap();
                // The first connection closes without a word, as a restarting server's does.
                s.write_all(answer).unwrap();
            }
        });
        let url = format!("http://{addr}/n1.yaml");
        assert_eq!(
            fetch_text(&url, None, Duration::from_secs(60)).unwrap(),
            "kind: Appliance"
        );
    }
}
