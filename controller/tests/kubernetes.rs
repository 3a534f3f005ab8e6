//! The Kubernetes source end to end: kube-runtime reflectors → translation
//! → the config served, against the stand-in API server of `fake_api` (no
//! real one can run here; see there what it keeps faithful). The
//! translation under it is tested with real `kubectl get -o yaml` objects
//! in src/source/translate.rs.

mod fake_api;

use std::sync::Arc;
use std::time::Duration;

use fake_api::{Fake, GATEWAY_GROUP, serve, wait_for};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use weft_controller::source::kubernetes;
use weft_controller::state::ConfigStore;
use weft_proto::model::Model;

const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const SERVICES: &str = "/api/v1/services";
const POLICIES: &str = "/apis/weft.dev/v1alpha1/authorizationpolicies";

fn namespace(mesh: bool) -> Value {
    let labels = if mesh {
        json!({"weft.dev/mesh": "enabled"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": labels, "resourceVersion": "1"}})
}

fn pod(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": "api"}, "resourceVersion": "1",
                     "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
        "spec": {"nodeName": "node-a", "serviceAccountName": "api", "containers": [{"name": "api", "image": "api"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

/// Waits (bounded) until the served model satisfies `done`, woken by each
/// translation the source makes.
async fn until(
    k8s: &kubernetes::Kubernetes,
    store: &ConfigStore,
    what: &str,
    done: impl Fn(&Model) -> bool,
) {
    let mut status = k8s.status.clone();
    let wait = async {
        while !done(&store.current().model) {
            if status.changed().await.is_err() {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflectors_follow_lists_watches_and_relists() {
    let fake = Arc::new(Fake::default());
    fake.put(NAMESPACES, namespace(true));
    fake.put(PODS, pod("api-1", "10.244.1.5"));
    let client = serve(fake.clone()).await;
    let store = ConfigStore::new();
    let stop = CancellationToken::new();
    let k8s = kubernetes::start(client.clone(), store.clone(), "cluster.local", stop.clone());

    // The initial lists are served.
    until(&k8s, &store, "the listed pod", |m| {
        m.workload("shop", "api-1").is_some_and(|w| w.meshed)
    })
    .await;
    let id = weft_proto::Identity::new("cluster.local", "shop", "api").expect("id");
    assert_eq!(store.current().model.workloads[0].identity, id);

    // Watch events: a pod added, the namespace leaving the mesh, a policy.
    for path in [PODS, NAMESPACES, POLICIES, SERVICES] {
        let wait = async {
            while fake.watching(path) == 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("kube-runtime watches after listing");
    }
    fake.put(PODS, pod("api-2", "10.244.1.6"));
    fake.event(PODS, "ADDED", pod("api-2", "10.244.1.6")).await;
    until(&k8s, &store, "the added pod", |m| m.workloads.len() == 2).await;
    // Once every kind has settled, a pod's own change is applied pod by pod
    // (the pass that takes the other kinds' initial events is a full one).
    let incremental = || k8s.incremental.load(std::sync::atomic::Ordering::Relaxed);
    let wait = async {
        while fake.watched_paths() < kubernetes::watched().len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("every kind watched");
    let moved = |m: &Model| {
        m.workload_by_ip("10.244.1.9".parse().expect("ip"))
            .is_some()
    };
    // Two moves, each waited for: the first pass may still carry other
    // kinds' initial events (a full pass); the second has only the pod.
    for ip in ["10.244.1.8", "10.244.1.9"] {
        fake.event(PODS, "MODIFIED", pod("api-2", ip)).await;
        let at: std::net::IpAddr = ip.parse().expect("ip");
        until(&k8s, &store, "the moved pod", |m| {
            m.workload_by_ip(at).is_some()
        })
        .await;
    }
    assert!(moved(&store.current().model));
    assert!(
        incremental() >= 1,
        "a pod's own change is applied pod by pod"
    );
    fake.put(PODS, pod("api-2", "10.244.1.6"));
    fake.event(PODS, "MODIFIED", pod("api-2", "10.244.1.6"))
        .await;
    until(&k8s, &store, "the pod back", |m| !moved(m)).await;
    fake.event(NAMESPACES, "MODIFIED", namespace(false)).await;
    until(
        &k8s,
        &store,
        "pods leaving the mesh with their namespace",
        |m| m.workloads.iter().all(|w| !w.meshed),
    )
    .await;
    let policy = json!({"apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-all", "namespace": "shop", "resourceVersion": "1"},
        "spec": {"action": "DENY", "rules": [{}]}});
    fake.event(POLICIES, "ADDED", policy).await;
    until(&k8s, &store, "the policy", |m| m.policies.len() == 1).await;

    // A deletion, then "410 Gone": kube-runtime relists and the relist's
    // contents (api-1 gone, api-3 new) replace what it had.
    fake.event(PODS, "DELETED", pod("api-2", "10.244.1.6"))
        .await;
    until(&k8s, &store, "the deleted pod gone", |m| {
        m.workloads.len() == 1
    })
    .await;
    let before_relist = incremental();
    fake.remove(PODS, "api-2");
    fake.remove(PODS, "api-1");
    fake.put(PODS, pod("api-3", "10.244.1.7"));
    let gone = json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410});
    fake.event(PODS, "ERROR", gone).await;
    until(&k8s, &store, "the relisted state", |m| {
        m.workloads.len() == 1 && m.workload("shop", "api-3").is_some()
    })
    .await;
    assert_eq!(
        incremental(),
        before_relist,
        "a relist is translated in full"
    );

    // REST callers: who by TokenReview, what by SubjectAccessReview.
    use weft_controller::kube_auth::{Refusal, Reviewer};
    let reviewer = Reviewer::new(client).with_timeout(Duration::from_millis(500));
    assert_eq!(reviewer.review("alice-token", "get").await, Ok(()));
    let asked = *fake.reviews.lock().expect("poisoned");
    assert_eq!(reviewer.review("alice-token", "get").await, Ok(()));
    assert_eq!(*fake.reviews.lock().expect("poisoned"), asked, "cached");
    assert!(matches!(
        reviewer.review("alice-token", "update").await,
        Err(Refusal::Forbidden { user, .. }) if user == "alice"
    ));
    assert!(matches!(
        reviewer.review("bob-token", "get").await,
        Err(Refusal::Forbidden { .. })
    ));
    assert!(matches!(
        reviewer.review("stolen", "get").await,
        Err(Refusal::Unauthenticated(_))
    ));
    // An API blip: "cannot check", not "not a token", and never cached, so
    // a valid user is back the moment the API is.
    fake.reviews_down
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(matches!(
        reviewer.review("bob-token", "update").await,
        Err(Refusal::Unavailable(_))
    ));
    fake.reviews_down
        .store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(matches!(
        reviewer.review("bob-token", "update").await,
        Err(Refusal::Forbidden { .. })
    ));
    stop.cancel();
}

const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const BACKENDS: &str = "/apis/weft.dev/v1alpha1/backendpolicies";
const HTTPROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";

fn api_service() -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "api", "namespace": "shop", "resourceVersion": "1"},
        "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "selector": {"app": "api"},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}})
}

/// The slice the EndpointSlice controller keeps for `shop/api`.
fn api_slice(ready: bool) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "api-x7k2p", "namespace": "shop", "resourceVersion": "1",
                     "labels": {"kubernetes.io/service-name": "api", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": ready, "serving": ready, "terminating": false},
                       "nodeName": "node-a", "targetRef": {"kind": "Pod", "name": "api-1", "namespace": "shop"}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn route() -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "api-split", "namespace": "shop", "resourceVersion": "1"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
                 "rules": [{"backendRefs": [{"name": "api", "port": 80}]}]}})
}

/// A cluster without the Gateway API (most clusters): no watch of its kinds
/// and no translation while idle; its kinds watched once installed, and
/// their objects forgotten once uninstalled. Nodes and ServiceAccounts are
/// never watched. A readiness change in an EndpointSlice (how readiness
/// reaches weft in a real cluster) is applied pod by pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_kinds_follow_discovery_and_slices_apply_pod_by_pod() {
    use std::sync::atomic::Ordering::Relaxed;
    let fake = Arc::new(Fake::default());
    fake.absent
        .lock()
        .expect("poisoned")
        .insert(GATEWAY_GROUP.into());
    fake.put(NAMESPACES, namespace(true));
    fake.put(PODS, pod("api-1", "10.244.1.5"));
    fake.put(SERVICES, api_service());
    fake.put(SLICES, api_slice(true));
    fake.put(HTTPROUTES, route());
    let client = serve(fake.clone()).await;
    let store = ConfigStore::new();
    let stop = CancellationToken::new();
    let k8s = kubernetes::start_with_discovery(
        client,
        store.clone(),
        "cluster.local",
        stop.clone(),
        Duration::from_millis(20),
    );
    let endpoints = |m: &Model| m.service("shop/api").map_or(0, |s| s.endpoints().len());
    until(&k8s, &store, "the ready endpoint", |m| endpoints(m) == 1).await;
    wait_for("the required kinds watched", || {
        [NAMESPACES, PODS, SERVICES, SLICES, POLICIES]
            .iter()
            .all(|p| fake.watching(p) > 0)
    })
    .await;

    // Idle without the Gateway API: discovery keeps asking; nothing is
    // translated again.
    let full = k8s.full.load(Relaxed);
    let asked = fake.discoveries.load(Relaxed);
    wait_for("five discovery rounds", || {
        fake.discoveries.load(Relaxed) >= asked + 5
    })
    .await;
    assert_eq!(k8s.full.load(Relaxed), full, "no translation while idle");
    assert!(k8s.status.borrow().routes.is_empty());
    let requested = fake.requested.lock().expect("poisoned").clone();
    assert!(
        !requested.contains_key(HTTPROUTES),
        "an absent kind is not listed: {requested:?}"
    );
    for unused in ["/api/v1/nodes", "/api/v1/serviceaccounts"] {
        assert!(!requested.contains_key(unused), "{unused} is not read");
    }

    // Readiness through the slice: applied pod by pod.
    let incremental = k8s.incremental.load(Relaxed);
    fake.put(SLICES, api_slice(false));
    fake.event(SLICES, "MODIFIED", api_slice(false)).await;
    until(&k8s, &store, "the endpoint not ready", |m| {
        endpoints(m) == 0
    })
    .await;
    fake.put(SLICES, api_slice(true));
    fake.event(SLICES, "MODIFIED", api_slice(true)).await;
    until(&k8s, &store, "the endpoint ready again", |m| {
        endpoints(m) == 1
    })
    .await;
    assert_eq!(
        k8s.incremental.load(Relaxed),
        incremental + 2,
        "both readiness changes pod by pod"
    );
    assert_eq!(k8s.full.load(Relaxed), full);

    // A relist of a kind with no objects ("410 Gone" on the empty
    // BackendPolicy watch) changes nothing: the slice change after it is
    // still applied pod by pod, and no full translation runs.
    let hits = || {
        fake.requested
            .lock()
            .expect("poisoned")
            .get(BACKENDS)
            .copied()
    };
    let before = hits().expect("BackendPolicies listed and watched");
    let gone = json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410});
    fake.event(BACKENDS, "ERROR", gone).await;
    // Listed again, then watched again: the relist's events were handled.
    wait_for("the empty kind relisted and watched again", || {
        hits().is_some_and(|n| n >= before + 2)
    })
    .await;
    fake.put(SLICES, api_slice(false));
    fake.event(SLICES, "MODIFIED", api_slice(false)).await;
    until(
        &k8s,
        &store,
        "the endpoint not ready after the relist",
        |m| endpoints(m) == 0,
    )
    .await;
    assert_eq!(k8s.incremental.load(Relaxed), incremental + 3);
    assert_eq!(k8s.full.load(Relaxed), full, "an empty relist is no change");

    // The Gateway API installed: its kinds are watched, the route served.
    fake.absent.lock().expect("poisoned").clear();
    let mut status = k8s.status.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.routes.iter().any(|r| r.key == "HTTPRoute shop/api-split")),
    )
    .await
    .expect("the route served once its CRD is installed")
    .expect("source alive");
    // And uninstalled: the route is forgotten, not served on.
    fake.absent
        .lock()
        .expect("poisoned")
        .insert(GATEWAY_GROUP.into());
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.routes.is_empty()),
    )
    .await
    .expect("the route forgotten once its CRD is gone")
    .expect("source alive");
    stop.cancel();
}
