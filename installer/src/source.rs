//! Where the installer finds the appliance spec and the image it installs: an explicit file,
//! the spec embedded in the live medium, or `kiln.config=URL` on the kernel command line; the
//! image next to the live kernel on the medium.

use std::path::{Path, PathBuf};

use crate::hardware::MEDIUM_DIR;

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
    if let Some(url) = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kiln.config="))
    {
        return Ok(SpecSource::Url(url.to_string()));
    }
    Err(SourceError::NoSpec {
        medium: medium_spec().display().to_string(),
    })
}

/// `true` when the kernel command line asks for an unattended install.
pub fn unattended_requested(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == "kiln.install=auto")
}

/// Fetches a spec over HTTP(S).
pub fn fetch_text(url: &str) -> Result<String, SourceError> {
    let fail = |reason: String| SourceError::Fetch {
        url: url.to_string(),
        reason,
    };
    // kiln's one TLS provider (a no-op when the process installed it already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(e.to_string()))?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let resp = client
            .get(url)
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}")));
        }
        resp.text().await.map_err(|e| fail(e.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_source_precedence() {
        let cmd = "quiet kiln.config=http://10.0.0.1/n1.yaml kiln.install=auto";
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
    }

    #[test]
    fn specs_are_fetched_over_http() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /n1.yaml "));
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\nkind: Appliance")
                .unwrap();
        });
        let text = fetch_text(&format!("http://{addr}/n1.yaml")).unwrap();
        assert_eq!(text, "kind: Appliance");
        server.join().unwrap();
        let err = fetch_text("http://127.0.0.1:1/x").unwrap_err().to_string();
        assert!(err.starts_with("fetching http://127.0.0.1:1/x:"), "{err}");
    }
}
