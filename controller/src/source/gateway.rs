//! Waypoints and routes: `Gateway`s of class `weft-waypoint`, what binds
//! to them, and `HTTPRoute`/`GRPCRoute`s compiled for the waypoint.
//!
//! - A waypoint's instances are the ready pods of its namespace labelled
//!   `gateway.networking.k8s.io/gateway-name: <gateway>` (what Gateway API
//!   controllers label the pods they deploy); it runs as their service
//!   account (the Gateway's name when none runs yet). Its pods are never
//!   captured: they speak HBONE themselves.
//! - `weft.dev/use-waypoint: <gateway>` on a Service binds the Service; on a
//!   pod, the pod; on a Namespace, its Services and pods that the waypoint
//!   serves (all of them, or those of its `weft.dev/for-service-account`).
//!   A pod backing a bound Service is bound too, so it cannot be reached
//!   around the waypoint. The value `none` opts a Service or pod out.
//! - A binding is written as soon as a label asks for it, even while the
//!   waypoint does not exist or has no ready instance: the ztunnels then
//!   refuse bound traffic (fail closed) rather than send it direct.
//! - Routes are read from their Gateway API JSON (the typed objects have
//!   already been checked for unknown fields), so HTTPRoute and GRPCRoute,
//!   rule filters and backend filters share one compiler.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde_json::Value;
use weft_proto::model::WaypointSpec;
use weft_proto::pb::weft::v1 as pb;
use weft_proto::pb::weft::v1::string_match::Kind as MatchKind;

use super::Objects;
use super::translate::{
    FOR_SERVICE_ACCOUNT, Route, Translation, USE_WAYPOINT, WAYPOINT_CLASS, Waypoint, label,
    namespace_of, placement, pod_ready,
};

/// `ReferenceGrant` as every Gateway API release serves it (v1beta1; v1
/// only in recent ones): in the namespace of what is referred to, it lets
/// routes of the namespaces it names send traffic there.
#[derive(kube::CustomResource, serde::Serialize, serde::Deserialize, Clone, Debug, Default)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1beta1",
    kind = "ReferenceGrant",
    plural = "referencegrants",
    namespaced,
    schema = "disabled"
)]
pub struct ReferenceGrantSpec {
    pub from: Vec<gateway_api::referencegrants::ReferenceGrantFrom>,
    pub to: Vec<gateway_api::referencegrants::ReferenceGrantTo>,
}

/// Label Gateway API controllers put on the pods of a Gateway.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Who serves what: each waypoint's scope, and the labels that bind.
#[derive(Debug, Default)]
pub struct Bindings {
    /// Waypoint key → the one service account it serves (`None`: all).
    scope: HashMap<String, Option<String>>,
    /// Namespace → waypoint key its label names.
    by_namespace: HashMap<String, String>,
    /// Service key → waypoint key its label names (`None`: opted out).
    by_service: HashMap<String, Option<String>>,
}

impl Bindings {
    pub fn new(objects: &Objects) -> Bindings {
        let scope = objects
            .gateways
            .iter()
            .filter(|(_, gw)| gw.spec.gateway_class_name == WAYPOINT_CLASS)
            .map(|(key, gw)| {
                let sa = label(&gw.metadata.labels, FOR_SERVICE_ACCOUNT).map(str::to_owned);
                (key.clone(), sa)
            })
            .collect();
        let by_namespace = objects
            .namespaces
            .iter()
            .filter_map(|(ns, o)| {
                let w = label(&o.metadata.labels, USE_WAYPOINT).filter(|w| *w != "none")?;
                Some((ns.clone(), format!("{ns}/{w}")))
            })
            .collect();
        let by_service = objects
            .services
            .iter()
            .filter_map(|(key, svc)| {
                let w = label(&svc.metadata.labels, USE_WAYPOINT)?;
                let bound = (w != "none").then(|| format!("{}/{w}", namespace_of(key)));
                Some((key.clone(), bound))
            })
            .collect();
        Bindings {
            scope,
            by_namespace,
            by_service,
        }
    }

