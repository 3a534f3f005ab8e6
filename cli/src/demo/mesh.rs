//! The local mesh demo: a controller, two simulated nodes each with its own
//! ztunnel, pods in network namespaces made by the CNI bridge + host-local
//! plugins followed by weft-cni, and real traffic between them.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_ztunnel::app::{self as ztunnel, Bound as Ztunnel};
use weft_ztunnel::cni::{self, Env};
use weft_ztunnel::node::Mode;

use super::topology::{CNI_PATH, LinkCapture, PodNs, Topology, is_root, try_run};
use weft_controller::app::{self as controller, Config};

pub const VIP: &str = "10.96.0.10";
pub const TD: &str = "cluster.local";

/// Why the namespace demo cannot run here, if it cannot.
pub fn missing_prerequisite() -> Option<String> {
    if !is_root() {
        return Some(
            "pods in network namespaces and nftables capture need root (try: sudo)".into(),
        );
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        if try_run(&[tool, "-V"]).is_err() && try_run(&[tool, "-v"]).is_err() {
            return Some(format!("`{tool}` is missing (apt-get install {package})"));
        }
    }
    if !Path::new(CNI_PATH).join("bridge").exists() {
        return Some(format!(
            "the CNI bridge plugin is not in {CNI_PATH} (apt-get install containernetworking-plugins)"
        ));
    }
    None
}

/// What the checks concluded, once they ran (`--keep` then waits for Ctrl-C).
type Verdict = Arc<std::sync::Mutex<Option<Result<(), String>>>>;

/// Runs the demo; Ctrl-C at any point removes everything it made.
pub async fn run(keep: bool) -> anyhow::Result<()> {
    let verdict = Verdict::default();
    tokio::select! {
        r = demo(keep, verdict.clone()) => r,
        _ = tokio::signal::ctrl_c() => {
            // Dropping the demo future removes the namespaces (Topology's Drop).
            match verdict.lock().expect("poisoned").take() {
                Some(Ok(())) => Ok(()),
                Some(Err(failed)) => bail!("{failed}"),
                None => bail!("interrupted; the namespaces, links and rules it made are removed"),
            }
        }
    }
}

struct Pod {
    ns: PodNs,
    node: &'static str,
    sa: &'static str,
    meshed: bool,
    service: bool,
}

pub struct Check {
    ok: bool,
    what: String,
}

pub fn check(ok: bool, what: impl Into<String>) -> Check {
    Check {
        ok,
        what: what.into(),
    }
}

