//! Who is at each end of a tunnel, in the headers Istio's ztunnel uses, so
//! telemetry names the peer across the two meshes: W3C `baggage` with
//! OpenTelemetry's Kubernetes keys on the CONNECT and on its 200, and
//! `forwarded: for="ip:port";host=<service host>` on the CONNECT.

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Istio's default cluster name (its `CLUSTER_ID`), sent as
/// `k8s.cluster.name` until weft knows clusters by name.
pub const DEFAULT_CLUSTER: &str = "Kubernetes";

/// A workload as baggage describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    /// The workload's kind as baggage spells it (`deployment`, `pod`, ...).
    pub workload_kind: Option<String>,
    pub workload: Option<String>,
    /// The canonical service (`service.name`).
    pub service: Option<String>,
    /// Its version (`service.version`).
    pub version: Option<String>,
}

impl PeerMetadata {
    /// A pod, named the way Istio names workloads: a Deployment's pod by
    /// its Deployment (the name before `-<pod-template-hash>-`), the
    /// canonical service and version from the usual labels.
    pub fn for_pod(namespace: &str, pod: &str, labels: &BTreeMap<String, String>) -> Self {
        let label = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned();
        let deployment = labels
            .get("pod-template-hash")
            .and_then(|hash| pod.split_once(&format!("-{hash}-")))
            .map(|(name, _)| name.to_owned());
        let (kind, workload) = match deployment {
            Some(d) => ("deployment", d),
            None => ("pod", pod.to_owned()),
        };
        PeerMetadata {
            cluster: Some(DEFAULT_CLUSTER.to_owned()),
            namespace: Some(namespace.to_owned()),
            workload_kind: Some(kind.to_owned()),
            service: label(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .or_else(|| Some(workload.clone())),
            version: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .or_else(|| Some("latest".to_owned())),
            workload: Some(workload),
        }
    }

    /// The `baggage` header value.
    pub fn to_baggage(&self) -> String {
        let kind_key = format!(
            "k8s.{}.name",
            self.workload_kind.as_deref().unwrap_or("pod")
        );
        [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            (kind_key.as_str(), &self.workload),
            ("service.name", &self.service),
            ("service.version", &self.version),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(",")
    }

    /// Reads a `baggage` value; keys it does not know, properties after `;`
    /// and malformed members are ignored (baggage is a hint, never trusted
    /// for policy).
    pub fn from_baggage(value: &str) -> Self {
        let mut m = PeerMetadata::default();
        for member in value.split(',').take(64) {
            let member = member.split(';').next().unwrap_or_default();
            let Some((key, val)) = member.split_once('=') else {
                continue;
            };
            let (key, val) = (key.trim(), val.trim());
            if val.is_empty() || val.len() > 253 {
                continue;
            }
            let val = Some(val.to_owned());
            match key {
                "k8s.cluster.name" => m.cluster = val,
                "k8s.namespace.name" => m.namespace = val,
                "service.name" => m.service = val,
                "service.version" => m.version = val,
                _ => {
                    if let Some(kind) = key
                        .strip_prefix("k8s.")
                        .and_then(|k| k.strip_suffix(".name"))
                        .filter(|k| WORKLOAD_KINDS.contains(k))
                    {
                        m.workload_kind = Some(kind.to_owned());
                        m.workload = val;
                    }
                }
            }
        }
        m
    }
}

/// The workload kinds `k8s.<kind>.name` may name.
const WORKLOAD_KINDS: [&str; 7] = [
    "deployment",
    "statefulset",
    "daemonset",
    "replicaset",
    "job",
    "cronjob",
    "pod",
];

/// The `forwarded` header value (RFC 7239): the original client, and the
/// Service host it asked for when it dialled a Service.
pub fn forwarded(client: SocketAddr, service_host: Option<&str>) -> String {
    match service_host {
        Some(host) => format!("for=\"{client}\";host={host}"),
        None => format!("for=\"{client}\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_pods_are_named_by_their_deployment_and_round_trip() {
        let labels = BTreeMap::from([
            ("app".to_owned(), "web".to_owned()),
            ("version".to_owned(), "v2".to_owned()),
            ("pod-template-hash".to_owned(), "84c6b5d7f4".to_owned()),
        ]);
        let m = PeerMetadata::for_pod("shop", "web-84c6b5d7f4-7kd9s", &labels);
        let baggage = m.to_baggage();
        assert_eq!(
            baggage,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=web,service.name=web,service.version=v2"
        );
        assert_eq!(PeerMetadata::from_baggage(&baggage), m);
        let bare = PeerMetadata::for_pod("shop", "batch", &BTreeMap::new());
        assert_eq!(
            bare.to_baggage(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=batch,service.name=batch,service.version=latest"
        );
    }

    #[test]
    fn istio_baggage_is_read_and_junk_ignored() {
        let m = PeerMetadata::from_baggage(
            "k8s.cluster.name=c1, k8s.namespace.name=ns;p=1,k8s.statefulset.name=db,junk,=x,service.name=db,evil.key=1",
        );
        assert_eq!(m.cluster.as_deref(), Some("c1"));
        assert_eq!(m.namespace.as_deref(), Some("ns"));
        assert_eq!(
            (m.workload_kind.as_deref(), m.workload.as_deref()),
            (Some("statefulset"), Some("db"))
        );
        assert_eq!(m.service.as_deref(), Some("db"));
        assert_eq!(m.version, None);
    }

    #[test]
    fn forwarded_names_the_client_and_the_service_host() {
        let client: SocketAddr = "10.244.1.5:41234".parse().expect("addr");
        let host = crate::model::service_host("shop/api");
        assert_eq!(
            forwarded(client, Some(&host)),
            "for=\"10.244.1.5:41234\";host=api.shop.svc.cluster.local"
        );
        let v6: SocketAddr = "[fd00::5]:80".parse().expect("addr");
        assert_eq!(forwarded(v6, None), "for=\"[fd00::5]:80\"");
    }
}
