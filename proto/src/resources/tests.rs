use super::*;
use crate::pb::weft::v1 as pb;

/// Resources by type as the wire carries them (type URL → name → body).
type Wire = BTreeMap<String, BTreeMap<String, prost_types::Any>>;

/// A whole model from resources, decoded one by one through the table and
/// applied to an empty model: the oracle the tests compare against.
fn decode(resources: &Wire, trust_domain: &str) -> Result<Model, ModelError> {
    let mut changes = Changes::default();
    for (type_url, named) in resources {
        let kind = kind(type_url).expect("a served kind");
        for (name, any) in named {
            kind.decode_into(name, any, trust_domain, &mut changes)?;
        }
    }
    Model::default().apply(changes)
}

fn wire(resources: &Resources) -> Wire {
    resources
        .iter()
        .map(|(t, rs)| {
            let named = rs
                .iter()
                .map(|(n, r)| (n.clone(), r.body.clone()))
                .collect();
            ((*t).to_owned(), named)
        })
        .collect()
}

const YAML: &str = r#"
workloads:
  - {name: web, serviceAccount: web, node: a, addresses: [10.0.1.2], labels: {app: web}}
  - {name: api, serviceAccount: api, node: b, addresses: [10.0.2.2, "fd00::2"], services: [default/api]}
services:
  - {name: api, addresses: [10.96.0.10], ports: [{port: 80, targetPort: 8080}]}
policies:
  - {name: p, action: DENY, selector: {app: api}, rules: [{principals: ["spiffe://cluster.local/ns/default/sa/db"], ipBlocks: [10.0.0.0/8], ports: [8080]}]}
"#;

/// Two or more objects of every kind ...
const BEFORE: &str = r#"
workloads:
  - {name: web, serviceAccount: web, node: a, addresses: [10.0.1.2], labels: {app: web}}
  - {name: api, serviceAccount: api, node: b, addresses: [10.0.2.2], services: [default/api]}
  - {name: old, node: b, addresses: [10.0.2.9]}
services:
  - {name: api, addresses: [10.96.0.10], ports: [{port: 80, targetPort: 8080}]}
  - {name: old, addresses: [10.96.0.99], ports: [{port: 80}]}
policies:
  - {name: p, action: DENY, selector: {app: api}, rules: [{ports: [8080]}]}
  - {name: old, action: ALLOW, rules: [{namespaces: [default]}]}
waypoints:
  - {name: wp, serviceAccount: wp, addresses: [10.0.3.1]}
  - {name: old, serviceAccount: old}
"#;

/// ... and of every kind one changed, one removed and one added.
const AFTER: &str = r#"
workloads:
  - {name: web, serviceAccount: web, node: a, addresses: [10.0.1.3], labels: {app: web}}
  - {name: api, serviceAccount: api, node: b, addresses: [10.0.2.2], services: [default/api]}
  - {name: new, node: a, addresses: [10.0.1.9]}
services:
  - {name: api, addresses: [10.96.0.10], ports: [{port: 80, targetPort: 8081, appProtocol: http}]}
  - {name: new, addresses: [10.96.0.77], ports: [{port: 443}]}
policies:
  - {name: p, action: DENY, selector: {app: api}, rules: [{ports: [8080, 9090]}]}
  - {name: new, action: ALLOW, rules: [{principals: ["spiffe://cluster.local/ns/default/sa/web"]}]}
waypoints:
  - {name: wp, serviceAccount: wp, addresses: [10.0.3.2], forServiceAccount: api}
  - {name: new, serviceAccount: new}
"#;

