//! weft-bench: the numbers in docs/benchmarks.md. Every HBONE figure is
//! measured next to plain TCP on the same loopback in the same run, and
//! reported as a ratio, because these machines are noisy.
//!
//! cargo run --release -p weft-integration --bin weft-bench -- all

#![allow(clippy::print_stdout)]

/// The waypoint's allocator, so the L7 engine measured in this process
/// runs as it does in `weft-waypoint`. The ztunnel's figures come from its
/// own processes (`mesh`), on glibc.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_integration::{HboneServer, Mesh, median};
use weft_proto::certs::make_csr;
use weft_proto::hbone::H2Settings;
use weft_proto::hbone::pool::{ConnectRequest, Pool, PoolKey, PoolSettings};
use weft_proto::hbone::server::{Handler, InboundConnect};
use weft_proto::tls::CertWatch;

#[derive(Parser)]
struct Args {
    #[arg(value_enum, default_value = "all")]
    what: What,
    /// Bytes per throughput run.
    #[arg(long, default_value_t = 512 << 20)]
    bytes: u64,
    /// Throughput runs (each: one baseline, one HBONE).
    #[arg(long, default_value_t = 9)]
    runs: usize,
    /// Round trips per latency run.
    #[arg(long, default_value_t = 20_000)]
    round_trips: usize,
    /// Tunnels per setup-time run.
    #[arg(long, default_value_t = 300)]
    setups: usize,
    /// Seconds of CSR signing.
    #[arg(long, default_value_t = 3)]
    csr_seconds: u64,
    /// Seconds per iperf3/wrk run in the mesh bench.
    #[arg(long, default_value_t = 5)]
    mesh_seconds: u64,
    /// Alternating direct/meshed rounds in the mesh bench.
    #[arg(long, default_value_t = 6)]
    mesh_rounds: usize,
    /// Workloads served in the reconnect bench.
    #[arg(long, default_value_t = 50_000)]
    reconnect_workloads: usize,
    /// Proxies reconnecting at once in the reconnect bench.
    #[arg(long, default_value_t = 1_000)]
    reconnect_proxies: usize,
    /// The controller's first syncs at once in the reconnect bench
    /// (`weft-controller --first-syncs`).
    #[arg(long, default_value_t = weft_controller::xds::FIRST_SYNCS_AT_ONCE)]
    first_syncs: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum What {
    All,
    Throughput,
    Latency,
    Setup,
    Csr,
    /// The ztunnel across network namespaces (root; not part of `all`).
    Mesh,
    /// The waypoint's L7 engine against nginx as a reverse proxy (needs
    /// nginx and wrk; not part of `all`).
    L7,
    /// User-space instructions per request, the L7 engine against nginx
    /// (callgrind; needs valgrind, nginx and wrk; not part of `all`).
    L7Instructions,
    /// The whole L7 mesh path through a waypoint against direct (root).
    Waypoint,
    /// The config push at scale (not part of `all`).
    Controller,
    /// Proxies with nothing cached reconnecting at once: controller memory
    /// (not part of `all`).
    Reconnect,
    /// The mesh bench's echo application on 0.0.0.0:9000, run by the bench
    /// itself in the server pod: a process of its own, as an application is.
    #[value(hide = true)]
    Echo,
}

/// The plain-TCP baseline's server: a sink (acknowledging with one byte at
/// EOF) or an echo. The HBONE server library runs the same two behaviours in
/// its handler, so both sides of each comparison do the same work.
async fn app(echo: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                if echo {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                } else {
                    let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
                    let _ = s.write_all(b"k").await;
                }
            });
        }
    });
    addr
}

/// The HBONE server's handler: the same sink or echo as [`app`], on the
/// tunnelled stream itself (client lib → server lib, no extra hop).
struct Serve {
    echo: bool,
}

impl Handler for Serve {
    async fn handle(&self, c: InboundConnect) {
        let Ok(s) = c.accept() else { return };
        let (mut r, mut w) = tokio::io::split(s);
        if self.echo {
            let _ = tokio::io::copy(&mut r, &mut w).await;
        } else {
            let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
            let _ = w.write_all(b"k").await;
        }
        // Dropping without shutdown would reset the stream (see H2Stream).
        let _ = w.shutdown().await;
    }
}

