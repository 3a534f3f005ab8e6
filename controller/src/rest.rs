//! The REST API (JSON) on 8080: what the mesh knows and does, and config
//! changes in local mode. Every endpoint but `/healthz` needs
//! `Authorization: Bearer <token>`; locally the token is
//! `<data-dir>/api-token` (0600, made on first start).

use std::path::Path;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path as AxPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use weft_proto::model::{Policy, Service, Workload};

use crate::ca::{CertificateAuthority, write_atomic};
use crate::source::local::{LocalError, LocalSource};
use crate::source::{BodyError, SourceStatus};
use crate::state::{ConfigStore, Proxies};

/// Largest config document accepted.
const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct Api {
    pub config: ConfigStore,
    pub proxies: Proxies,
    pub ca: Arc<CertificateAuthority>,
    /// The local directory (local mode): config objects are edited here.
    pub local: Option<Arc<LocalSource>>,
    pub sources: watch::Receiver<Arc<SourceStatus>>,
    pub auth: Auth,
}

/// How a bearer token is checked.
#[derive(Clone)]
pub enum Auth {
    /// Local mode: the token in `<data-dir>/api-token`.
    Token(Arc<str>),
    /// Kubernetes: a Kubernetes token, checked by TokenReview and
    /// SubjectAccessReview.
    Kubernetes(Arc<crate::source::kubernetes::Reviewer>),
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
        .route("/api/v1/{what}/{namespace}/{name}", get(get_one))
        .route("/api/v1/waypoints", get(waypoints))
        .route("/api/v1/routes", get(routes))
        .route("/api/v1/certificates", get(certificates))
        .route("/api/v1/sources", get(sources))
        .route("/api/v1/objects", get(list_objects))
        .route(
            "/api/v1/objects/{kind}/{name}",
            get(get_cluster_object)
                .put(put_cluster_object)
                .delete(delete_cluster_object),
        )
        .route(
            "/api/v1/objects/{kind}/{namespace}/{name}",
            get(get_object).put(put_object).delete(delete_object),
        )
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
    let path = req.uri().path().to_owned();
    let unauthorized = || {
        metrics::counter!("weft_controller_rest_refusals_total", "reason" => "unauthenticated")
            .increment(1);
        tracing::warn!(reason = "unauthenticated", path, "REST request refused");
        error(
            StatusCode::UNAUTHORIZED,
            "send Authorization: Bearer <token> (local mode: <data-dir>/api-token; Kubernetes: a ServiceAccount or user token)",
        )
    };
    let Some(presented) = presented else {
        return unauthorized();
    };
    match &api.auth {
        Auth::Token(token) => {
            let same = presented.len() == token.len()
                && presented
                    .bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0;
            if !same {
                return unauthorized();
            }
        }
        Auth::Kubernetes(reviewer) => {
            use crate::source::kubernetes::Refusal;
            let verb = match *req.method() {
                http::Method::PUT | http::Method::POST => "update",
                http::Method::DELETE => "delete",
                _ => "get",
            };
            let refused = |status, reason: &'static str, e: &Refusal| {
                metrics::counter!("weft_controller_rest_refusals_total", "reason" => reason)
                    .increment(1);
                tracing::warn!(reason, error = %e, "REST request refused");
                error(status, &e.to_string())
            };
            match reviewer.review(presented, verb).await {
                Ok(()) => {}
                Err(Refusal::Unauthenticated) => return unauthorized(),
                Err(e @ Refusal::Forbidden { .. }) => {
                    return refused(StatusCode::FORBIDDEN, "forbidden", &e);
                }
                Err(e @ Refusal::Unavailable(_)) => {
                    return refused(StatusCode::SERVICE_UNAVAILABLE, "api_unreachable", &e);
                }
            }
        }
    }
    next.run(req).await
}

