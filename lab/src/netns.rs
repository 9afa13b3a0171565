//! Network namespaces, bridges, veth pairs and taps created (and removed) by tests and the lab.
//!
//! Everything is created through `ip` (iproute2) and removed when its guard is dropped, so a
//! failing test leaves nothing behind. Names carry the process id and a counter: tests running
//! in parallel never collide.

use std::ffi::OsStr;
use std::fs::File;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tool(#[from] kiln_exec::ToolError),
    #[error("entering network namespace {name}: {source}")]
    Enter {
        name: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = NetnsError> = std::result::Result<T, E>;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for a network interface (15 bytes):
/// the first letters of `prefix`, the process id and a counter, both in hex.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!("{:x}x{n:x}", std::process::id());
    let keep = 15usize.saturating_sub(suffix.len()).min(prefix.len());
    format!("{}{suffix}", &prefix[..keep])
}

/// Runs a command to completion and returns its stdout; a non-zero exit is an error that
/// carries the command line and its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    Ok(kiln_exec::output(cmd, "setting up the lab network")?)
}

/// A network namespace, deleted (with every interface inside it) when dropped, unless it was
/// opened with [`Netns::existing`] or handed over with [`Netns::detach`].
#[derive(Debug)]
pub struct Netns {
    name: String,
    owned: bool,
}

