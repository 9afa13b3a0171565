//! Runs DHCP (67 and 4011), TFTP and HTTP together on one interface until shutdown:
//! [`serve`], the one entry point of `kiln pxe serve` and of callers that run the services
//! in-process (a rollout controller with its own [`Enrolment`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
pub use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, InventoryBackend, UnknownMacs};
use crate::dhcp::{self, AddressSettings, BootSettings, DhcpServer, DhcpSettings};
use crate::download::serve_connection;
use crate::enrol::Enrolment;
use crate::http::{HttpState, router};
use crate::leases::{self, LeasePool};
use crate::tftp::{TftpServer, session::Limits};
use crate::trace::Trace;
use kiln_spec::bootargs::BootDigests;
use kiln_spec::errors::ValidationErrors;
use kiln_spec::inventory::{NetbootMode, parse_mac};
use kiln_spec::{Appliance, Inventory};

/// Everything the services need, resolved (addresses known, files checked).
#[derive(Debug, Clone)]
pub struct Settings {
    pub interface: String,
    pub server_ip: Ipv4Addr,
    pub mode: NetbootMode,
    /// What machines missing from the inventory get.
    pub unknown_macs: UnknownMacs,
    pub artifacts: PathBuf,
    pub ipxe_dir: PathBuf,
    pub state_dir: PathBuf,
    pub http_listen: SocketAddr,
    /// How clients reach the HTTP service: `http://10.0.0.1:8080`.
    pub http_base: String,
    pub bios_file: String,
    pub efi_file: String,
    /// Authoritative mode: first and last pool address, lease time.
    pub pool: Option<(Ipv4Addr, Ipv4Addr)>,
    pub lease_secs: u64,
    pub addressing: AddressSettings,
    pub kernel_args: String,
    /// The PXE files' digests from the build manifest, for the boot script.
    pub boot_digests: BootDigests,
    /// The iPXE script template ([`kiln_spec::ipxe::DEFAULT_TEMPLATE`] or a user's).
    pub template: String,
    pub tftp_port: u16,
    pub tftp_limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("interface {0} has no IPv4 address")]
    NoAddress(String),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Trace(#[from] crate::trace::TraceError),
    #[error(transparent)]
    Leases(#[from] leases::StoreError),
    #[error("creating state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the appliance spec rendered for node {node} is invalid: {errors}")]
    NodeSpec {
        node: String,
        errors: ValidationErrors,
    },
}

/// The first IPv4 address of `interface` and its prefix length.
pub fn interface_ipv4(interface: &str) -> Result<(Ipv4Addr, u8), ServeError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|_| ServeError::NoAddress(interface.into()))?;
    for ifa in addrs {
        if ifa.interface_name != interface {
            continue;
        }
        let Some(ip) = ifa
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in())
            .map(|a| a.ip())
        else {
            continue;
        };
        let prefix = ifa
            .netmask
            .as_ref()
            .and_then(|m| m.as_sockaddr_in())
            .map(|m| u32::from(m.ip()).count_ones() as u8)
            .unwrap_or(24);
        return Ok((ip, prefix));
    }
    Err(ServeError::NoAddress(interface.into()))
}

/// A UDP socket on `addr`, tied to `device` (so broadcasts go out and come in there only),
/// allowed to broadcast, sharing the port with other servers on the host.
fn udp_socket(addr: SocketAddr, device: &str, what: &'static str) -> Result<UdpSocket, ServeError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind = |addr: SocketAddr| -> std::io::Result<UdpSocket> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.set_broadcast(true)?;
        s.bind_device(Some(device.as_bytes()))?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        UdpSocket::from_std(s.into())
    };
    bind(addr).map_err(|source| ServeError::Bind { what, addr, source })
}

/// Runs TFTP on a thread of its own with a single-threaded runtime, until shutdown. TFTP is
/// lock-step (a block, then its ACK): on the shared multi-threaded runtime every ACK of every
/// transfer woke a parked worker, and those wake-ups were most of the server's CPU per
/// download. One thread polling all transfers' sockets, as dnsmasq does, wakes once for
/// whatever is ready.
async fn serve_tftp_on_own_thread(
    tftp: Arc<TftpServer>,
    socket: UdpSocket,
    shutdown: CancellationToken,
) {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let started = socket.into_std().and_then(|socket| {
        std::thread::Builder::new()
            .name("kiln-tftp".into())
            .spawn(move || {
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .and_then(|runtime| {
                        runtime.block_on(async {
                            tftp.serve(UdpSocket::from_std(socket)?, shutdown).await;
                            Ok(())
                        })
                    });
                let _ = done_tx.send(served);
            })
    });
    let outcome = match started {
        Ok(_) => done_rx
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("the TFTP thread died"))),
        Err(e) => Err(e),
    };
    if let Err(e) = outcome {
        tracing::error!("TFTP service stopped: {e}");
    }
}

/// Every netbooting node's spec renders ([`Appliance::for_node`], with its first boot MAC):
/// a node whose overrides break the spec is found at start, not when it asks for its config.
fn check_node_specs(inventory: &Inventory, appliance: &Appliance) -> Result<(), ServeError> {
    for node in &inventory.spec.nodes {
        let Some(mac) = node.boot_macs.iter().find_map(|m| parse_mac(m)) else {
            continue;
        };
        appliance
            .for_node(node, Some(&mac))
            .map_err(|errors| ServeError::NodeSpec {
                node: node.name.clone(),
                errors,
            })?;
    }
    Ok(())
}

