//! Golden tests of the spec model: the built-in profiles, error reports and the JSON Schema.
//! `KILN_BLESS=1 cargo test -p kiln-spec --test golden` rewrites the expected files.

use std::path::{Path, PathBuf};

use kiln_spec::nodeconfig::node_config_for;
use kiln_spec::{Appliance, Inventory, NodeConfig, ProfileName, SpecError};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Compares `actual` with the committed file, or rewrites it under `KILN_BLESS=1`.
fn assert_golden(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e} (run with KILN_BLESS=1 to create it)",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{} differs (KILN_BLESS=1 regenerates it)",
        path.display()
    );
}

#[test]
fn built_in_profiles_are_valid_and_test_is_the_default() {
    for p in ProfileName::ALL {
        let spec = Appliance::from_yaml(p.yaml()).unwrap_or_else(|e| panic!("{}: {e}", p.as_str()));
        assert_eq!(spec.spec.profile, Some(p));
        // What `kiln spec default` prints parses back to the same spec.
        assert_eq!(Appliance::from_yaml(&spec.to_yaml()).unwrap(), spec);
    }
    assert_eq!(
        Appliance::default_spec().spec.profile,
        Some(ProfileName::Test)
    );
    let full = Appliance::profile(ProfileName::Appliance);
    assert!(full.spec.os.packages.iter().any(|p| p == "ceph-osd"));
    assert!(
        full.spec
            .os
            .packages
            .iter()
            .any(|p| p == "libvirt-daemon-system")
    );
}

#[test]
fn a_spec_adds_to_its_profile() {
    let spec = Appliance::from_yaml(
        "apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata: {name: lab}\n\
         spec:\n  profile: appliance\n  os: {packages: [vim]}\n  install: {slotSize: 10GiB}\n",
    )
    .unwrap();
    assert_eq!(spec.metadata.name, "lab");
    let pk = &spec.spec.os.packages;
    assert!(pk.contains(&"ceph-osd".to_string()) && pk.contains(&"vim".to_string()));
    assert_eq!(spec.spec.install.slot_size.to_string(), "10GiB");
    assert_eq!(
        spec.spec.install.state_size.to_string(),
        "16GiB",
        "kept from the profile"
    );
}

#[test]
fn an_invalid_spec_reports_every_error_with_its_path() {
    let text = std::fs::read_to_string(golden_dir().join("invalid.yaml")).unwrap();
    let err = Appliance::from_yaml(&text).unwrap_err();
    let SpecError::Invalid { errors, .. } = &err else {
        panic!("expected validation errors, got {err}")
    };
    let listing: String = errors
        .0
        .iter()
        .map(|e| format!("{}: {}\n", e.path, e.reason))
        .collect();
    assert_golden("invalid.errors.txt", &listing);
}

#[test]
fn errors_in_lists_added_to_a_profile_point_at_the_users_items() {
    let err = Appliance::from_yaml(
        "apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata: {name: lab}\n\
         spec:\n  profile: appliance\n  os: {packages: [ceph-osd, vim, \"Bad Name\"], kernelArgs: [7]}\n",
    )
    .unwrap_err();
    let SpecError::Invalid { errors, .. } = &err else {
        panic!("expected validation errors, got {err}")
    };
    let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["spec.os.kernelArgs[0]", "spec.os.packages[2]"]);
}

#[test]
fn yaml_syntax_errors_are_parse_errors() {
    let err = Appliance::from_yaml("spec: [unclosed").unwrap_err();
    assert!(matches!(err, SpecError::Parse { .. }), "{err}");
}

#[test]
fn json_schema_is_stable() {
    let schema = schemars::schema_for!(Appliance);
    assert_golden(
        "appliance.schema.json",
        &(serde_json::to_string_pretty(&schema).unwrap() + "\n"),
    );
}

/// The conversion the installer seeds a node with: appliance + inventory overrides → NodeConfig.
#[test]
fn node_config_for_an_inventory_node_matches_golden() {
    let read = |name: &str| std::fs::read_to_string(golden_dir().join(name)).unwrap();
    let appliance = Appliance::from_yaml(&read("node-config.appliance.yaml")).unwrap();
    let inventory = Inventory::from_yaml(&read("node-config.inventory.yaml")).unwrap();
    let node = inventory.node("edge-01").unwrap();
    let hostname = appliance.hostname_for(Some(&node.name), None).unwrap();

    let config = node_config_for(&appliance, Some(node), &hostname);
    let yaml = serde_saphyr::to_string(&config).unwrap();
    assert_golden("node-config.yaml", &yaml);

    // What the agent reads back is valid and the same config.
    assert_eq!(NodeConfig::from_yaml(&yaml).unwrap(), config);
    let spec = &config.spec;
    assert_eq!(spec.hostname.as_deref(), Some("edge-01"));
    let users: Vec<&str> = spec.users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(users, ["ops", "deploy"], "root stays with the image");
    assert!(spec.users.iter().all(|u| u.password_hash.is_none()));
    assert_eq!(spec.users[0].uid, Some(1500));
    // The feature's, the profile's and the spec's, then the node's; no boot slot.
    assert_eq!(spec.kernel_args[..2], ["intel_iommu=on", "iommu=pt"]);
    assert!(
        spec.kernel_args
            .ends_with(&["quiet".into(), "console=ttyS0".into()])
    );
    assert!(!spec.kernel_args.iter().any(|a| a.starts_with("kiln.slot")));
    let net = spec.network.as_ref().unwrap();
    assert!(!net.dhcp, "the node's override wins");
    assert_eq!(net.bonds[0].name, "bond0");
    assert_eq!(net.interfaces[0].name, "lan0");
    assert_eq!(net.vlans[0].link, "bond0");

    // Without an inventory node: the appliance alone, named after the host.
    let plain = node_config_for(&appliance, None, "kiln-525400000001");
    assert_eq!(plain.metadata.name, "kiln-525400000001");
    assert!(plain.spec.network.as_ref().unwrap().dhcp);
    assert!(plain.spec.users.iter().all(|u| u.name != "deploy"));
}
