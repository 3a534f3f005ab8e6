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
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use weft_proto::model::{Policy, Service, Workload, waypoint_proxy_name};

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
    Kubernetes(Arc<crate::kube_auth::Reviewer>),
}

/// Set on a request by the aggregated API's layer (never by a client:
/// extensions do not travel on the wire) once the API server's front proxy
/// has vouched for the user and RBAC allowed the read.
#[derive(Debug, Clone, Copy)]
pub struct Vouched;

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

/// The API's description, derived from the `#[utoipa::path]` attribute of
/// each handler by the router that serves it: a route cannot be served
/// without being in `/api/v1/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "weft controller API", version = "v1"),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let bearer = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build();
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(bearer));
    }
}

/// Every endpoint that needs the token.
fn authed_routes() -> OpenApiRouter<Api> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(workloads))
        .routes(routes!(services))
        .routes(routes!(policies))
        .routes(routes!(proxies))
        .routes(routes!(trust_bundle))
        .routes(routes!(get_one))
        .routes(routes!(waypoints))
        .routes(routes!(routes))
        .routes(routes!(explain_route))
        .routes(routes!(check_policy))
        .routes(routes!(certificates))
        .routes(routes!(sources))
        .routes(routes!(list_objects))
        .routes(routes!(
            get_cluster_object,
            put_cluster_object,
            delete_cluster_object
        ))
        .routes(routes!(get_object, put_object, delete_object))
        .routes(routes!(openapi))
}

/// The API document (the same for every controller).
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let public = OpenApiRouter::new().routes(routes!(healthz));
        authed_routes().merge(public).into_openapi()
    })
}

pub fn router(api: Api) -> Router {
    let (authed, _) = authed_routes()
        .layer(middleware::from_fn_with_state(api.clone(), authenticate))
        .split_for_parts();
    let (public, _) = OpenApiRouter::new()
        .routes(routes!(healthz))
        .split_for_parts();
    public
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

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "Alive (no token needed)")))]
async fn healthz() -> &'static str {
    "ok\n"
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
    if req.extensions().get::<Vouched>().is_some() {
        return next.run(req).await;
    }
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
            use crate::kube_auth::Refusal;
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
                Err(Refusal::Unauthenticated(_)) => return unauthorized(),
                Err(e @ (Refusal::Forbidden { .. } | Refusal::NotAProxy(_))) => {
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
        "labels": w.labels, "waypoint": w.waypoint,
    })
}

fn service_json(s: &Service) -> Value {
    json!({
        "service": s.key, "addresses": s.addresses,
        "ports": s.ports.iter().map(|(p, t)| json!({"port": p, "targetPort": t})).collect::<Vec<_>>(),
        "endpoints": s.endpoints().iter().map(|w| w.key.clone()).collect::<Vec<_>>(),
        "waypoint": s.waypoint,
    })
}

fn policy_json(p: &Policy) -> Value {
    json!({
        "policy": p.key, "action": format!("{:?}", p.action).to_uppercase(),
        "selector": p.selector, "rules": p.rules.len(),
    })
}

#[utoipa::path(get, path = "/api/v1/workloads", security(("bearer" = [])), responses((status = 200, description = "Workloads in the config served, with the config version"), (status = 401, description = "missing or wrong token")))]
async fn workloads(State(api): State<Api>) -> Json<Value> {
    let snap = api.config.current();
    // Sorted: a model patched change by change keeps arrival order.
    let mut workloads: Vec<_> = snap.model.workloads.iter().collect();
    workloads.sort_by(|a, b| a.key.cmp(&b.key));
    let items: Vec<Value> = workloads.into_iter().map(|w| workload_json(w)).collect();
    Json(json!({"version": snap.version, "items": items}))
}

#[utoipa::path(get, path = "/api/v1/services", security(("bearer" = [])), responses((status = 200, description = "Services in the config served, with the config version"), (status = 401, description = "missing or wrong token")))]
async fn services(State(api): State<Api>) -> Json<Value> {
    let snap = api.config.current();
    let mut services: Vec<_> = snap.model.services.iter().collect();
    services.sort_by(|a, b| a.key.cmp(&b.key));
    let items: Vec<Value> = services.into_iter().map(|s| service_json(s)).collect();
    Json(json!({"version": snap.version, "items": items}))
}

#[utoipa::path(get, path = "/api/v1/policies", security(("bearer" = [])), responses((status = 200, description = "Authorization policies in the config served, with the config version"), (status = 401, description = "missing or wrong token")))]
async fn policies(State(api): State<Api>) -> Json<Value> {
    let snap = api.config.current();
    let items: Vec<Value> = snap.model.policies.iter().map(|p| policy_json(p)).collect();
    Json(json!({"version": snap.version, "items": items}))
}