async fn demo(keep: bool, verdict: Verdict) -> anyhow::Result<()> {
    println!("weft demo — a two-node mesh in network namespaces on this machine\n");
    let data = tempfile::tempdir()?;
    let ctl = controller::build(Config {
        grpc_addr: "127.0.0.1:0".parse()?,
        ..Config::local(data.path().join("controller"))
    })
    .await
    .context("starting the controller")?;
    println!("controller   CA on {} ({})", ctl.grpc_addr, ctl.identity);

    let mut topo = Topology::new();
    let a = topo.node("a", "10.244.1.0/24")?;
    let b = topo.node("b", "10.244.2.0/24")?;
    let link = topo.link(&a, &b)?;
    // The waypoint's pod (second act): its own namespace, never captured.
    let waypoint_pod = topo.pod(&b, "waypoint")?;
    let mut pods = Vec::new();
    for (node, name, sa, meshed, service) in [
        (&a, "web", "web", true, false),
        (&a, "batch", "batch", true, false),
        (&a, "legacy", "legacy", false, false),
        (&b, "api-1", "api", true, true),
        (&b, "api-2", "api", true, true),
    ] {
        let ns = topo.pod(node, name)?;
        let node = if node.name == "a" { "node-a" } else { "node-b" };
        pods.push(Pod {
            ns,
            node,
            sa,
            meshed,
            service,
        });
    }
    // The config, as Kubernetes objects in the controller's watched directory.
    let config_dir = data.path().join("controller/config");
    std::fs::write(config_dir.join("shop.yaml"), mesh_yaml(&pods))?;
    let served = async {
        let mut rx = ctl.sources.clone();
        while ctl.config.current().model.workloads.len() < pods.len() {
            rx.changed().await?;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .context("the controller did not serve the config directory within 10 s")??;
    println!(
        "config       {} (Namespace, Pods, Service, AuthorizationPolicy), watched",
        config_dir.join("shop.yaml").display()
    );
    let mut ztunnels = BTreeMap::new();
    for node in ["node-a", "node-b"] {
        let zt = start_ztunnel(&ctl, node, None, data.path(), ZtunnelOptions::default()).await?;
        let ready = async {
            while !zt.config_ready.load(std::sync::atomic::Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .with_context(|| format!("{node}'s ztunnel got no config from the controller"))?;
        println!(
            "{node}       ztunnel up, config pushed over Delta xDS; metrics http://{}/metrics",
            zt.metrics_addr
        );
        ztunnels.insert(node, zt);
    }
    println!("link         {} between the node namespaces\n", link);

    // Every pod goes through the CNI chain a runtime would run: bridge +
    // host-local (done above), then weft-cni with the bridge's result.
    for p in &pods {
        let socket = &ztunnels[p.node].enroll_socket;
        weft_cni_add(&p.ns, socket)
            .await
            .with_context(|| format!("weft-cni ADD for {}", p.ns.name))?;
        let how = if p.meshed {
            "captured, mTLS as"
        } else {
            "not meshed (left alone)"
        };
        let id = if p.meshed {
            format!(" spiffe://{TD}/ns/default/sa/{}", p.sa)
        } else {
            String::new()
        };
        println!("pod {:<8} {} {:<12} {how}{id}", p.ns.name, p.node, p.ns.ip);
    }
    for p in pods.iter().filter(|p| p.service) {
        serve_http(&p.ns).await?;
    }
    println!("service      default/api  {VIP}:80 → api-1, api-2 :8080\n");

    let pod = |name: &str| {
        pods.iter()
            .find(|p| p.ns.name == name)
            .map(|p| &p.ns)
            .expect("demo pod")
    };
    let vip: SocketAddr = format!("{VIP}:80").parse()?;
    let mut checks = Vec::new();

    // web → api through the VIP: balanced, over mTLS, nothing in plaintext.
    let capture = LinkCapture::start(&a.netns, &link, data.path());
    let mut answered: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..10 {
        match get(
            pod("web"),
            vip,
            &format!("/order/{i}?card=PLAINTEXT-MARKER"),
        )
        .await
        {
            Ok(body) => *answered.entry(body.trim().to_owned()).or_default() += 1,
            Err(e) => *answered.entry(format!("error: {e}")).or_default() += 1,
        }
    }
    println!("traffic      web → http://{VIP}/ ×10 (plain HTTP from the app, HBONE on the wire)");
    for (who, n) in &answered {
        println!("             {n:>2} answered by {who}");
    }
    let ok = answered.len() == 2
        && answered.values().all(|n| *n == 5)
        && answered.keys().all(|k| k.starts_with("api-"));
    checks.push(check(
        ok,
        "web reaches api via its VIP, balanced over both endpoints",
    ));
    if let Some(capture) = capture {
        let (plaintext_seen, hbone_packets) = capture.finish(b"PLAINTEXT-MARKER").await;
        println!(
            "wire         {hbone_packets} packets to port 15008 between the nodes; payload marker seen in clear: {plaintext_seen}"
        );
        checks.push(check(
            !plaintext_seen && hbone_packets > 0,
            "only TLS to 15008 crosses the link between nodes",
        ));
    }

    // batch is denied by policy; legacy (outside the mesh) by STRICT mTLS.
    // Each refusal is confirmed by the receiving ztunnel's own counters.
    let counter = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let stats = &ztunnels["node-b"].node.stats;
    let denied = get(pod("batch"), vip, "/").await;
    println!(
        "policy       batch → api: {}",
        outcome(&denied, "refused by DENY policy default/deny-batch")
    );
    checks.push(check(
        denied.is_err() && stats.denied() == 1,
        "a DENY policy stops batch → api (counted by node-b)",
    ));
    let api1 = SocketAddr::new(pod("api-1").ip, 8080);
    let legacy = get(pod("legacy"), api1, "/").await;
    println!(
        "strict       legacy (no mesh) → api-1 {api1}: {}",
        outcome(&legacy, "refused: plaintext in STRICT mode")
    );
    checks.push(check(
        legacy.is_err() && counter(&stats.plaintext_refused) == 1,
        "plaintext from outside the mesh is refused in STRICT mode (counted by node-b)",
    ));

    // What node-b's ztunnel recorded about who connected.
    let zb = &ztunnels["node-b"];
    println!("\nnode-b saw   (weft_tcp_connections_opened_total, reporter=destination)");
    let metrics = weft_ztunnel::telemetry::prometheus().render();
    let mut principals = 0;
    for line in metrics.lines().filter(|l| {
        l.starts_with("weft_tcp_connections_opened_total")
            && l.contains(r#"reporter="destination""#)
    }) {
        let field = |k: &str| {
            line.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("?")
                .to_owned()
        };
        let count = line.rsplit(' ').next().unwrap_or("?");
        println!(
            "             {count:>3} × {} → {} ({})",
            field("source_principal"),
            field("destination_workload"),
            field("connection_security_policy")
        );
        principals += 1;
    }
    checks.push(check(
        principals > 0 && metrics.contains("sa/web"),
        "node-b's metrics name web's SPIFFE identity",
    ));
    println!(
        "             inbound denied by policy: {}",
        zb.node.stats.denied()
    );
    // Second act: a waypoint for the api service account.
    println!(
        "\nL7           a waypoint for service account api (Gateway API routes, retries, faults)"
    );
    let wp = super::l7::set_up(&ctl, &config_dir, &waypoint_pod, data.path()).await?;
    checks.extend(super::l7::run(pod("web"), &wp).await);
    println!(
        "\nL7 policy    the same waypoint enforcing: authorization, a circuit breaker, a rate limit, outlier detection"
    );
    checks.extend(super::l7::guard(pod("web"), &wp).await);

    let version = ctl.config.current().version;
    let proxies = ctl.proxies.all();
    println!("\nconfig stream (controller at version {version})");
    for (node, p) in &proxies {
        println!(
            "             {node}  connected: {}  ACKed: {:?}  NACKs: {}",
            p.connected,
            p.acked.values().collect::<std::collections::BTreeSet<_>>(),
            p.nacks.len()
        );
    }
    checks.push(check(
        proxies.len() == 3
            && proxies.values().all(|p| {
                p.connected && p.nacks.is_empty() && p.acked.values().all(|v| *v == version)
            }),
        "both ztunnels and the waypoint ACKed the controller's current config",
    ));
    println!("\ncertificates (keys made on the nodes, never sent)");
    for (node, zt) in &ztunnels {
        for (id, state) in zt.node.certs.snapshot() {
            if let Some(c) = state.cert() {
                println!(
                    "             {node}  {id}  serial {}…  {}h left",
                    &c.serial()[..11.min(c.serial().len())],
                    c.remaining().as_secs() / 3600
                );
            }
        }
    }

    println!();
    for c in &checks {
        println!("{} {}", if c.ok { "  ok  " } else { " FAIL " }, c.what);
    }
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.what.as_str())
        .collect();
    println!(
        "\n{} of {} checks passed",
        checks.len() - failed.len(),
        checks.len()
    );
    if keep {
        let result = if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        };
        *verdict.lock().expect("poisoned") = Some(result);
        println!("\n--keep: the mesh stays up until Ctrl-C. Try:");
        println!(
            "  sudo ip netns exec {} curl -s http://{VIP}/",
            pod("web").netns
        );
        println!(
            "  curl -s http://{}/config_dump",
            ztunnels["node-b"].admin_addr
        );
        println!(
            "  edit {} — the mesh follows (a broken file keeps its last good version)",
            config_dir.join("shop.yaml").display()
        );
        println!(
            "  curl -s -H \"Authorization: Bearer $(cat {})\" http://{}/api/v1/proxies",
            data.path().join("controller/api-token").display(),
            ctl.rest_addr
        );
        println!(
            "  sudo ip netns exec {} curl -s -H 'x-version: v2' http://{VIP}/",
            pod("web").netns
        );
        std::future::pending::<()>().await;
    }
    wp.stop().await;
    for (_, zt) in ztunnels {
        zt.shutdown().await;
    }
    drop(topo);
    ctl.shutdown().await;
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}

fn outcome(r: &Result<String, String>, refused: &str) -> String {
    match r {
        Ok(body) => format!("ANSWERED ({}) — expected a refusal", body.trim()),
        Err(_) => refused.to_owned(),
    }
}

/// The demo's mesh as Kubernetes objects, the shapes `kubectl get -o yaml`
/// prints: pods carry the IPs the CNI plugins gave them.
fn mesh_yaml(pods: &[Pod]) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {weft.dev/mesh: enabled}}\n",
    );
    for p in pods {
        let mut labels = format!(
            "app: {}",
            if p.service { "api" } else { p.ns.name.as_str() }
        );
        if p.service {
            // api-1 is v1, api-2 is v2 (the waypoint act splits between them).
            let version = p.ns.name.trim_start_matches("api-");
            labels += &format!(", version: v{version}");
        }
        if !p.meshed {
            labels += ", weft.dev/mesh: disabled";
        }
        y += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, labels: {{{labels}}}}}\n\
             spec: {{nodeName: {}, serviceAccountName: {}, containers: [{{name: app, image: demo, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
             status: {{phase: Running, podIP: {}}}\n",
            p.ns.name, p.node, p.sa, p.ns.ip
        );
    }
    y += &format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: default}}\n\
         spec: {{clusterIP: {VIP}, selector: {{app: api}}, ports: [{{port: 80, targetPort: http}}]}}\n"
    );
    y += &format!(
        "---\napiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-batch, namespace: default}}\n\
         spec: {{selector: {{matchLabels: {{app: api}}}}, action: DENY, rules: [{{principals: [\"spiffe://{TD}/ns/default/sa/batch\"]}}]}}\n"
    );
    y
}

