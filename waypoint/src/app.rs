//! Wires a waypoint: its certificate from the controller's CA, its config
//! stream (as `waypoint.<namespace>.<name>`: only what it serves), the
//! HBONE listener, and the drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};
use weft_proto::certs::{CertConfig, CertManager, GrpcCaClient, wait_for_cert};
use weft_proto::credential::controller_access;
use weft_proto::hbone::H2Settings;
use weft_proto::hbone::pool::{Pool, PoolSettings};
use weft_proto::hbone::server::{self, ServerStats};
use weft_proto::identity::{self, Identity};
use weft_proto::listen::Drain;
use weft_proto::model::{Model, waypoint_proxy_name};
use weft_proto::xds::{self, XdsConfig};

use crate::proxy::{Limits, Proxy, Tunnels};
use crate::telemetry::Spans;
use crate::upstream::Upstreams;

#[derive(Debug, Clone)]
pub struct Config {
    /// `<namespace>/<name>` of the waypoint's Gateway.
    pub key: String,
    /// The service account it runs as (its pods').
    pub service_account: String,
    pub trust_domain: String,
    pub ca_addr: SocketAddr,
    /// The mesh root, to verify the controller.
    pub ca_root: PathBuf,
    pub token_file: PathBuf,
    /// HBONE (SPEC: 15008).
    pub listen: SocketAddr,
    /// Where the config stream and certificate work run (a proxy's own
    /// control runtime); `None`: the caller's runtime.
    pub control: Option<tokio::runtime::Handle>,
    pub drain_deadline: Duration,
    pub limits: Limits,
    /// Prometheus `/metrics` (SPEC: 15020); `None`: not served.
    pub metrics: Option<SocketAddr>,
    /// The share of new traces sampled (a caller's decision is kept).
    pub trace_sampling: f64,
    /// An OTLP/gRPC collector for sampled requests' spans
    /// (`http://HOST:4317`); `None`: spans are not exported.
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Access(#[from] weft_proto::credential::AccessError),
    #[error("waypoint {key}: {reason}")]
    Identity { key: String, reason: String },
    #[error(transparent)]
    Spans(#[from] crate::telemetry::SpansError),
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        addr: SocketAddr,
        reason: std::io::Error,
    },
}

/// A running waypoint.
pub struct Bound {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub identity: Identity,
    pub proxy: Arc<Proxy>,
    pub hbone_stats: Arc<ServerStats>,
    /// Renews the waypoint's certificate for as long as it runs.
    pub certs: CertManager,
    spans: Option<Spans>,
    drain: Drain,
    deadline: Duration,
}

impl Bound {
    /// Stops accepting; open tunnels finish up to the drain deadline.
    pub async fn shutdown(self) -> usize {
        let open = self.drain.drain(self.deadline).await;
        if let Some(spans) = self.spans {
            // The last batch goes out before the process ends.
            let _ = tokio::task::spawn_blocking(move || spans.shutdown()).await;
        }
        open
    }
}

/// How long start-up waits for the first config and certificate.
const FIRST_WAIT: Duration = Duration::from_secs(10);

pub async fn build(config: Config) -> Result<Bound, BuildError> {
    let (roots, credential) = controller_access(&config.ca_root, &config.token_file)?;
    let bad = |reason: String| BuildError::Identity {
        key: config.key.clone(),
        reason,
    };
    let namespace = config
        .key
        .split_once('/')
        .map(|(ns, _)| ns)
        .ok_or_else(|| bad("must be <namespace>/<name>".into()))?;
    let identity = Identity::new(&config.trust_domain, namespace, &config.service_account)
        .map_err(|e| bad(e.to_string()))?;
    let controller = identity::controller(&config.trust_domain).map_err(|e| bad(e.to_string()))?;
    let control = config
        .control
        .clone()
        .unwrap_or_else(tokio::runtime::Handle::current);
    let (certs, pushed, spans) = {
        let _on_control = control.enter();
        let spans = config
            .otlp_endpoint
            .as_deref()
            .map(|e| Spans::export_to(e, &config.key))
            .transpose()?;
        let ca = GrpcCaClient::new(
            config.ca_addr,
            roots.clone(),
            controller.clone(),
            credential.clone(),
        );
        let settings = CertConfig {
            roots: Some(roots.clone()),
            ..CertConfig::default()
        };
        let certs = CertManager::new(Arc::new(ca), settings);
        let (pushed, _stats) = xds::spawn(XdsConfig {
            controller: config.ca_addr,
            roots,
            controller_identity: controller,
            credential,
            node: waypoint_proxy_name(&config.key),
            trust_domain: config.trust_domain.clone(),
            types: &weft_proto::resources::WAYPOINT_TYPES,
        });
        (certs, pushed, spans)
    };
    let cert = certs.watch(&identity);
    let model = follow(pushed).await;
    if let Err(e) = wait_for_cert(cert.clone(), &identity, FIRST_WAIT).await {
        warn!(%identity, error = %e, "no certificate yet; tunnels are refused until it arrives");
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|reason| BuildError::Bind {
            addr: config.listen,
            reason,
        })?;
    let addr = listener.local_addr().map_err(|reason| BuildError::Bind {
        addr: config.listen,
        reason,
    })?;
    let upstreams = Arc::new(Upstreams::new(
        Pool::new(PoolSettings::default()),
        identity.clone(),
        cert.clone(),
    ));
    upstreams.close_idle_connections();
    let mut proxy = Proxy::new(
        config.key.clone(),
        identity.clone(),
        model,
        upstreams,
        config.limits.clone(),
    );
    proxy.trace_sampling = config.trace_sampling;
    proxy.spans = spans.clone();
    let proxy = Arc::new(proxy);
    let hbone_stats = Arc::new(ServerStats::default());
    let drain = Drain::new();
    let metrics_addr = match config.metrics {
        Some(addr) => Some(serve_metrics(addr, &proxy, &hbone_stats, &drain).await?),
        None => None,
    };
    drain.spawn(server::serve(
        listener,
        (cert, config.trust_domain.clone()),
        Arc::new(Tunnels(proxy.clone())),
        H2Settings::default(),
        hbone_stats.clone(),
        drain.clone(),
    ));
    info!(waypoint = config.key, %identity, %addr, "waypoint serving HBONE");
    Ok(Bound {
        addr,
        metrics_addr,
        identity,
        proxy,
        hbone_stats,
        certs,
        spans,
        drain,
        deadline: config.drain_deadline,
    })
}

/// `/metrics` on `addr`: the request metrics as recorded, and the
/// waypoint's per-instance counts derived at each scrape.
async fn serve_metrics(
    addr: SocketAddr,
    proxy: &Arc<Proxy>,
    hbone: &Arc<ServerStats>,
    drain: &Drain,
) -> Result<SocketAddr, BuildError> {
    let bind_err = |reason| BuildError::Bind { addr, reason };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    weft_proto::process::prometheus();
    let (proxy, hbone) = (proxy.clone(), hbone.clone());
    let export = move || {
        use std::sync::atomic::Ordering::Relaxed;
        use weft_proto::telemetry::export_counter;
        let s = &proxy.stats;
        export_counter(
            "weft_waypoint_connection_errors_total",
            &[],
            s.connection_errors.load(Relaxed),
        );
        export_counter(
            "weft_waypoint_tunnels_refused_total",
            &[],
            s.tunnels_refused.load(Relaxed),
        );
        export_counter("weft_waypoint_retries_total", &[], s.retries.load(Relaxed));
        hbone.export();
    };
    let handler = weft_proto::telemetry::metrics_handler(export);
    drain.spawn(weft_proto::telemetry::serve_http(
        listener,
        handler,
        drain.clone(),
    ));
    Ok(bound)
}

/// The model, following the config stream (waiting a moment for the first
/// complete config; until then nothing is served).
async fn follow(mut pushed: watch::Receiver<Option<Arc<Model>>>) -> watch::Receiver<Arc<Model>> {
    let (tx, rx) = watch::channel(Arc::new(Model::default()));
    let first = async {
        while pushed.borrow_and_update().is_none() {
            if pushed.changed().await.is_err() {
                return;
            }
        }
    };
    if tokio::time::timeout(FIRST_WAIT, first).await.is_err() {
        warn!("no config from the controller yet; serving nothing until it arrives");
    }
    if let Some(m) = pushed.borrow().clone() {
        tx.send_replace(m);
    }
    tokio::spawn(async move {
        while pushed.changed().await.is_ok() {
            let next = pushed.borrow_and_update().clone();
            if let Some(next) = next {
                tx.send_replace(next);
            }
        }
    });
    rx
}
