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
    let mut pods = String::with_capacity(workloads * 250);
    for i in (0..workloads).filter(|i| *i != moved) {
        // .1-.250 are taken within each block; a moved pod gets .252.
        pods += &pod(i, (i % 250 + 1) as u8);
    }
    std::fs::write(dir.join("pods.yaml"), pods)?;
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
            roots: mesh.roots(),
            controller_identity: mesh.controller.identity.clone(),
            token,
            node,
            trust_domain: "cluster.local".into(),
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
/// once to a controller serving `workloads` workloads (a node pool scaled
/// up, or every ztunnel restarted), each a lightweight xDS client that ACKs
/// and drops what it gets. Reports the process's resident memory above the
/// loaded controller, sampled every 10 ms (the clients' in-flight messages
/// included: an upper bound on the controller's), and how long until every
/// proxy had all its types.
pub async fn reconnect(workloads: usize, services: usize, proxies: usize) -> anyhow::Result<()> {
    let (mesh, local) = local_mesh().await?;
    write_config(&mesh.config_dir(), workloads, services, 100, 0, 1)?;
    local.rescan();
    anyhow::ensure!(
        mesh.controller.config.current().model.workloads.len() == workloads,
        "the directory was not served"
    );
    let mut tokens = Vec::with_capacity(proxies);
    for n in 0..proxies {
        let node = format!("node-{n}");
        tokens.push((
            std::fs::read_to_string(mesh.controller.nodes.ensure(&node)?)?,
            node,
        ));
    }
    let before = rss_kib();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampling = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    println!(
        "reconnect bench: {workloads} workloads, {services} services, {proxies} proxies with nothing cached, all at once"
    );
    let t0 = Instant::now();
    let config = weft_proto::tls::controller_client_config(
        weft_proto::tls::Trust::Static(mesh.roots()),
        mesh.controller.identity.clone(),
    );
    let handles: Vec<_> = tokens
        .into_iter()
        .map(|(token, node)| {
            let channel = weft_proto::grpc::tls_channel(mesh.controller.grpc_addr, config.clone());
            tokio::spawn(raw_proxy(channel, token, node, t0))
        })
        .collect();
    let mut synced = Vec::with_capacity(proxies);
    let mut streams = Vec::with_capacity(proxies);
    let mut resources = 0;
    for h in handles {
        let (at, count, stream) = h.await??;
        synced.push(at);
        resources += count;
        streams.push(stream);
    }
    sampling.abort();
    let peak_kib = peak.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "all {proxies} synced after {:.1} s (p50 {:.1} s, p99 {:.1} s); {} resources sent",
        t0.elapsed().as_secs_f64(),
        pct(&mut synced, 0.5).as_secs_f64(),
        pct(&mut synced, 0.99).as_secs_f64(),
        resources
    );
    println!(
        "memory: loaded controller {} MiB resident; peak during the reconnect +{} MiB (clients' in-flight messages included); after +{} MiB",
        before / 1024,
        peak_kib.saturating_sub(before) / 1024,
        rss_kib().saturating_sub(before) / 1024
    );
    drop(streams);
    Ok(())
}

type Held = (
    tokio::sync::mpsc::Sender<weft_proto::pb::xds::DeltaDiscoveryRequest>,
    tonic::Streaming<weft_proto::pb::xds::DeltaDiscoveryResponse>,
);

/// Subscribes to every type with nothing cached, ACKs each response and
/// drops it; returns when every type has answered, with the stream held
/// open.
async fn raw_proxy(
    channel: tonic::transport::Channel,
    token: String,
    node: String,
    t0: Instant,
) -> anyhow::Result<(Duration, usize, Held)> {
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
            return Ok((t0.elapsed(), count, (tx, responses)));
        }
    }
    anyhow::bail!("{node}: stream ended before every type answered")
}
