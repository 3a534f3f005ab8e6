//! weft-cni chained after the real CNI bridge plugin, against a real ztunnel
//! and real nftables. Needs root (CI runs as root).

use std::path::PathBuf;

use serde_json::json;
use weft_controller::demo::mesh::ZtunnelOptions;
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
