//! `kubectl weft policy check`: whether a client may reach a destination,
//! and which policy and rule decide, at each layer the traffic crosses —
//! by the proxies' own code (`Model::authorize` for the ztunnel,
//! `weft_proto::request_policy` for the waypoint) on the config served.

use std::sync::Arc;

use serde_json::{Value, json};
use weft_proto::model::{Decision, Model, Source, Workload};
use weft_proto::request_policy as rp;

/// What to check.
pub struct Request<'a> {
    /// The client workload, `namespace/name`.
    pub from: &'a str,
    /// A Service or workload, `namespace/name`.
    pub to: &'a str,
    pub port: u16,
    pub path: &'a str,
    pub method: &'a str,
    /// The Host the client sends; default the Service's name.
    pub host: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

/// The decision at L7 (the destination's waypoint, if any) and at L4 (the
/// ztunnel of each endpoint), and overall.
pub fn check(model: &Model, r: &Request<'_>) -> Result<Value, String> {
    let src = model
        .workload_by_key(r.from)
        .ok_or_else(|| format!("no workload {} in the config served", r.from))?;
    let (services, endpoints, l4_port, waypoint) = destination(model, r)?;
    let l7 = match &waypoint {
        None => json!({"applies": false, "allowed": true,
            "reason": "no waypoint in the way: no L7 policy applies"}),
        Some(w) => layer7(model, r, src, (&services, w)),
    };
    // The endpoint's ztunnel sees the waypoint when there is one.
    let (identity, ip) = match waypoint.as_deref().and_then(|w| model.waypoint(w)) {
        Some(w) => (&w.identity, w.addresses.first().copied()),
        None => (&src.identity, src.addresses.first().copied()),
    };
    let ip = ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let l4: Vec<Value> = endpoints
        .iter()
        .map(|w| {
            let from = Source {
                identity: Some(identity),
                ip,
            };
            let (allowed, reason) = match model.authorize(w, from, l4_port) {
                Decision::Allow => (
                    true,
                    match model.allowing_policy(w, from, l4_port) {
                        Some(p) => format!("ALLOW policy {p}"),
                        None => "no policy applies".to_owned(),
                    },
                ),
                Decision::Deny(why) => (false, why),
            };
            json!({"workload": w.key, "as": identity.to_string(), "port": l4_port,
                "allowed": allowed, "reason": reason})
        })
        .collect();
    let allowed =
        l7["allowed"] == true && !l4.is_empty() && l4.iter().all(|d| d["allowed"] == true);
    Ok(
        json!({"allowed": allowed, "from": src.key, "to": r.to, "port": r.port,
        "waypoint": waypoint, "l7": l7, "l4": l4}),
    )
}

type Destination = (Vec<String>, Vec<Arc<Workload>>, u16, Option<String>);

/// The Services a request counts as reaching, the endpoints it may land
/// on, the port they see, and the waypoint in the way.
fn destination(model: &Model, r: &Request<'_>) -> Result<Destination, String> {
    if let Some(svc) = model.service(r.to) {
        let target = svc
            .target_port(r.port)
            .ok_or_else(|| format!("Service {} has no port {}", r.to, r.port))?;
        let endpoints = svc.endpoints().to_vec();
        let waypoint = svc
            .waypoint
            .clone()
            .or_else(|| endpoints.iter().find_map(|w| w.waypoint.clone()));
        return Ok((vec![svc.key.clone()], endpoints, target, waypoint));
    }
    let w = model
        .workload_by_key(r.to)
        .ok_or_else(|| format!("no Service or workload {} in the config served", r.to))?;
    Ok((
        w.services.clone(),
        vec![w.clone()],
        r.port,
        w.waypoint.clone(),
    ))
}

