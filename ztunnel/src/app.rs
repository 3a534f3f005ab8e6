//! Wires the ztunnel together: `build` loads config, connects to the CA,
//! restores enrolled pods, opens the enrollment socket, and returns.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use hyper::StatusCode;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;
use weft_proto::certs::{CertConfig, CertManager, GrpcCaClient};
use weft_proto::hbone::pool::{Pool, PoolSettings};
use weft_proto::hbone::server::ServerStats;
use weft_proto::model::{Model, ModelError};
use weft_proto::tls::{CertState, TrustBundle};
use weft_proto::xds::{self, XdsConfig};

use crate::enroll::{self, Enroller};
use crate::node::{Mode, Node, Stats};
use crate::pods::{PodDialer, Pods, load_persisted};
use crate::socks5::{self, SocksStats};
use crate::telemetry;

#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    pub trust_domain: String,
    /// Static Workload/Service/Policy YAML; `None`: config pushed by the
    /// controller (Delta xDS on `ca_addr`).
    pub model_file: Option<PathBuf>,
    pub ca_addr: SocketAddr,
    /// The mesh root, to verify the controller.
    pub ca_root: PathBuf,
    pub token_file: PathBuf,
    pub enroll_socket: PathBuf,
    /// Holds the persisted enrolled-pod set.
    pub state_dir: PathBuf,
    pub mode: Mode,
    pub deny_passthrough: bool,
    /// `/config_dump`, `/debug/...`: loopback only (SPEC: 127.0.0.1:15000).
    pub admin_addr: SocketAddr,
    /// Prometheus `/metrics` (SPEC: 15020).
    pub metrics_addr: SocketAddr,
    /// `/healthz/ready` (SPEC: 15021).
    pub ready_addr: SocketAddr,
    /// SOCKS5 explicit proxy (SPEC: 15080).
    pub socks5_addr: SocketAddr,
    /// Where control work runs (config stream, certificates, admin,
    /// metrics, readiness): a proxy's own current-thread runtime
    /// (`process::ControlRuntime`); `None`: the caller's runtime.
    pub control: Option<tokio::runtime::Handle>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read {path}: {reason}")]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("config {path}: {reason}")]
    Model { path: PathBuf, reason: ModelError },
    #[error("root certificate {path}: {reason}")]
    Root { path: PathBuf, reason: String },
    #[error("trust domain: {0}")]
    TrustDomain(#[from] weft_proto::identity::IdentityError),
    #[error("enrollment socket {path}: {reason}")]
    Socket {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        addr: SocketAddr,
        reason: std::io::Error,
    },
}

