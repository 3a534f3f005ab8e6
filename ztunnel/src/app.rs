//! Wires the ztunnel together: `build` loads config, connects to the CA,
//! restores enrolled pods, opens the enrollment socket, and returns.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use hyper::StatusCode;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};

use std::os::fd::{AsFd, OwnedFd};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weft_proto::certs::{CertConfig, CertManager, GrpcCaClient};
use weft_proto::credential::{Credential, controller_access};
use weft_proto::hbone::pool::{Pool, PoolSettings};
use weft_proto::hbone::server::ServerStats;
use weft_proto::listen::Drain;
use weft_proto::model::{Model, ModelError};
use weft_proto::roots::Roots;
use weft_proto::tls::CertState;
use weft_proto::xds::{self, XdsConfig};

use crate::enroll::{self, Enroller};
use crate::handover;
use crate::node::{Mode, Node, Stats};
use crate::pods::{PodDialer, PodSpec, Pods, load_persisted};
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
    /// How long live connections may finish after shutdown or a handover
    /// before they are closed (SPEC: the reference's 30 s grace).
    pub drain_deadline: std::time::Duration,
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
    #[error(transparent)]
    Access(#[from] weft_proto::credential::AccessError),
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
    /// Fires when a new ztunnel serves this one's sockets: time to drain.
    pub handed_over: CancellationToken,
    /// Pods, SOCKS5, enrollment and every connection they carry.
    drain: Drain,
    /// Admin, metrics and readiness, on the control runtime.
    control_drain: Drain,
    deadline: std::time::Duration,
    /// Stops offering this ztunnel's sockets when it is gone. They stay on
    /// offer while it drains: a successor started meanwhile (a rollout that
    /// stops the old pod first) still takes them, with what queued on them.
    _offer: tokio_util::sync::DropGuard,
}

impl Bound {
    /// Replaces the config; new connections see it at once.
    pub fn set_model(&self, model: Model) {
        self.model.send_replace(Arc::new(model));
    }

