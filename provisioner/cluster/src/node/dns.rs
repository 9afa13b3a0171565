//! The cluster's DNS: kiln's CoreDNS build from the airgap bundle, run by the first control
//! plane as a Deployment behind the `kube-dns` Service at the address every kubelet gives its
//! pods (`clusterDNS`, the 10th address of the service network). Names outside the cluster go
//! to the node's own resolvers, when it has any.

use kiln_spec::kubernetes::{COREDNS_IMAGE, KubernetesNode};
use serde_json::{Value, json};

use super::{cluster_dns, service_net};

const NAMESPACE: &str = "kube-system";
const APP: &str = "kube-dns";

/// The resolvers in `resolv_conf` pods can use: loopback ones would point a pod at itself.
pub fn upstream_nameservers(resolv_conf: &str) -> Vec<String> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter(|ns| {
            ns.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| !ip.is_loopback() && !ip.is_unspecified())
        })
        .map(String::from)
        .collect()
}

/// The Corefile: cluster names from the API server, the rest forwarded to `upstream` (an
/// airgapped node may have none: then only cluster names resolve).
pub fn corefile(node: &KubernetesNode, upstream: &[String]) -> String {
    let forward = if upstream.is_empty() {
        String::new()
    } else {
        format!("    forward . {}\n", upstream.join(" "))
    };
    format!(
        ".:53 {{\n    errors\n    health {{\n        lameduck 5s\n    }}\n    ready\n    \
         kubernetes {domain} in-addr.arpa ip6.arpa {{\n        pods insecure\n        \
         fallthrough in-addr.arpa ip6.arpa\n        ttl 30\n    }}\n{forward}    cache 30\n    \
         reload\n    loadbalance\n}}\n",
        domain = node.cluster_domain,
    )
}

/// Every object of the cluster DNS, applied with server-side apply.
pub fn dns_objects(node: &KubernetesNode, upstream: &[String]) -> Vec<Value> {
    let service_ip = service_net(node)
        .and_then(|n| cluster_dns(&n))
        .map(|ip| ip.to_string())
        .unwrap_or_default();
    let labels = json!({"k8s-app": APP});
    let port = |name: &str, protocol: &str| json!({"name": name, "port": 53, "protocol": protocol});
    vec![
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "coredns", "namespace": NAMESPACE},
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": NAMESPACE}],
        }),
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": NAMESPACE},
            "data": {"Corefile": corefile(node, upstream)},
        }),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": NAMESPACE, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "priorityClassName": "system-cluster-critical",
                        // Its own resolvers are the node's, not itself.
                        "dnsPolicy": "Default",
                        "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],
                        "containers": [{
                            "name": "coredns",
                            "image": COREDNS_IMAGE,
                            // From the airgap bundle, imported on every node.
                            "imagePullPolicy": "Never",
                            "args": ["-conf", "/etc/coredns/Corefile"],
                            "ports": [
                                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                            ],
                            "resources": {
                                "requests": {"cpu": "50m", "memory": "64Mi"},
                                "limits": {"memory": "170Mi"},
                            },
                            "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": true}],
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}},
                            "livenessProbe": {
                                "httpGet": {"path": "/health", "port": 8080},
                                "initialDelaySeconds": 60,
                                "failureThreshold": 5,
                            },
                        }],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": APP, "namespace": NAMESPACE, "labels": labels},
            "spec": {
                "clusterIP": service_ip,
                "selector": labels,
                "ports": [port("dns", "UDP"), port("dns-tcp", "TCP")],
            },
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_forward_only_to_resolvers_they_can_reach() {
        let conf = "# from DHCP\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nsearch example\n\
                    nameserver ::1\nnameserver 2001:db8::53\nnameserver bogus\n";
        assert_eq!(upstream_nameservers(conf), ["192.0.2.53", "2001:db8::53"]);
        assert!(upstream_nameservers("").is_empty());
    }
}
