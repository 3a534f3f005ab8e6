//! The mesh as a proxy needs it: workloads, services and L4 authorization
//! policies, validated once, indexed for the hot path.
//!
//! Today it is loaded from the ztunnel's static YAML file; the controller's
//! config push (issue #4) will produce the same [`Model`].
//!
//! ```yaml
//! workloads:
//!   - {name: web-1, namespace: default, serviceAccount: web, node: node-a,
//!      addresses: [10.244.1.2], services: [default/api]}
//! services:
//!   - {name: api, namespace: default, addresses: [10.96.0.10],
//!      ports: [{port: 80, targetPort: 8080}]}
//! policies:
//!   - {name: only-web, namespace: default, action: ALLOW,
//!      rules: [{principals: ["spiffe://cluster.local/ns/default/sa/web"]}]}
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Deserialize;

use crate::identity::Identity;
use crate::pb::weft::v1 as pb;
use crate::shards::Shards;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("config is not valid YAML for weft's model: {0}")]
    Yaml(String),
    #[error("{object}: {field}: {reason}")]
    Invalid {
        object: String,
        field: &'static str,
        reason: String,
    },
}

fn invalid(object: &str, field: &'static str, reason: impl ToString) -> ModelError {
    ModelError::Invalid {
        object: object.to_owned(),
        field,
        reason: reason.to_string(),
    }
}

/// The model before validation: what a config file (or the config stream)
/// says, field for field.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Specs {
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub policies: Vec<PolicySpec>,
    #[serde(default)]
    pub waypoints: Vec<WaypointSpec>,
    /// Routes are compiled by the controller, never written by hand.
    #[serde(skip)]
    pub routes: Vec<pb::Route>,
    /// Backend policies, as the controller reads them.
    #[serde(skip)]
    pub backends: Vec<pb::Backend>,
    /// AuthorizationPolicies attached by targetRefs, for waypoints.
    #[serde(skip)]
    pub request_policies: Vec<pb::RequestPolicy>,
}

fn default_ns() -> String {
    "default".into()
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    #[serde(default = "default_ns")]
    pub service_account: String,
    pub node: String,
    pub addresses: Vec<IpAddr>,
    #[serde(default = "yes")]
    pub meshed: bool,
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The waypoint (`<namespace>/<name>`) all mesh traffic to it must pass.
    #[serde(default)]
    pub waypoint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<PortSpec>,
    /// The waypoint (`<namespace>/<name>`) its traffic goes through.
    #[serde(default)]
    pub waypoint: Option<String>,
}

/// A waypoint as config says it: who it runs as and where it listens.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointSpec {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    pub service_account: String,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub for_service_account: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpec {
    pub port: u16,
    pub target_port: Option<u16>,
    /// What the port speaks (`http`, `http2`, `grpc`, `tcp`, ...), as the
    /// Kubernetes Service port's `appProtocol` says.
    #[serde(default)]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    pub action: Action,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Workload {
    /// `<namespace>/<name>`.
    pub key: String,
    pub name: String,
    pub namespace: String,
    pub identity: Identity,
    pub node: String,
    pub addresses: Vec<IpAddr>,
    pub meshed: bool,
    pub services: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// `<namespace>/<name>` of the waypoint every mesh connection to it
    /// must come through.
    pub waypoint: Option<String>,
}

#[derive(Debug)]
pub struct Service {
    /// `<namespace>/<name>`.
    pub key: String,
    pub addresses: Vec<IpAddr>,
    /// (service port, target port)
    pub ports: Vec<(u16, u16)>,
    /// `<namespace>/<name>` of the waypoint its traffic goes through.
    pub waypoint: Option<String>,
    /// Service port → declared `appProtocol` (ports that declare one).
    pub app_protocols: BTreeMap<u16, String>,
    endpoints: Vec<Arc<Workload>>,
    next: AtomicUsize,
}

