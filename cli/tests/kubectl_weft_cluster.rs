//! `kubectl-weft --kubeconfig` (the real binary) against the stand-in API
//! server the controller's tests use (no real one can run here; see
//! `controller/tests/fake_api` for what it keeps faithful): join and leave
//! label the Namespace, waypoint apply writes the Gateway (and the
//! namespace binding), --wait follows the Gateway's `Programmed`
//! condition, delete removes both; the failures say what to do.

mod common;
#[path = "../../controller/tests/fake_api/mod.rs"]
mod fake_api;

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;

use common::{APPLY_WP, Run, kubectl_weft};
use fake_api::{Fake, kubeconfig, kubeconfig_as, listen};
use serde_json::{Value, json};

const NAMESPACES: &str = "/api/v1/namespaces";
const GATEWAY: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/wp";

async fn weft(config: &Path, args: &[&str]) -> Run {
    let mut all: Vec<OsString> = vec!["--kubeconfig".into(), config.into()];
    all.extend(args.iter().map(OsString::from));
    kubectl_weft(all).await
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn namespace(fake: &Fake) -> Value {
    let lists = fake.lists.lock().expect("poisoned");
    let (_, items) = &lists[NAMESPACES];
    items
        .iter()
        .find(|n| n["metadata"]["name"] == "shop")
        .cloned()
        .expect("shop")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_weft_writes_the_cluster_with_the_users_credentials() {
    let fake = Arc::new(Fake::default());
    fake.put(
        NAMESPACES,
        json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"team": "payments"}, "resourceVersion": "1"}}),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = kubeconfig(dir.path(), listen(fake.clone()).await);

    let r = weft(&config, &["join", "shop"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(
        r.out.contains("namespace shop joined the mesh"),
        "{}",
        r.out
    );
    let labels = namespace(&fake)["metadata"]["labels"].clone();
    assert_eq!(
        labels,
        json!({"team": "payments", "weft.dev/mesh": "enabled"})
    );
    let r = weft(&config, &["join", "nosuch"]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.err.contains("namespace nosuch does not exist"),
        "{}",
        r.err
    );

    let apply = [&APPLY_WP[..], &["--enroll-namespace"]].concat();
    let r = weft(&config, &apply).await;
    assert_eq!(r.code, 0, "{}", r.err);
    let gw = fake.objects.lock().expect("poisoned")[GATEWAY].clone();
    assert_eq!(gw["spec"]["gatewayClassName"], "weft-waypoint");
    assert_eq!(
        gw["metadata"]["labels"]["weft.dev/for-service-account"],
        "api"
    );
    assert_eq!(
        namespace(&fake)["metadata"]["labels"]["weft.dev/use-waypoint"],
        "wp"
    );

    // --wait follows the Programmed condition the controller writes.
    let r = weft(
        &config,
        &[&apply[..], &["--wait", "--timeout", "1"]].concat(),
    )
    .await;
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(r.err.contains("not programmed after 1s"), "{}", r.err);
    fake.objects
        .lock()
        .expect("poisoned")
        .get_mut(GATEWAY)
        .expect("gw")["status"] = json!({
        "conditions": [{"type": "Programmed", "status": "True", "reason": "Programmed",
            "message": "waypoint running", "lastTransitionTime": "2026-12-02T00:00:00Z"}]});
    let r = weft(
        &config,
        &[&apply[..], &["--wait", "--timeout", "10"]].concat(),
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(
        r.out.contains("waypoint shop/wp is programmed"),
        "{}",
        r.out
    );

    // list: the waypoint with its scope and state, and what is bound to it
    // (an unlabelled Service is not).
    for (name, labels) in [
        ("api", json!({"weft.dev/use-waypoint": "wp"})),
        ("db", json!({})),
    ] {
        fake.put("/api/v1/services", json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop", "labels": labels, "resourceVersion": "1"},
            "spec": {"ports": [{"port": 80}]}}));
    }
    let gateway = fake.objects.lock().expect("poisoned")[GATEWAY].clone();
    fake.put("/apis/gateway.networking.k8s.io/v1/gateways", gateway);
    let r = weft(&config, &["waypoint", "list", "-o", "json"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    let listed: Value = serde_json::from_str(&r.out).expect("JSON");
    assert_eq!(listed["items"][0]["waypoint"], "shop/wp");
    assert_eq!(listed["items"][0]["forServiceAccount"], "api");
    assert_eq!(listed["items"][0]["programmed"], "True");
    let bound: Vec<String> = listed["bindings"]
        .as_array()
        .expect("bindings")
        .iter()
        .map(|b| {
            format!(
                "{} {} -> {}",
                s(&b["kind"]),
                s(&b["name"]),
                s(&b["waypoint"])
            )
        })
        .collect();
    assert_eq!(
        bound,
        ["Namespace shop -> shop/wp", "Service shop/api -> shop/wp"]
    );
    let r = weft(&config, &["waypoint", "list"]).await;
    assert!(
        r.out
            .lines()
            .any(|l| l.starts_with("shop/wp") && l.contains("True")),
        "{}",
        r.out
    );

    let delete = ["waypoint", "delete", "-n", "shop", "--name", "wp"];
    let r = weft(&config, &delete).await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(!fake.objects.lock().expect("poisoned").contains_key(GATEWAY));
    assert!(namespace(&fake)["metadata"]["labels"]["weft.dev/use-waypoint"].is_null());
    let r = weft(&config, &delete).await;
    assert_eq!(r.code, 1);
    assert!(r.err.contains("no waypoint shop/wp"), "{}", r.err);

    let r = weft(&config, &["leave", "shop"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(
        namespace(&fake)["metadata"]["labels"],
        json!({"team": "payments"})
    );

    // status: not installed yet, then replicas, the leader, ztunnels and
    // waypoints as the cluster's objects say.
    let r = weft(&config, &["status"]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.err.contains("weft is not installed") && r.err.contains("kubectl weft install"),
        "{}",
        r.err
    );
    let put = |path: &str, o: Value| {
        fake.objects
            .lock()
            .expect("poisoned")
            .insert(path.into(), o)
    };
    put(
        "/apis/apps/v1/namespaces/weft-system/deployments/weft-controller",
        json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "weft-controller", "namespace": "weft-system"},
        "spec": {"replicas": 2, "selector": {}, "template": {}},
        "status": {"readyReplicas": 2}}),
    );
    put(
        "/apis/coordination.k8s.io/v1/namespaces/weft-system/leases/weft-controller",
        json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "weft-controller", "namespace": "weft-system"},
        "spec": {"holderIdentity": "weft-controller-7d9-abc"}}),
    );
    put(
        "/apis/apps/v1/namespaces/weft-system/daemonsets/ztunnel",
        json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "ztunnel", "namespace": "weft-system"},
        "spec": {"selector": {}, "template": {}},
        "status": {"desiredNumberScheduled": 3, "numberReady": 2, "currentNumberScheduled": 3, "numberMisscheduled": 0}}),
    );
    fake.put("/apis/gateway.networking.k8s.io/v1/gateways", json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": "shop", "resourceVersion": "1"},
        "spec": {"gatewayClassName": "weft-waypoint", "listeners": []},
        "status": {"conditions": [{"type": "Programmed", "status": "False", "reason": "Pending",
            "message": "waiting for a waypoint pod to be available", "lastTransitionTime": "2026-12-02T00:00:00Z"}]}}));
    let r = weft(&config, &["status"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(
        r.out
            .contains("2/2 replicas ready, leader weft-controller-7d9-abc"),
        "{}",
        r.out
    );
    assert!(r.out.contains("2/3 nodes ready"), "{}", r.out);
    assert!(
        r.out
            .contains("shop/wp not programmed: waiting for a waypoint pod"),
        "{}",
        r.out
    );

    // Reads of the controller's state while its APIService is not
    // available: the API server's 503, and where to look (exit 3).
    let r = weft(&config, &["workloads"]).await;
    assert_eq!(r.code, 3, "{}", r.err);
    assert!(
        r.err.contains("apiservice v1alpha1.api.weft.dev"),
        "{}",
        r.err
    );
    // An API server out of reach: exit 3.
    let gone_dir = dir.path().join("gone");
    std::fs::create_dir_all(&gone_dir).expect("mkdir");
    let gone = kubeconfig(&gone_dir, "127.0.0.1:1".parse().expect("addr"));
    let r = weft(&gone, &["join", "shop"]).await;
    assert_eq!(r.code, 3, "{}", r.err);
}

/// Reads of the controller's state in a cluster go through the API
/// server (the stand-in plays kube-aggregator: it authenticates the
/// kubeconfig's token and proxies under its front-proxy certificate) to a
/// controller in Kubernetes mode: no port-forward, no token but the user's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_weft_reads_the_controller_through_the_api_server() {
    use fake_api::{API_SERVICE, FRONT_PROXY_SETTINGS, FrontProxy};
    let fake = Arc::new(Fake::default());
    fake.put(
        NAMESPACES,
        json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"weft.dev/mesh": "enabled"}, "resourceVersion": "1"}}),
    );
    fake.put(
        "/api/v1/pods",
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "api-1", "namespace": "shop", "uid": "u1", "resourceVersion": "1"},
            "spec": {"nodeName": "node-a", "serviceAccountName": "api", "containers": [{"name": "c", "image": "c"}]},
            "status": {"phase": "Running", "podIP": "10.1.0.7", "conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    let front = Arc::new(FrontProxy::default());
    let apiservice = json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": "v1alpha1.api.weft.dev"},
        "spec": {"group": "api.weft.dev", "version": "v1alpha1", "groupPriorityMinimum": 1000, "versionPriority": 15,
            "service": {"namespace": "weft-system", "name": "weft-controller", "port": 8443}}});
    for (path, o) in [
        (API_SERVICE, apiservice),
        (FRONT_PROXY_SETTINGS, front.settings()),
    ] {
        fake.objects
            .lock()
            .expect("poisoned")
            .insert(path.into(), o);
    }
    let addr = listen(fake.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let access = weft_controller::app::KubeAccess {
        kubeconfig: Some(kubeconfig(dir.path(), addr)),
        ..Default::default()
    };
    let bound = weft_controller::app::build(weft_controller::app::Config {
        source: weft_controller::app::SourceConfig::Kubernetes(access),
        ..weft_controller::app::Config::local(dir.path().join("data"))
    })
    .await
    .expect("controller");
    let served = bound.aggregated_addr.expect("aggregated API");
    *fake.aggregated.lock().expect("poisoned") = Some((served, front.clone()));
    fake_api::wait_for("the pod in the controller's config", || {
        !bound.config.current().model.workloads.is_empty()
    })
    .await;

    let users = tempfile::tempdir().expect("tempdir");
    let (alice_dir, bob_dir) = (users.path().join("alice"), users.path().join("bob"));
    std::fs::create_dir_all(&alice_dir).expect("mkdir");
    std::fs::create_dir_all(&bob_dir).expect("mkdir");
    let alice = kubeconfig_as(&alice_dir, addr, Some("alice-token"));
    let bob = kubeconfig_as(&bob_dir, addr, Some("bob-token"));

    let r = weft(&alice, &["workloads", "-o", "json"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    let v: Value = serde_json::from_str(&r.out).expect("JSON");
    let names: Vec<&str> = v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|w| s(&w["name"]))
        .collect();
    assert_eq!(names, ["api-1"], "{}", r.out);
    let r = weft(&alice, &["workloads", "-n", "shop"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(
        r.out.contains("api-1") && r.out.contains("node-a"),
        "{}",
        r.out
    );
    let r = weft(&alice, &["workloads", "-n", "nowhere"]).await;
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(
        r.err.contains("namespace nowhere does not exist"),
        "{}",
        r.err
    );
    for command in [&["proxy-status"][..], &["certs", "-o", "json"]] {
        let r = weft(&alice, command).await;
        assert_eq!(r.code, 0, "{command:?}: {}", r.err);
    }
    // The mesh at a glance includes the controller's own view.
    fake.objects.lock().expect("poisoned").insert(
        "/apis/apps/v1/namespaces/weft-system/deployments/weft-controller".into(),
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "weft-controller", "namespace": "weft-system"},
            "spec": {"replicas": 1, "selector": {}, "template": {}}, "status": {"readyReplicas": 1}}),
    );
    let r = weft(&alice, &["status"]).await;
    assert!(r.out.contains("config      version"), "{}{}", r.out, r.err);

    // bob's token is valid, but RBAC does not let him read the mesh.
    let r = weft(&bob, &["workloads"]).await;
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(r.err.contains("weft-viewer"), "{}", r.err);
    // No credentials at all: the API server's 401.
    let r = weft(&kubeconfig(dir.path(), addr), &["workloads"]).await;
    assert_eq!(r.code, 1, "{}", r.out);
    bound.shutdown().await;
}
