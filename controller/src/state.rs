//! The controller's state: the config it serves (a versioned snapshot of
//! the model and its encoded resources, with the change from the previous
//! version computed once for every proxy) and what each proxy on the config
//! stream has. The config stream (`xds`) sends from it; the CA derives
//! entitlements from it (`nodes`); the REST API reads it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;
use tracing::info;
use weft_proto::model::{Model, waypoint_proxy_name};
use weft_proto::resources::{self, Audience};

/// A config version and its resources, by type and name.
pub struct Snapshot {
    pub version: u64,
    /// When this version was set (for push latency).
    pub(crate) created: std::time::Instant,
    pub model: Arc<Model>,
    pub(crate) resources: resources::Resources,
    /// What changed since the previous version, computed once for all
    /// proxies: a proxy in step with that version is sent it without a
    /// diff over the whole mesh.
    pub(crate) delta: Option<Delta>,
    /// For kinds sent to selected nodes only: type → node → the names that
    /// node receives (a ztunnel enforces inbound only, so it is sent only
    /// the policies selecting a workload on it, SPEC §6).
    selected: HashMap<&'static str, HashMap<String, HashSet<String>>>,
}

impl Snapshot {
    /// The names of `type_url` that `node` receives, or `None` when every
    /// proxy receives all of them.
    pub(crate) fn selected_for(&self, type_url: &str, node: &str) -> Option<&HashSet<String>> {
        static NONE: std::sync::LazyLock<HashSet<String>> = std::sync::LazyLock::new(HashSet::new);
        let kind = resources::kind(type_url)?;
        if kind.audience == Audience::Everyone {
            return None;
        }
        let by_node = self.selected.get(type_url);
        Some(by_node.and_then(|n| n.get(node)).unwrap_or(&NONE))
    }
}

fn selected(model: &Model) -> HashMap<&'static str, HashMap<String, HashSet<String>>> {
    HashMap::from([
        (resources::AUTHORIZATION, policies_by_node(model)),
        (resources::ROUTE, routes_by_waypoint(model)),
        (resources::BACKEND, backends_by_waypoint(model)),
        (
            resources::REQUEST_POLICY,
            request_policies_by_waypoint(model),
        ),
    ])
}

/// An L7 policy goes to the waypoints serving the Services it targets, and
/// to the waypoints it targets by their Gateway.
fn request_policies_by_waypoint(model: &Model) -> HashMap<String, HashSet<String>> {
    let by_service = model
        .request_policies
        .iter()
        .map(|p| (&p.key, p.spec.services.iter().map(String::as_str).collect()));
    let mut out = by_waypoint(model, by_service);
    for p in &model.request_policies {
        for w in &p.spec.waypoints {
            let proxy = waypoint_proxy_name(w);
            out.entry(proxy).or_default().insert(p.key.clone());
        }
    }
    out
}

/// A waypoint receives the routes attached to, and the backend policies
/// of, the Services bound to it.
fn routes_by_waypoint(model: &Model) -> HashMap<String, HashSet<String>> {
    let routes = model.routes.iter().map(|r| {
        let parents = r.spec.parents.iter().map(|p| p.service.as_str());
        (&r.key, parents.collect::<Vec<_>>())
    });
    by_waypoint(model, routes)
}

/// A backend policy goes to the waypoint serving its Service, and to every
/// waypoint with a route that sends requests to that Service (in its own
/// namespace or, by ReferenceGrant, another): that waypoint balances them.
fn backends_by_waypoint(model: &Model) -> HashMap<String, HashSet<String>> {
    let backends = model
        .backends
        .iter()
        .map(|b| (&b.key, vec![b.spec.service.as_str()]));
    let mut out = by_waypoint(model, backends);
    let mut routing_to: HashMap<&str, HashSet<String>> = HashMap::new();
    for r in &model.routes {
        let waypoints: Vec<String> = r
            .spec
            .parents
            .iter()
            .filter_map(|p| model.service(&p.service)?.waypoint.as_deref())
            .map(waypoint_proxy_name)
            .collect();
        let targets = r.spec.rules.iter().flat_map(|rule| &rule.backends);
        for b in targets {
            routing_to
                .entry(b.service.as_str())
                .or_default()
                .extend(waypoints.iter().cloned());
        }
    }
    for b in &model.backends {
        for w in routing_to
            .get(b.spec.service.as_str())
            .into_iter()
            .flatten()
        {
            out.entry(w.clone()).or_default().insert(b.key.clone());
        }
    }
    out
}

/// Waypoint proxy name → the names of resources that concern one of the
/// Services it serves.
fn by_waypoint<'a>(
    model: &Model,
    items: impl Iterator<Item = (&'a String, Vec<&'a str>)>,
) -> HashMap<String, HashSet<String>> {
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    for (key, services) in items {
        for service in services {
            let waypoint = model.service(service).and_then(|s| s.waypoint.as_deref());
            if let Some(w) = waypoint {
                out.entry(waypoint_proxy_name(w))
                    .or_default()
                    .insert(key.clone());
            }
        }
    }
    out
}

