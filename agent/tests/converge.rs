//! The agent's controllers on a real temporary sysroot, driven through the engine: converge
//! from empty, idempotence (also as a property over generated configs), unmanaged files,
//! removal, adoption, and rejected configs.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_agent::controllers::{NodeStatusResource, Shared, Sources, plan_now};
use kiln_agent::daemon::agent_runtime;
use kiln_agent::engine::Runtime;
use kiln_agent::host::Host;
use kiln_agent::status::{NodeStatus, ResourceState};
use proptest::prelude::*;

/// A minimal host tree: the account files a Debian root has, nothing else.
fn host_tree() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let etc = t.path().join("etc");
    fs::create_dir_all(&etc).unwrap();
    fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    fs::write(etc.join("group"), "root:x:0:\nsudo:x:27:\nadm:x:4:\n").unwrap();
    fs::write(etc.join("shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
    fs::write(etc.join("gshadow"), "root:*::\n").unwrap();
    // Units the OS ships (kiln enables them for network and time settings).
    let units = t.path().join("usr/lib/systemd/system");
    fs::create_dir_all(&units).unwrap();
    for u in ["systemd-networkd.service", "systemd-timesyncd.service"] {
        fs::write(
            units.join(u),
            "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n",
        )
        .unwrap();
    }
    t
}

struct Agent {
    root: PathBuf,
    config: PathBuf,
    rt: Runtime,
}

impl Agent {
    fn new(root: &Path) -> Agent {
        let config = root.join("var/lib/kiln/node.yaml");
        fs::create_dir_all(config.parent().unwrap()).unwrap();
        let sources = Sources {
            installed: config.clone(),
            overrides: vec![root.join("etc/kiln/node.override.yaml")],
        };
        let rt = agent_runtime(
            Host::real(root),
            sources,
            Arc::new(Shared::new()),
            "A".into(),
            None,
            tokio::sync::watch::channel(None).0,
        )
        .unwrap();
        Agent {
            root: root.to_path_buf(),
            config,
            rt,
        }
    }

    fn set_config(&self, spec_yaml: &str) {
        fs::write(
            &self.config,
            format!("apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\nspec:\n{spec_yaml}"),
        )
        .unwrap();
    }

    /// Re-reads the config and runs every controller that wakes in turn.
    fn converge(&mut self) -> NodeStatus {
        self.rt.wake("config");
        self.rt.wake("host");
        self.rt.run_until_idle();
        self.rt
            .state()
            .get::<NodeStatusResource>("node")
            .unwrap()
            .0
            .clone()
    }

    fn plan(&self) -> Vec<String> {
        let sources = Sources {
            installed: self.config.clone(),
            overrides: vec![],
        };
        plan_now(&Host::real(&self.root), &sources)
            .unwrap()
            .actions
            .into_iter()
            .map(|a| a.description)
            .collect()
    }

    fn read(&self, p: &str) -> Option<String> {
        fs::read_to_string(self.root.join(p.trim_start_matches('/'))).ok()
    }
}

fn condition(s: &NodeStatus, kind: &str) -> bool {
    s.condition(kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {s:#?}"))
        .status
}

const FULL: &str = r#"  hostname: node-07
  users:
    - name: ops
      groups: [sudo]
      sshAuthorizedKeys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@lab"]
  files:
    - {path: /etc/motd, content: "welcome\n"}
    - {path: /srv/app/config.toml, content: "x = 1\n", mode: "0640", owner: "ops:sudo"}
  directories:
    - {path: /srv/data, mode: "0750", owner: ops}
  units:
    - name: hello.service
      content: "[Unit]\nDescription=hello\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n"
      enabled: true
      dropIns: [{name: 10-env.conf, content: "[Service]\nEnvironment=A=1\n"}]
  sysctls: {net.ipv4.ip_forward: "1"}
  kernelModules: [{name: br_netfilter}]
  network:
    interfaces: [{name: eth0, addresses: [10.0.0.5/24], gateway: 10.0.0.1}]
  kernelArgs: [intel_iommu=on]
  virtualization: {kvm: true, hugepages2m: 8}
  dataDisks: [{partLabel: KILN_DATA}]
"#;

#[test]
fn converges_from_empty_and_a_second_apply_changes_nothing() {
    let t = host_tree();
    let mut a = Agent::new(t.path());
    a.set_config(FULL);
    let s = a.converge();
    assert!(condition(&s, "Ready"), "{s:#?}");
    assert!(!condition(&s, "Failed"), "{s:#?}");
    assert!(
        condition(&s, "PendingReboot"),
        "kernel args wait for a reboot"
    );
    assert!(!condition(&s, "KvmReady"), "the tree has no /dev/kvm");
    assert_eq!(
        s.condition("DataDisksPresent").unwrap().message,
        "/dev/disk/by-partlabel/KILN_DATA"
    );
    assert_eq!(a.read("/proc/sys/vm/nr_hugepages").as_deref(), Some("8\n"));
    assert!(
        s.condition("PendingReboot")
            .unwrap()
            .message
            .contains("intel_iommu=on"),
        "{s:#?}"
    );

    assert_eq!(a.read("/etc/hostname").as_deref(), Some("node-07\n"));
    assert_eq!(a.read("/etc/motd").as_deref(), Some("welcome\n"));
    let passwd = a.read("/etc/passwd").unwrap();
    let ops_uid: u32 = passwd
        .lines()
        .find(|l| l.starts_with("ops:"))
        .expect("useradd created ops")
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert!(a.read("/etc/group").unwrap().contains("sudo:x:27:ops"));
    let cfg = fs::metadata(t.path().join("srv/app/config.toml")).unwrap();
    assert_eq!(
        (cfg.mode() & 0o7777, cfg.uid(), cfg.gid()),
        (0o640, ops_uid, 27)
    );
    let keys = fs::metadata(t.path().join("home/ops/.ssh/authorized_keys")).unwrap();
    assert_eq!((keys.mode() & 0o7777, keys.uid()), (0o600, ops_uid));
    assert_eq!(
        fs::metadata(t.path().join("srv/data"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o750
    );
    // systemctl --root enabled the unit: the symlink systemd reads at boot.
    let wants = t
        .path()
        .join("etc/systemd/system/multi-user.target.wants/hello.service");
    assert!(
        fs::symlink_metadata(&wants)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(
        a.read("/etc/systemd/system/hello.service.d/10-env.conf")
            .is_some()
    );
    assert_eq!(
        a.read("/proc/sys/net/ipv4/ip_forward").as_deref(),
        Some("1\n")
    );
    assert_eq!(
        a.read("/etc/sysctl.d/90-kiln.conf").as_deref(),
        Some("net.ipv4.ip_forward = 1\nvm.nr_hugepages = 8\n")
    );
    assert_eq!(
        a.read("/etc/modules-load.d/kiln.conf").as_deref(),
        Some("br_netfilter\nkvm\n")
    );
    assert!(
        a.read("/etc/systemd/network/10-kiln-eth0.network")
            .unwrap()
            .contains("Address=10.0.0.5/24\nGateway=10.0.0.1")
    );

    assert_eq!(
        a.plan(),
        Vec::<String>::new(),
        "converged: nothing left to do"
    );
    let before = snapshot(t.path());
    let s2 = a.converge();
    assert!(condition(&s2, "Ready"));
    assert_eq!(snapshot(t.path()), before, "a second apply changes nothing");
}

/// Every file under `root` with its content, mode and modification time.
fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>, u32, i64, i64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                out.push((
                    e.path(),
                    fs::read(e.path()).unwrap(),
                    m.mode(),
                    m.mtime(),
                    m.mtime_nsec(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn unmanaged_files_are_never_touched_and_removal_takes_only_what_kiln_made() {
    let t = host_tree();
    let mut a = Agent::new(t.path());
    // Unmanaged things next to and inside what kiln will manage.
    fs::create_dir_all(t.path().join("etc/app")).unwrap();
    fs::write(t.path().join("etc/app/local.conf"), "mine\n").unwrap();
    fs::write(t.path().join("etc/issue"), "unmanaged\n").unwrap();
    // A pre-existing file that the config takes over: its old content must come back.
    fs::write(t.path().join("etc/adopted.conf"), "original\n").unwrap();
    a.set_config(
        r#"  files:
    - {path: /etc/app/kiln.conf, content: "a\n"}
    - {path: /etc/adopted.conf, content: "kiln's\n"}
    - {path: /opt/kiln/deep/tree/file, content: "b\n"}
  units:
    - name: web.service
      content: "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n"
      enabled: true
  sysctls: {vm.swappiness: "10"}
"#,
    );
    fs::create_dir_all(t.path().join("proc/sys/vm")).unwrap();
    fs::write(t.path().join("proc/sys/vm/swappiness"), "60\n").unwrap();
    let s = a.converge();
    assert!(condition(&s, "Ready"), "{s:#?}");
    assert_eq!(a.read("/etc/adopted.conf").as_deref(), Some("kiln's\n"));
    assert!(
        fs::symlink_metadata(
            t.path()
                .join("etc/systemd/system/multi-user.target.wants/web.service")
        )
        .is_ok()
    );

    a.set_config("  files: []\n");
    let s = a.converge();
    assert!(condition(&s, "Ready"), "{s:#?}");
    assert_eq!(a.read("/etc/app/kiln.conf"), None);
    assert_eq!(a.read("/etc/app/local.conf").as_deref(), Some("mine\n"));
    assert_eq!(a.read("/etc/issue").as_deref(), Some("unmanaged\n"));
    assert_eq!(
        a.read("/etc/adopted.conf").as_deref(),
        Some("original\n"),
        "old content restored"
    );
    assert!(
        !t.path().join("opt").exists(),
        "directories kiln created for its file are gone"
    );
    assert!(
        t.path().join("etc/app").is_dir(),
        "directory that existed before stays"
    );
    assert!(!t.path().join("etc/systemd/system/web.service").exists());
    assert!(
        fs::symlink_metadata(
            t.path()
                .join("etc/systemd/system/multi-user.target.wants/web.service")
        )
        .is_err(),
        "disabled before its file went"
    );
    assert_eq!(
        a.read("/proc/sys/vm/swappiness").as_deref(),
        Some("60\n"),
        "sysctl restored"
    );
    assert_eq!(a.plan(), Vec::<String>::new());
}

#[test]
fn an_invalid_config_is_rejected_with_field_paths_and_the_last_good_state_stays() {
    let t = host_tree();
    let mut a = Agent::new(t.path());
    a.set_config("  hostname: good-host\n  files: [{path: /etc/motd, content: \"good\\n\"}]\n");
    assert!(condition(&a.converge(), "Ready"));

    a.set_config(
        "  hostname: Bad_Host\n  files: [{path: /etc/motd, content: \"bad\\n\", mode: \"0999\"}, {path: relative, content: x}]\n  sysctls: {\"bad key\": \"1\"}\n",
    );
    let s = a.converge();
    assert!(!s.config.valid);
    let paths: Vec<&str> = s.config.errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.hostname",
            "spec.files[0].mode",
            "spec.files[1].path",
            "spec.sysctls.bad key"
        ]
    );
    assert!(!condition(&s, "ConfigValid"));
    assert!(condition(&s, "Failed"));
    assert_eq!(
        a.read("/etc/motd").as_deref(),
        Some("good\n"),
        "nothing of the bad config applied"
    );
    assert_eq!(a.read("/etc/hostname").as_deref(), Some("good-host\n"));

    // Drift is still repaired against the last good config.
    fs::write(t.path().join("etc/motd"), "edited\n").unwrap();
    a.converge();
    assert_eq!(a.read("/etc/motd").as_deref(), Some("good\n"));
}

#[test]
fn a_local_override_wins_over_the_installed_config() {
    let t = host_tree();
    let mut a = Agent::new(t.path());
    a.set_config(
        "  hostname: installed\n  files: [{path: /etc/motd, content: \"installed\\n\"}]\n",
    );
    fs::create_dir_all(t.path().join("etc/kiln")).unwrap();
    fs::write(
        t.path().join("etc/kiln/node.override.yaml"),
        "apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\nspec:\n  files: [{path: /etc/motd, content: \"local\\n\"}]\n",
    )
    .unwrap();
    let s = a.converge();
    assert_eq!(s.config.sources.len(), 2);
    assert_eq!(a.read("/etc/motd").as_deref(), Some("local\n"));
    assert_eq!(a.read("/etc/hostname").as_deref(), Some("installed\n"));
}

#[test]
fn drift_in_content_and_mode_is_reported_and_repaired() {
    let t = host_tree();
    let mut a = Agent::new(t.path());
    a.set_config("  files: [{path: /etc/motd, content: \"good\\n\", mode: \"0644\"}]\n");
    a.converge();
    fs::write(t.path().join("etc/motd"), "edited\n").unwrap();
    fs::set_permissions(t.path().join("etc/motd"), fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(a.plan(), ["rewrite file /etc/motd"]);
    let s = a.converge();
    assert_eq!(a.read("/etc/motd").as_deref(), Some("good\n"));
    assert_eq!(
        fs::metadata(t.path().join("etc/motd"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o644
    );
    assert_eq!(s.drift_repairs, 1);
    assert!(s.last_apply.as_ref().unwrap().drift);
    let motd = s
        .resources
        .iter()
        .find(|r| r.id == "file:/etc/motd")
        .unwrap();
    assert_eq!(motd.state, ResourceState::Ready);
}

fn arb_spec() -> impl Strategy<Value = String> {
    let file = (
        "[a-d]{1,2}(/[a-d]{1,2}){0,2}",
        "[ -~]{0,40}",
        prop::sample::select(vec!["0644", "0600", "0755", "0640"]),
    );
    // Keyed by path: a path is declared once.
    let dir = prop::sample::select(vec!["0755", "0700"]);
    (
        prop::collection::btree_map("[a-d]{1,2}(/[a-d]{1,2}){0,2}", file, 0..8),
        prop::collection::btree_map("[e-g]{1,2}(/[e-g]{1,2}){0,1}", dir, 0..3),
        prop::collection::btree_map("kt\\.[a-z]{1,6}", "[0-9]{1,4}", 0..4),
    )
        .prop_map(|(files, dirs, sysctls)| {
            // Keep paths unique and never both a file and a parent of another file.
            let mut used: Vec<String> = Vec::new();
            let mut listed = Vec::new();
            for (_, (p, content, mode)) in files {
                let path = format!("/srv/p/{p}");
                if used.iter().any(|u| {
                    u == &path
                        || u.starts_with(&format!("{path}/"))
                        || path.starts_with(&format!("{u}/"))
                }) {
                    continue;
                }
                used.push(path.clone());
                let content = serde_json::to_string(&content).unwrap();
                listed.push(format!(
                    "{{path: {path}, content: {content}, mode: \"{mode}\"}}"
                ));
            }
            let mut y = format!("  files: [{}]\n", listed.join(", "));
            let dirs: Vec<String> = dirs
                .into_iter()
                .map(|(p, mode)| format!("{{path: /srv/d/{p}, mode: \"{mode}\"}}"))
                .collect();
            y.push_str(&format!("  directories: [{}]\n", dirs.join(", ")));
            let sysctls: Vec<String> = sysctls
                .into_iter()
                .map(|(k, v)| format!("{k}: \"{v}\""))
                .collect();
            y.push_str(&format!("  sysctls: {{{}}}\n", sysctls.join(", ")));
            y
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any config converges, a second apply changes nothing, and moving to another config
    /// leaves exactly the second one's files (plus the unmanaged file, untouched).
    #[test]
    fn generated_configs_converge_idempotently(first in arb_spec(), second in arb_spec()) {
        let t = host_tree();
        fs::create_dir_all(t.path().join("srv/p")).unwrap();
        fs::write(t.path().join("srv/p/unmanaged"), "keep").unwrap();
        let mut a = Agent::new(t.path());
        for spec in [&first, &second] {
            a.set_config(spec);
            let s = a.converge();
            prop_assert!(condition(&s, "Ready"), "{:#?}", s);
            prop_assert_eq!(a.plan(), Vec::<String>::new());
            let before = snapshot(t.path());
            a.converge();
            prop_assert_eq!(snapshot(t.path()), before);
        }
        let unmanaged = a.read("/srv/p/unmanaged");
        prop_assert_eq!(unmanaged.as_deref(), Some("keep"));
        let mut files: Vec<String> = Vec::new();
        for part in second.split("path: ").skip(1).filter(|p| p.starts_with("/srv/p/")) {
            files.push(part.split(',').next().unwrap().to_string());
        }
        let mut on_disk: Vec<String> = snapshot(&t.path().join("srv/p"))
            .into_iter()
            .map(|(p, ..)| format!("/{}", p.strip_prefix(t.path()).unwrap().display()))
            .filter(|p| p != "/srv/p/unmanaged")
            .collect();
        on_disk.sort();
        files.sort();
        prop_assert_eq!(on_disk, files);
    }
}
