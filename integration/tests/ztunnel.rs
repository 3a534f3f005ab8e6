//! The ztunnel across real network namespaces: pods made by the CNI bridge
//! and host-local plugins, capture by real nftables rules, mTLS on the wire.
//! Needs root (CI runs as root); without it each test says so and passes.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_cli::demo::mesh::ZtunnelOptions;
use weft_integration::netns::{LinkCapture, NodeNs, PodNs, Topology, is_root, run};
use weft_integration::{Mesh, enroll};
use weft_proto::model::Model;
use weft_ztunnel::app::Bound;
use weft_ztunnel::node::Mode;

const VIP: &str = "10.96.0.10";
const MARKER: &str = "PLAINTEXT-MARKER-7f3a";
/// The drain deadline of the tests' ztunnels.
const DRAIN: Duration = Duration::from_secs(3);

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root for network namespaces and nftables (CI runs as root)");
            return;
        }
    };
}

/// An application listening on 0.0.0.0:8080 inside a pod: it greets with
/// its own name, then echoes.
async fn app(pod: &PodNs) {
    let listener = pod
        .listen("0.0.0.0:8080".parse().expect("addr"))
        .await
        .expect("app listens");
    let name = pod.name.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let hello = format!("hello from {name}\n");
            tokio::spawn(async move {
                let _ = s.write_all(hello.as_bytes()).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

/// Sends the marker through `dst` and returns (greeting, echo), bounded.
async fn exchange(pod: &PodNs, dst: SocketAddr) -> Result<(String, String), String> {
    let talk = async {
        let mut s = pod
            .connect(dst)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(MARKER.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.shutdown().await.map_err(|e| e.to_string())?;
        let mut all = String::new();
        s.read_to_string(&mut all)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let (hello, echo) = all
            .split_once('\n')
            .ok_or_else(|| format!("no greeting in {all:?}"))?;
        Ok((hello.to_owned(), echo.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), talk)
        .await
        .map_err(|_| "timed out".to_owned())?
}

struct Cluster {
    topo: Topology,
    node_a: NodeNs,
    mesh: Mesh,
    link: String,
    client: PodNs,
    server_b: PodNs,
    server_a: PodNs,
    outsider: PodNs,
    zt_a: Bound,
    zt_b: Bound,
}

fn model_yaml(c: &[(&PodNs, &str, &str, bool)], extra: &str) -> String {
    let mut y = String::from("workloads:\n");
    for (pod, node, sa, svc) in c {
        y += &format!(
            "  - {{name: {}, serviceAccount: {sa}, node: {node}, addresses: [{}], labels: {{app: {}}}{}}}\n",
            pod.name,
            pod.ip,
            pod.name,
            if *svc {
                ", services: [default/api]"
            } else {
                ""
            }
        );
    }
    y += &format!(
        "services:\n  - {{name: api, addresses: [{VIP}], ports: [{{port: 80, targetPort: 8080}}]}}\n"
    );
    y + extra
}

impl Cluster {
    async fn start(mode: Mode) -> Cluster {
        Self::start_with(mode, false).await
    }

    /// With `client_serves`, the client pod (which runs no application) is
    /// also an endpoint of the api Service: a pod gone before the config
    /// knew it, as in every rollout.
    async fn start_with(mode: Mode, client_serves: bool) -> Cluster {
        let mut topo = Topology::new();
        let mesh = Mesh::start().await;
        let a = topo.node("a", "10.244.1.0/24").expect("topology");
        let b = topo.node("b", "10.244.2.0/24").expect("topology");
        let link = topo.link(&a, &b).expect("topology");
        let client = topo.pod(&a, "client").expect("topology");
        let server_a = topo.pod(&a, "server-a").expect("topology");
        let outsider = topo.pod(&a, "outsider").expect("topology");
        let server_b = topo.pod(&b, "server-b").expect("topology");
        let yaml = model_yaml(
            &[
                (&client, "a", "client", client_serves),
                (&server_a, "a", "server-a", false),
                (&server_b, "b", "server", true),
            ],
            "",
        );
        let zt_a = ztunnel(&topo, &mesh, "a", &yaml, mode).await;
        let zt_b = ztunnel(&topo, &mesh, "b", &yaml, mode).await;
        for (zt, pod) in [(&zt_a, &client), (&zt_a, &server_a), (&zt_b, &server_b)] {
            enroll(zt, pod).await;
        }
        for pod in [&server_a, &server_b, &outsider] {
            app(pod).await;
        }
        Cluster {
            topo,
            node_a: a,
            mesh,
            link,
            client,
            server_b,
            server_a,
            outsider,
            zt_a,
            zt_b,
        }
    }
}

async fn ztunnel(topo: &Topology, mesh: &Mesh, node: &str, yaml: &str, mode: Mode) -> Bound {
    let dir = topo.dir.path().join(format!("zt-{node}"));
    mesh.ztunnel(
        node,
        yaml,
        &dir,
        ZtunnelOptions {
            mode,
            deny_passthrough: false,
            drain_deadline: DRAIN,
        },
    )
    .await
}

/// Every access-log line of the ztunnels in this test process, as the JSON
/// lines `--log-format json` writes.
fn access_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let _ = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter("access=info")
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        log
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// GET with curl, the way an operator would; panics on a non-200.
async fn curl(addr: SocketAddr, path: &str) -> String {
    let url = format!("http://{addr}{path}");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sSf", "--max-time", "5", &url])
            .output()
    })
    .await
    .expect("curl thread")
    .expect("curl (install curl)");
    assert!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_traffic_is_mtls_and_policy_applies() {
    require_root!();
    let log = access_log();
    let c = Cluster::start(Mode::Strict).await;
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("vip");
    // Client on node A → service VIP → server on node B.
    let capture = LinkCapture::start(&c.node_a.netns, &c.link, c.topo.dir.path())
        .expect("tcpdump (install tcpdump)");
    let (hello, echo) = exchange(&c.client, vip)
        .await
        .expect("client reaches api through the mesh");
    let (marker_seen, hbone_packets) = capture.finish(MARKER.as_bytes()).await;
    assert_eq!(hello, "hello from server-b");
    assert_eq!(echo, MARKER);
    assert!(
        hbone_packets > 0,
        "traffic between the nodes went to port 15008"
    );
    assert!(
        !marker_seen,
        "the payload's plaintext marker crossed the link between nodes"
    );
    assert!(c.zt_b.node.stats.inbound_hbone.load(Ordering::Relaxed) >= 1);
    assert!(c.zt_a.node.stats.outbound_hbone.load(Ordering::Relaxed) >= 1);

    // The receiver's access log names the sender's identity.
    let sender = "spiffe://cluster.local/ns/default/sa/client";
    let logged = || {
        let text = String::from_utf8_lossy(&log.lock().expect("log")).into_owned();
        text.lines().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v["direction"] == "inbound"
                && v["src.identity"] == sender
                && v["dst.workload"] == "default/server-b"
                && v["security"] == "mutual_tls"
                && v["bytes_received"].as_u64().unwrap_or(0) > 0
        })
    };
    weft_integration::eventually("receiver's access log line for the client", logged).await;

    // The receiver's metrics name the sender's identity, over mTLS. (The
    // recorder is per process, and other tests' ztunnels share it here.)
    let metrics = curl(c.zt_b.metrics_addr, "/metrics").await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("weft_tcp_connections_opened_total")
                && l.contains(r#"reporter="destination""#)
                && l.contains(r#"destination_workload="server-b""#)
        })
        .unwrap_or_else(|| panic!("no inbound connection metric in:\n{metrics}"));
    for want in [
        r#"source_principal="spiffe://cluster.local/ns/default/sa/client""#,
        r#"source_workload="client""#,
        r#"destination_workload="server-b""#,
        r#"destination_service="default/api""#,
        r#"connection_security_policy="mutual_tls""#,
    ] {
        assert!(line.contains(want), "{want} missing from {line}");
    }
    assert!(metrics.contains("weft_tcp_received_bytes_total"));
    assert_eq!(
        curl(c.zt_b.ready_addr, "/healthz/ready").await.trim(),
        "ready"
    );
    let dump: serde_json::Value =
        serde_json::from_str(&curl(c.zt_b.admin_addr, "/config_dump").await).expect("JSON");
    assert_eq!(dump["enrolledPods"][0]["name"], "server-b");
    assert_eq!(dump["certificates"][0]["state"], "available");
    assert_eq!(dump["mode"], "STRICT");

    // A DENY for the client's principal: refused, counted.
    let deny = r#"policies: [{name: no-client, action: DENY, selector: {app: server-b},
        rules: [{principals: ["spiffe://cluster.local/ns/default/sa/client"]}]}]"#;
    let yaml = model_yaml(
        &[
            (&c.client, "a", "client", false),
            (&c.server_a, "a", "server-a", false),
            (&c.server_b, "b", "server", true),
        ],
        &format!("{deny}\n"),
    );
    // A connection open before the DENY is closed by it, not just new ones.
    let mut live = c.client.connect(vip).await.expect("connect");
    let mut greeting = [0u8; 5];
    live.read_exact(&mut greeting)
        .await
        .expect("live connection answered");
    c.zt_b
        .set_model(Model::from_yaml(&yaml, "cluster.local").expect("model"));
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), live.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "live connection survived the DENY");
    assert_eq!(c.zt_b.node.stats.inbound_revoked.load(Ordering::Relaxed), 1);
    let refused = exchange(&c.client, vip).await;
    assert!(
        refused.is_err(),
        "DENY policy let the client through: {refused:?}"
    );
    assert_eq!(c.zt_b.node.stats.denied(), 1);

    // An ALLOW naming exactly the client lets it in again.
    let allow = r#"policies: [{name: only-client, action: ALLOW, selector: {app: server-b},
        rules: [{principals: ["spiffe://cluster.local/ns/default/sa/client"]}]}]"#;
    let yaml = model_yaml(
        &[
            (&c.client, "a", "client", false),
            (&c.server_a, "a", "server-a", false),
            (&c.server_b, "b", "server", true),
        ],
        &format!("{allow}\n"),
    );
    c.zt_b
        .set_model(Model::from_yaml(&yaml, "cluster.local").expect("model"));
    exchange(&c.client, vip)
        .await
        .expect("ALLOWed principal gets through");
    drop(c.mesh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_strict_removal_and_restart() {
    require_root!();
    let c = Cluster::start(Mode::Strict).await;
    let server_a: SocketAddr = SocketAddr::new(c.server_a.ip, 8080);

    // Same node: still HBONE, through server-a's own 15008.
    let before = c.zt_a.node.stats.inbound_hbone.load(Ordering::Relaxed);
    let (hello, _) = exchange(&c.client, server_a)
        .await
        .expect("same-node traffic");
    assert_eq!(hello, "hello from server-a");
    assert_eq!(
        c.zt_a.node.stats.inbound_hbone.load(Ordering::Relaxed),
        before + 1
    );

    // A pod outside the mesh is refused in STRICT mode.
    let outsider = exchange(&c.outsider, server_a).await;
    assert!(outsider.is_err(), "STRICT let plaintext in: {outsider:?}");
    assert_eq!(
        c.zt_a.node.stats.plaintext_refused.load(Ordering::Relaxed),
        1
    );

    // Restart the ztunnel: pods come back from its state, traffic works again.
    let state = c.topo.dir.path().join("zt-a");
    let yaml = std::fs::read_to_string(state.join("a.yaml")).expect("config");
    c.zt_a.shutdown().await;
    let zt_a = ztunnel(&c.topo, &c.mesh, "a", &yaml, Mode::Strict).await;
    // A listener of the old instance can linger for a moment in the kernel;
    // restore retries until it can bind (bounded here by `eventually`).
    weft_integration::eventually("both pods restored", || zt_a.node.pods.specs().len() == 2).await;
    exchange(&c.client, server_a)
        .await
        .expect("traffic after restart");

    // Removing a pod removes its table and its listeners.
    let reply =
        weft_ztunnel::enroll::request(&zt_a.enroll_socket, r#"{"op":"remove","uid":"server-a"}"#)
            .await
            .expect("remove");
    assert!(reply.ok, "{reply:?}");
    let tables = run(&[
        "ip",
        "netns",
        "exec",
        &c.server_a.netns,
        "nft",
        "list",
        "tables",
    ]);
    assert!(
        !tables.contains("weft"),
        "capture table left behind: {tables}"
    );
    let listening = run(&["ip", "netns", "exec", &c.server_a.netns, "ss", "-Htln"]);
    for port in [":15001", ":15006", ":15008"] {
        assert!(
            !listening.contains(port),
            "listener {port} left behind: {listening}"
        );
    }
    drop(c.zt_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_accepts_plaintext_from_outside_the_mesh() {
    require_root!();
    let c = Cluster::start(Mode::Permissive).await;
    let server_a: SocketAddr = SocketAddr::new(c.server_a.ip, 8080);
    let (hello, echo) = exchange(&c.outsider, server_a)
        .await
        .expect("PERMISSIVE lets plaintext in");
    assert_eq!(
        (hello.as_str(), echo.as_str()),
        ("hello from server-a", MARKER)
    );
    assert_eq!(
        c.zt_a.node.stats.inbound_plaintext.load(Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_on_pod_ports() {
    require_root!();
    let _log = access_log();
    let c = Cluster::start(Mode::Permissive).await;
    let server_a = c.server_a.ip;
    let stats = &c.zt_a.node.stats;
    let closed_promptly =
        |r: Result<(String, String), String>| assert!(r.is_err(), "expected a refusal, got {r:?}");

    // Straight at the capture ports, which would otherwise loop forever.
    closed_promptly(exchange(&c.client, "127.0.0.1:15001".parse().expect("addr")).await);
    assert_eq!(stats.outbound_failed.total(), 1);
    assert_eq!(
        stats.outbound_passthrough.load(Ordering::Relaxed),
        0,
        "forwarded to itself"
    );
    closed_promptly(exchange(&c.outsider, SocketAddr::new(server_a, 15006)).await);
    closed_promptly(exchange(&c.outsider, SocketAddr::new(server_a, 15001)).await);
    // 15006 directly: refused by the inbound guard. 15001 from outside: the
    // pod's prerouting sends it to 15006, which forwards it (PERMISSIVE) to
    // 15001 inside the pod, where the outbound guard refuses it.
    assert_eq!(stats.plaintext_refused.load(Ordering::Relaxed), 1);
    assert_eq!(stats.outbound_failed.total(), 2);
    assert_eq!(
        stats.outbound_passthrough.load(Ordering::Relaxed),
        0,
        "forwarded to itself"
    );

    // A valid mesh identity aiming CONNECT at the ztunnel's own ports in
    // the pod: 400 each, as for any address that is not an application
    // port; the application port itself still answers 200.
    let hbone = SocketAddr::new(server_a, 15008);
    let node = c.mesh.node("x");
    let caller = node.workload("default", "caller");
    let cert = node.cert(&caller).await;
    let server_id = weft_proto::Identity::new("cluster.local", "default", "server-a").expect("id");
    let config = weft_proto::tls::client_config(
        Some(cert.clone()),
        weft_proto::tls::Trust::OwnCert(cert),
        vec![server_id],
    );
    let tcp = c.outsider.connect(hbone).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(weft_proto::tls::server_name(), tcp)
        .await
        .expect("mTLS");
    let (mut h2, conn) = h2::client::handshake(tls).await.expect("h2");
    let conn = tokio::spawn(conn);
    let ztunnel_ports = [15001, 15006, 15008, 15000, 15020, 15021];
    let cases = ztunnel_ports
        .map(|p| (p, 400))
        .into_iter()
        .chain([(8080, 200)]);
    for (port, want) in cases {
        let req = http::Request::builder()
            .method("CONNECT")
            .uri(format!("{server_a}:{port}"))
            .body(())
            .expect("req");
        let (resp, _) = h2.send_request(req, false).expect("send");
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("answered")
            .expect("response");
        assert_eq!(resp.status(), want, "CONNECT to port {port}");
        if want == 200 {
            // The answer says who answered, as Istio's ztunnel does.
            assert_eq!(
                resp.headers()["baggage"],
                "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.pod.name=server-a,service.name=server-a,service.version=latest"
            );
        }
    }
    let log = String::from_utf8(access_log().lock().expect("log").clone()).expect("utf-8");
    assert_eq!(
        log.matches("CONNECT to a ztunnel port").count(),
        ztunnel_ports.len(),
        "each refusal has its access-log line"
    );
    // The outbound refusals above are typed: a loop is "no route".
    assert!(
        log.lines()
            .any(|l| l.contains("capture port itself") && l.contains(r#""response_flags":"NR""#)),
        "no NR flag in:\n{log}"
    );
    drop(h2);
    conn.abort(); // closes the connection, streams and all

    // Garbage and a half-open flood on 15008, from a pod outside the mesh.
    let before = c
        .zt_a
        .hbone_stats
        .handshake_failures
        .load(Ordering::Relaxed);
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x16, 3, 1, 0xff, 0xff, 1],
        &[0u8; 4096],
    ] {
        let mut s = c.outsider.connect(hbone).await.expect("connect");
        let _ = s.write_all(junk).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink))
            .await
            .expect("closed promptly");
    }
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(c.outsider.connect(hbone).await.expect("connect"));
    }
    // Real traffic is served while the flood holds its sockets open.
    let (hello, _) = exchange(&c.client, SocketAddr::new(server_a, 8080))
        .await
        .expect("served during flood");
    assert_eq!(hello, "hello from server-a");
    drop(silent);
    weft_integration::eventually("garbage and abandoned handshakes counted", || {
        c.zt_a
            .hbone_stats
            .handshake_failures
            .load(Ordering::Relaxed)
            >= before + 103
    })
    .await;
    weft_integration::eventually("no inbound connection left behind", || {
        // Only the client's pooled HBONE connection may remain.
        c.zt_a
            .hbone_stats
            .active_connections
            .load(Ordering::Relaxed)
            <= 1
    })
    .await;
}

/// A pod as the controller's local directory holds it: the Kubernetes shape.
fn pod_yaml(pod: &PodNs, node: &str, sa: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: app, image: app}}]}}\n\
         status: {{phase: Running, podIP: {}}}\n---\n",
        pod.name, pod.ip
    )
}

