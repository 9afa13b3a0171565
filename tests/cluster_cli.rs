//! `kiln cluster bootstrap` against a real kube-apiserver + etcd: the spec's features decide
//! which pinned addons it applies.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use kiln_cluster::testing::TestCluster;

fn mirror() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/upstream");
    assert!(
        dir.join("SHA256SUMS").exists(),
        "the upstream mirror {} is missing",
        dir.display()
    );
    dir
}

/// The addons a dry-run bootstrap of `spec` would touch.
fn addons_for(cluster: &TestCluster, spec: &str) -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spec.yaml");
    std::fs::write(&file, spec).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["cluster", "bootstrap", "--dry-run", "-o", "json", "--spec"])
        .arg(&file)
        .arg("--mirror")
        .arg(mirror())
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["addon"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn bootstrap_applies_only_what_the_features_select() {
    let cluster = TestCluster::shared();
    let spec = |features: &str| {
        format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata: {{name: t}}\nspec:\n  features: [{features}]\n"
        )
    };
    assert_eq!(
        addons_for(cluster, &spec("kubernetes")),
        BTreeSet::from(["multus".to_string(), "volume-snapshots".to_string()])
    );
    assert!(addons_for(cluster, &spec("")).is_empty());

    // Without a spec (and none installed on this machine) it asks for one.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["cluster", "bootstrap", "--dry-run", "--kubeconfig"])
        .arg(&cluster.kubeconfig)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pass --spec FILE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
