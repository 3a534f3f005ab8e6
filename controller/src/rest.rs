//! The REST API (JSON) on 8080: what the mesh knows and does, and config
//! changes in local mode. Every endpoint but `/healthz` needs
//! `Authorization: Bearer <token>`; locally the token is
//! `<data-dir>/api-token` (0600, made on first start).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weft_proto::model::Model;

use crate::ca::write_atomic;
use crate::xds::{ConfigStore, Proxies};

/// Largest config document accepted.
const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct Api {
    pub config: ConfigStore,
    pub proxies: Proxies,
    pub root_pem: Arc<str>,
    pub trust_domain: Arc<str>,
    /// Where accepted config is persisted (local mode).
    pub config_path: PathBuf,
    token: Arc<str>,
}

impl Api {
    pub fn new(
        config: ConfigStore,
        proxies: Proxies,
        root_pem: &str,
        trust_domain: &str,
        data_dir: &Path,
        token: String,
    ) -> Self {
        Api {
            config,
            proxies,
            root_pem: root_pem.into(),
            trust_domain: trust_domain.into(),
            config_path: data_dir.join("config.yaml"),
            token: token.into(),
        }
    }
}

/// The API token, made on first start.
pub fn load_or_create_token(data_dir: &Path) -> Result<String, crate::ca::CaError> {
    let path = data_dir.join("api-token");
    if let Ok(token) = std::fs::read_to_string(&path) {
        return Ok(token.trim().to_owned());
    }
    use rand::RngCore;
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    write_atomic(&path, token.as_bytes(), 0o600)?;
    Ok(token)
}

pub fn router(api: Api) -> Router {
    let authed = Router::new()
        .route("/api/v1/workloads", get(workloads))
        .route("/api/v1/services", get(services))
        .route("/api/v1/policies", get(policies))
        .route("/api/v1/proxies", get(proxies))
        .route("/api/v1/trust-bundle", get(trust_bundle))
        .route("/api/v1/config", get(get_config).put(put_config))
        .route("/api/v1/openapi.json", get(openapi))
        .layer(middleware::from_fn_with_state(api.clone(), authenticate));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(authed)
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such endpoint; see /api/v1/openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

pub async fn serve(listener: TcpListener, api: Api, stop: CancellationToken) {
    let app = router(api);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
    if let Err(e) = result {
        warn!(error = %e, "REST API server failed");
    }
}

/// Prometheus `/metrics` (SPEC: 15014), no token: like every metrics port,
/// it is for the cluster's scraper.
pub async fn serve_metrics(listener: TcpListener, stop: CancellationToken) {
    let app = Router::new().route(
        "/metrics",
        get(|| async { weft_proto::process::prometheus().render() }),
    );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

async fn authenticate(
    State(api): State<Api>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = presented.is_some_and(|t| {
        t.len() == api.token.len()
            && t.bytes()
                .zip(api.token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if !ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "send Authorization: Bearer <token> (local mode: <data-dir>/api-token)",
        );
    }
    next.run(req).await
}

async fn workloads(State(api): State<Api>) -> Json<Value> {
    let snap = api.config.current();
    Json(
        json!({"version": snap.version, "items": snap.model.workloads.iter().map(|w| json!({
        "name": w.name, "namespace": w.namespace, "identity": w.identity.to_string(),
        "node": w.node, "addresses": w.addresses, "meshed": w.meshed, "services": w.services,
        "labels": w.labels,
    })).collect::<Vec<_>>()}),
    )
}

async fn services(State(api): State<Api>) -> Json<Value> {
    let snap = api.config.current();
    Json(
        json!({"version": snap.version, "items": snap.model.services.iter().map(|s| json!({
        "service": s.key, "addresses": s.addresses,
        "ports": s.ports.iter().map(|(p, t)| json!({"port": p, "targetPort": t})).collect::<Vec<_>>(),
        "endpoints": s.endpoints().iter().map(|w| w.key.clone()).collect::<Vec<_>>(),
    })).collect::<Vec<_>>()}),
    )
}

async fn policies(State(api): State<Api>) -> Json<Value> {
    let snap = api.config.current();
    Json(
        json!({"version": snap.version, "items": snap.model.policies.iter().map(|p| json!({
        "policy": p.key, "action": format!("{:?}", p.action).to_uppercase(),
        "selector": p.selector, "rules": p.rules.len(),
    })).collect::<Vec<_>>()}),
    )
}

async fn proxies(State(api): State<Api>) -> Json<Value> {
    let items: Vec<Value> = api
        .proxies
        .all()
        .into_iter()
        .map(|(node, s)| {
            json!({
                "node": node, "connected": s.connected, "ackedVersions": s.acked, "nacks": s.nacks,
                "resourcesSent": s.resources_sent,
                "lastSeenSecondsAgo": s.last_seen.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs()),
            })
        })
        .collect();
    Json(json!({"configVersion": api.config.current().version, "items": items}))
}

async fn trust_bundle(State(api): State<Api>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        api.root_pem.to_string(),
    )
        .into_response()
}

async fn get_config(State(api): State<Api>) -> Response {
    match std::fs::read_to_string(&api.config_path) {
        Ok(yaml) => ([(header::CONTENT_TYPE, "application/yaml")], yaml).into_response(),
        Err(_) => ([(header::CONTENT_TYPE, "application/yaml")], String::new()).into_response(),
    }
}

/// Replaces the config (YAML, the ztunnel's static-file format). Validated
/// first, persisted atomically, then pushed: nothing half-applied, nothing
/// accepted lost on restart.
async fn put_config(State(api): State<Api>, body: String) -> Response {
    let model = match Model::from_yaml(&body, &api.trust_domain) {
        Ok(m) => m,
        Err(e) => {
            metrics::counter!("weft_controller_config_errors_total").increment(1);
            return error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string());
        }
    };
    if let Err(e) = write_atomic(&api.config_path, body.as_bytes(), 0o600) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("config not saved, nothing applied: {e}"),
        );
    }
    let version = api.config.set(model);
    info!(version, "config replaced through the REST API");
    Json(json!({"version": version})).into_response()
}

