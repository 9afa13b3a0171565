//! Read-only TFTP server (RFC 1350 with options 2347–2349 and windowsize 7440) over a jailed
//! directory: each read request gets its own socket (transfer id) and task.

pub mod packet;
pub mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::jail::{self, JailError};
use crate::trace::{EventKind, Trace};
use packet::{ErrorCode, Packet};
use session::{Limits, Step, Transfer};

/// Retransmissions of one window before the transfer is given up.
const MAX_RETRIES: u32 = 5;

#[derive(Debug)]
pub struct TftpServer {
    pub root: PathBuf,
    pub limits: Limits,
    pub trace: Arc<Trace>,
}

impl TftpServer {
    /// Answers requests on `socket` until `shutdown` fires. Malformed and write requests get
    /// an error packet; the server keeps serving.
    pub async fn serve(self: Arc<Self>, socket: UdpSocket, shutdown: CancellationToken) {
        let local = match socket.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("tftp: no local address: {e}");
                return;
            }
        };
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("tftp: receiving: {e}");
                        continue;
                    }
                },
            };
            let reply = match packet::parse(&buf[..n]) {
                Ok(Packet::Rrq {
                    filename,
                    mode,
                    options,
                }) => {
                    let server = self.clone();
                    let token = shutdown.child_token();
                    tokio::spawn(async move {
                        server
                            .transfer(local, peer, filename, mode, options, token)
                            .await
                    });
                    continue;
                }
                Ok(Packet::Wrq { filename, .. }) => {
                    self.record_refusal(peer, &filename, "write requests are refused");
                    (ErrorCode::AccessViolation, "read-only server".to_string())
                }
                Ok(_) => (
                    ErrorCode::IllegalOperation,
                    "expected a read request".into(),
                ),
                Err(e) => (
                    ErrorCode::IllegalOperation,
                    format!("malformed request: {e}"),
                ),
            };
            let _ = socket.send_to(&error(reply.0, &reply.1), peer).await;
        }
    }

    fn record_refusal(&self, peer: SocketAddr, file: &str, why: &str) {
        self.trace.record(
            &self.trace.mac_for(peer.ip()),
            EventKind::Tftp {
                client: peer.ip(),
                file: file.to_string(),
                bytes: 0,
                blksize: 512,
                windowsize: 1,
                duration_ms: 0,
                error: Some(why.to_string()),
            },
        );
    }

    async fn transfer(
        &self,
        local: SocketAddr,
        peer: SocketAddr,
        filename: String,
        mode: String,
        options: packet::Options,
        shutdown: CancellationToken,
    ) {
        let started = Instant::now();
        let result = self
            .send_file(local, peer, &filename, &mode, &options, shutdown)
            .await;
        let (bytes, blksize, windowsize, error) = match result {
            Ok(s) => (s.bytes, s.blksize, s.windowsize, s.error),
            Err(e) => (0, 512, 1, Some(e)),
        };
        self.trace.record(
            &self.trace.mac_for(peer.ip()),
            EventKind::Tftp {
                client: peer.ip(),
                file: filename,
                bytes,
                blksize,
                windowsize,
                duration_ms: started.elapsed().as_millis() as u64,
                error,
            },
        );
    }

    async fn send_file(
        &self,
        local: SocketAddr,
        peer: SocketAddr,
        filename: &str,
        mode: &str,
        options: &packet::Options,
        shutdown: CancellationToken,
    ) -> Result<Summary, String> {
        let socket = UdpSocket::bind(SocketAddr::new(local.ip(), 0))
            .await
            .map_err(|e| format!("opening transfer socket: {e}"))?;
        socket
            .connect(peer)
            .await
            .map_err(|e| format!("connecting transfer socket: {e}"))?;
        let netascii = match mode.to_ascii_lowercase().as_str() {
            "octet" => false,
            "netascii" => true,
            other => {
                return refuse(
                    &socket,
                    ErrorCode::IllegalOperation,
                    format!("transfer mode {other:?} is not supported"),
                )
                .await;
            }
        };
        let path = match jail::resolve(&self.root, filename) {
            Ok(p) => p,
            Err(e @ (JailError::Escapes(_) | JailError::Nul)) => {
                return refuse(&socket, ErrorCode::AccessViolation, e.to_string()).await;
            }
            Err(e) => return refuse(&socket, ErrorCode::FileNotFound, e.to_string()).await,
        };
        let mut data = match tokio::fs::read(&path).await {
            Ok(d) => d,
            Err(e) => {
                return refuse(
                    &socket,
                    ErrorCode::AccessViolation,
                    format!("reading {filename}: {e}"),
                )
                .await;
            }
        };
        if netascii {
            data = to_netascii(&data);
        }
        let negotiated = session::negotiate(options, data.len() as u64, &self.limits);
        let mut transfer = Transfer::new(data.len() as u64, &negotiated);
        let mut summary = Summary {
            bytes: 0,
            blksize: negotiated.blksize,
            windowsize: negotiated.windowsize,
            error: None,
        };
        let oack = Packet::Oack {
            options: negotiated.oack.clone(),
        }
        .encode();
        if transfer.awaiting_oack_ack() {
            socket_send(&socket, &oack).await?;
        }
        let mut step = transfer.start();
        let mut out = Vec::with_capacity(negotiated.blksize + 4);
        let mut buf = vec![0u8; 65536];
        let mut retries = 0;
        // One shutdown waiter and one timer for the whole transfer, re-armed per packet:
        // registering new ones for every block was a measurable share of the server's CPU.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let ack_timer = tokio::time::sleep(negotiated.timeout);
        tokio::pin!(ack_timer);
        loop {
            if let Step::Send { first, last } = step {
                for n in first..=last {
                    let (start, end) = transfer.block_range(n);
                    packet::encode_data(
                        Transfer::wire_number(n),
                        &data[start as usize..end as usize],
                        &mut out,
                    );
                    socket_send(&socket, &out).await?;
                }
            }
            if step == Step::Done {
                summary.bytes = transfer.bytes_acked();
                return Ok(summary);
            }
            ack_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + negotiated.timeout);
            let received = tokio::select! {
                _ = &mut cancelled => {
                    let _ = socket_send(&socket, &error(ErrorCode::NotDefined, "server shutting down")).await;
                    return Err("server shut down during the transfer".into());
                }
                r = socket.recv(&mut buf) => Some(r),
                () = &mut ack_timer => None,
            };
            match received {
                None => {
                    retries += 1;
                    if retries > MAX_RETRIES {
                        summary.bytes = transfer.bytes_acked();
                        summary.error = Some(format!(
                            "client stopped acknowledging after {} bytes",
                            summary.bytes
                        ));
                        return Ok(summary);
                    }
                    step = match transfer.resend() {
                        Some(s) => s,
                        None => {
                            socket_send(&socket, &oack).await?;
                            Step::Wait
                        }
                    };
                }
                Some(Err(e)) => return Err(format!("receiving: {e}")),
                Some(Ok(n)) => match packet::parse(&buf[..n]) {
                    Ok(Packet::Ack { block }) => {
                        retries = 0;
                        step = transfer.on_ack(block);
                    }
                    Ok(Packet::Error { code, message }) => {
                        summary.bytes = transfer.bytes_acked();
                        // PXE firmware asks for tsize, then ends the transfer on purpose.
                        if !(code == ErrorCode::OptionNegotiation
                            || transfer.awaiting_oack_ack() && code == ErrorCode::NotDefined)
                        {
                            summary.error = Some(format!("client ended the transfer: {message}"));
                        }
                        return Ok(summary);
                    }
                    _ => step = Step::Wait,
                },
            }
        }
    }
}

#[derive(Debug)]
struct Summary {
    bytes: u64,
    blksize: usize,
    windowsize: u16,
    error: Option<String>,
}

async fn refuse(socket: &UdpSocket, code: ErrorCode, message: String) -> Result<Summary, String> {
    let _ = socket_send(socket, &error(code, &message)).await;
    Err(message)
}

async fn socket_send(socket: &UdpSocket, bytes: &[u8]) -> Result<(), String> {
    socket
        .send(bytes)
        .await
        .map(drop)
        .map_err(|e| format!("sending: {e}"))
}

fn error(code: ErrorCode, message: &str) -> Vec<u8> {
    Packet::Error {
        code,
        message: message.to_string(),
    }
    .encode()
}

/// RFC 1350 netascii: LF becomes CR LF, a bare CR becomes CR NUL.
fn to_netascii(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 16);
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            b => out.push(b),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn netascii_translates_line_ends() {
        assert_eq!(super::to_netascii(b"a\nb\rc"), b"a\r\nb\r\0c");
    }
}