/// A model from YAML plus routes (routes are compiled by the controller,
/// never written in the model's YAML): `(name, path prefix)` each.
fn model_with(yaml: &str, routes: &[(&str, &str)]) -> Model {
    let mut m = Model::from_yaml(yaml, "cluster.local").expect("valid");
    m.routes = routes
        .iter()
        .map(|(name, prefix)| {
            let spec = pb::Route {
                name: (*name).into(),
                namespace: "default".into(),
                kind: "HTTPRoute".into(),
                parents: vec![pb::ParentRef {
                    service: "default/api".into(),
                    port: 0,
                }],
                rules: vec![pb::RouteRule {
                    matches: vec![pb::RouteMatch {
                        path: Some(pb::StringMatch {
                            kind: pb::string_match::Kind::Prefix as i32,
                            value: (*prefix).into(),
                        }),
                        ..Default::default()
                    }],
                    backends: vec![pb::RouteBackend {
                        service: "default/api".into(),
                        port: 80,
                        weight: 1,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            };
            Arc::new(crate::model::route(spec, name).expect("valid route"))
        })
        .collect();
    m
}

fn model(yaml: &str) -> Model {
    let routes: &[(&str, &str)] = match yaml {
        BEFORE => &[("r", "/a"), ("old", "/old")],
        AFTER => &[("r", "/b"), ("new", "/new")],
        _ => &[],
    };
    let mut m = model_with(yaml, routes);
    // Backend policies, like routes, come from the controller: `(name, load balancer)`.
    let backends: &[(&str, i32)] = match yaml {
        BEFORE => &[("b", 0), ("old", 0)],
        AFTER => &[("b", 1), ("new", 2)],
        _ => &[],
    };
    m.backends = backends
        .iter()
        .map(|(name, lb)| {
            let spec = pb::Backend {
                name: (*name).into(),
                namespace: "default".into(),
                service: "default/api".into(),
                load_balancer: *lb,
                ..Default::default()
            };
            Arc::new(crate::model::backend(spec, name).expect("valid"))
        })
        .collect();
    // L7 policies too: `(name, denied path)`.
    let policies: &[(&str, &str)] = match yaml {
        BEFORE => &[("p", "/a"), ("old", "/old")],
        AFTER => &[("p", "/b"), ("new", "/new")],
        _ => &[],
    };
    m.request_policies = policies
        .iter()
        .map(|(name, path)| {
            let spec = pb::RequestPolicy {
                name: (*name).into(),
                namespace: "default".into(),
                action: pb::Action::Deny as i32,
                services: vec!["default/api".into()],
                rules: vec![pb::RequestRule {
                    paths: vec![(*path).into()],
                    ..Default::default()
                }],
                ..Default::default()
            };
            Arc::new(crate::request_policy::compile(spec, name).expect("valid"))
        })
        .collect();
    m
}

/// Every kind in the table round-trips, and the delta between two
/// encodings, applied incrementally, gives exactly the second: a new kind
/// is covered as soon as the fixtures hold one of it.
#[test]
fn every_kind_round_trips_and_deltas() {
    let (before, after) = (encode(&model(BEFORE)), encode(&model(AFTER)));
    assert_eq!(before.len(), KINDS.len(), "the fixture has every kind");
    let held = decode(&wire(&before), "cluster.local").expect("decodes");
    assert_eq!(encode(&held), before, "round trip, versions included");

    let delta = delta(&before, &after);
    let mut changes = Changes::default();
    for k in &KINDS {
        let d = &delta[k.type_url];
        let (changed, removed) = (d.changed.len(), d.removed.len());
        assert_eq!((changed, removed), (2, 1), "{}: {d:?}", k.type_url);
        for name in &d.changed {
            let body = &after[k.type_url][name].body;
            k.decode_into(name, body, "cluster.local", &mut changes)
                .expect("decodes");
        }
        for name in &d.removed {
            k.remove_into(name.clone(), &mut changes);
        }
    }
    let patched = held.apply(changes).expect("applies");
    assert_eq!(encode(&patched), after, "incremental equals full");
    assert!(delta_named(&after[WORKLOAD], &after[WORKLOAD]) == KindDelta::default());
}

#[test]
fn unknown_types_and_mismatched_bodies_are_refused() {
    assert!(kind("type.googleapis.com/weft.v1.Nope").is_none());
    let res = encode(&model(YAML));
    let body = &res[WORKLOAD]["default/web"].body;
    let err = kind(SERVICE)
        .expect("served")
        .decode_into("x", body, "cluster.local", &mut Changes::default())
        .expect_err("a workload is not a service")
        .to_string();
    assert!(
        err.contains("not a type.googleapis.com/weft.v1.Service"),
        "{err}"
    );
}

#[test]
fn round_trips_through_resources() {
    let model = model(YAML);
    let back = decode(&wire(&encode(&model)), "cluster.local").expect("decodes");
    // Re-encoding gives identical resources, versions included.
    assert_eq!(encode(&back), encode(&model));
    assert_eq!(back.workloads.len(), 2);
    assert_eq!(back.policies[0].rules[0].ports, vec![8080]);
}

#[test]
fn versions_change_only_with_content() {
    let a = encode(&model(YAML));
    let b = encode(&model(&YAML.replace("10.0.1.2", "10.0.1.3")));
    assert_ne!(
        a[WORKLOAD]["default/web"].version,
        b[WORKLOAD]["default/web"].version
    );
    assert_eq!(
        a[WORKLOAD]["default/api"].version,
        b[WORKLOAD]["default/api"].version
    );
    assert_eq!(
        a[SERVICE]["default/api"].version,
        b[SERVICE]["default/api"].version
    );
}

#[test]
fn malformed_resources_are_named() {
    let mut res = wire(&encode(&model(YAML)));
    res.get_mut(WORKLOAD).expect("w").insert(
        "default/bad".into(),
        prost_types::Any {
            type_url: WORKLOAD.into(),
            value: vec![0xff, 0xff, 0xff],
        },
    );
    let err = decode(&res, "cluster.local")
        .expect_err("garbage")
        .to_string();
    assert!(err.contains("default/bad"), "{err}");
    let mut res = wire(&encode(&model(YAML)));
    let foreign = pb::Workload {
        name: "x".into(),
        node: "a".into(),
        trust_domain: "evil.td".into(),
        addresses: vec![vec![1, 2, 3, 4]],
        ..Default::default()
    };
    res.get_mut(WORKLOAD).expect("w").insert(
        "default/x".into(),
        prost_types::Any {
            type_url: WORKLOAD.into(),
            value: foreign.encode_to_vec(),
        },
    );
    assert!(
        decode(&res, "cluster.local")
            .expect_err("foreign")
            .to_string()
            .contains("not ours")
    );
}

#[test]
fn reusing_encodings_gives_the_same_resources() {
    let before = model(YAML);
    let after = model(&YAML.replace("10.0.1.2", "10.0.1.7"));
    let reused = encode_reusing(&after, &before, &encode(&before));
    assert_eq!(reused, encode(&after));
    assert_ne!(
        reused[WORKLOAD]["default/web"],
        encode(&before)[WORKLOAD]["default/web"]
    );
}