struct Hbone {
    pool: Pool,
    key: PoolKey,
    cert: CertWatch,
    _server: HboneServer<Serve>,
    _mesh: Mesh,
}

async fn hbone(echo: bool) -> Hbone {
    let mesh = Mesh::start().await;
    let node = mesh.node("bench");
    let (src, dst) = (
        node.workload("default", "client"),
        node.workload("default", "server"),
    );
    let server =
        HboneServer::start(node.cert(&dst).await, Serve { echo }, H2Settings::default()).await;
    let cert = node.cert(&src).await;
    let key = PoolKey {
        src,
        dst,
        dst_addr: server.addr,
        src_ip: None,
    };
    Hbone {
        pool: Pool::new(PoolSettings::default()),
        key,
        cert,
        _server: server,
        _mesh: mesh,
    }
}

impl Hbone {
    async fn stream(&self) -> weft_proto::hbone::H2Stream {
        let req = ConnectRequest {
            authority: self.key.dst_addr,
            headers: Default::default(),
        };
        self.pool
            .connect(&self.key, &self.cert, req)
            .await
            .expect("tunnel")
    }
}

async fn push<S: AsyncRead + AsyncWrite + Unpin>(s: S, bytes: u64) -> f64 {
    let (mut r, mut w) = tokio::io::split(s);
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n]).await.expect("write");
        left -= n as u64;
    }
    w.shutdown().await.expect("shutdown");
    let mut ack = [0u8; 1];
    r.read_exact(&mut ack).await.expect("sink acknowledges");
    bytes as f64 / start.elapsed().as_secs_f64() / 1e9 * 8.0
}

/// Alternates baseline and HBONE runs and reports the median of the
/// per-pair ratios: single runs on a 2-vCPU VM swing by 2x.
async fn throughput(bytes: u64, runs: usize) {
    let sink = app(false).await;
    let h = hbone(false).await;
    let mut ratios = Vec::with_capacity(runs);
    let (mut tcps, mut hbs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let tcp = push(connect(sink).await, bytes).await;
        let hb = push(h.stream().await, bytes).await;
        ratios.push(hb / tcp);
        tcps.push(tcp);
        hbs.push(hb);
    }
    println!(
        "throughput  single stream, {} MiB per run, {runs} alternating runs",
        bytes >> 20
    );
    println!(
        "            median plain TCP {:.2} Gbit/s, HBONE {:.2} Gbit/s; median ratio {:.2} (runs: {})",
        median(tcps),
        median(hbs),
        median(ratios.clone()),
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s
}

async fn round_trips<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, n: usize) -> Vec<Duration> {
    let req = [7u8; 1024];
    let mut resp = [0u8; 1024];
    let mut out = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        s.write_all(&req).await.expect("write");
        s.read_exact(&mut resp).await.expect("read");
        if i >= n / 10 {
            out.push(t.elapsed()); // the first 10% warm up
        }
    }
    out.sort();
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn latency(n: usize) {
    let echo = app(true).await;
    let tcp = round_trips(connect(echo).await, n).await;
    let h = hbone(true).await;
    let hb = round_trips(h.stream().await, n).await;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("latency     1 KiB request/response, {n} round trips on one pooled stream");
    for (name, p) in [("p50", 0.50), ("p99", 0.99)] {
        let (a, b) = (pct(&tcp, p), pct(&hb, p));
        println!(
            "            {name}: plain TCP {:.1} µs, HBONE {:.1} µs, added {:.1} µs",
            us(a),
            us(b),
            us(b) - us(a)
        );
    }
}

