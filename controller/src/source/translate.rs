//! Kubernetes objects → weft's model, as one pure function both sources
//! share (and the tests exercise with real `kubectl get -o yaml` output).
//!
//! - A namespace joins the mesh with label `weft.dev/mesh=enabled`; a pod
//!   in it opts out with `weft.dev/mesh=disabled`. Pods elsewhere are still
//!   workloads (meshed: false), so meshed clients reach them in plaintext.
//! - A pod is a workload once it is scheduled and has an IP; host-network
//!   pods (the node's IP) and finished pods (their IP may be reused) are not.
//! - A pod is an endpoint of the Services whose selector matches it unless
//!   it is not ready: its Ready condition is False, it is terminating, or an
//!   EndpointSlice of that Service says `ready: false`.
//! - A Service without a selector is left alone (not a mesh Service):
//!   connections to its VIP pass through, as they would without weft.
//! - Named `targetPort`s resolve through the Service's EndpointSlice ports,
//!   else the endpoint pods' container ports.
//! - Authorization rules with L7 fields are the waypoint's to enforce; at
//!   L4 an ALLOW rule with them never matches and a DENY rule with them
//!   denies the whole connection (deny on doubt).
//! - An object that cannot be understood is reported in `problems`; a policy
//!   among them becomes DENY-all for what it selects, never allow-all.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_proto::identity::Identity;
use weft_proto::model::{
    self, Action, Changes, Cidr, Model, PolicySpec, PortSpec, RuleSpec, ServiceSpec, Specs,
    WorkloadSpec,
};

use super::Objects;
use super::crds::{AuthorizationPolicy, PolicyAction, PolicyRule};
use super::gateway::{Bindings, is_waypoint_pod, waypoints_and_routes};
use weft_proto::pb::weft::v1 as pb;

/// Namespace and pod label that joins (`enabled`) or leaves (`disabled`).
pub const MESH_LABEL: &str = "weft.dev/mesh";
/// Gateway class that makes a Gateway a waypoint.
pub const WAYPOINT_CLASS: &str = "weft-waypoint";
/// On a waypoint Gateway: the one service account it serves.
pub const FOR_SERVICE_ACCOUNT: &str = "weft.dev/for-service-account";
/// On a Service or Namespace: the waypoint its traffic goes through.
pub const USE_WAYPOINT: &str = "weft.dev/use-waypoint";

/// An object weft could not use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `Kind namespace/name`.
    pub object: String,
    pub reason: String,
    /// The object is not used as written (left out, or a policy made
    /// DENY-all); otherwise a warning about something it refers to.
    pub refused: bool,
}

/// A waypoint (a `Gateway` of class `weft-waypoint`) and what binds to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waypoint {
    /// `<namespace>/<name>`.
    pub key: String,
    /// Serves only this service account's workloads; `None`: the namespace.
    pub for_service_account: Option<String>,
    /// Services (`<namespace>/<name>`) whose traffic is bound to it.
    pub services: Vec<String>,
    /// Its ready instances.
    pub addresses: Vec<IpAddr>,
    /// Namespaces whose label binds to it.
    pub namespaces: Vec<String>,
    /// A Gateway defines it (`false`: only named by a binding label, so
    /// what is bound to it is refused until it exists).
    pub defined: bool,
}

/// An HTTPRoute or GRPCRoute attached to a Service (the mesh's way to
/// attach routes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub key: String,
    /// Services (`<namespace>/<name>`) it attaches to.
    pub parents: Vec<String>,
    pub rules: usize,
    /// Why it is not served, if it is not.
    pub refused: Option<String>,
}

#[derive(Debug, Default)]
pub struct Translation {
    pub specs: Specs,
    pub waypoints: Vec<Waypoint>,
    pub routes: Vec<Route>,
    pub problems: Vec<Problem>,
}

impl Translation {
    fn refuse(&mut self, object: String, reason: impl Into<String>) {
        self.problems.push(Problem {
            object,
            reason: reason.into(),
            refused: true,
        });
    }

    fn warn(&mut self, object: String, reason: impl Into<String>) {
        self.problems.push(Problem {
            object,
            reason: reason.into(),
            refused: false,
        });
    }
}

/// What a pod's translation depends on besides the pod: which namespaces
/// are meshed, the Services of each namespace, and the EndpointSlices.
pub struct PodContext<'a> {
    meshed_namespaces: HashSet<&'a str>,
    services_by_namespace: HashMap<&'a str, Vec<(&'a String, &'a Service)>>,
    slices: SliceIndex,
    bindings: Bindings,
}

impl<'a> PodContext<'a> {
    pub fn new(objects: &'a Objects) -> Self {
        let mut services_by_namespace: HashMap<&str, Vec<(&String, &Service)>> = HashMap::new();
        for (key, svc) in &objects.services {
            services_by_namespace
                .entry(namespace_of(key))
                .or_default()
                .push((key, svc));
        }
        PodContext {
            meshed_namespaces: objects
                .namespaces
                .iter()
                .filter(|(_, ns)| label(&ns.metadata.labels, MESH_LABEL) == Some("enabled"))
                .map(|(name, _)| name.as_str())
                .collect(),
            services_by_namespace,
            slices: SliceIndex::new(objects),
            bindings: Bindings::new(objects),
        }
    }

    /// Whether a Service of `namespace` names a target port its
    /// EndpointSlices do not resolve: then which port it means depends on
    /// its pods' container ports, and a pod change is not the pod's alone.
    /// (In a cluster the slices resolve every name.)
    pub fn ports_follow_pods_in(&self, namespace: &str) -> bool {
        self.services_by_namespace
            .get(namespace)
            .into_iter()
            .flatten()
            .any(|(key, svc)| {
                svc.spec
                    .iter()
                    .flat_map(|s| s.ports.iter().flatten())
                    .any(|p| match &p.target_port {
                        Some(IntOrString::String(name)) => {
                            self.slices.named_port(key, name).is_none()
                        }
                        _ => false,
                    })
            })
    }