/// How a local ztunnel should behave (the demo's and the tests' knobs).
#[derive(Debug, Clone, Copy)]
pub struct ZtunnelOptions {
    pub mode: Mode,
    pub deny_passthrough: bool,
    /// How long live connections may finish at shutdown or handover.
    pub drain_deadline: std::time::Duration,
}

impl Default for ZtunnelOptions {
    fn default() -> Self {
        ZtunnelOptions {
            mode: Mode::Strict,
            deny_passthrough: false,
            drain_deadline: std::time::Duration::from_secs(30),
        }
    }
}

/// A ztunnel for `node` on this machine, reading `config` (or, with `None`,
/// taking config pushed by `ctl`), trusting `ctl`'s root, with every port on
/// 127.0.0.1:0 and its state under `dir/<node>`.
pub async fn start_ztunnel(
    ctl: &controller::Bound,
    node: &str,
    config: Option<&Path>,
    dir: &Path,
    options: ZtunnelOptions,
) -> anyhow::Result<Ztunnel> {
    start_ztunnel_on(ctl, node, (config, dir), options, None).await
}

/// [`start_ztunnel`], its control work on `control` (a proxy's own
/// control runtime), as the `weft-ztunnel` binary runs it.
pub async fn start_ztunnel_on(
    ctl: &controller::Bound,
    node: &str,
    (config, dir): (Option<&Path>, &Path),
    options: ZtunnelOptions,
    control: Option<tokio::runtime::Handle>,
) -> anyhow::Result<Ztunnel> {
    let dir = dir.join(node);
    std::fs::create_dir_all(&dir)?;
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, &ctl.root_pem)?;
    let any = "127.0.0.1:0".parse()?;
    ztunnel::build(ztunnel::Config {
        node: node.into(),
        trust_domain: TD.into(),
        model_file: config.map(Path::to_owned),
        ca_addr: ctl.grpc_addr,
        ca_root: root,
        token_file: ctl.nodes.ensure(node)?,
        enroll_socket: dir.join("ztunnel.sock"),
        state_dir: dir.join("state"),
        mode: options.mode,
        deny_passthrough: options.deny_passthrough,
        admin_addr: any,
        metrics_addr: any,
        ready_addr: any,
        socks5_addr: any,
        control,
        drain_deadline: options.drain_deadline,
    })
    .await
    .with_context(|| format!("starting {node}'s ztunnel"))
}

