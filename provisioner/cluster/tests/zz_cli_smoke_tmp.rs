use kiln_cluster::testing::{HarnessOptions, TestCluster};
#[tokio::test]
async fn smoke() {
    let cluster = TestCluster::start(HarnessOptions::default());
    let kiln = std::path::PathBuf::from(std::env::var("KILN_BIN").unwrap());
    let kc = cluster.kubeconfig.display().to_string();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&kiln).args(args).args(["--kubeconfig", &kc]).output().unwrap();
        eprintln!("$ kiln {}\n[{}]\n{}\n{}", args.join(" "), out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr).lines().rev().take(6).collect::<Vec<_>>().join("\n"));
    };
    run(&["cluster", "bootstrap", "--mirror", "/work/shared/upstream", "--dry-run"]);
    run(&["cluster", "bootstrap", "--mirror", "/work/shared/upstream"]);
    run(&["cluster", "bootstrap", "--mirror", "/work/shared/upstream"]);
    run(&["cluster", "status"]);
    run(&["cluster", "status", "-o", "json"]);
    run(&["node", "cordon", "nope"]);
    run(&["node", "maintenance", "enter", "nope", "--dry-run"]);
}