    /// The workload a pod is now: `None` while it is not one (pending,
    /// finished, host network), an error if it cannot be used.
    pub fn workload(&self, key: &str, pod: &Pod) -> Result<Option<WorkloadSpec>, String> {
        let Some((node, addresses)) = placement(pod)? else {
            return Ok(None);
        };
        let namespace = namespace_of(key);
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        // A waypoint's pods speak HBONE themselves: never captured.
        let meshed = self.meshed_namespaces.contains(namespace)
            && labels.get(MESH_LABEL).map(String::as_str) != Some("disabled")
            && !is_waypoint_pod(pod);
        let services = if pod_ready(pod) {
            self.services_by_namespace
                .get(namespace)
                .into_iter()
                .flatten()
                .filter(|(skey, svc)| {
                    selects(svc, &labels) && !self.slices.not_ready(skey, name_of(key), &addresses)
                })
                .map(|(skey, _)| (*skey).clone())
                .collect()
        } else {
            Vec::new()
        };
        let waypoint = meshed
            .then(|| {
                self.bindings
                    .workload(namespace, &labels, &service_account, &services)
            })
            .flatten();
        Ok(Some(WorkloadSpec {
            waypoint,
            name: name_of(key).to_owned(),
            namespace: namespace.to_owned(),
            service_account,
            node,
            addresses,
            meshed,
            services,
            labels,
        }))
    }
}

/// Pods added or changed (`upserts`) and removed (`gone`), applied to the
/// model `served` was made from `objects` by: what a pod becomes depends on
/// its namespace, Services and EndpointSlices, which a pods-only change
/// leaves alone. `None` when the change is not the pods' alone (a Service
/// of theirs names its target port) or cannot be applied as is (a clash):
/// then the caller runs the full translation, which explains refusals.
/// On success `objects` is updated too.
pub fn apply_pods(
    objects: &mut Objects,
    served: &Model,
    upserts: Vec<(String, Arc<Pod>)>,
    gone: Vec<String>,
    trust_domain: &str,
) -> Option<Model> {
    let context = PodContext::new(objects);
    if upserts
        .iter()
        .map(|(k, _)| k)
        .chain(&gone)
        .any(|k| context.ports_follow_pods_in(namespace_of(k)))
    {
        return None;
    }
    // A waypoint's pods are its instances: the whole translation says so.
    let old = |k: &String| objects.pods.get(k).is_some_and(|p| is_waypoint_pod(p));
    if upserts.iter().any(|(k, p)| is_waypoint_pod(p) || old(k)) || gone.iter().any(old) {
        return None;
    }
    let mut changes = Changes::default();
    for (key, pod) in &upserts {
        let workload = match context.workload(key, pod).ok()? {
            Some(spec) => Some(Arc::new(model::workload(spec, trust_domain, key).ok()?)),
            None => None,
        };
        changes.workloads.push((key.clone(), workload));
    }
    changes
        .workloads
        .extend(gone.iter().map(|k| (k.clone(), None)));
    drop(context);
    let model = served.apply(changes).ok()?;
    for (key, pod) in upserts {
        objects.pods.insert(key, pod);
    }
    for key in gone {
        objects.pods.remove(&key);
    }
    Some(model)
}

/// EndpointSlices added, changed (`upserts`) or removed (`gone`), applied
/// to the model `served` was made from `objects` by. A slice tells which
/// of its pods are ready and which number a port name means; when the
/// port names are the same before and after, only readiness moved, and
/// the pods the slice lists (before or after) are translated again, pod by
/// pod. `None` sends the caller to the full translation. On success
/// `objects` is updated too.
pub fn apply_slices(
    objects: &mut Objects,
    served: &Model,
    upserts: Vec<(String, Arc<EndpointSlice>)>,
    gone: Vec<String>,
    trust_domain: &str,
) -> Option<Model> {
    let mut pods: BTreeSet<String> = BTreeSet::new();
    let mut by_ip: Option<HashMap<IpAddr, &String>> = None;
    let new: HashMap<&String, &Arc<EndpointSlice>> = upserts.iter().map(|(k, v)| (k, v)).collect();
    for key in upserts.iter().map(|(k, _)| k).chain(&gone) {
        let old = objects.endpoint_slices.get(key);
        let new = new.get(key).copied();
        if slice_ports(old) != slice_ports(new) {
            return None; // port names may mean other numbers now
        }
        for ep in old
            .into_iter()
            .chain(new)
            .flat_map(|s| s.endpoints.iter().flatten())
        {
            match &ep.target_ref {
                Some(r) if r.kind.as_deref() == Some("Pod") => {
                    let ns = r.namespace.as_deref().unwrap_or(namespace_of(key));
                    pods.insert(format!("{ns}/{}", r.name.as_deref()?));
                }
                // Listed by address only: find the pods that hold it.
                _ => {
                    let index = by_ip.get_or_insert_with(|| pods_by_ip(objects));
                    for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                        pods.extend(index.get(&ip).map(|k| (*k).clone()));
                    }
                }
            }
        }
    }
    let previous: Vec<(String, Option<Arc<EndpointSlice>>)> = upserts
        .iter()
        .map(|(k, _)| k)
        .chain(&gone)
        .map(|k| (k.clone(), objects.endpoint_slices.get(k).cloned()))
        .collect();
    for (key, slice) in upserts {
        objects.endpoint_slices.insert(key, slice);
    }
    for key in &gone {
        objects.endpoint_slices.remove(key);
    }
    let affected: Vec<(String, Arc<Pod>)> = pods
        .into_iter()
        .filter_map(|k| objects.pods.get(&k).map(|p| (k, p.clone())))
        .collect();
    let model = apply_pods(objects, served, affected, Vec::new(), trust_domain);
    if model.is_none() {
        for (key, slice) in previous {
            match slice {
                Some(s) => objects.endpoint_slices.insert(key, s),
                None => objects.endpoint_slices.remove(&key),
            };
        }
    }
    model
}

fn slice_ports(
    slice: Option<&Arc<EndpointSlice>>,
) -> &[k8s_openapi::api::discovery::v1::EndpointPort] {
    slice.and_then(|s| s.ports.as_deref()).unwrap_or_default()
}

/// The pod holding each IP, its addresses read as [`placement`] reads them.
fn pods_by_ip(objects: &Objects) -> HashMap<IpAddr, &String> {
    let mut index = HashMap::new();
    for (key, pod) in &objects.pods {
        if let Ok(Some((_, ips))) = placement(pod) {
            index.extend(ips.into_iter().map(|ip| (ip, key)));
        }
    }
    index
}

