//! `weft-bench mesh` (root): the ztunnel on the issue #3 topology. Two node
//! namespaces joined by a veth, a client pod on one, a server pod on the
//! other; every figure measured first with the pods talking directly, then
//! with both enrolled (ztunnels running as real `weft-ztunnel` processes),
//! and reported as a ratio.

#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_cli::demo::topology::{PodNs, Topology, is_root, try_run};

use crate::{Mesh, median, proc_status_kib};

/// One round's figures on one path (direct or meshed).
#[derive(Default, Clone, Copy)]
struct Figures {
    iperf1_gbps: f64,
    iperf4_gbps: f64,
    http_rps: f64,
    conn_rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Meshed only: both ztunnels' CPU per 1,000 keep-alive requests.
    cpu_ms_per_1k: f64,
    /// Meshed only: both ztunnels' CPU and context switches per GB carried
    /// by iperf3 (1 and 4 streams).
    cpu_s_per_gb: f64,
    switches_per_gb: f64,
}

/// Both ztunnels' CPU seconds and context switches so far.
fn usage(zt: Option<(&Ztunnel, &Ztunnel)>) -> (f64, u64) {
    zt.map_or((0.0, 0), |(a, b)| {
        (
            a.cpu_seconds() + b.cpu_seconds(),
            a.switches() + b.switches(),
        )
    })
}

pub async fn run(seconds: u64, rounds: usize) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the mesh benchmark builds network namespaces: run it as root");
    }
    for tool in ["iperf3", "wrk"] {
        try_run(&["which", tool])
            .with_context(|| format!("{tool} is needed (apt-get install {tool})"))?;
    }
    let ztunnel_bin = sibling("weft-ztunnel")?;
    let mesh = Mesh::start().await;
    let mut topo = Topology::new();
    let a = topo.node("a", "10.244.1.0/24")?;
    let b = topo.node("b", "10.244.2.0/24")?;
    topo.link(&a, &b)?;
    let client = topo.pod(&a, "client")?;
    let server = topo.pod(&b, "server")?;
    let _iperf = spawn_in(&server, &["iperf3", "-s"])?;
    http_server(&server).await?;
    // The latency target is a process of its own: in this one, a round trip
    // with both ends on one runtime need not sleep at all, and the direct
    // baseline would be no baseline.
    let me = std::env::current_exe()?;
    let _echo = spawn_in(&server, &[&me.to_string_lossy(), "echo"])?;
    wait_for_port(&client, SocketAddr::new(server.ip, 9000)).await?;
    // iperf3 -s announces nothing useful on stdout; wait until it accepts.
    wait_for_port(&client, SocketAddr::new(server.ip, 5201)).await?;
    let yaml = format!(
        "workloads:\n  - {{name: client, serviceAccount: client, node: a, addresses: [{}]}}\n  - {{name: server, serviceAccount: server, node: b, addresses: [{}]}}\n",
        client.ip, server.ip
    );
    let dir = topo.dir.path().to_owned();
    std::fs::write(dir.join("mesh.yaml"), yaml)?;
    std::fs::write(dir.join("root.pem"), &mesh.controller.root_pem)?;
    for (node, id) in [("a", "client"), ("b", "server")] {
        mesh.controller.nodes.place(
            node,
            format!("spiffe://cluster.local/ns/default/sa/{id}").parse()?,
        );
    }
    let za = Ztunnel::start(&ztunnel_bin, &mesh, "a", &dir)?;
    let zb = Ztunnel::start(&ztunnel_bin, &mesh, "b", &dir)?;
    // Idle: both pods enrolled, listeners up, certificates fetched, no load.
    za.enroll(&client).await?;
    zb.enroll(&server).await?;
    round_trips(&client, SocketAddr::new(server.ip, 9000), 10).await?;
    let idle_kb = (za.rss_kb(), zb.rss_kb());
    println!(
        "mesh bench: client pod {} (node a) → server pod {} (node b), {seconds}s per run, {rounds} alternating rounds\n",
        client.ip, server.ip
    );
    let mut results: Vec<(Figures, Figures)> = Vec::new();
    for round in 1..=rounds {
        za.remove(&client).await?;
        zb.remove(&server).await?;
        let direct = measure(&client, &server, seconds, None).await?;
        za.enroll(&client).await?;
        zb.enroll(&server).await?;
        let meshed = measure(&client, &server, seconds, Some((&za, &zb))).await?;
        print_round(round, &direct, &meshed);
        results.push((direct, meshed));
    }
    print_summary(&results, idle_kb, (za.peak_kb(), zb.peak_kb()));
    drop(za);
    drop(zb);
    drop(topo);
    Ok(())
}