const NAMESPACE_AND_SERVICE: &str = "apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {app: api}, ports: [{port: 80, targetPort: 8080}]}
";

const DENY_CLIENT: &str = "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-client, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules: [{principals: [\"spiffe://cluster.local/ns/default/sa/client\"]}]
";

/// Waits until every proxy has ACKed the config version that first
/// satisfies `what`.
async fn converged(mesh: &Mesh, what: &str, done: impl Fn(&Model) -> bool) {
    weft_integration::eventually(what, || done(&mesh.controller.config.current().model)).await;
    let version = mesh.controller.config.current().version;
    // Every type: a proxy in step for policies may still have the workload
    // change in flight.
    weft_integration::eventually("both ztunnels ACK it", || {
        ["a", "b"].iter().all(|n| {
            mesh.controller.proxies.get(n).is_some_and(|s| {
                s.connected
                    && weft_proto::resources::ZTUNNEL_TYPES
                        .iter()
                        .all(|t| s.acked.get(*t) >= Some(&version))
            })
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_from_the_directory_and_rest_reaches_live_traffic_and_survives_the_controller() {
    require_root!();
    let mut topo = Topology::new();
    let mesh = Mesh::start().await;
    let a = topo.node("a", "10.244.1.0/24").expect("topology");
    let b = topo.node("b", "10.244.2.0/24").expect("topology");
    topo.link(&a, &b).expect("topology");
    let client = topo.pod(&a, "client").expect("topology");
    let newcomer = topo.pod(&a, "newcomer").expect("topology");
    let server = topo.pod(&b, "server-b").expect("topology");
    let late = topo.pod(&b, "late").expect("topology");
    let dir = mesh.config_dir();
    std::fs::create_dir_all(&dir).expect("config dir");
    let first = format!(
        "{NAMESPACE_AND_SERVICE}---\n{}{}",
        pod_yaml(&client, "a", "client", "client"),
        pod_yaml(&server, "b", "server", "api")
    );
    std::fs::write(dir.join("shop.yaml"), first).expect("write config");
    weft_integration::eventually("the directory is served", || {
        mesh.controller.config.current().model.workloads.len() == 2
    })
    .await;
    let zt_dir = topo.dir.path();
    let zt_a = mesh
        .ztunnel_pushed("a", &zt_dir.join("zt-a"), ZtunnelOptions::default())
        .await;
    let zt_b = mesh
        .ztunnel_pushed("b", &zt_dir.join("zt-b"), ZtunnelOptions::default())
        .await;
    for zt in [&zt_a, &zt_b] {
        weft_integration::eventually("ztunnel has the pushed config", || {
            zt.config_ready.load(Ordering::Acquire)
        })
        .await;
    }
    enroll(&zt_a, &client).await;
    enroll(&zt_b, &server).await;
    for pod in [&server, &late, &newcomer] {
        app(pod).await;
    }
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("vip");
    exchange(&client, vip)
        .await
        .expect("traffic on pushed config");

    // A pod the config does not know yet cannot be enrolled (deny on doubt)…
    let line = format!(
        r#"{{"op":"add","uid":"late","namespace":"default","name":"late","netns":"{}","ips":["{}"]}}"#,
        late.path.display(),
        late.ip
    );
    let refused = weft_ztunnel::enroll::request(&zt_b.enroll_socket, &line)
        .await
        .expect("reply");
    assert!(!refused.ok);
    // …until a file in the directory adds it: no restart anywhere. The
    // newcomer (a new identity) is added now and enrolled during the outage:
    // its node fetched its certificate when the config placed it there.
    let more =
        pod_yaml(&late, "b", "late", "late") + &pod_yaml(&newcomer, "a", "newcomer", "newcomer");
    std::fs::write(dir.join("late.yaml"), more).expect("write config");
    converged(&mesh, "the new pods are served", |m| {
        m.workload("default", "late").is_some()
    })
    .await;
    assert_eq!(
        mesh.controller
            .proxies
            .get("a")
            .expect("a")
            .last_push_resources,
        2,
        "two new pods, two resources"
    );
    enroll(&zt_b, &late).await;
    let before = zt_b.node.stats.inbound_hbone.load(Ordering::Relaxed);
    let (hello, _) = exchange(&client, SocketAddr::new(late.ip, 8080))
        .await
        .expect("late pod reachable");
    assert_eq!(hello, "hello from late");
    assert_eq!(
        zt_b.node.stats.inbound_hbone.load(Ordering::Relaxed),
        before + 1,
        "over HBONE"
    );

    // A DENY written through the REST API ends a live connection within a second.
    let mut live = client.connect(vip).await.expect("connect");
    let mut greeting = [0u8; 5];
    live.read_exact(&mut greeting).await.expect("answered");
    let (api, token) = (mesh.controller.rest_addr, mesh.controller.api_token.clone());
    let policy = "/api/v1/objects/AuthorizationPolicy/default/no-client";
    let (status, body) =
        weft_integration::curl(api, "PUT", policy, Some(&token), Some(DENY_CLIENT.into())).await;
    assert_eq!(status, 200, "{body}");
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(1), live.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "live connection still open a second after the DENY was written"
    );
    assert!(
        exchange(&client, vip).await.is_err(),
        "new connections are refused too"
    );
    converged(&mesh, "the policy is served", |m| !m.policies.is_empty()).await;
    let (_, proxies) =
        weft_integration::curl(api, "GET", "/api/v1/proxies", Some(&token), None).await;
    let proxies: serde_json::Value = serde_json::from_str(&proxies).expect("JSON");
    let version = mesh.controller.config.current().version;
    for p in proxies["items"].as_array().expect("items") {
        assert_eq!(
            p["ackedVersions"][weft_proto::resources::AUTHORIZATION],
            version,
            "{p}"
        );
    }

    // The controller goes away: traffic keeps flowing on the last config,
    // for pods already there and for a pod that starts meanwhile.
    let stopped = mesh.stop().await;
    enroll(&zt_a, &newcomer).await;
    let (hello, _) = exchange(&newcomer, SocketAddr::new(late.ip, 8080))
        .await
        .expect("a pod enrolled while the controller is down reaches a peer");
    assert_eq!(hello, "hello from late");
    exchange(&client, SocketAddr::new(late.ip, 8080))
        .await
        .expect("existing pods keep talking");
    assert!(
        exchange(&client, vip).await.is_err(),
        "and the DENY still holds"
    );

    // Back: the proxies reconnect and converge; what the REST API accepted
    // before the outage is still there, and new changes apply.
    let mesh = stopped.start().await;
    converged(
        &mesh,
        "the policy written before the outage is served",
        |m| m.policies.len() == 1 && m.workloads.len() == 4,
    )
    .await;
    let (status, _) = weft_integration::curl(
        mesh.controller.rest_addr,
        "DELETE",
        policy,
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200);
    converged(&mesh, "the policy is gone", |m| m.policies.is_empty()).await;
    exchange(&client, vip)
        .await
        .expect("the VIP answers again once the DENY is deleted");
}

/// A Service endpoint whose ztunnel answers 503 (its application is gone)
/// costs the client nothing: the source ztunnel tries another endpoint,
/// counts it, and skips the refusing one until the config changes. A pod
/// IP dialled directly is never sent elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_traffic_skips_an_endpoint_that_refuses_the_tunnel() {
    require_root!();
    let c = Cluster::start_with(Mode::Strict, true).await;
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("addr");
    let stats = &c.zt_a.node.stats;
    for i in 0..6 {
        let (hello, echo) = exchange(&c.client, vip)
            .await
            .unwrap_or_else(|e| panic!("connection {i} through the VIP failed: {e}"));
        assert_eq!(hello, "hello from server-b");
        assert_eq!(echo, MARKER);
    }
    assert_eq!(
        stats.outbound_retried.load(Ordering::Relaxed),
        1,
        "one refusal, then the refusing endpoint is skipped"
    );
    let direct = exchange(&c.client, SocketAddr::new(c.client.ip, 8080)).await;
    assert!(direct.is_err(), "a direct pod IP is that pod or nothing");
    assert_eq!(stats.outbound_retried.load(Ordering::Relaxed), 1);
}

/// A long-lived connection through the mesh: greeted, then echoing.
async fn open_long(pod: &PodNs, dst: SocketAddr) -> tokio::net::TcpStream {
    let mut s = pod.connect(dst).await.expect("connect");
    let mut hello = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut hello))
        .await
        .expect("greeting in time")
        .expect("greeting");
    assert!(n > 0, "closed before the greeting");
    s
}

/// One echo on a long-lived connection, bounded.
async fn echo(s: &mut tokio::net::TcpStream, what: &[u8]) -> Result<(), String> {
    let talk = async {
        s.write_all(what).await.map_err(|e| e.to_string())?;
        let mut back = vec![0u8; what.len()];
        s.read_exact(&mut back).await.map_err(|e| e.to_string())?;
        (back == what)
            .then_some(())
            .ok_or("echo differs".to_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), talk)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// New connections, one after another from each of `workers` tasks per
/// destination, until `stop`: (succeeded, failures).
fn load(
    pod: Arc<PodNs>,
    dsts: &[SocketAddr],
    stop: tokio_util::sync::CancellationToken,
) -> (
    Arc<std::sync::atomic::AtomicU64>,
    Vec<tokio::task::JoinHandle<Vec<String>>>,
) {
    let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    for &dst in dsts.iter().chain(dsts) {
        let (pod, ok, stop) = (pod.clone(), ok.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            // The first failures, and how many there were: a path that
            // fails at once must not fill memory while the test waits.
            let (mut failures, mut failed) = (Vec::new(), 0usize);
            while !stop.is_cancelled() {
                match exchange(&pod, dst).await {
                    Ok((_, echo)) if echo == MARKER => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed += 1;
                        if failures.len() < 10 {
                            failures.push(format!("{dst}: {other:?}"));
                        }
                    }
                }
            }
            if failed > failures.len() {
                failures.push(format!("... {failed} failures in all"));
            }
            failures
        }));
    }
    (ok, workers)
}