/// One workload, service or policy by `<namespace>/<name>`.
#[utoipa::path(get, path = "/api/v1/{what}/{namespace}/{name}", security(("bearer" = [])), params(("what" = String, Path, description = "workloads, services or policies"), ("namespace" = String, Path), ("name" = String, Path)), responses((status = 200, description = "The object"), (status = 404, description = "Not in the config served"), (status = 401, description = "missing or wrong token")))]
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

#[utoipa::path(get, path = "/api/v1/proxies", security(("bearer" = [])), responses((status = 200, description = "Proxies on the config stream, with ACKed versions and NACKs, with the config version"), (status = 401, description = "missing or wrong token")))]
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

#[utoipa::path(get, path = "/api/v1/trust-bundle", security(("bearer" = [])), responses((status = 200, description = "The mesh root (PEM)", content_type = "application/x-pem-file"), (status = 401, description = "missing or wrong token")))]
async fn trust_bundle(State(api): State<Api>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        api.ca.root_pem().to_owned(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/api/v1/waypoints", security(("bearer" = [])), responses((status = 200, description = "Waypoints (Gateways of class weft-waypoint): instances, identity, config-stream status, and every Namespace and Service bound to each, with whether the binding is in effect and why not"), (status = 401, description = "missing or wrong token")))]
async fn waypoints(State(api): State<Api>) -> Json<Value> {
    let status = api.sources.borrow().clone();
    let snap = api.config.current();
    let mut bindings = Vec::new();
    let items: Vec<Value> = status
        .waypoints
        .iter()
        .map(|w| {
            let (in_effect, reason) = waypoint_state(&api, &snap, w);
            let namespaces = w.namespaces.iter().map(|n| ("Namespace", n.clone()));
            for (kind, name) in namespaces.chain(w.services.iter().map(|s| ("Service", s.clone()))) {
                bindings.push(json!({"kind": kind, "name": name, "waypoint": w.key, "inEffect": in_effect, "reason": reason}));
            }
            let proxy = api.proxies.get(&waypoint_proxy_name(&w.key));
            json!({
                "waypoint": w.key, "defined": w.defined, "forServiceAccount": w.for_service_account,
                "identity": snap.model.waypoint(&w.key).map(|m| m.identity.to_string()),
                "addresses": w.addresses, "services": w.services, "namespaces": w.namespaces,
                "connected": proxy.as_ref().is_some_and(|p| p.connected),
                "ackedVersions": proxy.map(|p| p.acked),
                "inEffect": in_effect, "reason": reason,
            })
        })
        .collect();
    Json(json!({"version": snap.version, "items": items, "bindings": bindings}))
}

/// Whether what is bound to a waypoint is served now, and if not, why
/// (bound traffic is refused meanwhile, never sent around it).
fn waypoint_state(
    api: &Api,
    snap: &crate::state::Snapshot,
    w: &crate::source::translate::Waypoint,
) -> (bool, String) {
    if !w.defined {
        return (
            false,
            format!(
                "no Gateway {} of class weft-waypoint; bound traffic is refused",
                w.key
            ),
        );
    }
    if snap
        .model
        .waypoint(&w.key)
        .is_none_or(|m| m.addresses.is_empty())
    {
        return (
            false,
            "no ready waypoint instance; bound traffic is refused".into(),
        );
    }
    match api.proxies.get(&waypoint_proxy_name(&w.key)) {
        Some(p) if p.connected => (true, format!("served by {} instance(s)", w.addresses.len())),
        _ => (
            false,
            "the waypoint is not connected to the controller; bound traffic may be refused".into(),
        ),
    }
}

#[utoipa::path(get, path = "/api/v1/routes", security(("bearer" = [])), responses((status = 200, description = "HTTPRoutes and GRPCRoutes attached to Services; a route that cannot be served says why (`refused`)"), (status = 401, description = "missing or wrong token")))]
async fn routes(State(api): State<Api>) -> Json<Value> {
    let status = api.sources.borrow().clone();
    Json(json!({"items": status.routes.iter().map(|r| json!({
        "route": r.key, "parents": r.parents, "rules": r.rules, "refused": r.refused,
    })).collect::<Vec<_>>()}))
}

/// Which rule of which route would serve a request, by the matcher the
/// waypoint runs (`weft_proto::routes`) on the config served now.
#[utoipa::path(get, path = "/api/v1/routes/explain", security(("bearer" = [])), params(
    ("service" = String, Query, description = "namespace/name"), ("port" = u16, Query),
    ("path" = Option<String>, Query), ("method" = Option<String>, Query),
    ("from" = Option<String>, Query, description = "the client's namespace (consumer routes)"),
    ("header" = Option<Vec<String>>, Query, description = "name:value, repeatable")),
    responses((status = 200, description = "The deciding route and rule, or why none matches"), (status = 400, description = "a missing or malformed parameter"), (status = 401, description = "missing or wrong token")))]
