//! The fleet as Kubernetes resources against a real kube-apiserver + etcd: `kiln fleet import`
//! installs the Machine and Rollout definitions and turns an inventory into Machines with
//! their BMC passwords in Secrets; `kubectl get machines` shows each one's stage from its
//! status subresource.

use std::process::{Command, Output};

use kiln_cluster::testing::TestCluster;
use serde_json::Value;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const PASSWORD: &str = "s3cret-bmc-password";

const INVENTORY: &str = r#"apiVersion: kiln.dev/v1alpha1
kind: Inventory
metadata: {name: rack1}
spec:
  nodes:
    - name: node-01
      role: control-plane
      bootMACs: ["52:54:00:00:00:01"]
      labels: {rack: r1}
      bmc:
        protocol: ipmi
        address: 10.0.0.11
        username: admin
        passwordRef: {file: node-01.bmc}
    - name: node-02
      bootMACs: ["52:54:00:00:00:02"]
      bmc:
        protocol: redfish
        address: 10.0.0.12
        port: 8443
        username: root
        insecure: true
        passwordRef: {file: node-02.bmc}
    - name: node-03
      role: storage
      bootMACs: ["52:54:00:00:00:03"]
      overrides:
        install:
          disk: {minSize: 20GiB, model: "Samsung SSD 9*", transport: [nvme]}
          wipe: kilnOnly
"#;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Whatever kubectl says to `args`, success or not.
fn kubectl_output(cluster: &TestCluster, args: &[&str]) -> Output {
    Command::new(&cluster.binaries().kubectl)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(args)
        .output()
        .unwrap()
}

fn kubectl(cluster: &TestCluster, args: &[&str]) -> String {
    let out = kubectl_output(cluster, args);
    assert!(out.status.success(), "kubectl {args:?}: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn import(cluster: &TestCluster, inventory: &std::path::Path) -> Output {
    import_into(cluster, inventory, "rack1")
}

fn import_into(cluster: &TestCluster, inventory: &std::path::Path, namespace: &str) -> Output {
    Command::new(KILN)
        .args(["fleet", "import", "-o", "json", "--namespace", namespace])
        .arg("--inventory")
        .arg(inventory)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .output()
        .unwrap()
}

#[test]
fn an_inventory_becomes_machines_with_their_bmc_passwords_in_secrets() {
    let cluster = TestCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("fleet.yaml");
    std::fs::write(&inventory, INVENTORY).unwrap();
    std::fs::write(dir.path().join("node-01.bmc"), format!("{PASSWORD}\n")).unwrap();

    // A missing password stops the import before anything is written.
    let out = import(cluster, &inventory);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("node node-02: reading its BMC password"),
        "{}",
        text(&out)
    );
    // (Other tests of this cluster install the definitions: the namespace tells.)
    let namespaces = kubectl(cluster, &["get", "namespaces", "-o", "name"]);
    assert!(!namespaces.contains("namespace/rack1"), "{namespaces}");

    std::fs::write(dir.path().join("node-02.bmc"), "another-password").unwrap();
    let out = import(cluster, &inventory);
    assert!(out.status.success(), "{}", text(&out));
    let imported: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        imported["machines"],
        serde_json::json!(["node-01", "node-02", "node-03"])
    );
    assert_eq!(
        imported["secrets"],
        serde_json::json!(["node-01-bmc", "node-02-bmc"])
    );

    // The Machines carry what the inventory says, the password only by reference.
    let machines: Value = serde_json::from_str(&kubectl(
        cluster,
        &["get", "machines", "-n", "rack1", "-o", "json"],
    ))
    .unwrap();
    let items = machines["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    let m1 = &items[0];
    assert_eq!(m1["spec"]["role"], "control-plane");
    assert_eq!(
        m1["spec"]["bootMACs"],
        serde_json::json!(["52:54:00:00:00:01"])
    );
    assert_eq!(m1["spec"]["bmc"]["credentialsSecret"], "node-01-bmc");
    assert_eq!(m1["metadata"]["labels"]["rack"], "r1");
    assert_eq!(items[1]["spec"]["bmc"]["port"], 8443);
    assert_eq!(items[1]["spec"]["bmc"]["insecure"], true);
    assert!(items[2]["spec"].get("bmc").is_none());
    // Its own disk rules travel with the Machine, as the inventory wrote them.
    let install = &items[2]["spec"]["overrides"]["install"];
    assert_eq!(install["disk"]["model"], "Samsung SSD 9*");
    assert_eq!(install["disk"]["transport"], serde_json::json!(["nvme"]));
    assert_eq!(install["wipe"], "kilnOnly");
    let min: kiln_spec::size::ByteSize =
        serde_json::from_value(install["disk"]["minSize"].clone()).unwrap();
    assert_eq!(min.0, 20 << 30);
    assert!(
        !machines.to_string().contains(PASSWORD),
        "a password is in a Machine"
    );
    let secret = kubectl(
        cluster,
        &[
            "get",
            "secret",
            "node-01-bmc",
            "-n",
            "rack1",
            "-o",
            "jsonpath={.data.password}",
        ],
    );
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), secret.as_bytes()).unwrap();
    let password = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&password.stdout), PASSWORD);

    // A second import changes nothing.
    let version = || {
        kubectl(
            cluster,
            &[
                "get",
                "machine",
                "node-01",
                "-n",
                "rack1",
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ],
        )
    };
    let before = version();
    let out = import(cluster, &inventory);
    assert!(out.status.success(), "{}", text(&out));
    let after = version();
    assert_eq!(
        before, after,
        "a second import rewrote an unchanged Machine"
    );

    // The status subresource takes a stage; kubectl's columns show it.
    kubectl(
        cluster,
        &[
            "patch",
            "machine",
            "node-02",
            "-n",
            "rack1",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"rollout":"rack","stage":"failed","sinceMs":1,"history":[{"stage":"failed","atMs":1}],"failure":{"stage":"powering-on","reason":"BMC auth: wrong password"},"installs":0}}"#,
        ],
    );
    let table = kubectl(cluster, &["get", "machines", "-n", "rack1", "-o", "wide"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "ROLE", "STAGE", "SLOT", "ERROR", "IMAGE", "AGE"],
        "{table}"
    );
    let row = table.lines().find(|l| l.starts_with("node-02")).unwrap();
    assert!(
        row.contains("worker")
            && row.contains("failed")
            && row.contains("BMC auth: wrong password"),
        "{table}"
    );
    // A stage that is not one is refused by the schema.
    let bad = kubectl_output(
        cluster,
        &[
            "patch",
            "machine",
            "node-02",
            "-n",
            "rack1",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"stage":"exploded"}}"#,
        ],
    );
    assert!(!bad.status.success(), "{}", text(&bad));
    assert!(text(&bad).contains("status.stage"), "{}", text(&bad));
}

