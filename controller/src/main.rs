//! weft-controller: certificate authority, config server (Delta xDS), REST
//! API and metrics, fed by a local YAML directory or the Kubernetes API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use weft_controller::app::{self, Config, SourceConfig};
use weft_proto::identity::Identity;

/// weft's control plane: the certificate authority and the config stream on
/// --grpc-addr (TLS), the REST API on --rest-addr, metrics on --metrics-addr.
/// Config comes from a directory of Kubernetes-shaped YAML (default
/// <data-dir>/config, watched) or, with --kubernetes, from the cluster.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// State directory (made 0700): CA material in ca/, node tokens in
    /// nodes/, the API token, the local config in config/ and its last
    /// accepted copies in accepted/.
    #[arg(long, env = "WEFT_DATA_DIR", default_value = "/var/lib/weft")]
    data_dir: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// gRPC listen address: the CA and the config stream, over TLS.
    #[arg(long, default_value = "0.0.0.0:15012")]
    grpc_addr: SocketAddr,
    /// Longest workload certificate lifetime, e.g. 24h, 90m, 3600s.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    max_cert_ttl: Duration,
    /// Register a node (creates <data-dir>/nodes/<NODE>.token). Repeatable.
    #[arg(long = "node", value_name = "NODE")]
    nodes: Vec<String>,
    /// Place a workload identity on a node: NODE=spiffe://td/ns/NS/sa/SA.
    /// Repeatable. Pods in the config place their identities themselves;
    /// this is for workloads the config does not list.
    #[arg(long = "place", value_name = "NODE=SPIFFE_ID", value_parser = parse_placement)]
    placements: Vec<(String, Identity)>,
    /// Directory of Kubernetes-shaped YAML to serve (Namespace, Pod,
    /// Service, AuthorizationPolicy, ...), watched for changes.
    /// Default: <data-dir>/config.
    #[arg(long, conflicts_with = "kubernetes")]
    config_dir: Option<PathBuf>,
    /// Read config from the Kubernetes API (in-cluster, or the kubeconfig)
    /// instead of a directory; the REST API then checks tokens by TokenReview.
    #[arg(long)]
    kubernetes: bool,
    /// With --kubernetes: the kubeconfig file to use (default: in-cluster,
    /// else $KUBECONFIG, else ~/.kube/config).
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// With --kubernetes: the kubeconfig context to use (default: its
    /// current context).
    #[arg(long, requires = "kubernetes")]
    context: Option<String>,
    /// With --kubernetes: the controller's namespace, where the CA Secret
    /// (weft-ca) and the trust bundle ConfigMap (weft-trust-bundle) live.
    #[arg(long, env = "POD_NAMESPACE", default_value = "weft-system")]
    namespace: String,
    /// With --kubernetes: the ztunnel DaemonSet's ServiceAccount
    /// (NAMESPACE/NAME); its pods' tokens make them the node they run on.
    #[arg(long, default_value = "weft-system/ztunnel")]
    ztunnel_service_account: String,
    /// With --kubernetes: the audience a proxy's projected ServiceAccount
    /// token must carry. Repeatable (add istio-ca for Istio's ztunnel).
    #[arg(long = "token-audience", default_value = "weft-ca")]
    token_audiences: Vec<String>,
    /// With --kubernetes: this replica's name in the leader election.
    #[arg(long, env = "POD_NAME", default_value = "weft-controller")]
    pod_name: String,
    /// With --kubernetes: the image of the waypoint Deployments made for
    /// Gateways of class weft-waypoint.
    #[arg(long, default_value_t = weft_controller::waypoint_deploy::Settings::default().image)]
    waypoint_image: String,
    /// With --kubernetes: the OTLP/gRPC collector (http://HOST:4317) the
    /// waypoints it makes export sampled requests' spans to.
    #[arg(long)]
    waypoint_otlp_endpoint: Option<String>,
    /// With --kubernetes: the aggregated API's HTTPS listen address
    /// (APIService v1alpha1.api.weft.dev; only the API server's front
    /// proxy is admitted).
    #[arg(long, default_value = "0.0.0.0:8443")]
    aggregated_addr: SocketAddr,
    /// REST API listen address.
    #[arg(long, default_value = "0.0.0.0:8080")]
    rest_addr: SocketAddr,
    /// Prometheus metrics listen address.
    #[arg(long, default_value = "0.0.0.0:15014")]
    metrics_addr: SocketAddr,
    /// A DNS name the gRPC port's certificate carries, beside
    /// weft-controller.weft-system.svc[.cluster.local] and localhost (for
    /// clients that check the host they dialled). Repeatable.
    #[arg(long = "server-name", value_name = "DNS_NAME")]
    server_names: Vec<String>,
    /// An IP address the gRPC port's certificate carries, beside loopback and
    /// --grpc-addr's own (the pod IP in Kubernetes). Repeatable.
    #[arg(
        long = "server-ip",
        value_name = "IP",
        env = "POD_IP",
        value_delimiter = ','
    )]
    server_ips: Vec<std::net::IpAddr>,
    /// Proxies whose first sync (the whole config) is served at once; the
    /// rest wait their turn. Bounds memory in a mass reconnect.
    #[arg(long, default_value_t = weft_controller::xds::FIRST_SYNCS_AT_ONCE)]
    first_syncs: usize,
    /// Log lines as text or json.
    #[arg(long, default_value = "text")]
    log_format: weft_proto::process::LogFormat,
    /// Offer and accept only the post-quantum hybrid key exchange
    /// (X25519MLKEM768) on every TLS connection; peers without it fail.
    /// Default: X25519MLKEM768 first, X25519 as the fallback.
    #[arg(long, env = "WEFT_PQ_ONLY")]
    pq_only: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number then s, m or h"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    if secs == 0 {
        return Err("duration must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

fn parse_placement(s: &str) -> Result<(String, Identity), String> {
    let (node, id) = s.split_once('=').ok_or("expected NODE=SPIFFE_ID")?;
    let id = id.parse::<Identity>().map_err(|e| e.to_string())?;
    Ok((node.to_owned(), id))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    weft_proto::process::init_logging(args.log_format);
    if args.pq_only {
        weft_proto::tls::require_post_quantum();
        tracing::info!("TLS key exchange: X25519MLKEM768 only");
    }
    let bound = app::build(Config {
        data_dir: args.data_dir.clone(),
        trust_domain: args.trust_domain,
        grpc_addr: args.grpc_addr,
        max_cert_ttl: args.max_cert_ttl,
        source: if args.kubernetes {
            SourceConfig::Kubernetes(app::KubeAccess {
                kubeconfig: args.kubeconfig,
                context: args.context,
                namespace: args.namespace,
                proxy_tokens: weft_controller::kube_auth::ProxyTokens {
                    audiences: args.token_audiences,
                    ztunnel_account: args.ztunnel_service_account,
                },
                replica: args.pod_name,
                waypoint_image: args.waypoint_image,
                waypoint_otlp_endpoint: args.waypoint_otlp_endpoint,
                aggregated_addr: args.aggregated_addr,
            })
        } else {
            SourceConfig::Local(args.config_dir)
        },
        rest_addr: args.rest_addr,
        metrics_addr: args.metrics_addr,
        server_names: args.server_names,
        server_ips: args.server_ips,
        first_syncs: args.first_syncs,
        ca_follow: Duration::from_secs(30),
    })
    .await
    .context("controller failed to start")?;
    for node in &args.nodes {
        let path = bound
            .nodes
            .ensure(node)
            .with_context(|| format!("registering node {node}"))?;
        tracing::info!(node, token = %path.display(), "node registered");
    }
    for (node, id) in args.placements {
        bound.nodes.place(&node, id);
    }
    tracing::info!(
        root = %args.data_dir.join("ca/root-cert.pem").display(),
        "CA serving; ztunnels need the root certificate and their node token"
    );
    weft_proto::process::shutdown_signal().await;
    tracing::info!("shutting down");
    bound.shutdown().await;
    Ok(())
}