impl Service {
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports.iter().find(|(p, _)| *p == port).map(|(_, t)| *t)
    }

    /// The protocol `port` declares, if it declares one.
    pub fn app_protocol(&self, port: u16) -> Option<&str> {
        self.app_protocols.get(&port).map(String::as_str)
    }

    /// Round robin over the service's endpoints.
    pub fn pick(&self) -> Option<&Arc<Workload>> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }

    pub fn endpoints(&self) -> &[Arc<Workload>] {
        &self.endpoints
    }

    /// The next turn of this Service's rotation (round robin by index).
    pub fn rotate(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// A waypoint: an L7 proxy that bound Services and workloads are reached
/// through.
#[derive(Debug)]
pub struct Waypoint {
    /// `<namespace>/<name>` of its Gateway.
    pub key: String,
    pub identity: Identity,
    /// Its ready instances; empty: bound traffic is refused (fail closed).
    pub addresses: Vec<IpAddr>,
    /// Serves only this service account's workloads; `None`: its namespace.
    pub for_service_account: Option<String>,
    next: AtomicUsize,
}

impl Waypoint {
    /// Round robin over its instances.
    pub fn pick(&self) -> Option<IpAddr> {
        if self.addresses.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.addresses.len();
        self.addresses.get(i).copied()
    }
}

/// The name a waypoint goes by on the config stream and at the CA, as a
/// node goes by its node name: `waypoint.<namespace>.<name>` (a namespace
/// has no dots, so the key reads back unambiguously).
pub fn waypoint_proxy_name(key: &str) -> String {
    let (namespace, name) = key.split_once('/').unwrap_or(("default", key));
    format!("waypoint.{namespace}.{name}")
}

/// The waypoint key a proxy name stands for, if it is a waypoint's.
pub fn waypoint_of_proxy(proxy: &str) -> Option<String> {
    let (namespace, name) = proxy.strip_prefix("waypoint.")?.split_once('.')?;
    Some(format!("{namespace}/{name}"))
}

// Equal when they say the same; where the rotation stands is not config.
impl PartialEq for Waypoint {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.key,
            &self.identity,
            &self.addresses,
            &self.for_service_account,
        ) == (&o.key, &o.identity, &o.addresses, &o.for_service_account)
    }
}

impl Eq for Waypoint {}

/// A Service's backend policy (BackendPolicy.weft.dev), as a waypoint
/// applies it.
#[derive(Debug, PartialEq)]
pub struct Backend {
    /// `<namespace>/<name>` of the policy.
    pub key: String,
    pub spec: pb::Backend,
}

/// Validates one backend policy on its own.
pub fn backend(spec: pb::Backend, object: &str) -> Result<Backend, ModelError> {
    if pb::backend::LoadBalancer::try_from(spec.load_balancer).is_err() {
        return Err(invalid(
            object,
            "loadBalancer",
            format!("unknown value {}", spec.load_balancer),
        ));
    }
    if !spec.service.contains('/') {
        return Err(invalid(object, "service", "must be <namespace>/<name>"));
    }
    Ok(Backend {
        key: format!("{}/{}", spec.namespace, spec.name),
        spec,
    })
}

/// A compiled HTTPRoute or GRPCRoute, as the config stream carries it
/// (matched by [`crate::routes`]).
#[derive(Debug)]
pub struct Route {
    /// `<Kind>/<namespace>/<name>`.
    pub key: String,
    pub spec: pb::Route,
    pub(crate) compiled: crate::routes::Compiled,
}

impl PartialEq for Route {
    fn eq(&self, o: &Self) -> bool {
        self.key == o.key && self.spec == o.spec
    }
}

/// An address as the config stream carries it (4 or 16 bytes).
pub fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// An address from the config stream; `None` unless 4 or 16 bytes.
pub fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix must be 0-{max}"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// As the config stream carries it.
    pub fn to_pb(&self) -> pb::Cidr {
        pb::Cidr {
            address: ip_bytes(&self.addr),
            prefix_len: u32::from(self.prefix),
        }
    }

    /// From the config stream: 4 or 16 address bytes and a prefix that fits.
    pub fn from_pb(c: &pb::Cidr) -> Result<Self, String> {
        let addr = ip_from(&c.address).ok_or("a CIDR address is not 4 or 16 bytes")?;
        Cidr::parse(&format!("{addr}/{}", c.prefix_len))
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug)]
pub struct Rule {
    pub principals: Vec<Identity>,
    pub namespaces: Vec<String>,
    pub ip_blocks: Vec<Cidr>,
    pub ports: Vec<u16>,
}

#[derive(Debug)]
pub struct Policy {
    pub key: String,
    pub namespace: String,
    pub action: Action,
    pub selector: BTreeMap<String, String>,
    pub rules: Vec<Rule>,
}

/// Who is connecting, as inbound authorization sees it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// `None` for plaintext (PERMISSIVE) connections.
    pub identity: Option<&'a Identity>,
    pub ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, naming the policy (or the absence of a matching ALLOW).
    Deny(String),
}

#[derive(Debug, Default, Clone)]
pub struct Model {
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Arc<Service>>,
    pub policies: Vec<Arc<Policy>>,
    pub waypoints: Vec<Arc<Waypoint>>,
    pub routes: Vec<Arc<Route>>,
    pub backends: Vec<Arc<Backend>>,
    pub request_policies: Vec<Arc<crate::request_policy::RequestPolicy>>,
    by_ip: Shards<IpAddr, Arc<Workload>>,
    by_vip: Shards<IpAddr, Arc<Service>>,
    // "<namespace>/<name>" → object: the per-connection lookups are O(1)
    // whatever the size of the mesh.
    workloads_by_key: Shards<String, Arc<Workload>>,
    services_by_key: Shards<String, Arc<Service>>,
}

impl Model {
    pub fn from_yaml(yaml: &str, trust_domain: &str) -> Result<Model, ModelError> {
        let doc: Specs = if yaml.trim().is_empty() {
            Specs::default()
        } else {
            serde_saphyr::from_str(yaml).map_err(|e| ModelError::Yaml(e.to_string()))?
        };
        build(doc, trust_domain)
    }

