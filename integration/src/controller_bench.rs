//! `weft-bench controller`: the config push at scale. 10,000 workloads on
//! 100 nodes, 1,000 services, 100 simulated proxies (real xDS clients over
//! TLS) against an in-process controller.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_proto::model::Model;
use weft_proto::xds::{self, XdsConfig};

use crate::{Mesh, rss_kib};

fn config(workloads: usize, services: usize, nodes: usize, moved: Option<usize>) -> String {
    let mut y = String::with_capacity(workloads * 120);
    y += "workloads:\n";
    for i in 0..workloads {
        // .1-.250 are taken within each block; a moved pod gets .252.
        let last = if Some(i) == moved { 252 } else { i % 250 + 1 };
        y += &format!(
            "  - {{name: w{i}, namespace: ns{}, serviceAccount: sa{}, node: node-{}, addresses: [10.{}.{}.{last}], services: [ns{}/svc{}]}}\n",
            i % 50,
            i % 200,
            i % nodes,
            (i / 250) / 256,
            (i / 250) % 256,
            (i % services) % 50,
            i % services,
        );
    }
    y += "services:\n";
    for s in 0..services {
        y += &format!(
            "  - {{name: svc{s}, namespace: ns{}, addresses: [10.96.{}.{}], ports: [{{port: 80, targetPort: 8080}}]}}\n",
            s % 50,
            s / 256,
            s % 256
        );
    }
    y
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

pub async fn run(workloads: usize, services: usize, proxies: usize) -> anyhow::Result<()> {
    let nodes = proxies;
    let mesh = Mesh::start().await;
    let before = rss_kib();
    let started = Instant::now();
    let model = Model::from_yaml(&config(workloads, services, nodes, None), "cluster.local")?;
    let version = mesh.controller.config.set(model);
    println!(
        "controller bench: {workloads} workloads on {nodes} nodes, {services} services, {proxies} proxies\n"
    );
    println!(
        "config built and encoded in {:.0} ms (version {version})",
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

    // One pod changes its address.
    let moved = workloads / 2;
    let new_ip: std::net::IpAddr = config(workloads, services, nodes, Some(moved))
        .lines()
        .nth(1 + moved)
        .and_then(|l| l.split("addresses: [").nth(1))
        .and_then(|r| r.split(']').next())
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("moved pod's address"))?;
    let next = Model::from_yaml(
        &config(workloads, services, nodes, Some(moved)),
        "cluster.local",
    )?;
    let sent_before: u64 = mesh
        .controller
        .proxies
        .all()
        .values()
        .map(|s| s.resources_sent)
        .sum();
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
    let v2 = mesh.controller.config.set(next);
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
    let sent_after: u64 = mesh
        .controller
        .proxies
        .all()
        .values()
        .map(|s| s.resources_sent)
        .sum();
    let per_proxy = (sent_after - sent_before) as f64 / proxies as f64;
    let one = weft_proto::resources::encode(&mesh.controller.config.current().model);
    let bytes = one[weft_proto::resources::WORKLOAD][&format!("ns{}/w{moved}", moved % 50)]
        .body
        .value
        .len();
    println!(
        "one-pod change: config rebuilt in {set_ms:.0} ms; applied by proxies p50 {:.1} ms, p99 {:.1} ms; all {proxies} ACKed after {:.1} ms",
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
