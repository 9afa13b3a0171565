//! The fleet view: a browser page of the rack and its JSON API, live over server-sent events,
//! with the provisioner's Prometheus metrics. It serves a running rollout (`kiln fleet rollout
//! --listen`) or a state directory on its own (`kiln fleet serve`).
//!
//! Routes:
//! - `GET /`, `GET /nodes/NAME`: the page (one embedded script and style sheet, no CDN)
//! - `GET /api/fleet?page=&per=&stage=&q=`: one page of the fleet table ([`view::FleetPage`])
//! - `GET /api/nodes/NAME`: a node's row and boot-chain timeline ([`view::NodeDetail`])
//! - `GET /api/events`: `change` events whenever the store changes
//! - `POST /api/nodes/NAME/retry`: try a failed node again; only with the view's token
//!   (`Authorization: Bearer TOKEN`), and only while a rollout runs in the same process
//! - `GET /metrics`: Prometheus text format

pub mod view;

use std::convert::Infallible;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kiln_netboot::trace::{self, Trace};
use kiln_spec::enrol::{token_from_header, token_hash, token_matches};
use tokio::sync::watch;

use crate::metrics::FleetMetrics;
use crate::rollout::{RetryRefused, Shared, now_ms};
use crate::store::{Snapshot, StoreError, StoreReader};
use view::FleetQuery;

/// Where the view reads the fleet from, and whom it asks to act.
pub trait FleetSource: Send + Sync {
    fn snapshot(&self) -> Result<Snapshot, StoreError>;
    /// Has a failed node tried again; `by` names who asked.
    fn retry(&self, node: &str, by: &str) -> Result<(), ActionError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(
        "this server only reads the state directory: actions need the rollout's own view \
         (kiln fleet rollout --listen)"
    )]
    ReadOnly,
    #[error(transparent)]
    Refused(#[from] RetryRefused),
}

/// A state directory read by another process than the rollout that writes it.
#[derive(Debug)]
pub struct StateDir(pub PathBuf);

impl FleetSource for StateDir {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        // Opened per read: a reader sees what the writer committed since it opened.
        StoreReader::open(&self.0)?.read()
    }

    fn retry(&self, _node: &str, _by: &str) -> Result<(), ActionError> {
        Err(ActionError::ReadOnly)
    }
}

impl FleetSource for Shared {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Shared::snapshot(self)
    }

    fn retry(&self, node: &str, by: &str) -> Result<(), ActionError> {
        Ok(Shared::retry(self, node, by)?)
    }
}

/// What the view serves from.
pub struct WebConfig {
    pub source: Arc<dyn FleetSource>,
    /// The netboot trace store, read for each node's boot chain.
    pub trace_file: PathBuf,
    /// The netboot services' live counters, when they run in this process.
    pub netboot: Option<Arc<Trace>>,
    pub metrics: Arc<FleetMetrics>,
    /// sha256 (hex) of the token actions need; `None` turns actions off.
    pub action_token_sha256: Option<String>,
    /// How often the store is looked at for changes to push.
    pub poll: Duration,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("trace_file", &self.trace_file)
            .field("actions", &self.action_token_sha256.is_some())
            .finish_non_exhaustive()
    }
}

impl WebConfig {
    /// The hash actions are checked against, from the token's text.
    pub fn token_sha256(token: &str) -> String {
        token_hash(token.trim())
    }
}

struct WebState {
    config: WebConfig,
    changes: watch::Receiver<u64>,
}

type Web = State<Arc<WebState>>;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Serves the view on `listener` until `shutdown` resolves; open event streams end with it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: WebConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (tx, changes) = watch::channel(0);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let source = config.source.clone();
    let poll = config.poll;
    let poller = tokio::spawn(async move {
        let mut last = None;
        loop {
            let source = source.clone();
            let fingerprint = tokio::task::spawn_blocking(move || fingerprint(&*source))
                .await
                .ok()
                .flatten();
            if fingerprint.is_some() && fingerprint != last {
                last = fingerprint;
                tx.send_modify(|v| *v += 1);
            }
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = stop_rx.changed() => return, // drops `tx`: every event stream ends
            }
        }
    });
    let app = router(Arc::new(WebState { config, changes }));
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
    let _ = poller.await;
    served
}