    /// Validates and indexes specs (the config stream builds them directly).
    pub fn from_specs(specs: Specs, trust_domain: &str) -> Result<Model, ModelError> {
        build(specs, trust_domain)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.workloads_by_key
            .get(format!("{namespace}/{name}").as_str())
    }

    /// A workload by `<namespace>/<name>`.
    pub fn workload_by_key(&self, key: &str) -> Option<&Arc<Workload>> {
        self.workloads_by_key.get(key)
    }

    /// A service by `<namespace>/<name>`.
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services_by_key.get(key)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
    }

    /// The backend policy of a Service (`<namespace>/<name>`), if any.
    pub fn backend(&self, service: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.spec.service == service)
    }

    /// A waypoint by `<namespace>/<name>` (a mesh has few).
    pub fn waypoint(&self, key: &str) -> Option<&Arc<Waypoint>> {
        self.waypoints.iter().find(|w| w.key == key)
    }

    /// L4 authorization for a connection to `dst` on `port`: a workload
    /// bound to a waypoint admits only that waypoint (its L7 policy cannot
    /// be skipped; an unknown waypoint admits no one); then any matching
    /// DENY refuses; if ALLOW policies apply, one must match; no policy allows.
    pub fn authorize(&self, dst: &Workload, src: Source<'_>, port: u16) -> Decision {
        if let Some(key) = &dst.waypoint {
            let from_it = self
                .waypoint(key)
                .is_some_and(|w| src.identity == Some(&w.identity));
            if !from_it {
                return Decision::Deny(format!(
                    "{} is bound to waypoint {key}; only the waypoint may connect",
                    dst.key
                ));
            }
        }
        let applicable: Vec<&Policy> = self
            .policies
            .iter()
            .map(|p| &**p)
            .filter(|p| {
                p.namespace == dst.namespace
                    && p.selector.iter().all(|(k, v)| dst.labels.get(k) == Some(v))
            })
            .collect();
        let matches = |p: &Policy| p.rules.iter().any(|r| rule_matches(r, src, port));
        if let Some(p) = applicable
            .iter()
            .find(|p| p.action == Action::Deny && matches(p))
        {
            return Decision::Deny(format!("DENY policy {}", p.key));
        }
        let mut allows = applicable
            .iter()
            .filter(|p| p.action == Action::Allow)
            .peekable();
        if allows.peek().is_none() || allows.any(|p| matches(p)) {
            Decision::Allow
        } else {
            Decision::Deny("no ALLOW policy matched".into())
        }
    }
}

impl Model {
    /// For an explanation of an allowed connection: the ALLOW policy that
    /// matched (`None` when no ALLOW policy applies to `dst`).
    pub fn allowing_policy(&self, dst: &Workload, src: Source<'_>, port: u16) -> Option<&str> {
        self.policies
            .iter()
            .filter(|p| {
                p.action == Action::Allow
                    && p.namespace == dst.namespace
                    && p.selector.iter().all(|(k, v)| dst.labels.get(k) == Some(v))
            })
            .find(|p| p.rules.iter().any(|r| rule_matches(r, src, port)))
            .map(|p| p.key.as_str())
    }
}

fn rule_matches(rule: &Rule, src: Source<'_>, port: u16) -> bool {
    let principal =
        rule.principals.is_empty() || src.identity.is_some_and(|id| rule.principals.contains(id));
    let namespace = rule.namespaces.is_empty()
        || src
            .identity
            .is_some_and(|id| rule.namespaces.iter().any(|n| n == id.namespace()));
    let ip = rule.ip_blocks.is_empty() || rule.ip_blocks.iter().any(|c| c.contains(src.ip));
    let port_ok = rule.ports.is_empty() || rule.ports.contains(&port);
    principal && namespace && ip && port_ok
}

/// A validated service before its endpoints are attached.
#[derive(Debug, Clone)]
pub struct ServiceDef {
    /// `<namespace>/<name>`.
    pub key: String,
    pub addresses: Vec<IpAddr>,
    /// (service port, target port)
    pub ports: Vec<(u16, u16)>,
    pub waypoint: Option<String>,
    pub app_protocols: BTreeMap<u16, String>,
}

impl ServiceDef {
    fn of(s: &Service) -> ServiceDef {
        ServiceDef {
            key: s.key.clone(),
            addresses: s.addresses.clone(),
            ports: s.ports.clone(),
            waypoint: s.waypoint.clone(),
            app_protocols: s.app_protocols.clone(),
        }
    }
}

/// A service from its definition and endpoints (balancing starts over).
fn service_with(def: &ServiceDef, endpoints: Vec<Arc<Workload>>) -> Arc<Service> {
    Arc::new(Service {
        key: def.key.clone(),
        addresses: def.addresses.clone(),
        ports: def.ports.clone(),
        waypoint: def.waypoint.clone(),
        app_protocols: def.app_protocols.clone(),
        endpoints,
        next: AtomicUsize::new(0),
    })
}