async fn setup(n: usize) {
    let echo = app(true).await;
    let h = hbone(true).await;
    let mut tcp = Vec::with_capacity(n);
    let mut hb = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut s = connect(echo).await;
        s.write_all(b"x").await.expect("write");
        s.read_exact(&mut [0u8; 1]).await.expect("read");
        tcp.push(t.elapsed());
        // A fresh pool forces TLS handshake + HTTP/2 preface + CONNECT.
        let pool = Pool::new(PoolSettings::default());
        let t = Instant::now();
        let req = ConnectRequest {
            authority: h.key.dst_addr,
            headers: Default::default(),
        };
        let mut s = pool.connect(&h.key, &h.cert, req).await.expect("tunnel");
        s.write_all(b"x").await.expect("write");
        s.read_exact(&mut [0u8; 1]).await.expect("read");
        hb.push(t.elapsed());
    }
    tcp.sort();
    hb.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("setup       new tunnel incl. first byte echoed, {n} runs");
    println!(
        "            p50: plain TCP {:.3} ms, HBONE (TLS 1.3 + h2 + CONNECT) {:.3} ms",
        ms(pct(&tcp, 0.5)),
        ms(pct(&hb, 0.5))
    );
}

async fn csr_rate(seconds: u64) {
    let mesh = Mesh::start().await;
    let id = mesh.node("bench").workload("default", "bench");
    // CSRs are made up front: the CA's cost is what is measured.
    let csrs: Vec<String> = (0..2000).map(|_| make_csr(&id).expect("csr").0).collect();
    let ca = mesh.controller.ca.clone();
    let (count, elapsed) = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut count = 0usize;
        while start.elapsed() < Duration::from_secs(seconds) {
            let csr = &csrs[count % csrs.len()];
            ca.sign_csr(csr, &id, Duration::from_secs(3600))
                .expect("signed");
            count += 1;
        }
        (count, start.elapsed())
    })
    .await
    .expect("signer");
    println!(
        "csr         {:.0} certificates/s on one core (verify CSR + sign leaf)",
        count as f64 / elapsed.as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    if std::env::args().nth(1).as_deref() == Some("echo") {
        weft_integration::mesh_bench::echo_forever();
    }
    if std::env::args().nth(1).as_deref() == Some("l7-serve") {
        let Some(port) = std::env::args().nth(2).and_then(|p| p.parse().ok()) else {
            println!("usage: weft-bench l7-serve BACKEND_PORT [bare]");
            std::process::exit(2);
        };
        let bare = std::env::args().nth(3).as_deref() == Some("bare");
        let Err(e) = weft_integration::l7_instructions::serve_forever(port, bare);
        println!("l7-serve failed: {e:#}");
        std::process::exit(1);
    }
    let args = Args::parse();
    let all = args.what == What::All;
    if all || args.what == What::Throughput {
        throughput(args.bytes, args.runs).await;
    }
    if all || args.what == What::Latency {
        latency(args.round_trips).await;
    }
    if all || args.what == What::Setup {
        setup(args.setups).await;
    }
    if all || args.what == What::Csr {
        csr_rate(args.csr_seconds).await;
    }
    if args.what == What::Controller
        && let Err(e) = weft_integration::controller_bench::run(10_000, 1_000, 100).await
    {
        println!("controller bench failed: {e:#}");
        std::process::exit(1);
    }
    if args.what == What::Reconnect
        && let Err(e) = weft_integration::controller_bench::reconnect(
            args.reconnect_workloads,
            args.reconnect_proxies,
            args.first_syncs,
        )
        .await
    {
        println!("reconnect bench failed: {e:#}");
        std::process::exit(1);
    }
    if args.what == What::Mesh
        && let Err(e) = weft_integration::mesh_bench::run(args.mesh_seconds, args.mesh_rounds).await
    {
        println!("mesh bench failed: {e:#}");
        std::process::exit(1);
    }
    if args.what == What::Waypoint
        && let Err(e) =
            weft_integration::waypoint_bench::run(args.mesh_seconds, args.mesh_rounds).await
    {
        println!("waypoint bench failed: {e:#}");
        std::process::exit(1);
    }
    if args.what == What::L7
        && let Err(e) = weft_integration::l7_bench::run(args.mesh_seconds, args.mesh_rounds).await
    {
        println!("L7 bench failed: {e:#}");
        std::process::exit(1);
    }
    if args.what == What::L7Instructions
        && let Err(e) = weft_integration::l7_instructions::run(args.mesh_seconds).await
    {
        println!("L7 instructions bench failed: {e:#}");
        std::process::exit(1);
    }
}