fn print_round(round: usize, d: &Figures, m: &Figures) {
    println!(
        "round {round}: iperf1 {:.2}/{:.2} Gb ({:.2})  iperf4 {:.2}/{:.2} ({:.2})  keep-alive {:.0}/{:.0} req/s ({:.2})  new conns {:.0}/{:.0} /s ({:.2})  p50 +{:.0} µs  cpu {:.1} ms/1k req, {:.2} s/GB, {:.0} switches/GB",
        d.iperf1_gbps,
        m.iperf1_gbps,
        m.iperf1_gbps / d.iperf1_gbps,
        d.iperf4_gbps,
        m.iperf4_gbps,
        m.iperf4_gbps / d.iperf4_gbps,
        d.http_rps,
        m.http_rps,
        m.http_rps / d.http_rps,
        d.conn_rps,
        m.conn_rps,
        m.conn_rps / d.conn_rps,
        m.p50_us - d.p50_us,
        m.cpu_ms_per_1k,
        m.cpu_s_per_gb,
        m.switches_per_gb,
    );
}

fn print_summary(results: &[(Figures, Figures)], idle_kb: (u64, u64), peak_kb: (u64, u64)) {
    let med = |f: &dyn Fn(&(Figures, Figures)) -> f64| median(results.iter().map(f).collect());
    println!(
        "\n{:<40} {:>12} {:>12} {:>14}",
        "figure (medians)", "direct", "meshed", "ratio (median of rounds)"
    );
    type Row = (&'static str, fn(&Figures) -> f64);
    let rows: [Row; 4] = [
        ("iperf3, 1 stream (Gbit/s)", |f| f.iperf1_gbps),
        ("iperf3, 4 streams (Gbit/s)", |f| f.iperf4_gbps),
        ("keep-alive HTTP, 50 conns (req/s)", |f| f.http_rps),
        ("new connections, 16 clients (/s)", |f| f.conn_rps),
    ];
    for (name, get) in rows {
        println!(
            "{name:<40} {:>12.2} {:>12.2} {:>14.3}",
            med(&|r| get(&r.0)),
            med(&|r| get(&r.1)),
            med(&|r| get(&r.1) / get(&r.0)),
        );
    }
    let latencies: [Row; 2] = [
        ("p50, 1 KiB, 1 conn (µs)", |f| f.p50_us),
        ("p99, 1 KiB, 1 conn (µs)", |f| f.p99_us),
    ];
    for (name, get) in latencies {
        let added = format!("+{:.1} µs", med(&|r| get(&r.1) - get(&r.0)));
        let (direct, meshed) = (med(&|r| get(&r.0)), med(&|r| get(&r.1)));
        println!("{name:<40} {direct:>12.1} {meshed:>12.1} {added:>14}");
    }
    println!(
        "CPU, both ztunnels: {:.1} ms per 1,000 keep-alive requests; {:.2} CPU-s and {:.0} context switches per GB (iperf3)",
        med(&|r| r.1.cpu_ms_per_1k),
        med(&|r| r.1.cpu_s_per_gb),
        med(&|r| r.1.switches_per_gb)
    );
    println!(
        "ztunnel RSS idle: node a {:.1} MB, node b {:.1} MB; peak: {:.1} MB, {:.1} MB",
        idle_kb.0 as f64 / 1024.0,
        idle_kb.1 as f64 / 1024.0,
        peak_kb.0 as f64 / 1024.0,
        peak_kb.1 as f64 / 1024.0
    );
}

fn iperf_gbps(client: &PodNs, ip: &str, secs: &str, streams: &str) -> anyhow::Result<(f64, f64)> {
    let out = run_in(
        client,
        &["iperf3", "-c", ip, "-t", secs, "-P", streams, "-J"],
    )?;
    let json: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    let end = &json["end"]["sum_received"];
    let bps = end["bits_per_second"].as_f64().context("iperf3 result")?;
    let bytes = end["bytes"].as_f64().unwrap_or(0.0);
    Ok((bps / 1e9, bytes))
}

pub(crate) fn wrk_rps(
    client: &PodNs,
    url: &str,
    conns: &str,
    secs: &str,
    extra: &[&str],
) -> anyhow::Result<f64> {
    let mut cmd = vec!["wrk", "-t2", conns, secs];
    cmd.extend_from_slice(extra);
    cmd.push(url);
    let out = run_in(client, &cmd)?;
    out.lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("wrk Requests/sec")
}

async fn measure(
    client: &PodNs,
    server: &PodNs,
    seconds: u64,
    zt: Option<(&Ztunnel, &Ztunnel)>,
) -> anyhow::Result<Figures> {
    let secs = seconds.to_string();
    let ip = server.ip.to_string();
    let (cpu0, sw0) = usage(zt);
    let (iperf1_gbps, bytes1) = iperf_gbps(client, &ip, &secs, "1")?;
    let (iperf4_gbps, bytes4) = iperf_gbps(client, &ip, &secs, "4")?;
    let (cpu1, sw1) = usage(zt);
    let gb = (bytes1 + bytes4) / 1e9;
    let url = format!("http://{ip}:8080/");
    let d = format!("-d{secs}s");
    let http_rps = wrk_rps(client, &url, "-c50", &d, &[])?;
    let (cpu2, _) = usage(zt);
    let conn_rps = wrk_rps(client, &url, "-c16", &d, &["-H", "Connection: close"])?;
    // Round trips per latency run; more to attach a profiler meanwhile.
    let n = std::env::var("WEFT_BENCH_ROUND_TRIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let (p50_us, p99_us) = round_trips(client, SocketAddr::new(server.ip, 9000), n).await?;
    Ok(Figures {
        iperf1_gbps,
        iperf4_gbps,
        http_rps,
        conn_rps,
        p50_us,
        p99_us,
        cpu_ms_per_1k: (cpu2 - cpu1) * 1e3 / (http_rps * seconds as f64 / 1e3),
        cpu_s_per_gb: (cpu1 - cpu0) / gb,
        switches_per_gb: (sw1 - sw0) as f64 / gb,
    })
}

async fn round_trips(client: &PodNs, dst: SocketAddr, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut s = client.connect(dst).await?;
    s.set_nodelay(true)?;
    let (req, mut resp) = ([7u8; 1024], [0u8; 1024]);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        s.write_all(&req).await?;
        s.read_exact(&mut resp).await?;
        if i >= n / 10 {
            samples.push(t.elapsed());
        }
    }
    samples.sort();
    let us = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
    };
    Ok((us(0.5), us(0.99)))
}