    /// Whether `waypoint` serves workloads running as `sa`; an unknown
    /// waypoint is taken to (so its bindings fail closed).
    fn serves(&self, waypoint: &str, sa: &str) -> bool {
        self.scope
            .get(waypoint)
            .is_none_or(|scope| scope.as_deref().is_none_or(|s| s == sa))
    }

    /// The waypoint a pod is bound to.
    pub fn workload(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        service_account: &str,
        services: &[String],
    ) -> Option<String> {
        match labels.get(USE_WAYPOINT).map(String::as_str) {
            Some("none") => return None,
            Some(w) => return Some(format!("{namespace}/{w}")),
            None => {}
        }
        let by_namespace = self.by_namespace.get(namespace);
        let by_services = services
            .iter()
            .filter_map(|s| self.service_label(s))
            .map(String::as_str);
        by_namespace
            .map(String::as_str)
            .into_iter()
            .chain(by_services)
            .find(|w| self.serves(w, service_account))
            .map(str::to_owned)
    }

    fn service_label(&self, service: &str) -> Option<&String> {
        self.by_service.get(service)?.as_ref()
    }

    /// The waypoint a Service is bound to; `endpoint_accounts` are the
    /// service accounts its endpoints run as.
    pub fn service(&self, key: &str, endpoint_accounts: &[&str]) -> Option<String> {
        if let Some(explicit) = self.by_service.get(key) {
            return explicit.clone();
        }
        let w = self.by_namespace.get(namespace_of(key))?;
        let served = match self.scope.get(w) {
            Some(Some(sa)) => endpoint_accounts.contains(&sa.as_str()),
            _ => true,
        };
        served.then(|| w.clone())
    }
}

/// Whether a pod is an instance of a waypoint (never a captured workload).
pub fn is_waypoint_pod(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    label(&pod.metadata.labels, GATEWAY_NAME_LABEL).is_some()
}

/// Waypoints, their instances, and the routes of bound Services.
pub fn waypoints_and_routes(objects: &Objects, out: &mut Translation) {
    for (key, gw) in &objects.gateways {
        if gw.spec.gateway_class_name != WAYPOINT_CLASS {
            continue;
        }
        let (namespace, name) = key.split_once('/').unwrap_or(("default", key));
        let mut addresses: Vec<IpAddr> = Vec::new();
        let mut account = None;
        for (pkey, pod) in objects.pods.range(format!("{namespace}/")..) {
            if namespace_of(pkey) != namespace {
                break;
            }
            if label(&pod.metadata.labels, GATEWAY_NAME_LABEL) != Some(name) || !pod_ready(pod) {
                continue;
            }
            if let Ok(Some((_, ips))) = placement(pod) {
                addresses.extend(ips.first());
                account = account.or_else(|| pod.spec.as_ref()?.service_account_name.clone());
            }
        }
        let for_service_account =
            label(&gw.metadata.labels, FOR_SERVICE_ACCOUNT).map(str::to_owned);
        let services: Vec<String> = out
            .specs
            .services
            .iter()
            .filter(|s| s.waypoint.as_deref() == Some(key.as_str()))
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect();
        out.waypoints.push(Waypoint {
            key: key.clone(),
            for_service_account: for_service_account.clone(),
            services,
            addresses: addresses.clone(),
            namespaces: bound_namespaces(objects, key),
            defined: true,
        });
        out.specs.waypoints.push(WaypointSpec {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: account.unwrap_or_else(|| name.to_owned()),
            addresses,
            for_service_account,
        });
    }
    undefined_waypoints(objects, out);
    for s in &out.specs.services {
        let Some(w) = &s.waypoint else { continue };
        if !objects.gateways.contains_key(w) {
            let reason = format!(
                "{USE_WAYPOINT}: no waypoint Gateway {w} (gatewayClassName {WAYPOINT_CLASS}); its traffic is refused until there is one"
            );
            out.problems.push(super::translate::Problem {
                object: format!("Service {}/{}", s.namespace, s.name),
                reason,
                refused: false,
            });
        }
    }
    routes(objects, out);
    backends(objects, out);
}