async fn explain_route(
    State(api): State<Api>,
    axum::extract::Query(params): axum::extract::Query<Vec<(String, String)>>,
) -> Response {
    let one = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let (Some(service), Some(Ok(port))) = (one("service"), one("port").map(str::parse::<u16>))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "give service=NAMESPACE/NAME and port=N",
        );
    };
    let headers = match parse_headers(&params) {
        Ok(h) => h,
        Err(e) => return *e,
    };
    let (path, query) = match one("path").unwrap_or("/").split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (one("path").unwrap_or("/").to_owned(), None),
    };
    let method = one("method").unwrap_or("GET").to_ascii_uppercase();
    let from = one("from").unwrap_or_else(|| service.split('/').next().unwrap_or_default());
    let model = api.config.current().model.clone();
    let table = weft_proto::routes::RouteTable::build(&model, service, port, from);
    let req = weft_proto::routes::Request {
        method: &method,
        path: &path,
        query: query.as_deref(),
        headers: &headers,
    };
    let waypoint = model.service(service).and_then(|s| s.waypoint.clone());
    let answer = match table.select(&req) {
        Some(sel) => json!({"matched": true, "route": sel.route.key, "rule": sel.rule,
            "backends": sel.rule().backends.iter().map(|b| json!({
                "service": b.service, "port": b.port, "weight": b.weight,
                "invalid": (!b.invalid.is_empty()).then_some(&b.invalid)})).collect::<Vec<_>>(),
            "waypoint": waypoint}),
        None => json!({"matched": false, "waypoint": waypoint, "reason": if table.is_empty() {
            "no route is attached to this Service port for this client: its traffic goes to the Service as it is"
        } else {
            "no rule matches: the waypoint answers 404 (NR)"
        }}),
    };
    Json(answer).into_response()
}

/// Whether `from` may reach `to` on `port` (with an HTTP request shaped by
/// `path`, `method`, `header`), by the code the proxies run, on the config
/// served now: at L7 in the destination's waypoint (with the client's
/// identity) and at L4 in each endpoint's ztunnel (with the waypoint's
/// identity when one is in the way, else the client's).
#[utoipa::path(get, path = "/api/v1/policies/check", security(("bearer" = [])), params(
    ("from" = String, Query, description = "the client workload, namespace/name"),
    ("to" = String, Query, description = "a Service or workload, namespace/name"), ("port" = u16, Query),
    ("path" = Option<String>, Query), ("method" = Option<String>, Query), ("host" = Option<String>, Query),
    ("header" = Option<Vec<String>>, Query, description = "name:value, repeatable")),
    responses((status = 200, description = "The decision at each layer, with the deciding policy and rule"), (status = 400, description = "a missing or unknown parameter"), (status = 401, description = "missing or wrong token")))]
async fn check_policy(
    State(api): State<Api>,
    axum::extract::Query(params): axum::extract::Query<Vec<(String, String)>>,
) -> Response {
    let one = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let (Some(from), Some(to), Some(Ok(port))) =
        (one("from"), one("to"), one("port").map(str::parse::<u16>))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "give from=NAMESPACE/NAME, to=NAMESPACE/NAME and port=N",
        );
    };
    let headers = match parse_headers(&params) {
        Ok(h) => h,
        Err(e) => return *e,
    };
    let model = api.config.current().model.clone();
    let request = crate::policy_check::Request {
        from,
        to,
        port,
        headers: &headers,
        path: one("path").unwrap_or("/"),
        method: one("method").unwrap_or("GET"),
        host: one("host"),
    };
    match crate::policy_check::check(&model, &request) {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, &e),
    }
}

/// The repeatable `header=name:value` parameters.
fn parse_headers(params: &[(String, String)]) -> Result<http::HeaderMap, Box<Response>> {
    let mut headers = http::HeaderMap::new();
    for (_, h) in params.iter().filter(|(n, _)| n == "header") {
        let parsed = h.split_once(':').and_then(|(k, v)| {
            let name = http::HeaderName::from_bytes(k.trim().as_bytes()).ok()?;
            Some((name, http::HeaderValue::from_str(v.trim()).ok()?))
        });
        let Some((name, value)) = parsed else {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "a header is name:value",
            )));
        };
        headers.append(name, value);
    }
    Ok(headers)
}

#[utoipa::path(get, path = "/api/v1/certificates", security(("bearer" = [])), responses((status = 200, description = "Certificates issued since start: identity, serial, validity, with the config version"), (status = 401, description = "missing or wrong token")))]
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

#[utoipa::path(get, path = "/api/v1/sources", security(("bearer" = [])), responses((status = 200, description = "The config source: files (local mode) with their errors, and objects not used as written"), (status = 401, description = "missing or wrong token")))]
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