/// Validates one workload on its own (`object` names it in errors).
pub fn workload(w: WorkloadSpec, trust_domain: &str, object: &str) -> Result<Workload, ModelError> {
    let identity = Identity::new(trust_domain, &w.namespace, &w.service_account)
        .map_err(|e| invalid(object, "serviceAccount", e))?;
    if w.addresses.is_empty() {
        return Err(invalid(object, "addresses", "at least one IP is required"));
    }
    Ok(Workload {
        key: format!("{}/{}", w.namespace, w.name),
        name: w.name,
        namespace: w.namespace,
        identity,
        node: w.node,
        addresses: w.addresses,
        meshed: w.meshed,
        services: w.services,
        labels: w.labels,
        waypoint: w.waypoint,
    })
}

/// Validates one service on its own.
pub fn service(s: ServiceSpec, object: &str) -> Result<ServiceDef, ModelError> {
    if s.ports.is_empty() {
        return Err(invalid(object, "ports", "at least one port is required"));
    }
    Ok(ServiceDef {
        key: format!("{}/{}", s.namespace, s.name),
        addresses: s.addresses,
        ports: s
            .ports
            .iter()
            .map(|p| (p.port, p.target_port.unwrap_or(p.port)))
            .collect(),
        app_protocols: s
            .ports
            .iter()
            .filter_map(|p| Some((p.port, p.app_protocol.clone()?.to_ascii_lowercase())))
            .collect(),
        waypoint: s.waypoint,
    })
}

/// Validates one waypoint on its own.
pub fn waypoint(w: WaypointSpec, trust_domain: &str, object: &str) -> Result<Waypoint, ModelError> {
    let identity = Identity::new(trust_domain, &w.namespace, &w.service_account)
        .map_err(|e| invalid(object, "serviceAccount", e))?;
    Ok(Waypoint {
        key: format!("{}/{}", w.namespace, w.name),
        identity,
        addresses: w.addresses,
        for_service_account: w.for_service_account,
        next: AtomicUsize::new(0),
    })
}

/// Validates one route on its own: every regex compiles within bounds.
pub fn route(spec: pb::Route, object: &str) -> Result<Route, ModelError> {
    let compiled = crate::routes::compile(&spec).map_err(|e| invalid(object, "rules", e))?;
    Ok(Route {
        key: route_key(&spec.kind, &spec.namespace, &spec.name),
        spec,
        compiled,
    })
}

/// A route's key: `<Kind>/<namespace>/<name>` (an HTTPRoute and a
/// GRPCRoute may share a name).
pub fn route_key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

/// Validates one policy on its own.
pub fn policy(p: PolicySpec, object: &str) -> Result<Policy, ModelError> {
    let mut rules = Vec::with_capacity(p.rules.len());
    for r in p.rules {
        let principals = r
            .principals
            .iter()
            .map(|s| s.parse::<Identity>())
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(object, "rules.principals", e))?;
        let ip_blocks = r
            .ip_blocks
            .iter()
            .map(|s| Cidr::parse(s))
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(object, "rules.ipBlocks", e))?;
        rules.push(Rule {
            principals,
            namespaces: r.namespaces,
            ip_blocks,
            ports: r.ports,
        });
    }
    Ok(Policy {
        key: format!("{}/{}", p.namespace, p.name),
        namespace: p.namespace,
        action: p.action,
        selector: p.selector,
        rules,
    })
}

fn build(doc: Specs, trust_domain: &str) -> Result<Model, ModelError> {
    let name = |kind: &str, i: usize, ns: &str, n: &str| format!("{kind}[{i}] ({ns}/{n})");
    let workloads = doc
        .workloads
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let object = name("workloads", i, &w.namespace, &w.name);
            workload(w, trust_domain, &object).map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let services = doc
        .services
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let object = name("services", i, &s.namespace, &s.name);
            service(s, &object)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let policies = doc
        .policies
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let object = name("policies", i, &p.namespace, &p.name);
            policy(p, &object).map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let waypoints = doc
        .waypoints
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let object = name("waypoints", i, &w.namespace, &w.name);
            waypoint(w, trust_domain, &object).map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let routes = doc
        .routes
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let object = name("routes", i, &r.namespace, &r.name);
            route(r, &object).map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let backends = doc
        .backends
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let object = name("backends", i, &b.namespace, &b.name);
            backend(b, &object).map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let request_policies = doc
        .request_policies
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let object = name("requestPolicies", i, &p.namespace, &p.name);
            crate::request_policy::compile(p, &object).map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut model = Model::assemble(workloads, services.iter(), policies)?;
    model.waypoints = waypoints;
    model.routes = routes;
    model.backends = backends;
    model.request_policies = request_policies;
    Ok(model)
}