/// The state directory made and its boot-chain trace opened, for [`serve`] and whoever else
/// in the process shows the trace (the fleet view).
pub fn open_trace(state_dir: &Path) -> Result<Arc<Trace>, ServeError> {
    std::fs::create_dir_all(state_dir).map_err(|source| ServeError::StateDir {
        path: state_dir.to_path_buf(),
        source,
    })?;
    Ok(Arc::new(Trace::open(state_dir)?))
}

/// Serves each new inventory from `updates` until they end or `shutdown`; one whose node
/// specs do not check is refused (logged) and the last good one kept.
async fn follow_inventory(
    mut updates: tokio::sync::watch::Receiver<Inventory>,
    backend: Arc<InventoryBackend>,
    dhcp: Arc<DhcpServer>,
    appliance: Appliance,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            changed = updates.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
        let inventory = updates.borrow_and_update().clone();
        if let Err(e) = check_node_specs(&inventory, &appliance) {
            tracing::error!("a new inventory was refused, the last one is still served: {e}");
            continue;
        }
        let nodes = inventory.spec.nodes.len();
        backend.replace(inventory);
        if let Some(pool) = &dhcp.pool {
            pool.lock()
                .expect("lease pool lock")
                .set_reservations(backend.reservations());
        }
        tracing::info!(nodes, "netboot inventory updated");
    }
}

/// Binds every service, then serves `inventory` until `shutdown` is cancelled (each new
/// inventory sent on it is served from then on, once its nodes' specs check); HTTP finishes
/// in-flight requests first. Nodes get `appliance` rendered for them at `/config/MAC`, and
/// `enrolment` guards that and phone-home.
pub async fn serve(
    settings: Settings,
    mut inventory: tokio::sync::watch::Receiver<Inventory>,
    appliance: Appliance,
    enrolment: Arc<dyn Enrolment>,
    trace: Arc<Trace>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let first = inventory.borrow_and_update().clone();
    check_node_specs(&first, &appliance)?;
    let inventories = Arc::new(InventoryBackend::new(first, settings.unknown_macs));
    let backend: Arc<dyn Backend> = inventories.clone();
    let pool = match (settings.mode, settings.pool) {
        (NetbootMode::Dhcp, Some((start, end))) => {
            let mut pool = LeasePool::new(start, end, settings.lease_secs);
            pool.restore(leases::load(&settings.state_dir)?);
            pool.set_reservations(backend.reservations());
            Some(Mutex::new(pool))
        }
        _ => None,
    };
    let any = Ipv4Addr::UNSPECIFIED;
    let dhcp_socket = udp_socket((any, dhcp::SERVER_PORT).into(), &settings.interface, "DHCP")?;
    let pxe_socket = udp_socket(
        (any, dhcp::PXE_PORT).into(),
        &settings.interface,
        "proxyDHCP",
    )?;
    let tftp_socket = udp_socket(
        (settings.server_ip, settings.tftp_port).into(),
        &settings.interface,
        "TFTP",
    )?;
    let http_listener = tokio::net::TcpListener::bind(settings.http_listen)
        .await
        .map_err(|source| ServeError::Bind {
            what: "HTTP",
            addr: settings.http_listen,
            source,
        })?;

    let dhcp_server = Arc::new(DhcpServer {
        settings: DhcpSettings {
            mode: settings.mode,
            boot: BootSettings {
                server_ip: settings.server_ip,
                http_base: settings.http_base.clone(),
                bios_file: settings.bios_file.clone(),
                efi_file: settings.efi_file.clone(),
            },
            addressing: settings.addressing.clone(),
        },
        backend: backend.clone(),
        pool,
        state_dir: settings.state_dir.clone(),
        trace: trace.clone(),
    });
    let tftp = Arc::new(TftpServer {
        root: settings.ipxe_dir.clone(),
        limits: settings.tftp_limits,
        trace: trace.clone(),
    });
    let http_state = Arc::new(HttpState {
        artifacts: settings.artifacts.clone(),
        ipxe_dir: settings.ipxe_dir.clone(),
        base_url: settings.http_base.clone(),
        kernel_args: settings.kernel_args.clone(),
        digests: settings.boot_digests.clone(),
        template: settings.template.clone(),
        backend,
        appliance,
        enrolment,
        trace,
    });

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(follow_inventory(
        inventory,
        inventories,
        dhcp_server.clone(),
        http_state.appliance.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(
        dhcp_server
            .clone()
            .serve(dhcp_socket, dhcp::SERVER_PORT, shutdown.clone()),
    );
    tasks.spawn(dhcp_server.serve(pxe_socket, dhcp::PXE_PORT, shutdown.clone()));
    tasks.spawn(serve_tftp_on_own_thread(
        tftp,
        tftp_socket,
        shutdown.clone(),
    ));
    tracing::info!(
        interface = settings.interface,
        mode = ?settings.mode,
        server = %settings.server_ip,
        http = %settings.http_listen,
        "netboot services ready: DHCP 67/4011, TFTP {}, HTTP {}",
        settings.tftp_port,
        settings.http_base
    );
    accept_http(http_listener, http_state, &shutdown).await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Accepts HTTP connections until shutdown, then closes the ones still open.
async fn accept_http(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    shutdown: &CancellationToken,
) {
    let app = router(state.clone());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
            // Finished connections leave the set as they go.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        match accepted {
            Ok((stream, client)) => {
                connections.spawn(serve_connection(stream, client, state.clone(), app.clone()));
            }
            // Out of descriptors, say: the connections open now finish and free some.
            Err(e) => {
                tracing::warn!("accepting an HTTP connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