fn workload_json(w: &Workload) -> Value {
    json!({
        "name": w.name, "namespace": w.namespace, "identity": w.identity.to_string(),
        "node": w.node, "addresses": w.addresses, "meshed": w.meshed, "services": w.services,
        "labels": w.labels,
    })
}

fn service_json(s: &Service) -> Value {
    json!({
        "service": s.key, "addresses": s.addresses,
        "ports": s.ports.iter().map(|(p, t)| json!({"port": p, "targetPort": t})).collect::<Vec<_>>(),
        "endpoints": s.endpoints().iter().map(|w| w.key.clone()).collect::<Vec<_>>(),
    })
}

fn policy_json(p: &Policy) -> Value {
    json!({
        "policy": p.key, "action": format!("{:?}", p.action).to_uppercase(),
        "selector": p.selector, "rules": p.rules.len(),
    })
}

async fn workloads(State(api): State<Api>) -> Json<Value> {
    let snap = api.config.current();
    // Sorted: a model patched change by change keeps arrival order.
    let mut workloads: Vec<_> = snap.model.workloads.iter().collect();
    workloads.sort_by(|a, b| a.key.cmp(&b.key));
    let items: Vec<Value> = workloads.into_iter().map(|w| workload_json(w)).collect();
    Json(json!({"version": snap.version, "items": items}))
}

async fn services(State(api): State<Api>) -> Json<Value> {
    let snap = api.config.current();
    let mut services: Vec<_> = snap.model.services.iter().collect();
    services.sort_by(|a, b| a.key.cmp(&b.key));
    let items: Vec<Value> = services.into_iter().map(|s| service_json(s)).collect();
    Json(json!({"version": snap.version, "items": items}))
}

async fn policies(State(api): State<Api>) -> Json<Value> {
    let snap = api.config.current();
    let items: Vec<Value> = snap.model.policies.iter().map(|p| policy_json(p)).collect();
    Json(json!({"version": snap.version, "items": items}))
}

/// One workload, service or policy by `<namespace>/<name>`.
async fn get_one(
    State(api): State<Api>,
    AxPath((what, namespace, name)): AxPath<(String, String, String)>,
) -> Response {
    let snap = api.config.current();
    let key = format!("{namespace}/{name}");
    let found = match what.as_str() {
        "workloads" => snap.model.workload_by_key(&key).map(|w| workload_json(w)),
        "services" => snap.model.service(&key).map(|s| service_json(s)),
        "policies" => snap
            .model
            .policies
            .iter()
            .find(|p| p.key == key)
            .map(|p| policy_json(p)),
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "no such endpoint; see /api/v1/openapi.json",
            );
        }
    };
    match found {
        Some(v) => Json(v).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            &format!(
                "no {} {key} in config version {}",
                what.trim_end_matches('s'),
                snap.version
            ),
        ),
    }
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
        api.ca.root_pem().to_owned(),
    )
        .into_response()
}

async fn waypoints(State(api): State<Api>) -> Json<Value> {
    let status = api.sources.borrow().clone();
    Json(json!({"items": status.waypoints.iter().map(|w| json!({
        "waypoint": w.key, "forServiceAccount": w.for_service_account, "services": w.services,
    })).collect::<Vec<_>>()}))
}

async fn routes(State(api): State<Api>) -> Json<Value> {
    let status = api.sources.borrow().clone();
    Json(json!({"items": status.routes.iter().map(|r| json!({
        "route": r.key, "parents": r.parents, "rules": r.rules,
    })).collect::<Vec<_>>()}))
}

