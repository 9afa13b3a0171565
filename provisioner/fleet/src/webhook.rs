//! Lifecycle events to an HTTP endpoint (inventory systems such as Foreman or Argo Events
//! consume them): each stage change is POSTed as the same JSON object `--events` writes, in
//! order, best effort. A slow or absent receiver never holds up the rollout: events queue up
//! to a bound and are dropped with a warning beyond it.

use std::time::Duration;

use tokio::sync::mpsc;

const QUEUE: usize = 4096;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Webhook {
    tx: mpsc::Sender<serde_json::Value>,
}

impl Webhook {
    /// Starts the sender on `runtime`.
    pub fn start(runtime: &tokio::runtime::Handle, url: String) -> Result<Webhook, String> {
        // kiln's one TLS provider (a no-op when the process installed it already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| format!("the webhook client: {e}"))?;
        let (tx, mut rx) = mpsc::channel::<serde_json::Value>(QUEUE);
        runtime.spawn(async move {
            while let Some(event) = rx.recv().await {
                match client.post(&url).json(&event).send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => tracing::warn!("webhook {url}: HTTP {}", r.status()),
                    Err(e) => tracing::warn!("webhook {url}: {}", e.without_url()),
                }
            }
        });
        Ok(Webhook { tx })
    }

    pub fn send(&self, event: serde_json::Value) {
        if self.tx.try_send(event).is_err() {
            tracing::warn!("webhook queue full: an event was dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One HTTP request's body, answered 204.
    async fn receive(listener: &tokio::net::TcpListener) -> serde_json::Value {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            data.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&data).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap();
                if body.len() >= len {
                    conn.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                        .await
                        .unwrap();
                    return serde_json::from_str(&body[..len]).unwrap();
                }
            }
        }
    }

    #[test]
    fn events_are_posted_in_order() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/events", listener.local_addr().unwrap());
            let hook = Webhook::start(&tokio::runtime::Handle::current(), url).unwrap();
            hook.send(serde_json::json!({"node": "node-01", "stage": "powering-on"}));
            hook.send(serde_json::json!({"node": "node-01", "stage": "netbooting"}));
            assert_eq!(receive(&listener).await["stage"], "powering-on");
            assert_eq!(receive(&listener).await["stage"], "netbooting");
        });
    }
}