pub(crate) struct Delta {
    pub(crate) from: u64,
    pub(crate) types: HashMap<&'static str, resources::KindDelta>,
}

fn policies_by_node(model: &Model) -> HashMap<String, HashSet<String>> {
    let mut by_namespace: HashMap<&str, Vec<&weft_proto::model::Workload>> = HashMap::new();
    for w in &model.workloads {
        by_namespace
            .entry(w.namespace.as_str())
            .or_default()
            .push(w);
    }
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    for p in &model.policies {
        for w in by_namespace.get(p.namespace.as_str()).into_iter().flatten() {
            if p.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)) {
                out.entry(w.node.clone()).or_default().insert(p.key.clone());
            }
        }
    }
    out
}

/// What the controller serves. Setting a new model pushes the difference to
/// every connected proxy; the CA derives from it which identities each
/// node may request (`Nodes::follow`).
#[derive(Clone)]
pub struct ConfigStore {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
}

impl ConfigStore {
    pub fn new() -> Self {
        let empty = Snapshot {
            version: 0,
            created: std::time::Instant::now(),
            model: Arc::new(Model::default()),
            resources: BTreeMap::new(),
            delta: None,
            selected: HashMap::new(),
        };
        ConfigStore {
            tx: Arc::new(watch::channel(Arc::new(empty)).0),
        }
    }

    /// Serves `model`; returns its version. A model that encodes to exactly
    /// what is served keeps the current version and pushes nothing (a pod's
    /// status churning in Kubernetes must not wake every proxy).
    pub fn set(&self, model: Model) -> u64 {
        let current = self.current();
        let resources = resources::encode_reusing(&model, &current.model, &current.resources);
        if current.version > 0 && current.resources == resources {
            return current.version;
        }
        let delta = Delta {
            from: current.version,
            types: resources::delta(&current.resources, &resources),
        };
        let version = current.version + 1;
        drop(current);
        self.tx.send_replace(Arc::new(Snapshot {
            version,
            created: std::time::Instant::now(),
            selected: selected(&model),
            model: Arc::new(model),
            resources,
            delta: Some(delta),
        }));
        metrics::gauge!("weft_controller_config_version").set(version as f64);
        info!(version, "config updated");
        version
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }
}

/// One proxy's view, for the REST API and tests.
#[derive(Debug, Clone, Default)]
pub struct ProxyStatus {
    pub connected: bool,
    /// Config version of the last response the proxy ACKed, per type.
    pub acked: BTreeMap<String, u64>,
    /// The last 10 NACK reasons, newest last.
    pub nacks: Vec<String>,
    /// Resources in the most recent response (a one-pod change: 1).
    pub last_push_resources: usize,
    pub resources_sent: u64,
    pub last_seen: Option<SystemTime>,
}

#[derive(Clone, Default)]
pub struct Proxies(Arc<Mutex<BTreeMap<String, ProxyStatus>>>);

impl Proxies {
    pub fn get(&self, node: &str) -> Option<ProxyStatus> {
        self.0.lock().expect("poisoned").get(node).cloned()
    }

    pub fn all(&self) -> BTreeMap<String, ProxyStatus> {
        self.0.lock().expect("poisoned").clone()
    }

    pub(crate) fn update(&self, node: &str, f: impl FnOnce(&mut ProxyStatus)) {
        let mut all = self.0.lock().expect("poisoned");
        let status = all.entry(node.to_owned()).or_default();
        status.last_seen = Some(SystemTime::now());
        f(status);
    }
}

impl Default for ConfigStore {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Objects, parse_documents, translate::translate};

    /// A waypoint routing to a Service it does not serve (here, across
    /// namespaces by ReferenceGrant) receives that Service's BackendPolicy;
    /// a waypoint that does not route there does not.
    #[test]
    fn backend_policies_reach_the_waypoints_that_route_to_them() {
        let yaml = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: weft-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: shop-routes, namespace: billing}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service}]
---
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {name: ledger-lb, namespace: billing}
spec: {targetRef: {kind: Service, name: ledger}, loadBalancer: Random}
"#;
        let shop = crate::source::fixtures::shop_bound_to("wp");
        let mut objects = Objects::default();
        let billing = include_str!("../tests/k8s/other-ns.yaml");
        let route = include_str!("../tests/k8s/route-to-ledger.yaml");
        for y in [shop.as_str(), billing, route, yaml] {
            for o in parse_documents(y).expect("valid YAML") {
                objects.insert(o);
            }
        }
        let t = translate(&objects, "cluster.local");
        let model = Model::from_specs(t.specs, "cluster.local").expect("model");
        let route = model
            .routes
            .iter()
            .find(|r| r.spec.name == "to-ledger")
            .expect("route");
        assert_eq!(route.spec.rules[0].backends[0].invalid, "", "granted");
        let selected = selected(&model);
        let sent = &selected[resources::BACKEND];
        let to_wp = sent
            .get(&waypoint_proxy_name("shop/wp"))
            .cloned()
            .unwrap_or_default();
        assert!(to_wp.iter().any(|k| k.contains("ledger-lb")), "{sent:?}");
        assert_eq!(sent.len(), 1, "no other waypoint gets it: {sent:?}");
    }
}