/// A hash of everything the page shows, so a change is pushed once.
fn fingerprint(source: &dyn FleetSource) -> Option<u64> {
    let s = source.snapshot().ok()?;
    let mut h = DefaultHasher::new();
    serde_json::to_string(&s.nodes).ok()?.hash(&mut h);
    s.reports.len().hash(&mut h);
    Some(h.finish())
}

fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/nodes/{name}", get(page))
        .route("/assets/app.js", get(script))
        .route("/assets/app.css", get(style))
        .route("/api/fleet", get(fleet))
        .route("/api/nodes/{name}", get(node))
        .route("/api/nodes/{name}/retry", post(retry))
        .route("/api/events", get(events))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            // Only this server's own script and style run in the page.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

fn problem(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": message.to_string() })),
    )
        .into_response()
}

/// Reads the store off the async workers (redb reads block).
async fn snapshot(state: &WebState) -> Result<Snapshot, Response> {
    let source = state.config.source.clone();
    match tokio::task::spawn_blocking(move || source.snapshot()).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(problem(StatusCode::SERVICE_UNAVAILABLE, e)),
        Err(e) => Err(problem(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

async fn fleet(State(state): Web, Query(query): Query<FleetQuery>) -> Response {
    match snapshot(&state).await {
        Ok(s) => Json(view::fleet_page(&s, &query, now_ms())).into_response(),
        Err(r) => r,
    }
}

async fn node(State(state): Web, UrlPath(name): UrlPath<String>) -> Response {
    let snap = match snapshot(&state).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let macs = snap
        .rollout
        .as_ref()
        .and_then(|r| r.machines.get(&name))
        .map(|m| m.macs.clone())
        .unwrap_or_default();
    let path = state.config.trace_file.clone();
    let events =
        tokio::task::spawn_blocking(move || trace::read_matching(&path, |e| macs.contains(&e.mac)))
            .await;
    let events = match events {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => return problem(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    match view::node_detail(&snap, &name, &events, now_ms()) {
        Some(d) => Json(d).into_response(),
        None => problem(
            StatusCode::NOT_FOUND,
            format!("no node {name} in this rollout"),
        ),
    }
}

async fn retry(State(state): Web, UrlPath(name): UrlPath<String>, headers: HeaderMap) -> Response {
    let Some(hash) = &state.config.action_token_sha256 else {
        return problem(
            StatusCode::FORBIDDEN,
            "actions are off: start the view with --token-file to allow them",
        );
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(token_from_header);
    if !presented.is_some_and(|t| token_matches(t, hash)) {
        let mut r = problem(
            StatusCode::UNAUTHORIZED,
            "actions need the view's token (Authorization: Bearer TOKEN)",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    match state.config.source.retry(&name, "the fleet view") {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "node": name, "retry": "asked" })),
        )
            .into_response(),
        Err(e @ ActionError::Refused(RetryRefused::UnknownNode(_))) => {
            problem(StatusCode::NOT_FOUND, e)
        }
        Err(e) => problem(StatusCode::CONFLICT, e),
    }
}

async fn events(
    State(state): Web,
) -> Sse<impl futures::Stream<Item = Result<sse::Event, Infallible>>> {
    let mut rx = state.changes.clone();
    // The page has just read the fleet: only changes after this one are news.
    rx.mark_unchanged();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let version = *rx.borrow_and_update();
        let event = sse::Event::default()
            .event("change")
            .data(version.to_string());
        Some((Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn metrics(State(state): Web, headers: HeaderMap) -> Response {
    let snap = match snapshot(&state).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let text = state
        .config
        .metrics
        .render(&snap, now_ms(), state.config.netboot.as_deref());
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (kind, body) = kiln_spec::exposition::negotiate(accept, text);
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}
