//! HTTP: the per-MAC iPXE script, boot artifacts (HEAD, Range, ETag), iPXE binaries for UEFI
//! HTTP boot, per-node config, installer phone-home, the trace as JSON and Prometheus metrics.
//!
//! Routes:
//! - `GET /boot/MAC/boot.ipxe`: the rendered script; `GET|HEAD /boot/MAC/FILE`: an artifact,
//!   traced under that MAC (the script's URLs use this form)
//! - `GET|HEAD /artifacts/FILE`, `GET|HEAD /ipxe/FILE`
//! - `GET /config/MAC`, `POST /phone-home/MAC`, `GET /trace/MAC`, `GET /metrics`

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use kiln_spec::inventory::{format_mac, parse_mac};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::backend::{Backend, Decision};
use crate::ipxe::{self, ScriptContext};
use crate::jail::{self, JailError};
use crate::trace::{EventKind, Trace};

#[derive(Debug)]
pub struct HttpState {
    pub artifacts: PathBuf,
    pub ipxe_dir: PathBuf,
    /// `http://10.0.0.1:8080`, as clients reach this server.
    pub base_url: String,
    pub kernel_args: String,
    /// The build manifest's digests as kernel arguments.
    pub digest_args: String,
    pub template: String,
    pub backend: Arc<dyn Backend>,
    pub trace: Arc<Trace>,
}

type Shared = State<Arc<HttpState>>;
type Client = ConnectInfo<SocketAddr>;

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/boot/{mac}/{*file}", get(boot_file))
        .route("/artifacts/{*file}", get(artifact))
        .route("/ipxe/{*file}", get(ipxe_binary))
        .route("/config/{mac}", get(node_config))
        .route("/phone-home/{mac}", post(phone_home))
        .route("/trace/{mac}", get(trace_json))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// One HTTP request's trace entry.
struct Access<'a> {
    state: &'a HttpState,
    mac: String,
    client: IpAddr,
    method: Method,
    path: String,
    started: Instant,
}

impl Access<'_> {
    fn record(&self, status: StatusCode, bytes: u64, error: Option<String>) {
        record_http(
            &self.state.trace,
            &self.mac,
            self.client,
            &self.method,
            &self.path,
            status,
            bytes,
            self.started,
            error,
        );
    }

    fn fail(&self, status: StatusCode, why: String) -> Response {
        self.record(status, 0, Some(why.clone()));
        (status, format!("{why}\n")).into_response()
    }
}

#[allow(clippy::too_many_arguments)]
fn record_http(
    trace: &Trace,
    mac: &str,
    client: IpAddr,
    method: &Method,
    path: &str,
    status: StatusCode,
    bytes: u64,
    started: Instant,
    error: Option<String>,
) {
    trace.record(
        mac,
        EventKind::Http {
            client,
            method: method.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            bytes,
            duration_ms: started.elapsed().as_millis() as u64,
            error,
        },
    );
}

fn mac_from_path(text: &str) -> Option<[u8; 6]> {
    parse_mac(text)
}

async fn boot_file(
    State(state): Shared,
    ConnectInfo(client): Client,
    method: Method,
    headers: HeaderMap,
    UrlPath((mac_text, file)): UrlPath<(String, String)>,
) -> Response {
    let path = format!("/boot/{mac_text}/{file}");
    let Some(mac) = mac_from_path(&mac_text) else {
        let access = access(&state, String::new(), client, method, path);
        return access.fail(
            StatusCode::BAD_REQUEST,
            format!("{mac_text:?} is not a MAC address"),
        );
    };
    let mac_str = format_mac(&mac);
    state.trace.learn(client.ip(), &mac_str);
    let access = access(&state, mac_str.clone(), client, method, path);
    if file == "boot.ipxe" {
        return script(&state, &access, &mac);
    }
    if state.backend.lookup(&mac) == Decision::Ignore {
        return access.fail(StatusCode::NOT_FOUND, "MAC is not in the inventory".into());
    }
    serve_file(&state.artifacts, &file, &headers, access).await
}

fn access(
    state: &HttpState,
    mac: String,
    client: SocketAddr,
    method: Method,
    path: String,
) -> Access<'_> {
    Access {
        state,
        mac,
        client: client.ip(),
        method,
        path,
        started: Instant::now(),
    }
}

fn script(state: &HttpState, access: &Access<'_>, mac: &[u8; 6]) -> Response {
    let node = match state.backend.lookup(mac) {
        Decision::Boot { node } => Some(node),
        Decision::Discovery => None,
        Decision::Ignore => {
            return access.fail(StatusCode::NOT_FOUND, "MAC is not in the inventory".into());
        }
    };
    let ctx = ScriptContext {
        base_url: state.base_url.clone(),
        mac: format_mac(mac),
        mac_path: format_mac(mac).replace(':', "-"),
        node,
        kernel_args: state.kernel_args.clone(),
        digest_args: state.digest_args.clone(),
    };
    match ipxe::render(&state.template, &ctx) {
        Ok(text) => {
            access.record(StatusCode::OK, text.len() as u64, None);
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
        }
        Err(e) => access.fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the iPXE script: {e}"),
        ),
    }
}

