//! A waypoint in its own network namespace, as a pod runs it: its data
//! plane (HBONE listener, tunnels to endpoints) on a thread that entered
//! the namespace, its control work (config stream, certificates) on the
//! caller's runtime in the host namespace, where the controller listens.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use nix::sched::{CloneFlags, setns};
use tokio::sync::oneshot;
use weft_controller::app::Bound as Controller;
use weft_proto::model::waypoint_proxy_name;
use weft_waypoint::app::{self, Config};
use weft_waypoint::proxy::{Limits, Proxy};

use super::topology::PodNs;

/// A running waypoint; stopped (drained) by [`Waypoint::stop`] or on drop.
pub struct Waypoint {
    pub proxy: Arc<Proxy>,
    pub addr: SocketAddr,
    /// `/metrics`, inside the waypoint's pod.
    pub metrics_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Waypoint {
    /// Stops accepting and waits for it to close (open tunnels get a
    /// second to finish).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts waypoint `key` (`<namespace>/<name>`) running as `service_account`
/// in `pod`'s namespace, trusting `ctl`'s root, authenticated with the
/// token `ctl` keeps for `waypoint.<namespace>.<name>`.
pub async fn start_waypoint(
    ctl: &Controller,
    key: &str,
    service_account: &str,
    pod: &PodNs,
    dir: &Path,
) -> anyhow::Result<Waypoint> {
    let options = WaypointOptions::default();
    start_waypoint_with(ctl, (key, service_account), pod, dir, options).await
}

/// What a test may set on a waypoint beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct WaypointOptions {
    pub limits: Limits,
    /// An OTLP/gRPC collector for its spans (reached from the host namespace).
    pub otlp_endpoint: Option<String>,
}

/// [`start_waypoint`] with its own limits and span export.
pub async fn start_waypoint_with(
    ctl: &Controller,
    (key, service_account): (&str, &str),
    pod: &PodNs,
    dir: &Path,
    options: WaypointOptions,
) -> anyhow::Result<Waypoint> {
    std::fs::create_dir_all(dir)?;
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, &ctl.root_pem)?;
    let config = Config {
        key: key.to_owned(),
        service_account: service_account.to_owned(),
        trust_domain: super::mesh::TD.to_owned(),
        ca_addr: ctl.grpc_addr,
        ca_root: root,
        token_file: ctl.nodes.ensure(&waypoint_proxy_name(key))?,
        listen: "0.0.0.0:15008".parse()?,
        control: Some(tokio::runtime::Handle::current()),
        drain_deadline: Duration::from_secs(1),
        limits: options.limits,
        metrics: Some("127.0.0.1:0".parse()?),
        // Every request traced, so a test can follow one.
        trace_sampling: 1.0,
        otlp_endpoint: options.otlp_endpoint,
    };
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let netns = pod.path.clone();
    let thread = std::thread::Builder::new()
        .name(format!("waypoint-{}", pod.name))
        .spawn(move || run_in(&netns, config, ready_tx, stop_rx))?;
    let (proxy, addr, metrics_addr) = ready_rx
        .await
        .map_err(|_| anyhow!("the waypoint thread ended before it was ready"))?
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("starting waypoint {key}"))?;
    Ok(Waypoint {
        proxy,
        addr,
        metrics_addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// The running waypoint's proxy, HBONE address and metrics address.
type Started = (Arc<Proxy>, SocketAddr, Option<SocketAddr>);
type Ready = oneshot::Sender<Result<Started, String>>;

/// The waypoint's thread: enter the namespace, then serve until stopped.
fn run_in(netns: &Path, config: Config, ready: Ready, stop: oneshot::Receiver<()>) {
    let entered = std::fs::File::open(netns)
        .map_err(|e| e.to_string())
        .and_then(|f| setns(f, CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string());
    let runtime = match entered.and(runtime) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("entering {}: {e}", netns.display())));
            return;
        }
    };
    runtime.block_on(async move {
        match app::build(config).await {
            Ok(bound) => {
                let _ = ready.send(Ok((bound.proxy.clone(), bound.addr, bound.metrics_addr)));
                let _ = stop.await;
                bound.shutdown().await;
            }
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
            }
        }
    });
}
