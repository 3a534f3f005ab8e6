//! weft-cni chained after the real CNI bridge plugin, against a real ztunnel
//! and real nftables. Needs root (CI runs as root).

use std::path::PathBuf;

use serde_json::json;
use weft_cli::demo::mesh::ZtunnelOptions;
use weft_integration::Mesh;
use weft_integration::netns::{PodNs, Topology, is_root, run};
use weft_ztunnel::cni::{self, Env};

fn conf(socket: &PathBuf, prev: &serde_json::Value) -> Vec<u8> {
    json!({"cniVersion": "1.0.0", "name": "weft-test", "type": "weft-cni",
           "socket": socket, "timeoutSeconds": 3, "prevResult": prev})
    .to_string()
    .into_bytes()
}

async fn weft_cni(
    command: &str,
    pod: &PodNs,
    socket: &PathBuf,
) -> Result<String, (String, cni::CniError)> {
    let env = Env {
        command: command.into(),
        container_id: format!("ctr-{}", pod.name),
        netns: pod.path.display().to_string(),
        args: format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={0};K8S_POD_UID=uid-{0}",
            pod.name
        ),
    };
    let stdin = conf(socket, &pod.cni_result);
    // The plugin is synchronous, as the runtime runs it.
    tokio::task::spawn_blocking(move || cni::run(&env, &stdin))
        .await
        .expect("plugin thread")
}

fn captured(pod: &PodNs) -> bool {
    run(&["ip", "netns", "exec", &pod.netns, "nft", "list", "tables"]).contains("weft")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chained_after_bridge_enrolls_checks_and_removes() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and nftables (CI runs as root)");
        return;
    }
    let mut topo = Topology::new();
    let mesh = Mesh::start().await;
    let node = topo.node("a", "10.244.7.0/24").expect("topology");
    let web = topo.pod(&node, "web").expect("topology");
    let plain = topo.pod(&node, "plain").expect("topology");
    let stranger = topo.pod(&node, "stranger").expect("topology");
    let yaml = format!(
        "workloads:\n  - {{name: web, serviceAccount: web, node: a, addresses: [{}]}}\n  - {{name: plain, node: a, meshed: false, addresses: [{}]}}\n",
        web.ip, plain.ip
    );
    let zt = mesh
        .ztunnel(
            "a",
            &yaml,
            &topo.dir.path().join("zt"),
            ZtunnelOptions::default(),
        )
        .await;
    let socket = zt.enroll_socket.clone();

    // ADD passes the bridge's result through unchanged and enrolls the pod.
    let out = weft_cni("ADD", &web, &socket).await.expect("ADD");
    let out: serde_json::Value = serde_json::from_str(&out).expect("JSON result");
    assert_eq!(out, web.cni_result);
    assert!(captured(&web), "no weft table in the pod after ADD");
    let listening = run(&["ip", "netns", "exec", &web.netns, "ss", "-Htln"]);
    for port in [":15001", ":15006", ":15008"] {
        assert!(
            listening.contains(port),
            "{port} not listening: {listening}"
        );
    }
    weft_cni("CHECK", &web, &socket)
        .await
        .expect("CHECK after ADD");

    // A pod the config marks as outside the mesh starts, uncaptured.
    weft_cni("ADD", &plain, &socket)
        .await
        .expect("ADD for an unmeshed workload");
    assert!(!captured(&plain));

    // A pod the ztunnel knows nothing about is refused: deny on doubt.
    let (_, err) = weft_cni("ADD", &stranger, &socket)
        .await
        .expect_err("unknown pod refused");
    assert_eq!(err.code, 100, "{err}");
    assert!(
        err.details.contains("no workload default/stranger"),
        "{err}"
    );
    assert!(!captured(&stranger));

    // DEL removes everything, and is idempotent.
    weft_cni("DEL", &web, &socket).await.expect("DEL");
    assert!(!captured(&web), "weft table left after DEL");
    weft_cni("DEL", &web, &socket).await.expect("second DEL");
    assert!(
        weft_cni("CHECK", &web, &socket).await.is_err(),
        "CHECK passes for a removed pod"
    );

    // The ztunnel gone: ADD fails within its bound instead of starting the pod unprotected.
    zt.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    let started = std::time::Instant::now();
    let (_, err) = weft_cni("ADD", &web, &socket)
        .await
        .expect_err("no ztunnel, no pod");
    assert_eq!(err.code, 11, "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_is_removed_when_a_test_panics() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces");
        return;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let mut topo = Topology::new();
        let node = topo.node("p", "10.244.9.0/24").expect("topology");
        let pod = topo.pod(&node, "victim").expect("topology");
        let _ = tx.send(vec![node.netns.clone(), pod.netns.clone()]);
        panic!("a test failing half way");
    });
    assert!(failing.await.expect_err("the task panicked").is_panic());
    let made = rx.await.expect("namespaces were made");
    let left = run(&["ip", "netns", "list"]);
    for ns in made {
        assert!(!left.contains(&ns), "{ns} left behind after a panic");
    }
}

/// Enrolled state follows the pods, not the ztunnel's memory: concurrent
/// identical ADDs all succeed (ADD is idempotent), and a pod deleted while
/// the ztunnel is down does not come back after its restart, though its
/// network namespace still exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_and_deletes_while_away() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and nftables (CI runs as root)");
        return;
    }
    let mut topo = Topology::new();
    let mesh = Mesh::start().await;
    let node = topo.node("c", "10.244.8.0/24").expect("topology");
    let web = topo.pod(&node, "web").expect("topology");
    let api = topo.pod(&node, "api").expect("topology");
    let yaml = format!(
        "workloads:\n  - {{name: web, serviceAccount: web, node: c, addresses: [{}]}}\n  - {{name: api, serviceAccount: api, node: c, addresses: [{}]}}\n",
        web.ip, api.ip
    );
    let dir = topo.dir.path().join("zt");
    let zt = mesh
        .ztunnel("c", &yaml, &dir, ZtunnelOptions::default())
        .await;
    let socket = zt.enroll_socket.clone();
    // Eight runtimes' worth of the same ADD at once, each on its own thread.
    let env = Env {
        command: "ADD".into(),
        container_id: "ctr-web".into(),
        netns: web.path.display().to_string(),
        args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=uid-web".into(),
    };
    let stdin = conf(&socket, &web.cni_result);
    let adds: Vec<_> = (0..8)
        .map(|_| {
            let (env, stdin) = (env.clone(), stdin.clone());
            tokio::task::spawn_blocking(move || cni::run(&env, &stdin))
        })
        .collect();
    for add in adds {
        add.await
            .expect("plugin thread")
            .unwrap_or_else(|(_, e)| panic!("an identical ADD failed: {e}"));
    }
    weft_cni("ADD", &api, &socket).await.expect("ADD api");
    assert!(captured(&web) && captured(&api));

    // The ztunnel goes away; web is deleted meanwhile; its namespace lingers.
    zt.shutdown().await;
    weft_cni("DEL", &web, &socket)
        .await
        .expect("DEL succeeds with the ztunnel away");
    let zt = mesh
        .ztunnel("c", &yaml, &dir, ZtunnelOptions::default())
        .await;
    weft_integration::eventually("api restored", || zt.node.pods.get("uid-api").is_some()).await;
    assert!(
        zt.node.pods.get("uid-web").is_none(),
        "a deleted pod came back"
    );
    assert!(!captured(&web), "the deleted pod's capture left behind");
    weft_cni("CHECK", &api, &socket)
        .await
        .expect("api enrolled");
    zt.shutdown().await;
}