async fn artifact(
    State(state): Shared,
    ConnectInfo(client): Client,
    method: Method,
    headers: HeaderMap,
    UrlPath(file): UrlPath<String>,
) -> Response {
    let mac = state.trace.mac_for(client.ip());
    let access = access(&state, mac, client, method, format!("/artifacts/{file}"));
    serve_file(&state.artifacts, &file, &headers, access).await
}

async fn ipxe_binary(
    State(state): Shared,
    ConnectInfo(client): Client,
    method: Method,
    headers: HeaderMap,
    UrlPath(file): UrlPath<String>,
) -> Response {
    let mac = state.trace.mac_for(client.ip());
    let access = access(&state, mac, client, method, format!("/ipxe/{file}"));
    serve_file(&state.ipxe_dir, &file, &headers, access).await
}

/// A `Range` request header, interpreted against a file of `len` bytes (RFC 9110 14.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    Full,
    /// Inclusive byte positions.
    Partial {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

/// Single ranges only; multiple ranges and malformed headers get the whole file, which the
/// RFC allows.
pub fn parse_range(value: Option<&str>, len: u64) -> RangeRequest {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeRequest::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| s.parse::<u64>().ok();
    match (first.is_empty(), last.is_empty()) {
        (true, false) => match number(last) {
            Some(0) => RangeRequest::Unsatisfiable,
            Some(n) if len > 0 => RangeRequest::Partial {
                start: len.saturating_sub(n),
                end: len - 1,
            },
            Some(_) => RangeRequest::Unsatisfiable,
            None => RangeRequest::Full,
        },
        (false, _) => {
            let Some(start) = number(first) else {
                return RangeRequest::Full;
            };
            let end = if last.is_empty() {
                u64::MAX
            } else {
                match number(last) {
                    Some(e) if e >= start => e,
                    _ => return RangeRequest::Full,
                }
            };
            if start >= len {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial {
                    start,
                    end: end.min(len - 1),
                }
            }
        }
        (true, true) => RangeRequest::Full,
    }
}

/// Strong validator from size and modification time: artifacts are replaced, not edited.
fn etag(meta: &std::fs::Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("\"{:x}-{mtime:x}\"", meta.len())
}

fn etag_matches(list: &str, tag: &str) -> bool {
    list.split(',')
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == tag || t == "*")
}

/// Written here rather than with tower-http's `ServeDir`: that has no ETag or If-Range (a
/// resumed download must not splice two versions of an artifact) and reports no byte counts
/// for the per-MAC trace.
async fn serve_file(root: &Path, name: &str, headers: &HeaderMap, access: Access<'_>) -> Response {
    let path = match jail::resolve(root, name) {
        Ok(p) => p,
        Err(e @ (JailError::Escapes(_) | JailError::Nul)) => {
            return access.fail(StatusCode::FORBIDDEN, e.to_string());
        }
        Err(e) => return access.fail(StatusCode::NOT_FOUND, e.to_string()),
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return access.fail(StatusCode::FORBIDDEN, format!("opening {name}: {e}")),
    };
    let meta = match file.metadata().await {
        Ok(m) => m,
        Err(e) => return access.fail(StatusCode::INTERNAL_SERVER_ERROR, format!("{name}: {e}")),
    };
    let len = meta.len();
    let tag = etag(&meta);
    let text = |h| headers.get(h).and_then(|v: &HeaderValue| v.to_str().ok());
    if text(header::IF_NONE_MATCH).is_some_and(|v| etag_matches(v, &tag)) {
        access.record(StatusCode::NOT_MODIFIED, 0, None);
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response();
    }
    // If-Range with another version: the whole (new) file instead of a piece of it.
    let range_header = match text(header::IF_RANGE) {
        Some(v) if v.trim() != tag => None,
        _ => text(header::RANGE),
    };
    let (status, start, count) = match parse_range(range_header, len) {
        RangeRequest::Full => (StatusCode::OK, 0, len),
        RangeRequest::Partial { start, end } => {
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeRequest::Unsatisfiable => {
            access.record(
                StatusCode::RANGE_NOT_SATISFIABLE,
                0,
                Some(format!("range {range_header:?} outside {len} bytes")),
            );
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response();
        }
    };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, count)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, &tag)
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", start + count - 1),
        );
    }
    if access.method == Method::HEAD {
        access.record(status, 0, None);
        return builder.body(Body::empty()).unwrap_or_default();
    }
    if start > 0
        && let Err(e) = file.seek(std::io::SeekFrom::Start(start)).await
    {
        return access.fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("seeking {name}: {e}"),
        );
    }
    let mut tally = Tally {
        trace: access.state.trace.clone(),
        mac: access.mac,
        client: access.client,
        method: access.method,
        path: access.path,
        status,
        started: access.started,
        sent: 0,
        expected: count,
    };
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(count), 256 * 1024).map(
        move |chunk| {
            // Borrowing the whole guard moves it into the closure: it drops with the body.
            let tally = &mut tally;
            if let Ok(c) = &chunk {
                tally.sent += c.len() as u64;
            }
            chunk
        },
    );
    builder.body(Body::from_stream(stream)).unwrap_or_default()
}

