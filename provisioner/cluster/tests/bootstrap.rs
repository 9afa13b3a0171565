//! `kiln cluster bootstrap` against a real kube-apiserver + etcd, with the real upstream CRDs
//! and manifests from the offline mirror.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kiln_cluster::Error;
use kiln_cluster::bootstrap::{BootstrapOptions, Change, bootstrap};
use kiln_cluster::lock::Lock;
use kiln_cluster::manifests::{Source, fetch_all};
use kiln_cluster::plan::{kiln_objects, plan_bootstrap};
use kiln_cluster::testing::{HarnessOptions, TestCluster};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::json;

fn mirror() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/upstream");
    assert!(
        dir.join("SHA256SUMS").exists(),
        "the upstream mirror {} is missing",
        dir.display()
    );
    dir
}

fn opts(dry_run: bool) -> BootstrapOptions {
    BootstrapOptions {
        dry_run,
        timeout: Duration::from_secs(120),
    }
}

#[tokio::test]
async fn bootstrap_applies_the_addon_set_in_order_and_a_second_run_changes_nothing() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = TestCluster::shared();
    let client = cluster.client().await;
    let lock = Lock::embedded().unwrap();
    let files = fetch_all(&lock, &Source::Mirror(mirror())).await.unwrap();
    let plan = plan_bootstrap(&files, kiln_objects()).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());

    // Dry run on an empty cluster: everything would be created, nothing is.
    let dry = bootstrap(&client, &plan, &opts(true)).await.unwrap();
    assert_eq!(
        dry.count(Change::Created),
        plan.objects.len(),
        "{}",
        dry.render()
    );
    assert!(
        crds.get_opt("hyperconvergeds.hco.kubevirt.io")
            .await
            .unwrap()
            .is_none()
    );

    let first = bootstrap(&client, &plan, &opts(false)).await.unwrap();
    assert_eq!(first.changed(), plan.objects.len(), "{}", first.render());
    for name in [
        "hyperconvergeds.hco.kubevirt.io",
        "kubevirts.kubevirt.io",
        "cdis.cdi.kubevirt.io",
        "cephclusters.ceph.rook.io",
        "network-attachment-definitions.k8s.cni.cncf.io",
        "volumesnapshots.snapshot.storage.k8s.io",
    ] {
        let crd = crds.get(name).await.unwrap();
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} not Established");
    }
    // kiln's custom resources were accepted by the real schemas, defaults applied server-side.
    let hco = dynamic(
        &client,
        "hco.kubevirt.io",
        "v1beta1",
        "HyperConverged",
        "hyperconvergeds",
        "kubevirt-hyperconverged",
    );
    let hco = hco.get("kubevirt-hyperconverged").await.unwrap();
    assert!(
        hco.data["spec"]["liveMigrationConfig"].is_object(),
        "HCO defaults missing: {:?}",
        hco.data["spec"]
    );
    let ceph = dynamic(
        &client,
        "ceph.rook.io",
        "v1",
        "CephCluster",
        "cephclusters",
        "rook-ceph",
    );
    assert_eq!(
        ceph.get("rook-ceph").await.unwrap().data["spec"]["mon"]["count"],
        3
    );

    // The real schema rejects what it should: the validation is not a rubber stamp.
    let bad = json!({"apiVersion": "ceph.rook.io/v1", "kind": "CephCluster", "metadata": {"name": "bad", "namespace": "rook-ceph"}, "spec": {"mon": {"count": "three"}}});
    let err = ceph
        .patch("bad", &PatchParams::apply("kiln"), &Patch::Apply(&bad))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.mon.count"), "{err}");

    let second = bootstrap(&client, &plan, &opts(false)).await.unwrap();
    assert_eq!(second.changed(), 0, "{}", second.render());
    assert!(
        second
            .render()
            .contains(&format!("{} objects: 0 changed", plan.objects.len())),
        "{}",
        second.render()
    );

    // Drift: someone scales an operator; the dry run shows it, the next run repairs it.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "kubevirt-hyperconverged");
    deployments
        .patch(
            "virt-operator",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    let dry = bootstrap(&client, &plan, &opts(true)).await.unwrap();
    let text = dry.render();
    assert!(text.contains("would configure apps/v1 Deployment kubevirt-hyperconverged/virt-operator (spec.replicas)"), "{text}");
    assert_eq!(dry.changed(), 1, "{text}");
    assert_eq!(
        deployments
            .get("virt-operator")
            .await
            .unwrap()
            .spec
            .replicas,
        Some(5)
    );
    let repair = bootstrap(&client, &plan, &opts(false)).await.unwrap();
    assert_eq!(repair.changed(), 1, "{}", repair.render());
    assert_ne!(
        deployments
            .get("virt-operator")
            .await
            .unwrap()
            .spec
            .replicas,
        Some(5)
    );
}

fn dynamic(
    client: &kube::Client,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    ns: &str,
) -> Api<DynamicObject> {
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    Api::namespaced_with(client.clone(), ns, &ar)
}

#[tokio::test]
async fn a_tampered_mirror_fails_the_sha256_check_and_applies_nothing() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A cluster of its own, so that "nothing applied" is not confused by the other test.
    let cluster = TestCluster::start(HarnessOptions::default());
    let client = cluster.client().await;
    let lock = Lock::embedded().unwrap();
    let tampered = tempfile::tempdir().unwrap();
    for addon in &lock.addons {
        for f in &addon.files {
            let to = tampered.path().join(&f.path);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(mirror().join(&f.path), &to).unwrap();
        }
    }
    let victim = tampered
        .path()
        .join("multus-cni/v4.3.0/deployments/multus-daemonset-thick.yml");
    let text = std::fs::read_to_string(&victim)
        .unwrap()
        .replace("privileged: true", "privileged: false");
    std::fs::write(&victim, text).unwrap();

    let err = fetch_all(&lock, &Source::Mirror(tampered.path().into()))
        .await
        .unwrap_err();
    let Error::Integrity(mismatches) = &err else {
        panic!("{err}")
    };
    assert_eq!(mismatches.len(), 1, "{err}");
    assert_eq!(
        mismatches[0].path,
        "multus-cni/v4.3.0/deployments/multus-daemonset-thick.yml"
    );
    assert!(err.to_string().contains("sha256"), "{err}");
    // Nothing reached the API server: no CRD of the addon set exists.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let names: Vec<String> = crds
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    assert!(names.is_empty(), "{names:?}");
}
