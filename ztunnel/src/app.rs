//! Wires the ztunnel together: `build` loads config, connects to the CA,
//! restores enrolled pods, opens the enrollment socket, and returns.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;
use weft_proto::certs::{CertConfig, CertManager, GrpcCaClient};
use weft_proto::hbone::pool::{Pool, PoolSettings};
use weft_proto::hbone::server::ServerStats;
use weft_proto::model::{Model, ModelError};
use weft_proto::tls::TrustBundle;

use crate::enroll::{self, Enroller};
use crate::node::{Mode, Node, Stats};
use crate::pods::{PodDialer, Pods, load_persisted};

#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    pub trust_domain: String,
    /// Static Workload/Service/Policy YAML (until the controller pushes config).
    pub model_file: PathBuf,
    pub ca_addr: SocketAddr,
    /// The mesh root, to verify the controller.
    pub ca_root: PathBuf,
    pub token_file: PathBuf,
    pub enroll_socket: PathBuf,
    /// Holds the persisted enrolled-pod set.
    pub state_dir: PathBuf,
    pub mode: Mode,
    pub deny_passthrough: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {source}")]
    Model { path: PathBuf, source: ModelError },
    #[error("root certificate {path}: {reason}")]
    Root { path: PathBuf, reason: String },
    #[error("trust domain: {0}")]
    TrustDomain(#[from] weft_proto::identity::IdentityError),
    #[error("enrollment socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct Bound {
    pub node: Arc<Node>,
    pub enroll_socket: PathBuf,
    pub hbone_stats: Arc<ServerStats>,
    model: watch::Sender<Arc<Model>>,
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

fn read(path: &PathBuf) -> Result<String, BuildError> {
    std::fs::read_to_string(path).map_err(|source| BuildError::Read {
        path: path.clone(),
        source,
    })
}

pub async fn build(config: Config) -> Result<Bound, BuildError> {
    let model =
        Model::from_yaml(&read(&config.model_file)?, &config.trust_domain).map_err(|source| {
            BuildError::Model {
                path: config.model_file.clone(),
                source,
            }
        })?;
    let (model_tx, model_rx) = watch::channel(Arc::new(model));
    let roots = TrustBundle::from_pem(&read(&config.ca_root)?).map_err(|e| BuildError::Root {
        path: config.ca_root.clone(),
        reason: e.to_string(),
    })?;
    let token = read(&config.token_file)?;
    let ca = GrpcCaClient::new(
        config.ca_addr,
        Arc::new(roots),
        weft_proto::identity::controller(&config.trust_domain)?,
        &token,
    );
    let pods = Pods::default();
    let node = Arc::new(Node {
        name: config.node.clone(),
        trust_domain: config.trust_domain.clone(),
        mode: config.mode,
        deny_passthrough: config.deny_passthrough,
        model: model_rx,
        certs: CertManager::new(Arc::new(ca), CertConfig::default()),
        pool: Pool::with_dialer(PoolSettings::default(), Arc::new(PodDialer(pods.clone()))),
        pods,
        stats: Stats::default(),
    });
    let shutdown = CancellationToken::new();
    std::fs::create_dir_all(&config.state_dir).map_err(|source| BuildError::Read {
        path: config.state_dir.clone(),
        source,
    })?;
    let hbone_stats = Arc::new(ServerStats::default());
    let enroller = Arc::new(Enroller::new(
        node.clone(),
        config.state_dir.join("pods.json"),
        hbone_stats.clone(),
        shutdown.clone(),
    ));
    enroller.restore(load_persisted(&enroller.state_file)).await;
    let socket = enroll::listen(&config.enroll_socket).map_err(|source| BuildError::Socket {
        path: config.enroll_socket.clone(),
        source,
    })?;
    let tasks = enroller.tasks.clone();
    tokio::spawn(enroll::serve(enroller, socket));
    info!(node = %config.node, socket = %config.enroll_socket.display(), mode = ?config.mode, "ztunnel ready");
    Ok(Bound {
        node,
        enroll_socket: config.enroll_socket,
        hbone_stats,
        model: model_tx,
        shutdown,
        tasks,
    })
}
