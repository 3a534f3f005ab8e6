//! `weft-bench waypoint` (root): the whole L7 mesh path — client pod →
//! ztunnel → waypoint → ztunnel → server pod — against the same pods
//! talking directly, in alternating rounds. The ztunnels are `weft-ztunnel`
//! processes on a static config; the waypoint runs in its own pod
//! namespace (in this process, its control work on the host), fed by the
//! controller. Keep-alive HTTP/1.1 (wrk, 50 connections) and the latency of
//! one request at a time on one connection.

#![allow(clippy::print_stdout)]

use std::net::SocketAddr;

use anyhow::{Context, bail};
use weft_cli::demo::topology::{PodNs, Topology, is_root, try_run};
use weft_cli::demo::waypoint::start_waypoint;

use crate::mesh_bench::{Ztunnel, http_server, sibling, wait_for_port, wrk_rps};
use crate::{Mesh, median};

const VIP: &str = "10.96.0.10";

/// The controller's view (Kubernetes objects): what the waypoint serves.
fn controller_yaml(client: &PodNs, server: &PodNs, waypoint: &PodNs) -> String {
    let pod = |p: &PodNs, node: &str, sa: &str, labels: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, labels: {{{labels}}}}}\n\
             spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c, image: c}}]}}\n\
             status: {{phase: Running, podIP: {}}}\n",
            p.name, p.ip
        )
    };
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {weft.dev/mesh: enabled}}\n",
    );
    y += &pod(client, "a", "client", "app: client");
    y += &pod(server, "b", "server", "app: api");
    y += &pod(
        waypoint,
        "b",
        "waypoint",
        "gateway.networking.k8s.io/gateway-name: waypoint",
    );
    y += &format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: default, labels: {{weft.dev/use-waypoint: waypoint}}}}\n\
         spec: {{clusterIP: {VIP}, selector: {{app: api}}, ports: [{{port: 80, targetPort: 8080}}]}}\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: default}}\n\
         spec: {{gatewayClassName: weft-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n"
    );
    y
}

/// The ztunnels' static config, saying the same.
fn ztunnel_yaml(client: &PodNs, server: &PodNs, waypoint: &PodNs) -> String {
    format!(
        "workloads:\n\
         \x20 - {{name: client, serviceAccount: client, node: a, addresses: [{}]}}\n\
         \x20 - {{name: server, serviceAccount: server, node: b, addresses: [{}], services: [default/api], waypoint: default/waypoint}}\n\
         services:\n\
         \x20 - {{name: api, addresses: [{VIP}], ports: [{{port: 80, targetPort: 8080}}], waypoint: default/waypoint}}\n\
         waypoints:\n\
         \x20 - {{name: waypoint, serviceAccount: waypoint, addresses: [{}]}}\n",
        client.ip, server.ip, waypoint.ip
    )
}

/// One request at a time on one keep-alive connection (wrk, its own
/// process, as the server's other clients are): p50 and p99 in µs.
fn latency(client: &PodNs, dst: SocketAddr, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let (d, url) = (format!("-d{seconds}s"), format!("http://{dst}/"));
    let args = [
        "ip",
        "netns",
        "exec",
        &client.netns,
        "wrk",
        "-t1",
        "-c1",
        &d,
        "--latency",
        &url,
    ];
    let out = try_run(&args)?;
    let at = |p: &str| -> anyhow::Result<f64> {
        let v = out
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .map(str::trim)
            .with_context(|| format!("wrk --latency {p} in {out}"))?;
        let (n, scale) = if let Some(n) = v.strip_suffix("us") {
            (n, 1.0)
        } else if let Some(n) = v.strip_suffix("ms") {
            (n, 1000.0)
        } else if let Some(n) = v.strip_suffix('s') {
            (n, 1e6)
        } else {
            (v, 1.0)
        };
        Ok(n.parse::<f64>()? * scale)
    };
    Ok((at("50%")?, at("99%")?))
}

/// CPU seconds of this process's threads whose name starts with `prefix`
/// (the waypoint's data-plane thread).
fn thread_cpu_seconds(prefix: &str) -> f64 {
    let tasks = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter(|stat| {
            stat.split_once('(')
                .is_some_and(|(_, rest)| rest.starts_with(prefix))
        })
        .map(|stat| crate::stat_cpu_seconds(&stat))
        .sum()
}

/// (req/s, p50 µs, p99 µs, ztunnels' CPU ms per 1k req, waypoint's).
type Row = (f64, f64, f64, f64, f64);