impl Model {
    /// Indexes objects validated one by one, checking what only the whole
    /// can tell: an IP or a name used twice. Unchanged objects are shared,
    /// not copied, so a proxy applying a one-pod change re-indexes but
    /// decodes and validates only that pod.
    pub fn assemble<'a>(
        workloads: Vec<Arc<Workload>>,
        services: impl Iterator<Item = &'a ServiceDef>,
        policies: Vec<Arc<Policy>>,
    ) -> Result<Model, ModelError> {
        let mut model = Model::default();
        for (i, workload) in workloads.iter().enumerate() {
            let object = || format!("workloads[{i}] ({})", workload.key);
            for ip in &workload.addresses {
                if let Some(other) = model.by_ip.insert(*ip, workload.clone()) {
                    return Err(invalid(
                        &object(),
                        "addresses",
                        format!("{ip} is already used by {}", other.key),
                    ));
                }
            }
            if let Some(other) = model
                .workloads_by_key
                .insert(workload.key.clone(), workload.clone())
            {
                return Err(invalid(
                    &object(),
                    "name",
                    format!("{} is defined twice", other.key),
                ));
            }
        }
        // Endpoints by service, in one pass over the workloads.
        let mut by_service: HashMap<&str, Vec<Arc<Workload>>> = HashMap::new();
        for w in &workloads {
            for svc in &w.services {
                by_service.entry(svc.as_str()).or_default().push(w.clone());
            }
        }
        for (i, def) in services.enumerate() {
            let object = || format!("services[{i}] ({})", def.key);
            let endpoints = by_service.remove(def.key.as_str()).unwrap_or_default();
            let service = service_with(def, endpoints);
            for ip in &service.addresses {
                if model.by_ip.contains_key(ip)
                    || model.by_vip.insert(*ip, service.clone()).is_some()
                {
                    return Err(invalid(
                        &object(),
                        "addresses",
                        format!("{ip} is already in use"),
                    ));
                }
            }
            if model
                .services_by_key
                .insert(service.key.clone(), service.clone())
                .is_some()
            {
                return Err(invalid(
                    &object(),
                    "name",
                    format!("{} is defined twice", service.key),
                ));
            }
            model.services.push(service);
        }
        model.workloads = workloads;
        model.policies = policies;
        Ok(model)
    }
}

/// A change to a model, by key (`<namespace>/<name>`): objects added or
/// replaced (`Some`) or removed (`None`).
#[derive(Debug, Default)]
pub struct Changes {
    pub workloads: Vec<(String, Option<Arc<Workload>>)>,
    pub services: Vec<(String, Option<Arc<ServiceDef>>)>,
    pub policies: Vec<(String, Option<Arc<Policy>>)>,
    pub waypoints: Vec<(String, Option<Arc<Waypoint>>)>,
    pub routes: Vec<(String, Option<Arc<Route>>)>,
    pub backends: Vec<(String, Option<Arc<Backend>>)>,
    pub request_policies: Vec<(String, Option<Arc<crate::request_policy::RequestPolicy>>)>,
}

/// Keys as a set when there are many, a list when there are few (the
/// common one-pod change should not hash every workload's key).
fn key_set(keys: Vec<&str>) -> impl Fn(&str) -> bool + '_ {
    let set: Option<HashSet<&str>> = (keys.len() > 16).then(|| keys.iter().copied().collect());
    move |k| match &set {
        Some(set) => set.contains(k),
        None => keys.contains(&k),
    }
}

