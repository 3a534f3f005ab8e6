//! weft-waypoint: the optional L7 proxy, one per namespace or service
//! account (see the library's docs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use weft_proto::process::{LogFormat, init_logging, shutdown_signal};
use weft_waypoint::app::{self, Config};

/// Measured against glibc's malloc in docs/benchmarks.md: fewer
/// instructions per request, a little more memory.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// weft's L7 proxy: Gateway API routes, splits, retries, timeouts and
/// faults for the Services and workloads bound to it.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Waypoint name (the Gateway object's name).
    #[arg(long)]
    name: String,
    /// Namespace of the Gateway.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Service account it runs as (default: the Gateway's name).
    #[arg(long)]
    service_account: Option<String>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The controller's CA and config stream: HOST:PORT, or its Service
    /// name in a cluster (weft-controller.weft-system.svc:15012).
    #[arg(long, default_value = "127.0.0.1:15012")]
    ca_addr: String,
    /// The mesh root certificate (PEM), to verify the controller.
    #[arg(long)]
    ca_root: PathBuf,
    /// Bearer token for the controller (local mode: the controller's
    /// `nodes/waypoint.<namespace>.<name>.token`).
    #[arg(long)]
    token_file: PathBuf,
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,
    /// How long open tunnels may finish after SIGTERM.
    #[arg(long, default_value = "30s", value_parser = humantime_secs)]
    drain_deadline: Duration,
    /// Prometheus /metrics listen address.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// The share of requests without a trace context that start a sampled
    /// trace (0 to 1; a caller's sampling decision is always kept).
    #[arg(long, default_value_t = 0.01)]
    trace_sampling: f64,
    /// Export sampled requests' spans to this OTLP/gRPC collector
    /// (http://HOST:4317); not set: no spans are exported.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let n = s.strip_suffix('s').unwrap_or(s);
    n.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{s:?}: give whole seconds, like 30s"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    let ca_addr = match weft_proto::process::resolve_controller("--ca-addr", &args.ca_addr).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "weft-waypoint could not start");
            return ExitCode::FAILURE;
        }
    };
    let config = Config {
        key: format!("{}/{}", args.namespace, args.name),
        service_account: args.service_account.unwrap_or_else(|| args.name.clone()),
        trust_domain: args.trust_domain,
        ca_addr,
        ca_root: args.ca_root,
        token_file: args.token_file,
        listen: args.listen,
        control: None,
        drain_deadline: args.drain_deadline,
        limits: Default::default(),
        metrics: Some(args.metrics_addr),
        trace_sampling: args.trace_sampling,
        otlp_endpoint: args.otlp_endpoint,
    };
    let bound = match app::build(config).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "weft-waypoint could not start");
            return ExitCode::FAILURE;
        }
    };
    shutdown_signal().await;
    bound.shutdown().await;
    ExitCode::SUCCESS
}