    /// Stops accepting, lets live connections finish up to the drain
    /// deadline, closes the rest, and waits until every listener it started
    /// is closed; returns how many connections were cut. Capture rules stay:
    /// a pod's traffic fails closed until a ztunnel is back (or, after a
    /// handover, is already served by the new one).
    pub async fn shutdown(self) -> usize {
        let cut = self.drain.drain(self.deadline).await;
        self.control_drain.drain(std::time::Duration::ZERO).await;
        cut
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

/// A node listener bound to `addr`; if the address is taken by the
/// previous ztunnel (same network namespace: a host process, or a
/// host-network pod), the one it handed over. In Kubernetes the new pod has
/// its own namespace, so it binds its own and probes reach it. Returns it
/// with a copy of its socket to hand over.
async fn open_listener(
    addr: SocketAddr,
    handed: Option<OwnedFd>,
) -> Result<(TcpListener, OwnedFd), BuildError> {
    let bind_error = |reason| BuildError::Bind { addr, reason };
    let listener = match (TcpListener::bind(addr).await, handed) {
        (Ok(l), _) => l,
        (Err(e), Some(fd)) if e.kind() == std::io::ErrorKind::AddrInUse => {
            handover::listener(fd).map_err(bind_error)?
        }
        (Err(e), _) => return Err(bind_error(e)),
    };
    let kept = listener.as_fd().try_clone_to_owned().map_err(bind_error)?;
    Ok((listener, kept))
}

/// Opens a node listener on the control runtime and serves `handler` there:
/// the listener is registered with that runtime's reactor, so a saturated
/// data plane cannot delay it.
async fn serve_control(
    control: &tokio::runtime::Handle,
    (addr, handed): (SocketAddr, Option<OwnedFd>),
    handler: telemetry::Handler,
    drain: Drain,
) -> Result<(SocketAddr, OwnedFd), BuildError> {
    let served = control.spawn(async move {
        let (listener, kept) = open_listener(addr, handed).await?;
        let bound = listener
            .local_addr()
            .map_err(|reason| BuildError::Bind { addr, reason })?;
        tokio::spawn(telemetry::serve_http(listener, handler, drain));
        Ok((bound, kept))
    });
    served.await.unwrap_or_else(|e| {
        Err(BuildError::Bind {
            addr,
            reason: std::io::Error::other(format!("control runtime: {e}")),
        })
    })
}

/// The model: from the static file, or followed from the controller's
/// stream (waiting a moment for the first complete config).
async fn start_config(
    config: &Config,
    control: &tokio::runtime::Handle,
    (roots, credential): (Roots, Credential),
) -> Result<(Arc<watch::Sender<Arc<Model>>>, Arc<AtomicBool>), BuildError> {
    let model_tx = Arc::new(watch::channel(Arc::new(Model::default())).0);
    let config_ready = Arc::new(AtomicBool::new(false));
    if let Some(path) = &config.model_file {
        let model = Model::from_yaml(&read(path)?, &config.trust_domain).map_err(|source| {
            BuildError::Model {
                path: path.clone(),
                reason: source,
            }
        })?;
        model_tx.send_replace(Arc::new(model));
        config_ready.store(true, Ordering::Release);
        return Ok((model_tx, config_ready));
    }
    let mut first = model_tx.subscribe();
    // On the control runtime: the stream and its connection live there.
    let entered = control.enter();
    let (pushed, _stats) = xds::spawn(XdsConfig {
        controller: config.ca_addr,
        roots,
        controller_identity: weft_proto::identity::controller(&config.trust_domain)?,
        types: &weft_proto::resources::ZTUNNEL_TYPES,
        credential,
        node: config.node.clone(),
        trust_domain: config.trust_domain.clone(),
    });
    tokio::spawn(follow(pushed, model_tx.clone(), config_ready.clone()));
    drop(entered);
    // Restoring pods needs to know their workloads: give the first
    // config a moment; pods that still fail are retried anyway.
    let _ = tokio::time::timeout(FIRST_CONFIG_WAIT, first.changed()).await;
    Ok((model_tx, config_ready))
}

/// Asks a running ztunnel for its sockets (a restart); `None` when there
/// is none, or it cannot hand over (then this one binds its own).
async fn take_over(state_dir: &std::path::Path) -> Option<handover::Taken> {
    match handover::take(&handover::socket_path(state_dir)).await {
        Ok(taken) => taken,
        Err(e) => {
            warn!(error = %e, "could not take over the running ztunnel's sockets; binding new ones");
            None
        }
    }
}

/// Serves the pods a previous ztunnel handed over on their own sockets,
/// once their certificates are in (so no handshake finds none).
async fn adopt(enroller: &Enroller, pods: Vec<(PodSpec, [OwnedFd; 3])>) {
    let node = &enroller.node;
    let model = node.model.borrow().clone();
    // Every fetch starts now; together they wait at most one bound, so a
    // slow CA delays the takeover (the old one serves meanwhile) by that
    // much, not by that much per pod.
    let watches: Vec<_> = pods
        .iter()
        .filter_map(|(spec, _)| model.workload(&spec.namespace, &spec.name))
        .map(|w| (node.certs.watch(&w.identity), w.identity.clone()))
        .collect();
    let deadline = tokio::time::Instant::now() + FIRST_CONFIG_WAIT;
    for (watch, id) in watches {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let _ = weft_proto::certs::wait_for_cert(watch, &id, left).await;
    }
    for (spec, fds) in pods {
        let uid = spec.uid.clone();
        if let Err(e) = enroller.adopt(spec, fds).await {
            warn!(uid, error = %e, "could not serve a handed-over pod; restoring it anew");
        }
    }
}

fn new_node(
    config: &Config,
    model: &watch::Sender<Arc<Model>>,
    (ca, roots): (GrpcCaClient, Roots),
) -> Arc<Node> {
    let control = config
        .control
        .clone()
        .unwrap_or_else(tokio::runtime::Handle::current);
    let pods = Pods::default();
    Arc::new(Node {
        name: config.node.clone(),
        trust_domain: config.trust_domain.clone(),
        mode: config.mode,
        deny_passthrough: config.deny_passthrough,
        model: model.subscribe(),
        certs: {
            let _on_control = control.enter();
            let certs = CertConfig {
                roots: Some(roots),
                ..CertConfig::default()
            };
            CertManager::new(Arc::new(ca), certs)
        },
        pool: Pool::with_dialer(PoolSettings::default(), Arc::new(PodDialer(pods.clone()))),
        pods,
        stats: Stats::default(),
        unavailable: Default::default(),
    })
}

/// Enrollment: pods handed over by a previous ztunnel, then the persisted
/// set, then the socket new pods come through.
async fn start_pods(
    config: &Config,
    enroller: Arc<Enroller>,
    handed: Vec<(PodSpec, [OwnedFd; 3])>,
    config_in: bool,
) -> Result<(), BuildError> {
    adopt(&enroller, handed).await;
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
    let drain = enroller.drain.clone();
    drain.spawn(prefetch(enroller.node.clone(), drain.stopping().clone()));
    drain.spawn(enroll::serve(enroller, socket));
    Ok(())
}

pub async fn build(config: Config) -> Result<Bound, BuildError> {
    let (roots, credential) = controller_access(&config.ca_root, &config.token_file)?;
    let controller = weft_proto::identity::controller(&config.trust_domain)?;
    let ca = GrpcCaClient::new(
        config.ca_addr,
        roots.clone(),
        controller,
        credential.clone(),
    );
    let control = config
        .control
        .clone()
        .unwrap_or_else(tokio::runtime::Handle::current);
    std::fs::create_dir_all(&config.state_dir).map_err(|source| BuildError::Read {
        path: config.state_dir.clone(),
        reason: source,
    })?;
    let (model_tx, config_ready) =
        start_config(&config, &control, (roots.clone(), credential)).await?;
    let node = new_node(&config, &model_tx, (ca, roots));
    let mut taken = take_over(&config.state_dir).await;
    let (drain, control_drain) = (Drain::new(), Drain::new());
    let hbone_stats = Arc::new(ServerStats::default());
    let enroller = Arc::new(Enroller::new(
        node.clone(),
        config.state_dir.join("pods.json"),
        hbone_stats.clone(),
        drain.clone(),
    ));
    let handed_pods = taken.as_mut().map(|t| std::mem::take(&mut t.pods));
    let config_in = config_ready.load(Ordering::Acquire);
    start_pods(
        &config,
        enroller,
        handed_pods.unwrap_or_default(),
        config_in,
    )
    .await?;
    let mut handed = |name: &str| taken.as_mut().and_then(|t| t.node.remove(name));
    telemetry::prometheus();
    let dump = node.clone();
    let admin_handler: telemetry::Handler = Arc::new(move |path: &str| admin_page(&dump, path));
    let serve = |listen, handler| serve_control(&control, listen, handler, control_drain.clone());
    let admin = serve((config.admin_addr, handed("admin")), admin_handler).await?;
    let socks5_stats = Arc::new(SocksStats::default());
    let export = {
        let (node, hbone, socks) = (node.clone(), hbone_stats.clone(), socks5_stats.clone());
        move || {
            node.stats.export();
            node.pool.stats().export();
            hbone.export();
            socks.export();
        }
    };
    let metrics = serve(
        (config.metrics_addr, handed("metrics")),
        telemetry::metrics_handler(export),
    )
    .await?;
    let ready = serve(
        (config.ready_addr, handed("ready")),
        ready_handler(&config_ready),
    )
    .await?;
    let (socks, socks_fd) = open_listener(config.socks5_addr, handed("socks5")).await?;
    let socks5_addr = socks.local_addr().map_err(|reason| BuildError::Bind {
        addr: config.socks5_addr,
        reason,
    })?;
    drain.spawn(socks5::serve(
        node.clone(),
        socks,
        socks5_stats.clone(),
        drain.clone(),
    ));
    if let Some(t) = taken
        && let Err(e) = t.finish().await
    {
        warn!(error = %e, "could not tell the previous ztunnel it was replaced");
    }
    let handed_over = CancellationToken::new();
    let node_fds = vec![
        ("admin", admin.1),
        ("metrics", metrics.1),
        ("ready", ready.1),
        ("socks5", socks_fd),
    ];
    let path = handover::socket_path(&config.state_dir);
    let offer = CancellationToken::new();
    let (pods, stop) = (node.pods.clone(), offer.clone());
    tokio::spawn(handover::offer(
        path,
        node_fds,
        pods,
        handed_over.clone(),
        stop,
    ));
    info!(node = %config.node, socket = %config.enroll_socket.display(), mode = ?config.mode, "ztunnel ready");
    Ok(Bound {
        node,
        enroll_socket: config.enroll_socket,
        admin_addr: admin.0,
        metrics_addr: metrics.0,
        ready_addr: ready.0,
        socks5_addr,
        socks5_stats,
        hbone_stats,
        model: model_tx,
        config_ready,
        handed_over,
        drain,
        control_drain,
        deadline: config.drain_deadline,
        _offer: offer.drop_guard(),
    })
}

/// Ready once a complete config is in, restored pods are back and the
/// enrollment socket is open.
fn ready_handler(config_ready: &Arc<AtomicBool>) -> telemetry::Handler {
    let is_ready = config_ready.clone();
    Arc::new(move |path: &str| match path {
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
