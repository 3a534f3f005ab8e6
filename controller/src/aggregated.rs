//! The controller's reads as a Kubernetes aggregated API
//! (`APIService v1alpha1.api.weft.dev`), so `kubectl weft` — or
//! `kubectl get --raw /apis/api.weft.dev/v1alpha1/workloads` — reads the
//! mesh's state with the user's own kubeconfig, whatever it authenticates
//! with (certificates, OIDC, exec plugins), and no port-forward.
//!
//! The API server authenticates the user, checks RBAC on the
//! `api.weft.dev` resources, and proxies the request here over TLS with its
//! front-proxy client certificate and the user in request headers. This
//! listener accepts only that certificate (the request-header CA and the
//! allowed names of ConfigMap `kube-system/extension-apiserver-authentication`,
//! re-read every minute), so the headers cannot be forged by anyone else
//! on the network; the user is then checked again with a
//! SubjectAccessReview on `weft.dev/api` (the REST API's own rule), and the
//! request is answered by the REST API's read endpoints. The API server
//! verifies this listener against the mesh root, which every replica writes
//! into the APIService's `caBundle` at start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::core::v1::ConfigMap;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{info, warn};
use weft_proto::tls::{self, CertWatch};

use crate::kube_auth::{Refusal, Reviewer};
use crate::rest;

pub const GROUP: &str = "api.weft.dev";
pub const VERSION: &str = "v1alpha1";
/// The APIService object the manifests install.
pub const API_SERVICE: &str = "v1alpha1.api.weft.dev";
const AUTH_NAMESPACE: &str = "kube-system";
const AUTH_CONFIGMAP: &str = "extension-apiserver-authentication";
const REREAD: Duration = Duration::from_secs(60);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 256;

/// The read endpoints served, as Kubernetes resources (`/api/v1/<name>`).
const RESOURCES: [(&str, &str); 7] = [
    ("workloads", "Workload"),
    ("services", "Service"),
    ("policies", "Policy"),
    ("proxies", "Proxy"),
    ("certificates", "Certificate"),
    ("waypoints", "Waypoint"),
    ("routes", "Route"),
];

#[derive(Debug, thiserror::Error)]
pub enum FrontProxyError {
    #[error(
        "ConfigMap {AUTH_NAMESPACE}/{AUTH_CONFIGMAP} has no {0}: the API server runs without a front proxy (--requestheader-client-ca-file), so it cannot aggregate APIs"
    )]
    Missing(&'static str),
    #[error("ConfigMap {AUTH_NAMESPACE}/{AUTH_CONFIGMAP}, {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// How the API server's front proxy presents itself and the user it
/// proxies for.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontProxy {
    ca_pem: String,
    /// Certificate common names allowed; empty: any the CA signed.
    allowed_names: Vec<String>,
    username_headers: Vec<String>,
    group_headers: Vec<String>,
    extra_prefixes: Vec<String>,
}

