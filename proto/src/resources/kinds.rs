//! The kinds weft serves today: workloads, services and L4 authorization
//! policies, each one [`Kind`] definition.

use std::net::IpAddr;
use std::sync::Arc;

use super::{Audience, Kind, bad};
use crate::model::{
    self, Action, Backend, Changes, Cidr, Model, ModelError, Policy, PolicySpec, PortSpec, Route,
    RuleSpec, Service, ServiceDef, ServiceSpec, Waypoint, WaypointSpec, Workload, WorkloadSpec,
    ip_bytes, ip_from,
};
use crate::pb::weft::v1 as pb;
use crate::request_policy::RequestPolicy;

fn ips(name: &str, addrs: &[Vec<u8>]) -> Result<Vec<IpAddr>, ModelError> {
    addrs
        .iter()
        .map(|a| ip_from(a).ok_or_else(|| bad(name, "address is not 4 or 16 bytes".into())))
        .collect()
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn port(name: &str, p: u32) -> Result<u16, ModelError> {
    u16::try_from(p).map_err(|_| bad(name, format!("port {p} out of range")))
}

/// `weft.v1.Workload`: a pod or VM, to every proxy.
pub struct WorkloadKind;

impl Kind for WorkloadKind {
    const TYPE_URL: &'static str = "type.googleapis.com/weft.v1.Workload";
    type Message = pb::Workload;
    type Stored = Workload;
    type Object = Workload;

    fn stored(model: &Model) -> &[Arc<Workload>] {
        &model.workloads
    }

    fn key(w: &Workload) -> &str {
        &w.key
    }

    // Workloads are the many: a one-pod change reuses every other encoding.
    fn unchanged(previous: &Model, w: &Workload) -> bool {
        previous.workload_by_key(&w.key).is_some_and(|p| **p == *w)
    }

    fn encode(w: &Workload) -> pb::Workload {
        pb::Workload {
            uid: w.key.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.identity.service_account().to_owned(),
            trust_domain: w.identity.trust_domain().to_owned(),
            node: w.node.clone(),
            addresses: w.addresses.iter().map(ip_bytes).collect(),
            meshed: w.meshed,
            ready: true,
            services: w.services.clone(),
            waypoint: w.waypoint.clone().unwrap_or_default(),
            labels: w.labels.clone().into_iter().collect(),
        }
    }

    fn decode(name: &str, w: pb::Workload, trust_domain: &str) -> Result<Workload, ModelError> {
        if !w.trust_domain.is_empty() && w.trust_domain != trust_domain {
            return Err(bad(
                name,
                format!(
                    "trust domain {} is not ours ({trust_domain})",
                    w.trust_domain
                ),
            ));
        }
        let spec = WorkloadSpec {
            addresses: ips(name, &w.addresses)?,
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account,
            node: w.node,
            meshed: w.meshed,
            services: w.services,
            labels: w.labels.into_iter().collect(),
            waypoint: non_empty(w.waypoint),
        };
        model::workload(spec, trust_domain, name)
    }

    fn changes(changes: &mut Changes) -> &mut Vec<(String, Option<Arc<Workload>>)> {
        &mut changes.workloads
    }
}

/// `weft.v1.Service`: a Service's addresses and ports, to every proxy.
pub struct ServiceKind;

impl Kind for ServiceKind {
    const TYPE_URL: &'static str = "type.googleapis.com/weft.v1.Service";
    type Message = pb::Service;
    type Stored = Service;
    type Object = ServiceDef;

    fn stored(model: &Model) -> &[Arc<Service>] {
        &model.services
    }

    fn key(s: &Service) -> &str {
        &s.key
    }

    fn encode(s: &Service) -> pb::Service {
        let (namespace, name) = s.key.split_once('/').unwrap_or(("default", &s.key));
        pb::Service {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            hostname: model::service_host(&s.key),
            addresses: s.addresses.iter().map(ip_bytes).collect(),
            ports: s
                .ports
                .iter()
                .map(|(port, target)| pb::ServicePort {
                    port: u32::from(*port),
                    target_port: u32::from(*target),
                    app_protocol: s.app_protocol(*port).unwrap_or_default().to_owned(),
                })
                .collect(),
            waypoint: s.waypoint.clone().unwrap_or_default(),
        }
    }

    fn decode(name: &str, s: pb::Service, _trust_domain: &str) -> Result<ServiceDef, ModelError> {
        let ports = s
            .ports
            .iter()
            .map(|p| {
                Ok(PortSpec {
                    port: port(name, p.port)?,
                    target_port: Some(port(name, p.target_port)?),
                    app_protocol: non_empty(p.app_protocol.clone()),
                })
            })
            .collect::<Result<_, ModelError>>()?;
        let spec = ServiceSpec {
            addresses: ips(name, &s.addresses)?,
            name: s.name,
            namespace: s.namespace,
            ports,
            waypoint: non_empty(s.waypoint),
        };
        model::service(spec, name)
    }

    fn changes(changes: &mut Changes) -> &mut Vec<(String, Option<Arc<ServiceDef>>)> {
        &mut changes.services
    }
}

/// `weft.v1.Authorization`: an L4 policy, only to the nodes running a
/// workload it selects (a ztunnel enforces inbound only, SPEC §6).
pub struct AuthorizationKind;

impl Kind for AuthorizationKind {
    const TYPE_URL: &'static str = "type.googleapis.com/weft.v1.Authorization";
    const AUDIENCE: Audience = Audience::SelectedNodes;
    type Message = pb::Authorization;
    type Stored = Policy;
    type Object = Policy;

    fn stored(model: &Model) -> &[Arc<Policy>] {
        &model.policies
    }

    fn key(p: &Policy) -> &str {
        &p.key
    }

    fn encode(p: &Policy) -> pb::Authorization {
        encode_policy(p)
    }

    fn decode(name: &str, a: pb::Authorization, _trust_domain: &str) -> Result<Policy, ModelError> {
        decode_policy(name, a)
    }

    fn changes(changes: &mut Changes) -> &mut Vec<(String, Option<Arc<Policy>>)> {
        &mut changes.policies
    }
}

fn encode_policy(p: &Policy) -> pb::Authorization {
    let (_, name) = p.key.split_once('/').unwrap_or(("", &p.key));
    pb::Authorization {
        name: name.to_owned(),
        namespace: p.namespace.clone(),
        scope: if p.selector.is_empty() {
            pb::Scope::Namespace
        } else {
            pb::Scope::WorkloadSelector
        } as i32,
        action: match p.action {
            Action::Allow => pb::Action::Allow,
            Action::Deny => pb::Action::Deny,
        } as i32,
        selector: p.selector.clone().into_iter().collect(),
        rules: p
            .rules
            .iter()
            .map(|r| pb::Rule {
                matches: vec![pb::Match {
                    principals: r.principals.iter().map(|i| i.to_string()).collect(),
                    namespaces: r.namespaces.clone(),
                    source_ips: r.ip_blocks.iter().map(Cidr::to_pb).collect(),
                    destination_ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
                    ..Default::default()
                }],
            })
            .collect(),
    }
}

fn decode_policy(name: &str, a: pb::Authorization) -> Result<Policy, ModelError> {
    let mut rules = Vec::new();
    for m in a.rules.iter().flat_map(|r| r.matches.iter()) {
        if !(m.not_principals.is_empty()
            && m.not_namespaces.is_empty()
            && m.not_source_ips.is_empty()
            && m.not_destination_ports.is_empty())
        {
            return Err(bad(
                name,
                "not* matchers are not supported yet; refusing rather than guessing".into(),
            ));
        }
        let ip_blocks = m
            .source_ips
            .iter()
            .map(|c| {
                ip_from(&c.address)
                    .map(|ip| format!("{ip}/{}", c.prefix_len))
                    .ok_or_else(|| bad(name, "CIDR address is not 4 or 16 bytes".into()))
            })
            .collect::<Result<_, _>>()?;
        let ports = m
            .destination_ports
            .iter()
            .map(|p| port(name, *p))
            .collect::<Result<_, _>>()?;
        rules.push(RuleSpec {
            principals: m.principals.clone(),
            namespaces: m.namespaces.clone(),
            ip_blocks,
            ports,
        });
    }
    let action = match pb::Action::try_from(a.action) {
        Ok(pb::Action::Allow) => Action::Allow,
        Ok(pb::Action::Deny) => Action::Deny,
        Err(_) => return Err(bad(name, format!("unknown action {}", a.action))),
    };
    let spec = PolicySpec {
        name: a.name,
        namespace: a.namespace,
        action,
        selector: a.selector.into_iter().collect(),
        rules,
    };
    model::policy(spec, name)
}

/// `weft.v1.Waypoint`: to every proxy (a source ztunnel tunnels to it; a
/// destination ztunnel admits only it for what it serves).
pub struct WaypointKind;

impl Kind for WaypointKind {
    const TYPE_URL: &'static str = "type.googleapis.com/weft.v1.Waypoint";
    type Message = pb::Waypoint;
    type Stored = Waypoint;
    type Object = Waypoint;

    fn stored(model: &Model) -> &[Arc<Waypoint>] {
        &model.waypoints
    }

    fn key(w: &Waypoint) -> &str {
        &w.key
    }

    fn encode(w: &Waypoint) -> pb::Waypoint {
        let (namespace, name) = w.key.split_once('/').unwrap_or(("default", &w.key));
        pb::Waypoint {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: w.identity.service_account().to_owned(),
            addresses: w.addresses.iter().map(ip_bytes).collect(),
            for_service_account: w.for_service_account.clone().unwrap_or_default(),
        }
    }

    fn decode(name: &str, w: pb::Waypoint, trust_domain: &str) -> Result<Waypoint, ModelError> {
        let spec = WaypointSpec {
            addresses: ips(name, &w.addresses)?,
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account,
            for_service_account: non_empty(w.for_service_account),
        };
        model::waypoint(spec, trust_domain, name)
    }

    fn changes(changes: &mut Changes) -> &mut Vec<(String, Option<Arc<Waypoint>>)> {
        &mut changes.waypoints
    }
}

/// `weft.v1.Route`: an HTTPRoute or GRPCRoute, only to the waypoints that
/// serve one of its parent Services.
pub struct RouteKind;

impl Kind for RouteKind {
    const TYPE_URL: &'static str = "type.googleapis.com/weft.v1.Route";
    const AUDIENCE: Audience = Audience::SelectedNodes;
    type Message = pb::Route;
    type Stored = Route;
    type Object = Route;

    fn stored(model: &Model) -> &[Arc<Route>] {
        &model.routes
    }

    fn key(r: &Route) -> &str {
        &r.key
    }

    fn encode(r: &Route) -> pb::Route {
        r.spec.clone()
    }

    fn decode(name: &str, r: pb::Route, _trust_domain: &str) -> Result<Route, ModelError> {
        model::route(r, name)
    }

    fn changes(changes: &mut Changes) -> &mut Vec<(String, Option<Arc<Route>>)> {
        &mut changes.routes
    }
}

/// `weft.v1.Backend`: a Service's backend policy, only to the waypoints
/// serving that Service.
pub struct BackendKind;

impl Kind for BackendKind {
    const TYPE_URL: &'static str = "type.googleapis.com/weft.v1.Backend";
    const AUDIENCE: Audience = Audience::SelectedNodes;
    type Message = pb::Backend;
    type Stored = Backend;
    type Object = Backend;

    fn stored(model: &Model) -> &[Arc<Backend>] {
        &model.backends
    }

    fn key(b: &Backend) -> &str {
        &b.key
    }

    fn encode(b: &Backend) -> pb::Backend {
        b.spec.clone()
    }

    fn decode(name: &str, b: pb::Backend, _trust_domain: &str) -> Result<Backend, ModelError> {
        model::backend(b, name)
    }

    fn changes(changes: &mut Changes) -> &mut Vec<(String, Option<Arc<Backend>>)> {
        &mut changes.backends
    }
}

/// `weft.v1.RequestPolicy`: an AuthorizationPolicy attached by targetRefs,
/// only to the waypoints serving its targets (they judge each request).
pub struct RequestPolicyKind;

impl Kind for RequestPolicyKind {
    const TYPE_URL: &'static str = "type.googleapis.com/weft.v1.RequestPolicy";
    const AUDIENCE: Audience = Audience::SelectedNodes;
    type Message = pb::RequestPolicy;
    type Stored = RequestPolicy;
    type Object = RequestPolicy;

    fn stored(model: &Model) -> &[Arc<RequestPolicy>] {
        &model.request_policies
    }

    fn key(p: &RequestPolicy) -> &str {
        &p.key
    }

    fn encode(p: &RequestPolicy) -> pb::RequestPolicy {
        p.spec.clone()
    }

    fn decode(
        name: &str,
        p: pb::RequestPolicy,
        _trust_domain: &str,
    ) -> Result<RequestPolicy, ModelError> {
        crate::request_policy::compile(p, name)
    }

    fn changes(changes: &mut Changes) -> &mut Vec<(String, Option<Arc<RequestPolicy>>)> {
        &mut changes.request_policies
    }
}
