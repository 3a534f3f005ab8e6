//! `weft-bench controller`: the config push at scale. 10,000 workloads on
//! 100 nodes, 1,000 services, 100 simulated proxies (real xDS clients over
//! TLS) against an in-process controller.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_proto::xds::{self, XdsConfig};

use crate::{Mesh, rss_kib};

/// The mesh as the controller's local directory holds it: Kubernetes
/// objects, one file for the pods but the one that will move.
fn write_config(
    dir: &std::path::Path,
    workloads: usize,
    services: usize,
    nodes: usize,
    moved: usize,
    moved_ip: u8,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut y = String::with_capacity(workloads * 300);
    for n in 0..50 {
        y += &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{weft.dev/mesh: enabled}}}}\n---\n"
        );
    }
    for s in 0..services {
        y += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc{s}, namespace: ns{}}}\nspec: {{clusterIP: 10.96.{}.{}, selector: {{app: svc{s}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n",
            s % 50,
            s / 256,
            s % 256
        );
    }
    std::fs::write(dir.join("base.yaml"), &y)?;
    let pod = |i: usize, last: u8| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: w{i}, namespace: ns{}, labels: {{app: svc{}}}}}\nspec: {{nodeName: node-{}, serviceAccountName: sa{}, containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, podIP: 10.{}.{}.{last}}}\n---\n",
            i % 50,
            i % services,
            i % nodes,
            i % 200,
            (i / 250) / 256,
            (i / 250) % 256
        )
    };
    // 10,000 pods a file: a file is read whole, up to 8 MiB.
    for (n, chunk) in (0..workloads)
        .filter(|i| *i != moved)
        .collect::<Vec<_>>()
        .chunks(10_000)
        .enumerate()
    {
        let mut pods = String::with_capacity(chunk.len() * 250);
        for i in chunk {
            // .1-.250 are taken within each block; a moved pod gets .252.
            pods += &pod(*i, (i % 250 + 1) as u8);
        }
        std::fs::write(dir.join(format!("pods-{n}.yaml")), pods)?;
    }
    std::fs::write(dir.join("moved.yaml"), pod(moved, moved_ip))?;
    Ok(())
}

