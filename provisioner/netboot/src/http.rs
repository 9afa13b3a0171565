//! HTTP: the per-MAC iPXE script, boot artifacts (HEAD, Range, ETag), iPXE binaries for UEFI
//! HTTP boot, per-node config, installer phone-home, the trace as JSON and Prometheus metrics.
//!
//! Routes:
//! - `GET /boot/MAC/boot.ipxe`: the rendered script; `GET|HEAD /boot/MAC/FILE`: an artifact,
//!   traced under that MAC (the script's URLs use this form)
//! - `GET|HEAD /artifacts/FILE`, `GET|HEAD /ipxe/FILE`
//! - `GET /config/MAC`: the node's appliance spec (YAML), `POST /phone-home/MAC`: a
//!   [`Report`]; both only with the node's token (`Authorization: Bearer TOKEN`)
//! - `GET /trace/MAC`, `GET /metrics`

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use futures::StreamExt;
use kiln_spec::Appliance;
use kiln_spec::bootargs::BootDigests;
use kiln_spec::enrol::{Report, token_from_header};
use kiln_spec::inventory::{InventoryNode, format_mac, parse_mac};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::backend::{Backend, Decision};
use crate::enrol::Enrolment;
use crate::ipxe::{self, Machine};
use crate::jail::{self, JailError};
use crate::trace::{ALLOWANCE, Admit, Allowance, EventKind, Trace};

/// Largest request body read: a report is a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

#[derive(Debug)]
pub struct HttpState {
    pub artifacts: PathBuf,
    pub ipxe_dir: PathBuf,
    /// `http://10.0.0.1:8080`, as clients reach this server.
    pub base_url: String,
    pub kernel_args: String,
    /// The build manifest's digests, which the script puts on the kernel command line.
    pub digests: BootDigests,
    pub template: String,
    pub backend: Arc<dyn Backend>,
    /// The spec each node's config is rendered from ([`Appliance::for_node`]).
    pub appliance: Appliance,
    pub enrolment: Arc<dyn Enrolment>,
    pub trace: Arc<Trace>,
}

type Shared = State<Arc<HttpState>>;
type Client = ConnectInfo<SocketAddr>;

/// The file routes' prefixes, for the router and for [`FileRoute::from_path`] alike.
const BOOT: &str = "/boot/";
const ARTIFACTS: &str = "/artifacts/";
const IPXE: &str = "/ipxe/";

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route(&format!("{BOOT}{{mac}}/{{*file}}"), get(boot_file))
        .route(
            &format!("{ARTIFACTS}{{*file}}"),
            file_under(FileRoute::Artifact),
        )
        .route(&format!("{IPXE}{{*file}}"), file_under(FileRoute::Ipxe))
        .route("/config/{mac}", get(node_config))
        .route("/phone-home/{mac}", post(phone_home))
        .route("/trace/{mac}", get(trace_json))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
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

    /// Like [`Access::fail`] for a request a client sent to a node's endpoint: recorded
    /// within the MAC's allowance of refusals.
    fn refuse(&self, status: StatusCode, why: String) -> Response {
        match self.state.trace.admit(&self.mac, Allowance::Refusals) {
            Admit::Keep => self.record(status, 0, Some(why.clone())),
            Admit::LastNote => self.record(
                status,
                0,
                Some(format!(
                    "more than {ALLOWANCE} refused requests for this MAC, no more are recorded; \
                     this one: {why}"
                )),
            ),
            Admit::Drop => {}
        }
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

/// A request for one of the file routes, as the router extracts it or as
/// [`crate::download`] reads it from a request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileRoute {
    /// `/boot/MAC/FILE`: the script (`boot.ipxe`) or an artifact, traced under that MAC.
    Boot {
        mac: String,
        file: String,
    },
    Artifact(String),
    Ipxe(String),
}

