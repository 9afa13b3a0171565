//! The Kubernetes payload of an image with the `kubernetes` feature: kiln's multi-call `kube`
//! binary (with a link per component) and etcd, built from their pinned Go modules by the same
//! script the test suite uses, and the airgap bundle: the pause image every pod sandbox runs,
//! made from the image's own `catatonit`, and the cluster DNS image, kiln's CoreDNS build.
//! Paths match what the node bring-up expects.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_spec::kubernetes::{
    BIN_DIR, CHECK_IMAGE, CHECK_PAGE, COREDNS_IMAGE, IMAGES_DIR, PAUSE_IMAGE,
};
use kiln_spec::manifest::{KubernetesManifest, NodeImage};

use crate::error::BuildError;
use crate::oci::{OciImage, write_archive};

/// The build script, its pinned versions and the multi-call main, as in the repository.
const SCRIPT: &str = include_str!("../../scripts/kube-fixtures.sh");
const VERSIONS: &str = include_str!("../../scripts/kube-fixtures/versions.env");
const MAIN_GO: &str = include_str!("../../scripts/kube-fixtures/kube/main.go");
const COREDNS_MAIN_GO: &str = include_str!("../../scripts/kube-fixtures/coredns/main.go");

pub const COMPONENTS: [&str; 6] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
];

/// Kernel modules a node's containers and Services need, kept in minimal images: overlay
/// snapshots, pod veths on a bridge, and the netfilter pieces iptables (nft) and kube-proxy use.
pub const NODE_MODULES: &[&str] = &[
    "overlay",
    "veth",
    "bridge",
    "br_netfilter",
    "nf_tables",
    "nfnetlink",
    "nft_compat",
    "nft_chain_nat",
    "nft_ct",
    "nft_masq",
    "nft_nat",
    "nft_reject_inet",
    "nf_nat",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "xt_conntrack",
    "xt_MASQUERADE",
    "xt_comment",
    "xt_mark",
    "xt_addrtype",
    "xt_multiport",
    "xt_statistic",
    "xt_nat",
    "xt_tcpudp",
    "xt_physdev",
    "ipt_REJECT",
    "ip6t_REJECT",
];

/// Loaded at boot: nothing requests them on demand, and pods' bridged traffic must pass
/// through iptables for Services to work.
const MODULES_LOAD: &str = "overlay\nbr_netfilter\n";
/// Pods reach other nodes and Services through the host: forwarding on, bridged traffic
/// through iptables.
const SYSCTLS: &str = "net.ipv4.ip_forward = 1\nnet.bridge.bridge-nf-call-iptables = 1\nnet.bridge.bridge-nf-call-ip6tables = 1\n";

/// Built binaries and the versions they were built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeBinaries {
    pub kube: PathBuf,
    pub etcd: PathBuf,
    pub coredns: PathBuf,
    pub kubernetes_version: String,
    pub etcd_version: String,
    pub coredns_version: String,
}

fn version(key: &str) -> String {
    VERSIONS
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("{key} is pinned in scripts/kube-fixtures/versions.env"))
}

/// The binaries in `cache` (`<cache>/bin/<version>/`), built first when missing: 20–40
/// CPU-minutes once, then a check. Needs Go (in PATH or /usr/local/go).
pub fn ensure_binaries(cache: &Path) -> Result<KubeBinaries, BuildError> {
    let io = |what: &str| BuildError::io(what.to_string());
    let dir = tempfile::tempdir().map_err(io("creating a directory for the Kubernetes build"))?;
    for (rel, content) in [
        ("versions.env", VERSIONS),
        ("kube/main.go", MAIN_GO),
        ("coredns/main.go", COREDNS_MAIN_GO),
    ] {
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().expect("a file below a directory"))
            .and_then(|()| std::fs::write(&path, content))
            .map_err(io("preparing the Kubernetes build"))?;
    }
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(SCRIPT)
        .arg("kube-fixtures")
        .env("KUBE_FIXTURES_DIR", dir.path())
        .env("KILN_CACHE", cache);
    kiln_exec::Tool::new("bash", "bash")
        .output(cmd, "building the Kubernetes components and etcd")?;
    let (kubernetes_version, etcd_version, coredns_version) = (
        version("KUBERNETES_VERSION"),
        version("ETCD_VERSION"),
        version("COREDNS_VERSION"),
    );
    let bin = cache.join("bin");
    Ok(KubeBinaries {
        kube: bin.join(&kubernetes_version).join("kube"),
        etcd: bin.join(&etcd_version).join("etcd"),
        coredns: bin
            .join(format!("coredns-{coredns_version}"))
            .join("coredns"),
        kubernetes_version,
        etcd_version,
        coredns_version,
    })
}

