//! The agent's network API (`spec.remoteApi`): the local API's routes over HTTPS, admitting
//! only clients whose certificate the configured CA issued (mutual TLS). The controller
//! publishes the listener the config wants; the daemon's [`serve`] task binds it, and binds
//! again when it changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use kiln_spec::remote::RemoteApi;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::controllers::{ID, MergedConfig, Shared};
use crate::engine::{Controller, Ctx, ReconcileError, Resource};
use crate::status::Event;

pub const NAME: &str = "remote-api";

/// A client has this long to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon a listener that could not be bound is tried again.
const REBIND_PAUSE: Duration = Duration::from_secs(5);

/// Publishes the config's `remoteApi` to the server task.
#[derive(Debug)]
pub struct RemoteApiController {
    pub wanted: watch::Sender<Option<RemoteApi>>,
}

impl Controller for RemoteApiController {
    fn name(&self) -> &'static str {
        NAME
    }
    fn inputs(&self) -> Vec<&'static str> {
        vec![MergedConfig::KIND]
    }
    fn outputs(&self) -> Vec<&'static str> {
        Vec::new()
    }
    fn reconcile(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ReconcileError> {
        let want = ctx
            .get::<MergedConfig>(ID)?
            .and_then(|m| m.spec.remote_api.clone());
        self.wanted.send_if_modified(|current| {
            let changed = *current != want;
            *current = want;
            changed
        });
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteApiError {
    #[error("the remote API's TLS settings: {0}")]
    Tls(String),
    #[error("listening on {listen}: {source}")]
    Listen {
        listen: String,
        source: std::io::Error,
    },
}

fn tls_config(api: &RemoteApi) -> Result<rustls::ServerConfig, RemoteApiError> {
    let tls = |what: &str, e: &dyn std::fmt::Display| RemoteApiError::Tls(format!("{what}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(api.client_ca.as_bytes()) {
        roots
            .add(cert.map_err(|e| tls("clientCa", &e))?)
            .map_err(|e| tls("clientCa", &e))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| tls("clientCa", &e))?;
    let chain = CertificateDer::pem_slice_iter(api.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls("cert", &e))?;
    let key = PrivateKeyDer::from_pem_slice(api.key.as_bytes()).map_err(|e| tls("key", &e))?;
    rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls("cert and key", &e))
}

/// Accepted TCP connections become TLS streams on tasks of their own (a slow handshake holds
/// up no one), handed to axum as they complete.
struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The acceptor ended; this listener is being replaced.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Binds `api.listen` with its TLS settings.
async fn listen(api: &RemoteApi) -> Result<TlsListener, RemoteApiError> {
    let acceptor = TlsAcceptor::from(Arc::new(tls_config(api)?));
    let tcp = TcpListener::bind(&api.listen)
        .await
        .map_err(|source| RemoteApiError::Listen {
            listen: api.listen.clone(),
            source,
        })?;
    let local = tcp.local_addr().map_err(|source| RemoteApiError::Listen {
        listen: api.listen.clone(),
        source,
    })?;
    let (tx, ready) = mpsc::channel(64);
    let acceptor = tokio::spawn(async move {
        loop {
            let (stream, peer) = match tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("accepting on the remote API: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => tracing::info!("remote API: refused {peer}: {e}"),
                    Err(_) => tracing::info!("remote API: {peer} did not finish its handshake"),
                }
            });
        }
    });
    Ok(TlsListener {
        ready,
        local,
        acceptor,
    })
}

/// Serves `router` on the listener `wanted` names, until `wanted`'s sender goes away; a
/// listener that cannot be bound (the address is not up yet) is tried again. `serving` turns
/// true once what `wanted` names is served (at once when it names nothing).
pub async fn serve(
    mut wanted: watch::Receiver<Option<RemoteApi>>,
    router: Router,
    shared: Arc<Shared>,
    serving: watch::Sender<bool>,
) {
    loop {
        let api = wanted.borrow_and_update().clone();
        let server = match &api {
            None => {
                serving.send_replace(true);
                None
            }
            Some(api) => match listen(api).await {
                Ok(listener) => {
                    serving.send_replace(true);
                    shared.emit(Event::new(
                        "remote-api",
                        format!("serving the agent API on {}", listener.local),
                        None,
                    ));
                    let app = router.clone();
                    Some(tokio::spawn(async move {
                        let _ = axum::serve(listener, app).await;
                    }))
                }
                Err(e) => {
                    shared.emit(Event::new("remote-api-failed", e.to_string(), None));
                    tokio::select! {
                        changed = wanted.changed() => if changed.is_err() { return },
                        _ = tokio::time::sleep(REBIND_PAUSE) => {}
                    }
                    continue;
                }
            },
        };
        let changed = wanted.changed().await;
        if let Some(s) = server {
            s.abort();
        }
        if changed.is_err() {
            return;
        }
    }
}