/// A ztunnel restart under load loses nothing. While new connections arrive
/// (through the restarted node's outbound and inbound paths) and a few
/// long-lived ones stay open, a new ztunnel takes over the old one's
/// sockets: no new connection fails, the long ones keep working on the old
/// process after the handover, and are closed at its drain deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_loses_no_connection() {
    require_root!();
    // Bounded as a whole: a restart that wedges fails here, with the load
    // stopped, instead of running on.
    tokio::time::timeout(Duration::from_secs(120), restart_under_load())
        .await
        .expect("the restart under load finished within 120 s");
}

async fn restart_under_load() {
    let log = access_log();
    let Cluster {
        topo,
        mesh,
        client,
        server_a,
        server_b,
        zt_a: old,
        zt_b: _zt_b,
        ..
    } = Cluster::start(Mode::Strict).await;
    // Same node (outbound, then inbound HBONE on the restarted ztunnel) and
    // cross node (outbound on it, inbound on the other).
    let dsts = [
        SocketAddr::new(server_a.ip, 8080),
        SocketAddr::new(server_b.ip, 8080),
    ];
    let mut long = Vec::new();
    for dst in dsts {
        long.push(open_long(&client, dst).await);
    }
    let client = Arc::new(client);
    let stop = tokio_util::sync::CancellationToken::new();
    let (ok, workers) = load(client.clone(), &dsts, stop.clone());
    let served = || ok.load(Ordering::Relaxed);
    weft_integration::eventually("load under way", || served() >= 50).await;

    // A client speaking nonsense on the handover socket changes nothing:
    // the running ztunnel keeps serving and still hands over afterwards.
    let handover = weft_ztunnel::handover::socket_path(&topo.dir.path().join("zt-a/a/state"));
    let garbage = tokio_seqpacket::UnixSeqpacket::connect(&handover)
        .await
        .expect("the running ztunnel offers its sockets");
    garbage.send(b"{\"op\":\"nonsense\"}").await.expect("send");
    let mut reply = [0u8; 64];
    let answered = tokio::time::timeout(Duration::from_secs(5), garbage.recv(&mut reply)).await;
    assert!(answered.is_ok(), "closed, not left hanging");
    drop(garbage);
    assert!(
        !old.handed_over.is_cancelled(),
        "nonsense took nothing over"
    );
    let yaml =
        std::fs::read_to_string(topo.dir.path().join("zt-a").join("a.yaml")).expect("config");
    let started = std::time::Instant::now();
    let at_restart = served();
    let new = ztunnel(&topo, &mesh, "a", &yaml, Mode::Strict).await;
    tokio::time::timeout(Duration::from_secs(20), old.handed_over.cancelled())
        .await
        .expect("the old ztunnel handed over its sockets");
    let draining = tokio::spawn(old.shutdown());
    for (i, l) in long.iter_mut().enumerate() {
        echo(l, b"after the handover")
            .await
            .unwrap_or_else(|e| panic!("long connection {i} cut before the deadline: {e}"));
    }
    let after_handover = served();
    weft_integration::eventually("new connections served after the handover", || {
        served() >= after_handover + 100
    })
    .await;
    let cut = tokio::time::timeout(DRAIN + Duration::from_secs(10), draining)
        .await
        .expect("the old ztunnel stops by its deadline")
        .expect("shutdown task");
    assert!(
        cut >= long.len(),
        "the long connections were open at the deadline: cut {cut}"
    );
    for (i, l) in long.iter_mut().enumerate() {
        let mut b = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), l.read(&mut b)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "long connection {i} still open after the deadline: {read:?}"
        );
        // Cut mid-stream, its task dropped: still exactly one access-log
        // line, saying so, with what it carried.
        let src = l.local_addr().expect("addr").to_string();
        let text = String::from_utf8_lossy(&log.lock().expect("log")).into_owned();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["direction"] == "outbound" && v["src.addr"] == src.as_str())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "one access-log line for long connection {i}: {lines:?}"
        );
        assert_eq!(lines[0]["response_flags"], "DT", "{:?}", lines[0]);
        let sent = lines[0]["bytes_sent"].as_u64().unwrap_or(0);
        assert!(sent >= 18, "what it carried: {:?}", lines[0]);
    }
    stop.cancel();
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.expect("load worker"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = (served() - at_restart) as f64 / elapsed;
    assert!(
        failures.is_empty(),
        "{} new connections failed across the restart: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        new.node.stats.outbound_hbone.load(Ordering::Relaxed) >= 100,
        "the new ztunnel carried the load"
    );
    eprintln!(
        "restart under load: {} connections after the restart began, {rate:.0}/s, 0 failed; {cut} cut at the deadline",
        served() - at_restart
    );
}