fn layer7(
    model: &Model,
    r: &Request<'_>,
    src: &Workload,
    (services, waypoint): (&[String], &str),
) -> Value {
    let path = match rp::normalize_path(r.path) {
        Ok(p) => p,
        Err(e) => {
            return json!({"applies": true, "allowed": false, "waypoint": waypoint,
                "reason": format!("400 DPE: {e}")});
        }
    };
    let default_host = r.to.split('/').nth(1).unwrap_or(r.to);
    let host = rp::normalize_host(r.host.unwrap_or(default_host));
    let services: Vec<&str> = services.iter().map(String::as_str).collect();
    let d = rp::judge_at(
        &model.request_policies,
        (&services, waypoint),
        &rp::Request {
            identity: Some(&src.identity),
            ip: src
                .addresses
                .first()
                .copied()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
            port: r.port,
            method: r.method,
            path: &path,
            host: &host,
            headers: r.headers,
        },
    );
    json!({"applies": true, "allowed": d.allowed, "waypoint": waypoint, "policy": d.policy,
        "rule": d.rule, "reason": d.reason, "path": path})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Objects, parse_documents, translate::translate};

    const L4: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api-from-web, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules: [{principals: ["spiffe://cluster.local/ns/shop/sa/web"]}]
"#;

    const WAYPOINT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: weft-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: api}]
  action: DENY
  rules: [{paths: [/admin/*]}]
"#;

    fn model(docs: &[&str]) -> Model {
        let mut objects = Objects::default();
        for y in docs {
            for o in parse_documents(y).expect("valid YAML") {
                objects.insert(o);
            }
        }
        let t = translate(&objects, "cluster.local");
        Model::from_specs(t.specs, "cluster.local").expect("model")
    }

    fn ask(model: &Model, from: &str, path: &str) -> Value {
        let headers = http::HeaderMap::new();
        let r = Request {
            from,
            to: "shop/api",
            port: 80,
            path,
            method: "GET",
            host: None,
            headers: &headers,
        };
        check(model, &r).expect("checked")
    }

    const WEB: &str = "shop/web-84c6b5d7f4-7kd9s";

    #[test]
    fn names_the_deciding_policy_at_each_layer() {
        let shop = include_str!("../tests/k8s/shop.yaml");
        // L4 only: web is allowed by name; another client is not.
        let m = model(&[shop, L4]);
        let v = ask(&m, WEB, "/");
        assert_eq!(v["allowed"], true, "{v}");
        assert_eq!(
            v["l4"][0]["reason"], "ALLOW policy shop/api-from-web",
            "{v}"
        );
        assert_eq!(v["l7"]["applies"], false);
        let other = m
            .workloads
            .iter()
            .find(|w| w.identity.service_account() != "web" && w.meshed)
            .expect("another client");
        let v = ask(&m, &other.key, "/");
        assert_eq!(
            (v["allowed"].clone(), v["l4"][0]["reason"].clone()),
            (json!(false), json!("no ALLOW policy matched")),
            "{v}"
        );

        // With a waypoint: L7 judges web; api's ztunnel then sees the
        // waypoint, which the L4 policy does not name.
        let bound = crate::source::fixtures::shop_bound_to("wp");
        let m = model(&[&bound, L4, WAYPOINT]);
        let v = ask(&m, WEB, "/x/../admin/users");
        assert_eq!(v["l7"]["allowed"], false, "{v}");
        assert_eq!(v["l7"]["reason"], "DENY policy shop/no-admin rule 0", "{v}");
        assert_eq!(v["l7"]["path"], "/admin/users");
        let v = ask(&m, WEB, "/items");
        assert_eq!(v["l7"]["allowed"], true, "{v}");
        assert_eq!(
            v["l4"][0]["as"], "spiffe://cluster.local/ns/shop/sa/wp",
            "{v}"
        );
        assert_eq!(
            v["allowed"], false,
            "the waypoint is not allowed at L4: {v}"
        );
        assert!(
            ask(&m, WEB, "/a%2Fb")["l7"]["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("400 DPE")
        );
    }
}
