//! Wires the controller together: `build` binds, starts, and returns the real
//! addresses and a shutdown handle.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;
use weft_proto::certs::{CertConfig, CertManager, wait_for_cert};
use weft_proto::identity::Identity;
use weft_proto::tls::{self, ClientAuth};

use crate::ca::{CaError, CertificateAuthority, ServingNames, ServingSigner};
use crate::ca_server::CaService;
use crate::nodes::{NodeError, Nodes};
use crate::rest;
use crate::source::local::LocalSource;
use crate::source::{SourceStatus, kubernetes};
use crate::state::{ConfigStore, Proxies};
use crate::tls_incoming;
use crate::xds::XdsService;

#[derive(Debug, Clone)]
pub struct Config {
    /// Holds `ca/` and `nodes/`; made 0700.
    pub data_dir: PathBuf,
    pub trust_domain: String,
    /// gRPC (CA now, config push later), TLS. SPEC: 15012.
    pub grpc_addr: SocketAddr,
    /// Upper bound on workload certificate lifetime.
    pub max_cert_ttl: Duration,
    /// Where the config comes from.
    pub source: SourceConfig,
    /// REST API (SPEC: 8080).
    pub rest_addr: SocketAddr,
    /// Prometheus metrics (SPEC: 15014).
    pub metrics_addr: SocketAddr,
    /// DNS names and IPs the serving certificate carries beside the
    /// defaults (`ServingNames::for_listener`).
    pub server_names: Vec<String>,
    pub server_ips: Vec<std::net::IpAddr>,
    /// Proxies' first syncs served at once (`xds::FIRST_SYNCS_AT_ONCE`).
    pub first_syncs: usize,
    /// How often the CA's material is looked at again (the CA directory,
    /// and in Kubernetes the Secret): a rotation step needs no restart.
    pub ca_follow: Duration,
}

