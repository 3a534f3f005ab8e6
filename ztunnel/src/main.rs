//! weft-ztunnel: the per-node proxy.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use weft_ztunnel::app::{self, Config};
use weft_ztunnel::node::Mode;

/// weft's node proxy: captures the TCP traffic of enrolled pods and carries it
/// between nodes in HBONE (HTTP/2 CONNECT in mutual TLS 1.3).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// This node's name, as the controller knows it.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Controller gRPC address (CA).
    #[arg(long, default_value = "127.0.0.1:15012")]
    controller: String,
    /// The mesh root certificate (controller data dir: ca/root-cert.pem).
    #[arg(long)]
    ca_root: PathBuf,
    /// This node's token (controller data dir: nodes/<node>.token).
    #[arg(long)]
    token_file: PathBuf,
    /// Static config (Workload/Service/Policy YAML) instead of the
    /// controller's config push.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value = "/var/run/weft/ztunnel.sock")]
    enroll_socket: PathBuf,
    #[arg(long, default_value = "/var/lib/weft/ztunnel")]
    state_dir: PathBuf,
    /// Accept plaintext from outside the mesh (subject to policy).
    #[arg(long)]
    permissive: bool,
    /// Refuse outbound connections to destinations outside the mesh.
    #[arg(long)]
    deny_passthrough: bool,
    /// Admin endpoints (/config_dump, /debug/...); keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Prometheus /metrics.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// /healthz/ready.
    #[arg(long, default_value = "0.0.0.0:15021")]
    ready_addr: SocketAddr,
    /// SOCKS5 explicit proxy for hosts without capture.
    #[arg(long, default_value = "127.0.0.1:15080")]
    socks5_addr: SocketAddr,
    /// Log lines (including the per-connection access log) as text or json.
    #[arg(long, default_value = "text")]
    log_format: weft_proto::process::LogFormat,
    /// Offer and accept only the post-quantum hybrid key exchange
    /// (X25519MLKEM768) on every TLS connection; peers without it fail.
    /// Default: X25519MLKEM768 first, X25519 as the fallback.
    #[arg(long, env = "WEFT_PQ_ONLY")]
    pq_only: bool,
    /// Data-plane worker threads (default: one per core). Control work
    /// (config, certificates, admin, metrics, readiness) runs on a thread
    /// of its own, so a saturated data plane never starves it.
    #[arg(long, env = "WEFT_WORKERS")]
    workers: Option<usize>,
    /// Seconds live connections may finish after SIGTERM, or after a new
    /// ztunnel took over this one's sockets, before they are closed.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    drain_deadline: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    weft_proto::process::init_logging(a.log_format);
    if a.pq_only {
        weft_proto::tls::require_post_quantum();
        tracing::info!("TLS key exchange: X25519MLKEM768 only");
    }
    let control =
        weft_proto::process::ControlRuntime::start().context("starting the control runtime")?;
    let mut data = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = a.workers {
        anyhow::ensure!(n > 0, "--workers must be at least 1");
        data.worker_threads(n);
    }
    let data = data
        .enable_all()
        .thread_name("weft-data")
        .build()
        .context("starting the data-plane runtime")?;
    data.block_on(run(a, control.handle()))
}

async fn run(a: Args, control: tokio::runtime::Handle) -> anyhow::Result<()> {
    // HOST:PORT, a name in a cluster (weft-controller.weft-system.svc:15012);
    // resolved once at start, as the Service's address is stable.
    let controller = weft_proto::process::resolve_controller("--controller", &a.controller)
        .await
        .map_err(anyhow::Error::msg)?;
    let bound = app::build(Config {
        node: a.node,
        trust_domain: a.trust_domain,
        model_file: a.config,
        ca_addr: controller,
        ca_root: a.ca_root,
        token_file: a.token_file,
        enroll_socket: a.enroll_socket,
        state_dir: a.state_dir,
        mode: if a.permissive {
            Mode::Permissive
        } else {
            Mode::Strict
        },
        deny_passthrough: a.deny_passthrough,
        admin_addr: a.admin_addr,
        metrics_addr: a.metrics_addr,
        ready_addr: a.ready_addr,
        socks5_addr: a.socks5_addr,
        control: Some(control),
        drain_deadline: std::time::Duration::from_secs(a.drain_deadline),
    })
    .await
    .context("ztunnel failed to start")?;
    // A restart: the new process serves our sockets; or a plain stop.
    tokio::select! {
        _ = weft_proto::process::shutdown_signal() => {}
        _ = bound.handed_over.cancelled() => {}
    }
    let cut = bound.shutdown().await;
    tracing::info!(cut, "ztunnel stopped");
    Ok(())
}