pub fn translate(objects: &Objects, trust_domain: &str) -> Translation {
    let mut out = Translation::default();
    let context = PodContext::new(objects);
    let slices = &context.slices;
    let mut used_ips: HashMap<IpAddr, &str> = HashMap::new();
    // The pod behind each workload spec, in the same order.
    let mut workload_pods: Vec<&Pod> = Vec::with_capacity(objects.pods.len());

    for (key, pod) in &objects.pods {
        let id = || format!("Pod {key}");
        let workload = match context.workload(key, pod) {
            Ok(Some(w)) => w,
            Ok(None) => continue,
            Err(reason) => {
                out.refuse(id(), reason);
                continue;
            }
        };
        if let Some(clash) = workload
            .addresses
            .iter()
            .find_map(|ip| used_ips.get(ip).map(|other| (ip, other)))
        {
            out.refuse(
                id(),
                format!("IP {} is also {}'s; skipped", clash.0, clash.1),
            );
            continue;
        }
        for ip in &workload.addresses {
            used_ips.insert(*ip, key.as_str());
        }
        workload_pods.push(&**pod);
        out.specs.workloads.push(workload);
    }

    let endpoints: HashMap<&str, Vec<&Pod>> = {
        let mut m: HashMap<&str, Vec<&Pod>> = HashMap::new();
        for (w, pod) in out.specs.workloads.iter().zip(&workload_pods) {
            for s in &w.services {
                m.entry(s.as_str()).or_default().push(pod);
            }
        }
        m
    };
    // The waypoint each Service's bound endpoints need: traffic to a bound
    // pod must pass its waypoint, whichever Service it came by.
    let mut endpoint_waypoints: HashMap<&str, &str> = HashMap::new();
    for w in &out.specs.workloads {
        if let Some(wp) = &w.waypoint {
            for s in &w.services {
                endpoint_waypoints.entry(s.as_str()).or_insert(wp.as_str());
            }
        }
    }
    let mut services = Vec::new();
    let mut problems = Vec::new();
    for (key, svc) in &objects.services {
        let id = format!("Service {key}");
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue; // a DNS alias: nothing to capture
        }
        if spec.selector.as_ref().is_none_or(|s| s.is_empty()) {
            // Endpoints managed elsewhere (`default/kubernetes`, databases
            // behind hand-made EndpointSlices): left alone, so the ztunnel
            // passes the VIP through to wherever the cluster sends it. A
            // mesh Service with no endpoints would refuse every connection.
            continue;
        }
        let mut addresses = Vec::new();
        for ip in spec
            .cluster_ips
            .clone()
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default()
        {
            if ip.is_empty() || ip == "None" {
                continue; // headless
            }
            match ip.parse::<IpAddr>() {
                Ok(ip) => match used_ips.get(&ip) {
                    Some(other) => {
                        problems.push((id.clone(), format!("IP {ip} is also {other}'s"), true))
                    }
                    None => {
                        used_ips.insert(ip, key.as_str());
                        addresses.push(ip);
                    }
                },
                Err(_) => {
                    problems.push((id.clone(), format!("clusterIP {ip:?} is not an IP"), true))
                }
            }
        }
        let pods = endpoints
            .get(key.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut ports = Vec::new();
        for p in spec.ports.iter().flatten() {
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                continue; // ztunnel carries TCP only
            }
            let Ok(port) = u16::try_from(p.port) else {
                problems.push((id.clone(), format!("port {} is out of range", p.port), true));
                continue;
            };
            let target = match &p.target_port {
                None => Some(port),
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                Some(IntOrString::String(name)) => slices
                    .named_port(key, name)
                    .or_else(|| container_port(pods, name)),
            };
            match target {
                Some(target_port) => ports.push(PortSpec {
                    port,
                    target_port: Some(target_port),
                    app_protocol: p.app_protocol.clone(),
                }),
                // With no endpoints there is nothing to resolve against yet.
                None if pods.is_empty() => {}
                None => problems.push((
                    id.clone(),
                    format!(
                        "port {port}: targetPort {:?} matches no container port of its pods",
                        p.target_port
                    ),
                    false,
                )),
            }
        }
        if ports.is_empty() {
            continue;
        }
        let accounts: Vec<&str> = pods
            .iter()
            .filter_map(|p| p.spec.as_ref()?.service_account_name.as_deref())
            .collect();
        let waypoint = context.bindings.service(key, &accounts).or_else(|| {
            endpoint_waypoints
                .get(key.as_str())
                .map(|w| (*w).to_owned())
        });
        services.push(ServiceSpec {
            waypoint,
            name: name_of(key).to_owned(),
            namespace: namespace_of(key).to_owned(),
            addresses,
            ports,
        });
    }
    out.specs.services = services;
    for (object, reason, refused) in problems {
        if refused {
            out.refuse(object, reason);
        } else {
            out.warn(object, reason);
        }
    }

    for (key, policy) in &objects.authorization_policies {
        if !policy.spec.target_refs.is_empty() {
            let spec = request_policy(key, policy, trust_domain, objects, &mut out);
            out.specs.request_policies.extend(spec);
            continue;
        }
        let spec = match policy_spec(key, policy, trust_domain) {
            Ok(spec) => spec,
            Err(reason) => {
                out.refuse(
                    format!("AuthorizationPolicy {key}"),
                    format!("{reason}; it denies everything it selects until fixed"),
                );
                PolicySpec {
                    name: name_of(key).to_owned(),
                    namespace: namespace_of(key).to_owned(),
                    action: Action::Deny,
                    selector: refused_selector(policy),
                    rules: vec![RuleSpec::default()],
                }
            }
        };
        out.specs.policies.push(spec);
    }

    waypoints_and_routes(objects, &mut out);
    out
}

/// Node and IPs of a pod that is a workload now; `None` while it is
/// pending, once it has finished, and for host-network pods.
pub(crate) fn placement(pod: &Pod) -> Result<Option<(String, Vec<IpAddr>)>, String> {
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(None);
    };
    let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    let Some(status) = pod.status.as_ref() else {
        return Ok(None);
    };
    if spec.host_network == Some(true)
        || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
    {
        return Ok(None);
    }
    let mut listed: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .collect();
    if listed.is_empty() {
        listed.extend(status.pod_ip.as_deref());
    }
    let ips = listed
        .iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| format!("status.podIP {ip:?} is not an IP"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((!ips.is_empty()).then_some((node, ips)))
}