#[utoipa::path(get, path = "/api/v1/objects", security(("bearer" = [])), responses((status = 200, description = "Config objects (local mode) and the file each comes from, with the config version"), (status = 401, description = "missing or wrong token")))]
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

#[utoipa::path(get, path = "/api/v1/objects/{kind}/{name}", security(("bearer" = [])), params(("kind" = String, Path, description = "Namespace or Node"), ("name" = String, Path)), responses((status = 200, description = "The object (local mode)"), (status = 404, description = "No such object"), (status = 401, description = "missing or wrong token")))]
async fn get_cluster_object(
    State(api): State<Api>,
    AxPath((kind, name)): AxPath<(String, String)>,
) -> Response {
    if let Err(r) = valid_path(None, &name) {
        return *r;
    }
    find_object(&api, &format!("{kind} {name}"))
}

#[utoipa::path(get, path = "/api/v1/objects/{kind}/{namespace}/{name}", security(("bearer" = [])), params(("kind" = String, Path), ("namespace" = String, Path), ("name" = String, Path)), responses((status = 200, description = "The object (local mode)"), (status = 404, description = "No such object"), (status = 401, description = "missing or wrong token")))]
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

#[utoipa::path(put, path = "/api/v1/objects/{kind}/{name}", security(("bearer" = [])), params(("kind" = String, Path), ("name" = String, Path)), request_body(content = String, content_type = "application/yaml", description = "One object in its Kubernetes shape, YAML or JSON"), responses((status = 200, description = "Applied; written to <dir>/<kind>.<namespace>.<name>.yaml atomically; the config version"), (status = 400, description = "Not JSON/YAML, or the body names another object"), (status = 409, description = "Defined in a hand-written file"), (status = 413, description = "Over 1 MiB"), (status = 422, description = "Invalid; the error names the object and field; nothing applied"), (status = 401, description = "missing or wrong token")))]
async fn put_cluster_object(
    State(api): State<Api>,
    AxPath((kind, name)): AxPath<(String, String)>,
    body: String,
) -> Response {
    apply_object(&api, &kind, None, &name, &body).await
}

#[utoipa::path(put, path = "/api/v1/objects/{kind}/{namespace}/{name}", security(("bearer" = [])), params(("kind" = String, Path), ("namespace" = String, Path), ("name" = String, Path)), request_body(content = String, content_type = "application/yaml", description = "One object in its Kubernetes shape, YAML or JSON"), responses((status = 200, description = "Applied; written to <dir>/<kind>.<namespace>.<name>.yaml atomically; the config version"), (status = 400, description = "Not JSON/YAML, or the body names another object"), (status = 409, description = "Defined in a hand-written file"), (status = 413, description = "Over 1 MiB"), (status = 422, description = "Invalid; the error names the object and field; nothing applied"), (status = 401, description = "missing or wrong token")))]
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

#[utoipa::path(delete, path = "/api/v1/objects/{kind}/{name}", security(("bearer" = [])), params(("kind" = String, Path), ("name" = String, Path)), responses((status = 200, description = "Deleted and applied"), (status = 404, description = "No such object"), (status = 409, description = "Defined in a hand-written file"), (status = 401, description = "missing or wrong token")))]
async fn delete_cluster_object(
    State(api): State<Api>,
    AxPath((kind, name)): AxPath<(String, String)>,
) -> Response {
    if let Err(r) = valid_path(None, &name) {
        return *r;
    }
    remove_object(&api, kind, name).await
}

#[utoipa::path(delete, path = "/api/v1/objects/{kind}/{namespace}/{name}", security(("bearer" = [])), params(("kind" = String, Path), ("namespace" = String, Path), ("name" = String, Path)), responses((status = 200, description = "Deleted and applied"), (status = 404, description = "No such object"), (status = 409, description = "Defined in a hand-written file"), (status = 401, description = "missing or wrong token")))]
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
#[utoipa::path(get, path = "/api/v1/openapi.json", security(("bearer" = [])), responses((status = 200, description = "This document (OpenAPI 3.1)"), (status = 401, description = "missing or wrong token")))]
async fn openapi() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(document())
}

#[cfg(test)]
mod tests {
    /// Every endpoint but /healthz says it needs the bearer token, and the
    /// scheme it names is defined.
    #[test]
    fn the_document_says_which_endpoints_need_the_token() {
        let doc = serde_json::to_value(super::document()).expect("serialises");
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let paths = doc["paths"].as_object().expect("paths");
        assert!(paths.len() >= 15, "{:?}", paths.keys());
        for (path, methods) in paths {
            for (method, op) in methods.as_object().expect("methods") {
                let secured = op["security"][0].get("bearer").is_some();
                assert_eq!(secured, path != "/healthz", "{method} {path}");
            }
        }
    }
}
