//! Where config comes from: Kubernetes objects, read from a local directory
//! of YAML files ([`local`]) or watched on an API server ([`kubernetes`]),
//! collected as [`Objects`] and turned into weft's model by one pure
//! function ([`translate`]).

pub mod crds;
pub mod gateway;
pub mod kubernetes;
pub mod local;
pub mod translate;

use std::collections::BTreeMap;
use std::sync::Arc;

use gateway_api::experimental::httproutes::HttpRoute;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

use crds::{AuthorizationPolicy, BackendPolicy, FaultInjection, RateLimit};

/// One Kubernetes object weft reads, shared: sources, snapshots and the
/// translation pass it around without copying it.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    ServiceAccount(Arc<ServiceAccount>),
    Node(Arc<Node>),
    Gateway(Arc<Gateway>),
    HttpRoute(Arc<HttpRoute>),
    GrpcRoute(Arc<GrpcRoute>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    BackendPolicy(Arc<BackendPolicy>),
    FaultInjection(Arc<FaultInjection>),
    RateLimit(Arc<RateLimit>),
    ReferenceGrant(Arc<gateway::ReferenceGrant>),
}

/// (apiVersion, kind) of every kind weft reads.
pub const KINDS: [(&str, &str); 15] = [
    ("v1", "Namespace"),
    ("v1", "Pod"),
    ("v1", "Service"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("v1", "ServiceAccount"),
    ("v1", "Node"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"),
    ("weft.dev/v1alpha1", "AuthorizationPolicy"),
    ("weft.dev/v1alpha1", "BackendPolicy"),
    ("weft.dev/v1alpha1", "FaultInjection"),
    ("weft.dev/v1alpha1", "RateLimit"),
    // Served at v1beta1 by every Gateway API release, at v1 by recent ones.
    ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant"),
    ("gateway.networking.k8s.io/v1", "ReferenceGrant"),
];

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::Node(_) => "Node",
            Object::Gateway(_) => "Gateway",
            Object::HttpRoute(_) => "HTTPRoute",
            Object::GrpcRoute(_) => "GRPCRoute",
            Object::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Object::BackendPolicy(_) => "BackendPolicy",
            Object::FaultInjection(_) => "FaultInjection",
            Object::RateLimit(_) => "RateLimit",
            Object::ReferenceGrant(_) => "ReferenceGrant",
        }
    }

    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
            Object::GrpcRoute(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::BackendPolicy(o) => &o.metadata,
            Object::FaultInjection(o) => &o.metadata,
            Object::RateLimit(o) => &o.metadata,
            Object::ReferenceGrant(o) => &o.metadata,
        }
    }

    pub fn cluster_scoped(&self) -> bool {
        matches!(self, Object::Namespace(_) | Object::Node(_))
    }

    /// `<namespace>/<name>`, or `<name>` for cluster-scoped kinds.
    pub fn key(&self) -> String {
        let meta = self.meta();
        let name = meta.name.clone().unwrap_or_default();
        if self.cluster_scoped() {
            name
        } else {
            format!("{}/{name}", meta.namespace.as_deref().unwrap_or("default"))
        }
    }

    /// `Kind namespace/name`, how errors and the REST API name an object.
    pub fn id(&self) -> String {
        format!("{} {}", self.kind(), self.key())
    }

    /// Parses one YAML (or JSON) document. Fields weft does not know are an
    /// error, as `kubectl apply --validate=strict` makes them: a typo such
    /// as `lables:` must not be silently dropped.
    pub fn from_value(mut doc: Value) -> Result<Object, String> {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_owned();
        let api_version = text(doc.get("apiVersion"));
        let kind = text(doc.get("kind"));
        let name = text(doc.get("metadata").and_then(|m| m.get("name")));
        let what = format!("{kind} {name:?}");
        if kind.is_empty() || api_version.is_empty() {
            return Err("a document without apiVersion and kind".into());
        }
        if name.is_empty() {
            return Err(format!("{kind}: metadata.name is required"));
        }
        validate_name("metadata.name", &name)?;
        if let Some(ns) = doc.get("metadata").and_then(|m| m.get("namespace")) {
            validate_namespace(ns.as_str().unwrap_or("(not a string)"))?;
        }
        if !KINDS.contains(&(api_version.as_str(), kind.as_str())) {
            return Err(format!(
                "{what}: {api_version} {kind} is not a kind weft reads (it reads {})",
                KINDS.iter().map(|(_, k)| *k).collect::<Vec<_>>().join(", ")
            ));
        }
        // Namespaced objects without a namespace go to `default`, as kubectl does.
        let cluster = kind == "Namespace" || kind == "Node";
        if let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut)
            && !cluster
            && !meta.contains_key("namespace")
        {
            meta.insert("namespace".into(), "default".into());
        }
        let original = doc.clone();
        fn typed<T: serde::de::DeserializeOwned>(doc: Value, what: &str) -> Result<Arc<T>, String> {
            serde_json::from_value(doc)
                .map(Arc::new)
                .map_err(|e| format!("{what}: {e}"))
        }
        let object = match kind.as_str() {
            "Namespace" => Object::Namespace(typed(doc, &what)?),
            "Pod" => Object::Pod(typed(doc, &what)?),
            "Service" => Object::Service(typed(doc, &what)?),
            "EndpointSlice" => Object::EndpointSlice(typed(doc, &what)?),
            "ServiceAccount" => Object::ServiceAccount(typed(doc, &what)?),
            "Node" => Object::Node(typed(doc, &what)?),
            "Gateway" => Object::Gateway(typed(doc, &what)?),
            "HTTPRoute" => Object::HttpRoute(typed(doc, &what)?),
            "GRPCRoute" => Object::GrpcRoute(typed(doc, &what)?),
            "AuthorizationPolicy" => Object::AuthorizationPolicy(typed(doc, &what)?),
            "BackendPolicy" => Object::BackendPolicy(typed(doc, &what)?),
            "ReferenceGrant" => Object::ReferenceGrant(typed(doc, &what)?),
            "RateLimit" => Object::RateLimit(typed(doc, &what)?),
            _ => Object::FaultInjection(typed(doc, &what)?),
        };
        let round_trip = object.to_value();
        if let Some(field) = unknown_field(&original, &round_trip, "") {
            return Err(format!("{what}: unknown field {field}"));
        }
        Ok(object)
    }

    /// The object as a YAML value, with apiVersion and kind.
    pub fn to_value(&self) -> Value {
        let v = match self {
            Object::Namespace(o) => serde_json::to_value(&**o),
            Object::Pod(o) => serde_json::to_value(&**o),
            Object::Service(o) => serde_json::to_value(&**o),
            Object::EndpointSlice(o) => serde_json::to_value(&**o),
            Object::ServiceAccount(o) => serde_json::to_value(&**o),
            Object::Node(o) => serde_json::to_value(&**o),
            Object::Gateway(o) => serde_json::to_value(&**o),
            Object::HttpRoute(o) => serde_json::to_value(&**o),
            Object::GrpcRoute(o) => serde_json::to_value(&**o),
            Object::AuthorizationPolicy(o) => serde_json::to_value(&**o),
            Object::BackendPolicy(o) => serde_json::to_value(&**o),
            Object::FaultInjection(o) => serde_json::to_value(&**o),
            Object::RateLimit(o) => serde_json::to_value(&**o),
            Object::ReferenceGrant(o) => serde_json::to_value(&**o),
        };
        v.unwrap_or(Value::Null)
    }
}