/// A keep-alive HTTP/1.1 server on :8080 answering "ok" (the wrk target).
pub(crate) async fn http_server(pod: &PodNs) -> anyhow::Result<()> {
    let listener = pod.listen("0.0.0.0:8080".parse()?).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut filled = 0;
                loop {
                    let Ok(n) = s.read(&mut buf[filled..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    filled += n;
                    // Answer every complete request in the buffer (wrk may pipeline none, but be safe).
                    while let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let close = head.contains("connection: close");
                        let resp: &[u8] = if close {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        };
                        if s.write_all(resp).await.is_err() || close {
                            return;
                        }
                        buf.copy_within(end + 4..filled, 0);
                        filled -= end + 4;
                    }
                    if filled == buf.len() {
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

/// A blocking echo on 0.0.0.0:9000, a thread per connection, until killed.
pub fn echo_forever() -> ! {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("0.0.0.0:9000").expect("bind :9000");
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut s = conn;
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = s.read(&mut buf) {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    std::process::exit(1)
}

pub(crate) async fn wait_for_port(from: &PodNs, dst: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..100 {
        if from.connect(dst).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{dst} never accepted")
}

fn run_in(pod: &PodNs, cmd: &[&str]) -> anyhow::Result<String> {
    let mut args = vec!["ip", "netns", "exec", &pod.netns];
    args.extend_from_slice(cmd);
    Ok(try_run(&args)?)
}

fn spawn_in(pod: &PodNs, cmd: &[&str]) -> anyhow::Result<KillOnDrop> {
    let child = Command::new("ip")
        .args(["netns", "exec", &pod.netns])
        .args(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(KillOnDrop(child))
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A weft-ztunnel process for one node.
pub(crate) struct Ztunnel {
    process: KillOnDrop,
    socket: PathBuf,
}

impl Ztunnel {
    pub(crate) fn start(
        bin: &Path,
        mesh: &Mesh,
        node: &str,
        dir: &Path,
    ) -> anyhow::Result<Ztunnel> {
        let socket = dir.join(format!("zt-{node}.sock"));
        let child = Command::new(bin)
            .args([
                "--node",
                node,
                "--controller",
                &mesh.controller.grpc_addr.to_string(),
            ])
            .arg("--ca-root")
            .arg(dir.join("root.pem"))
            .arg("--token-file")
            .arg(mesh.controller.nodes.ensure(node)?)
            .arg("--config")
            .arg(dir.join("mesh.yaml"))
            .arg("--enroll-socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join(format!("state-{node}")))
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
                "--ready-addr",
                "127.0.0.1:0",
                "--socks5-addr",
                "127.0.0.1:0",
            ])
            .env(
                "RUST_LOG",
                std::env::var("WEFT_BENCH_ZTUNNEL_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Ztunnel {
            process: KillOnDrop(child),
            socket,
        })
    }

    pub(crate) async fn enroll(&self, pod: &PodNs) -> anyhow::Result<()> {
        let line = serde_json::json!({"op": "add", "uid": pod.name, "namespace": "default",
            "name": pod.name, "netns": pod.path, "ips": [pod.ip]})
        .to_string();
        // The process may still be starting: retry until its socket answers.
        for _ in 0..100 {
            if let Ok(reply) = weft_ztunnel::enroll::request(&self.socket, &line).await {
                anyhow::ensure!(reply.ok, "enroll {}: {:?}", pod.name, reply.error);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "ztunnel enrollment socket {} never answered",
            self.socket.display()
        )
    }

    fn status(&self, key: &str) -> u64 {
        proc_status_kib(&self.process.0.id().to_string(), key)
    }

    pub(crate) async fn remove(&self, pod: &PodNs) -> anyhow::Result<()> {
        let line = serde_json::json!({"op": "remove", "uid": pod.name}).to_string();
        let reply = weft_ztunnel::enroll::request(&self.socket, &line).await?;
        anyhow::ensure!(reply.ok, "remove {}: {:?}", pod.name, reply.error);
        Ok(())
    }

    /// Voluntary and involuntary context switches of every thread so far.
    fn switches(&self) -> u64 {
        let dir = format!("/proc/{}/task", self.process.0.id());
        let tasks = std::fs::read_dir(dir).into_iter().flatten().flatten();
        tasks
            .map(|t| {
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }

    pub(crate) fn rss_kb(&self) -> u64 {
        self.status("VmRSS:")
    }

    /// High-water mark of resident memory so far (the kernel's own).
    fn peak_kb(&self) -> u64 {
        self.status("VmHWM:")
    }

    pub(crate) fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.process.0.id()));
        crate::stat_cpu_seconds(&stat.unwrap_or_default())
    }
}

/// A binary built next to this one (target/<profile>/).
pub(crate) fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("exe dir")?.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it first (cargo build --release -p weft-ztunnel -p weft-waypoint)",
        path.display()
    );
    Ok(path)
}
