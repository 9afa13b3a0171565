//! Golden tests of overlay rendering: the committed listing (mode, sha256, path) of what a
//! spec renders to, and the full text of key files.
//! `KILN_BLESS=1 cargo test -p kiln-overlays --test render_golden` rewrites the golden files.

use std::path::{Path, PathBuf};

use kiln_overlays::{NodeContext, Rendered, render};
use kiln_spec::{Appliance, NodeRole, ProfileName};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn assert_golden(name: &str, actual: &str) {
    let path = golden(name);
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e} (KILN_BLESS=1 creates it)", path.display()));
    assert_eq!(
        actual,
        expected,
        "{} differs (KILN_BLESS=1 regenerates it)",
        path.display()
    );
}

fn text(r: &Rendered, path: &str) -> String {
    let f = r
        .file(path)
        .unwrap_or_else(|| panic!("{path} not rendered"));
    String::from_utf8(f.content.clone()).unwrap()
}

/// Every file's path and content, for reading a golden diff.
fn contents(r: &Rendered, prefix: &str) -> String {
    r.files
        .iter()
        .filter(|f| f.path.starts_with(prefix))
        .map(|f| {
            format!(
                "==> {} ({:04o})\n{}",
                f.path,
                f.mode,
                String::from_utf8_lossy(&f.content)
            )
        })
        .collect()
}

#[test]
fn test_profile_renders_the_base_system() {
    let r = render(&Appliance::profile(ProfileName::Test), None).unwrap();
    assert_eq!(r.layers, ["base", "network"]);
    assert_golden("test-profile.listing", &r.listing());
    assert_golden(
        "test-profile.kiln-agent.service",
        &text(&r, "/etc/systemd/system/kiln-agent.service"),
    );
    assert_golden(
        "test-profile.kiln-install.service",
        &text(&r, "/etc/systemd/system/kiln-install.service"),
    );
    assert_golden(
        "test-profile.80-kiln-dhcp.network",
        &text(&r, "/etc/systemd/network/80-kiln-dhcp.network"),
    );

    let agent = text(&r, "/etc/systemd/system/kiln-agent.service");
    assert!(agent.contains("Type=notify") && agent.contains("ExecStart=/usr/bin/kiln agent run"));
    assert!(
        text(&r, "/etc/systemd/system/kiln-install.service")
            .contains("ConditionKernelCommandLine=kiln.install=auto")
    );
    // The installer runs only in the target stage-1 boots for kiln.install=auto.
    assert!(
        text(&r, "/etc/systemd/system/kiln-install.target").contains("Wants=kiln-install.service")
    );
    assert!(
        !r.units_enabled
            .iter()
            .any(|u| u.starts_with("kiln-install"))
    );
    assert_eq!(text(&r, "/etc/hostname"), "kiln-test\n");
    for unit in [
        "kiln-agent.service",
        "serial-getty@ttyS0.service",
        "systemd-networkd.service",
    ] {
        assert!(
            r.units_enabled.iter().any(|u| u == unit),
            "{unit} not enabled"
        );
    }
    assert_eq!(r.kernel_args, ["console=tty0", "console=ttyS0,115200"]);
    assert!(r.addons.is_empty());
    // The spec travels in the image, readable by root only (it may hold password hashes).
    assert_eq!(r.file("/etc/kiln/appliance.yaml").unwrap().mode, 0o600);
    let embedded = Appliance::from_yaml(&text(&r, "/etc/kiln/appliance.yaml")).unwrap();
    assert_eq!(embedded, Appliance::profile(ProfileName::Test));
    // No users: their templates place nothing.
    assert!(r.file("/usr/lib/sysusers.d/kiln-users.conf").is_none());
    assert!(
        !r.files
            .iter()
            .any(|f| f.path.starts_with("/etc/ssh/authorized_keys/"))
    );
}

#[test]
fn appliance_profile_adds_cluster_layers_and_their_addons() {
    let r = render(&Appliance::profile(ProfileName::Appliance), None).unwrap();
    assert_eq!(
        r.layers,
        ["base", "network", "kubernetes", "ceph", "kubevirt"]
    );
    assert_golden("appliance-profile.listing", &r.listing());
    // Cluster settings and credentials reach a node through its node config, not the image.
    assert!(
        !r.files
            .iter()
            .any(|f| f.path.starts_with("/etc/kubernetes") || f.path.starts_with("/etc/rancher"))
    );
    assert!(r.kernel_args.contains(&"intel_iommu=on".to_string()));
    assert_eq!(
        r.addons,
        ["volume-snapshots", "multus", "rook-ceph", "kubevirt"]
    );
    // Every addon a layer names is pinned in the lock.
    let lock: serde_json::Value = serde_saphyr::from_str(kiln_overlays::UPSTREAM_LOCK).unwrap();
    let pinned: Vec<&str> = lock["addons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for a in &r.addons {
        assert!(
            pinned.contains(&a.as_str()),
            "addon {a} is not in upstream.lock.yaml"
        );
    }
}

#[test]
fn network_spec_renders_every_interface_kind_and_user() {
    let spec =
        Appliance::from_yaml(&std::fs::read_to_string(golden("network.yaml")).unwrap()).unwrap();
    let node = NodeContext {
        hostname: "edge-01".into(),
        name: Some("edge-01".into()),
        role: NodeRole::Worker,
    };
    let r = render(&spec, Some(&node)).unwrap();
    assert_golden("network.listing", &r.listing());
    assert_golden(
        "network.files.txt",
        &(contents(&r, "/etc/systemd/network/")
            + &contents(&r, "/usr/lib/")
            + &contents(&r, "/etc/ssh/authorized_keys/")
            + &contents(&r, "/etc/apt/")),
    );
    assert_eq!(text(&r, "/etc/hostname"), "edge-01\n");
    assert!(text(&r, "/etc/hosts").contains("127.0.1.1\tedge-01"));
    assert!(
        r.file("/etc/systemd/network/80-kiln-dhcp.network")
            .is_none(),
        "dhcp: false"
    );
    assert!(text(&r, "/etc/ssh/authorized_keys/ops").contains("ops@laptop"));
    assert!(text(&r, "/etc/ssh/authorized_keys/root").contains("break-glass"));
    let sysusers = text(&r, "/usr/lib/sysusers.d/kiln-users.conf");
    assert!(
        sysusers.contains("u ops - \"ops\" /home/ops /bin/bash\nm ops sudo\nm ops adm\n"),
        "{sysusers}"
    );
    assert!(!sysusers.contains("u root"), "root is never created");
    assert!(text(&r, "/etc/systemd/network/20-kiln-bond0.network").contains("VLAN=vlan10"));
    assert!(text(&r, "/etc/systemd/network/31-kiln-eno4-vlans.network").contains("VLAN=vlan20"));
    assert!(text(&r, "/etc/systemd/network/20-kiln-bond0.netdev").contains("Mode=802.3ad"));
    let sources = text(&r, "/etc/apt/sources.list.d/kiln-extras.sources");
    assert!(
        sources.contains("Components: main contrib\nSigned-By: /etc/apt/keyrings/kiln-extras.asc"),
        "{sources}"
    );
    assert!(
        text(&r, "/etc/apt/keyrings/kiln-extras.asc")
            .starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    );
}

#[test]
fn rendering_is_deterministic() {
    let spec = Appliance::profile(ProfileName::Appliance);
    assert_eq!(render(&spec, None).unwrap(), render(&spec, None).unwrap());
}