impl FileRoute {
    /// The route of a raw request path, where the router would read the same text from it:
    /// `None` for a path with a query, a fragment or a percent-escape (the router decodes
    /// those), and for every other route.
    pub fn from_path(path: &str) -> Option<FileRoute> {
        if path.contains(['%', '?', '#']) {
            return None;
        }
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        if let Some(rest) = path.strip_prefix(BOOT) {
            let (mac, file) = rest.split_once('/')?;
            return Some(FileRoute::Boot {
                mac: nonempty(mac)?,
                file: nonempty(file)?,
            });
        }
        if let Some(file) = path.strip_prefix(ARTIFACTS) {
            return Some(FileRoute::Artifact(nonempty(file)?));
        }
        Some(FileRoute::Ipxe(nonempty(path.strip_prefix(IPXE)?)?))
    }
}

/// A file route's answer: a finished response, or a file still to be sent after its head.
pub(crate) enum Answer {
    Done(Response),
    Send(Box<Download>),
}

/// A file's bytes `start..start + count` under `head`, recorded in the trace when dropped.
pub(crate) struct Download {
    pub head: Response<()>,
    pub file: tokio::fs::File,
    pub start: u64,
    pub count: u64,
    pub tally: Tally,
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let d = match self {
            Answer::Done(response) => return response,
            Answer::Send(d) => d,
        };
        let Download {
            head,
            file,
            count,
            mut tally,
            ..
        } = *d;
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
        head.map(|()| Body::from_stream(stream))
    }
}

/// The answer to a file route, whichever way the request came in.
pub(crate) async fn answer(
    state: &HttpState,
    client: SocketAddr,
    method: Method,
    headers: &HeaderMap,
    route: FileRoute,
) -> Answer {
    match route {
        FileRoute::Boot {
            mac: mac_text,
            file,
        } => {
            let path = format!("{BOOT}{mac_text}/{file}");
            let Some(mac) = mac_from_path(&mac_text) else {
                let access = access(state, String::new(), client, method, path);
                return Answer::Done(access.fail(
                    StatusCode::BAD_REQUEST,
                    format!("{mac_text:?} is not a MAC address"),
                ));
            };
            let mac_str = format_mac(&mac);
            state.trace.learn(client.ip(), &mac_str);
            let access = access(state, mac_str, client, method, path);
            if file == "boot.ipxe" {
                return Answer::Done(script(state, &access, &mac));
            }
            if state.backend.lookup(&mac) == Decision::Ignore {
                return Answer::Done(
                    access.fail(StatusCode::NOT_FOUND, "MAC is not in the inventory".into()),
                );
            }
            prepare(&state.artifacts, &file, headers, access).await
        }
        FileRoute::Artifact(file) => {
            let mac = state.trace.mac_for(client.ip());
            let access = access(state, mac, client, method, format!("{ARTIFACTS}{file}"));
            prepare(&state.artifacts, &file, headers, access).await
        }
        FileRoute::Ipxe(file) => {
            let mac = state.trace.mac_for(client.ip());
            let access = access(state, mac, client, method, format!("{IPXE}{file}"));
            prepare(&state.ipxe_dir, &file, headers, access).await
        }
    }
}

async fn boot_file(
    State(state): Shared,
    ConnectInfo(client): Client,
    method: Method,
    headers: HeaderMap,
    UrlPath((mac, file)): UrlPath<(String, String)>,
) -> Answer {
    answer(
        &state,
        client,
        method,
        &headers,
        FileRoute::Boot { mac, file },
    )
    .await
}