/// The first key present in `input` that the typed round trip dropped (a
/// field the type does not have). Nulls and empty values are not reported:
/// serializers omit them.
fn unknown_field(input: &Value, round_trip: &Value, path: &str) -> Option<String> {
    match (input, round_trip) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(key, v)| {
            let here = if path.is_empty() {
                key.to_owned()
            } else {
                format!("{path}.{key}")
            };
            match b.get(key) {
                Some(w) => unknown_field(v, w, &here),
                None if is_empty(v) => None,
                None => Some(here),
            }
        }),
        (Value::Array(a), Value::Array(b)) => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| unknown_field(v, w, &format!("{path}[{i}]"))),
        _ => None,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(s) => s.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Bool(b) => !b,
        _ => false,
    }
}

/// How much work YAML may make the parser do, enforced while parsing
/// (serde-saphyr's budget): nesting (64 levels; a 200 kB body of brackets
/// once held a parser for minutes), nodes, events, scalar bytes and alias
/// expansion (no billion laughs). `nodes` bounds the size: one object for a
/// REST body, a whole `kubectl get -o yaml` List for a file. Errors are one
/// line, without the input echoed back.
fn yaml_options(nodes: usize) -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: 64,
            flow_nesting_limit: 64,
            max_nodes: nodes,
            max_events: 2 * nodes,
            max_documents: nodes / 10,
        },
        with_snippet: false,
    }
}