pub struct Bound {
    pub node: Arc<Node>,
    pub enroll_socket: PathBuf,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub ready_addr: SocketAddr,
    pub socks5_addr: SocketAddr,
    pub socks5_stats: Arc<SocksStats>,
    pub hbone_stats: Arc<ServerStats>,
    model: Arc<watch::Sender<Arc<Model>>>,
    /// A complete config has arrived (always true with a static file).
    pub config_ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Bound {
    /// Replaces the config; new connections see it at once.
    pub fn set_model(&self, model: Model) {
        self.model.send_replace(Arc::new(model));
    }

    /// Stops every listener and waits until they are closed. Capture rules
    /// stay: a pod's traffic fails closed until the ztunnel is back and
    /// restores its listeners.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// How long start-up waits for the controller's first config.
const FIRST_CONFIG_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Copies each complete config from the stream into the node's model.
async fn follow(
    mut pushed: watch::Receiver<Option<Arc<Model>>>,
    model: Arc<watch::Sender<Arc<Model>>>,
    ready: Arc<AtomicBool>,
) {
    while pushed.changed().await.is_ok() {
        let next = pushed.borrow_and_update().clone();
        if let Some(next) = next {
            model.send_replace(next);
            ready.store(true, Ordering::Release);
        }
    }
}

/// Requests the certificate of every meshed workload the config places on
/// this node as soon as the config says so, not at enrollment: a pod that
/// starts while the controller is away still gets its identity.
async fn prefetch(node: Arc<crate::node::Node>, stop: CancellationToken) {
    let mut model = node.model.clone();
    loop {
        let current = model.borrow_and_update().clone();
        for w in current
            .workloads
            .iter()
            .filter(|w| w.meshed && w.node == node.name)
        {
            node.certs.watch(&w.identity);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = model.changed() => if changed.is_err() { return },
        }
    }
}

fn read(path: &PathBuf) -> Result<String, BuildError> {
    std::fs::read_to_string(path).map_err(|source| BuildError::Read {
        path: path.clone(),
        reason: source,
    })
}

/// Binds `addr` and serves `handler` on the control runtime: the listener is
/// registered with that runtime's reactor, so a saturated data plane
/// cannot delay it.
async fn serve_control(
    control: &tokio::runtime::Handle,
    addr: SocketAddr,
    handler: telemetry::Handler,
    stop: CancellationToken,
) -> Result<SocketAddr, BuildError> {
    let served = control.spawn(async move {
        let (listener, bound) = telemetry::bind(addr)
            .await
            .map_err(|reason| BuildError::Bind { addr, reason })?;
        tokio::spawn(telemetry::serve_http(listener, handler, stop));
        Ok(bound)
    });
    served.await.unwrap_or_else(|e| {
        Err(BuildError::Bind {
            addr,
            reason: std::io::Error::other(format!("control runtime: {e}")),
        })
    })
}

pub async fn build(config: Config) -> Result<Bound, BuildError> {
    let roots = TrustBundle::from_pem(&read(&config.ca_root)?).map_err(|e| BuildError::Root {
        path: config.ca_root.clone(),
        reason: e.to_string(),
    })?;
    let roots = Arc::new(roots);
    let token = read(&config.token_file)?;
    let controller = weft_proto::identity::controller(&config.trust_domain)?;
    let ca = GrpcCaClient::new(config.ca_addr, roots.clone(), controller.clone(), &token);
    let control = config
        .control
        .clone()
        .unwrap_or_else(tokio::runtime::Handle::current);
    let model_tx = Arc::new(watch::channel(Arc::new(Model::default())).0);
    let model_rx = model_tx.subscribe();
    let config_ready = Arc::new(AtomicBool::new(false));
    match &config.model_file {
        Some(path) => {
            let model = Model::from_yaml(&read(path)?, &config.trust_domain).map_err(|source| {
                BuildError::Model {
                    path: path.clone(),
                    reason: source,
                }
            })?;
            model_tx.send_replace(Arc::new(model));
            config_ready.store(true, Ordering::Release);
        }
        None => {
            // On the control runtime: the stream and its connection live there.
            let entered = control.enter();
            let (pushed, _stats) = xds::spawn(XdsConfig {
                controller: config.ca_addr,
                roots,
                controller_identity: controller,
                token: token.clone(),
                node: config.node.clone(),
                trust_domain: config.trust_domain.clone(),
            });
            tokio::spawn(follow(pushed, model_tx.clone(), config_ready.clone()));
            drop(entered);
            // Restoring pods needs to know their workloads: give the first
            // config a moment; pods that still fail are retried anyway.
            let mut first = model_rx.clone();
            let _ = tokio::time::timeout(FIRST_CONFIG_WAIT, first.changed()).await;
        }
    }
    let pods = Pods::default();
    let node = Arc::new(Node {
        name: config.node.clone(),
        trust_domain: config.trust_domain.clone(),
        mode: config.mode,
        deny_passthrough: config.deny_passthrough,
        model: model_rx,
        certs: {
            let _on_control = control.enter();
            CertManager::new(Arc::new(ca), CertConfig::default())
        },
        pool: Pool::with_dialer(PoolSettings::default(), Arc::new(PodDialer(pods.clone()))),
        pods,
        stats: Stats::default(),
        unavailable: Default::default(),
    });
    let shutdown = CancellationToken::new();
    std::fs::create_dir_all(&config.state_dir).map_err(|source| BuildError::Read {
        path: config.state_dir.clone(),
        reason: source,
    })?;
    let hbone_stats = Arc::new(ServerStats::default());
    let enroller = Arc::new(Enroller::new(
        node.clone(),
        config.state_dir.join("pods.json"),
        hbone_stats.clone(),
        shutdown.clone(),
    ));
    let config_in = config_ready.load(std::sync::atomic::Ordering::Acquire);
    enroller
        .restore(
            load_persisted(&enroller.state_file),
            &enroll::tombstones(&config.enroll_socket),
            config_in,
        )
        .await;
    let socket = enroll::listen(&config.enroll_socket).map_err(|source| BuildError::Socket {
        path: config.enroll_socket.clone(),
        reason: source,
    })?;
    let tasks = enroller.tasks.clone();
    tokio::spawn(enroll::serve(enroller, socket));
    tasks.spawn(prefetch(node.clone(), shutdown.clone()));
    let bind = |addr| async move {
        telemetry::bind(addr)
            .await
            .map_err(|source| BuildError::Bind {
                addr,
                reason: source,
            })
    };
    telemetry::prometheus();
    let dump = node.clone();
    let admin_handler = Arc::new(move |path: &str| admin_page(&dump, path));
    let serve = |addr, handler| serve_control(&control, addr, handler, shutdown.clone());
    let admin_addr = serve(config.admin_addr, admin_handler).await?;
    let metrics_handler = Arc::new(|path: &str| match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            telemetry::prometheus().render(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics\n".to_owned(),
        ),
    });
    let metrics_addr = serve(config.metrics_addr, metrics_handler).await?;
    // Ready once a complete config is in, restored pods are back and the
    // enrollment socket is open.
    let is_ready = config_ready.clone();
    let ready_handler = Arc::new(move |path: &str| match path {
        "/healthz/ready" if is_ready.load(Ordering::Acquire) => {
            (StatusCode::OK, "text/plain", "ready\n".to_owned())
        }
        "/healthz/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "waiting for config from the controller\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /healthz/ready\n".to_owned(),
        ),
    });
    let ready_addr = serve(config.ready_addr, ready_handler).await?;
    let (socks, socks5_addr) = bind(config.socks5_addr).await?;
    let socks5_stats = Arc::new(SocksStats::default());
    tokio::spawn(socks5::serve(
        node.clone(),
        socks,
        socks5_stats.clone(),
        shutdown.clone(),
    ));
    info!(node = %config.node, socket = %config.enroll_socket.display(), mode = ?config.mode, "ztunnel ready");
    Ok(Bound {
        node,
        enroll_socket: config.enroll_socket,
        admin_addr,
        metrics_addr,
        ready_addr,
        socks5_addr,
        socks5_stats,
        hbone_stats,
        model: model_tx,
        config_ready,
        shutdown,
        tasks,
    })
}

