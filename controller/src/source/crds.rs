//! weft's own Kubernetes kinds (`weft.dev/v1alpha1`). The Rust types are the
//! source of truth: `kubectl weft install` prints the CRDs generated from
//! them, and the local directory accepts the same shapes.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// L4 (ztunnel) and L7 (waypoint) authorization for the workloads it selects.
///
/// ```yaml
/// apiVersion: weft.dev/v1alpha1
/// kind: AuthorizationPolicy
/// metadata: {name: api-from-web, namespace: shop}
/// spec:
///   selector: {matchLabels: {app: api}}
///   action: ALLOW
///   rules:
///     - principals: ["spiffe://cluster.local/ns/shop/sa/web"]
///       ports: [8080]
/// ```
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Workloads in the policy's namespace it applies to, at L4 in their
    /// ztunnel; absent (and no `targetRefs`): all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// What a waypoint enforces it for, on each request with the client's
    /// verified identity: Services (`group: ""`, `kind: Service`) or a
    /// waypoint's Gateway (`group: gateway.networking.k8s.io`, `kind:
    /// Gateway`: everything it serves), in the policy's namespace. Not
    /// together with `selector`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetRef>,
    pub action: PolicyAction,
    /// A connection matches when any rule matches; a rule matches when every
    /// field it sets matches.
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Kubernetes' full selector shape, so the API server keeps it (a CRD
    /// schema without it prunes the field and the policy would widen).
    /// weft applies `In` with one value; any other expression refuses the
    /// policy (deny on doubt, reported).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    /// In, NotIn, Exists or DoesNotExist.
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    /// Source SPIFFE identities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Source namespaces (of the peer's identity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Source addresses, as IPs or CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    /// Destination (target) ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// L7 (at a waypoint, with `targetRefs`): HTTP methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// L7: request paths, after normalisation: exact, `prefix*`, `*suffix`
    /// or `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// L7: Host / :authority values (no port, any case; `*.suffix`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// L7: request headers that must be present with these values (exact,
    /// `prefix*`, `*suffix`, `*`); a header sent more than once must match
    /// on every value for an ALLOW, on any for a DENY.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl PolicyRule {
    pub fn has_l7(&self) -> bool {
        !(self.methods.is_empty()
            && self.paths.is_empty()
            && self.hosts.is_empty()
            && self.headers.is_empty())
    }
}

/// Per-backend traffic policy for a Service, applied by waypoints.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "BackendPolicy",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendPolicySpec {
    pub target_ref: TargetRef,
    /// RoundRobin (default), LeastRequest or Random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// e.g. `2s`: how long a connection to an endpoint may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// e.g. `5m`: how long a pooled connection to an endpoint may sit
    /// unused before the waypoint closes it (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// Only `Service` today.
    pub kind: String,
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// HTTP/1.1 exchanges in flight to the Service (each holds one
    /// upstream connection).
    pub max_connections: Option<u32>,
    /// Requests that may wait once `maxRequests` are in flight; past it,
    /// 503 `UO` at once.
    pub max_pending_requests: Option<u32>,
    /// Requests in flight to the Service.
    pub max_requests: Option<u32>,
    /// Retries in flight to the Service.
    pub max_retries: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (or connect failures) that eject an endpoint.
    pub consecutive5xx: u32,
    /// e.g. `30s`: the first ejection; the n-th lasts n times as long.
    pub base_ejection_time: String,
    /// At most this share of the endpoints ejected at once (default 10;
    /// one endpoint always stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

/// A fault an HTTPRoute's `ExtensionRef` filter injects.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "FaultInjection",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultInjectionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delay {
    /// e.g. `500ms`.
    pub fixed: String,
    pub percentage: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Abort {
    pub http_status: Option<u16>,
    pub grpc_status: Option<u16>,
    pub percentage: f64,
}

/// A local rate limit an HTTPRoute's `ExtensionRef` filter applies (on a
/// rule: its requests; on a backendRef: the requests sent to that
/// backend), kept by each waypoint instance: over it, 429 with
/// `retry-after`.
///
/// ```yaml
/// apiVersion: weft.dev/v1alpha1
/// kind: RateLimit
/// metadata: {name: ten-per-second, namespace: shop}
/// spec: {requests: 10, interval: 1s, burst: 20, perSource: true}
/// ```
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "RateLimit",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Requests allowed per `interval`, on average.
    pub requests: u32,
    /// e.g. `1s`, `1m`.
    pub interval: String,
    /// Requests allowed at once after a quiet spell (default `requests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One budget per client identity rather than one for everyone.
    #[serde(default)]
    pub per_source: bool,
}

/// The CRD manifests, as `kubectl weft install` prints them.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    [
        AuthorizationPolicy::crd(),
        BackendPolicy::crd(),
        FaultInjection::crd(),
        RateLimit::crd(),
    ]
    .iter()
    .map(|crd| serde_saphyr::to_string(crd).unwrap_or_default())
    .collect::<Vec<_>>()
    .join("---\n")
}