impl Model {
    /// This model with `changes` applied, checked as [`Model::assemble`]
    /// checks a whole one; `self` is untouched. Costs grow with the change
    /// and the services it touches, not with the mesh: indices are shared
    /// shard by shard.
    pub fn apply(&self, changes: Changes) -> Result<Model, ModelError> {
        let mut m = self.clone();
        let mut affected: HashSet<String> = HashSet::new();
        let changed_workloads: Vec<&str> =
            changes.workloads.iter().map(|(k, _)| k.as_str()).collect();
        let changed_services: Vec<&str> =
            changes.services.iter().map(|(k, _)| k.as_str()).collect();
        // Removals first, so two objects may trade an address in one change.
        for key in &changed_workloads {
            if let Some(old) = m.workloads_by_key.remove(*key) {
                for ip in &old.addresses {
                    if m.by_ip.get(ip).is_some_and(|w| Arc::ptr_eq(w, &old)) {
                        m.by_ip.remove(ip);
                    }
                }
                affected.extend(old.services.iter().cloned());
            }
        }
        let is_changed_workload = key_set(changed_workloads.clone());
        m.workloads.retain(|w| !is_changed_workload(&w.key));
        for key in &changed_services {
            if let Some(old) = m.services_by_key.remove(*key) {
                for ip in &old.addresses {
                    if m.by_vip.get(ip).is_some_and(|s| Arc::ptr_eq(s, &old)) {
                        m.by_vip.remove(ip);
                    }
                }
            }
        }
        let mut added: HashMap<String, Vec<Arc<Workload>>> = HashMap::new();
        for (key, w) in &changes.workloads {
            let Some(w) = w else { continue };
            if w.key != *key {
                return Err(invalid(key, "name", format!("holds workload {}", w.key)));
            }
            for ip in &w.addresses {
                if let Some(other) = m.by_ip.get(ip) {
                    return Err(invalid(
                        key,
                        "addresses",
                        format!("{ip} is already used by {}", other.key),
                    ));
                }
                if m.by_vip.contains_key(ip) {
                    return Err(invalid(key, "addresses", format!("{ip} is already in use")));
                }
                m.by_ip.insert(*ip, w.clone());
            }
            m.workloads_by_key.insert(key.clone(), w.clone());
            for svc in &w.services {
                affected.insert(svc.clone());
                added.entry(svc.clone()).or_default().push(w.clone());
            }
            m.workloads.push(w.clone());
        }
        // Services: new or changed ones get their endpoints from scratch,
        // those whose endpoints changed are patched.
        let mut fresh: Vec<Arc<Service>> = Vec::new();
        // Endpoints of new services: one pass over the workloads for many
        // services (a full sync), a scan per service for a few.
        let grouped: Option<HashMap<&str, Vec<Arc<Workload>>>> =
            (changed_services.len() > 8).then(|| {
                let mut g: HashMap<&str, Vec<Arc<Workload>>> = HashMap::new();
                for w in &m.workloads {
                    for svc in &w.services {
                        g.entry(svc.as_str()).or_default().push(w.clone());
                    }
                }
                g
            });
        let endpoints_of = |key: &str| -> Vec<Arc<Workload>> {
            match &grouped {
                Some(g) => g.get(key).cloned().unwrap_or_default(),
                None => m
                    .workloads
                    .iter()
                    .filter(|w| w.services.iter().any(|s| s == key))
                    .cloned()
                    .collect(),
            }
        };
        for (key, def) in &changes.services {
            let Some(def) = def else { continue };
            if def.key != *key {
                return Err(invalid(key, "name", format!("holds service {}", def.key)));
            }
            let service = service_with(def, endpoints_of(key));
            for ip in &service.addresses {
                if m.by_ip.contains_key(ip) || m.by_vip.insert(*ip, service.clone()).is_some() {
                    return Err(invalid(key, "addresses", format!("{ip} is already in use")));
                }
            }
            m.services_by_key.insert(key.clone(), service.clone());
            affected.remove(key);
            fresh.push(service);
        }
        for key in &affected {
            let Some(old) = m.services_by_key.get(key.as_str()).cloned() else {
                continue; // a workload may name a service that does not exist (yet)
            };
            let mut endpoints: Vec<Arc<Workload>> = old
                .endpoints
                .iter()
                .filter(|w| !is_changed_workload(&w.key))
                .cloned()
                .collect();
            endpoints.extend(added.remove(key).unwrap_or_default());
            let service = service_with(&ServiceDef::of(&old), endpoints);
            for ip in &service.addresses {
                m.by_vip.insert(*ip, service.clone());
            }
            m.services_by_key.insert(key.clone(), service.clone());
            fresh.push(service);
        }
        let replaced: Vec<&str> = changed_services
            .iter()
            .copied()
            .chain(affected.iter().map(String::as_str))
            .collect();
        let is_replaced = key_set(replaced);
        m.services.retain(|s| !is_replaced(&s.key));
        m.services.extend(fresh);
        replace_by_key(&mut m.policies, changes.policies, |p| &p.key)?;
        replace_by_key(&mut m.waypoints, changes.waypoints, |w| &w.key)?;
        replace_by_key(&mut m.routes, changes.routes, |r| &r.key)?;
        replace_by_key(&mut m.backends, changes.backends, |b| &b.key)?;
        replace_by_key(&mut m.request_policies, changes.request_policies, |p| {
            &p.key
        })?;
        Ok(m)
    }
}

/// Applies changes to one of the few-of kinds (policies, waypoints,
/// routes): kept in a list, replaced by key.
fn replace_by_key<T>(
    list: &mut Vec<Arc<T>>,
    changes: Vec<(String, Option<Arc<T>>)>,
    key_of: impl Fn(&T) -> &String,
) -> Result<(), ModelError> {
    for (key, object) in changes {
        list.retain(|old| *key_of(old) != key);
        if let Some(object) = object {
            if *key_of(&object) != key {
                return Err(invalid(&key, "name", format!("holds {}", key_of(&object))));
            }
            list.push(object);
        }
    }
    Ok(())
}

