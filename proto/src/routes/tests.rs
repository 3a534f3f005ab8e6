use super::*;
use crate::model::route;

fn exact(v: &str) -> Option<pb::StringMatch> {
    Some(pb::StringMatch {
        kind: MatchKind::Exact as i32,
        value: v.into(),
    })
}

fn prefix(v: &str) -> Option<pb::StringMatch> {
    Some(pb::StringMatch {
        kind: MatchKind::Prefix as i32,
        value: v.into(),
    })
}

fn regex_match(v: &str) -> Option<pb::StringMatch> {
    Some(pb::StringMatch {
        kind: MatchKind::Regex as i32,
        value: v.into(),
    })
}

/// A route in `ns` on default/api with one rule per match, each sending to
/// the backend named like the rule.
fn http_route(
    ns: &str,
    name: &str,
    created: i64,
    rules: Vec<(&str, pb::RouteMatch)>,
) -> Arc<Route> {
    let spec = pb::Route {
        name: name.into(),
        namespace: ns.into(),
        kind: "HTTPRoute".into(),
        created,
        parents: vec![pb::ParentRef {
            service: "default/api".into(),
            port: 0,
        }],
        rules: rules
            .into_iter()
            .map(|(to, m)| pb::RouteRule {
                name: to.into(),
                matches: vec![m],
                backends: vec![pb::RouteBackend {
                    service: format!("default/{to}"),
                    port: 80,
                    weight: 1,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    };
    Arc::new(route(spec, name).expect("valid"))
}

fn pick(
    model: &Model,
    client_ns: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> String {
    let table = RouteTable::build(model, "default/api", 80, client_ns);
    let mut h = http::HeaderMap::new();
    for (k, v) in headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let req = Request {
        method,
        path,
        query,
        headers: &h,
    };
    table
        .select(&req)
        .map_or("404".to_owned(), |s| s.rule().name.clone())
}

#[test]
fn precedence_follows_the_gateway_api() {
    let mut m = Model::default();
    m.routes = vec![
        http_route(
            "default",
            "b-newer",
            20,
            vec![
                ("any", pb::RouteMatch::default()),
                (
                    "v2-prefix",
                    pb::RouteMatch {
                        path: prefix("/v2"),
                        ..Default::default()
                    },
                ),
                (
                    "v2-regex",
                    pb::RouteMatch {
                        path: regex_match("/v[0-9]+/.*"),
                        ..Default::default()
                    },
                ),
            ],
        ),
        http_route(
            "default",
            "a-older",
            10,
            vec![
                (
                    "v2-exact",
                    pb::RouteMatch {
                        path: exact("/v2/exact"),
                        ..Default::default()
                    },
                ),
                (
                    "v2-post",
                    pb::RouteMatch {
                        path: prefix("/v2"),
                        method: "POST".into(),
                        ..Default::default()
                    },
                ),
                (
                    "v2-header",
                    pb::RouteMatch {
                        path: prefix("/v2"),
                        headers: vec![pb::NamedMatch {
                            name: "x-canary".into(),
                            value: exact("yes"),
                        }],
                        ..Default::default()
                    },
                ),
                (
                    "v2-query",
                    pb::RouteMatch {
                        path: prefix("/v2"),
                        query: vec![pb::NamedMatch {
                            name: "beta".into(),
                            value: exact("1"),
                        }],
                        ..Default::default()
                    },
                ),
                (
                    "v2-tie",
                    pb::RouteMatch {
                        path: prefix("/v2"),
                        ..Default::default()
                    },
                ),
            ],
        ),
    ];
    let go =
        |method, target, headers: &[(&str, &str)]| pick(&m, "default", method, target, headers);
    assert_eq!(go("GET", "/v2/exact", &[]), "v2-exact");
    assert_eq!(
        go("POST", "/v2/x", &[]),
        "v2-post",
        "a method beats headers"
    );
    assert_eq!(go("GET", "/v2/x", &[("x-canary", "yes")]), "v2-header");
    assert_eq!(go("GET", "/v2/x?a=b&beta=1", &[]), "v2-query");
    assert_eq!(
        go("GET", "/v2/x", &[]),
        "v2-tie",
        "the older route wins a tie"
    );
    assert_eq!(go("GET", "/v2", &[]), "v2-tie");
    assert_eq!(
        go("GET", "/v2x", &[]),
        "any",
        "prefixes match whole segments"
    );
    assert_eq!(
        go("GET", "/v3/x", &[]),
        "v2-regex",
        "a regex ranks after every prefix but /"
    );
    assert_eq!(go("GET", "/", &[]), "any");
    // Header values: any of a repeated header; names are case-insensitive.
    assert_eq!(
        go("GET", "/v2/x", &[("X-Canary", "no"), ("x-canary", "yes")]),
        "v2-header"
    );
}

#[test]
fn consumer_routes_decide_for_their_namespace_only() {
    let mut m = Model::default();
    m.routes = vec![
        http_route(
            "default",
            "producer",
            10,
            vec![("producer", pb::RouteMatch::default())],
        ),
        http_route(
            "shop",
            "consumer",
            20,
            vec![("consumer", pb::RouteMatch::default())],
        ),
    ];
    assert_eq!(pick(&m, "default", "GET", "/", &[]), "producer");
    assert_eq!(pick(&m, "other", "GET", "/", &[]), "producer");
    assert_eq!(pick(&m, "shop", "GET", "/", &[]), "consumer");
    // Nothing attached → no table; a route on another port does not apply.
    assert!(RouteTable::build(&m, "default/nope", 80, "default").is_empty());
    let mut on_8080 = m.routes[0].spec.clone();
    on_8080.parents[0].port = 8080;
    m.routes = vec![Arc::new(route(on_8080, "p").expect("valid"))];
    assert!(RouteTable::build(&m, "default/api", 80, "default").is_empty());
    assert!(!RouteTable::build(&m, "default/api", 8080, "default").is_empty());
}

#[test]
fn grpc_matches_service_and_method() {
    let mut m = Model::default();
    m.routes = vec![{
        let mut r = http_route(
            "default",
            "g",
            1,
            vec![
                (
                    "svc",
                    pb::RouteMatch {
                        grpc_service: exact("shop.Orders"),
                        ..Default::default()
                    },
                ),
                (
                    "both",
                    pb::RouteMatch {
                        grpc_service: exact("shop.Orders"),
                        grpc_method: exact("Get"),
                        ..Default::default()
                    },
                ),
            ],
        )
        .spec
        .clone();
        r.kind = "GRPCRoute".into();
        Arc::new(route(r, "g").expect("valid"))
    }];
    assert_eq!(pick(&m, "default", "POST", "/shop.Orders/Get", &[]), "both");
    assert_eq!(pick(&m, "default", "POST", "/shop.Orders/List", &[]), "svc");
    assert_eq!(pick(&m, "default", "POST", "/shop.Other/Get", &[]), "404");
}

#[test]
fn bad_or_huge_regexes_are_refused_with_the_rule_named() {
    let bad = http_route_spec(regex_match("(unclosed"));
    let err = route(bad, "r").expect_err("invalid").to_string();
    assert!(
        err.contains("rules[0]") && err.contains("(unclosed"),
        "{err}"
    );
    let huge = http_route_spec(regex_match("(a{1000}){1000}"));
    assert!(route(huge, "r").is_err(), "size-limited");
}

fn http_route_spec(path: Option<pb::StringMatch>) -> pb::Route {
    pb::Route {
        name: "r".into(),
        namespace: "default".into(),
        kind: "HTTPRoute".into(),
        rules: vec![pb::RouteRule {
            matches: vec![pb::RouteMatch {
                path,
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn weights_split_in_proportion_and_zero_means_none() {
    let rule = pb::RouteRule {
        backends: vec![
            pb::RouteBackend {
                service: "v1".into(),
                weight: 90,
                ..Default::default()
            },
            pb::RouteBackend {
                service: "v2".into(),
                weight: 10,
                ..Default::default()
            },
            pb::RouteBackend {
                service: "off".into(),
                weight: 0,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let v2 = (0..100)
        .filter(|d| pick_backend(&rule, *d).is_some_and(|b| b.service == "v2"))
        .count();
    assert_eq!(v2, 10);
    let none = pb::RouteRule::default();
    assert!(pick_backend(&none, 7).is_none());
}
