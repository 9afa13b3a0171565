//! The local API: HTTP/1.1 with JSON bodies on a unix socket (`/run/kiln/agent.sock`).
//!
//! | method | path         | answer                                                  |
//! |--------|--------------|---------------------------------------------------------|
//! | GET    | /v1/status   | [`NodeStatus`]                                          |
//! | GET    | /v1/plan     | [`PlanReport`]: what an apply would change now          |
//! | POST   | /v1/apply    | re-reads the config, converges, answers [`NodeStatus`]  |
//! |        |              | (422 when the config is rejected)                       |
//! | GET    | /v1/events   | newline-delimited JSON [`Event`]s as they happen        |
//! | GET    | /v1/kubeconfig | the cluster's admin kubeconfig (first control plane;  |
//! |        |              | 404 elsewhere)                                          |
//! | POST   | /v1/upgrade?image=DIR\|URL[&reboot=true][&dryRun=true] | writes a signed   |
//! |        |              | image into the other slot: [`UpgradeReport`]            |
//! | POST   | /v1/rollback[?reboot=true] | makes the other good slot the default     |
//! | GET    | /metrics     | Prometheus text format (OpenMetrics when asked for)     |
//!
//! The same routes are served over HTTPS with client certificates when the node config asks
//! for it ([`crate::remote`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::controllers::{Shared, Sources, plan_now};
use crate::engine::Trigger;
use crate::host::Host;
use crate::slots::{self, UpgradeRequest};
use crate::status::NodeStatus;
#[cfg(doc)]
use crate::{
    slots::UpgradeReport,
    status::{Event, PlanReport},
};

pub const DEFAULT_SOCKET: &str = "/run/kiln/agent.sock";

#[derive(Debug)]
pub struct ApiState {
    pub shared: Arc<Shared>,
    pub trigger: Trigger,
    pub host: Host,
    pub sources: Sources,
    /// The controller `apply` wakes (it re-reads the sources; the rest follows).
    pub apply_controller: &'static str,
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/plan", get(plan))
        .route("/v1/apply", post(apply))
        .route("/v1/events", get(events))
        .route("/v1/upgrade", post(upgrade))
        .route("/v1/rollback", post(rollback))
        .route("/v1/kubeconfig", get(kubeconfig))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn json<T: serde::Serialize>(code: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(b) => (code, [(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The node's status now, its boot slots read from the ESP.
async fn current_status(s: &ApiState) -> NodeStatus {
    let mut st = s
        .shared
        .status
        .read()
        .map(|g| g.clone())
        .unwrap_or_default();
    let sysroot = s.host.sysroot.clone();
    st.boot = tokio::task::spawn_blocking(move || slots::status(&sysroot))
        .await
        .ok()
        .flatten();
    st
}

async fn status(State(s): State<Arc<ApiState>>) -> Response {
    json(StatusCode::OK, &current_status(&s).await)
}

/// An upgrade's refusals are the caller's to fix (409); the rest is the node's (500).
fn upgrade_error(e: &kiln_installer::upgrade::UpgradeError) -> Response {
    use kiln_installer::upgrade::UpgradeError as E;
    let code = match e {
        E::NotInstalled
        | E::NoBootCounting
        | E::BootedOnTrial { .. }
        | E::BootedBad { .. }
        | E::NoTrustedKeys(_)
        | E::UnsignedNotAllowed
        | E::Untrusted { .. }
        | E::Bundle { .. }
        | E::Fetch(_)
        | E::NothingToRollBackTo { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, e.to_string()).into_response()
}

/// Runs a slot operation off the async threads, answers what it returns, then reboots when
/// it says so.
async fn slot_operation<T: serde::Serialize + Send + 'static>(
    op: impl FnOnce() -> Result<(T, bool), kiln_installer::upgrade::UpgradeError> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(op).await {
        Ok(Ok((answer, reboot))) => {
            if reboot {
                slots::reboot_soon();
            }
            json(StatusCode::OK, &answer)
        }
        Ok(Err(e)) => upgrade_error(&e),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn upgrade(State(s): State<Arc<ApiState>>, Query(req): Query<UpgradeRequest>) -> Response {
    slot_operation(move || {
        slots::run_upgrade(&s.host.sysroot, &s.shared, &req).map(|r| {
            let reboot = r.rebooting;
            (r, reboot)
        })
    })
    .await
}

#[derive(Debug, serde::Deserialize)]
struct RebootQuery {
    #[serde(default)]
    reboot: bool,
}

async fn rollback(State(s): State<Arc<ApiState>>, Query(q): Query<RebootQuery>) -> Response {
    slot_operation(move || {
        slots::run_rollback(&s.host.sysroot, &s.shared).map(|entry| (entry, q.reboot))
    })
    .await
}

async fn plan(State(s): State<Arc<ApiState>>) -> Response {
    let r = tokio::task::spawn_blocking(move || {
        plan_now(&s.host, &s.sources).map_err(|e| e.to_string())
    })
    .await;
    match r {
        Ok(Ok(p)) => json(StatusCode::OK, &p),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn apply(State(s): State<Arc<ApiState>>) -> Response {
    let s2 = s.clone();
    let done = tokio::task::spawn_blocking(move || {
        s2.trigger
            .wake_and_wait(s2.apply_controller, Duration::from_secs(600))
    })
    .await
    .unwrap_or(false);
    if !done {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent did not finish the apply",
        )
            .into_response();
    }
    let st = s
        .shared
        .status
        .read()
        .map(|g| g.clone())
        .unwrap_or_default();
    let code = if st.config.valid {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    json(code, &st)
}

async fn kubeconfig(State(s): State<Arc<ApiState>>) -> Response {
    let path = format!("/{}", kiln_cluster::node::paths::ADMIN_KUBECONFIG);
    match s.host.sysroot.read(&path) {
        Ok(Some(text)) => ([(header::CONTENT_TYPE, "application/yaml")], text).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            format!("no {path} here: only the cluster's first control plane has one, once its bring-up made it"),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("reading {path}: {e}")).into_response(),
    }
}

async fn events(State(s): State<Arc<ApiState>>) -> Response {
    let rx = s.shared.events.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let mut line = serde_json::to_vec(&ev).unwrap_or_default();
                    line.push(b'\n');
                    return Some((Ok::<_, std::convert::Infallible>(Bytes::from(line)), rx));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn metrics(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let text = s.shared.metrics.render(&current_status(&s).await);
    let (kind, body) = kiln_spec::exposition::negotiate(accept, text);
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {path}: {source} (is kiln-agent running?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Http(String),
    #[error("the agent answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("decoding the agent's answer: {0}")]
    Decode(#[from] serde_json::Error),
}

/// A client of the local API.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "kiln-agent")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Http(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))
    }

    /// The answer's status and body.
    pub async fn call(&self, method: &str, path: &str) -> Result<(u16, Bytes), ClientError> {
        let resp = self.send(method, path).await?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    /// A JSON answer; `accept` lists non-200 codes whose body is still the answer.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        accept: &[u16],
    ) -> Result<(u16, T), ClientError> {
        let (status, body) = self.call(method, path).await?;
        if status != 200 && !accept.contains(&status) {
            return Err(ClientError::Status {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        Ok((status, serde_json::from_slice(&body)?))
    }

    /// The event stream, one JSON event per item, until the agent goes away.
    pub async fn events(
        &self,
    ) -> Result<tokio::sync::mpsc::Receiver<crate::status::Event>, ClientError> {
        let resp = self.send("GET", "/v1/events").await?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let mut body = resp.into_body();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    if let Ok(ev) = serde_json::from_slice(&line)
                        && tx.send(ev).await.is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}