/// Ready unless it says otherwise: local-mode pods carry no conditions.
pub(crate) fn pod_ready(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    !conditions
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "False")
}

fn selects(svc: &Service, labels: &BTreeMap<String, String>) -> bool {
    let selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
    // No selector: endpoints are managed by hand (EndpointSlices to IPs
    // outside the mesh's pods), which weft does not route to by VIP.
    selector.is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn container_port(pods: &[&Pod], name: &str) -> Option<u16> {
    pods.iter()
        .flat_map(|p| p.spec.iter().flat_map(|s| &s.containers))
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// What the EndpointSlices say, by Service.
struct SliceIndex {
    /// service key → pod names and IPs listed as not ready.
    not_ready: HashMap<String, (HashSet<String>, HashSet<IpAddr>)>,
    /// service key → port name → number.
    ports: HashMap<String, HashMap<String, u16>>,
}

impl SliceIndex {
    fn new(objects: &Objects) -> Self {
        let mut index = SliceIndex {
            not_ready: HashMap::new(),
            ports: HashMap::new(),
        };
        for (key, slice) in &objects.endpoint_slices {
            let Some(service) = label(&slice.metadata.labels, "kubernetes.io/service-name") else {
                continue;
            };
            let service = format!("{}/{service}", namespace_of(key));
            for p in slice.ports.iter().flatten() {
                if let (Some(name), Some(port)) =
                    (&p.name, p.port.and_then(|n| u16::try_from(n).ok()))
                {
                    index
                        .ports
                        .entry(service.clone())
                        .or_default()
                        .insert(name.clone(), port);
                }
            }
            for ep in slice.endpoints.iter().flatten() {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if ready {
                    continue;
                }
                let entry = index.not_ready.entry(service.clone()).or_default();
                if let Some(r) = &ep.target_ref
                    && r.kind.as_deref() == Some("Pod")
                    && let Some(name) = &r.name
                {
                    entry.0.insert(name.clone());
                }
                entry
                    .1
                    .extend(ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()));
            }
        }
        index
    }

    fn not_ready(&self, service: &str, pod: &str, ips: &[IpAddr]) -> bool {
        self.not_ready.get(service).is_some_and(|(names, addrs)| {
            names.contains(pod) || ips.iter().any(|ip| addrs.contains(ip))
        })
    }

    fn named_port(&self, service: &str, name: &str) -> Option<u16> {
        self.ports.get(service)?.get(name).copied()
    }
}

fn policy_spec(
    key: &str,
    policy: &AuthorizationPolicy,
    trust_domain: &str,
) -> Result<PolicySpec, String> {
    let action = match policy.spec.action {
        PolicyAction::Allow => Action::Allow,
        PolicyAction::Deny => Action::Deny,
    };
    let mut rules = Vec::new();
    for (i, r) in policy.spec.rules.iter().enumerate() {
        check_principals(i, r, trust_domain)?;
        for b in &r.ip_blocks {
            Cidr::parse(b).map_err(|e| format!("rules[{i}].ipBlocks: {e}"))?;
        }
        if r.has_l7() && action == Action::Allow {
            continue; // cannot match at L4: the waypoint enforces it
        }
        rules.push(RuleSpec {
            principals: r.principals.clone(),
            namespaces: r.namespaces.clone(),
            ip_blocks: r.ip_blocks.clone(),
            ports: r.ports.clone(),
        });
    }
    // An ALLOW whose every rule was L7 allows nothing at L4; keep it as an
    // ALLOW with no rules, which matches no connection.
    Ok(PolicySpec {
        name: name_of(key).to_owned(),
        namespace: namespace_of(key).to_owned(),
        action,
        selector: selector(policy)?,
        rules,
    })
}

/// An AuthorizationPolicy attached by `targetRefs`: what the waypoints
/// serving its targets judge each request by. One that cannot be read
/// denies every request to the targets it names until fixed (deny on
/// doubt); one naming no target it can use applies nowhere (reported).
fn request_policy(
    key: &str,
    policy: &AuthorizationPolicy,
    trust_domain: &str,
    objects: &Objects,
    out: &mut Translation,
) -> Option<pb::RequestPolicy> {
    let id = format!("AuthorizationPolicy {key}");
    let namespace = namespace_of(key);
    let mut spec = pb::RequestPolicy {
        name: name_of(key).to_owned(),
        namespace: namespace.to_owned(),
        action: match policy.spec.action {
            PolicyAction::Allow => pb::Action::Allow,
            PolicyAction::Deny => pb::Action::Deny,
        } as i32,
        ..Default::default()
    };
    let mut problems = Vec::new();
    for t in &policy.spec.target_refs {
        let target = format!("{namespace}/{}", t.name);
        match (t.group.as_str(), t.kind.as_str()) {
            ("" | "core", "Service") => {
                if !objects.services.contains_key(&target) {
                    out.warn(
                        id.clone(),
                        format!("targetRefs: Service {target} does not exist"),
                    );
                }
                spec.services.push(target);
            }
            ("gateway.networking.k8s.io", "Gateway") => {
                let waypoint = objects.gateways.get(&target);
                if waypoint.is_none_or(|g| g.spec.gateway_class_name != WAYPOINT_CLASS) {
                    out.warn(
                        id.clone(),
                        format!("targetRefs: {target} is not a Gateway of class {WAYPOINT_CLASS}"),
                    );
                }
                spec.waypoints.push(target);
            }
            (g, k) => problems.push(format!(
                "targetRefs: {g}/{k} is not supported (Service or Gateway)"
            )),
        }
    }
    if policy.spec.selector.is_some() {
        problems.push("selector and targetRefs together: a policy is for workloads (L4) or for what a waypoint serves (L7), not both".into());
    }
    match request_rules(&policy.spec.rules, trust_domain) {
        Ok(rules) if problems.is_empty() => spec.rules = rules,
        Ok(_) => {}
        Err(e) => problems.push(e),
    }
    if !problems.is_empty() {
        out.refuse(
            id,
            format!(
                "{}; it denies every request to its targets until fixed",
                problems.join("; ")
            ),
        );
        spec.action = pb::Action::Deny as i32;
        spec.rules = vec![pb::RequestRule::default()];
    }
    (!(spec.services.is_empty() && spec.waypoints.is_empty())).then_some(spec)
}

/// Every principal of rule `i` is a SPIFFE ID of this trust domain.
fn check_principals(i: usize, r: &PolicyRule, trust_domain: &str) -> Result<(), String> {
    for p in &r.principals {
        let id: Identity = p
            .parse()
            .map_err(|e| format!("rules[{i}].principals: {e}"))?;
        if id.trust_domain() != trust_domain {
            return Err(format!(
                "rules[{i}].principals: {p} is not in trust domain {trust_domain}"
            ));
        }
    }
    Ok(())
}

fn request_rules(rules: &[PolicyRule], trust_domain: &str) -> Result<Vec<pb::RequestRule>, String> {
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            check_principals(i, r, trust_domain)?;
            let source_ips = r
                .ip_blocks
                .iter()
                .map(|b| {
                    let c = Cidr::parse(b).map_err(|e| format!("rules[{i}].ipBlocks: {e}"))?;
                    Ok(c.to_pb())
                })
                .collect::<Result<_, String>>()?;
            if let Some(p) = r
                .paths
                .iter()
                .find(|p| !(p.starts_with('/') || p.starts_with('*')))
            {
                return Err(format!("rules[{i}].paths: {p:?} must start with / or *"));
            }
            Ok(pb::RequestRule {
                principals: r.principals.clone(),
                namespaces: r.namespaces.clone(),
                source_ips,
                ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
                methods: r.methods.clone(),
                paths: r.paths.clone(),
                hosts: r.hosts.clone(),
                headers: r
                    .headers
                    .iter()
                    .map(|(name, value)| pb::NameValue {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
            })
        })
        .collect()
}

/// The policy's selector as label equalities. `Err` when it uses an
/// expression equalities cannot say: the caller refuses the policy rather
/// than apply it to more workloads than it names.
fn selector(policy: &AuthorizationPolicy) -> Result<BTreeMap<String, String>, String> {
    let Some(sel) = policy.spec.selector.as_ref() else {
        return Ok(BTreeMap::new());
    };
    let mut labels = sel.match_labels.clone();
    for (i, e) in sel.match_expressions.iter().enumerate() {
        match (e.operator.as_str(), e.values.as_slice()) {
            ("In", [value]) if labels.get(&e.key).is_none_or(|v| v == value) => {
                labels.insert(e.key.clone(), value.clone());
            }
            _ => {
                return Err(format!(
                    "selector.matchExpressions[{i}] ({} {} {:?}) is not supported (only In with one value)",
                    e.key, e.operator, e.values
                ));
            }
        }
    }
    Ok(labels)
}

/// The labels of a refused policy's DENY-all: those it names plainly. With
/// an expression left out this selects more, never fewer, than written;
/// for a refusal that errs toward denying.
fn refused_selector(policy: &AuthorizationPolicy) -> BTreeMap<String, String> {
    policy
        .spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .unwrap_or_default()
}

pub(crate) fn label<'a>(
    labels: &'a Option<BTreeMap<String, String>>,
    key: &str,
) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

