//! The boot-chain trace: every DHCP, TFTP, HTTP and phone-home event, per MAC, appended as
//! JSON lines to `trace.jsonl` in the state directory (readable while the server runs), and
//! counted in Prometheus metrics (labels from closed sets only).
//!
//! What a client can make the trace keep is bounded: per MAC and server run, at most
//! [`ALLOWANCE`] reports and as many refused per-node requests ([`Trace::admit`]), and error
//! texts are cut to [`MAX_ERROR_BYTES`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_spec::enrol::{Phase, Report};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

pub const TRACE_FILE: &str = "trace.jsonl";

/// Reports, and refused per-node requests, kept per MAC and server run. An install sends a
/// dozen reports; the rest of the allowance is for retries and reinstalls.
pub const ALLOWANCE: usize = 512;

/// Longest error text kept in an event; longer ones (which may quote a client's input) are cut.
pub const MAX_ERROR_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `aa:bb:cc:dd:ee:ff`, or empty when the client could not be tied to a MAC.
    pub mac: String,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EventKind {
    DhcpReceived {
        message: String,
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        arch: Option<u16>,
        ipxe: bool,
    },
    DhcpSent {
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<Ipv4Addr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_file: Option<String>,
    },
    DhcpIgnored {
        message: String,
        reason: String,
    },
    Tftp {
        client: IpAddr,
        file: String,
        bytes: u64,
        blksize: usize,
        windowsize: u16,
        duration_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Http {
        client: IpAddr,
        method: String,
        path: String,
        status: u16,
        bytes: u64,
        duration_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// An accepted report ([`Report`], which bounds its sizes).
    PhoneHome {
        phase: Phase,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_sha256: Option<String>,
    },
}

impl From<Report> for EventKind {
    fn from(r: Report) -> EventKind {
        EventKind::PhoneHome {
            phase: r.phase,
            message: r.message,
            slot: r.slot,
            image_sha256: r.image_sha256,
        }
    }
}

/// What a client spends when it makes the trace keep an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Allowance {
    Reports,
    Refusals,
}

/// Whether to keep one more event a client caused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Keep,
    /// The allowance just ran out: keep one note saying so.
    LastNote,
    Drop,
}

impl EventKind {
    fn service(&self) -> &'static str {
        match self {
            EventKind::DhcpReceived { .. }
            | EventKind::DhcpSent { .. }
            | EventKind::DhcpIgnored { .. } => "dhcp",
            EventKind::Tftp { .. } => "tftp",
            EventKind::Http { .. } => "http",
            EventKind::PhoneHome { .. } => "phone-home",
        }
    }

    /// Why this step failed, if it did.
    pub fn failure(&self) -> Option<String> {
        match self {
            EventKind::DhcpSent { message, .. } if message == "nak" => {
                Some("address request refused (NAK)".into())
            }
            EventKind::DhcpIgnored { reason, .. } => Some(format!("not answered: {reason}")),
            EventKind::Tftp { error: Some(e), .. } | EventKind::Http { error: Some(e), .. } => {
                Some(e.clone())
            }
            EventKind::Http { status, .. } if *status >= 400 => Some(format!("HTTP {status}")),
            EventKind::PhoneHome {
                phase: Phase::Failed,
                message,
                ..
            } => Some(message.clone().unwrap_or_else(|| "reported failure".into())),
            _ => None,
        }
    }

    /// One line for a person: what happened, with its details.
    pub fn describe(&self) -> String {
        match self {
            EventKind::DhcpReceived {
                message,
                port,
                arch,
                ipxe,
            } => {
                let mut s = format!("{message} received on port {port}");
                if let Some(a) = arch {
                    let _ = write!(s, ", arch {a} ({})", arch_name(*a));
                }
                if *ipxe {
                    s.push_str(", from iPXE");
                }
                s
            }
            EventKind::DhcpSent {
                message,
                address,
                boot_file,
            } => {
                let mut s = format!("{message} sent");
                if let Some(a) = address {
                    let _ = write!(s, ", address {a}");
                }
                if let Some(f) = boot_file {
                    let _ = write!(s, ", boot file {f}");
                }
                s
            }
            EventKind::DhcpIgnored { message, .. } => format!("{message} ignored"),
            EventKind::Tftp {
                client,
                file,
                bytes,
                blksize,
                windowsize,
                duration_ms,
                ..
            } => format!(
                "{file} to {client}: {bytes} bytes in {duration_ms} ms (blksize {blksize}, window {windowsize})"
            ),
            EventKind::Http {
                client,
                method,
                path,
                status,
                bytes,
                duration_ms,
                ..
            } => format!(
                "{method} {path} from {client}: {status}, {bytes} bytes in {duration_ms} ms"
            ),
            EventKind::PhoneHome { phase, message, .. } => match message {
                Some(m) => format!("{phase}: {m}"),
                None => phase.to_string(),
            },
        }
    }
}