/// BackendPolicy.weft.dev → each Service's load balancing, circuit
/// breaking, outlier detection and connect timeout at the waypoint.
fn backends(objects: &Objects, out: &mut Translation) {
    use pb::backend::LoadBalancer;
    for (key, bp) in &objects.backend_policies {
        let id = format!("BackendPolicy {key}");
        let (namespace, name) = key.split_once('/').unwrap_or(("default", key));
        let t = &bp.spec.target_ref;
        if t.kind != "Service" {
            out.problems.push(super::translate::Problem {
                object: id,
                reason: format!("targetRef kind {} is not supported (Service is)", t.kind),
                refused: true,
            });
            continue;
        }
        let lb = match bp.spec.load_balancer.as_deref() {
            None | Some("RoundRobin") => LoadBalancer::RoundRobin,
            Some("LeastRequest") => LoadBalancer::LeastRequest,
            Some("Random") => LoadBalancer::Random,
            Some(other) => {
                out.problems.push(super::translate::Problem {
                    object: id,
                    reason: format!(
                        "loadBalancer {other:?}: use RoundRobin, LeastRequest or Random"
                    ),
                    refused: true,
                });
                continue;
            }
        };
        let outlier = match bp
            .spec
            .outlier_detection
            .as_ref()
            .map(outlier_detection)
            .transpose()
        {
            Ok(o) => o,
            Err(reason) => {
                out.problems.push(super::translate::Problem {
                    object: id,
                    reason,
                    refused: true,
                });
                continue;
            }
        };
        let timeout = |name: &str, t: &Option<String>| {
            let ms = t.as_ref().map(|t| duration_ms(&Value::String(t.clone())));
            ms.transpose()
                .map(Option::unwrap_or_default)
                .map_err(|e| format!("{name}: {e}"))
        };
        let timeouts = timeout("connectTimeout", &bp.spec.connect_timeout)
            .and_then(|c| Ok((c, timeout("idleTimeout", &bp.spec.idle_timeout)?)));
        let (connect_timeout_ms, idle_timeout_ms) = match timeouts {
            Ok(t) => t,
            Err(reason) => {
                out.problems.push(super::translate::Problem {
                    object: id,
                    reason,
                    refused: true,
                });
                continue;
            }
        };
        let limits = bp.spec.limits.as_ref().map(|l| pb::BackendLimits {
            max_connections: l.max_connections.unwrap_or(0),
            max_pending_requests: l.max_pending_requests.unwrap_or(0),
            max_requests: l.max_requests.unwrap_or(0),
            max_retries: l.max_retries.unwrap_or(0),
        });
        out.specs.backends.push(pb::Backend {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service: format!("{namespace}/{}", t.name),
            load_balancer: lb as i32,
            limits,
            outlier_detection: outlier,
            connect_timeout_ms,
            idle_timeout_ms,
        });
    }
}

/// Namespaces whose `weft.dev/use-waypoint` label names `waypoint`.
fn bound_namespaces(objects: &Objects, waypoint: &str) -> Vec<String> {
    objects
        .namespaces
        .iter()
        .filter(|(ns, o)| {
            label(&o.metadata.labels, USE_WAYPOINT).is_some_and(|w| format!("{ns}/{w}") == waypoint)
        })
        .map(|(ns, _)| ns.clone())
        .collect()
}

/// Waypoints a label names but no Gateway defines: reported, so what binds
/// to them is seen to be refused.
fn undefined_waypoints(objects: &Objects, out: &mut Translation) {
    let mut named: Vec<String> = out
        .specs
        .services
        .iter()
        .filter_map(|s| s.waypoint.clone())
        .chain(objects.namespaces.iter().filter_map(|(ns, o)| {
            let w = label(&o.metadata.labels, USE_WAYPOINT).filter(|w| *w != "none")?;
            Some(format!("{ns}/{w}"))
        }))
        .filter(|w| !objects.gateways.contains_key(w))
        .collect();
    named.sort();
    named.dedup();
    for key in named {
        out.waypoints.push(Waypoint {
            services: out
                .specs
                .services
                .iter()
                .filter(|s| s.waypoint.as_deref() == Some(key.as_str()))
                .map(|s| format!("{}/{}", s.namespace, s.name))
                .collect(),
            namespaces: bound_namespaces(objects, &key),
            key,
            for_service_account: None,
            addresses: Vec::new(),
            defined: false,
        });
    }
}

