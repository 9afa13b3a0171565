//! Progress reports to the provisioner during a netboot install (`kiln.phone-home=URL`, with
//! the node's `kiln.token`), and the enrolment the installed node's agent reports with later.
//! Best effort: a report that cannot be delivered is the caller's warning, never a failed
//! install, so each gets a short timeout and one retry.

use std::time::Duration;

use kiln_spec::enrol::{Enrolment, MAX_MESSAGE_BYTES, PHONE_HOME_ARG, Phase, Report, TOKEN_ARG};

use crate::source::{authorization, client_for, http_runtime, refusal};
use crate::stage1::Cmdline;

/// Per attempt: a report is small and the provisioner is on the boot network.
const TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum PhoneHomeError {
    #[error("setting up reports to {url}: {reason}")]
    Setup { url: String, reason: String },
    #[error("reporting {phase} to {url}: {reason}")]
    Send {
        url: String,
        phase: Phase,
        reason: String,
        /// The provisioner answered and said no (4xx): sending again changes nothing.
        refused: bool,
    },
}

/// Where reports go, and the token they carry.
pub struct PhoneHome {
    url: String,
    token: Option<String>,
    client: reqwest::Client,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for PhoneHome {
    // The token stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhoneHome")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .finish()
    }
}

/// A report whose message is cut to what the provisioner accepts.
pub fn report(phase: Phase, message: Option<&str>) -> Report {
    Report::new(
        phase,
        message.map(|m| {
            let mut end = m.len().min(MAX_MESSAGE_BYTES);
            while !m.is_char_boundary(end) {
                end -= 1;
            }
            m[..end].to_string()
        }),
    )
}

impl PhoneHome {
    /// The reports the kernel command line asks for, if it does.
    pub fn from_cmdline(cmdline: &str) -> Result<Option<PhoneHome>, PhoneHomeError> {
        let cmdline = Cmdline::parse(cmdline);
        let Some(url) = cmdline.get(PHONE_HOME_ARG).filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let token = cmdline
            .get(TOKEN_ARG)
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        PhoneHome::new(url, token).map(Some)
    }

    pub fn new(url: &str, token: Option<String>) -> Result<PhoneHome, PhoneHomeError> {
        let setup = |reason: String| PhoneHomeError::Setup {
            url: url.to_string(),
            reason,
        };
        let runtime = http_runtime().map_err(|e| setup(e.to_string()))?;
        let client = client_for(url)
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| setup(e.to_string()))?;
        Ok(PhoneHome {
            url: url.to_string(),
            token,
            client,
            runtime,
        })
    }

    /// Posts `report`; a failed connection or a server error is tried once more.
    pub fn send(&self, report: &Report) -> Result<(), PhoneHomeError> {
        let fail = |reason: String, refused: bool| PhoneHomeError::Send {
            url: self.url.clone(),
            phase: report.phase,
            reason,
            refused,
        };
        self.runtime.block_on(async {
            let mut retried = false;
            loop {
                let (retry, reason) = match self.post(report).await {
                    Ok(resp) if resp.status().is_success() => return Ok(()),
                    Ok(resp) => (resp.status().is_server_error(), refusal(resp).await),
                    Err(e) => (true, kiln_spec::errors::error_chain(&e.without_url())),
                };
                if !retry || retried {
                    return Err(fail(reason, !retry));
                }
                retried = true;
                tokio::time::sleep(RETRY_AFTER).await;
            }
        })
    }

    async fn post(&self, report: &Report) -> reqwest::Result<reqwest::Response> {
        let mut request = self.client.post(&self.url).json(report);
        if let Some(value) = self.token.as_deref().and_then(authorization) {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        request.send().await
    }

    /// What the installed node's agent needs to report `agent-ready` for `image_sha256`:
    /// `None` without a token, which the provisioner would refuse.
    pub fn enrolment(&self, image_sha256: &str) -> Option<Enrolment> {
        Some(Enrolment {
            phone_home: self.url.clone(),
            token: self.token.clone()?,
            image_sha256: image_sha256.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};

    /// A server answering each connection with the next of `answers`, recording requests.
    fn server(answers: Vec<&'static str>) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/phone-home/52-54-00-00-00-01",
            listener.local_addr().unwrap()
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for answer in answers {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap();
                log.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase());
                let status = answer.split_once(' ').map_or(answer, |(code, _)| code);
                let body = answer.split_once(' ').map_or("", |(_, b)| b);
                write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
        });
        (url, seen)
    }

    #[test]
    fn reports_carry_the_token_and_a_server_error_is_retried_once() {
        let (url, seen) = server(vec!["503 busy", "204"]);
        let cmdline = format!("quiet kiln.phone-home={url} kiln.token=t0k");
        let ph = PhoneHome::from_cmdline(&cmdline).unwrap().unwrap();
        assert!(!format!("{ph:?}").contains("t0k"));
        ph.send(&report(Phase::Planned, Some("/dev/vda"))).unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        for request in seen.iter() {
            assert!(request.starts_with("post /phone-home/52-54-00-00-00-01 "));
            assert!(
                request.contains("\r\nauthorization: bearer t0k\r\n"),
                "{request}"
            );
            assert!(
                request.ends_with(r#"{"phase":"planned","message":"/dev/vda"}"#),
                "{request}"
            );
        }
        let e = ph.enrolment(&"a".repeat(64)).unwrap();
        assert_eq!(
            (e.phone_home.as_str(), e.token.as_str()),
            (url.as_str(), "t0k")
        );
    }

    #[test]
    fn a_refusal_is_not_retried_and_says_why() {
        let (url, seen) = server(vec!["403 the token is not this node's", "204"]);
        let ph = PhoneHome::new(&url, None).unwrap();
        let err = ph
            .send(&report(Phase::Failed, Some("boom")))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("reporting failed to {url}: HTTP 403"))
                && err.ends_with("the token is not this node's"),
            "{err}"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert!(!seen.lock().unwrap()[0].contains("authorization"));
        assert_eq!(ph.enrolment("aa"), None, "no token, no enrolment");
        assert!(
            PhoneHome::from_cmdline("quiet kiln.token=x")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn messages_are_cut_to_what_the_provisioner_accepts() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let r = report(Phase::Failed, Some(&long));
        assert!(r.message.as_ref().unwrap().len() <= MAX_MESSAGE_BYTES);
        assert_eq!(r.problem(), None);
        assert_eq!(report(Phase::Installed, None).message, None);
    }
}
