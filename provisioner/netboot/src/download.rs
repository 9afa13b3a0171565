//! The HTTP service's connections: file requests (`GET` of an artifact, an iPXE binary or a
//! node's boot script) are answered here, the file's bytes going from the page cache to the
//! socket with `sendfile(2)`; the first request of any other kind hands the connection to the
//! router (hyper), which serves it from then on.
//!
//! A rack netbooting at once downloads the same kernel and initrd hundreds of times: copying
//! them through user space (read into a buffer, write from it) cost a third of nginx's
//! throughput. hyper's bodies are buffers, so the zero-copy answer is written ahead of it,
//! for the one request shape that matters, and everything else keeps the router.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Response, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use crate::http::{Answer, Download, FileRoute, HttpState, answer};

/// The longest request head answered here; longer ones go to the router.
const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;
/// The most a buffered answer (a script or an error text) may hold.
const MAX_BUFFERED: usize = 1024 * 1024;

/// A complete `GET` request head for a file route, without a body.
#[derive(Debug)]
pub struct Head {
    /// Its length in bytes, up to and including the blank line.
    pub len: usize,
    pub route: FileRoute,
    pub headers: HeaderMap,
    /// Whether the client keeps the connection open after the answer.
    pub keep_alive: bool,
}

/// The request head at the start of `bytes`, if it is one answered here: complete, HTTP/1.x,
/// `GET`, a file route, no body, no upgrade. Anything else (including bytes that are not
/// HTTP at all) is `None` and left to the router, which answers or refuses it.
pub fn parse_head(bytes: &[u8]) -> Option<Head> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut slots);
    let httparse::Status::Complete(len) = request.parse(bytes).ok()? else {
        return None;
    };
    if request.method? != "GET" {
        return None;
    }
    let route = FileRoute::from_path(request.path?)?;
    let mut headers = HeaderMap::new();
    for h in request.headers.iter() {
        headers.append(
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    let has = |name, word: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(word)))
        })
    };
    let body = headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v != "0")
        || headers.contains_key(header::TRANSFER_ENCODING);
    if body || headers.contains_key(header::UPGRADE) || headers.contains_key(header::EXPECT) {
        return None;
    }
    let keep_alive = match request.version? {
        1 => !has(header::CONNECTION, "close"),
        _ => false,
    };
    Some(Head {
        len,
        route,
        headers,
        keep_alive,
    })
}

/// Serves one accepted connection until the client closes it.
pub(crate) async fn serve_connection(
    mut stream: TcpStream,
    client: SocketAddr,
    state: Arc<HttpState>,
    router: Router,
) {
    let mut buf = vec![0; MAX_HEAD];
    loop {
        // Peeked, not read: a request answered by the router reaches it untouched.
        let seen = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let Some(head) = parse_head(&buf[..seen]) else {
            break;
        };
        if stream.read_exact(&mut buf[..head.len]).await.is_err() {
            return;
        }
        let answer = answer(&state, client, Method::GET, &head.headers, head.route).await;
        let sent = match answer {
            Answer::Done(response) => write_buffered(&mut stream, response, head.keep_alive).await,
            Answer::Send(download) => send_file(&mut stream, download, head.keep_alive).await,
        };
        if sent.is_err() || !head.keep_alive {
            return;
        }
    }
    let service = hyper::service::service_fn(move |mut request: axum::extract::Request<_>| {
        request.extensions_mut().insert(ConnectInfo(client));
        tower::ServiceExt::oneshot(router.clone(), request)
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(%client, "HTTP connection: {e}");
    }
}

/// The status line and headers of `head`, with `extra` headers, as HTTP/1.1 sends them.
fn head_bytes<B>(head: &Response<B>, keep_alive: bool, extra: &[(HeaderName, String)]) -> Vec<u8> {
    let status = head.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    let headers = head.headers().iter().map(|(n, v)| (n, v.as_bytes()));
    let extra = extra.iter().map(|(n, v)| (n, v.as_bytes()));
    for (name, value) in headers.chain(extra) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A response whose body is already in memory (a script, an error text, a 304).
async fn write_buffered(
    stream: &mut TcpStream,
    response: Response<Body>,
    keep_alive: bool,
) -> std::io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, MAX_BUFFERED)
        .await
        .map_err(std::io::Error::other)?;
    let head = Response::from_parts(parts, ());
    let length = missing_length(&head, body.len());
    let mut out = head_bytes(&head, keep_alive, length.as_slice());
    out.extend_from_slice(&body);
    stream.write_all(&out).await
}