fn routes(objects: &Objects, out: &mut Translation) {
    let http = objects.http_routes.iter().map(|(k, r)| {
        let value = serde_json::to_value(&r.spec).unwrap_or(Value::Null);
        ("HTTPRoute", k, value, r.metadata.creation_timestamp.clone())
    });
    let grpc = objects.grpc_routes.iter().map(|(k, r)| {
        let value = serde_json::to_value(&r.spec).unwrap_or(Value::Null);
        ("GRPCRoute", k, value, r.metadata.creation_timestamp.clone())
    });
    let all: Vec<_> = http.chain(grpc).collect();
    for (kind, key, spec, created) in all {
        let id = format!("{kind} {key}");
        let created = created.map_or(0, |t| t.0.as_second());
        // Checked here with the proxies' own matcher compiler, so a route
        // that cannot be served (a bad regex) is refused alone and reported
        // on the route; the rest of the config serves.
        let compiled = compile(kind, key, &spec, created, objects)
            .and_then(|r| weft_proto::routes::compile(&r).map(|_| r));
        let route = match compiled {
            Ok(route) => route,
            Err(reason) => {
                let reason = format!("{reason}; the route is not served");
                out.problems.push(super::translate::Problem {
                    object: id.clone(),
                    reason: reason.clone(),
                    refused: true,
                });
                out.routes.push(Route {
                    key: id,
                    parents: Vec::new(),
                    rules: 0,
                    refused: Some(reason),
                });
                continue;
            }
        };
        let parents: Vec<String> = route.parents.iter().map(|p| p.service.clone()).collect();
        for p in &parents {
            if !objects.services.contains_key(p) {
                out.problems.push(super::translate::Problem {
                    object: id.clone(),
                    reason: format!("parentRef Service {p} does not exist"),
                    refused: false,
                });
            }
        }
        out.routes.push(Route {
            key: id,
            parents,
            rules: route.rules.len(),
            refused: None,
        });
        if !route.parents.is_empty() {
            out.specs.routes.push(route);
        }
    }
}

