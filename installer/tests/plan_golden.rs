//! Golden tests of the install planner, one directory per case under `tests/golden/`:
//! `spec.yaml` (appliance spec), `hardware.json` (frozen hardware snapshot), optional
//! `options.json` (command-line consent, node name, unattended, netboot enrolment), and the
//! committed result: `expected.json` (the plan) or `expected-error.txt` (the message the user
//! sees).
//! `KILN_BLESS=1 cargo test -p kiln-installer --test plan_golden` rewrites the results.

use std::path::{Path, PathBuf};

use kiln_installer::plan::{Artifact, ImageSource, PlanOptions, WipeConsent, plan};
use kiln_spec::{Appliance, HardwareInventory};

/// Options a case may set; the image is the same for every case.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CaseOptions {
    #[serde(default)]
    wipe: WipeConsent,
    node_name: Option<String>,
    rootfs_size_bytes: Option<u64>,
    #[serde(default)]
    unattended: bool,
    enrolment: Option<kiln_spec::enrol::Enrolment>,
}

/// Every case's disk GUID (the CLI makes a random one).
const DISK_GUID: &str = "6b696c6e-0000-4000-8000-000000000001";

fn image(rootfs_size: Option<u64>) -> ImageSource {
    let art = |path: &str, size_bytes: u64, sha: &str| Artifact {
        path: path.into(),
        size_bytes,
        sha256: Some(sha.repeat(64)),
    };
    ImageSource {
        rootfs: art(
            "/run/kiln/medium/rootfs.squashfs",
            rootfs_size.unwrap_or(300 << 20),
            "a",
        ),
        kernel: art("/run/kiln/medium/vmlinuz", 8 << 20, "b"),
        initrd: art("/run/kiln/medium/initrd.img", 24 << 20, "c"),
    }
}

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("hardware.json").exists())
        .collect();
    dirs.sort();
    dirs
}

fn run_case(dir: &Path) -> Result<(), String> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let spec = Appliance::from_yaml(&read("spec.yaml").map_err(|e| format!("spec.yaml: {e}"))?)
        .map_err(|e| format!("spec.yaml: {e}"))?;
    let hw = HardwareInventory::from_json(&read("hardware.json").unwrap())
        .map_err(|e| format!("hardware.json: {e}"))?;
    let case: CaseOptions = match read("options.json") {
        Ok(text) => serde_json::from_str(&text).map_err(|e| format!("options.json: {e}"))?,
        Err(_) => CaseOptions::default(),
    };
    let opts = PlanOptions {
        image: image(case.rootfs_size_bytes),
        wipe: case.wipe,
        node_name: case.node_name,
        disk_guid: DISK_GUID.into(),
        unattended: case.unattended,
        enrolment: case.enrolment,
    };
    let (name, actual, other) = match plan(&spec, &hw, &opts) {
        Ok(p) => (
            "expected.json",
            serde_json::to_string_pretty(&p).unwrap() + "\n",
            "expected-error.txt",
        ),
        Err(e) => ("expected-error.txt", format!("{e}\n"), "expected.json"),
    };
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(dir.join(name), &actual).unwrap();
        let _ = std::fs::remove_file(dir.join(other));
        return Ok(());
    }
    let expected = read(name).map_err(|_| {
        format!(
            "produced {name} but the case has none committed (KILN_BLESS=1 writes it):\n{actual}"
        )
    })?;
    if expected != actual {
        return Err(format!(
            "{name} differs (KILN_BLESS=1 regenerates)\n--- expected\n{expected}\n--- actual\n{actual}"
        ));
    }
    Ok(())
}

#[test]
fn install_plans_match_their_golden_files() {
    let cases = cases();
    assert!(
        cases.len() >= 10,
        "golden cases missing: found {}",
        cases.len()
    );
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|dir| {
            run_case(dir)
                .err()
                .map(|e| format!("case {}: {e}", dir.file_name().unwrap().to_string_lossy()))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
