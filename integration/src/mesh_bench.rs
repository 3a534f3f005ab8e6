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

use crate::Mesh;

struct Figures {
    iperf_gbps: f64,
    http_rps: f64,
    p50_us: f64,
    p99_us: f64,
}

pub async fn run(seconds: u64) -> anyhow::Result<()> {
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
    echo_server(&server).await?;
    // iperf3 -s announces nothing useful on stdout; wait until it accepts.
    wait_for_port(&client, SocketAddr::new(server.ip, 5201)).await?;

    println!(
        "mesh bench: client pod {} (node a) → server pod {} (node b), {seconds}s per run\n",
        client.ip, server.ip
    );
    let direct = measure(&client, &server, seconds, None).await?;

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
    za.enroll(&client).await?;
    zb.enroll(&server).await?;
    let idle_kb = (za.rss_kb(), zb.rss_kb());
    let cpu_before = za.cpu_seconds() + zb.cpu_seconds();
    let meshed = measure(&client, &server, seconds, Some((&za, &zb))).await?;
    let cpu = za.cpu_seconds() + zb.cpu_seconds() - cpu_before;

    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "figure", "direct", "meshed", "ratio"
    );
    let row = |name: &str, d: f64, m: f64, unit: &str| {
        println!(
            "{name:<34} {:>9.2} {unit:<2} {:>9.2} {unit:<2} {:>8.2}",
            d,
            m,
            m / d
        );
    };
    row(
        "iperf3 single stream",
        direct.iperf_gbps,
        meshed.iperf_gbps,
        "Gb",
    );
    row(
        "HTTP/1.1 keep-alive, 50 conns",
        direct.http_rps / 1000.0,
        meshed.http_rps / 1000.0,
        "k/s",
    );
    row(
        "latency p50 (1 KiB, 1 conn)",
        direct.p50_us,
        meshed.p50_us,
        "µs",
    );
    row(
        "latency p99 (1 KiB, 1 conn)",
        direct.p99_us,
        meshed.p99_us,
        "µs",
    );
    println!(
        "added latency: p50 {:.1} µs, p99 {:.1} µs",
        meshed.p50_us - direct.p50_us,
        meshed.p99_us - direct.p99_us
    );
    println!(
        "ztunnel RSS idle: node a {} KiB, node b {} KiB",
        idle_kb.0, idle_kb.1
    );
    println!(
        "ztunnel RSS busy (peak during the runs): node a {} KiB, node b {} KiB",
        za.peak_kb(),
        zb.peak_kb()
    );
    let requests = meshed.http_rps * seconds as f64;
    println!(
        "ztunnel CPU (both nodes, whole meshed run incl. iperf3): {cpu:.2} s; per 1,000 HTTP requests ≤ {:.3} s",
        cpu / requests * 1000.0
    );
    drop(za);
    drop(zb);
    drop(topo);
    Ok(())
}

async fn measure(
    client: &PodNs,
    server: &PodNs,
    seconds: u64,
    zt: Option<(&Ztunnel, &Ztunnel)>,
) -> anyhow::Result<Figures> {
    let secs = seconds.to_string();
    let ip = server.ip.to_string();
    let iperf = run_in(client, &["iperf3", "-c", &ip, "-t", &secs, "-J"])?;
    let json: serde_json::Value = serde_json::from_str(&iperf).context("iperf3 JSON")?;
    let iperf_gbps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 result")?
        / 1e9;
    let url = format!("http://{ip}:8080/");
    let wrk = run_in(client, &["wrk", "-t2", "-c50", &format!("-d{secs}s"), &url])?;
    let http_rps = wrk
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("wrk Requests/sec")?;
    if let Some((a, b)) = zt {
        a.sample();
        b.sample();
    }
    let (p50_us, p99_us) = round_trips(client, SocketAddr::new(server.ip, 9000), 5000).await?;
    Ok(Figures {
        iperf_gbps,
        http_rps,
        p50_us,
        p99_us,
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
async fn http_server(pod: &PodNs) -> anyhow::Result<()> {
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
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
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

async fn echo_server(pod: &PodNs) -> anyhow::Result<()> {
    let listener = pod.listen("0.0.0.0:9000".parse()?).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(())
}

async fn wait_for_port(from: &PodNs, dst: SocketAddr) -> anyhow::Result<()> {
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
struct Ztunnel {
    process: KillOnDrop,
    socket: PathBuf,
    peak: std::cell::Cell<u64>,
}

impl Ztunnel {
    fn start(bin: &Path, mesh: &Mesh, node: &str, dir: &Path) -> anyhow::Result<Ztunnel> {
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
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Ztunnel {
            process: KillOnDrop(child),
            socket,
            peak: std::cell::Cell::new(0),
        })
    }

    async fn enroll(&self, pod: &PodNs) -> anyhow::Result<()> {
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
        std::fs::read_to_string(format!("/proc/{}/status", self.process.0.id()))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with(key)).map(str::to_owned))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }

    fn rss_kb(&self) -> u64 {
        self.status("VmRSS:")
    }

    /// High-water mark of resident memory so far (the kernel's own).
    fn peak_kb(&self) -> u64 {
        self.status("VmHWM:").max(self.peak.get())
    }

    fn sample(&self) {
        self.peak.set(self.peak.get().max(self.rss_kb()));
    }

    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.process.0.id()))
            .unwrap_or_default();
        // Fields after the ")" of the command name: utime is 14th, stime 15th overall.
        let rest = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        ticks / 100.0
    }
}

/// A binary built next to this one (target/<profile>/).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("exe dir")?.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it first (cargo build --release -p weft-ztunnel)",
        path.display()
    );
    Ok(path)
}