/// One route's Gateway API spec (as JSON) compiled for the waypoint.
fn compile(
    kind: &str,
    key: &str,
    spec: &Value,
    created: i64,
    objects: &Objects,
) -> Result<pb::Route, String> {
    let namespace = namespace_of(key);
    let parents = spec["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["kind"].as_str() == Some("Service"))
        .map(|p| pb::ParentRef {
            service: format!(
                "{}/{}",
                p["namespace"].as_str().unwrap_or(namespace),
                str_of(&p["name"])
            ),
            port: p["port"].as_u64().unwrap_or(0) as u32,
        })
        .collect();
    let rules = spec["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| rule(kind, namespace, r, objects).map_err(|e| format!("rules[{i}]: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(pb::Route {
        name: key.split_once('/').map_or(key, |(_, n)| n).to_owned(),
        namespace: namespace.to_owned(),
        kind: kind.to_owned(),
        parents,
        created,
        rules,
    })
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn rule(
    kind: &str,
    namespace: &str,
    r: &Value,
    objects: &Objects,
) -> Result<pb::RouteRule, String> {
    let matches = r["matches"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| route_match(kind, m))
        .collect::<Result<_, _>>()?;
    let backends = r["backendRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| backend((kind, namespace), b, objects))
        .collect::<Result<_, _>>()?;
    let timeouts = &r["timeouts"];
    // `retry` is experimental through Gateway API v1.6, standard from v1.7.
    let retry = &r["retry"];
    Ok(pb::RouteRule {
        name: str_of(&r["name"]).to_owned(),
        matches,
        filters: filters(namespace, &r["filters"], objects)?,
        backends,
        request_timeout_ms: duration_ms(&timeouts["request"])?,
        backend_timeout_ms: duration_ms(&timeouts["backendRequest"])?,
        retry: (!retry.is_null())
            .then(|| -> Result<_, String> {
                Ok(pb::RouteRetry {
                    attempts: retry["attempts"].as_u64().unwrap_or(0) as u32,
                    codes: retry["codes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|c| c.as_u64().map(|c| c as u32))
                        .collect(),
                    backoff_ms: duration_ms(&retry["backoff"])?,
                })
            })
            .transpose()?,
    })
}

fn string_match(kind: Option<&str>, value: &str) -> Result<pb::StringMatch, String> {
    let kind = match kind.unwrap_or("Exact") {
        "Exact" => MatchKind::Exact,
        "PathPrefix" => MatchKind::Prefix,
        "RegularExpression" => MatchKind::Regex,
        other => return Err(format!("match type {other:?} is not supported")),
    };
    Ok(pb::StringMatch {
        kind: kind as i32,
        value: value.to_owned(),
    })
}

fn named(list: &Value) -> Result<Vec<pb::NamedMatch>, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            Ok(pb::NamedMatch {
                name: str_of(&h["name"]).to_owned(),
                value: Some(string_match(h["type"].as_str(), str_of(&h["value"]))?),
            })
        })
        .collect()
}

fn route_match(kind: &str, m: &Value) -> Result<pb::RouteMatch, String> {
    let mut out = pb::RouteMatch {
        headers: named(&m["headers"])?,
        query: named(&m["queryParams"])?,
        ..Default::default()
    };
    if kind == "GRPCRoute" {
        let method = &m["method"];
        let t = method["type"].as_str();
        let opt = |f: &str| -> Result<Option<pb::StringMatch>, String> {
            method[f].as_str().map(|v| string_match(t, v)).transpose()
        };
        out.grpc_service = opt("service")?;
        out.grpc_method = opt("method")?;
    } else {
        let path = &m["path"];
        if !path.is_null() {
            let value = path["value"].as_str().unwrap_or("/");
            out.path = Some(string_match(
                path["type"].as_str().or(Some("PathPrefix")),
                value,
            )?);
        }
        out.method = str_of(&m["method"]).to_owned();
    }
    Ok(out)
}

/// Whether a ReferenceGrant in the backend Service's namespace lets
/// `route_kind` routes of `from` send traffic to it (Gateway API: a
/// reference across namespaces needs the consent of the one referred to).
fn granted(objects: &Objects, (route_kind, from): (&str, &str), service: &str) -> bool {
    let (to_ns, name) = service.split_once('/').unwrap_or(("", service));
    objects
        .reference_grants
        .values()
        .filter(|g| g.metadata.namespace.as_deref() == Some(to_ns))
        .any(|g| {
            let from_ok = g.spec.from.iter().any(|f| {
                f.group == "gateway.networking.k8s.io"
                    && f.kind == route_kind
                    && f.namespace == from
            });
            let to_ok = g.spec.to.iter().any(|t| {
                t.group.is_empty()
                    && t.kind == "Service"
                    && t.name.as_deref().is_none_or(|n| n == name)
            });
            from_ok && to_ok
        })
}

fn backend(
    (route_kind, namespace): (&str, &str),
    b: &Value,
    objects: &Objects,
) -> Result<pb::RouteBackend, String> {
    let service = format!(
        "{}/{}",
        b["namespace"].as_str().unwrap_or(namespace),
        str_of(&b["name"])
    );
    let kind = b["kind"].as_str().unwrap_or("Service");
    let group = b["group"].as_str().unwrap_or("");
    // An unusable backend keeps its weight: its share of requests gets 500.
    let invalid = if kind != "Service" || !(group.is_empty() || group == "core") {
        format!("backend kind {group}/{kind} is not supported")
    } else if namespace_of(&service) != namespace
        && !granted(objects, (route_kind, namespace), &service)
    {
        format!(
            "backend {service} is in another namespace and no ReferenceGrant there lets {route_kind}s of {namespace} refer to it"
        )
    } else if !objects.services.contains_key(&service) {
        format!("backend Service {service} does not exist")
    } else if b["port"].is_null() {
        format!("backend {service} names no port")
    } else {
        String::new()
    };
    Ok(pb::RouteBackend {
        service,
        port: b["port"].as_u64().unwrap_or(0) as u32,
        weight: b["weight"].as_u64().unwrap_or(1) as u32,
        invalid,
        filters: filters(namespace, &b["filters"], objects)?,
    })
}

fn outlier_detection(o: &super::crds::OutlierDetection) -> Result<pb::OutlierDetection, String> {
    let base = duration_ms(&Value::String(o.base_ejection_time.clone()))
        .map_err(|e| format!("outlierDetection.baseEjectionTime: {e}"))?;
    let percent = o.max_ejection_percent.unwrap_or(10);
    if percent > 100 {
        return Err(format!(
            "outlierDetection.maxEjectionPercent {percent} is over 100"
        ));
    }
    Ok(pb::OutlierDetection {
        consecutive_5xx: o.consecutive5xx,
        base_ejection_ms: base,
        max_ejection_percent: percent,
    })
}

fn header_modifier(m: &Value) -> pb::HeaderModifier {
    let pairs = |v: &Value| -> Vec<pb::NameValue> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|p| pb::NameValue {
                name: str_of(&p["name"]).to_owned(),
                value: str_of(&p["value"]).to_owned(),
            })
            .collect()
    };
    pb::HeaderModifier {
        set: pairs(&m["set"]),
        add: pairs(&m["add"]),
        remove: m["remove"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| str_of(s).to_owned())
            .collect(),
    }
}