pub async fn run(seconds: u64, rounds: usize) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the waypoint benchmark builds network namespaces: run it as root");
    }
    try_run(&["which", "wrk"]).context("wrk is needed (apt-get install wrk)")?;
    let ztunnel_bin = sibling("weft-ztunnel")?;
    let mesh = Mesh::start().await;
    let mut topo = Topology::new();
    let a = topo.node("a", "10.244.1.0/24")?;
    let b = topo.node("b", "10.244.2.0/24")?;
    topo.link(&a, &b)?;
    let client = topo.pod(&a, "client")?;
    let server = topo.pod(&b, "server")?;
    let wp_pod = topo.pod(&b, "waypoint")?;
    http_server(&server).await?;
    std::fs::write(
        mesh.config_dir().join("bench.yaml"),
        controller_yaml(&client, &server, &wp_pod),
    )?;
    mesh.waypoint_served("default/waypoint").await?;
    let dir = topo.dir.path().to_owned();
    std::fs::write(
        dir.join("mesh.yaml"),
        ztunnel_yaml(&client, &server, &wp_pod),
    )?;
    std::fs::write(dir.join("root.pem"), &mesh.controller.root_pem)?;
    let za = Ztunnel::start(&ztunnel_bin, &mesh, "a", &dir)?;
    let zb = Ztunnel::start(&ztunnel_bin, &mesh, "b", &dir)?;
    let wp = start_waypoint(
        &mesh.controller,
        "default/waypoint",
        "waypoint",
        &wp_pod,
        &dir.join("wp"),
    )
    .await?;
    let vip: SocketAddr = format!("{VIP}:80").parse()?;
    let direct_addr = SocketAddr::new(server.ip, 8080);
    wait_for_port(&client, direct_addr).await?;
    println!(
        "waypoint bench: client (node a) → ztunnel → waypoint (node b) → ztunnel → server (node b); wrk -t2 -c50, {seconds} s per run, {rounds} rounds"
    );
    println!(
        "round  direct req/s  meshed req/s  ratio  direct p50/p99 µs  meshed p50/p99 µs  CPU ms/1k: ztunnels, waypoint"
    );
    let d = format!("-d{seconds}s");
    let mut rows: Vec<(Row, Row)> = Vec::new();
    for round in 1..=rounds {
        let _ = za.remove(&client).await;
        let _ = zb.remove(&server).await;
        let rps = wrk_rps(&client, &format!("http://{direct_addr}/"), "-c50", &d, &[])?;
        let (p50, p99) = latency(&client, direct_addr, seconds)?;
        let direct = (rps, p50, p99, 0.0, 0.0);
        za.enroll(&client).await?;
        zb.enroll(&server).await?;
        wait_for_port(&client, vip)
            .await
            .context("warming the meshed path")?;
        let cpu = || {
            (
                za.cpu_seconds() + zb.cpu_seconds(),
                thread_cpu_seconds("waypoint-"),
            )
        };
        let (z0, w0) = cpu();
        let rps = wrk_rps(&client, &format!("http://{vip}/"), "-c50", &d, &[])?;
        let (z1, w1) = cpu();
        let per_1k = |cpu: f64| cpu * 1000.0 / (rps * seconds as f64 / 1000.0);
        let (p50, p99) = latency(&client, vip, seconds)?;
        let meshed = (rps, p50, p99, per_1k(z1 - z0), per_1k(w1 - w0));
        println!(
            "{round:>5}  {:>12.0}  {:>12.0}  {:>5.2}  {:>8.0}/{:<8.0}  {:>8.0}/{:<8.0}  {:.1}, {:.1}",
            direct.0,
            meshed.0,
            meshed.0 / direct.0,
            direct.1,
            direct.2,
            meshed.1,
            meshed.2,
            meshed.3,
            meshed.4
        );
        rows.push((direct, meshed));
    }
    let m = |f: fn(&(Row, Row)) -> f64| median(rows.iter().map(f).collect());
    println!(
        "median {:>12.0}  {:>12.0}  {:>5.2}  {:>8.0}/{:<8.0}  {:>8.0}/{:<8.0}  {:.1}, {:.1}",
        m(|r| r.0.0),
        m(|r| r.1.0),
        m(|r| r.1.0 / r.0.0),
        m(|r| r.0.1),
        m(|r| r.0.2),
        m(|r| r.1.1),
        m(|r| r.1.2),
        m(|r| r.1.3),
        m(|r| r.1.4)
    );
    println!(
        "added latency (median of rounds): p50 +{:.0} µs, p99 +{:.0} µs",
        m(|r| r.1.1 - r.0.1),
        m(|r| r.1.2 - r.0.2)
    );
    wp.stop().await;
    drop((za, zb));
    drop(topo);
    Ok(())
}
