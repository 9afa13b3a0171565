//! `kiln bmc …`: out-of-band control of one BMC (`--host …`) or of the inventory nodes a
//! selector names (`--inventory fleet.yaml --nodes 'role=worker'`), over IPMI or Redfish.

use kiln_spec::serde_name;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_bmc::fleet::{self, FleetOptions, Member, Operation, OutcomeReport};
use kiln_bmc::ipmi::CipherSuite;
use kiln_bmc::{
    BmcDriver, BmcProtocol, BmcTarget, BootDevice, BootOverride, Capabilities, ChassisStatus,
    Identity, Password, PowerAction, PowerState, SelEntry, SensorReading,
};
use serde::Serialize;

use super::output::{OutputArgs, OutputFormat};

#[derive(Debug, clap::Subcommand)]
pub enum BmcCmd {
    /// Read or change the power state
    Power {
        #[arg(value_enum)]
        action: PowerArg,
        #[command(flatten)]
        common: Common,
    },
    /// Set the boot device of the next boot (--once) or of every boot
    Bootdev {
        #[arg(value_enum)]
        device: DeviceArg,
        /// Only the next boot
        #[arg(long)]
        once: bool,
        /// Boot in UEFI mode (legacy BIOS otherwise)
        #[arg(long)]
        uefi: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Show the boot device override
    Bootparam {
        #[command(flatten)]
        common: Common,
    },
    /// Vendor, model, serial number, firmware and chassis state
    Info {
        #[command(flatten)]
        common: Common,
    },
    /// Read (or clear) the system event log
    Sel {
        /// Erase the log instead of reading it
        #[arg(long)]
        clear: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Sensor readings
    Sensors {
        #[command(flatten)]
        common: Common,
    },
    /// Insert or eject a virtual CD image (Redfish)
    Media {
        #[command(subcommand)]
        action: MediaCmd,
    },
    /// Non-destructive capability check: login, power read, boot override, cipher suites
    Probe {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum MediaCmd {
    /// Attach an image by URL and mark it inserted
    Insert {
        url: String,
        #[command(flatten)]
        common: Common,
    },
    /// Eject the current image
    Eject {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PowerArg {
    Status,
    On,
    Off,
    /// Ask the operating system to shut down
    Soft,
    Cycle,
    Reset,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DeviceArg {
    Pxe,
    Disk,
    Cdrom,
    /// Firmware setup
    Bios,
    /// Clear the override
    None,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ProtocolArg {
    Ipmi,
    Redfish,
}

/// Which BMCs and how: one `--host`, or inventory nodes.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// BMC host name or address (Redfish: may be a URL such as http://host:8000)
    #[arg(long, short = 'H', conflicts_with_all = ["inventory", "nodes"], required_unless_present = "inventory")]
    host: Option<String>,
    /// BMC port (default 623 for IPMI, 443 for Redfish)
    #[arg(long, short = 'p')]
    port: Option<u16>,
    /// BMC user
    #[arg(long, short = 'U', default_value = "admin")]
    user: String,
    /// File holding the BMC password (else the environment variable KILN_BMC_PASSWORD)
    #[arg(long)]
    password_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "ipmi")]
    protocol: ProtocolArg,
    /// Redfish: PEM file with the CA that signed the BMC's certificate
    #[arg(long, conflicts_with = "insecure")]
    ca_cert: Option<PathBuf>,
    /// Redfish: accept any certificate
    #[arg(long)]
    insecure: bool,
    /// Redfish: allow an http:// BMC address (credentials travel unencrypted)
    #[arg(long)]
    allow_plain_http: bool,
    /// IPMI cipher suite: 3 (SHA-1) or 17 (SHA-256)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(3..=17))]
    cipher_suite: u8,
    /// Fleet inventory (kind: Inventory) whose nodes' BMCs to use
    #[arg(long, requires = "nodes")]
    inventory: Option<PathBuf>,
    /// Nodes of the inventory: names, globs and role=/label= terms, comma-separated
    #[arg(long)]
    nodes: Option<String>,
    /// Wait for one reply before retransmitting (IPMI, default 1s) or giving up on an HTTP
    /// request (Redfish, default 10s)
    #[arg(long, value_parser = super::parse_duration)]
    timeout: Option<Duration>,
    /// Retransmissions per IPMI request
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// Bound on a whole operation against one BMC, session setup included
    #[arg(long, default_value = "60s", value_parser = super::parse_duration)]
    deadline: Duration,
    /// BMCs worked on at once
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Tries per BMC for transient failures (timeouts, busy BMC)
    #[arg(long, default_value_t = 2)]
    attempts: u32,
    #[command(flatten)]
    output: OutputArgs,
}

/// What one operation produced, for output.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Reply {
    Done(Done),
    Power(PowerReply),
    Boot(BootOverride),
    Info(Info),
    Sel(Vec<SelEntry>),
    Sensors(Vec<SensorReading>),
    Probe(Capabilities),
}

#[derive(Debug, Serialize)]
struct Done {
    done: String,
}

#[derive(Debug, Serialize)]
struct PowerReply {
    power: PowerState,
}

#[derive(Debug, Serialize)]
struct Info {
    #[serde(flatten)]
    identity: Identity,
    chassis: ChassisStatus,
}

impl Reply {
    fn text(&self) -> String {
        match self {
            Reply::Done(d) => d.done.clone(),
            Reply::Power(p) => format!("power {}", p.power),
            Reply::Boot(b) => format!(
                "boot {} ({}, {})",
                b.device,
                if b.persistent {
                    "every boot"
                } else {
                    "next boot"
                },
                if b.uefi { "UEFI" } else { "legacy" }
            ),
            Reply::Info(i) => {
                let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                let c = &i.chassis;
                let faults: Vec<&str> = [
                    (c.power_fault, "power fault"),
                    (c.power_overload, "power overload"),
                    (c.cooling_fault, "cooling fault"),
                    (c.drive_fault, "drive fault"),
                    (c.intrusion, "intrusion"),
                ]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
                format!(
                    "vendor    {}\nmodel     {}\nserial    {}\nfirmware  {}\npower     {}\nrestore   {}\nfaults    {}",
                    show(&i.identity.vendor),
                    show(&i.identity.model),
                    show(&i.identity.serial),
                    show(&i.identity.firmware),
                    c.power,
                    c.restore_policy,
                    if faults.is_empty() {
                        "none".into()
                    } else {
                        faults.join(", ")
                    },
                )
            }
            Reply::Sel(entries) if entries.is_empty() => "event log empty".into(),
            Reply::Sel(entries) => entries
                .iter()
                .map(|e| {
                    format!(
                        "{:>5}  {:>10}  {}",
                        e.id,
                        e.timestamp
                            .map(|t| t.to_string())
                            .unwrap_or_else(|| "-".into()),
                        e.message
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Reply::Sensors(s) => s
                .iter()
                .map(|r| format!("{:<16}  {}", r.name, r.display))
                .collect::<Vec<_>>()
                .join("\n"),
            Reply::Probe(c) => {
                let mut lines = vec![
                    format!("protocol       {}", c.protocol),
                    format!("authenticated  {}", c.authenticated),
                    format!(
                        "power          {}",
                        c.power.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
                    ),
                    format!("boot override  {}", c.boot_override),
                    format!("virtual media  {}", c.virtual_media),
                ];
                if !c.cipher_suites.is_empty() {
                    let suites: Vec<String> = c.cipher_suites.iter().map(u8::to_string).collect();
                    lines.push(format!("cipher suites  {}", suites.join(", ")));
                }
                if let Some(v) = &c.version {
                    lines.push(format!("version        {v}"));
                }
                lines.extend(c.notes.iter().map(|n| format!("note           {n}")));
                lines.join("\n")
            }
        }
    }
}

fn operation(cmd: &BmcCmd) -> Operation<Reply> {
    let done = |what: String| Reply::Done(Done { done: what });
    match *cmd {
        BmcCmd::Power { action, .. } => {
            let action = match action {
                PowerArg::Status => None,
                PowerArg::On => Some(PowerAction::On),
                PowerArg::Off => Some(PowerAction::Off),
                PowerArg::Soft => Some(PowerAction::SoftOff),
                PowerArg::Cycle => Some(PowerAction::Cycle),
                PowerArg::Reset => Some(PowerAction::Reset),
            };
            Arc::new(move |d: Arc<dyn BmcDriver>| {
                Box::pin(async move {
                    match action {
                        None => Ok(Reply::Power(PowerReply {
                            power: d.power_status().await?,
                        })),
                        Some(a) => {
                            d.power(a).await?;
                            Ok(done(format!("power {}: requested", serde_name(&a))))
                        }
                    }
                })
            })
        }
        BmcCmd::Bootdev {
            device, once, uefi, ..
        } => {
            let boot = BootOverride {
                device: match device {
                    DeviceArg::Pxe => BootDevice::Pxe,
                    DeviceArg::Disk => BootDevice::Disk,
                    DeviceArg::Cdrom => BootDevice::Cdrom,
                    DeviceArg::Bios => BootDevice::BiosSetup,
                    DeviceArg::None => BootDevice::None,
                },
                persistent: !once,
                uefi,
            };
            Arc::new(move |d: Arc<dyn BmcDriver>| {
                Box::pin(async move {
                    d.set_boot_override(boot).await?;
                    Ok(Reply::Boot(d.boot_override().await?))
                })
            })
        }
        BmcCmd::Bootparam { .. } => Arc::new(|d: Arc<dyn BmcDriver>| {
            Box::pin(async move { Ok(Reply::Boot(d.boot_override().await?)) })
        }),
        BmcCmd::Info { .. } => Arc::new(|d: Arc<dyn BmcDriver>| {
            Box::pin(async move {
                Ok(Reply::Info(Info {
                    identity: d.identity().await?,
                    chassis: d.chassis_status().await?,
                }))
            })
        }),
        BmcCmd::Sel { clear, .. } => Arc::new(move |d: Arc<dyn BmcDriver>| {
            Box::pin(async move {
                if clear {
                    d.clear_sel().await?;
                    Ok(done("event log cleared".into()))
                } else {
                    Ok(Reply::Sel(d.sel().await?))
                }
            })
        }),
        BmcCmd::Sensors { .. } => Arc::new(|d: Arc<dyn BmcDriver>| {
            Box::pin(async move { Ok(Reply::Sensors(d.sensors().await?)) })
        }),
        BmcCmd::Media {
            action: MediaCmd::Insert { ref url, .. },
        } => {
            let url = url.clone();
            Arc::new(move |d: Arc<dyn BmcDriver>| {
                let url = url.clone();
                Box::pin(async move {
                    d.insert_media(&url).await?;
                    Ok(done(format!("inserted {url}")))
                })
            })
        }
        BmcCmd::Media {
            action: MediaCmd::Eject { .. },
        } => Arc::new(move |d: Arc<dyn BmcDriver>| {
            Box::pin(async move {
                d.eject_media().await?;
                Ok(done("ejected".into()))
            })
        }),
        BmcCmd::Probe { .. } => Arc::new(|d: Arc<dyn BmcDriver>| {
            Box::pin(async move { Ok(Reply::Probe(d.probe().await?)) })
        }),
    }
}

fn common(cmd: &BmcCmd) -> &Common {
    match cmd {
        BmcCmd::Power { common, .. }
        | BmcCmd::Bootdev { common, .. }
        | BmcCmd::Bootparam { common }
        | BmcCmd::Info { common }
        | BmcCmd::Sel { common, .. }
        | BmcCmd::Sensors { common }
        | BmcCmd::Probe { common }
        | BmcCmd::Media {
            action: MediaCmd::Insert { common, .. } | MediaCmd::Eject { common },
        } => common,
    }
}

impl Common {
    fn suite(&self) -> anyhow::Result<CipherSuite> {
        CipherSuite::from_id(self.cipher_suite).with_context(|| {
            format!(
                "cipher suite {} is not supported (3 or 17)",
                self.cipher_suite
            )
        })
    }

    fn timeout(&self, protocol: BmcProtocol) -> Duration {
        self.timeout.unwrap_or(match protocol {
            BmcProtocol::Ipmi => Duration::from_secs(1),
            BmcProtocol::Redfish => Duration::from_secs(10),
        })
    }

    fn protocol(&self) -> BmcProtocol {
        match self.protocol {
            ProtocolArg::Ipmi => BmcProtocol::Ipmi,
            ProtocolArg::Redfish => BmcProtocol::Redfish,
        }
    }

    /// The BMCs to work on, with their passwords resolved.
    fn members(&self) -> anyhow::Result<Vec<Member>> {
        let suite = self.suite()?;
        if let Some(host) = &self.host {
            let password = match &self.password_file {
                Some(f) => read_secret(f)?,
                None => std::env::var("KILN_BMC_PASSWORD")
                    .context("no password: give --password-file FILE or set KILN_BMC_PASSWORD")?,
            };
            let protocol = self.protocol();
            return Ok(vec![Member {
                name: host.clone(),
                target: BmcTarget {
                    protocol,
                    host: host.clone(),
                    port: self.port.unwrap_or_else(|| protocol.default_port()),
                    username: self.user.clone(),
                    password: Password::new(password),
                    ca_cert: self.ca_cert.clone(),
                    insecure: self.insecure,
                    plain_http: self.allow_plain_http,
                    timeout: self.timeout(protocol),
                    retries: self.retries,
                    cipher_suite: suite,
                },
            }]);
        }
        let path = self
            .inventory
            .as_ref()
            .expect("clap requires --host or --inventory");
        let inventory = kiln_spec::Inventory::load(path)
            .with_context(|| format!("loading the inventory {}", path.display()))?;
        let selector = self
            .nodes
            .as_deref()
            .expect("clap requires --nodes with --inventory");
        let nodes = fleet::select(&inventory, selector).map_err(anyhow::Error::msg)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut members = Vec::new();
        let mut problems = Vec::new();
        for node in nodes {
            let Some(bmc) = &node.bmc else {
                problems.push(format!("node {} has no bmc entry", node.name));
                continue;
            };
            match BmcTarget::from_inventory(
                bmc,
                base,
                self.timeout(bmc.protocol),
                self.retries,
                suite,
            ) {
                Err(e) => {
                    problems.push(format!("node {}: reading its BMC password: {e}", node.name))
                }
                Ok(target) => members.push(Member {
                    name: node.name.clone(),
                    target,
                }),
            }
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("\n"));
        }
        Ok(members)
    }
}

fn read_secret(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the password file {}", path.display()))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

pub fn run(cmd: BmcCmd) -> anyhow::Result<()> {
    let common = common(&cmd).clone();
    let members = common.members()?;
    let single = common.host.is_some();
    let op = operation(&cmd);
    let options = FleetOptions {
        concurrency: common.concurrency,
        attempts: common.attempts.max(1),
        backoff: Duration::from_millis(500),
        timeout: common.deadline,
    };
    let total = members.len();
    let runtime = super::runtime()?;
    let failures = runtime.block_on(async move {
        let mut rx = fleet::run(members, options, kiln_bmc::connect, op);
        let mut failures = 0usize;
        let mut done = 0usize;
        while let Some(outcome) = rx.recv().await {
            done += 1;
            if outcome.result.is_err() {
                failures += 1;
            }
            let report = OutcomeReport::from(outcome);
            if single {
                if let Some(e) = &report.error {
                    bail!("{}: {e}", report.bmc);
                }
                if let Some(v) = &report.value {
                    common.output.emit(v, Reply::text)?;
                }
                continue;
            }
            match common.output.output {
                OutputFormat::Json => println!("{}", serde_json::to_string(&report)?),
                OutputFormat::Text => {
                    let body = match (&report.value, &report.error) {
                        (Some(v), _) => v.text(),
                        (None, Some(e)) => {
                            format!("FAILED ({}): {e}", report.error_kind.unwrap_or("error"))
                        }
                        (None, None) => String::new(),
                    };
                    let mut lines = body.lines();
                    let first = lines.next().unwrap_or("");
                    println!("{:<20} {first}", report.node);
                    for line in lines {
                        println!("{:<20} {line}", "");
                    }
                }
            }
            tracing::debug!(done, total, "progress");
        }
        anyhow::Ok(failures)
    })?;
    if failures > 0 {
        bail!("{failures} of {total} BMC operations failed");
    }
    Ok(())
}