/// The `Content-Length` a buffered answer of `len` bytes still needs: none when it has one,
/// and none for a 304 or 204, whose length would claim a body they never carry (RFC 9110
/// 8.6: a 304's length is the one a 200 would have had).
fn missing_length<B>(head: &Response<B>, len: usize) -> Option<(HeaderName, String)> {
    let bodiless = matches!(head.status().as_u16(), 204 | 304);
    (!bodiless && !head.headers().contains_key(header::CONTENT_LENGTH))
        .then(|| (header::CONTENT_LENGTH, len.to_string()))
}

/// The download's head, then its bytes straight from the file to the socket.
///
/// A file that shrinks under the download ends it early (its `Content-Length` can no longer
/// be met, so the connection closes and the trace records the shortfall), where a memory
/// map would have faulted. The artifacts sit in the page cache once the first node has
/// fetched them; a cold read blocks this worker for the disk's latency, as nginx's does.
async fn send_file(
    stream: &mut TcpStream,
    mut download: Box<Download>,
    keep_alive: bool,
) -> std::io::Result<()> {
    stream
        .write_all(&head_bytes(&download.head, keep_alive, &[]))
        .await?;
    let end = download.start + download.count;
    let mut offset = download.start as libc::off64_t;
    let file = download.file.as_fd();
    while (offset as u64) < end {
        let left = usize::try_from(end - offset as u64).unwrap_or(usize::MAX);
        let sent = stream
            .async_io(Interest::WRITABLE, || {
                nix::sys::sendfile::sendfile64(&*stream, file, Some(&mut offset), left)
                    .map_err(std::io::Error::from)
            })
            .await?;
        if sent == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file shrank while it was sent",
            ));
        }
        download.tally.sent += sent as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_gets_are_answered_here_and_everything_else_goes_to_the_router() {
        let raw = b"GET /boot/52-54-00-12-34-56/vmlinuz HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\nGET";
        let head = parse_head(raw).expect("a file GET");
        assert_eq!(
            head.len,
            raw.len() - "GET".len(),
            "the next request is not part of it"
        );
        assert_eq!(
            head.route,
            FileRoute::Boot {
                mac: "52-54-00-12-34-56".into(),
                file: "vmlinuz".into()
            }
        );
        assert_eq!(head.headers[header::RANGE], "bytes=0-9");
        assert!(head.keep_alive);

        let closing = |raw: &[u8]| parse_head(raw).map(|h| h.keep_alive);
        assert_eq!(
            closing(b"GET /artifacts/initrd.img HTTP/1.0\r\n\r\n"),
            Some(false)
        );
        assert_eq!(
            closing(b"GET /ipxe/ipxe.efi HTTP/1.1\r\nConnection: Close\r\n\r\n"),
            Some(false)
        );

        for other in [
            &b"GET /artifacts/initrd.img HTTP/1.1\r\nHost: x\r\n"[..], // incomplete
            b"HEAD /artifacts/initrd.img HTTP/1.1\r\n\r\n",
            b"POST /phone-home/52-54-00-12-34-56 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"GET /metrics HTTP/1.1\r\n\r\n",
            b"GET /artifacts/ HTTP/1.1\r\n\r\n",
            b"GET /artifacts/a%20b HTTP/1.1\r\n\r\n",
            b"GET /artifacts/a?x=1 HTTP/1.1\r\n\r\n",
            b"GET /artifacts/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /artifacts/a HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            assert!(
                parse_head(other).is_none(),
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn buffered_answers_get_a_length_unless_they_never_carry_a_body() {
        let with = |status: u16| Response::builder().status(status).body(()).unwrap();
        assert_eq!(
            missing_length(&with(404), 12),
            Some((header::CONTENT_LENGTH, "12".into()))
        );
        assert_eq!(missing_length(&with(304), 0), None);
        assert_eq!(missing_length(&with(204), 0), None);
        let mut known = with(200);
        known.headers_mut().insert(header::CONTENT_LENGTH, 5.into());
        assert_eq!(missing_length(&known, 5), None);
    }

    #[test]
    fn heads_are_written_as_http_1_1() {
        let head = Response::builder()
            .status(206)
            .header(header::CONTENT_LENGTH, "10")
            .header(header::ETAG, "\"a\"")
            .body(())
            .unwrap();
        assert_eq!(
            String::from_utf8(head_bytes(&head, true, &[])).unwrap(),
            "HTTP/1.1 206 Partial Content\r\ncontent-length: 10\r\netag: \"a\"\r\n\r\n"
        );
        let extra = [(header::CONTENT_TYPE, "text/plain".to_string())];
        assert!(
            String::from_utf8(head_bytes(&head, false, &extra))
                .unwrap()
                .ends_with("content-type: text/plain\r\nconnection: close\r\n\r\n")
        );
    }
}
