//! kiln-bmc: out-of-band control of bare-metal machines.
//!
//! One [`BmcDriver`] trait with two drivers: IPMI 2.0 over LAN (RMCP+, [`ipmi`]) and Redfish
//! ([`redfish`]). [`fleet`] fans operations out over many BMCs with a global concurrency limit,
//! one operation at a time per BMC, timeouts and retries, streaming results as they arrive.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

pub use kiln_spec::inventory::BmcProtocol;

pub mod fleet;
pub mod ipmi;
pub mod redfish;

/// A BMC credential: a password or a Redfish session token. Kept out of `Debug` output so
/// that it never reaches logs or traces.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(secret: impl Into<String>) -> Password {
        Password(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// How to reach one BMC: the resolved form of an inventory `bmc:` entry or of CLI flags.
#[derive(Debug, Clone)]
pub struct BmcTarget {
    pub protocol: BmcProtocol,
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: Password,
    /// Redfish: PEM file with the CA that signed the BMC's certificate.
    pub ca_cert: Option<std::path::PathBuf>,
    /// Redfish: accept any certificate (explicit opt-in only).
    pub insecure: bool,
    /// Redfish: allow an `http://` address (explicit opt-in only; logged as a warning).
    pub plain_http: bool,
    /// Bound on one request/response exchange (one UDP attempt, one HTTP request).
    pub timeout: Duration,
    /// IPMI: retransmissions after the first attempt.
    pub retries: u32,
    /// IPMI: cipher suite (3 or 17).
    pub cipher_suite: ipmi::CipherSuite,
}

impl BmcTarget {
    /// How long a fleet rollout waits for one exchange: an IPMI datagram is answered at once
    /// or lost (and retried), a Redfish BMC's web server can be slow.
    pub fn rollout_timeout(protocol: BmcProtocol) -> Duration {
        match protocol {
            BmcProtocol::Ipmi => Duration::from_secs(1),
            BmcProtocol::Redfish => Duration::from_secs(10),
        }
    }

    /// The target an inventory `bmc:` entry describes, its password read from where the entry
    /// points (relative files against `base`, the inventory's directory).
    pub fn from_inventory(
        bmc: &kiln_spec::BmcEndpoint,
        base: &std::path::Path,
        timeout: Duration,
        retries: u32,
        cipher_suite: ipmi::CipherSuite,
    ) -> std::io::Result<BmcTarget> {
        Ok(BmcTarget {
            protocol: bmc.protocol,
            host: bmc.address.clone(),
            port: bmc.port(),
            username: bmc.username.clone(),
            password: Password::new(bmc.password_ref.resolve(base)?),
            ca_cert: bmc.ca_cert.as_ref().map(|c| base.join(c)),
            insecure: bmc.insecure,
            plain_http: bmc.allow_plain_http,
            timeout,
            retries,
            cipher_suite,
        })
    }

    /// `host:port`, for messages.
    pub fn label(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Typed failures callers branch on (retry, report, give up).
#[derive(Debug, thiserror::Error)]
pub enum BmcError {
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("{target} is unreachable: {reason}")]
    Unreachable { target: String, reason: String },
    #[error("no answer from {target} within {after:?}")]
    Timeout { target: String, after: Duration },
    #[error("{0} is not supported by this BMC")]
    Unsupported(String),
    #[error("BMC refused {command}: completion code {code:#04x} ({})", completion_code_meaning(*.code))]
    BmcError { command: String, code: u8 },
    #[error("BMC answered with HTTP {status} to {request}: {message}")]
    Http {
        request: String,
        status: u16,
        message: String,
    },
    #[error("malformed reply from the BMC: {0}")]
    Protocol(String),
    #[error("TLS setup: {0}")]
    Tls(String),
}

impl BmcError {
    /// Whether trying again later may succeed (transport trouble, a busy BMC).
    pub fn is_transient(&self) -> bool {
        match self {
            BmcError::Timeout { .. } | BmcError::Unreachable { .. } => true,
            // Node busy, timeout while processing, out of space/resources.
            BmcError::BmcError { code, .. } => matches!(code, 0xC0 | 0xC3 | 0xC4),
            BmcError::Http { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// A short stable name for the kind of failure (JSON output, metrics labels).
    pub fn kind(&self) -> &'static str {
        match self {
            BmcError::Auth(_) => "auth",
            BmcError::Unreachable { .. } => "unreachable",
            BmcError::Timeout { .. } => "timeout",
            BmcError::Unsupported(_) => "unsupported",
            BmcError::BmcError { .. } => "bmc-error",
            BmcError::Http { .. } => "http",
            BmcError::Protocol(_) => "protocol",
            BmcError::Tls(_) => "tls",
        }
    }
}

/// The IPMI 2.0 table 5 generic completion codes.
pub fn completion_code_meaning(code: u8) -> &'static str {
    match code {
        0xC0 => "node busy",
        0xC1 => "invalid command",
        0xC2 => "invalid for this LUN",
        0xC3 => "timeout while processing",
        0xC4 => "out of space",
        0xC5 => "reservation cancelled",
        0xC6 => "request data truncated",
        0xC7 => "request data length invalid",
        0xC8 => "request data too long",
        0xC9 => "parameter out of range",
        0xCA => "cannot return the requested number of bytes",
        0xCB => "requested sensor, data or record not present",
        0xCC => "invalid data field in request",
        0xCD => "command illegal for this sensor or record",
        0xCE => "response could not be provided",
        0xCF => "duplicated request",
        0xD0 => "SDR repository in update mode",
        0xD1 => "device in firmware update mode",
        0xD2 => "BMC initialization in progress",
        0xD3 => "destination unavailable",
        0xD4 => "insufficient privilege level",
        0xD5 => "not supported in the present state",
        0xD6 => "sub-function disabled",
        0xFF => "unspecified error",
        0x01..=0x7E => "device specific (OEM)",
        0x80..=0xBE => "command specific",
        _ => "reserved",
    }
}

pub type Result<T, E = BmcError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    On,
    Off,
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PowerState::On => "on",
            PowerState::Off => "off",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerAction {
    On,
    Off,
    /// Ask the operating system to shut down (ACPI power button).
    SoftOff,
    Cycle,
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootDevice {
    /// No override: the firmware's own boot order.
    None,
    Pxe,
    Disk,
    Cdrom,
    BiosSetup,
}

impl fmt::Display for BootDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BootDevice::None => "none",
            BootDevice::Pxe => "pxe",
            BootDevice::Disk => "disk",
            BootDevice::Cdrom => "cdrom",
            BootDevice::BiosSetup => "bios-setup",
        })
    }
}