pub(crate) fn namespace_of(key: &str) -> &str {
    key.split_once('/').map_or("default", |(ns, _)| ns)
}

fn name_of(key: &str) -> &str {
    key.split_once('/').map_or(key, |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Object, parse_documents};
    use weft_proto::model::Model;

    const SHOP: &str = include_str!("../../tests/k8s/shop.yaml");
    const BILLING: &str = include_str!("../../tests/k8s/other-ns.yaml");
    const TD: &str = "cluster.local";

    fn objects(yaml: &[&str]) -> Objects {
        let mut objects = Objects::default();
        for y in yaml {
            for o in parse_documents(y).expect("valid YAML") {
                objects.insert(o);
            }
        }
        objects
    }

    fn policy<'a>(t: &'a Translation, name: &str) -> &'a PolicySpec {
        t.specs
            .policies
            .iter()
            .find(|p| p.name == name)
            .expect(name)
    }

    fn workload<'a>(t: &'a Translation, name: &str) -> Option<&'a WorkloadSpec> {
        t.specs.workloads.iter().find(|w| w.name == name)
    }

    #[test]
    fn deployment_pods_multi_port_service_and_not_ready_endpoints() {
        let t = translate(&objects(&[SHOP]), TD);
        assert_eq!(t.problems, vec![]);
        let names: Vec<&str> = t.specs.workloads.iter().map(|w| w.name.as_str()).collect();
        // Pending, finished and host-network pods are not workloads.
        assert_eq!(
            names,
            [
                "api-6d5f7c9b8-q8m2z",
                "api-6d5f7c9b8-x2l4q",
                "legacy",
                "web-84c6b5d7f4-7kd9s"
            ]
        );
        let ready = workload(&t, "api-6d5f7c9b8-x2l4q").expect("ready api pod");
        assert_eq!(ready.services, ["shop/api"]);
        assert_eq!(
            (ready.node.as_str(), ready.service_account.as_str()),
            ("kind-worker", "api")
        );
        assert!(ready.meshed);
        assert_eq!(
            ready.labels.get("pod-template-hash").map(String::as_str),
            Some("6d5f7c9b8")
        );
        let unready = workload(&t, "api-6d5f7c9b8-q8m2z").expect("unready api pod");
        assert!(
            unready.services.is_empty(),
            "a not-ready pod is no endpoint"
        );
        assert!(unready.meshed, "but it is still meshed (it may call out)");
        let legacy = workload(&t, "legacy").expect("legacy");
        assert!(!legacy.meshed, "weft.dev/mesh=disabled opts the pod out");
        let web = workload(&t, "web-84c6b5d7f4-7kd9s").expect("web");
        assert_eq!(web.service_account, "web");

        let api = &t.specs.services[0];
        assert_eq!((api.namespace.as_str(), api.name.as_str()), ("shop", "api"));
        assert_eq!(api.addresses, ["10.96.41.7".parse::<IpAddr>().expect("ip")]);
        let ports: Vec<(u16, Option<u16>)> =
            api.ports.iter().map(|p| (p.port, p.target_port)).collect();
        // The named targetPort resolves through the slice; UDP is not carried.
        assert_eq!(ports, [(80, Some(8080)), (9090, Some(9000))]);

        let model = Model::from_specs(t.specs, TD).expect("the translation validates");
        let pod = model
            .workload("shop", "api-6d5f7c9b8-x2l4q")
            .expect("indexed");
        assert_eq!(
            pod.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/api"
        );
        let svc = model.service("shop/api").expect("service");
        assert_eq!(svc.endpoints().len(), 1);
    }

    #[test]
    fn readiness_from_either_the_slice_or_the_pod() {
        // The pod says Ready but the slice says not: not an endpoint.
        let fixed = SHOP.replace("message: 'containers with unready status: [api]'\n      reason: ContainersNotReady\n      status: \"False\"", "status: \"True\"");
        assert_ne!(fixed, SHOP);
        let t = translate(&objects(&[&fixed]), TD);
        assert!(
            workload(&t, "api-6d5f7c9b8-q8m2z")
                .expect("pod")
                .services
                .is_empty()
        );
        // Both ready: an endpoint.
        let both = fixed.replace(
            "      ready: false\n      serving: false",
            "      ready: true\n      serving: true",
        );
        let t = translate(&objects(&[&both]), TD);
        assert_eq!(
            workload(&t, "api-6d5f7c9b8-q8m2z").expect("pod").services,
            ["shop/api"]
        );
        // Terminating: not an endpoint, whatever else says.
        let mut o = objects(&[&both]);
        let pod = o.pods.get_mut("shop/api-6d5f7c9b8-q8m2z").expect("pod");
        std::sync::Arc::make_mut(pod).metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let t = translate(&o, TD);
        assert!(
            workload(&t, "api-6d5f7c9b8-q8m2z")
                .expect("pod")
                .services
                .is_empty()
        );
    }

    #[test]
    fn namespace_label_changes_move_pods_in_and_out_of_the_mesh() {
        let t = translate(&objects(&[SHOP, BILLING]), TD);
        let ledger = workload(&t, "ledger-0").expect("ledger");
        assert!(!ledger.meshed, "billing has not joined");
        assert_eq!(ledger.services, ["billing/ledger"]);
        // The headless Service: no VIP, its named port resolved from the pod.
        let svc = t
            .specs
            .services
            .iter()
            .find(|s| s.name == "ledger")
            .expect("ledger svc");
        assert!(svc.addresses.is_empty());
        assert_eq!(svc.ports[0].target_port, Some(5432));

        let joined = BILLING.replace(
            "kubernetes.io/metadata.name: billing",
            "kubernetes.io/metadata.name: billing\n    weft.dev/mesh: enabled",
        );
        let left = SHOP.replace("      weft.dev/mesh: enabled\n", "");
        let t = translate(&objects(&[&left, &joined]), TD);
        assert!(workload(&t, "ledger-0").expect("ledger").meshed);
        assert!(
            t.specs
                .workloads
                .iter()
                .filter(|w| w.namespace == "shop")
                .all(|w| !w.meshed)
        );
        // A namespace object that is gone altogether: not meshed either.
        let mut o = objects(&[SHOP]);
        o.namespaces.clear();
        assert!(translate(&o, TD).specs.workloads.iter().all(|w| !w.meshed));
    }

    const POLICIES: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api-from-web, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
    - principals: ["spiffe://cluster.local/ns/shop/sa/web"]
      ports: [8080]
    - namespaces: [shop]
      methods: [GET]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-deletes, namespace: shop}