/// A controller on loopback and its local directory source.
async fn local_mesh() -> anyhow::Result<(Mesh, Arc<weft_controller::source::local::LocalSource>)> {
    let mesh = Mesh::start().await;
    let local = mesh
        .controller
        .local
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the bench needs the local source"))?;
    Ok((mesh, local))
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

pub async fn run(workloads: usize, services: usize, proxies: usize) -> anyhow::Result<()> {
    let nodes = proxies;
    let (mesh, local) = local_mesh().await?;
    let before = rss_kib();
    let moved = workloads / 2;
    let started = Instant::now();
    write_config(
        &mesh.config_dir(),
        workloads,
        services,
        nodes,
        moved,
        (moved % 250 + 1) as u8,
    )?;
    local.rescan();
    let version = mesh.controller.config.current().version;
    anyhow::ensure!(
        mesh.controller.config.current().model.workloads.len() == workloads,
        "the directory was not served: {:?}",
        local.status().borrow().files
    );
    println!(
        "controller bench: {workloads} workloads on {nodes} nodes, {services} services, {proxies} proxies\n"
    );
    println!(
        "config read from the directory (Kubernetes YAML), translated and encoded in {:.0} ms (version {version})",
        started.elapsed().as_secs_f64() * 1e3
    );
    let controller_kib = rss_kib().saturating_sub(before);

    // Full sync: every proxy connects at once.
    let t0 = Instant::now();
    let mut clients = Vec::new();
    for n in 0..proxies {
        let node = format!("node-{n}");
        let token = std::fs::read_to_string(mesh.controller.nodes.ensure(&node)?)?;
        let (rx, _) = xds::spawn(XdsConfig {
            controller: mesh.controller.grpc_addr,
            roots: mesh.roots().into(),
            controller_identity: mesh.controller.identity.clone(),
            credential: token.as_str().into(),
            node,
            trust_domain: "cluster.local".into(),
            types: &weft_proto::resources::ZTUNNEL_TYPES,
        });
        clients.push(rx);
    }
    let mut sync = Vec::new();
    for rx in &mut clients {
        rx.wait_for(|m| m.as_ref().is_some_and(|m| m.workloads.len() == workloads))
            .await?;
        sync.push(t0.elapsed());
    }
    let with_proxies_kib = rss_kib().saturating_sub(before);
    println!(
        "full sync of {proxies} proxies: p50 {:.0} ms, p99 {:.0} ms (all at once)",
        pct(&mut sync, 0.5).as_secs_f64() * 1e3,
        pct(&mut sync, 0.99).as_secs_f64() * 1e3
    );

    // One pod changes its address: its file is rewritten.
    let new_ip: std::net::IpAddr =
        format!("10.{}.{}.252", (moved / 250) / 256, (moved / 250) % 256).parse()?;
    let sent = || -> u64 {
        mesh.controller
            .proxies
            .all()
            .values()
            .map(|s| s.resources_sent)
            .sum()
    };
    let sent_before = sent();
    // Each proxy is timed on its own task, so one slow proxy does not hide
    // how fast the others were.
    let t1 = Instant::now();
    let waiters: Vec<_> = clients
        .iter()
        .map(|rx| {
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let _ = rx
                    .wait_for(|m| {
                        m.as_ref()
                            .is_some_and(|m| m.workload_by_ip(new_ip).is_some())
                    })
                    .await;
                t1.elapsed()
            })
        })
        .collect();
    let pod = format!("ns{}/w{moved}", moved % 50);
    write_config_moved(&mesh.config_dir(), &pod, new_ip)?;
    let v2 = local
        .rescan()
        .ok_or_else(|| anyhow::anyhow!("the move was not applied"))?;
    let set_ms = t1.elapsed().as_secs_f64() * 1e3;
    let mut seen = Vec::new();
    for w in waiters {
        seen.push(w.await?);
    }
    // …and every proxy's ACK, as the controller records it.
    let acked = loop {
        let all = mesh.controller.proxies.all();
        if all
            .values()
            .filter(|s| s.acked.get(weft_proto::resources::WORKLOAD) == Some(&v2))
            .count()
            == proxies
        {
            break t1.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let sent_after = sent();
    let per_proxy = (sent_after - sent_before) as f64 / proxies as f64;
    let one = weft_proto::resources::encode(&mesh.controller.config.current().model);
    let bytes = one[weft_proto::resources::WORKLOAD][&pod].body.value.len();
    println!(
        "one-pod change (file rewritten; the 250 ms poll not counted): read, translated, encoded in {set_ms:.0} ms; applied by proxies p50 {:.1} ms, p99 {:.1} ms; all {proxies} ACKed after {:.1} ms",
        pct(&mut seen, 0.5).as_secs_f64() * 1e3,
        pct(&mut seen, 0.99).as_secs_f64() * 1e3,
        acked.as_secs_f64() * 1e3
    );
    println!(
        "pushed per proxy for that change: {per_proxy:.1} resource(s), {bytes} bytes of resource (independent of mesh size)"
    );
    println!(
        "memory: controller with the config loaded +{} MiB; process with {proxies} simulated proxies +{} MiB (the proxies' caches included)",
        controller_kib / 1024,
        with_proxies_kib / 1024
    );
    drop(clients);
    let _ = Arc::strong_count(&mesh.controller.config.current());
    Ok(())
}

/// Rewrites the moved pod's file with its new address.
fn write_config_moved(
    dir: &std::path::Path,
    pod: &str,
    ip: std::net::IpAddr,
) -> anyhow::Result<()> {
    let path = dir.join("moved.yaml");
    let text = std::fs::read_to_string(&path)?;
    let old = text
        .split("podIP: ")
        .nth(1)
        .and_then(|r| r.split('}').next())
        .ok_or_else(|| anyhow::anyhow!("{pod}: no podIP in moved.yaml"))?
        .to_owned();
    std::fs::write(
        &path,
        text.replace(&format!("podIP: {old}"), &format!("podIP: {ip}")),
    )?;
    Ok(())
}

/// `weft-bench reconnect`: `proxies` proxies with nothing cached connect at
/// once (a node pool scaled up, or every ztunnel restarted) to a
/// `weft-controller` process serving `workloads` workloads, each a
/// lightweight xDS client that ACKs what it gets. The controller runs as its
/// own process (the binary beside this one), so its resident memory,
/// sampled every 10 ms from /proc, is its own.
pub async fn reconnect(workloads: usize, proxies: usize, first_syncs: usize) -> anyhow::Result<()> {
    let services = 1_000;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_config(&data.join("config"), workloads, services, 100, 0, 1)?;
    let (controller, grpc) = spawn_controller(&data, proxies, first_syncs)?;
    let pid = controller.0.id();
    let roots = std::fs::read_to_string(data.join("ca/root-cert.pem"))?;
    let config = weft_proto::tls::controller_client_config(
        weft_proto::tls::Trust::Static(Arc::new(weft_proto::tls::TrustBundle::from_pem(&roots)?)),
        weft_proto::identity::controller("cluster.local")?,
    );
    let token = |n: usize| std::fs::read_to_string(data.join(format!("nodes/node-{n}.token")));
    let channel = || weft_proto::grpc::tls_channel(grpc, config.clone());
    // One proxy first: the config is loaded and served.
    let t = Instant::now();
    loop {
        let (_, count) = raw_proxy(channel(), token(0)?, "node-0".into(), t).await?;
        if count >= workloads {
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "config not served");
    }
    let before = process_rss_kib(pid);
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampling = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(process_rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    println!(
        "reconnect bench: {workloads} workloads, {services} services; {proxies} proxies with nothing cached connect at once; --first-syncs {first_syncs}"
    );
    let t0 = Instant::now();
    let mut handles = Vec::with_capacity(proxies);
    for n in 0..proxies {
        handles.push(tokio::spawn(raw_proxy(
            channel(),
            token(n)?,
            format!("node-{n}"),
            t0,
        )));
    }
    let mut synced = Vec::with_capacity(proxies);
    let mut resources = 0;
    for h in handles {
        let (at, count) = h.await??;
        synced.push(at);
        resources += count;
    }
    sampling.abort();
    let peak_kib = peak.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "all {proxies} synced after {:.1} s (p50 {:.1} s, p99 {:.1} s); {resources} resources sent",
        t0.elapsed().as_secs_f64(),
        pct(&mut synced, 0.5).as_secs_f64(),
        pct(&mut synced, 0.99).as_secs_f64(),
    );
    println!(
        "controller memory: {} MiB resident with the config loaded; peak during the reconnect {} MiB (+{} MiB)",
        before / 1024,
        peak_kib / 1024,
        peak_kib.saturating_sub(before) / 1024
    );
    drop(controller);
    Ok(())
}

/// Kills the controller process on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `weft-controller` on loopback serving `<data>/config`, with `nodes`
/// nodes registered; its gRPC address from its "controller ready" line.
fn spawn_controller(
    data: &std::path::Path,
    nodes: usize,
    first_syncs: usize,
) -> anyhow::Result<(Child, std::net::SocketAddr)> {
    use std::io::BufRead;
    let bin = std::env::current_exe()?.with_file_name("weft-controller");
    anyhow::ensure!(
        bin.exists(),
        "{} missing: cargo build --release -p weft-controller",
        bin.display()
    );
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("--data-dir").arg(data);
    cmd.args(["--grpc-addr", "127.0.0.1:0", "--rest-addr", "127.0.0.1:0"]);
    cmd.args(["--metrics-addr", "127.0.0.1:0"]);
    cmd.args(["--first-syncs", &first_syncs.to_string()]);
    for n in 0..nodes {
        cmd.args(["--node", &format!("node-{n}")]);
    }
    cmd.env("RUST_LOG", "warn,weft_controller::app=info");
    cmd.stderr(std::process::Stdio::piped());
    let mut child = Child(cmd.spawn()?);
    let stderr = child
        .0
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let ready = loop {
        let line = lines
            .next()
            .ok_or_else(|| anyhow::anyhow!("controller exited before it was ready"))??;
        if line.contains("controller ready") {
            break line;
        }
    };
    // Keep draining its log, so it never writes into a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    // Nodes are registered just after it is ready.
    let last = data.join(format!("nodes/node-{}.token", nodes.saturating_sub(1)));
    let started = Instant::now();
    while !last.exists() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "nodes not registered"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let at = ready
        .find("grpc=")
        .ok_or_else(|| anyhow::anyhow!("{ready}"))?
        + 5;
    let grpc = ready[at..]
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .parse()?;
    Ok((child, grpc))
}

fn process_rss_kib(pid: u32) -> u64 {
    crate::proc_status_kib(&pid.to_string(), "VmRSS:")
}

/// Subscribes to every type with nothing cached and ACKs each response;
/// returns when every type has answered (dropping the stream: the clients
/// are not what is measured).
async fn raw_proxy(
    channel: tonic::transport::Channel,
    token: String,
    node: String,
    t0: Instant,
) -> anyhow::Result<(Duration, usize)> {
    use weft_proto::pb::xds::DeltaDiscoveryRequest;
    use weft_proto::pb::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let types = weft_proto::resources::ZTUNNEL_TYPES;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for t in types {
        tx.send(DeltaDiscoveryRequest {
            node: Some(weft_proto::pb::xds::Node {
                id: node.clone(),
                ..Default::default()
            }),
            type_url: t.to_owned(),
            ..Default::default()
        })
        .await?;
    }
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {}", token.trim()).parse()?);
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(256 * 1024 * 1024)
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    let mut answered = std::collections::HashSet::new();
    let mut count = 0;
    while let Some(resp) = responses.message().await? {
        count += resp.resources.len();
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await?;
        answered.insert(resp.type_url);
        if answered.len() == types.len() {
            return Ok((t0.elapsed(), count));
        }
    }
    anyhow::bail!("{node}: stream ended before every type answered")
}