#[test]
fn the_controller_refuses_a_rollout_of_another_build_before_it_leads() {
    let cluster = TestCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("fleet.yaml");
    std::fs::write(&inventory, INVENTORY.replace("rack1", "rack2")).unwrap();
    for n in ["node-01", "node-02"] {
        std::fs::write(dir.path().join(format!("{n}.bmc")), PASSWORD).unwrap();
    }
    let out = import_into(cluster, &inventory, "rack2");
    assert!(out.status.success(), "{}", text(&out));
    let rollout = dir.path().join("rollout.yaml");
    let wanted = "a".repeat(64);
    std::fs::write(
        &rollout,
        format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Rollout\nmetadata: {{name: r1, namespace: rack2}}\n\
             spec: {{artifacts: /srv/build, imageSha256: {wanted}, parallelism: 2}}\n"
        ),
    )
    .unwrap();
    kubectl(cluster, &["apply", "-f", rollout.to_str().unwrap()]);
    // A build whose root image is another one.
    let artifacts = dir.path().join("build");
    std::fs::create_dir(&artifacts).unwrap();
    let built = "b".repeat(64);
    let manifest = serde_json::json!({
        "kiln_version": "0", "spec_sha256": "0", "suite": "trixie", "mirror": "", "kernel": "",
        "kernel_args": [], "rootfs_cache_key": "", "packages": [],
        "artifacts": [{"path": kiln_spec::bootargs::PXE_ROOTFS, "size": 1, "sha256": built}],
    });
    std::fs::write(artifacts.join("manifest.json"), manifest.to_string()).unwrap();
    let spec = kiln_spec::Appliance::profile(kiln_spec::ProfileName::Test).to_yaml();
    std::fs::write(artifacts.join("spec.yaml"), spec).unwrap();
    let out = Command::new(KILN)
        .args(["fleet", "controller", "--kubeconfig"])
        .arg(&cluster.kubeconfig)
        .args([
            "--namespace",
            "rack2",
            "--rollout",
            "r1",
            "--interface",
            "lo",
        ])
        .arg("--artifacts")
        .arg(&artifacts)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "Rollout r1 installs image {wanted}, but the build in {} has {built}: nothing was started",
            artifacts.display()
        )),
        "{}",
        text(&out)
    );
    // It never took part in the election, and no Machine was touched.
    let leases = kubectl(cluster, &["get", "leases", "-n", "rack2", "-o", "name"]);
    assert!(leases.trim().is_empty(), "{leases}");
    let machines = kubectl(cluster, &["get", "machines", "-n", "rack2", "-o", "json"]);
    let machines: Value = serde_json::from_str(&machines).unwrap();
    assert!(
        machines["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m.get("status").is_none()),
        "{machines:#}"
    );
}

#[test]
fn the_definitions_print_as_yaml_kubectl_accepts() {
    let cluster = TestCluster::shared();
    let out = Command::new(KILN).args(["fleet", "crds"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crds.yaml");
    std::fs::write(&file, &out.stdout).unwrap();
    let applied = kubectl(
        cluster,
        &["apply", "--dry-run=server", "-f", file.to_str().unwrap()],
    );
    assert!(applied.contains("machines.kiln.dev"), "{applied}");
    assert!(applied.contains("rollouts.kiln.dev"), "{applied}");
}