spec:
  action: DENY
  rules: [{methods: [DELETE], namespaces: [billing]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules: [{principals: ["spiffe://other.domain/ns/shop/sa/web"]}]
"#;

    #[test]
    fn policies_at_l4_and_a_broken_one_fails_closed() {
        let t = translate(&objects(&[SHOP, POLICIES]), TD);
        let p = |name: &str| policy(&t, name);
        let allow = p("api-from-web");
        assert_eq!(allow.rules.len(), 1, "the L7 ALLOW rule cannot match at L4");
        assert_eq!(allow.selector.get("app").map(String::as_str), Some("api"));
        let deny = p("no-deletes");
        assert_eq!(
            (deny.action, deny.rules[0].namespaces.as_slice()),
            (Action::Deny, ["billing".to_owned()].as_slice())
        );
        let broken = p("broken");
        assert_eq!(
            broken.action,
            Action::Deny,
            "a policy weft cannot read denies"
        );
        assert_eq!(t.problems.len(), 1);
        assert!(
            t.problems[0].object == "AuthorizationPolicy shop/broken"
                && t.problems[0].reason.contains("trust domain"),
            "{:?}",
            t.problems
        );

        let model = Model::from_specs(t.specs, TD).expect("valid");
        let web = model.workload("shop", "web-84c6b5d7f4-7kd9s").expect("web");
        let api = model.workload("shop", "api-6d5f7c9b8-x2l4q").expect("api");
        let from = |sa: &str| Identity::new(TD, "shop", sa).expect("id");
        let (web_id, api_id) = (from("web"), from("api"));
        let src = |id| weft_proto::model::Source {
            identity: Some(id),
            ip: "10.244.2.30".parse().expect("ip"),
        };
        use weft_proto::model::Decision;
        assert_eq!(model.authorize(api, src(&web_id), 8080), Decision::Allow);
        assert!(matches!(
            model.authorize(api, src(&api_id), 8080),
            Decision::Deny(_)
        ));
        assert!(
            matches!(model.authorize(web, src(&api_id), 80), Decision::Deny(r) if r.contains("broken"))
        );
    }

    /// `default/kubernetes` as a real API server serves it, and a database
    /// behind a hand-made EndpointSlice: neither becomes a mesh Service, so
    /// their VIPs pass through instead of being refused.
    #[test]
    fn services_without_selectors_are_left_alone() {
        const SELECTORLESS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {kubernetes.io/metadata.name: default, weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata:
  name: kubernetes
  namespace: default
  labels: {component: apiserver, provider: kubernetes}
spec:
  clusterIP: 10.96.0.1
  clusterIPs: [10.96.0.1]
  internalTrafficPolicy: Cluster
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  ports: [{name: https, port: 443, protocol: TCP, targetPort: 6443}]
  sessionAffinity: None
  type: ClusterIP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels: {kubernetes.io/service-name: kubernetes}
addressType: IPv4
endpoints:
  - addresses: [172.18.0.2]
    conditions: {ready: true}
ports: [{name: https, port: 6443, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: orders-db, namespace: default}
spec:
  clusterIP: 10.96.40.7
  selector: {}
  ports: [{port: 5432, protocol: TCP}]
"#;
        let t = translate(&objects(&[SELECTORLESS]), TD);
        assert_eq!(t.problems, vec![]);
        assert!(t.specs.services.is_empty(), "{:?}", t.specs.services);
        let model = Model::from_specs(t.specs, TD).expect("valid");
        assert!(
            model
                .service_by_vip("10.96.0.1".parse().expect("ip"))
                .is_none()
        );
    }

    /// The selector shape a real API server keeps: `In` with one value is
    /// applied; anything else refuses the policy, never widens it.
    #[test]
    fn selector_expressions_apply_or_refuse() {
        const EXPRESSIONS: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: in-one, namespace: shop}
spec:
  selector:
    matchExpressions: [{key: app, operator: In, values: [api]}]
  action: DENY
  rules: [{namespaces: [billing]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: not-in, namespace: shop}
spec:
  selector:
    matchLabels: {tier: back}
    matchExpressions: [{key: app, operator: NotIn, values: [web]}]
  action: ALLOW
  rules: [{namespaces: [shop]}]
"#;
        let t = translate(&objects(&[SHOP, EXPRESSIONS]), TD);
        let p = |name: &str| policy(&t, name);
        let in_one = p("in-one");
        assert_eq!(in_one.action, Action::Deny);
        assert_eq!(in_one.rules[0].namespaces, ["billing"]);
        assert_eq!(
            in_one.selector,
            BTreeMap::from([("app".to_owned(), "api".to_owned())])
        );
        let not_in = p("not-in");
        assert_eq!(
            (not_in.action, not_in.rules.len()),
            (Action::Deny, 1),
            "refused: denies what it names"
        );
        assert!(
            t.problems
                .iter()
                .any(|p| p.object == "AuthorizationPolicy shop/not-in"
                    && p.refused
                    && p.reason.contains("matchExpressions[0]")),
            "{:?}",
            t.problems
        );
        // The CRD the API server validates against keeps the field.
        let crds = super::super::crds::crd_yaml();
        assert!(crds.contains("matchExpressions:"), "{crds}");
    }

    #[test]
    fn waypoints_bind_by_service_or_namespace_label() {
        let yaml = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: shop-waypoint
  namespace: shop
  labels: {weft.dev/for-service-account: api}
spec:
  gatewayClassName: weft-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-split, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api}, {group: "", kind: Service, name: nope}]
  rules:
    - backendRefs: [{name: api, port: 80, weight: 90}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: api-grpc, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 9090}]
  rules: [{matches: [{method: {service: shop.Orders}}], backendRefs: [{name: api, port: 9090}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad-regex, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api}]
  rules: [{matches: [{path: {type: RegularExpression, value: "(unclosed"}}], backendRefs: [{name: api, port: 80}]}]
---
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {name: api-lb, namespace: shop}
spec: {targetRef: {kind: Service, name: api}, loadBalancer: LeastRequest, connectTimeout: 2s, idleTimeout: 5m}
---
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {name: bad-idle, namespace: shop}
spec: {targetRef: {kind: Service, name: api}, idleTimeout: soon}
"#;
        let labelled = crate::source::fixtures::shop_bound_to("shop-waypoint");
        let t = translate(&objects(&[&labelled, yaml]), TD);
        assert_eq!(
            t.waypoints,
            [Waypoint {
                key: "shop/shop-waypoint".into(),
                for_service_account: Some("api".into()),
                services: vec!["shop/api".into()],
                addresses: vec![],
                namespaces: vec![],
                defined: true,
            }]
        );
        // The model carries the binding: the Service, the pods behind it
        // that run as the waypoint's account, and the compiled routes.
        let api = t
            .specs
            .services
            .iter()
            .find(|s| s.name == "api")
            .expect("api");
        assert_eq!(api.waypoint.as_deref(), Some("shop/shop-waypoint"));
        let bound: Vec<&str> = t
            .specs
            .workloads
            .iter()
            .filter(|w| w.waypoint.is_some())
            .map(|w| w.service_account.as_str())
            .collect();
        assert!(
            !bound.is_empty() && bound.iter().all(|sa| *sa == "api"),
            "{bound:?}"
        );
        assert_eq!(t.specs.waypoints.len(), 1);
        assert_eq!(
            t.specs.waypoints[0].service_account, "shop-waypoint",
            "no instance yet"
        );
        let split = t
            .specs
            .routes
            .iter()
            .find(|r| r.name == "api-split")
            .expect("compiled");
        assert_eq!(split.rules[0].backends[0].weight, 90);
        assert_eq!(split.parents.len(), 2);
        let lb = &t.specs.backends[0];
        assert_eq!((lb.service.as_str(), lb.load_balancer), ("shop/api", 1));
        assert_eq!(
            (lb.connect_timeout_ms, lb.idle_timeout_ms),
            (2_000, 300_000)
        );
        assert_eq!(t.specs.backends.len(), 1, "bad-idle is refused");
        assert!(
            t.problems
                .iter()
                .any(|p| p.object.contains("bad-idle") && p.reason.contains("idleTimeout")),
            "{:?}",
            t.problems
        );
        let routes: Vec<(&str, &[String])> = t
            .routes
            .iter()
            .map(|r| (r.key.as_str(), r.parents.as_slice()))
            .collect();
        assert_eq!(
            routes,
            [
                (
                    "HTTPRoute shop/api-split",
                    &["shop/api".to_owned(), "shop/nope".to_owned()][..]
                ),
                ("HTTPRoute shop/bad-regex", &[][..]),
                ("GRPCRoute shop/api-grpc", &["shop/api".to_owned()][..]),
            ]
        );
        // The route that cannot be served is refused alone, saying why; the
        // config with the others still builds.
        let bad = t
            .routes
            .iter()
            .find(|r| r.key == "HTTPRoute shop/bad-regex")
            .expect("listed");
        assert!(
            bad.refused
                .as_deref()
                .is_some_and(|r| r.contains("(unclosed")),
            "{bad:?}"
        );
        assert_eq!(t.problems.len(), 3, "{:?}", t.problems);
        assert!(t.problems.iter().any(|p| p.reason.contains("shop/nope")));
        assert!(t.specs.routes.iter().all(|r| r.name != "bad-regex"));
        Model::from_specs(t.specs, TD).expect("the served routes build a model");
    }

    /// `targetRefs` make a policy the waypoint's (L7, never sent to a
    /// ztunnel); one the waypoint could not read denies every request to
    /// its targets.
    #[test]
    fn target_refs_make_request_policies_and_doubt_denies() {
        let good = r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: api}, {group: gateway.networking.k8s.io, kind: Gateway, name: wp}]
  action: ALLOW
  rules: [{methods: [GET], paths: [/items/*], principals: ["spiffe://cluster.local/ns/shop/sa/web"]}]
"#;
        let t = translate(&objects(&[SHOP, good]), TD);
        assert!(
            t.specs.policies.iter().all(|p| p.name != "l7"),
            "not an L4 policy"
        );
        let p = &t.specs.request_policies[0];
        assert_eq!(
            (p.services.as_slice(), p.waypoints.as_slice()),
            (&["shop/api".to_owned()][..], &["shop/wp".to_owned()][..])
        );
        assert_eq!(p.rules[0].paths, ["/items/*"]);
        assert!(
            t.problems
                .iter()
                .any(|p| p.reason.contains("not a Gateway of class")),
            "{:?}",
            t.problems
        );
        for bad in [
            good.replace("sa/web", "sa/web\", \"spiffe://elsewhere/ns/a/sa/b"),
            good.replace(
                "action: ALLOW",
                "action: ALLOW\n  selector: {matchLabels: {app: api}}",
            ),
            good.replace("paths: [/items/*]", "paths: [items]"),
        ] {
            let t = translate(&objects(&[SHOP, &bad]), TD);
            let p = &t.specs.request_policies[0];
            assert_eq!(p.action, pb::Action::Deny as i32, "{bad}");
            assert_eq!(
                p.rules,
                [pb::RequestRule::default()],
                "denies every request"
            );
            assert!(
                t.problems
                    .iter()
                    .any(|p| p.refused && p.object == "AuthorizationPolicy shop/l7")
            );
        }
    }

    /// A backend in another namespace is used only when a ReferenceGrant
    /// in its namespace lets the route's kind and namespace refer to it;
    /// otherwise its share of requests gets 500 (it stays, marked invalid).
    #[test]
    fn cross_namespace_backends_need_a_reference_grant() {
        let route = include_str!("../../tests/k8s/route-to-ledger.yaml");
        let grant = |from_kind: &str, from_ns: &str, to_name: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\n\
                 metadata: {{name: g, namespace: billing}}\nspec:\n  \
                 from: [{{group: gateway.networking.k8s.io, kind: {from_kind}, namespace: {from_ns}}}]\n  \
                 to: [{{group: \"\", kind: Service{to_name}}}]\n"
            )
        };
        let invalid = |extra: &str| -> String {
            let t = translate(&objects(&[SHOP, BILLING, route, extra]), TD);
            let r = t
                .specs
                .routes
                .iter()
                .find(|r| r.name == "to-ledger")
                .expect("compiled");
            r.rules[0].backends[0].invalid.clone()
        };
        let refused = invalid("");
        assert!(refused.contains("no ReferenceGrant"), "{refused}");
        assert_eq!(
            invalid(&grant("HTTPRoute", "shop", "")),
            "",
            "granted to every Service"
        );
        assert_eq!(
            invalid(&grant("HTTPRoute", "shop", ", name: ledger")),
            "",
            "granted by name"
        );
        for (kind, ns, name) in [
            ("GRPCRoute", "shop", ""),
            ("HTTPRoute", "web", ""),
            ("HTTPRoute", "shop", ", name: journal"),
        ] {
            assert!(
                !invalid(&grant(kind, ns, name)).is_empty(),
                "{kind} {ns} {name}"
            );
        }
        // A grant in the route's own namespace grants nothing.
        let misplaced =
            grant("HTTPRoute", "shop", "").replace("namespace: billing", "namespace: shop");
        assert!(!invalid(&misplaced).is_empty());
        // The v1 spelling reads the same.
        let v1 = grant("HTTPRoute", "shop", "").replace("v1beta1", "v1");
        assert_eq!(invalid(&v1), "");
    }

    #[test]
    fn a_reused_ip_is_reported_not_fatal() {
        let twin = SHOP.replace(
            "podIP: 10.244.2.30\n    podIPs:\n    - ip: 10.244.2.30",
            "podIP: 10.244.1.14\n    podIPs:\n    - ip: 10.244.1.14",
        );
        assert_ne!(twin, SHOP);
        let t = translate(&objects(&[&twin]), TD);
        assert_eq!(t.problems.len(), 1);
        assert!(
            t.problems[0].reason.contains("10.244.1.14"),
            "{:?}",
            t.problems
        );
        Model::from_specs(t.specs, TD).expect("still valid");
    }

    #[test]
    fn documents_that_are_refused_say_why() {
        let cases = [
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [], nodeName: a}\nlables: {a: b}",
                "unknown field lables",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p, lables: {a: b}}",
                "unknown field metadata.lables",
            ),
            (
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}",
                "not a kind weft reads",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {}",
                "metadata.name is required",
            ),
            ("kind: Pod", "without apiVersion and kind"),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: eighty}]}",
                "Service \"s\"",
            ),
            (
                "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: MAYBE}",
                "unknown variant",
            ),
            ("a: [1, 2", "document 1"),
        ];
        for (yaml, want) in cases {
            let err = parse_documents(yaml).expect_err(yaml);
            assert!(err.contains(want), "{yaml}: {err}");
        }
        let ok = parse_documents("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n---\n")
            .expect("ok");
        assert!(matches!(&ok[..], [Object::Service(_)]));
        assert_eq!(
            ok[0].key(),
            "default/s",
            "namespace defaults as kubectl's does"
        );
    }
}
