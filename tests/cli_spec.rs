//! `kiln spec …` as a user runs it: exit codes and what is printed. Also checks that no
//! `--help` screen of any kiln command is wider than 80 columns.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("COLUMNS", "80")
        .env_remove("KILN_LOG")
        .output()
        .expect("running kiln")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn default_prints_a_spec_that_validates() {
    let dir = tempfile::tempdir().unwrap();
    for profile in ["test", "appliance"] {
        let out = kiln(&["spec", "default", "--profile", profile]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let file = dir.path().join(format!("{profile}.yaml"));
        std::fs::write(&file, &out.stdout).unwrap();
        let check = kiln(&["spec", "validate", file.to_str().unwrap()]);
        let stdout = text(&check.stdout);
        assert!(check.status.success(), "{stdout}{}", text(&check.stderr));
        assert!(stdout.starts_with("OK: "), "{stdout}");
        assert!(stdout.contains(&format!("profile: {profile}")), "{stdout}");
    }
    let resolved = kiln(&["spec", "default", "--resolved"]);
    assert!(text(&resolved.stdout).contains("afterInstall: reboot"));
}

#[test]
fn validate_lists_every_error_with_its_path_and_fails() {
    let file = repo("spec/tests/golden/invalid.yaml");
    let out = kiln(&["spec", "validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let expected = std::fs::read_to_string(repo("spec/tests/golden/invalid.errors.txt")).unwrap();
    for line in expected.lines() {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
    let n = expected.lines().count();
    assert!(stderr.contains(&format!("{n} error(s)")), "{stderr}");
}

#[test]
fn validate_json_reports_errors_on_stdout_and_still_fails() {
    let file = repo("spec/tests/golden/invalid.yaml");
    let out = kiln(&[
        "spec",
        "validate",
        "--output",
        "json",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(report["valid"], false);
    let paths: Vec<&str> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"spec.install.wipe"), "{paths:?}");
    assert!(paths.contains(&"spec.users[1].name"), "{paths:?}");
}

#[test]
fn validate_recognises_inventories_and_rejects_unknown_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("fleet.yaml");
    std::fs::write(
        &inv,
        "apiVersion: kiln.dev/v1alpha1\nkind: Inventory\nmetadata: {name: rack1}\nspec:\n  nodes:\n\
         \x20   - name: node-01\n      bootMACs: [\"52:54:00:00:00:01\"]\n",
    )
    .unwrap();
    let out = kiln(&["spec", "validate", inv.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("valid Inventory"));
    assert!(text(&out.stdout).contains("node-01"));

    let other = dir.path().join("other.yaml");
    std::fs::write(&other, "apiVersion: kiln.dev/v1alpha1\nkind: Cluster\n").unwrap();
    let out = kiln(&["spec", "validate", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .contains("kind: must be one of Appliance, Inventory, NodeConfig; found \"Cluster\""),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn validate_names_a_missing_file_and_broken_yaml() {
    let out = kiln(&["spec", "validate", "/nonexistent/kiln.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("reading /nonexistent/kiln.yaml"),
        "{}",
        text(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "spec: [unclosed\n").unwrap();
    let out = kiln(&["spec", "validate", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("parsing document"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn schema_prints_json_schema_for_each_kind() {
    for (kind, field) in [
        ("appliance", "install"),
        ("inventory", "nodes"),
        ("node-config", "units"),
    ] {
        let out = kiln(&["spec", "schema", "--kind", kind]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            schema.to_string().contains(&format!("\"{field}\"")),
            "{kind} schema lacks {field}"
        );
    }
}

/// Subcommand names listed under `Commands:` in a help screen.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn no_help_line_is_wider_than_80_columns() {
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    let mut too_wide = Vec::new();
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = kiln(&args);
        assert!(
            out.status.success(),
            "kiln {}: {}",
            args.join(" "),
            text(&out.stderr)
        );
        let help = text(&out.stdout);
        seen += 1;
        for line in help.lines() {
            if line.chars().count() > 80 {
                too_wide.push(format!("kiln {}: {line}", args.join(" ")));
            }
        }
        for sub in subcommands(&help) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
    }
    assert!(seen > 4, "walked only {seen} help screens");
    assert!(
        too_wide.is_empty(),
        "help lines over 80 columns:\n{}",
        too_wide.join("\n")
    );
}

#[test]
fn validate_lists_shape_and_value_errors_of_a_node_config_together() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.yaml");
    std::fs::write(
        &file,
        "apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\nmetadata: {name: n1}\nspec:\n  \
         hostname: Bad_Name\n  files:\n    - {path: /etc/x, content: a, mode: 644}\n  unitz: []\n",
    )
    .unwrap();
    let out = kiln(&["spec", "validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    for needle in [
        "spec.files[0].mode: expected a string, found an integer (644); put it in quotes",
        "spec.unitz: unknown field",
        "spec.hostname: \"Bad_Name\" is not a valid host name",
        "3 error(s)",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[test]
fn validate_refuses_a_kubernetes_role_without_credentials_overlapping_networks_bad_mirrors_and_reserves()
 {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.yaml");
    std::fs::write(
        &file,
        "apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\nmetadata: {name: w1}\nspec:\n  \
         kubernetes:\n    role: worker\n    nodeIp: 10.43.0.7\n    apiServer: https://10.0.0.1:6443\n    \
         podCidr: 10.42.1.0/24\n    serviceCidr: 10.42.128.0/17\n    registryMirrors:\n      \
         images.example.org: [\"https://mirror.site:5000\", \"ftp://mirror.site\"]\n      Bad_Registry: []\n    \
         systemReserved: {cpu: 500m, memory: 1GB, gpu: \"1\"}\n",
    )
    .unwrap();
    let out = kiln(&["spec", "validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    for needle in [
        "spec.kubernetes.serviceCidr: 10.42.128.0/17 overlaps the pod network clusterCidr 10.42.0.0/16",
        "spec.kubernetes.join: a joining node needs join credentials",
        "spec.kubernetes.registryMirrors.images.example.org[1]: \"ftp://mirror.site\" is not an http:// or https:// URL",
        "spec.kubernetes.registryMirrors.Bad_Registry: \"Bad_Registry\" is not a registry host",
        "spec.kubernetes.registryMirrors.Bad_Registry: names no mirror",
        "spec.kubernetes.systemReserved.memory: \"1GB\" is not a quantity like 500m, 2, 512Mi or 1Gi",
        "spec.kubernetes.systemReserved.gpu: not a resource the kubelet reserves",
        "7 error(s)",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[test]
fn validate_refuses_a_cluster_node_without_the_feature_a_worker_holding_the_ca_and_a_bad_remote_api()
 {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("appliance.yaml");
    std::fs::write(
        &file,
        "apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata: {name: rack}\nspec:\n  \
         profile: test\n  cluster:\n    clusterCidr: 10.60.0.0/16\n    node:\n      role: worker\n      \
         nodeIp: 192.168.10.21\n      apiServer: https://192.168.10.11:6443\n      podCidr: 10.42.1.0/24\n      \
         join: {token: abcdef.0123456789abcdef, caCertHash: \"sha256:00\"}\n      \
         ca: {cert: not-pem, key: not-pem}\n  remoteApi:\n    listen: \"0.0.0.0\"\n    \
         clientCa: x\n    cert: x\n    key: x\n",
    )
    .unwrap();
    let out = kiln(&["spec", "validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    for needle in [
        "spec.cluster.node: a cluster node needs the kubernetes feature",
        "spec.cluster.node.join.caCertHash: not a CA hash",
        "spec.cluster.node.ca: only control planes hold the cluster's keys",
        "spec.cluster.node.ca.cert: not a PEM certificate",
        "spec.cluster.node.ca.key: not a PEM private key",
        "spec.cluster.node.clusterCidr: 10.42.0.0/16 is not spec.cluster.clusterCidr 10.60.0.0/16",
        "spec.remoteApi.listen: \"0.0.0.0\" is not an address and port",
        "spec.remoteApi.clientCa: not a PEM certificate",
        "spec.remoteApi.cert: not a PEM certificate",
        "spec.remoteApi.key: not a PEM private key",
        "10 error(s)",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}