/// The admin port: what this ztunnel knows and does, as JSON.
fn admin_page(node: &Node, path: &str) -> (StatusCode, &'static str, String) {
    let body = match path {
        "/config_dump" => config_dump(node),
        "/debug/pods" => json!(node.pods.specs()),
        "/debug/certs" => json!(certs(node)),
        _ => {
            let help = "endpoints: /config_dump /debug/pods /debug/certs\n";
            return (StatusCode::NOT_FOUND, "text/plain", help.to_owned());
        }
    };
    let text = serde_json::to_string_pretty(&body).unwrap_or_default();
    (StatusCode::OK, "application/json", text)
}

fn certs(node: &Node) -> Vec<serde_json::Value> {
    node.certs
        .snapshot()
        .into_iter()
        .map(|(id, state)| match state {
            CertState::Available(c) => json!({
                "identity": id.to_string(), "state": "available", "serial": c.serial(),
                "expiresInSeconds": c.remaining().as_secs(),
            }),
            CertState::Initializing => json!({"identity": id.to_string(), "state": "initializing"}),
            CertState::Unavailable(why) => json!({"identity": id.to_string(), "state": "unavailable", "reason": why.to_string()}),
        })
        .collect()
}

fn config_dump(node: &Node) -> serde_json::Value {
    let model = node.model.borrow().clone();
    json!({
        "node": node.name,
        "trustDomain": node.trust_domain,
        "mode": format!("{:?}", node.mode).to_uppercase(),
        "denyPassthrough": node.deny_passthrough,
        "workloads": model.workloads.iter().map(|w| json!({
            "workload": w.key, "identity": w.identity.to_string(), "node": w.node,
            "addresses": w.addresses, "meshed": w.meshed, "services": w.services,
        })).collect::<Vec<_>>(),
        "services": model.services.iter().map(|s| json!({
            "service": s.key, "addresses": s.addresses, "ports": s.ports,
            "endpoints": s.endpoints().iter().map(|w| w.key.clone()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "policies": model.policies.iter().map(|p| json!({
            "policy": p.key, "action": format!("{:?}", p.action).to_uppercase(), "rules": p.rules.len(),
        })).collect::<Vec<_>>(),
        "enrolledPods": node.pods.specs(),
        "certificates": certs(node),
    })
}