/// RFC 4578 client architecture names for the ones PXE firmware sends.
pub fn arch_name(arch: u16) -> &'static str {
    match arch {
        0 => "BIOS",
        6 => "x86 UEFI",
        7 | 9 => "x86-64 UEFI",
        10 => "ARM32 UEFI",
        11 => "ARM64 UEFI",
        15 => "x86 UEFI HTTP",
        16 => "x86-64 UEFI HTTP",
        19 => "ARM64 UEFI HTTP",
        _ => "unknown",
    }
}

/// One line per event, times relative to the first, failed steps marked, then a summary.
pub fn timeline(mac: &str, events: &[Event]) -> String {
    let mut out = format!("boot trace of {mac}\n");
    let Some(first) = events.first() else {
        out.push_str("no events recorded: the machine never reached this server\n");
        return out;
    };
    let start = UNIX_EPOCH + Duration::from_millis(first.at_ms);
    let _ = writeln!(out, "started {}", humantime::format_rfc3339_millis(start));
    let mut failures = Vec::new();
    for e in events {
        let offset = e.at_ms.saturating_sub(first.at_ms) as f64 / 1000.0;
        let failure = e.kind.failure();
        let mark = if failure.is_some() { "FAIL" } else { "ok  " };
        let _ = write!(
            out,
            "{offset:>9.3}s  {mark}  {:<10}  {}",
            e.kind.service(),
            e.kind.describe()
        );
        if let Some(why) = &failure {
            let _ = write!(out, "  <- {why}");
            failures.push(format!("{}: {why}", e.kind.service()));
        }
        out.push('\n');
    }
    let last = events.last().map(|e| e.kind.describe()).unwrap_or_default();
    let _ = writeln!(out, "last step: {last}");
    if failures.is_empty() {
        out.push_str("no failures\n");
    } else {
        let _ = writeln!(out, "{} failed step(s):", failures.len());
        for f in failures {
            let _ = writeln!(out, "  - {f}");
        }
    }
    out
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    service: String,
    event: String,
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("opening trace store {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading trace store {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The recorder shared by all services.
#[derive(Debug)]
pub struct Trace {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    clients: Mutex<HashMap<IpAddr, String>>,
    /// Events kept per (MAC, allowance) in this run.
    spent: Mutex<HashMap<(String, Allowance), usize>>,
    registry: Registry,
    events: Family<EventLabels, Counter>,
    bytes: Family<ServiceLabels, Counter>,
}

impl Trace {
    pub fn open(state_dir: &Path) -> Result<Trace, TraceError> {
        let path = state_dir.join(TRACE_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| TraceError::Open {
                path: path.clone(),
                source,
            })?;
        let mut registry = Registry::with_prefix("kiln_netboot");
        let events = Family::<EventLabels, Counter>::default();
        let bytes = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "events",
            "Boot-chain events by service, kind and result",
            events.clone(),
        );
        registry.register("bytes", "Bytes sent to boot clients", bytes.clone());
        Ok(Trace {
            path,
            file: Mutex::new(file),
            clients: Mutex::new(HashMap::new()),
            spent: Mutex::new(HashMap::new()),
            registry,
            events,
            bytes,
        })
    }

    /// Remembers which MAC uses `ip`, so TFTP and HTTP requests (which carry only an address)
    /// land on the right machine's timeline.
    pub fn learn(&self, ip: IpAddr, mac: &str) {
        if !ip.is_unspecified() {
            lock(&self.clients).insert(ip, mac.to_string());
        }
    }

    pub fn mac_for(&self, ip: IpAddr) -> String {
        lock(&self.clients).get(&ip).cloned().unwrap_or_default()
    }

    /// Spends one event of `mac`'s allowance. Call it only for MACs in the inventory, so
    /// the bookkeeping is bounded too.
    pub fn admit(&self, mac: &str, what: Allowance) -> Admit {
        let mut spent = lock(&self.spent);
        let n = spent.entry((mac.to_string(), what)).or_insert(0);
        *n = n.saturating_add(1);
        match *n {
            n if n <= ALLOWANCE => Admit::Keep,
            n if n == ALLOWANCE + 1 => Admit::LastNote,
            _ => Admit::Drop,
        }
    }

    pub fn record(&self, mac: &str, mut kind: EventKind) {
        if let EventKind::Tftp { error: Some(e), .. } | EventKind::Http { error: Some(e), .. } =
            &mut kind
        {
            cut(e, MAX_ERROR_BYTES);
        }
        let event_name = match &kind {
            EventKind::DhcpReceived { message, .. }
            | EventKind::DhcpSent { message, .. }
            | EventKind::DhcpIgnored { message, .. } => message.clone(),
            EventKind::Tftp { .. } => "read".into(),
            EventKind::Http { method, .. } => method.to_ascii_lowercase(),
            EventKind::PhoneHome { phase, .. } => phase.as_str().into(),
        };
        let result = if kind.failure().is_some() {
            "failed"
        } else {
            "ok"
        };
        self.events
            .get_or_create(&EventLabels {
                service: kind.service().into(),
                event: event_name,
                result: result.into(),
            })
            .inc();
        if let EventKind::Tftp { bytes, .. } | EventKind::Http { bytes, .. } = &kind {
            self.bytes
                .get_or_create(&ServiceLabels {
                    service: kind.service().into(),
                })
                .inc_by(*bytes);
        }
        let event = Event {
            at_ms: now_ms(),
            mac: mac.to_string(),
            kind,
        };
        tracing::debug!(mac, event = ?event.kind, "boot event");
        let mut line = serde_json::to_string(&event).unwrap_or_default();
        line.push('\n');
        if let Err(e) = lock(&self.file).write_all(line.as_bytes()) {
            tracing::warn!("writing trace store {}: {e}", self.path.display());
        }
    }

    /// Prometheus text exposition of the counters.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        self.encode_counters(&mut out);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }

    /// The counters without the exposition's end, for an exposition with other registries.
    pub fn encode_counters(&self, out: &mut String) {
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(out, &self.registry);
    }

    pub fn events_for(&self, mac: &str) -> Result<Vec<Event>, TraceError> {
        read_events(&self.path, mac)
    }
}

/// Events of `mac` (canonical form) from a trace store file, oldest first. Lines that do not
/// parse (a crash mid-write) are skipped.
pub fn read_events(path: &Path, mac: &str) -> Result<Vec<Event>, TraceError> {
    read_matching(path, |e| e.mac == mac)
}

/// The events of the trace file that `keep` accepts, oldest first.
pub fn read_matching(path: &Path, keep: impl Fn(&Event) -> bool) -> Result<Vec<Event>, TraceError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TraceError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut events = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(|source| TraceError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if let Ok(e) = serde_json::from_str::<Event>(&line)
            && keep(&e)
        {
            events.push(e);
        }
    }
    Ok(events)
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut.
fn cut(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max.saturating_sub('…'.len_utf8());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, kind: EventKind) -> Event {
        Event {
            at_ms: 1_795_000_000_000 + ms,
            mac: "52:54:00:00:00:01".into(),
            kind,
        }
    }

    fn sample() -> Vec<Event> {
        let client: IpAddr = [10, 0, 0, 100].into();
        vec![
            at(
                0,
                EventKind::DhcpReceived {
                    message: "discover".into(),
                    port: 67,
                    arch: Some(7),
                    ipxe: false,
                },
            ),
            at(
                3,
                EventKind::DhcpSent {
                    message: "offer".into(),
                    address: Some([10, 0, 0, 100].into()),
                    boot_file: Some("ipxe.efi".into()),
                },
            ),
            at(
                2100,
                EventKind::Tftp {
                    client,
                    file: "ipxe.efi".into(),
                    bytes: 1_024_000,
                    blksize: 1468,
                    windowsize: 1,
                    duration_ms: 310,
                    error: None,
                },
            ),
            at(
                9000,
                EventKind::Http {
                    client,
                    method: "GET".into(),
                    path: "/boot/52-54-00-00-00-01/boot.ipxe".into(),
                    status: 200,
                    bytes: 420,
                    duration_ms: 2,
                    error: None,
                },
            ),
            at(
                9500,
                EventKind::Http {
                    client,
                    method: "GET".into(),
                    path: "/boot/52-54-00-00-00-01/initrd.img".into(),
                    status: 404,
                    bytes: 0,
                    duration_ms: 1,
                    error: Some("\"initrd.img\" does not exist or is not a regular file".into()),
                },
            ),
            at(
                20000,
                Report::new(Phase::Failed, Some("no disk matched the rules".into())).into(),
            ),
        ]
    }

    #[test]
    fn timeline_marks_failures_and_summarises_them() {
        let text = timeline("52:54:00:00:00:01", &sample());
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/timeline.txt");
        if std::env::var_os("KILN_BLESS").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        let expected =
            std::fs::read_to_string(&path).expect("golden file (KILN_BLESS=1 writes it)");
        assert_eq!(text, expected, "KILN_BLESS=1 rewrites the golden file");
        assert!(timeline("x", &[]).contains("never reached"));
    }

    #[test]
    fn events_round_trip_through_the_store_and_count_in_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let trace = Trace::open(dir.path()).unwrap();
        for e in sample() {
            trace.record(&e.mac, e.kind);
        }
        trace.record(
            "52:54:00:00:00:02",
            Report::new(Phase::Installed, None).into(),
        );
        let mine = trace.events_for("52:54:00:00:00:01").unwrap();
        assert_eq!(mine.len(), 6);
        assert_eq!(mine[2].kind, sample()[2].kind);
        let metrics = trace.metrics();
        assert!(
            metrics.contains(
                "kiln_netboot_events_total{service=\"http\",event=\"get\",result=\"failed\"} 1"
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains("kiln_netboot_bytes_total{service=\"tftp\"} 1024000"),
            "{metrics}"
        );
        assert!(
            metrics.contains(
                "kiln_netboot_events_total{service=\"phone-home\",event=\"failed\",result=\"failed\"} 1"
            ),
            "{metrics}"
        );
        // The counters alone are the same exposition without its end, for the fleet's.
        let mut counters = String::new();
        trace.encode_counters(&mut counters);
        assert_eq!(metrics, format!("{counters}# EOF\n"));
    }

    #[test]
    fn clients_spend_bounded_allowances_and_errors_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let trace = Trace::open(dir.path()).unwrap();
        let mac = "52:54:00:00:00:01";
        for _ in 0..ALLOWANCE {
            assert_eq!(trace.admit(mac, Allowance::Reports), Admit::Keep);
        }
        assert_eq!(trace.admit(mac, Allowance::Reports), Admit::LastNote);
        assert_eq!(trace.admit(mac, Allowance::Reports), Admit::Drop);
        assert_eq!(trace.admit(mac, Allowance::Refusals), Admit::Keep);
        assert_eq!(
            trace.admit("52:54:00:00:00:02", Allowance::Reports),
            Admit::Keep
        );

        trace.record(
            mac,
            EventKind::Http {
                client: [10, 0, 0, 9].into(),
                method: "POST".into(),
                path: "/phone-home/x".into(),
                status: 422,
                bytes: 0,
                duration_ms: 0,
                error: Some("é".repeat(1000)),
            },
        );
        let EventKind::Http { error: Some(e), .. } = &trace.events_for(mac).unwrap()[0].kind else {
            panic!("an HTTP event")
        };
        assert!(e.len() <= MAX_ERROR_BYTES && e.ends_with('…'), "{e}");
    }
}
