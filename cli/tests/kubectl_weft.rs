//! `kubectl-weft` as a user runs it (the real binary) against a local-mode
//! controller, with a real `weft-waypoint` served in-process: join, waypoint
//! apply (with --wait, timing out and then succeeding), list in table and
//! JSON, delete; workloads, certs, proxy-status; and the failures a user
//! meets — a wrong flag (exit 2), a waypoint that does not exist and a
//! --wait that runs out (exit 1), an unreachable controller (exit 3) —
//! each with a message saying what to do.

mod common;

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use common::{APPLY_WP, Run, kubectl_weft};
use serde_json::Value;
use weft_controller::app::{self, Config};

/// Runs `kubectl-weft ARGS` against `url` with the token in `token`.
async fn weft(url: &str, token: &Path, args: &[&str]) -> Run {
    let mut all: Vec<OsString> = vec!["--controller".into(), url.into(), "--token-file".into()];
    all.push(token.into());
    all.extend(args.iter().map(OsString::from));
    kubectl_weft(all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_weft_against_a_local_controller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let controller = app::build(Config::local(data.clone()))
        .await
        .expect("controller");
    let url = format!("http://{}", controller.rest_addr);
    let token = data.join("api-token");

    let r = weft(&url, &token, &["join", "shop"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    let apply = APPLY_WP;
    let r = weft(&url, &token, &apply).await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.contains("waypoint shop/wp applied"), "{}", r.out);

    // Nothing serves it yet: --wait runs out, saying so.
    let r = weft(
        &url,
        &token,
        &[&apply[..], &["--wait", "--timeout", "1"]].concat(),
    )
    .await;
    assert_eq!(r.code, 1, "{}{}", r.out, r.err);
    assert!(r.err.contains("not serving after 1s"), "{}", r.err);
    let r = weft(&url, &token, &["waypoint", "list", "-o", "json"]).await;
    let listed: Value = serde_json::from_str(&r.out).expect("JSON");
    let item = &listed["items"][0];
    assert_eq!(item["waypoint"], "shop/wp");
    assert_eq!(item["connected"], false);

    // A weft-waypoint for it: --wait returns once it is serving.
    let root = dir.path().join("root.pem");
    std::fs::write(&root, &controller.root_pem).expect("root");
    let waypoint = weft_waypoint::app::build(weft_waypoint::app::Config {
        key: "shop/wp".into(),
        service_account: "wp".into(),
        trust_domain: "cluster.local".into(),
        ca_addr: controller.grpc_addr,
        ca_root: root,
        token_file: controller.nodes.ensure("waypoint.shop.wp").expect("token"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        control: None,
        drain_deadline: Duration::from_secs(1),
        limits: Default::default(),
        metrics: None,
        trace_sampling: 0.0,
        otlp_endpoint: None,
    })
    .await
    .expect("waypoint");
    let r = weft(
        &url,
        &token,
        &[&apply[..], &["--wait", "--timeout", "20"]].concat(),
    )
    .await;
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    assert!(r.out.contains("waypoint shop/wp is serving"), "{}", r.out);
    let r = weft(&url, &token, &["waypoint", "list"]).await;
    let row = r
        .out
        .lines()
        .find(|l| l.starts_with("shop/wp"))
        .unwrap_or_default();
    assert!(row.contains("api") && row.contains("true"), "{}", r.out);

    // status: config, proxies, problems and certificates near their end.
    let r = weft(&url, &token, &["status"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.contains("problems    0"), "{}", r.out);
    assert!(
        r.out.contains("certificates 0 expiring within an hour"),
        "{}",
        r.out
    );

    // The other listings, as tables and as JSON.
    let r = weft(&url, &token, &["proxy-status"]).await;
    assert!(r.out.contains("waypoint.shop.wp"), "{}", r.out);
    let r = weft(&url, &token, &["certs", "-o", "json"]).await;
    let certs: Value = serde_json::from_str(&r.out).expect("JSON");
    assert!(
        certs
            .to_string()
            .contains("spiffe://cluster.local/ns/shop/sa/wp"),
        "{certs}"
    );
    let r = weft(&url, &token, &["workloads", "-o", "yaml"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    // Namespaces as kubectl spells them: -n narrows, -A is everything, an
    // unknown one is an error rather than an empty mesh.
    let r = weft(&url, &token, &["certs", "-n", "shop", "-o", "json"]).await;
    let scoped: Value = serde_json::from_str(&r.out).expect("JSON");
    assert_eq!(
        scoped["items"].as_array().map(Vec::len),
        Some(1),
        "{scoped}"
    );
    let r = weft(&url, &token, &["certs", "-A"]).await;
    assert!(r.out.contains("/ns/shop/sa/wp"), "{}", r.out);
    let r = weft(&url, &token, &["workloads", "-n", "shpo"]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.err.contains("namespace shpo is not known") && r.err.contains("-A"),
        "{}",
        r.err
    );
    let r = weft(&url, &token, &["workloads", "-o", "wide"]).await;
    assert!(
        r.out.starts_with("NAMESPACE") && r.out.contains("WAYPOINT"),
        "{}",
        r.out
    );
    let r = weft(&url, &token, &["completion", "bash"]).await;
    assert!(r.code == 0 && r.out.contains("_kubectl__weft"), "{}", r.err);

    // route explain: the rule the waypoint's own matcher picks, on the
    // config served now; a request no rule serves exits 1 saying why.
    let routes = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop, labels: {weft.dev/use-waypoint: wp}}\n\
        spec: {selector: {app: api}, ports: [{port: 80}]}\n---\n\
        apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: split, namespace: shop}\n\
        spec:\n  parentRefs: [{group: '', kind: Service, name: api, port: 80}]\n  rules:\n\
        \x20   - matches: [{path: {type: PathPrefix, value: /v2}}]\n      backendRefs: [{name: api, port: 80}]\n\
        \x20   - matches: [{headers: [{name: x-canary, value: 'yes'}]}]\n      backendRefs: [{name: api, port: 80}]\n";
    std::fs::write(data.join("config/routes.yaml"), routes).expect("routes");
    let mut served = controller.config.subscribe();
    tokio::time::timeout(
        Duration::from_secs(10),
        served.wait_for(|s| !s.model.routes.is_empty()),
    )
    .await
    .expect("the route served in time")
    .expect("config");
    let explain = ["route", "explain", "shop/api", "80"];
    let r = weft(
        &url,
        &token,
        &[&explain[..], &["--path", "/v2/items"]].concat(),
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(
        r.out
            .starts_with("route HTTPRoute/shop/split rule 0 (waypoint shop/wp)"),
        "{}",
        r.out
    );
    let r = weft(
        &url,
        &token,
        &[&explain[..], &["--path", "/x", "-H", "x-canary: yes"]].concat(),
    )
    .await;
    assert!(
        r.out.starts_with("route HTTPRoute/shop/split rule 1"),
        "{}{}",
        r.out,
        r.err
    );
    let r = weft(
        &url,
        &token,
        &[&explain[..], &["--path", "/x", "-o", "json"]].concat(),
    )
    .await;
    assert_eq!(r.code, 1);
    assert!(
        r.err.contains("no rule matches") && r.err.contains("404"),
        "{}",
        r.err
    );

    // policy check: the deciding policy and rule at L7 (the waypoint, as
    // the client) and L4 (api's ztunnel, as the waypoint); exit 0 / 1.
    let pod = |name: &str, sa: &str, ip: &str, app: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}\n\
             spec: {{serviceAccountName: {sa}, nodeName: node-a, containers: [{{name: c, image: c}}]}}\n\
             status: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: 'True'}}]}}\n---\n"
        )
    };
    let policy = |name: &str, spec: &str| {
        format!(
            "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n---\n"
        )
    };
    let td = "spiffe://cluster.local/ns/shop/sa";
    let policies = [
        pod("web", "web", "10.244.1.5", "web"),
        pod("api-1", "api", "10.244.1.6", "api"),
        policy("api-from-waypoint", &format!("{{selector: {{matchLabels: {{app: api}}}}, action: ALLOW, rules: [{{principals: ['{td}/wp']}}]}}")),
        policy("web-only", &format!("{{targetRefs: [{{group: '', kind: Service, name: api}}], action: ALLOW, rules: [{{principals: ['{td}/web']}}]}}")),
        policy("no-admin", "{targetRefs: [{group: '', kind: Service, name: api}], action: DENY, rules: [{paths: ['/admin/*']}]}"),
    ]
    .concat();
    std::fs::write(data.join("config/policies.yaml"), policies).expect("policies");
    tokio::time::timeout(
        Duration::from_secs(10),
        served.wait_for(|s| s.model.request_policies.len() == 2 && !s.model.policies.is_empty()),
    )
    .await
    .expect("in time")
    .expect("served");
    let check = ["policy", "check", "shop/web", "shop/api", "80"];
    let r = weft(&url, &token, &[&check[..], &["--path", "/items"]].concat()).await;
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    assert!(
        r.out.contains("ALLOW policy shop/web-only rule 0"),
        "{}",
        r.out
    );
    assert!(
        r.out.contains("ALLOW policy shop/api-from-waypoint"),
        "{}",
        r.out
    );
    let r = weft(
        &url,
        &token,
        &[&check[..], &["--path", "/x/../admin/users"]].concat(),
    )
    .await;
    assert_eq!(r.code, 1, "{}{}", r.out, r.err);
    assert!(
        r.err.contains("DENY policy shop/no-admin rule 0"),
        "{}",
        r.err
    );
    let r = weft(
        &url,
        &token,
        &[
            "policy",
            "check",
            "shop/api-1",
            "shop/api",
            "80",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(r.code, 1, "api is not web: {}{}", r.out, r.err);
    assert!(r.err.contains("no ALLOW policy matched"), "{}", r.err);

    // Delete: gone, and deleting again says there is no such waypoint.
    let delete = ["waypoint", "delete", "-n", "shop", "--name", "wp"];
    let r = weft(&url, &token, &delete).await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(
        r.out.contains("Service shop/api is still bound to it"),
        "{}",
        r.out
    );
    let r = weft(&url, &token, &["waypoint", "list", "-o", "json"]).await;
    let listed: Value = serde_json::from_str(&r.out).expect("JSON");
    // Still named by the Service bound to it: listed as undefined, its
    // traffic refused (fail closed), and saying so.
    assert_eq!(listed["items"][0]["defined"], false, "{}", r.out);
    let reason = listed["items"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("no Gateway shop/wp"), "{reason}");
    let r = weft(&url, &token, &delete).await;
    assert_eq!(r.code, 1);
    assert!(
        r.err.contains("no waypoint shop/wp") && r.err.contains("waypoint list"),
        "{}",
        r.err
    );

    // Usage errors are 2; an unreachable controller is 3, with what to do.
    let r = weft(&url, &token, &["workloads", "--no-such-flag"]).await;
    assert_eq!(r.code, 2, "{}", r.err);
    let r = weft(&url, &token, &["workloads", "-o", "xml"]).await;
    assert_eq!(r.code, 2, "{}", r.err);
    let r = weft("http://127.0.0.1:1", &token, &["workloads"]).await;
    assert_eq!(r.code, 3, "{}", r.err);
    assert!(
        r.err.contains("cannot reach the controller") && r.err.contains("--controller"),
        "{}",
        r.err
    );

    waypoint.shutdown().await;
    controller.shutdown().await;
}