/// The handler of a route whose path ends in a file name: `variant` says which root it is under.
fn file_under(variant: fn(String) -> FileRoute) -> MethodRouter<Arc<HttpState>> {
    get(
        move |State(state): Shared,
              ConnectInfo(client): Client,
              method: Method,
              headers: HeaderMap,
              UrlPath(file): UrlPath<String>| async move {
            answer(&state, client, method, &headers, variant(file)).await
        },
    )
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
    let decision = state.backend.lookup(mac);
    let machine = match &decision {
        Decision::Boot { node } => Machine::Node {
            name: node,
            token: state.enrolment.install_token(node),
        },
        Decision::Discovery => Machine::Unknown,
        Decision::Ignore => {
            return access.fail(StatusCode::NOT_FOUND, "MAC is not in the inventory".into());
        }
    };
    let script = ipxe::script(
        &state.base_url,
        mac,
        machine,
        &state.digests,
        &state.kernel_args,
    );
    match script.render(&state.template) {
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
async fn prepare(root: &Path, name: &str, headers: &HeaderMap, access: Access<'_>) -> Answer {
    match prepare_download(root, name, headers, access).await {
        Ok(download) => Answer::Send(Box::new(download)),
        Err(response) => Answer::Done(response),
    }
}

async fn prepare_download(
    root: &Path,
    name: &str,
    headers: &HeaderMap,
    access: Access<'_>,
) -> Result<Download, Response> {
    let path = match jail::resolve(root, name) {
        Ok(p) => p,
        Err(e @ (JailError::Escapes(_) | JailError::Nul)) => {
            return Err(access.fail(StatusCode::FORBIDDEN, e.to_string()));
        }
        Err(e) => return Err(access.fail(StatusCode::NOT_FOUND, e.to_string())),
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            return Err(access.fail(StatusCode::FORBIDDEN, format!("opening {name}: {e}")));
        }
    };
    let meta = match file.metadata().await {
        Ok(m) => m,
        Err(e) => {
            let why = format!("{name}: {e}");
            return Err(access.fail(StatusCode::INTERNAL_SERVER_ERROR, why));
        }
    };
    let len = meta.len();
    let tag = etag(&meta);
    let text = |h| headers.get(h).and_then(|v: &HeaderValue| v.to_str().ok());
    if text(header::IF_NONE_MATCH).is_some_and(|v| etag_matches(v, &tag)) {
        access.record(StatusCode::NOT_MODIFIED, 0, None);
        return Err((StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response());
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
            return Err((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response());
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
        return Err(builder.body(Body::empty()).unwrap_or_default());
    }
    if start > 0
        && let Err(e) = file.seek(std::io::SeekFrom::Start(start)).await
    {
        return Err(access.fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("seeking {name}: {e}"),
        ));
    }
    let tally = Tally {
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
    Ok(Download {
        head: builder.body(()).unwrap_or_default(),
        file,
        start,
        count,
        tally,
    })
}

/// Records a streamed download when the body is finished or abandoned.
pub(crate) struct Tally {
    trace: Arc<Trace>,
    mac: String,
    client: IpAddr,
    method: Method,
    path: String,
    status: StatusCode,
    started: Instant,
    pub sent: u64,
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

/// A request to a node's endpoint from a client that proved to be the node.
struct NodeRequest<'a> {
    access: Access<'a>,
    mac: [u8; 6],
    node: InventoryNode,
}

/// The inventory node of the MAC in the path, if the request carries its token; else the
/// answer, recorded without the token.
fn authorise<'a>(
    state: &'a HttpState,
    client: SocketAddr,
    method: Method,
    path: String,
    mac_text: &str,
    headers: &HeaderMap,
) -> Result<NodeRequest<'a>, Box<Response>> {
    let Some(mac) = mac_from_path(mac_text) else {
        let a = access(state, String::new(), client, method, path);
        return Err(Box::new(a.fail(
            StatusCode::BAD_REQUEST,
            format!("{mac_text:?} is not a MAC address"),
        )));
    };
    let access = access(state, format_mac(&mac), client, method, path);
    let Some(node) = state.backend.node(&mac) else {
        return Err(Box::new(
            access.fail(StatusCode::NOT_FOUND, "MAC is not in the inventory".into()),
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(token_from_header);
    if let Err(refusal) = state.enrolment.verify(&node.name, presented) {
        return Err(Box::new(
            access.refuse(refusal.status(), refusal.to_string()),
        ));
    }
    Ok(NodeRequest { access, mac, node })
}

/// The node's own appliance spec: the server's with the node's overrides and host name.
async fn node_config(
    State(state): Shared,
    ConnectInfo(client): Client,
    UrlPath(mac_text): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/config/{mac_text}");
    let req = match authorise(&state, client, Method::GET, path, &mac_text, &headers) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    match state.appliance.for_node(&req.node, Some(&req.mac)) {
        Ok(spec) => {
            let body = spec.to_yaml();
            req.access.record(StatusCode::OK, body.len() as u64, None);
            ([(header::CONTENT_TYPE, "application/yaml")], body).into_response()
        }
        Err(errors) => req.access.fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the spec for node {} is invalid: {errors}", req.node.name),
        ),
    }
}

/// A [`Report`] from the node: recorded, counted and passed to the enrolment, within the
/// MAC's allowance.
async fn phone_home(
    State(state): Shared,
    ConnectInfo(client): Client,
    UrlPath(mac_text): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Json<Report>, JsonRejection>,
) -> Response {
    let path = format!("/phone-home/{mac_text}");
    let req = match authorise(&state, client, Method::POST, path, &mac_text, &headers) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    let report = match body {
        Ok(Json(report)) => report,
        Err(e) => {
            return req
                .access
                .refuse(e.status(), format!("bad report: {}", e.body_text()));
        }
    };
    if let Some(why) = report.problem() {
        return req.access.refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("bad report: {why}"),
        );
    }
    let mac = &req.access.mac;
    match state.trace.admit(mac, Allowance::Reports) {
        Admit::Keep => {}
        full => {
            let why = format!("more than {ALLOWANCE} reports for this MAC in this server run");
            if full == Admit::LastNote {
                req.access.record(
                    StatusCode::TOO_MANY_REQUESTS,
                    0,
                    Some(format!("{why}; further ones are refused, unrecorded")),
                );
            }
            return (StatusCode::TOO_MANY_REQUESTS, format!("{why}\n")).into_response();
        }
    }
    state.enrolment.report(&req.node.name, &req.mac, &report);
    state.trace.record(mac, report.into());
    StatusCode::NO_CONTENT.into_response()
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

async fn metrics(State(state): Shared, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (kind, body) = kiln_spec::exposition::negotiate(accept, state.trace.metrics());
    ([(header::CONTENT_TYPE, kind)], body).into_response()
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

    mod per_node {
        use super::super::*;
        use crate::backend::{InventoryBackend, UnknownMacs};
        use crate::enrol::MemoryEnrolment;
        use axum::extract::connect_info::MockConnectInfo;
        use kiln_spec::Inventory;
        use kiln_spec::enrol::{MAX_MESSAGE_BYTES, Phase, bearer};
        use tower::ServiceExt;

        const MAC: &str = "52-54-00-00-00-01";

        struct Server {
            dir: tempfile::TempDir,
            app: Router,
            state: Arc<HttpState>,
            own: String,
            other: String,
        }

        fn server() -> Server {
            let dir = tempfile::tempdir().unwrap();
            let inventory = Inventory::from_yaml(
                "apiVersion: kiln.dev/v1alpha1\nkind: Inventory\nspec:\n  nodes:\n    \
                 - {name: node-01, bootMACs: [\"52:54:00:00:00:01\"]}\n    \
                 - {name: node-02, bootMACs: [\"52:54:00:00:00:02\"]}\n",
            )
            .unwrap();
            let mut appliance = Appliance::default_spec();
            appliance.spec.hostname = "{name}".into();
            let enrolment = Arc::new(MemoryEnrolment::new(&inventory));
            let own = enrolment.install_token("node-01").unwrap();
            let other = enrolment.install_token("node-02").unwrap();
            let state = Arc::new(HttpState {
                artifacts: dir.path().into(),
                ipxe_dir: dir.path().into(),
                base_url: "http://10.0.0.1:8080".into(),
                kernel_args: String::new(),
                digests: BootDigests {
                    rootfs: "a".repeat(64),
                    kernel: "b".repeat(64),
                    initrd: "c".repeat(64),
                },
                template: kiln_spec::ipxe::DEFAULT_TEMPLATE.into(),
                backend: Arc::new(InventoryBackend::new(inventory, UnknownMacs::Ignore)),
                appliance,
                enrolment,
                trace: Arc::new(Trace::open(dir.path()).unwrap()),
            });
            let app =
                router(state.clone()).layer(MockConnectInfo(SocketAddr::from(([10, 0, 0, 9], 68))));
            Server {
                dir,
                app,
                state,
                own,
                other,
            }
        }

        impl Server {
            async fn call(
                &self,
                uri: &str,
                token: Option<&str>,
                body: Option<String>,
            ) -> (u16, String) {
                let mut req = axum::http::Request::builder()
                    .uri(uri)
                    .method(if body.is_some() { "POST" } else { "GET" });
                if let Some(t) = token {
                    req = req.header(header::AUTHORIZATION, bearer(t));
                }
                let req = match body {
                    Some(b) => req
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Body::from(b)),
                    None => req.body(Body::empty()),
                }
                .unwrap();
                let resp = self.app.clone().oneshot(req).await.unwrap();
                let status = resp.status().as_u16();
                let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap();
                (status, String::from_utf8_lossy(&bytes).into_owned())
            }

            async fn report(&self, body: &str) -> u16 {
                self.call(
                    &format!("/phone-home/{MAC}"),
                    Some(&self.own),
                    Some(body.into()),
                )
                .await
                .0
            }

            fn events(&self) -> Vec<EventKind> {
                let events = self.state.trace.events_for("52:54:00:00:00:01").unwrap();
                events.into_iter().map(|e| e.kind).collect()
            }
        }

        #[tokio::test]
        async fn config_needs_the_nodes_own_token_and_is_its_spec() {
            let s = server();
            let uri = format!("/config/{MAC}");
            let (status, body) = s.call(&uri, None, None).await;
            assert_eq!(status, 401, "{body}");
            assert_eq!(s.call(&uri, Some(&s.other), None).await.0, 403);
            assert_eq!(s.call(&uri, Some("nonsense"), None).await.0, 403);
            let (status, body) = s.call(&uri, Some(&s.own), None).await;
            assert_eq!(status, 200, "{body}");
            let spec = Appliance::from_yaml(&body).unwrap();
            assert_eq!(spec.spec.hostname, "node-01");
            assert_eq!(
                s.call("/config/52-54-00-00-00-09", Some(&s.own), None)
                    .await
                    .0,
                404
            );
            let script = s
                .call(&format!("/boot/{MAC}/boot.ipxe"), None, None)
                .await
                .1;
            assert!(
                script.contains(&format!(" kiln.token={} ", s.own)),
                "{script}"
            );

            let refusals: Vec<(u16, String)> = s
                .events()
                .into_iter()
                .filter_map(|e| match e {
                    EventKind::Http {
                        status,
                        error: Some(e),
                        ..
                    } => Some((status, e)),
                    _ => None,
                })
                .collect();
            let statuses: Vec<u16> = refusals.iter().map(|r| r.0).collect();
            assert_eq!(statuses, [401, 403, 403], "{refusals:?}");
            assert!(refusals[1].1.contains("not this node's"), "{refusals:?}");
            let stored = std::fs::read_to_string(s.dir.path().join("trace.jsonl")).unwrap();
            assert!(!stored.contains(&s.own) && !stored.contains(&s.other));
        }

        #[tokio::test]
        async fn reports_are_checked_recorded_and_end_the_enrolment() {
            let s = server();
            let uri = format!("/phone-home/{MAC}");
            let good = r#"{"phase":"installing","message":"slot-write"}"#;
            assert_eq!(s.call(&uri, None, Some(good.into())).await.0, 401);
            assert_eq!(s.call(&uri, Some(&s.other), Some(good.into())).await.0, 403);
            assert_eq!(s.report(r#"{"phase":"made-up"}"#).await, 422);
            assert_eq!(s.report(r#"{"phase":"planned","ok":true}"#).await, 422);
            assert_eq!(s.report(r#"{"phase":"#).await, 400);
            let long = format!(
                r#"{{"phase":"failed","message":"{}"}}"#,
                "x".repeat(MAX_MESSAGE_BYTES + 1)
            );
            assert_eq!(s.report(&long).await, 422);
            let huge = format!(
                r#"{{"phase":"failed","message":"{}"}}"#,
                "x".repeat(MAX_BODY_BYTES)
            );
            assert_eq!(s.report(&huge).await, 413);
            // The largest report a machine makes fits the body limit: its hardware is cut to
            // what a report keeps; more than that is refused.
            let hw = kiln_spec::hardware::HardwareInventory {
                firmware: kiln_spec::hardware::Firmware::Uefi,
                disks: (0..40)
                    .map(|i| kiln_spec::hardware::Disk {
                        dev_path: format!("/dev/{}{i}", "x".repeat(200)),
                        by_id: Vec::new(),
                        size_bytes: u64::MAX,
                        logical_sector_size: 4096,
                        model: Some("m".repeat(200)),
                        serial: Some("s".repeat(200)),
                        wwn: None,
                        rotational: true,
                        removable: false,
                        transport: kiln_spec::hardware::Transport::Sas,
                        read_only: false,
                        holds_boot_medium: false,
                        partition_table: None,
                        signatures: Vec::new(),
                        unreadable: None,
                    })
                    .collect(),
                nics: (0..40)
                    .map(|i| kiln_spec::hardware::Nic {
                        name: format!("{}{i}", "n".repeat(200)),
                        mac: "52:54:00:00:00:01".into(),
                    })
                    .collect(),
                memory_bytes: u64::MAX,
                cpus: u32::MAX,
                boot_medium_unresolved: None,
            };
            let mut largest =
                kiln_spec::enrol::Report::new(Phase::Planned, Some("x".repeat(MAX_MESSAGE_BYTES)));
            largest.hardware = Some(kiln_spec::enrol::HardwareSummary::of(&hw));
            let body = serde_json::to_string(&largest).unwrap();
            assert!(body.len() < MAX_BODY_BYTES, "{} bytes", body.len());
            assert_eq!(s.report(&body).await, 204);
            let summary = largest.hardware.as_mut().unwrap();
            summary.disks.push(summary.disks[0].clone());
            assert_eq!(
                s.report(&serde_json::to_string(&largest).unwrap()).await,
                422
            );
            assert_eq!(s.report(good).await, 204);
            let events = s.events();
            assert!(events.contains(&EventKind::PhoneHome {
                phase: Phase::Installing,
                message: Some("slot-write".into()),
                slot: None,
                image_sha256: None,
            }));
            let metrics = s.state.trace.metrics();
            assert!(
                metrics.contains(
                    "kiln_netboot_events_total{service=\"phone-home\",event=\"installing\",result=\"ok\"} 1"
                ),
                "{metrics}"
            );

            assert_eq!(s.report(r#"{"phase":"agent-ready","slot":"A"}"#).await, 204);
            assert_eq!(s.report(good).await, 403, "the token expired");
            let config = s.call(&format!("/config/{MAC}"), Some(&s.own), None).await;
            assert_eq!(config.0, 403, "{}", config.1);
            let script = s
                .call(&format!("/boot/{MAC}/boot.ipxe"), None, None)
                .await
                .1;
            assert!(!script.contains("kiln.token="), "{script}");
        }

        #[tokio::test]
        async fn a_client_cannot_grow_the_trace_without_limit() {
            let s = server();
            let good = r#"{"phase":"installing","message":"wipe"}"#;
            for _ in 0..crate::trace::ALLOWANCE {
                assert_eq!(s.report(good).await, 204);
            }
            assert_eq!(s.report(good).await, 429);
            assert_eq!(s.report(good).await, 429);
            for _ in 0..=crate::trace::ALLOWANCE + 5 {
                s.call(&format!("/config/{MAC}"), Some(&s.other), None)
                    .await;
            }
            let events = s.events();
            let count = |want: fn(&EventKind) -> bool| events.iter().filter(|e| want(e)).count();
            assert_eq!(
                count(|e| matches!(e, EventKind::PhoneHome { .. })),
                crate::trace::ALLOWANCE
            );
            assert_eq!(
                count(|e| matches!(e, EventKind::Http { status: 429, .. })),
                1
            );
            assert_eq!(
                count(|e| matches!(e, EventKind::Http { status: 403, .. })),
                crate::trace::ALLOWANCE + 1,
                "the allowance of refusals, and one note"
            );
        }
    }
}