impl Config {
    /// A controller on `data_dir` with every port on 127.0.0.1, chosen by the
    /// kernel (the demo and tests); the binary sets the SPEC ports from its
    /// flags.
    pub fn local(data_dir: PathBuf) -> Self {
        Config {
            data_dir,
            trust_domain: "cluster.local".into(),
            grpc_addr: ([127, 0, 0, 1], 0).into(),
            max_cert_ttl: Duration::from_secs(24 * 3600),
            source: SourceConfig::Local(None),
            rest_addr: ([127, 0, 0, 1], 0).into(),
            metrics_addr: ([127, 0, 0, 1], 0).into(),
            server_names: Vec::new(),
            server_ips: Vec::new(),
            first_syncs: crate::xds::FIRST_SYNCS_AT_ONCE,
            ca_follow: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A directory of Kubernetes-shaped YAML files, watched (default:
    /// `<data-dir>/config`).
    Local(Option<PathBuf>),
    /// The Kubernetes API server: in-cluster config or `KUBECONFIG` by
    /// default, else the kubeconfig file and context named.
    Kubernetes(KubeAccess),
}

/// How to reach the Kubernetes API (as every Kubernetes tool spells it),
/// and weft's place in the cluster.
#[derive(Debug, Clone)]
pub struct KubeAccess {
    /// A kubeconfig file (`--kubeconfig`); default: in-cluster, else `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// A context of that kubeconfig (`--context`); default: its current one.
    pub context: Option<String>,
    /// The controller's own namespace: its CA Secret and trust bundle.
    pub namespace: String,
    /// How proxies' ServiceAccount tokens are judged.
    pub proxy_tokens: crate::kube_auth::ProxyTokens,
    /// This replica in the leader election (its pod name).
    pub replica: String,
    /// The image of the waypoint Deployments the leader makes.
    pub waypoint_image: String,
    /// The OTLP/gRPC collector the waypoints it makes export spans to.
    pub waypoint_otlp_endpoint: Option<String>,
    /// The aggregated API's HTTPS port (`APIService v1alpha1.api.weft.dev`).
    pub aggregated_addr: SocketAddr,
}

impl Default for KubeAccess {
    fn default() -> Self {
        KubeAccess {
            kubeconfig: None,
            context: None,
            namespace: "weft-system".into(),
            proxy_tokens: Default::default(),
            replica: "weft-controller".into(),
            waypoint_image: crate::waypoint_deploy::Settings::default().image,
            waypoint_otlp_endpoint: None,
            aggregated_addr: ([127, 0, 0, 1], 0).into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Local(#[from] crate::source::local::LocalError),
    #[error("Kubernetes source: {0}")]
    Kubernetes(String),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Nodes(#[from] NodeError),
    #[error("cannot prepare data directory {path}: {reason}")]
    DataDir {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        addr: SocketAddr,
        reason: std::io::Error,
    },
    #[error("trust domain: {0}")]
    TrustDomain(#[from] weft_proto::identity::IdentityError),
    #[error("controller certificate: {0}")]
    Cert(#[from] weft_proto::certs::CertError),
}

/// A running controller.
pub struct Bound {
    pub grpc_addr: SocketAddr,
    pub ca: Arc<CertificateAuthority>,
    pub nodes: Arc<Nodes>,
    pub identity: Identity,
    pub root_pem: String,
    /// What the config stream serves; `set` pushes changes to proxies.
    pub config: ConfigStore,
    /// Proxies on the config stream and what they ACKed.
    pub proxies: Proxies,
    pub rest_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The aggregated API (Kubernetes mode).
    pub aggregated_addr: Option<SocketAddr>,
    /// Bearer token for the REST API.
    pub api_token: String,
    /// The local directory source (local mode).
    pub local: Option<Arc<LocalSource>>,
    /// What the source holds and could not use.
    pub sources: watch::Receiver<Arc<SourceStatus>>,
    shutdown: CancellationToken,
    server: JoinHandle<()>,
    accepting: JoinHandle<()>,
}

impl Bound {
    /// Stops accepting, ends config streams, and waits (bounded) for
    /// in-flight requests to finish.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        // The gRPC port is free once this returns (a restart binds it).
        let _ = tokio::time::timeout(Duration::from_secs(5), self.accepting).await;
        let abort = self.server.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), self.server)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

pub async fn build(config: Config) -> Result<Bound, BuildError> {
    let identity = weft_proto::identity::controller(&config.trust_domain)?;
    prepare_data_dir(&config.data_dir)?;
    weft_proto::process::prometheus();
    let kube = match &config.source {
        SourceConfig::Kubernetes(access) => Some(kube_ca(&config, access).await?),
        SourceConfig::Local(_) => None,
    };
    let ca = Arc::new(CertificateAuthority::load_or_create(
        &config.data_dir.join("ca"),
        &config.trust_domain,
        config.max_cert_ttl,
    )?);
    let nodes = Arc::new(Nodes::load(&config.data_dir.join("nodes"))?);
    if let (Some(client), SourceConfig::Kubernetes(access)) = (&kube, &config.source) {
        publish_roots(client, &access.namespace, &ca.root_pem())
            .await
            .map_err(|e| BuildError::Kubernetes(e.to_string()))?;
        nodes.accept_kubernetes_tokens(crate::kube_auth::ProxyReviewer::new(
            client.clone(),
            access.proxy_tokens.clone(),
        ));
    }

    // The controller's own serving certificate, renewed like any workload's.
    let signer = ServingSigner {
        ca: ca.clone(),
        names: ServingNames::for_listener(
            config.grpc_addr,
            &config.server_names,
            &config.server_ips,
        ),
    };
    let certs = CertManager::new(
        Arc::new(signer),
        CertConfig {
            ttl: config.max_cert_ttl,
            leaf: tls::Leaf::Serving,
            ..CertConfig::default()
        },
    );
    let cert = certs.watch(&identity);
    wait_for_cert(cert.clone(), &identity, Duration::from_secs(10)).await?;
    let tls = tls::server_config(
        cert.clone(),
        ClientAuth::Optional {
            trust_domain: config.trust_domain.clone(),
        },
    );

    let (listener, grpc_addr) = bind(config.grpc_addr).await?;
    let shutdown = CancellationToken::new();
    follow_ca(ca.clone(), &config, kube.clone(), shutdown.clone());
    let (incoming, accepting) = tls_incoming::incoming(listener, tls, shutdown.clone());
    let service = CaService::new(ca.clone(), nodes.clone(), config.trust_domain.clone());
    let store = ConfigStore::new();
    // The CA's entitlements follow the config served.
    nodes.follow(store.subscribe());
    let (local, sources, kube_client) = match &config.source {
        SourceConfig::Local(dir) => {
            let dir = dir
                .clone()
                .unwrap_or_else(|| config.data_dir.join("config"));
            let local = LocalSource::start(
                &dir,
                &config.data_dir,
                &config.trust_domain,
                store.clone(),
                shutdown.clone(),
            )?;
            let status = local.status();
            (Some(local), status, None)
        }
        SourceConfig::Kubernetes(_) => {
            let client = kube.clone().expect("made above in Kubernetes mode");
            start_leader_work(&client, &config, &ca, &store, &shutdown);
            let k8s = kubernetes::start(
                client,
                store.clone(),
                &config.trust_domain,
                shutdown.clone(),
            );
            (None, k8s.status, Some(k8s.client))
        }
    };
    let proxies = Proxies::default();
    let xds = XdsService::new(
        store.clone(),
        nodes.clone(),
        proxies.clone(),
        shutdown.clone(),
        config.first_syncs,
    );
    let stop = shutdown.clone();
    let server = tokio::spawn(async move {
        // Keep the certificate manager (and its renewals) alive with the server.
        let _certs = certs;
        let result = tonic::transport::Server::builder()
            .add_service(service)
            .add_service(xds)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    let api_token = rest::load_or_create_token(&config.data_dir)?;
    let (rest_listener, rest_addr) = bind(config.rest_addr).await?;
    let reviewer = kube_client
        .clone()
        .map(|c| Arc::new(crate::kube_auth::Reviewer::new(c)));
    let api = rest::Api {
        config: store.clone(),
        proxies: proxies.clone(),
        ca: ca.clone(),
        local: local.clone(),
        sources: sources.clone(),
        auth: match &reviewer {
            Some(reviewer) => rest::Auth::Kubernetes(reviewer.clone()),
            None => rest::Auth::Token(api_token.clone().into()),
        },
    };
    let aggregated_addr = match (&config.source, kube_client, reviewer) {
        (SourceConfig::Kubernetes(access), Some(client), Some(reviewer)) => {
            let (listener, addr) = bind(access.aggregated_addr).await?;
            let (api, cert) = (api.clone(), cert.clone());
            crate::aggregated::start(listener, api, reviewer, client, cert, shutdown.clone()).await;
            Some(addr)
        }
        _ => None,
    };
    tokio::spawn(rest::serve(rest_listener, api, shutdown.clone()));
    let (metrics_listener, metrics_addr) = bind(config.metrics_addr).await?;
    tokio::spawn(rest::serve_metrics(metrics_listener, shutdown.clone()));
    info!(grpc = %grpc_addr, rest = %rest_addr, metrics = %metrics_addr, identity = %identity, "controller ready");
    Ok(Bound {
        grpc_addr,
        root_pem: ca.root_pem(),
        ca,
        nodes,
        identity,
        config: store,
        proxies,
        rest_addr,
        metrics_addr,
        aggregated_addr,
        api_token,
        local,
        sources,
        shutdown,
        server,
        accepting,
    })
}

/// Looks at the CA's material every `config.ca_follow`: in Kubernetes a
/// changed Secret is brought into the CA directory first; changed material
/// signs from then on and its roots are published (trust bundle, the
/// aggregated API's caBundle). Every replica does the same, so they agree.
fn follow_ca(
    ca: Arc<CertificateAuthority>,
    config: &Config,
    kube: Option<kube::Client>,
    stop: CancellationToken,
) {
    let namespace = match &config.source {
        SourceConfig::Kubernetes(access) => access.namespace.clone(),
        SourceConfig::Local(_) => String::new(),
    };
    let (dir, every) = (config.data_dir.join("ca"), config.ca_follow);
    tokio::spawn(async move {
        let mut unpublished = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Some(client) = &kube
                && let Err(e) = crate::kube_ca::pull(client, &namespace, &dir).await
            {
                tracing::warn!(error = %e, "CA Secret not taken; the current CA keeps signing");
                continue;
            }
            // Changed roots are owed to the API until it takes them: a
            // failed publish is tried again at the next look, though the
            // material has not changed since.
            match ca.reload() {
                Ok(changed) => unpublished |= changed,
                Err(e) => {
                    tracing::warn!(error = %e, "CA material not taken; the current CA keeps signing")
                }
            }
            if let (true, Some(client)) = (unpublished, &kube) {
                match publish_roots(client, &namespace, &ca.root_pem()).await {
                    Ok(()) => unpublished = false,
                    Err(e) => tracing::warn!(error = %e, "roots not published; will try again"),
                }
            }
        }
    });
}

/// Publishes the roots in a cluster: the trust bundle ConfigMap (proxies
/// follow it) and the aggregated API's caBundle.
async fn publish_roots(
    client: &kube::Client,
    namespace: &str,
    roots: &str,
) -> Result<(), crate::kube_ca::KubeCaError> {
    crate::kube_ca::publish_trust_bundle(client, namespace, roots).await?;
    crate::aggregated::publish_ca_bundle(client, roots).await;
    Ok(())
}

/// The API writes only the elected replica makes: waypoint Deployments and
/// Gateway status.
fn start_leader_work(
    client: &kube::Client,
    config: &Config,
    ca: &CertificateAuthority,
    store: &ConfigStore,
    shutdown: &CancellationToken,
) {
    let SourceConfig::Kubernetes(access) = &config.source else {
        return;
    };
    let election = crate::leader::Election::new(&access.namespace, &access.replica);
    let leader = crate::leader::spawn(client.clone(), election, shutdown.clone());
    let settings = crate::waypoint_deploy::Settings {
        image: access.waypoint_image.clone(),
        controller: format!("weft-controller.{}.svc:15012", access.namespace),
        roots: ca.roots(),
        otlp_endpoint: access.waypoint_otlp_endpoint.clone(),
    };
    crate::waypoint_deploy::spawn(
        client.clone(),
        settings,
        leader,
        store.subscribe(),
        shutdown.clone(),
    );
}

/// The Kubernetes client, with the CA directory made to hold the CA the
/// cluster shares (Secret `weft-ca`).
async fn kube_ca(config: &Config, access: &KubeAccess) -> Result<kube::Client, BuildError> {
    let failed = |e: &dyn std::fmt::Display| BuildError::Kubernetes(e.to_string());
    let client = kubernetes::client(access).await.map_err(|e| failed(&e))?;
    let dir = config.data_dir.join("ca");
    crate::kube_ca::sync(
        &client,
        &access.namespace,
        &dir,
        &config.trust_domain,
        config.max_cert_ttl,
    )
    .await
    .map_err(|e| failed(&e))?;
    Ok(client)
}

/// Binds `addr`; the listener and the address it really got (port 0 → a
/// free port).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BuildError> {
    let bound = async {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        Ok::<_, std::io::Error>((listener, local))
    };
    bound
        .await
        .map_err(|reason| BuildError::Bind { addr, reason })
}

fn prepare_data_dir(dir: &std::path::Path) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| BuildError::DataDir {
        path: dir.to_owned(),
        reason: source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    Ok(())
}