async fn certificates(State(api): State<Api>) -> Json<Value> {
    let rfc3339 = |t: std::time::SystemTime| {
        time::OffsetDateTime::from(t)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let items: Vec<Value> = api
        .ca
        .issued()
        .into_iter()
        .map(|(identity, c)| {
            json!({"identity": identity, "serial": c.serial,
                "notBefore": rfc3339(c.not_before), "notAfter": rfc3339(c.not_after)})
        })
        .collect();
    Json(json!({"items": items}))
}

async fn sources(State(api): State<Api>) -> Json<Value> {
    let status = api.sources.borrow().clone();
    Json(json!({
        "source": status.source, "location": status.location,
        "files": status.files.iter().map(|(file, (objects, error))| json!({
            "file": file, "objects": objects, "error": error,
        })).collect::<Vec<_>>(),
        "problems": status.problems.iter().map(|p| json!({
            "object": p.object, "reason": p.reason, "refused": p.refused,
        })).collect::<Vec<_>>(),
    }))
}

fn local(api: &Api) -> Result<Arc<LocalSource>, Box<Response>> {
    api.local.clone().ok_or_else(|| {
        Box::new(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "config objects are edited with kubectl in Kubernetes mode",
        ))
    })
}

async fn list_objects(State(api): State<Api>) -> Response {
    let local = match local(&api) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let items: Vec<Value> = local
        .objects()
        .into_iter()
        .map(|(file, o)| json!({"kind": o.kind(), "key": o.key(), "file": file}))
        .collect();
    Json(json!({"items": items})).into_response()
}

async fn get_cluster_object(
    State(api): State<Api>,
    AxPath((kind, name)): AxPath<(String, String)>,
) -> Response {
    if let Err(r) = valid_path(None, &name) {
        return *r;
    }
    find_object(&api, &format!("{kind} {name}"))
}

async fn get_object(
    State(api): State<Api>,
    AxPath((kind, namespace, name)): AxPath<(String, String, String)>,
) -> Response {
    if let Err(r) = valid_path(Some(&namespace), &name) {
        return *r;
    }
    find_object(&api, &format!("{kind} {namespace}/{name}"))
}

/// One config object (local mode) as it is served, in its Kubernetes shape.
fn find_object(api: &Api, id: &str) -> Response {
    let local = match local(api) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    match local.object(id) {
        Some(o) => Json(serde_json::to_value(o.to_value()).unwrap_or_default()).into_response(),
        None => error(StatusCode::NOT_FOUND, &format!("{id} does not exist")),
    }
}

async fn put_cluster_object(
    State(api): State<Api>,
    AxPath((kind, name)): AxPath<(String, String)>,
    body: String,
) -> Response {
    apply_object(&api, &kind, None, &name, &body).await
}

async fn put_object(
    State(api): State<Api>,
    AxPath((kind, namespace, name)): AxPath<(String, String, String)>,
    body: String,
) -> Response {
    apply_object(&api, &kind, Some(&namespace), &name, &body).await
}

/// Creates or replaces one object (JSON or YAML, in its Kubernetes shape).
/// The path names it; the body must agree. Validated, written atomically,
/// applied; on any refusal nothing changes.
async fn apply_object(
    api: &Api,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
    body: &str,
) -> Response {
    if let Err(r) = valid_path(namespace, name) {
        return *r;
    }
    let local = match local(api) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let object = match crate::source::parse_object(body) {
        Ok(o) => o,
        Err(e @ BodyError::Syntax(_)) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ BodyError::Invalid(_)) => {
            return error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string());
        }
    };
    let want = match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    };
    if object.id() != want || object.cluster_scoped() != namespace.is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("the body is {}, the path names {want}", object.id()),
        );
    }
    match tokio::task::spawn_blocking(move || local.put(object)).await {
        Ok(Ok(version)) => {
            info!(
                object = want,
                version, "config object written through the REST API"
            );
            Json(json!({"version": version})).into_response()
        }
        Ok(Err(e)) => local_error(e),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "write failed; nothing applied",
        ),
    }
}

async fn delete_cluster_object(
    State(api): State<Api>,
    AxPath((kind, name)): AxPath<(String, String)>,
) -> Response {
    if let Err(r) = valid_path(None, &name) {
        return *r;
    }
    remove_object(&api, kind, name).await
}

