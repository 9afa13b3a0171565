//! `kiln spec …`: validate documents, print their JSON Schema and the built-in specs.

use kiln_spec::serde_name;
use std::path::PathBuf;

use anyhow::Context;
use kiln_spec::layout::{self, LayoutSizes};
use kiln_spec::{Appliance, ByteSize, Document, DocumentKind, ProfileName, SpecError};
use serde::Serialize;

use super::output::{OutputArgs, OutputFormat};

#[derive(Debug, clap::Subcommand)]
pub enum SpecCmd {
    /// Check a document (Appliance, Inventory or NodeConfig) and list every problem
    Validate(ValidateArgs),
    /// Print the JSON Schema of a document kind
    Schema(SchemaArgs),
    /// Print a built-in appliance spec, to start a kiln.yaml from
    Default(DefaultArgs),
}

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// YAML file to check; its `kind` says what it is
    file: PathBuf,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KindArg {
    Appliance,
    Inventory,
    NodeConfig,
}

#[derive(Debug, clap::Args)]
pub struct SchemaArgs {
    /// Document kind
    #[arg(long, value_enum, default_value = "appliance")]
    kind: KindArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProfileArg {
    Test,
    Appliance,
}

#[derive(Debug, clap::Args)]
pub struct DefaultArgs {
    /// Built-in profile; `test` is the one `kiln build` uses without --spec
    #[arg(long, value_enum, default_value = "test")]
    profile: ProfileArg,
    /// Print every field with its default filled in, instead of the file as shipped
    #[arg(long)]
    resolved: bool,
}

pub fn run(cmd: SpecCmd) -> anyhow::Result<()> {
    match cmd {
        SpecCmd::Validate(a) => validate(a),
        SpecCmd::Schema(a) => schema(a),
        SpecCmd::Default(a) => default(a),
    }
}

/// What `validate --output json` prints.
#[derive(Debug, Serialize)]
struct Report {
    file: String,
    valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    summary: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<kiln_spec::FieldError>,
    /// A document that could not be read as YAML at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    parse_error: Option<String>,
}

fn validate(args: ValidateArgs) -> anyhow::Result<()> {
    let file = args.file.display().to_string();
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("reading {file}"))?;
    let mut report = Report {
        file: file.clone(),
        valid: false,
        kind: None,
        summary: Vec::new(),
        errors: Vec::new(),
        parse_error: None,
    };
    let outcome = Document::from_yaml(&text);
    match &outcome {
        Ok(doc) => {
            report.valid = true;
            report.kind = Some(doc.kind().as_str());
            report.summary = summary(doc);
        }
        Err(SpecError::Invalid { errors, .. }) => report.errors = errors.0.clone(),
        Err(e) => report.parse_error = Some(e.to_string()),
    }
    if args.output.output == OutputFormat::Json || report.valid {
        args.output.emit(&report, |r| {
            let mut text = format!("OK: {} is a valid {}\n", r.file, r.kind.unwrap_or_default());
            for line in &r.summary {
                text.push_str(&format!("  {line}\n"));
            }
            text
        })?;
    }
    match outcome {
        Ok(_) => Ok(()),
        Err(SpecError::Invalid { errors, .. }) => {
            if args.output.output == OutputFormat::Text {
                for e in &errors.0 {
                    eprintln!("{file}: {}: {}", e.path, e.reason);
                }
            }
            anyhow::bail!("{file}: {} error(s)", errors.0.len())
        }
        Err(e) => Err(e).context(format!("checking {file}")),
    }
}

fn summary(doc: &Document) -> Vec<String> {
    match doc {
        Document::Appliance(a) => appliance_summary(a),
        Document::Inventory(inv) => {
            let mut lines = Vec::new();
            if !inv.metadata.name.is_empty() {
                lines.push(format!("name: {}", inv.metadata.name));
            }
            lines.push(format!("nodes: {}", inv.spec.nodes.len()));
            for n in &inv.spec.nodes {
                let bmc = n.bmc.as_ref().map_or("no BMC".to_string(), |b| {
                    format!(
                        "{} BMC at {}:{}",
                        serde_name(&b.protocol),
                        b.address,
                        b.port()
                    )
                });
                lines.push(format!(
                    "  {} ({}, {} boot MAC(s), {bmc})",
                    n.name,
                    serde_name(&n.role),
                    n.boot_macs.len()
                ));
            }
            lines
        }
        Document::NodeConfig(c) => vec![
            format!("name: {}", c.metadata.name),
            format!(
                "{} file(s), {} unit(s), {} user(s), {} sysctl(s)",
                c.spec.files.len(),
                c.spec.units.len(),
                c.spec.users.len(),
                c.spec.sysctls.len()
            ),
        ],
    }
}

fn appliance_summary(a: &Appliance) -> Vec<String> {
    let s = &a.spec;
    let features: Vec<&str> = s.features.iter().map(|f| f.as_str()).collect();
    let sizes = LayoutSizes::from_spec(&s.install);
    vec![
        format!("name: {}", a.metadata.name),
        format!("profile: {}", s.profile.map_or("none", ProfileName::as_str)),
        format!(
            "features: {}",
            if features.is_empty() {
                "none".to_string()
            } else {
                features.join(", ")
            }
        ),
        format!(
            "os: Debian {} from {}, {} extra package(s)",
            s.os.suite,
            s.os.mirror.as_deref().unwrap_or("the host's apt sources"),
            s.os.packages.len()
        ),
        format!("users: {}", s.users.len()),
        format!("hostname: {}", s.hostname),
        format!(
            "install: ESP {}, slots 2 x {}, state {}, needs a disk of at least {}; wipe: {}",
            s.install.esp_size,
            s.install.slot_size,
            s.install.state_size,
            ByteSize(layout::required_disk_bytes(&sizes, 512)).human(),
            serde_name(&s.install.wipe)
        ),
    ]
}

fn schema(args: SchemaArgs) -> anyhow::Result<()> {
    let kind = match args.kind {
        KindArg::Appliance => DocumentKind::Appliance,
        KindArg::Inventory => DocumentKind::Inventory,
        KindArg::NodeConfig => DocumentKind::NodeConfig,
    };
    println!("{}", serde_json::to_string_pretty(&kind.schema())?);
    Ok(())
}

fn default(args: DefaultArgs) -> anyhow::Result<()> {
    let profile = match args.profile {
        ProfileArg::Test => ProfileName::Test,
        ProfileArg::Appliance => ProfileName::Appliance,
    };
    if args.resolved {
        print!("{}", Appliance::profile(profile).to_yaml());
    } else {
        print!("{}", profile.yaml());
    }
    Ok(())
}