/// Nodes in one REST body: a large object is a few thousand.
const BODY_NODES: usize = 100_000;
/// Nodes in one file: a List of ~100,000 pods.
const FILE_NODES: usize = 10_000_000;

/// Which document of `yaml` (from 1) the error is in: the `---`
/// separators before its line.
fn document_at(yaml: &str, e: &serde_saphyr::Error) -> usize {
    let line = e.location().map_or(1, |l| l.line() as usize);
    let separators = yaml
        .lines()
        .take(line.saturating_sub(1))
        .filter(|l| l.starts_with("---"))
        .count();
    // A stream that opens with `---` has no document before it.
    let leading = yaml.trim_start().starts_with("---") as usize;
    1 + separators - leading.min(separators)
}

/// Why one object's text (a REST body) was not taken.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not YAML or JSON at all, or shaped to make the parser work too hard.
    #[error("body is not JSON or YAML: {0}")]
    Syntax(String),
    /// YAML, but not one object weft reads.
    #[error("{0}")]
    Invalid(String),
}

/// Exactly one object from a REST body (JSON or YAML), through the same
/// checks a file gets.
pub fn parse_object(text: &str) -> Result<Object, BodyError> {
    let value: Value = serde_saphyr::from_str_with_options(text, yaml_options(BODY_NODES))
        .map_err(|e| BodyError::Syntax(e.to_string()))?;
    Object::from_value(value).map_err(BodyError::Invalid)
}

/// An object name as Kubernetes accepts it: a DNS-1123 subdomain (at most
/// 253 characters of lowercase letters, digits, `-` and `.`, starting and
/// ending with a letter or digit). `..`, slashes, NULs and such never name
/// an object, or a file made from one.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    let ok =
        !name.is_empty() && name.len() <= 253 && name.split('.').all(|part| dns_label(part, 253));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {:?} is not a valid Kubernetes name (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters)",
            name.chars().take(64).collect::<String>()
        ))
    }
}

/// A namespace name: a DNS-1123 label (at most 63 characters, no dots).
pub fn validate_namespace(namespace: &str) -> Result<(), String> {
    if dns_label(namespace, 63) {
        Ok(())
    } else {
        Err(format!(
            "namespace {:?} is not a valid Kubernetes namespace (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)",
            namespace.chars().take(64).collect::<String>()
        ))
    }
}

fn dns_label(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Every document of a YAML stream, parsed; the first bad one fails the
/// whole stream (a file is applied whole or not at all).
pub fn parse_documents(yaml: &str) -> Result<Vec<Object>, String> {
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(yaml, yaml_options(FILE_NODES))
        .map_err(|e| format!("document {}: {e}", document_at(yaml, &e)))?;
    let mut out = Vec::new();
    for (i, value) in docs.into_iter().enumerate() {
        if value.is_null() {
            continue; // an empty document (`---` at the end)
        }
        let at = |e: String| format!("document {}: {e}", i + 1);
        // `kubectl get -o yaml` of several objects prints a v1 List.
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            let items = value.get("items").and_then(Value::as_array).cloned();
            for (j, item) in items.unwrap_or_default().into_iter().enumerate() {
                out.push(Object::from_value(item).map_err(|e| at(format!("items[{j}]: {e}")))?);
            }
            continue;
        }
        out.push(Object::from_value(value).map_err(at)?);
    }
    Ok(out)
}