async fn openapi() -> Json<Value> {
    let list = |what: &str| {
        json!({"get": {"summary": format!("List {what}"), "security": [{"bearer": []}],
        "responses": {"200": {"description": "items and the config version"}, "401": {"description": "missing or wrong token"}}}})
    };
    Json(json!({
        "openapi": "3.0.3",
        "info": {"title": "weft controller API", "version": "v1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/healthz": {"get": {"summary": "Liveness (no token)", "responses": {"200": {"description": "ok"}}}},
            "/api/v1/workloads": list("workloads"),
            "/api/v1/services": list("services"),
            "/api/v1/policies": list("authorization policies"),
            "/api/v1/proxies": list("proxies on the config stream, with ACKed versions and NACKs"),
            "/api/v1/trust-bundle": {"get": {"summary": "The mesh root (PEM)", "security": [{"bearer": []}], "responses": {"200": {"description": "PEM"}}}},
            "/api/v1/config": {
                "get": {"summary": "The config served (YAML)", "security": [{"bearer": []}], "responses": {"200": {"description": "YAML"}}},
                "put": {"summary": "Replace the config (local mode)", "security": [{"bearer": []}],
                    "requestBody": {"content": {"application/yaml": {}}},
                    "responses": {"200": {"description": "applied; the new version"}, "413": {"description": "over 1 MiB"},
                                  "422": {"description": "invalid; the error names the object and field; nothing applied"}}}
            },
            "/api/v1/openapi.json": {"get": {"summary": "This document", "security": [{"bearer": []}], "responses": {"200": {"description": "OpenAPI 3"}}}},
        }
    }))
}