fn sha256_file(path: &Path) -> Result<String, BuildError> {
    Ok(crate::manifest::artifact(Path::new("/"), &path.display().to_string())?.sha256)
}

/// The pause image: `catatonit` (a static init that reaps and waits) as `/pause -P`.
pub fn pause_image(catatonit: Vec<u8>) -> OciImage {
    OciImage {
        name: PAUSE_IMAGE.into(),
        files: [("pause".to_string(), (catatonit, 0o755))].into(),
        entrypoint: vec!["/pause".into(), "-P".into()],
        ..OciImage::default()
    }
}

/// The cluster DNS image: kiln's CoreDNS build, alone, as `/coredns`.
pub fn coredns_image(coredns: Vec<u8>) -> OciImage {
    OciImage {
        name: COREDNS_IMAGE.into(),
        files: [("coredns".to_string(), (coredns, 0o755))].into(),
        entrypoint: vec!["/coredns".into()],
        ..OciImage::default()
    }
}

/// kiln's check workload: a static busybox serving one page (see [`CHECK_IMAGE`]).
pub fn check_image(busybox: Vec<u8>) -> OciImage {
    OciImage {
        name: CHECK_IMAGE.into(),
        files: [
            ("bin/busybox".to_string(), (busybox, 0o755)),
            (
                "www/index.html".to_string(),
                (CHECK_PAGE.as_bytes().to_vec(), 0o644),
            ),
        ]
        .into(),
        entrypoint: ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
            .map(String::from)
            .to_vec(),
        ..OciImage::default()
    }
}

/// Puts the binaries and the airgap bundle into the image tree at `root`; returns what the
/// manifest records of them.
pub fn install(root: &Path, bins: &KubeBinaries) -> Result<KubernetesManifest, BuildError> {
    let bin_dir = root.join(BIN_DIR.trim_start_matches('/'));
    let images = root.join(IMAGES_DIR.trim_start_matches('/'));
    for d in [&bin_dir, &images] {
        std::fs::create_dir_all(d).map_err(BuildError::io(format!("creating {}", d.display())))?;
    }
    for (from, name) in [(&bins.kube, "kube"), (&bins.etcd, "etcd")] {
        let to = bin_dir.join(name);
        std::fs::copy(from, &to).map_err(BuildError::io(format!(
            "copying {} into the image",
            from.display()
        )))?;
    }
    for c in COMPONENTS {
        let link = bin_dir.join(c);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("kube", &link)
            .map_err(BuildError::io(format!("linking {}", link.display())))?;
    }
    let catatonit = root.join("usr/bin/catatonit");
    let pause = std::fs::read(&catatonit).map_err(|_| {
        BuildError::Rootfs(
            "no /usr/bin/catatonit: the kubernetes feature needs the catatonit package in spec.os.packages (it is the pods' pause process)".into(),
        )
    })?;
    let coredns = std::fs::read(&bins.coredns).map_err(BuildError::io(format!(
        "reading {}",
        bins.coredns.display()
    )))?;
    let mut bundle = vec![
        (pause_image(pause), "pause.tar"),
        (coredns_image(coredns), "coredns.tar"),
    ];
    // busybox-static's, when the spec's packages include it.
    if let Ok(busybox) = std::fs::read(root.join("bin/busybox")) {
        bundle.push((check_image(busybox), "hello.tar"));
    }
    let mut node_images = Vec::new();
    for (image, file) in bundle {
        let archive = write_archive(&image, &images.join(file))?;
        node_images.push(NodeImage {
            name: archive.name,
            digest: archive.manifest_digest,
            path: format!("{IMAGES_DIR}/{file}"),
        });
    }
    mask_distribution_containerd(root)?;
    for (rel, content) in [
        ("etc/modules-load.d/kiln-kubernetes.conf", MODULES_LOAD),
        ("etc/sysctl.d/90-kiln-kubernetes.conf", SYSCTLS),
    ] {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().expect("a file below a directory"))
            .and_then(|()| std::fs::write(&path, content))
            .map_err(BuildError::io(format!("writing {}", path.display())))?;
    }
    Ok(KubernetesManifest {
        kubernetes_version: bins.kubernetes_version.clone(),
        etcd_version: bins.etcd_version.clone(),
        kube_sha256: sha256_file(&bins.kube)?,
        etcd_sha256: sha256_file(&bins.etcd)?,
        coredns_version: bins.coredns_version.clone(),
        images: node_images,
    })
}