/// A boot device override: what the next (or every) boot starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BootOverride {
    pub device: BootDevice,
    /// Every boot instead of only the next one.
    pub persistent: bool,
    /// Boot in UEFI mode instead of legacy BIOS.
    pub uefi: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChassisStatus {
    pub power: PowerState,
    pub power_fault: bool,
    pub power_overload: bool,
    pub power_interlock: bool,
    pub cooling_fault: bool,
    pub drive_fault: bool,
    pub intrusion: bool,
    /// What the machine does when mains power returns ("always-off", "previous", "always-on").
    pub restore_policy: String,
}

/// Who made the machine and which one it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub vendor: Option<String>,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub firmware: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SelEntry {
    pub id: u16,
    /// Seconds since the epoch as the BMC keeps them, when the entry has a time stamp.
    pub timestamp: Option<u32>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SensorReading {
    pub name: String,
    /// Reading converted to units, when the sensor is a threshold (analog) sensor.
    pub value: Option<f64>,
    pub unit: String,
    /// The reading as the BMC's tooling would show it, e.g. "42 °C" or "0x0001".
    pub display: String,
}

/// What `probe` found out without changing anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    pub protocol: String,
    pub authenticated: bool,
    pub power: Option<PowerState>,
    pub boot_override: bool,
    pub virtual_media: bool,
    /// IPMI: cipher suites the session could use (only the one negotiated, when the BMC does
    /// not list them).
    pub cipher_suites: Vec<u8>,
    /// Redfish: service version.
    pub version: Option<String>,
    pub notes: Vec<String>,
}

/// Out-of-band control of one machine. Implementations serialize their own calls; callers may
/// share one driver between tasks.
#[async_trait::async_trait]
pub trait BmcDriver: Send + Sync {
    fn protocol(&self) -> BmcProtocol;
    async fn power_status(&self) -> Result<PowerState>;
    async fn power(&self, action: PowerAction) -> Result<()>;
    async fn boot_override(&self) -> Result<BootOverride>;
    async fn set_boot_override(&self, boot: BootOverride) -> Result<()>;
    async fn chassis_status(&self) -> Result<ChassisStatus>;
    async fn identity(&self) -> Result<Identity>;
    async fn sel(&self) -> Result<Vec<SelEntry>>;
    async fn clear_sel(&self) -> Result<()>;
    async fn sensors(&self) -> Result<Vec<SensorReading>>;
    async fn insert_media(&self, image_url: &str) -> Result<()>;
    async fn eject_media(&self) -> Result<()>;
    /// A non-destructive capability report: authentication, power read, boot override support.
    async fn probe(&self) -> Result<Capabilities>;
    /// Ends the session with the BMC (IPMI session slots and Redfish sessions are scarce).
    async fn close(&self) -> Result<()>;
}

/// The driver for `target.protocol`.
pub fn connect(target: BmcTarget) -> Result<Box<dyn BmcDriver>> {
    Ok(match target.protocol {
        BmcProtocol::Ipmi => Box::new(ipmi::IpmiDriver::new(target)),
        BmcProtocol::Redfish => Box::new(redfish::RedfishDriver::new(target)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show_in_debug_output() {
        let target = BmcTarget {
            protocol: BmcProtocol::Ipmi,
            host: "127.0.0.1".into(),
            port: 623,
            username: "admin".into(),
            password: Password::new("hunter2"),
            ca_cert: None,
            insecure: false,
            plain_http: false,
            timeout: Duration::from_secs(1),
            retries: 0,
            cipher_suite: ipmi::CipherSuite::Suite3,
        };
        let text = format!("{target:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("redacted"));
    }

    #[test]
    fn only_transport_trouble_and_busy_bmcs_are_retried() {
        let timeout = BmcError::Timeout {
            target: "x".into(),
            after: Duration::from_secs(1),
        };
        assert!(timeout.is_transient());
        assert!(!BmcError::Auth("wrong password".into()).is_transient());
        let busy = BmcError::BmcError {
            command: "chassis control".into(),
            code: 0xC0,
        };
        assert!(busy.is_transient());
        let priv_err = BmcError::BmcError {
            command: "chassis control".into(),
            code: 0xD4,
        };
        assert!(!priv_err.is_transient());
        assert!(priv_err.to_string().contains("insufficient privilege"));
    }
}