/// A rollout that stops the old ztunnel first: it drains (a long connection
/// keeps it draining), a connection arriving meanwhile waits in the
/// listener's queue instead of being refused, and a successor started
/// during the drain takes the sockets and serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_started_during_the_drain_takes_the_sockets() {
    require_root!();
    let log = access_log();
    let c = Cluster::start(Mode::Strict).await;
    let mut long = open_long(&c.client, SocketAddr::new(c.server_b.ip, 8080)).await;
    let draining = tokio::spawn(c.zt_a.shutdown());
    let (client, dst) = (Arc::new(c.client), SocketAddr::new(c.server_a.ip, 8080));
    let queued = tokio::spawn({
        let client = client.clone();
        async move { exchange(&client, dst).await }
    });
    let yaml = std::fs::read_to_string(c.topo.dir.path().join("zt-a/a.yaml")).expect("config");
    let _new = ztunnel(&c.topo, &c.mesh, "a", &yaml, Mode::Strict).await;
    let (hello, echoed) = queued.await.expect("task").unwrap_or_else(|e| {
        let log = String::from_utf8_lossy(&log.lock().expect("log")).into_owned();
        panic!("the connection made during the drain is served by the successor: {e}\n{log}")
    });
    assert_eq!(
        (hello.as_str(), echoed.as_str()),
        ("hello from server-a", MARKER)
    );
    echo(&mut long, b"still draining")
        .await
        .expect("the long one lives until the deadline");
    let cut = tokio::time::timeout(DRAIN + Duration::from_secs(10), draining)
        .await
        .expect("the old ztunnel stops by its deadline")
        .expect("shutdown task");
    assert!(cut >= 1, "the long connection was cut at the deadline");
}