fn path_modifier(p: &Value) -> (Option<String>, Option<String>) {
    match p["type"].as_str() {
        Some("ReplaceFullPath") => (p["replaceFullPath"].as_str().map(str::to_owned), None),
        Some("ReplacePrefixMatch") => (None, p["replacePrefixMatch"].as_str().map(str::to_owned)),
        _ => (None, None),
    }
}

fn filters(
    namespace: &str,
    list: &Value,
    objects: &Objects,
) -> Result<Vec<pb::RouteFilter>, String> {
    use pb::route_filter::Filter;
    let mut out = Vec::new();
    for f in list.as_array().into_iter().flatten() {
        let filter = match str_of(&f["type"]) {
            "RequestHeaderModifier" => {
                Filter::RequestHeaders(header_modifier(&f["requestHeaderModifier"]))
            }
            "ResponseHeaderModifier" => {
                Filter::ResponseHeaders(header_modifier(&f["responseHeaderModifier"]))
            }
            "RequestRedirect" => {
                let r = &f["requestRedirect"];
                let (path_full, path_prefix) = path_modifier(&r["path"]);
                Filter::Redirect(pb::Redirect {
                    scheme: str_of(&r["scheme"]).to_owned(),
                    hostname: str_of(&r["hostname"]).to_owned(),
                    path_full,
                    path_prefix,
                    port: r["port"].as_u64().unwrap_or(0) as u32,
                    status: r["statusCode"].as_u64().unwrap_or(302) as u32,
                })
            }
            "URLRewrite" => {
                let r = &f["urlRewrite"];
                let (path_full, path_prefix) = path_modifier(&r["path"]);
                Filter::Rewrite(pb::Rewrite {
                    hostname: str_of(&r["hostname"]).to_owned(),
                    path_full,
                    path_prefix,
                })
            }
            "RequestMirror" => {
                let m = &f["requestMirror"];
                let b = &m["backendRef"];
                let percent = m["percent"].as_u64().map(|p| p as u32).or_else(|| {
                    let fr = &m["fraction"];
                    let num = fr["numerator"].as_u64()?;
                    let den = fr["denominator"].as_u64().unwrap_or(100).max(1);
                    Some((num * 100 / den) as u32)
                });
                Filter::Mirror(pb::Mirror {
                    service: format!(
                        "{}/{}",
                        b["namespace"].as_str().unwrap_or(namespace),
                        str_of(&b["name"])
                    ),
                    port: b["port"].as_u64().unwrap_or(0) as u32,
                    percent,
                })
            }
            "ExtensionRef" => extension(namespace, &f["extensionRef"], objects)?,
            other => return Err(format!("filter {other:?} is not supported yet")),
        };
        out.push(pb::RouteFilter {
            filter: Some(filter),
        });
    }
    Ok(out)
}