impl Netns {
    /// Creates a namespace named after `prefix` (made unique) with its loopback up.
    pub fn create(prefix: &str) -> Result<Netns> {
        let ns = Netns {
            name: unique_name(prefix),
            owned: true,
        };
        run(Command::new("ip").args(["netns", "add", &ns.name]))?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace someone else created (`ip netns add NAME`); left in place when dropped.
    pub fn existing(name: &str) -> Result<Netns> {
        let ns = Netns {
            name: name.to_string(),
            owned: false,
        };
        ns.open()?;
        Ok(ns)
    }

    /// Keeps the namespace after this handle is gone (it outlives the process); returns its
    /// name.
    pub fn detach(mut self) -> String {
        self.owned = false;
        std::mem::take(&mut self.name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Starts `cmd` (made with [`Netns::command`]) as a process killed when the guard drops.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Process> {
        let command = kiln_exec::describe(cmd);
        let child = cmd.spawn().map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
        Ok(Process { child, command })
    }

    /// `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// A bridge with spanning tree off and no forwarding delay, up, with an optional address
    /// (`10.0.0.1/24`).
    pub fn add_bridge(&self, name: &str, cidr: Option<&str>) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        if let Some(cidr) = cidr {
            self.add_address(name, cidr)?;
        }
        self.ip(&["link", "set", name, "up"])?;
        Ok(())
    }

    /// A tap device (for a QEMU NIC) enslaved to `bridge`, up.
    pub fn add_tap(&self, name: &str, bridge: &str) -> Result<()> {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        self.ip(&["link", "set", name, "master", bridge, "up"])?;
        Ok(())
    }

    /// A veth pair: `name` here, `peer_name` in `peer`, both up. Use [`Netns::set_master`] to
    /// plug this end into a bridge.
    pub fn add_veth(&self, name: &str, peer: &Netns, peer_name: &str) -> Result<()> {
        self.ip(&[
            "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", &peer.name,
        ])?;
        self.ip(&["link", "set", name, "up"])?;
        peer.ip(&["link", "set", peer_name, "up"])?;
        Ok(())
    }

    pub fn set_master(&self, dev: &str, bridge: &str) -> Result<()> {
        self.ip(&["link", "set", dev, "master", bridge])?;
        Ok(())
    }

    pub fn add_address(&self, dev: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", dev])?;
        Ok(())
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it opens live there.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = self.open()?;
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    NetnsError::Enter {
                        name: self.name.clone(),
                        source: e.into(),
                    }
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn open(&self) -> Result<File> {
        File::open(format!("/var/run/netns/{}", self.name)).map_err(|source| NetnsError::Enter {
            name: self.name.clone(),
            source,
        })
    }

    /// Sends IPv6 router advertisements (no prefix, no managed/other flags) on `dev` every
    /// second until the guard drops. iPXE waits about 13 s for IPv6 autoconfiguration on a
    /// link without a router; one advertisement ends that wait at once.
    pub fn start_router_advertisements(&self, dev: &str) -> Result<RouterAdvertiser> {
        // A fixed link-local source without duplicate detection: usable before carrier is up.
        run(self
            .command("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=0")]))?;
        self.ip(&["-6", "addr", "add", "fe80::1/64", "dev", dev, "nodad"])?;
        let file = self.open()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let dev = dev.to_string();
        let name = self.name.clone();
        let thread = std::thread::spawn(move || {
            let socket = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
                .and_then(|()| router_advertisement_socket(&dev));
            let (socket, target) = match socket {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(source) => {
                    let _ = ready_tx.send(Err(NetnsError::Enter { name, source }));
                    return;
                }
            };
            while !stop_flag.load(Ordering::Relaxed) {
                // Failures (no carrier yet) are expected early on: the next tick retries.
                let _ = socket.send_to(&ROUTER_ADVERTISEMENT, &target);
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(RouterAdvertiser {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NetnsError::Enter {
                name: self.name.clone(),
                source: std::io::Error::other("router advertisement thread ended"),
            }),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
        }
    }
}

/// ICMPv6 router advertisement: hop limit 64, no flags, router lifetime 0 (not a default
/// router), no options. The kernel fills in the checksum.
const ROUTER_ADVERTISEMENT: [u8; 16] = [134, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn router_advertisement_socket(dev: &str) -> std::io::Result<(socket2::Socket, socket2::SockAddr)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let index = nix::net::if_::if_nametoindex(dev).map_err(std::io::Error::from)?;
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    socket.bind_device(Some(dev.as_bytes()))?;
    socket.set_multicast_hops_v6(255)?;
    socket.set_multicast_if_v6(index)?;
    let source = std::net::SocketAddrV6::new(
        std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
        0,
        0,
        index,
    );
    socket.bind(&source.into())?;
    let all_nodes = std::net::SocketAddrV6::new(
        std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        0,
        0,
        index,
    );
    Ok((socket, all_nodes.into()))
}

/// Stops the advertisements when dropped.
#[derive(Debug)]
pub struct RouterAdvertiser {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for RouterAdvertiser {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A process started in a namespace; killed and reaped when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    command: String,
}

impl Process {
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (an early exit usually means a setup error).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits up to `timeout`; returns the exit status, or `None` if the
    /// process had to be killed.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    pub fn command(&self) -> &str {
        &self.command
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_fit_an_interface_name_and_differ() {
        let a = unique_name("kiln-bridge-");
        let b = unique_name("kiln-bridge-");
        assert!(a.len() <= 15, "{a}");
        assert_ne!(a, b);
        assert!(a.starts_with("kiln"));
    }

    #[test]
    fn namespaces_bridges_and_veths_carry_traffic_and_vanish_on_drop() {
        let a = Netns::create("kta").unwrap();
        let b = Netns::create("ktb").unwrap();
        a.add_bridge("br0", Some("10.77.0.1/24")).unwrap();
        a.add_veth("v0", &b, "v1").unwrap();
        a.set_master("v0", "br0").unwrap();
        b.add_address("v1", "10.77.0.2/24").unwrap();
        a.add_tap("tap0", "br0").unwrap();
        // Sockets opened in `enter` live in the namespace: a datagram crosses the veth.
        let server = a
            .enter(|| std::net::UdpSocket::bind("10.77.0.1:0"))
            .unwrap()
            .unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let port = server.local_addr().unwrap().port();
        b.enter(|| {
            let client = std::net::UdpSocket::bind("10.77.0.2:0").unwrap();
            client.send_to(b"hello", ("10.77.0.1", port)).unwrap();
        })
        .unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(from.ip().to_string(), "10.77.0.2");
        let name = a.name().to_string();
        drop(a);
        let list = run(Command::new("ip").args(["netns", "list"])).unwrap();
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&name))
        );
    }
}