impl FrontProxy {
    /// Read from the ConfigMap's data (each list is a JSON array, as the
    /// API server writes it).
    pub fn from_config_map(data: &BTreeMap<String, String>) -> Result<Self, FrontProxyError> {
        let list = |key: &'static str| -> Result<Vec<String>, FrontProxyError> {
            match data.get(key) {
                None => Ok(Vec::new()),
                Some(v) => serde_json::from_str(v).map_err(|e| FrontProxyError::Invalid {
                    key,
                    reason: format!("not a JSON list of strings: {e}"),
                }),
            }
        };
        let ca_pem = data
            .get("requestheader-client-ca-file")
            .filter(|v| !v.trim().is_empty())
            .ok_or(FrontProxyError::Missing("requestheader-client-ca-file"))?
            .clone();
        let proxy = FrontProxy {
            ca_pem,
            allowed_names: list("requestheader-allowed-names")?,
            username_headers: list("requestheader-username-headers")?,
            group_headers: list("requestheader-group-headers")?,
            extra_prefixes: list("requestheader-extra-headers-prefix")?,
        };
        if proxy.username_headers.is_empty() {
            return Err(FrontProxyError::Missing("requestheader-username-headers"));
        }
        proxy.roots()?;
        Ok(proxy)
    }

    fn roots(&self) -> Result<RootCertStore, FrontProxyError> {
        let invalid = |reason: String| FrontProxyError::Invalid {
            key: "requestheader-client-ca-file",
            reason,
        };
        let mut roots = RootCertStore::empty();
        use rustls_pki_types::pem::PemObject;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| invalid(e.to_string()))?;
            roots.add(cert).map_err(|e| invalid(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(invalid("no certificate in it".into()));
        }
        Ok(roots)
    }

    /// Whether a verified client certificate is the front proxy's.
    fn admits(&self, leaf: &[u8]) -> bool {
        if self.allowed_names.is_empty() {
            return true;
        }
        use x509_parser::prelude::FromDer;
        let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(leaf) else {
            return false;
        };
        let cn = cert.subject().iter_common_name().next();
        let cn = cn.and_then(|c| c.as_str().ok());
        cn.is_some_and(|cn| self.allowed_names.iter().any(|n| n == cn))
    }

    /// The user the front proxy vouches for, from its headers.
    pub fn user(&self, headers: &HeaderMap) -> Option<UserInfo> {
        let values = |name: &str| -> Vec<String> {
            let found = headers.get_all(name).iter();
            found
                .filter_map(|v| v.to_str().ok())
                .map(str::to_owned)
                .collect()
        };
        let username = self
            .username_headers
            .iter()
            .find_map(|h| values(h).into_iter().next())
            .filter(|u| !u.is_empty())?;
        let groups: Vec<String> = self.group_headers.iter().flat_map(|h| values(h)).collect();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in headers {
            let lower = name.as_str();
            let key = self.extra_prefixes.iter().find_map(|p| {
                lower
                    .strip_prefix(p.to_ascii_lowercase().as_str())
                    .filter(|k| !k.is_empty())
            });
            if let (Some(key), Ok(value)) = (key, value.to_str()) {
                let key = percent_encoding::percent_decode_str(key)
                    .decode_utf8_lossy()
                    .into_owned();
                extra.entry(key).or_default().push(value.to_owned());
            }
        }
        Some(UserInfo {
            username: Some(username),
            groups: (!groups.is_empty()).then_some(groups),
            extra: (!extra.is_empty()).then_some(extra),
            uid: None,
        })
    }
}

/// The front proxy's settings and the TLS config made from them.
#[derive(Clone)]
struct Current {
    proxy: Arc<FrontProxy>,
    tls: Arc<rustls::ServerConfig>,
}

fn tls_for(proxy: &FrontProxy, cert: &CertWatch) -> Result<Arc<rustls::ServerConfig>, String> {
    let roots = proxy.roots().map_err(|e| e.to_string())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls::provider())
        .build()
        .map_err(|e| e.to_string())?;
    Ok(tls::server_config_verifying(
        cert.clone(),
        verifier,
        b"http/1.1",
    ))
}

/// Reads the front proxy's ConfigMap now, then every minute; a read that
/// fails keeps the last good settings.
async fn follow(
    client: kube::Client,
    cert: CertWatch,
    shutdown: CancellationToken,
) -> watch::Receiver<Option<Current>> {
    let (tx, rx) = watch::channel(None::<Current>);
    let maps = kube::Api::<ConfigMap>::namespaced(client, AUTH_NAMESPACE);
    let read = move || {
        let (maps, tx, cert) = (maps.clone(), tx.clone(), cert.clone());
        async move { refresh(&maps, &tx, &cert).await }
    };
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, read()).await;
    if first.is_err() {
        warn!("aggregated API: no answer reading the front proxy's settings; trying again");
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REREAD) => {}
            }
            read().await;
        }
    });
    rx
}

async fn refresh(
    maps: &kube::Api<ConfigMap>,
    tx: &watch::Sender<Option<Current>>,
    cert: &CertWatch,
) {
    let data = match maps.get_opt(AUTH_CONFIGMAP).await {
        Ok(map) => map.and_then(|m| m.data).unwrap_or_default(),
        Err(e) => {
            warn!(error = %e, "cannot read {AUTH_NAMESPACE}/{AUTH_CONFIGMAP}");
            BTreeMap::new()
        }
    };
    let known = tx.borrow().as_ref().map(|c| c.proxy.clone());
    match FrontProxy::from_config_map(&data) {
        Ok(proxy) if known.as_deref() != Some(&proxy) => match tls_for(&proxy, cert) {
            Ok(tls) => {
                info!("aggregated API: front proxy settings read");
                let proxy = Arc::new(proxy);
                tx.send_replace(Some(Current { proxy, tls }));
            }
            Err(e) => warn!(error = %e, "aggregated API: unusable request-header CA"),
        },
        Ok(_) => {}
        // Keeps the last good settings through an API blip.
        Err(e) if known.is_none() => warn!(error = %e, "aggregated API not served yet"),
        Err(_) => {}
    }
}