/// Everything a source currently holds, by kind and key.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub pods: BTreeMap<String, Arc<Pod>>,
    pub services: BTreeMap<String, Arc<Service>>,
    pub endpoint_slices: BTreeMap<String, Arc<EndpointSlice>>,
    pub service_accounts: BTreeMap<String, Arc<ServiceAccount>>,
    pub nodes: BTreeMap<String, Arc<Node>>,
    pub gateways: BTreeMap<String, Arc<Gateway>>,
    pub http_routes: BTreeMap<String, Arc<HttpRoute>>,
    pub grpc_routes: BTreeMap<String, Arc<GrpcRoute>>,
    pub authorization_policies: BTreeMap<String, Arc<AuthorizationPolicy>>,
    pub backend_policies: BTreeMap<String, Arc<BackendPolicy>>,
    pub fault_injections: BTreeMap<String, Arc<FaultInjection>>,
    pub rate_limits: BTreeMap<String, Arc<RateLimit>>,
    pub reference_grants: BTreeMap<String, Arc<gateway::ReferenceGrant>>,
}

impl Objects {
    /// Adds or replaces; returns whether an object of that kind and key was
    /// already there.
    pub fn insert(&mut self, object: Object) -> bool {
        let key = object.key();
        match object {
            Object::Namespace(o) => self.namespaces.insert(key, o).is_some(),
            Object::Pod(o) => self.pods.insert(key, o).is_some(),
            Object::Service(o) => self.services.insert(key, o).is_some(),
            Object::EndpointSlice(o) => self.endpoint_slices.insert(key, o).is_some(),
            Object::ServiceAccount(o) => self.service_accounts.insert(key, o).is_some(),
            Object::Node(o) => self.nodes.insert(key, o).is_some(),
            Object::Gateway(o) => self.gateways.insert(key, o).is_some(),
            Object::HttpRoute(o) => self.http_routes.insert(key, o).is_some(),
            Object::GrpcRoute(o) => self.grpc_routes.insert(key, o).is_some(),
            Object::AuthorizationPolicy(o) => self.authorization_policies.insert(key, o).is_some(),
            Object::BackendPolicy(o) => self.backend_policies.insert(key, o).is_some(),
            Object::FaultInjection(o) => self.fault_injections.insert(key, o).is_some(),
            Object::RateLimit(o) => self.rate_limits.insert(key, o).is_some(),
            Object::ReferenceGrant(o) => self.reference_grants.insert(key, o).is_some(),
        }
    }
}

/// What a source holds and what it could not use, for the REST API.
#[derive(Debug, Clone, Default)]
pub struct SourceStatus {
    /// `local` or `kubernetes`.
    pub source: String,
    /// The directory, or the API server.
    pub location: String,
    /// Local mode: file → (objects served from it, why its latest content was refused).
    pub files: BTreeMap<String, (usize, Option<String>)>,
    pub problems: Vec<translate::Problem>,
    pub waypoints: Vec<translate::Waypoint>,
    pub routes: Vec<translate::Route>,
}

impl SourceStatus {
    pub fn local(dir: &std::path::Path) -> Self {
        SourceStatus {
            source: "local".into(),
            location: dir.display().to_string(),
            ..Default::default()
        }
    }
}

/// Test fixtures the source, state and policy-check tests share.
#[cfg(test)]
pub(crate) mod fixtures {
    /// `tests/k8s/shop.yaml` with Service `shop/api` bound to `waypoint`.
    pub fn shop_bound_to(waypoint: &str) -> String {
        let shop = include_str!("../../tests/k8s/shop.yaml");
        let bound = shop.replace(
            "    name: api\n    namespace: shop\n    resourceVersion: \"1081\"",
            &format!("    name: api\n    namespace: shop\n    labels: {{weft.dev/use-waypoint: {waypoint}}}\n    resourceVersion: \"1081\""),
        );
        assert_ne!(bound, shop, "the fixture still has Service shop/api");
        bound
    }
}