/// The node agent runs containerd with kiln's config on the standard socket; Debian's own
/// unit would start first with another config on the same socket.
fn mask_distribution_containerd(root: &Path) -> Result<(), BuildError> {
    let unit = root.join("etc/systemd/system/containerd.service");
    if std::fs::read_link(&unit).is_ok_and(|t| t == Path::new("/dev/null")) {
        return Ok(());
    }
    let _ = std::fs::remove_file(&unit);
    std::fs::create_dir_all(root.join("etc/systemd/system"))
        .and_then(|()| std::os::unix::fs::symlink("/dev/null", &unit))
        .map_err(BuildError::io(format!("masking {}", unit.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn the_payload_lands_where_the_node_looks_and_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (root, cache) = (dir.path().join("root"), dir.path().join("cache"));
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(root.join("usr/bin/catatonit"), b"catatonit").unwrap();
        let bins = KubeBinaries {
            kube: cache.join("kube"),
            etcd: cache.join("etcd"),
            coredns: cache.join("coredns"),
            kubernetes_version: "v1.37.1".into(),
            etcd_version: "v3.6.16".into(),
            coredns_version: "v1.14.7".into(),
        };
        std::fs::write(&bins.kube, b"kube").unwrap();
        std::fs::write(&bins.etcd, b"etcd").unwrap();
        std::fs::write(&bins.coredns, b"coredns").unwrap();

        let m = install(&root, &bins).unwrap();
        let bin_dir = root.join(&BIN_DIR[1..]);
        assert_eq!(m.kube_sha256, hex::encode(Sha256::digest(b"kube")));
        assert_eq!(m.etcd_sha256, hex::encode(Sha256::digest(b"etcd")));
        for c in COMPONENTS {
            assert_eq!(
                std::fs::read_link(bin_dir.join(c)).unwrap(),
                Path::new("kube")
            );
        }
        assert_eq!(std::fs::read(bin_dir.join("kubelet")).unwrap(), b"kube");
        let names: Vec<&str> = m.images.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, [PAUSE_IMAGE, COREDNS_IMAGE]);
        // With busybox-static installed, the check workload too.
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/busybox"), b"busybox").unwrap();
        let with_check = install(&root, &bins).unwrap();
        assert_eq!(with_check.images.last().unwrap().name, CHECK_IMAGE);
        std::fs::remove_file(root.join("bin/busybox")).unwrap();
        std::fs::remove_file(root.join(&with_check.images[2].path[1..])).unwrap();
        for image in &m.images {
            assert!(root.join(&image.path[1..]).exists(), "{}", image.path);
        }
        assert_eq!(
            std::fs::read_link(root.join("etc/systemd/system/containerd.service")).unwrap(),
            Path::new("/dev/null"),
            "Debian's containerd unit must not take the node's containerd socket"
        );
        let modules =
            std::fs::read_to_string(root.join("etc/modules-load.d/kiln-kubernetes.conf")).unwrap();
        assert!(modules.lines().any(|m| m == "br_netfilter"), "{modules}");
        let sysctls =
            std::fs::read_to_string(root.join("etc/sysctl.d/90-kiln-kubernetes.conf")).unwrap();
        assert!(sysctls.contains("net.ipv4.ip_forward = 1"), "{sysctls}");
        // The same inputs make the same image.
        let again = install(&root, &bins).unwrap();
        assert_eq!(again, m);

        std::fs::remove_file(root.join("usr/bin/catatonit")).unwrap();
        let e = install(&root, &bins).unwrap_err().to_string();
        assert!(e.contains("needs the catatonit package"), "{e}");
    }

    #[test]
    fn pinned_versions_are_read_from_the_one_file() {
        assert!(version("KUBERNETES_VERSION").starts_with("v1."));
        assert!(version("ETCD_VERSION").starts_with("v3."));
        assert!(version("COREDNS_VERSION").starts_with("v1."));
    }
}