/// Writes the mesh roots into the APIService's `caBundle`, by which the
/// API server verifies this listener (server-side apply of that one field;
/// the APIService itself comes with the manifests). A failure leaves the
/// aggregated API unverifiable, not the mesh: it is logged.
pub async fn publish_ca_bundle(client: &kube::Client, roots: &str) {
    use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
    let patch = json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": API_SERVICE},
        "spec": {"caBundle": k8s_openapi::ByteString(roots.as_bytes().to_vec())}});
    let applied = kube::Api::<APIService>::all(client.clone())
        .patch(
            API_SERVICE,
            &kube::api::PatchParams::apply("weft-controller").force(),
            &kube::api::Patch::Apply(patch),
        )
        .await;
    match applied {
        Ok(_) => info!(
            apiservice = API_SERVICE,
            "aggregated API: caBundle published"
        ),
        Err(e) => warn!(apiservice = API_SERVICE, error = %e,
            "cannot publish the aggregated API's caBundle; `kubectl weft` cannot read the controller through the API server (install the APIService from the manifests)"),
    }
}

fn refuse(reason: &'static str, peer: SocketAddr, detail: &dyn std::fmt::Display) {
    metrics::counter!("weft_controller_rest_refusals_total", "reason" => reason).increment(1);
    warn!(reason, src.addr = %peer, error = %detail, "aggregated API connection refused");
}

/// Serves the aggregated API on `listener` until `shutdown`, once the
/// front proxy's settings have been read (or tried).
pub async fn start(
    listener: TcpListener,
    api: rest::Api,
    reviewer: Arc<Reviewer>,
    client: kube::Client,
    cert: CertWatch,
    shutdown: CancellationToken,
) {
    let current = follow(client, cert, shutdown.clone()).await;
    // Built once; each connection only adds the settings it was admitted
    // under (which headers name the user).
    let app = router(api, reviewer);
    let handle = move |tcp: TcpStream, peer: SocketAddr| {
        let current = current.borrow().clone();
        let app = app.clone();
        async move {
            let Some(current) = current else {
                return refuse("front_proxy_unknown", peer, &"no front-proxy settings yet");
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(current.tls.clone());
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return refuse("front_proxy_tls", peer, &e),
                Err(_) => return refuse("front_proxy_tls", peer, &"handshake timed out"),
            };
            let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            if !leaf.is_some_and(|l| current.proxy.admits(l)) {
                return refuse("front_proxy_name", peer, &"certificate name not allowed");
            }
            let proxy = current.proxy;
            let app = app.map_request(move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(proxy.clone());
                req
            });
            let service = TowerToHyperService::new(app);
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "aggregated API connection ended");
            }
        }
    };
    tokio::spawn(weft_proto::listen::accept_bounded(
        listener,
        weft_proto::listen::Drain::stopped_by(shutdown),
        ("aggregated-api", MAX_CONNECTIONS),
        handle,
    ));
}

#[derive(Clone)]
struct Served {
    rest: Router,
    reviewer: Arc<Reviewer>,
}

fn router(api: rest::Api, reviewer: Arc<Reviewer>) -> Router {
    let served = Served {
        rest: rest::router(api),
        reviewer,
    };
    let prefix = format!("/apis/{GROUP}/{VERSION}");
    Router::new()
        .route(&prefix, get(discovery))
        .route(&format!("/apis/{GROUP}"), get(group))
        .route(&format!("{prefix}/{{*rest}}"), get(read))
        .fallback(|| async { status(StatusCode::NOT_FOUND, "NotFound", "no such resource") })
        .with_state(served)
}

/// A Kubernetes `Status` answer, as API clients parse errors.
fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "reason": reason, "message": message, "code": code.as_u16()});
    (code, Json(body)).into_response()
}