/// An `ExtensionRef` filter: a `FaultInjection.weft.dev` or a
/// `RateLimit.weft.dev` in the route's namespace.
fn extension(
    namespace: &str,
    r: &Value,
    objects: &Objects,
) -> Result<pb::route_filter::Filter, String> {
    use pb::route_filter::Filter;
    let (group, kind, name) = (str_of(&r["group"]), str_of(&r["kind"]), str_of(&r["name"]));
    let key = format!("{namespace}/{name}");
    match (group, kind) {
        ("weft.dev", "FaultInjection") => Ok(Filter::Fault(fault(&key, objects)?)),
        ("weft.dev", "RateLimit") => Ok(Filter::RateLimit(rate_limit(&key, objects)?)),
        _ => Err(format!(
            "extensionRef {group}/{kind} is not supported (weft.dev/FaultInjection and weft.dev/RateLimit are)"
        )),
    }
}

fn rate_limit(key: &str, objects: &Objects) -> Result<pb::RateLimit, String> {
    let r = objects
        .rate_limits
        .get(key)
        .ok_or_else(|| format!("RateLimit {key} does not exist"))?;
    let interval_ms = duration_ms(&Value::String(r.spec.interval.clone()))?;
    if interval_ms == 0 || r.spec.requests == 0 {
        return Err(format!(
            "RateLimit {key}: requests and interval must be above zero"
        ));
    }
    Ok(pb::RateLimit {
        key: key.to_owned(),
        requests: r.spec.requests,
        interval_ms,
        burst: r.spec.burst.unwrap_or(r.spec.requests).max(1),
        per_source: r.spec.per_source,
    })
}

fn fault(key: &str, objects: &Objects) -> Result<pb::Fault, String> {
    let f = objects
        .fault_injections
        .get(key)
        .ok_or_else(|| format!("FaultInjection {key} does not exist"))?;
    let percent = |p: f64| p.clamp(0.0, 100.0).round() as u32;
    let mut out = pb::Fault::default();
    if let Some(d) = &f.spec.delay {
        out.delay_ms = duration_ms(&Value::String(d.fixed.clone()))?;
        out.delay_percent = percent(d.percentage);
    }
    if let Some(a) = &f.spec.abort {
        out.abort_status = u32::from(a.http_status.unwrap_or(0));
        out.abort_grpc_status = u32::from(a.grpc_status.unwrap_or(0));
        out.abort_percent = percent(a.percentage);
    }
    Ok(out)
}

/// A Gateway API duration (`1h`, `30s`, `500ms`, `1m30s`) in milliseconds;
/// absent is 0 (none).
fn duration_ms(v: &Value) -> Result<u64, String> {
    let Some(s) = v.as_str() else { return Ok(0) };
    let bad = || format!("duration {s:?} is not like 10s, 500ms or 1m30s");
    let mut total = 0u64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else {
            match rest.as_bytes().first() {
                Some(b'h') => (3_600_000, 1),
                Some(b'm') => (60_000, 1),
                Some(b's') => (1_000, 1),
                _ => return Err(bad()),
            }
        };
        total = total.saturating_add(n.saturating_mul(unit));
        rest = &rest[len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s: &str| duration_ms(&Value::String(s.into()));
        assert_eq!(d("10s"), Ok(10_000));
        assert_eq!(d("500ms"), Ok(500));
        assert_eq!(d("1m30s"), Ok(90_000));
        assert_eq!(d("1h"), Ok(3_600_000));
        assert!(d("10").is_err() && d("s").is_err() && d("5d").is_err());
        assert_eq!(duration_ms(&Value::Null), Ok(0));
    }
}
