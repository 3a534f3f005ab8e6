//! A controller in Kubernetes mode, built as the binary builds it, against
//! the stand-in API server of `fake_api` (no real one can run here; see
//! there what it keeps faithful): the CA lives in Secret
//! `weft-system/weft-ca` (created once, the same root after a restart and
//! across replicas started together), the trust bundle is published, and
//! proxies authenticate with their pods' projected ServiceAccount tokens —
//! no node token copied by hand.

mod fake_api;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fake_api::{Fake, kubeconfig, listen};
use serde_json::{Value, json};
use weft_controller::app::{self, Bound, Config, KubeAccess, SourceConfig};
use weft_proto::certs::{CaClient, CertError, GrpcCaClient, make_csr};
use weft_proto::identity::Identity;

const SECRET: &str = "/api/v1/namespaces/weft-system/secrets/weft-ca";
const BUNDLE: &str = "/api/v1/namespaces/weft-system/configmaps/weft-trust-bundle";

async fn controller(fake: std::net::SocketAddr, dir: &Path) -> Result<Bound, app::BuildError> {
    let access = KubeAccess {
        kubeconfig: Some(kubeconfig(dir, fake)),
        ..Default::default()
    };
    app::build(Config {
        source: SourceConfig::Kubernetes(access),
        ca_follow: Duration::from_millis(50),
        ..Config::local(dir.join("data"))
    })
    .await
}

fn secret_root(fake: &Fake) -> String {
    let objects = fake.objects.lock().expect("poisoned");
    let b64 = objects[SECRET]["data"]["root-cert.pem"].clone();
    let pem: k8s_openapi::ByteString = serde_json::from_value(b64).expect("base64 root");
    String::from_utf8(pem.0).expect("PEM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_lives_in_a_secret_made_once() {
    let fake = Arc::new(Fake::default());
    let addr = listen(fake.clone()).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();

    // Two replicas starting together: one root comes out.
    let (a, b) = tokio::join!(
        controller(addr, dirs[0].path()),
        controller(addr, dirs[1].path())
    );
    let (a, b) = (a.expect("replica a"), b.expect("replica b"));
    assert_eq!(a.root_pem, b.root_pem, "both replicas sign under one root");
    let secret_creates = || -> Vec<(String, u16)> {
        let creates = fake.creates.lock().expect("poisoned");
        creates
            .iter()
            .filter(|(p, _)| p == SECRET)
            .cloned()
            .collect()
    };
    let created = secret_creates();
    let made = created.iter().filter(|(_, code)| *code == 201).count();
    assert_eq!(made, 1, "exactly one Secret created: {created:?}");
    assert_eq!(secret_root(&fake), a.root_pem);
    let bundle = fake.objects.lock().expect("poisoned")[BUNDLE].clone();
    assert_eq!(bundle["data"]["root-cert.pem"], json!(a.root_pem));
    let key_mode = std::fs::metadata(dirs[1].path().join("data/ca/ca-key.pem"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .expect("key written");
    assert_eq!(key_mode, 0o600);
    let root = a.root_pem.clone();
    a.shutdown().await;
    b.shutdown().await;

    // A replica rescheduled onto an empty disk: the same root.
    let c = controller(addr, dirs[2].path()).await.expect("replica c");
    assert_eq!(c.root_pem, root);
    c.shutdown().await;
    assert_eq!(
        secret_creates(),
        created,
        "no create once the Secret exists"
    );

    // A Secret missing a file is a clear error, not a new root.
    fake.objects
        .lock()
        .expect("poisoned")
        .get_mut(SECRET)
        .and_then(|s| s["data"].as_object_mut())
        .map(|d| d.remove("ca-key.pem"));
    let dir = tempfile::tempdir().expect("dir");
    let err = controller(addr, dir.path()).await.err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("lacks ca-key.pem") && msg.contains("weft-ca"),
        "{msg}"
    );
}

/// Namespace `shop`, in the mesh, with pod api-1 and the ztunnel on node-a.
fn meshed_shop(fake: &Fake) {
    fake.put(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"weft.dev/mesh": "enabled"}, "resourceVersion": "1"}}),
    );
    let za = ("weft-system", "ztunnel-a", "u-za", "ztunnel");
    for (ns, name, uid, sa) in [("shop", "api-1", "u-api", "api"), za] {
        fake.put("/api/v1/pods", pod(ns, name, uid, sa, "node-a", json!({})));
    }
}

fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels, "resourceVersion": "1"},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c", "image": "c"}]},
        "status": {"phase": "Running", "podIP": format!("10.1.0.{}", uid.len()),
                   "conditions": [{"type": "Ready", "status": "True"}]}})
}

/// Asks the CA, with `token`, for `identity`'s certificate.
async fn ask(bound: &Bound, token: &str, identity: &Identity) -> Result<Vec<String>, CertError> {
    let roots = Arc::new(weft_proto::tls::TrustBundle::from_pem(&bound.root_pem).expect("root"));
    let ca = GrpcCaClient::new(bound.grpc_addr, roots, bound.identity.clone(), token);
    let (csr, _key) = make_csr(identity).expect("csr");
    ca.sign(csr, identity, Duration::from_secs(3600)).await
}

fn refused(r: Result<Vec<String>, CertError>) -> String {
    match r {
        Err(CertError::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_authenticate_with_their_pods_service_account_tokens() {
    let fake = Arc::new(Fake::default());
    meshed_shop(&fake);
    let gw = json!({"gateway.networking.k8s.io/gateway-name": "wp"});
    for p in [
        pod("shop", "db-1", "u-db", "db", "node-b", json!({})),
        pod("shop", "wp-1", "u-wp", "wp", "node-b", gw.clone()),
        // Labelled as the waypoint, running as another account.
        pod("shop", "wp-2", "u-wp2", "db", "node-b", gw),
    ] {
        fake.put("/api/v1/pods", p);
    }
    fake.put(
        "/apis/gateway.networking.k8s.io/v1/gateways",
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "wp", "namespace": "shop", "resourceVersion": "1"},
            "spec": {"gatewayClassName": "weft-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
    );
    let ztunnel_a = ("weft-system", "ztunnel-a", "u-za");
    fake.projected_token("za", ztunnel_a, "ztunnel", &["weft-ca"]);
    fake.projected_token("za-istio", ztunnel_a, "ztunnel", &["istio-ca"]);
    fake.projected_token(
        "za-old",
        ("weft-system", "ztunnel-a", "u-old"),
        "ztunnel",
        &["weft-ca"],
    );
    fake.projected_token(
        "gone",
        ("weft-system", "ztunnel-x", "u-x"),
        "ztunnel",
        &["weft-ca"],
    );
    fake.projected_token("app", ("shop", "api-1", "u-api"), "api", &["weft-ca"]);
    fake.projected_token("wp", ("shop", "wp-1", "u-wp"), "wp", &["weft-ca"]);
    fake.projected_token("evil", ("shop", "wp-2", "u-wp2"), "db", &["weft-ca"]);
    let addr = listen(fake.clone()).await;
    let dir = tempfile::tempdir().expect("dir");
    let bound = controller(addr, dir.path()).await.expect("controller");
    let config = bound.config.clone();
    let placed = async {
        let mut rx = config.subscribe();
        loop {
            let m = rx.borrow_and_update().model.clone();
            let ready =
                m.workloads.len() == 2 && m.waypoints.iter().any(|w| !w.addresses.is_empty());
            if ready {
                return;
            }
            rx.changed().await.expect("store");
        }
    };
    tokio::time::timeout(Duration::from_secs(10), placed)
        .await
        .expect("pods and the waypoint in the served config");

    let id = |sa: &str| Identity::new("cluster.local", "shop", sa).expect("id");
    // The ztunnel on node-a: its own node's pods, not another node's.
    let chain = ask(&bound, "za", &id("api"))
        .await
        .expect("api runs on node-a");
    assert!(!chain.is_empty());
    let why = refused(ask(&bound, "za", &id("db")).await);
    assert!(
        why.contains("PermissionDenied") && why.contains("node-a"),
        "{why}"
    );
    // Wrong audience, a pod gone, a pod replaced under the same name.
    let why = refused(ask(&bound, "za-istio", &id("api")).await);
    assert!(why.contains("Unauthenticated"), "{why}");
    let why = refused(ask(&bound, "gone", &id("api")).await);
    assert!(
        why.contains("Unauthenticated") && why.contains("no longer exists"),
        "{why}"
    );
    let why = refused(ask(&bound, "za-old", &id("api")).await);
    assert!(why.contains("Unauthenticated"), "{why}");
    // An application's own token makes no proxy.
    let why = refused(ask(&bound, "app", &id("api")).await);
    assert!(
        why.contains("PermissionDenied") && why.contains("neither"),
        "{why}"
    );
    // A waypoint pod: its own identity, nothing else.
    ask(&bound, "wp", &id("wp"))
        .await
        .expect("the waypoint's own");
    let why = refused(ask(&bound, "wp", &id("api")).await);
    assert!(why.contains("PermissionDenied"), "{why}");
    // A pod that wears the waypoint's label gets no waypoint identity it
    // does not run as.
    let why = refused(ask(&bound, "evil", &id("wp")).await);
    assert!(
        why.contains("PermissionDenied") && why.contains("own ServiceAccount"),
        "{why}"
    );

    // Each refusal counted by its reason.
    let metrics = weft_proto::process::prometheus().render();
    for reason in ["unauthenticated", "not_a_proxy"] {
        let line = format!("weft_controller_auth_refusals_total{{reason=\"{reason}\"}}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    // The config stream: the same token makes the ztunnel node-a.
    let roots = Arc::new(weft_proto::tls::TrustBundle::from_pem(&bound.root_pem).expect("root"));
    let (_rx, _stats) = weft_proto::xds::spawn(weft_proto::xds::XdsConfig {
        controller: bound.grpc_addr,
        roots: roots.into(),
        controller_identity: bound.identity.clone(),
        credential: "za".into(),
        node: "whatever-it-claims".into(),
        trust_domain: "cluster.local".into(),
        types: &weft_proto::resources::ZTUNNEL_TYPES,
    });
    let proxies = bound.proxies.clone();
    fake_api::wait_for("node-a on the config stream", || {
        proxies.get("node-a").is_some_and(|p| p.connected)
    })
    .await;
    assert!(bound.proxies.get("whatever-it-claims").is_none());
    bound.shutdown().await;
}

mod election {
    use super::*;
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;
    use weft_controller::leader::{self, Election};

    fn election(me: &str) -> Election {
        Election {
            namespace: "weft-system".into(),
            me: me.into(),
            lease_duration: Duration::from_secs(1),
            retry: Duration::from_millis(100),
        }
    }

    async fn until_leads(rx: &mut watch::Receiver<bool>, what: &str) {
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|l| *l))
            .await
            .unwrap_or_else(|_| panic!("{what}: no leadership in 5 s"))
            .expect("elector running");
    }

    fn holder(fake: &Fake) -> Value {
        let objects = fake.objects.lock().expect("poisoned");
        objects["/apis/coordination.k8s.io/v1/namespaces/weft-system/leases/weft-controller"]["spec"]
            ["holderIdentity"]
            .clone()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_elect_one_leader_and_hand_over() {
        weft_proto::process::prometheus(); // the recorder, as the controller installs it
        let fake = Arc::new(Fake::default());
        let client = fake_api::serve(fake.clone()).await;
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        let mut a = leader::spawn(client.clone(), election("a"), stop_a.clone());
        let mut b = leader::spawn(client.clone(), election("b"), stop_b.clone());
        let (mut a2, mut b2) = (a.clone(), b.clone());
        tokio::select! {
            _ = until_leads(&mut a2, "a") => {}
            _ = until_leads(&mut b2, "b") => {}
        }
        // Watched for ten renewal periods: never both at once.
        let both = async {
            loop {
                if *a.borrow_and_update() && *b.borrow_and_update() {
                    return;
                }
                tokio::select! {
                    _ = a.changed() => {}
                    _ = b.changed() => {}
                }
            }
        };
        let overlap = tokio::time::timeout(Duration::from_secs(1), both).await;
        assert!(overlap.is_err(), "two leaders at once");
        let (leader, mut follower, stop, next) = if *a.borrow() {
            ("a", b, stop_a.clone(), "b")
        } else {
            ("b", a, stop_b.clone(), "a")
        };
        assert_eq!(holder(&fake), json!(leader));
        let metrics = weft_proto::process::prometheus().render();
        assert!(metrics.contains("weft_controller_leader 1"), "{metrics}");
        // The leader stops: it gives the Lease up and the other leads.
        stop.cancel();
        until_leads(&mut follower, "the follower").await;
        assert_eq!(holder(&fake), json!(next));
        stop_a.cancel();
        stop_b.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_left_by_a_dead_leader_expires() {
        let fake = Arc::new(Fake::default());
        let client = fake_api::serve(fake.clone()).await;
        // A leader that died holding the Lease (its clock far ahead, too).
        let lease = k8s_openapi::api::coordination::v1::Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(leader::LEASE.into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: Some("ghost".into()),
                lease_duration_seconds: Some(1),
                ..Default::default()
            }),
        };
        kube::Api::namespaced(client.clone(), "weft-system")
            .create(&kube::api::PostParams::default(), &lease)
            .await
            .expect("ghost lease");
        let stop = CancellationToken::new();
        let mut c = leader::spawn(client, election("c"), stop.clone());
        let started = std::time::Instant::now();
        until_leads(&mut c, "c").await;
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "taken only after a lease duration of silence"
        );
        assert_eq!(holder(&fake), json!("c"));
        stop.cancel();
    }
}

mod waypoints {
    use super::*;
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;
    use weft_controller::state::ConfigStore;
    use weft_controller::waypoint_deploy::{self, Settings};

    const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/shop/deployments/wp";
    const SERVICE: &str = "/api/v1/namespaces/shop/services/wp";
    const ACCOUNT: &str = "/api/v1/namespaces/shop/serviceaccounts/wp";
    const STATUS: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/wp";

    fn object(fake: &Fake, path: &str) -> Option<Value> {
        fake.objects.lock().expect("poisoned").get(path).cloned()
    }

    /// Waits (bounded) until `path` holds an object that satisfies `done`.
    async fn until(fake: &Fake, path: &str, done: impl Fn(&Value) -> bool) -> Value {
        fake_api::wait_for(path, || object(fake, path).is_some_and(|o| done(&o))).await;
        object(fake, path).expect("found")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_leader_deploys_each_waypoint_and_reports_it_on_the_gateway() {
        let fake = Arc::new(Fake::default());
        fake.put(
            "/apis/gateway.networking.k8s.io/v1/gateways",
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": {"name": "wp", "namespace": "shop", "uid": "gw-uid", "generation": 3, "resourceVersion": "1"},
                "spec": {"gatewayClassName": "weft-waypoint",
                         "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
        );
        fake.put(
            "/apis/gateway.networking.k8s.io/v1/gateways",
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": {"name": "edge", "namespace": "shop", "uid": "edge-uid", "resourceVersion": "1"},
                "spec": {"gatewayClassName": "some-ingress", "listeners": []}}),
        );
        let client = fake_api::serve(fake.clone()).await;
        let (lead, leader) = watch::channel(false);
        let store = ConfigStore::new();
        let stop = CancellationToken::new();
        let settings = Settings {
            roots: tokio::sync::watch::channel("ROOT PEM".to_owned()).1,
            otlp_endpoint: Some("http://otel-collector.observability:4317".into()),
            ..Settings::default()
        };
        waypoint_deploy::spawn(
            client.clone(),
            settings.clone(),
            leader,
            store.subscribe(),
            stop.clone(),
        );
        // A follower writes nothing, however the config moves (watched
        // for half a second).
        store.set(weft_proto::model::Model::default());
        let written = tokio::time::timeout(Duration::from_millis(500), async {
            while object(&fake, DEPLOYMENT).is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(written.await.is_err(), "a follower wrote");
        lead.send_replace(true);

        let deployment = until(&fake, DEPLOYMENT, |_| true).await;
        let owner = &deployment["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Gateway");
        assert_eq!(owner["uid"], "gw-uid");
        assert_eq!(owner["controller"], true);
        let pod = &deployment["spec"]["template"];
        assert_eq!(
            pod["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
            "wp"
        );
        assert_eq!(pod["spec"]["serviceAccountName"], "wp");
        let args = pod["spec"]["containers"][0]["args"].to_string();
        assert!(args.contains("\"--name\",\"wp\",\"-n\",\"shop\""), "{args}");
        assert!(
            args.contains("\"--otlp-endpoint\",\"http://otel-collector.observability:4317\""),
            "spans go where the controller was told: {args}"
        );
        let audience = &pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
            ["audience"];
        assert_eq!(audience, "weft-ca");
        assert!(object(&fake, ACCOUNT).is_some(), "its ServiceAccount");
        let svc = until(&fake, SERVICE, |_| true).await;
        assert_eq!(svc["spec"]["ports"][0]["port"], 15008);
        let bundle = until(
            &fake,
            "/api/v1/namespaces/shop/configmaps/weft-trust-bundle",
            |_| true,
        )
        .await;
        assert_eq!(bundle["data"]["root-cert.pem"], "ROOT PEM");
        // Every made object parses as its Kubernetes type.
        let _: k8s_openapi::api::apps::v1::Deployment =
            serde_json::from_value(deployment.clone()).expect("a Deployment");
        let _: k8s_openapi::api::core::v1::Service =
            serde_json::from_value(svc).expect("a Service");

        // The Gateway says it is accepted, and not yet programmed: no pod
        // is available (the stand-in runs no kubelet).
        let gw = until(&fake, STATUS, |g| !g["status"].is_null()).await;
        let conditions = gw["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let get = |t: &str| {
            conditions
                .iter()
                .find(|c| c["type"] == t)
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(get("Accepted")["status"], "True");
        assert_eq!(get("Programmed")["status"], "False");
        assert_eq!(get("Programmed")["reason"], "Pending");
        assert_eq!(get("Programmed")["observedGeneration"], 3);
        assert!(
            object(&fake, "/apis/apps/v1/namespaces/shop/deployments/edge").is_none(),
            "another class's Gateway is not ours"
        );
        // The class itself is installed and accepted.
        let class_path = "/apis/gateway.networking.k8s.io/v1/gatewayclasses/weft-waypoint";
        let class = until(&fake, class_path, |c| !c["status"].is_null()).await;
        assert_eq!(
            class["spec"]["controllerName"],
            "weft.dev/waypoint-controller"
        );
        assert_eq!(class["status"]["conditions"][0]["type"], "Accepted");
        assert_eq!(class["status"]["conditions"][0]["status"], "True");

        // Pod churn that leaves the waypoints as they were costs the API
        // nothing (watched for half a second); a waypoint gaining an
        // instance takes a pass.
        let version =
            || object(&fake, DEPLOYMENT).map(|d| d["metadata"]["resourceVersion"].clone());
        let before = version();
        let model =
            |yaml: &str| weft_proto::model::Model::from_yaml(yaml, "cluster.local").expect("model");
        store.set(model(
            "workloads: [{name: web-1, serviceAccount: web, node: n, addresses: [10.1.0.5]}]\n",
        ));
        let rewritten = tokio::time::timeout(Duration::from_millis(500), async {
            while version() == before {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(rewritten.await.is_err(), "pod churn rewrote the waypoint");
        store.set(model(
            "waypoints: [{name: wp, namespace: shop, serviceAccount: wp, addresses: [10.1.0.9]}]\n",
        ));
        until(&fake, DEPLOYMENT, |d| {
            Some(d["metadata"]["resourceVersion"].clone()) != before
        })
        .await;
        stop.cancel();
    }
}

/// `kubectl weft` reads the controller through the API server: the
/// aggregated API admits the front proxy alone and serves the reads to the
/// user it vouches for, if RBAC lets that user read the mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aggregated_api_serves_the_user_the_front_proxy_vouches_for() {
    use fake_api::{API_SERVICE, FRONT_PROXY_SETTINGS, FrontProxy, tls_get};
    let fake = Arc::new(Fake::default());
    let addr = listen(fake.clone()).await;
    let dir = tempfile::tempdir().expect("dir");
    // The APIService as the manifests install it (no caBundle), and the
    // front proxy's settings as the API server publishes them.
    let front = Arc::new(FrontProxy::default());
    let objects = [
        (
            API_SERVICE,
            json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
            "metadata": {"name": "v1alpha1.api.weft.dev"},
            "spec": {"group": "api.weft.dev", "version": "v1alpha1", "groupPriorityMinimum": 1000,
                "versionPriority": 15, "service": {"namespace": "weft-system", "name": "weft-controller", "port": 8443}}}),
        ),
        (FRONT_PROXY_SETTINGS, front.settings()),
    ];
    for (path, o) in objects {
        fake.objects
            .lock()
            .expect("poisoned")
            .insert(path.into(), o);
    }
    let bound = controller(addr, dir.path()).await.expect("controller");
    let served = bound
        .aggregated_addr
        .expect("aggregated API in Kubernetes mode");

    // Every replica writes the mesh root into the APIService's caBundle.
    let bundle = fake.objects.lock().expect("poisoned")[API_SERVICE]["spec"]["caBundle"].clone();
    let bundle: k8s_openapi::ByteString = serde_json::from_value(bundle).expect("caBundle");
    assert_eq!(String::from_utf8(bundle.0).expect("PEM"), bound.root_pem);
    assert_eq!(
        fake.objects.lock().expect("poisoned")[API_SERVICE]["spec"]["group"],
        "api.weft.dev"
    );

    let proxy = front.client(Some("front-proxy-client"), &bound.root_pem);
    let get = |client, path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        tls_get(client, served, path, headers)
    };
    let alice = &[
        ("X-Remote-User", "alice"),
        ("X-Remote-Group", "system:authenticated"),
    ];
    // The listener follows the settings it read at start.
    let (code, discovery) = get(proxy.clone(), "/apis/api.weft.dev/v1alpha1", alice)
        .await
        .expect("discovery");
    assert_eq!(code, 200, "{discovery}");
    assert_eq!(discovery["kind"], "APIResourceList");
    assert!(
        discovery["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .any(|r| r["name"] == "workloads")
    );
    let (code, workloads) = get(
        proxy.clone(),
        "/apis/api.weft.dev/v1alpha1/workloads",
        alice,
    )
    .await
    .expect("workloads");
    assert_eq!(code, 200, "{workloads}");
    assert!(workloads["items"].is_array(), "{workloads}");
    let (code, certs) = get(
        proxy.clone(),
        "/apis/api.weft.dev/v1alpha1/certificates",
        alice,
    )
    .await
    .expect("certs");
    assert_eq!(code, 200, "{certs}");

    // bob is authenticated but RBAC does not let him read the mesh.
    let (code, denied) = get(
        proxy.clone(),
        "/apis/api.weft.dev/v1alpha1/workloads",
        &[("X-Remote-User", "bob")],
    )
    .await
    .expect("bob");
    assert_eq!(
        (code, denied["reason"].as_str()),
        (403, Some("Forbidden")),
        "{denied}"
    );
    assert!(
        denied["message"]
            .as_str()
            .unwrap_or_default()
            .contains("weft-viewer"),
        "{denied}"
    );
    // The front proxy named nobody.
    let (code, _) = get(proxy.clone(), "/apis/api.weft.dev/v1alpha1/workloads", &[])
        .await
        .expect("anonymous");
    assert_eq!(code, 401);
    // Writes are not served here (they go to the Kubernetes API): a PUT
    // or DELETE of a config object is refused by method, for alice too.
    for method in [http::Method::PUT, http::Method::DELETE] {
        let path = "/apis/api.weft.dev/v1alpha1/objects/Namespace/shop";
        let (code, _) = fake_api::tls_request(proxy.clone(), served, (method.clone(), path), alice)
            .await
            .expect("answered");
        assert_eq!(code, 405, "{method}");
    }

    // Headers mean nothing without the front proxy's certificate: another
    // CA's client, the right CA under a name not allowed, no certificate.
    let stranger = FrontProxy::default().client(Some("front-proxy-client"), &bound.root_pem);
    let wrong_name = front.client(Some("mallory"), &bound.root_pem);
    let none = front.client(None, &bound.root_pem);
    for (who, client) in [
        ("another CA", stranger),
        ("a name not allowed", wrong_name),
        ("no certificate", none),
    ] {
        let answer = get(client, "/apis/api.weft.dev/v1alpha1/workloads", alice).await;
        assert!(answer.is_err(), "{who}: served {answer:?}");
    }
    // Nor on the REST port, which wants a token.
    let tcp = tokio::net::TcpStream::connect(bound.rest_addr)
        .await
        .expect("REST port");
    let rest = fake_api::get_over(tcp, "/api/v1/workloads", alice)
        .await
        .expect("REST");
    assert_eq!(rest.0, 401);
    bound.shutdown().await;
}

/// A CA made with rcgen: (certificate, key) PEM; signed by `parent` if given.
fn make_ca(
    cn: &str,
    parent: Option<(&rcgen::Certificate, &rcgen::KeyPair)>,
) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = match parent {
        None => params.self_signed(&key).expect("root"),
        Some((pc, pk)) => {
            let issuer = rcgen::Issuer::from_ca_cert_der(pc.der(), pk).expect("issuer");
            params.signed_by(&key, &issuer).expect("intermediate")
        }
    };
    (cert, key)
}

fn secret_data(files: [(&str, String); 4]) -> Value {
    let data: serde_json::Map<String, Value> = files
        .into_iter()
        .map(|(k, v)| {
            (
                k.to_owned(),
                serde_json::to_value(k8s_openapi::ByteString(v.into_bytes())).expect("b64"),
            )
        })
        .collect();
    Value::Object(data)
}

/// A rotation step is an edit of Secret weft-ca, taken without a restart:
/// the new intermediate signs from then on, both roots are published, and
/// material that would not load is refused while the current CA signs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_follows_its_secret_without_a_restart() {
    let fake = Arc::new(Fake::default());
    meshed_shop(&fake);
    fake.projected_token(
        "za",
        ("weft-system", "ztunnel-a", "u-za"),
        "ztunnel",
        &["weft-ca"],
    );
    let addr = listen(fake.clone()).await;
    let dir = tempfile::tempdir().expect("dir");
    let bound = controller(addr, dir.path()).await.expect("controller");
    let old_root = bound.root_pem.clone();
    let api = Identity::new("cluster.local", "shop", "api").expect("identity");
    fake_api::wait_for("api-1 placed on node-a", || {
        bound.nodes.entitled("node-a", &api)
    })
    .await;

    // The new root, an intermediate under it; both roots trusted, the new one first.
    let (root, root_key) = make_ca("root-2", None);
    let (inter, inter_key) = make_ca("intermediate-2", Some((&root, &root_key)));
    let bundle = format!("{}{}", root.pem(), old_root);
    let data = secret_data([
        ("ca-cert.pem", inter.pem()),
        ("ca-key.pem", inter_key.serialize_pem()),
        ("root-cert.pem", bundle.clone()),
        ("cert-chain.pem", format!("{}{}", inter.pem(), root.pem())),
    ]);
    fake.objects
        .lock()
        .expect("poisoned")
        .get_mut(SECRET)
        .expect("the Secret")["data"] = data;
    fake_api::wait_for("the new roots taken", || {
        bound.ca.root_pem().starts_with(&root.pem())
    })
    .await;
    assert!(
        bound.ca.root_pem().contains(&old_root),
        "the old root stays trusted"
    );
    let chain = ask(&bound, "za", &api)
        .await
        .expect("a certificate after the rotation");
    assert_eq!(
        chain[1..],
        [inter.pem(), root.pem()],
        "signed by the new intermediate"
    );
    let published = |path: &str, field: &str| -> String {
        let objects = fake.objects.lock().expect("poisoned");
        match objects.get(path).map(|o| o["data"][field].clone()) {
            Some(Value::String(s)) => s,
            _ => String::new(),
        }
    };
    fake_api::wait_for("the trust bundle republished", || {
        published(BUNDLE, "root-cert.pem").starts_with(&root.pem())
    })
    .await;

    // Material that does not load (a key that is not the certificate's):
    // refused, the files and the signer unchanged.
    let (_, stranger) = make_ca("stranger", None);
    let mut bad = fake.objects.lock().expect("poisoned")[SECRET]["data"].clone();
    bad["ca-key.pem"] = serde_json::to_value(k8s_openapi::ByteString(
        stranger.serialize_pem().into_bytes(),
    ))
    .expect("b64");
    let reads = || {
        fake.gets
            .lock()
            .expect("poisoned")
            .get(SECRET)
            .copied()
            .unwrap_or(0)
    };
    let before = reads();
    fake.objects
        .lock()
        .expect("poisoned")
        .get_mut(SECRET)
        .expect("the Secret")["data"] = bad;
    fake_api::wait_for("two more looks at the Secret", || reads() >= before + 2).await;
    let chain = ask(&bound, "za", &api).await.expect("still signing");
    assert_eq!(chain[1], inter.pem(), "the current CA signs on");
    let key_on_disk = std::fs::read_to_string(dir.path().join("data/ca/ca-key.pem")).expect("key");
    assert_eq!(
        key_on_disk,
        inter_key.serialize_pem(),
        "the bad key was not written"
    );
    bound.shutdown().await;
}