async fn discovery() -> Json<serde_json::Value> {
    let resources: Vec<_> = RESOURCES
        .iter()
        .map(|(name, kind)| {
            json!({"name": name, "singularName": kind.to_ascii_lowercase(), "namespaced": false,
                "kind": kind, "verbs": ["get", "list"]})
        })
        .collect();
    Json(json!({"kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"), "resources": resources}))
}

async fn group() -> Json<serde_json::Value> {
    let version = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    Json(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP,
        "versions": [version], "preferredVersion": version}),
    )
}

/// `/apis/api.weft.dev/v1alpha1/<path>` is the REST API's
/// `/api/v1/<path>`, for the user the front proxy vouches for.
async fn read(
    State(served): State<Served>,
    axum::Extension(proxy): axum::Extension<Arc<FrontProxy>>,
    mut req: Request,
) -> Response {
    let Some(user) = proxy.user(req.headers()) else {
        metrics::counter!("weft_controller_rest_refusals_total", "reason" => "unauthenticated")
            .increment(1);
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "no user in the front proxy's headers",
        );
    };
    match served.reviewer.authorize(&user, "get").await {
        Ok(()) => {}
        Err(e @ Refusal::Unavailable(_)) => {
            return status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                &e.to_string(),
            );
        }
        Err(e) => {
            metrics::counter!("weft_controller_rest_refusals_total", "reason" => "forbidden")
                .increment(1);
            warn!(
                reason = "forbidden",
                user = user.username.as_deref().unwrap_or_default(),
                "aggregated API request refused"
            );
            return status(StatusCode::FORBIDDEN, "Forbidden", &e.to_string());
        }
    }
    let prefix = format!("/apis/{GROUP}/{VERSION}/");
    let rest_path = req.uri().path().strip_prefix(&prefix).unwrap_or_default();
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let Ok(uri) = format!("/api/v1/{rest_path}{query}").parse() else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "malformed path");
    };
    *req.uri_mut() = uri;
    req.extensions_mut().insert(rest::Vouched);
    match served.rest.oneshot(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BTreeMap<String, String> {
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .self_signed(&rcgen::KeyPair::generate().expect("key"))
            .expect("ca");
        [
            ("requestheader-client-ca-file", ca.pem()),
            (
                "requestheader-allowed-names",
                r#"["front-proxy-client"]"#.into(),
            ),
            (
                "requestheader-username-headers",
                r#"["X-Remote-User"]"#.into(),
            ),
            (
                "requestheader-group-headers",
                r#"["X-Remote-Group"]"#.into(),
            ),
            (
                "requestheader-extra-headers-prefix",
                r#"["X-Remote-Extra-"]"#.into(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    #[test]
    fn the_user_comes_from_the_configured_headers() {
        let proxy = FrontProxy::from_config_map(&settings()).expect("settings");
        let mut headers = HeaderMap::new();
        headers.insert("x-remote-user", "alice".parse().expect("value"));
        headers.append("x-remote-group", "dev".parse().expect("value"));
        headers.append(
            "x-remote-group",
            "system:authenticated".parse().expect("value"),
        );
        headers.insert(
            "x-remote-extra-scopes%2fread",
            "yes".parse().expect("value"),
        );
        headers.insert("x-user", "mallory".parse().expect("value"));
        let user = proxy.user(&headers).expect("a user");
        assert_eq!(user.username.as_deref(), Some("alice"));
        assert_eq!(
            user.groups.expect("groups"),
            ["dev", "system:authenticated"]
        );
        assert_eq!(user.extra.expect("extra")["scopes/read"], ["yes"]);
        assert!(
            proxy.user(&HeaderMap::new()).is_none(),
            "no header, no user"
        );
    }

    #[test]
    fn settings_without_a_front_proxy_are_refused() {
        let mut data = settings();
        data.remove("requestheader-client-ca-file");
        let e = FrontProxy::from_config_map(&data).expect_err("no CA");
        assert!(
            e.to_string().contains("--requestheader-client-ca-file"),
            "{e}"
        );
        let mut data = settings();
        data.insert("requestheader-allowed-names".into(), "front-proxy".into());
        assert!(FrontProxy::from_config_map(&data).is_err());
        let mut data = settings();
        data.insert("requestheader-client-ca-file".into(), "junk".into());
        assert!(FrontProxy::from_config_map(&data).is_err());
    }
}