async fn delete_object(
    State(api): State<Api>,
    AxPath((kind, namespace, name)): AxPath<(String, String, String)>,
) -> Response {
    if let Err(r) = valid_path(Some(&namespace), &name) {
        return *r;
    }
    remove_object(&api, kind, format!("{namespace}/{name}")).await
}

async fn remove_object(api: &Api, kind: String, key: String) -> Response {
    let local = match local(api) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    match tokio::task::spawn_blocking(move || local.delete(&kind, &key)).await {
        Ok(Ok(version)) => Json(json!({"version": version})).into_response(),
        Ok(Err(e)) => local_error(e),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "delete failed"),
    }
}

/// The namespace and name a path gives, checked as Kubernetes checks them
/// before anything looks them up: 422 naming the fault.
fn valid_path(namespace: Option<&str>, name: &str) -> Result<(), Box<Response>> {
    namespace
        .map_or(Ok(()), crate::source::validate_namespace)
        .and_then(|()| crate::source::validate_name("name", name))
        .map_err(|e| Box::new(error(StatusCode::UNPROCESSABLE_ENTITY, &e)))
}

fn local_error(e: LocalError) -> Response {
    let status = match &e {
        LocalError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        LocalError::NotManaged { .. } => StatusCode::CONFLICT,
        LocalError::NotFound(_) => StatusCode::NOT_FOUND,
        LocalError::Dir { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status == StatusCode::UNPROCESSABLE_ENTITY {
        metrics::counter!("weft_controller_config_errors_total").increment(1);
    }
    error(status, &e.to_string())
}
async fn openapi() -> Json<Value> {
    let list = |what: &str| {
        json!({"get": {"summary": format!("List {what}"), "security": [{"bearer": []}],
        "responses": {"200": {"description": "items and the config version"}, "401": {"description": "missing or wrong token"}}}})
    };
    let object_ops = json!({
        "put": {"summary": "Create or replace one object (local mode), in its Kubernetes shape, JSON or YAML; written to <dir>/<kind>.<namespace>.<name>.yaml atomically",
            "security": [{"bearer": []}], "requestBody": {"content": {"application/yaml": {}, "application/json": {}}},
            "responses": {"200": {"description": "applied; the config version"}, "400": {"description": "not JSON/YAML, or the body names another object"},
                "409": {"description": "defined in a hand-written file"}, "413": {"description": "over 1 MiB"},
                "422": {"description": "invalid; the error names the object and field; nothing applied"}}},
        "delete": {"summary": "Delete an object the API wrote (local mode)", "security": [{"bearer": []}],
            "responses": {"200": {"description": "applied"}, "404": {"description": "no such object"}, "409": {"description": "defined in a hand-written file"}}},
    });
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
            "/api/v1/{what}/{namespace}/{name}": {"get": {"summary": "One workload, service or policy (what: workloads, services, policies)", "security": [{"bearer": []}],
                "responses": {"200": {"description": "the object"}, "404": {"description": "not in the config served"}}}},
            "/api/v1/waypoints": list("waypoints (Gateways of class weft-waypoint) and the services bound to them"),
            "/api/v1/routes": list("HTTPRoutes attached to Services"),
            "/api/v1/certificates": list("certificates issued since start: identity, serial, validity"),
            "/api/v1/sources": {"get": {"summary": "The config source: files (local mode) with their errors, and objects not used as written", "security": [{"bearer": []}], "responses": {"200": {"description": "status"}}}},
            "/api/v1/objects": list("config objects (local mode) and the file each comes from"),
            "/api/v1/objects/{kind}/{namespace}/{name}": object_ops,
            "/api/v1/objects/{kind}/{name}": object_ops,
            "/api/v1/openapi.json": {"get": {"summary": "This document", "security": [{"bearer": []}], "responses": {"200": {"description": "OpenAPI 3"}}}},
        }
    }))
}