/// A Service's cluster DNS name, from its `namespace/name` key (what the
/// config stream's `hostname` and the `forwarded` header's `host=` carry).
pub fn service_host(key: &str) -> String {
    let (namespace, name) = key.split_once('/').unwrap_or(("default", key));
    format!("{name}.{namespace}.svc.cluster.local")
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
workloads:
  - {name: web, serviceAccount: web, node: a, addresses: [10.0.1.2]}
  - {name: api-1, serviceAccount: api, node: b, addresses: [10.0.2.2], services: [default/api], labels: {app: api}}
  - {name: api-2, serviceAccount: api, node: b, addresses: [10.0.2.3], services: [default/api], labels: {app: api}}
services:
  - {name: api, addresses: [10.96.0.10], ports: [{port: 80, targetPort: 8080}]}
policies:
  - name: deny-db
    action: DENY
    selector: {app: api}
    rules: [{principals: ["spiffe://cluster.local/ns/default/sa/db"]}]
"#;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa).expect("id")
    }

    #[test]
    fn loads_indexes_and_balances() {
        let m = Model::from_yaml(YAML, "cluster.local").expect("valid");
        let svc = m
            .service_by_vip("10.96.0.10".parse().expect("ip"))
            .expect("vip");
        assert_eq!(svc.target_port(80), Some(8080));
        let picks: Vec<_> = (0..4)
            .map(|_| svc.pick().expect("ep").name.clone())
            .collect();
        assert_eq!(picks, ["api-1", "api-2", "api-1", "api-2"]);
        let web = m
            .workload_by_ip("10.0.1.2".parse().expect("ip"))
            .expect("web");
        assert_eq!(web.identity, id("web"));
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let mut m = Model::from_yaml(YAML, "cluster.local").expect("valid");
        let api = m.workload("default", "api-1").expect("api").clone();
        let ip = "10.0.1.2".parse().expect("ip");
        let (web, db) = (id("web"), id("db"));
        let src = |i| Source {
            identity: Some(i),
            ip,
        };
        assert_eq!(m.authorize(&api, src(&web), 8080), Decision::Allow);
        assert!(matches!(
            m.authorize(&api, src(&db), 8080),
            Decision::Deny(_)
        ));
        // An ALLOW for web only: others (and plaintext) are refused; DENY still wins.
        let extra = Model::from_yaml(
            r#"policies: [{name: only-web, action: ALLOW, rules: [{principals: ["spiffe://cluster.local/ns/default/sa/web", "spiffe://cluster.local/ns/default/sa/db"], ports: [8080]}]}]"#,
            "cluster.local",
        )
        .expect("valid");
        m.policies.extend(extra.policies);
        assert_eq!(m.authorize(&api, src(&web), 8080), Decision::Allow);
        assert!(matches!(
            m.authorize(&api, src(&web), 9090),
            Decision::Deny(_)
        ));
        assert!(
            matches!(m.authorize(&api, src(&db), 8080), Decision::Deny(r) if r.contains("deny-db"))
        );
        let plaintext = Source { identity: None, ip };
        assert!(matches!(
            m.authorize(&api, plaintext, 8080),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn a_bound_workload_admits_only_its_waypoint() {
        let yaml = r#"
workloads:
  - {name: api, serviceAccount: api, node: b, addresses: [10.0.2.2], waypoint: default/wp}
  - {name: open, serviceAccount: api, node: b, addresses: [10.0.2.3], waypoint: default/gone}
waypoints:
  - {name: wp, serviceAccount: wp, addresses: [10.0.3.1]}
"#;
        let m = Model::from_yaml(yaml, "cluster.local").expect("valid");
        let api = m.workload("default", "api").expect("api");
        let ip = "10.0.1.2".parse().expect("ip");
        let (wp, web) = (id("wp"), id("web"));
        let from = |i| Source { identity: i, ip };
        assert_eq!(m.authorize(api, from(Some(&wp)), 80), Decision::Allow);
        for src in [from(Some(&web)), from(None)] {
            assert!(
                matches!(m.authorize(api, src, 80), Decision::Deny(r) if r.contains("bound to waypoint default/wp")),
                "a direct client or plaintext skips the waypoint"
            );
        }
        let orphan = m.workload("default", "open").expect("open");
        assert!(
            matches!(m.authorize(orphan, from(Some(&wp)), 80), Decision::Deny(_)),
            "unknown waypoint: no one"
        );
    }

    #[test]
    fn errors_name_object_and_field() {
        let bad = [
            (
                "workloads: [{name: w, node: a, addresses: []}]",
                "workloads[0] (default/w): addresses",
            ),
            (
                "workloads: [{name: w, node: a, addresses: [1.2.3.4], serviceAccount: 'a/b'}]",
                "serviceAccount",
            ),
            (
                "services: [{name: s, addresses: [1.1.1.1], ports: []}]",
                "services[0] (default/s): ports",
            ),
            (
                "policies: [{name: p, action: DENY, rules: [{ipBlocks: [10.0.0.0/33]}]}]",
                "rules.ipBlocks",
            ),
            (
                "workloads: [{name: w, node: a, addresses: [1.2.3.4], bogus: 1}]",
                "unknown field",
            ),
            ("policies: [{name: p, action: MAYBE}]", "unknown variant"),
            ("[1, 2", "not valid YAML"),
            (
                "workloads: [{name: w, node: a, addresses: [1.2.3.4]}, {name: w, node: b, addresses: [1.2.3.5]}]",
                "workloads[1] (default/w): name: default/w is defined twice",
            ),
        ];
        for (yaml, want) in bad {
            let err = Model::from_yaml(yaml, "cluster.local")
                .expect_err(yaml)
                .to_string();
            assert!(err.contains(want), "{yaml}: {err}");
        }
    }

    #[test]
    fn cidr_matching() {
        let c = Cidr::parse("10.1.0.0/16").expect("cidr");
        assert!(c.contains("10.1.255.3".parse().expect("ip")));
        assert!(!c.contains("10.2.0.1".parse().expect("ip")));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .expect("cidr")
                .contains("8.8.8.8".parse().expect("ip"))
        );
        assert!(
            Cidr::parse("fd00::/8")
                .expect("cidr")
                .contains("fd12::1".parse().expect("ip"))
        );
        assert!(Cidr::parse("nope").is_err());
    }

    /// What a proxy can observe of a model, in a comparable form.
    fn view(m: &Model) -> Vec<String> {
        let mut out: Vec<String> = m
            .workloads
            .iter()
            .flat_map(|w| {
                w.addresses.iter().map(move |ip| {
                    let found = m.workload_by_ip(*ip).map(|x| x.key.clone());
                    format!("ip {ip} -> {found:?}")
                })
            })
            .collect();
        for s in &m.services {
            let mut eps: Vec<&str> = s.endpoints().iter().map(|w| w.name.as_str()).collect();
            eps.sort();
            let vip = s
                .addresses
                .first()
                .and_then(|ip| m.service_by_vip(*ip))
                .map(|x| x.key.clone());
            out.push(format!("svc {} {:?} {eps:?} vip->{vip:?}", s.key, s.ports));
            assert!(m.service(&s.key).is_some());
        }
        for w in &m.workloads {
            assert!(m.workload(&w.namespace, &w.name).is_some());
        }
        out.extend(m.policies.iter().map(|p| format!("policy {}", p.key)));
        out.sort();
        out
    }

    #[test]
    fn applying_changes_equals_building_from_scratch() {
        let base = Model::from_yaml(YAML, "cluster.local").expect("valid");
        let target_yaml = r#"
workloads:
  - {name: web, serviceAccount: web, node: a, addresses: [10.0.2.3]}
  - {name: api-1, serviceAccount: api, node: b, addresses: [10.0.1.2], services: [default/api]}
  - {name: api-3, serviceAccount: api, node: b, addresses: [10.0.2.4], services: [default/api, default/admin]}
services:
  - {name: api, addresses: [10.96.0.10], ports: [{port: 80, targetPort: 9090}]}
  - {name: admin, addresses: [10.96.0.11], ports: [{port: 81}]}
"#;
        let target = Model::from_yaml(target_yaml, "cluster.local").expect("valid");
        let pick = |key: &str| target.workloads.iter().find(|w| w.key == key).cloned();
        let def = |key: &str| {
            let s = target.service(key).expect("svc");
            Arc::new(ServiceDef::of(s))
        };
        // web and api-1 trade addresses in one change; api-2 goes; api-3
        // and a service arrive; a service changes; the policy goes.
        let changes = Changes {
            workloads: vec![
                ("default/web".into(), pick("default/web")),
                ("default/api-1".into(), pick("default/api-1")),
                ("default/api-2".into(), None),
                ("default/api-3".into(), pick("default/api-3")),
            ],
            services: vec![
                ("default/api".into(), Some(def("default/api"))),
                ("default/admin".into(), Some(def("default/admin"))),
            ],
            policies: vec![("default/deny-db".into(), None)],
            ..Changes::default()
        };
        let applied = base.apply(changes).expect("valid change");
        assert_eq!(view(&applied), view(&target));
        assert_eq!(
            view(&base),
            view(&Model::from_yaml(YAML, "cluster.local").expect("valid")),
            "the original is untouched"
        );

        // Refusals name the object; the model they were applied to is unchanged.
        let clash = Arc::new(
            workload(
                WorkloadSpec {
                    name: "x".into(),
                    namespace: "default".into(),
                    service_account: "x".into(),
                    node: "a".into(),
                    addresses: vec!["10.0.2.3".parse().expect("ip")],
                    meshed: true,
                    services: vec![],
                    labels: BTreeMap::new(),
                    waypoint: None,
                },
                "cluster.local",
                "x",
            )
            .expect("valid alone"),
        );
        let err = applied
            .apply(Changes {
                workloads: vec![("default/x".into(), Some(clash.clone()))],
                ..Changes::default()
            })
            .expect_err("address clash");
        assert!(
            err.to_string()
                .contains("10.0.2.3 is already used by default/web"),
            "{err}"
        );
        let err = applied
            .apply(Changes {
                workloads: vec![("default/y".into(), Some(clash))],
                ..Changes::default()
            })
            .expect_err("name mismatch");
        assert!(
            err.to_string().contains("holds workload default/x"),
            "{err}"
        );
        assert_eq!(view(&applied), view(&target));
    }
}