/// Records a streamed download when the body is finished or abandoned.
struct Tally {
    trace: Arc<Trace>,
    mac: String,
    client: IpAddr,
    method: Method,
    path: String,
    status: StatusCode,
    started: Instant,
    sent: u64,
    expected: u64,
}

impl Drop for Tally {
    fn drop(&mut self) {
        let error = (self.sent < self.expected).then(|| {
            format!(
                "connection closed after {} of {} bytes",
                self.sent, self.expected
            )
        });
        record_http(
            &self.trace,
            &self.mac,
            self.client,
            &self.method,
            &self.path,
            self.status,
            self.sent,
            self.started,
            error,
        );
    }
}

async fn node_config(
    State(state): Shared,
    ConnectInfo(client): Client,
    UrlPath(mac_text): UrlPath<String>,
) -> Response {
    let path = format!("/config/{mac_text}");
    let Some(mac) = mac_from_path(&mac_text) else {
        let a = access(&state, String::new(), client, Method::GET, path);
        return a.fail(
            StatusCode::BAD_REQUEST,
            format!("{mac_text:?} is not a MAC address"),
        );
    };
    let a = access(&state, format_mac(&mac), client, Method::GET, path);
    match state.backend.node_config(&mac) {
        Some(config) => {
            let body = serde_json::to_string_pretty(&config).unwrap_or_default();
            a.record(StatusCode::OK, body.len() as u64, None);
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        None => a.fail(StatusCode::NOT_FOUND, "MAC is not in the inventory".into()),
    }
}

/// What the installer reports: `{"phase": "writing-image", "ok": true, "message": "…"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhoneHome {
    pub phase: String,
    #[serde(default = "yes")]
    pub ok: bool,
    #[serde(default)]
    pub message: Option<String>,
}

fn yes() -> bool {
    true
}

async fn phone_home(
    State(state): Shared,
    ConnectInfo(client): Client,
    UrlPath(mac_text): UrlPath<String>,
    body: Result<Json<PhoneHome>, JsonRejection>,
) -> Response {
    let path = format!("/phone-home/{mac_text}");
    let Some(mac) = mac_from_path(&mac_text) else {
        let a = access(&state, String::new(), client, Method::POST, path);
        return a.fail(
            StatusCode::BAD_REQUEST,
            format!("{mac_text:?} is not a MAC address"),
        );
    };
    let a = access(&state, format_mac(&mac), client, Method::POST, path);
    match body {
        Ok(Json(report)) => {
            state.trace.record(
                &format_mac(&mac),
                EventKind::PhoneHome {
                    phase: report.phase,
                    ok: report.ok,
                    message: report.message,
                },
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => a.fail(
            StatusCode::BAD_REQUEST,
            format!("bad report: {}", e.body_text()),
        ),
    }
}

async fn trace_json(State(state): Shared, UrlPath(mac_text): UrlPath<String>) -> Response {
    let Some(mac) = mac_from_path(&mac_text) else {
        return (StatusCode::BAD_REQUEST, "not a MAC address\n").into_response();
    };
    match state.trace.events_for(&format_mac(&mac)) {
        Ok(events) => Json(events).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn metrics(State(state): Shared) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.trace.metrics(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        use RangeRequest::*;
        assert_eq!(parse_range(None, 100), Full);
        assert_eq!(
            parse_range(Some("bytes=0-9"), 100),
            Partial { start: 0, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=90-"), 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range(Some("bytes=90-500"), 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range(Some("bytes=-10"), 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range(Some("bytes=-500"), 100),
            Partial { start: 0, end: 99 }
        );
        assert_eq!(parse_range(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-1"), 100), Full);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Full);
        assert_eq!(parse_range(Some("items=0-1"), 100), Full);
        assert_eq!(parse_range(Some("bytes=x-1"), 100), Full);
    }

    #[test]
    fn etags_match_lists_and_weak_forms() {
        assert!(etag_matches("\"a\", W/\"b\"", "\"b\""));
        assert!(etag_matches("*", "\"b\""));
        assert!(!etag_matches("\"a\"", "\"b\""));
    }
}