async fn weft_cni_add(pod: &PodNs, socket: &Path) -> anyhow::Result<()> {
    let env = Env {
        command: "ADD".into(),
        container_id: pod.netns.clone(),
        netns: pod.path.display().to_string(),
        args: format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={}", pod.name),
    };
    let stdin = json!({"cniVersion": "1.0.0", "name": "weft-demo", "type": "weft-cni",
                       "socket": socket, "prevResult": pod.cni_result})
    .to_string();
    tokio::task::spawn_blocking(move || cni::run(&env, stdin.as_bytes()))
        .await?
        .map(|_| ())
        .map_err(|(_, e)| anyhow::anyhow!(e))
}

/// A tiny HTTP server on :8080 in the pod, answering with the pod's name;
/// `/flaky` fails (503) every other time, `/hold` answers after 300 ms,
/// and `/sick` fails on api-1 only.
async fn serve_http(pod: &PodNs) -> anyhow::Result<()> {
    let listener = pod.listen("0.0.0.0:8080".parse()?).await?;
    let name: Arc<str> = pod.name.clone().into();
    let flaky = Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (name, flaky) = (name.clone(), flaky.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let asked = |p: &[u8]| buf[..n].starts_with(p);
                if asked(b"GET /hold") {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let fails = (asked(b"GET /flaky")
                    && flaky.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 2 == 0)
                    || (asked(b"GET /sick") && &*name == "api-1");
                let status = if fails {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let body = format!("{name}\n");
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(())
}

/// One HTTP GET from inside `pod`; the response body, or why there was none.
async fn get(pod: &PodNs, dst: SocketAddr, path: &str) -> Result<String, String> {
    match super::l7::request(pod, dst, path, "").await? {
        (200, body) => Ok(body),
        (status, _) => Err(format!("answered {status}")),
    }
}
