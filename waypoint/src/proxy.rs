//! One request through the waypoint, as a fixed list of phases over a
//! request context (pingora-style, not a tower stack):
//!
//! `accept` (HBONE, the client's verified identity, what it asked for) →
//! `decode` (the HTTP version from the first bytes; hyper's server for it)
//! → `authorize` (path normalised, L7 policy) → `route` (HTTPRoute,
//! GRPCRoute) → `filters` (headers, redirect, rewrite, fault, mirror, rate
//! limit) → `backend` (weighted backendRefs, balancer) → `upstream`
//! (limits, endpoint, timeouts, retries) → `respond` → `log`.
//!
//! The phases before `upstream` are plain calls ([`Proxy::plan`]); only
//! waiting (a fault's delay, the upstream) is `async`. hyper moves each
//! request's future, and every `async fn` layer keeps its by-value
//! arguments twice, so the future is kept small and shallow.
//! A refusal from here on is an HTTP status with a response flag.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::Rng;
use tokio::sync::watch;
use tracing::warn;
use weft_proto::hbone::server::{Handler, InboundConnect};
use weft_proto::identity::Identity;
use weft_proto::model::{Backend, Model, Service};
use weft_proto::pb::weft::v1 as pb;
use weft_proto::routes::{self, RouteTable, Selected};
use weft_proto::telemetry::ByLabel;

use crate::filters;
use crate::resilience::{Buckets, Resilience};
use crate::sniff::{self, Protocol};
use crate::telemetry::{Record, SourceLabels, Spans, Trace, counted, tallied};
use crate::upstream::{Body, DEFAULT_IDLE_TIMEOUT, Endpoint, Upstreams};

const BACKEND_TIMEOUT: &str = "backend request timeout";

/// Largest request body kept to be sent again on a retry; a larger one
/// streams once and is never retried.
const RETRY_BUFFER: usize = 64 * 1024;

// Names made once: a name given as text is parsed and checked at each use.
const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// What a tunnel asked for: a Service port, or one workload's port.
#[derive(Debug, Clone)]
pub enum Target {
    Service {
        key: String,
        port: u16,
    },
    Workload {
        addr: SocketAddr,
        identity: Identity,
    },
}

/// Who sent a request: verified at the HBONE handshake, never a header.
#[derive(Debug)]
pub struct Client {
    pub identity: Identity,
    pub addr: SocketAddr,
    pub target: Target,
    /// What this connection's requests resolved under the config they
    /// saw: made once per config version, not per request.
    cache: Mutex<ConnCache>,
    /// The `x-forwarded-client-cert` its requests carry (who the
    /// waypoint and the client are: fixed for the connection).
    xfcc: OnceLock<HeaderValue>,
}

impl Client {
    pub fn new(identity: Identity, addr: SocketAddr, target: Target) -> Self {
        Client {
            identity,
            addr,
            target,
            cache: Mutex::default(),
            xfcc: OnceLock::new(),
        }
    }
}

/// A connection's view of one config version.
#[derive(Debug, Default)]
struct ConnCache {
    model: Option<Arc<Model>>,
    table: Option<Arc<RouteTable>>,
    /// The Services (and ports) requests went to.
    backings: Vec<Backing>,
    source: Option<Arc<SourceLabels>>,
}

/// Counts of what the waypoint did, for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests answered, by response flag (`-`: proxied as asked).
    pub requests: ByLabel,
    /// Tunnels refused before HTTP (a destination this waypoint does not serve).
    pub tunnels_refused: AtomicU64,
    pub retries: AtomicU64,
    pub mirrored: AtomicU64,
    /// Tunnels carried as opaque TCP (declared, or not HTTP by their first bytes).
    pub opaque: AtomicU64,
    /// Client connections closed on a protocol error or a limit (bad
    /// framing, oversized or slow headers, reset floods).
    pub connection_errors: AtomicU64,
}

/// What one client connection may cost: hostile input meets these.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time to send a request's headers (slowloris).
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1.1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams: u32,
    /// HTTP/2 streams a client may reset (or make fail) before the
    /// connection is closed (rapid reset).
    pub max_resets: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_streams: 256,
            max_resets: 100,
        }
    }
}

pub struct Proxy {
    pub key: String,
    pub identity: Identity,
    pub model: watch::Receiver<Arc<Model>>,
    pub upstreams: Arc<Upstreams>,
    pub stats: Stats,
    pub limits: Limits,
    /// The share of new traces sampled (a caller's decision is kept).
    pub trace_sampling: f64,
    /// Where sampled requests' spans go (`None`: not exported).
    pub spans: Option<Spans>,
    /// Circuit breakers and endpoint health, per Service.
    pub resilience: Resilience,
    /// Rate limits' token buckets.
    pub buckets: Buckets,
    /// Route tables compiled for the model they were made from.
    tables: Mutex<Tables>,
}

/// Route tables by (Service, port, client namespace), for one model.
type Tables = (
    Option<Arc<Model>>,
    HashMap<(String, u16, String), Arc<RouteTable>>,
);

/// A request ended here rather than proxied: its status and flag.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    flag: &'static str,
    reason: String,
}

fn refuse(status: StatusCode, flag: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        flag,
        reason: reason.into(),
    }
}

/// A request on its way through the phases.
struct Ctx<'a> {
    client: &'a Client,
    route: Option<Selected>,
    response_headers: Vec<pb::HeaderModifier>,
    /// The Service the request went to.
    backend: Option<Arc<str>>,
    flag: &'static str,
    /// The request body's bytes sent on, for its record (once it has one).
    request_bytes: Option<Arc<AtomicU64>>,
    /// Fault injection's delay, waited before going on.
    delay: Duration,
}

impl<'a> Ctx<'a> {
    fn new(client: &'a Client) -> Self {
        Ctx {
            client,
            route: None,
            response_headers: Vec::new(),
            backend: None,
            flag: "-",
            request_bytes: None,
            delay: Duration::ZERO,
        }
    }

    /// The Service the request went to (chosen before the upstream).
    fn service(&self) -> &str {
        self.backend.as_deref().unwrap_or("")
    }
}

/// The listener's handler: one tunnel, HTTP on it.
pub struct Tunnels(pub Arc<Proxy>);

impl Handler for Tunnels {
    async fn handle(&self, c: InboundConnect) {
        let proxy = self.0.clone();
        let model = proxy.model.borrow().clone();
        let target = match proxy.target(&model, c.authority) {
            Ok(t) => t,
            Err(reason) => {
                proxy.stats.tunnels_refused.fetch_add(1, Ordering::Relaxed);
                warn!(peer = %c.peer, authority = %c.authority, reason, response_flags = "NR", "tunnel refused");
                return c.refuse(StatusCode::BAD_REQUEST);
            }
        };
        let client = Arc::new(Client::new(c.peer.clone(), c.peer_addr, target));
        let declared = proxy.declared_protocol(&model, &client.target);
        let Ok(mut stream) = c.accept() else { return };
        let (protocol, prefix) = match declared {
            Some(p) => (p, bytes::Bytes::new()),
            None => match sniff::sniff(&mut stream).await {
                Ok(judged) => judged,
                Err(_) => return,
            },
        };
        let io = sniff::Prefixed::new(prefix, stream);
        match protocol {
            Protocol::Http => proxy.serve_http(io, client).await,
            Protocol::Tcp => proxy.opaque(io, &client).await,
        }
    }
}

impl Proxy {
    /// HTTP on a connection (a tunnel; plain TCP when the engine is
    /// measured alone): each request through the phases.
    pub async fn serve_http<I>(self: Arc<Self>, mut io: I, client: Arc<Client>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let client_id = client.identity.clone();
        let proxy = self.clone();
        let svc = service_fn(move |req| proxy.clone().serve(req, client.clone()));
        let l = &self.limits;
        // The version from the first bytes (bounded, as a request head is),
        // then hyper's own server for it: no per-read rewind layer.
        let sniffed = tokio::time::timeout(l.header_read_timeout, sniff::http2(&mut io)).await;
        let Ok(Ok((h2, prefix))) = sniffed else {
            self.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
            warn!(client = %client_id, "HTTP connection closed: no request within the header read timeout");
            return;
        };
        let io = TokioIo::new(sniff::Prefixed::new(prefix, io));
        let served = if h2 {
            http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(l.max_header_bytes as u32)
                .max_concurrent_streams(l.max_streams)
                .max_pending_accept_reset_streams(l.max_resets)
                .max_local_error_reset_streams(l.max_resets)
                .serve_connection(io, svc)
                .await
        } else {
            http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(l.header_read_timeout)
                .max_buf_size(l.max_header_bytes)
                .max_headers(l.max_headers)
                .serve_connection(io, svc)
                .with_upgrades()
                .await
        };
        if let Err(e) = served {
            self.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
            warn!(client = %client_id, error = %e, "HTTP connection closed on a protocol error or limit");
        }
    }

    /// What the destination port declares (`appProtocol`); `None`: judge
    /// the first bytes.
    fn declared_protocol(&self, model: &Model, target: &Target) -> Option<Protocol> {
        let Target::Service { key, port } = target else {
            return None;
        };
        let declared = model.service(key)?.app_protocol(*port)?;
        Some(sniff::declared(declared))
    }

    /// Opaque TCP: bytes to an endpoint of the destination, untouched
    /// (tried endpoint by endpoint until one takes the tunnel).
    async fn opaque(&self, mut io: sniff::Prefixed<weft_proto::hbone::H2Stream>, client: &Client) {
        let model = self.model.borrow().clone();
        let eps = match &client.target {
            Target::Workload { addr, identity } => vec![Endpoint {
                addr: *addr,
                identity: identity.clone(),
            }],
            Target::Service { key, port } => endpoints(&model, key, *port).unwrap_or_default(),
        };
        self.stats.opaque.fetch_add(1, Ordering::Relaxed);
        let first = rand::rng().random_range(0..eps.len().max(1));
        for i in 0..eps.len() {
            let ep = &eps[(first + i) % eps.len()];
            match self.upstreams.tunnel(ep).await {
                Ok(mut up) => {
                    let _ = tokio::io::copy_bidirectional(&mut io, &mut up).await;
                    return;
                }
                Err(e) => {
                    warn!(client = %client.identity, endpoint = %ep.addr, error = %e, response_flags = "UF", "opaque TCP: endpoint unavailable")
                }
            }
        }
        self.stats.requests.add("UH");
        warn!(client = %client.identity, target = ?client.target, response_flags = "UH", "opaque TCP: no endpoint took the connection");
    }

    pub fn new(
        key: String,
        identity: Identity,
        model: watch::Receiver<Arc<Model>>,
        upstreams: Arc<Upstreams>,
        limits: Limits,
    ) -> Self {
        Proxy {
            key,
            identity,
            model,
            upstreams,
            limits,
            trace_sampling: 0.01,
            spans: None,
            resilience: Resilience::default(),
            buckets: Buckets::default(),
            stats: Stats::default(),
            tables: Mutex::default(),
        }
    }

    /// `accept`: the tunnel's `:authority` must be a Service port or a
    /// workload bound to this waypoint; it is never an open relay.
    fn target(&self, model: &Model, authority: SocketAddr) -> Result<Target, String> {
        let mine = |w: Option<&String>| w.is_some_and(|w| *w == self.key);
        if let Some(svc) = model.service_by_vip(authority.ip()) {
            if !mine(svc.waypoint.as_ref()) {
                return Err(format!("service {} is not bound to this waypoint", svc.key));
            }
            if svc.target_port(authority.port()).is_none() {
                return Err(format!(
                    "service {} has no port {}",
                    svc.key,
                    authority.port()
                ));
            }
            return Ok(Target::Service {
                key: svc.key.clone(),
                port: authority.port(),
            });
        }
        match model.workload_by_ip(authority.ip()) {
            Some(w) if mine(w.waypoint.as_ref()) => Ok(Target::Workload {
                addr: authority,
                identity: w.identity.clone(),
            }),
            Some(w) => Err(format!("workload {} is not bound to this waypoint", w.key)),
            None => Err("not a mesh destination".into()),
        }
    }

    /// One request, every phase; always an answer, whose body writes the
    /// request's record (log line, metrics) when it ends. Only waiting
    /// (a fault's delay, the upstream) is `async`; the phases before it are
    /// plain calls, so the request's future stays small: hyper moves it,
    /// and an `async fn` keeps each by-value argument twice. This is the
    /// future hyper is given (it owns what it uses), not one wrapping it:
    /// each layer would be another copy of the request's state.
    pub async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: Arc<Client>,
    ) -> Result<Response<Body>, Infallible> {
        let client = &*client;
        // One config version for the whole request, its record included.
        let model = self.model.borrow().clone();
        let (req, mut record) = self.record(&model, req, client);
        let mut ctx = Ctx::new(client);
        let planned = self.plan(&model, req, &mut ctx);
        if !ctx.delay.is_zero() {
            tokio::time::sleep(ctx.delay).await;
        }
        let answered = match Plan::forward(planned) {
            Ok(f) => {
                let ms = f.request_timeout_ms;
                bounded(ms, "request timeout", self.upstream(f, &mut ctx))
                    .await
                    .and_then(|answered| answered)
            }
            Err(done) => done,
        };
        let resp = match answered {
            Ok(resp) => resp,
            Err(r) => {
                ctx.flag = r.flag;
                warn!(method = %record.method, path = record.path(), client = %client.identity, status = r.status.as_u16(), response_flags = r.flag, reason = r.reason, trace_id = %record.trace.trace_id, "request refused");
                status_response(r.status, &r.reason)
            }
        };
        self.stats.requests.add(ctx.flag);
        complete(&mut record, ctx, &resp);
        Ok(resp.map(|body| counted(body, record)))
    }

    /// The request's record, as far as its head tells, and its trace
    /// continued (or started) on its way. The request passes through by
    /// value: a local the request's future borrowed would be kept in it.
    fn record(
        &self,
        model: &Arc<Model>,
        mut req: Request<Incoming>,
        client: &Client,
    ) -> (Request<Incoming>, Record) {
        let (trace, span) =
            Trace::continue_or_start(req.headers_mut(), self.trace_sampling, self.spans.as_ref());
        let source = self.cached(model, client, |c| {
            c.source
                .get_or_insert_with(|| Arc::new(source_labels(model, client)))
                .clone()
        });
        let protocol = if is_grpc(&req) {
            "grpc"
        } else if req.version() == http::Version::HTTP_2 {
            "http2"
        } else {
            "http"
        };
        let head = (req.method().clone(), req.uri().path_and_query().cloned());
        let mut record = Record::new(head, source, trace, protocol);
        record.span = span;
        (req, record)
    }

    /// Every phase before the upstream, decided at once: the answer given
    /// here, or where the request goes (a fault's delay is left in `ctx`).
    fn plan(
        &self,
        model: &Arc<Model>,
        mut req: Request<Incoming>,
        ctx: &mut Ctx<'_>,
    ) -> Result<Plan, Refusal> {
        // Who called, as the handshake verified it: a client's own
        // x-forwarded-client-cert is never passed on.
        let xfcc = ctx.client.xfcc.get_or_init(|| {
            let v = format!("By={};URI={}", self.identity, ctx.client.identity);
            HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static(""))
        });
        req.headers_mut().insert(XFCC, xfcc.clone());
        self.authorize(model, &mut req, ctx)?;
        self.route(model, &req, ctx)?;
        let selected = ctx.route.clone();
        let rule = selected.as_ref().map(|s| s.rule());
        let filters = rule.map_or(&[][..], |r| &r.filters[..]);
        if let Some(resp) = self.filters(filters, &mut req, ctx) {
            return Ok(Plan::Answer(resp));
        }
        let (to, backend_filters) = self.backend(model, rule, ctx)?;
        if let Some(resp) = self.filters(backend_filters, &mut req, ctx) {
            return Ok(Plan::Answer(resp));
        }
        let upgrade = wants_upgrade(req.headers());
        strip_hop_by_hop(req.headers_mut(), upgrade);
        Ok(Plan::Forward(Forward {
            client_upgrade: upgrade.then(|| hyper::upgrade::on(&mut req)),
            keep_body: Replay::keeps(&req, rule),
            request_timeout_ms: rule.map_or(0, |r| r.request_timeout_ms),
            req,
            to,
            route: selected,
        }))
    }

    /// `authorize`: the path normalised (what policies judge, routes
    /// match and the application receives; one that cannot be is refused
    /// 400 `DPE`), then the L7 policies of the destination judged with the
    /// client's verified identity: refused 403 `DENY`.
    fn authorize(
        &self,
        model: &Model,
        req: &mut Request<Incoming>,
        ctx: &Ctx<'_>,
    ) -> Result<(), Refusal> {
        use weft_proto::request_policy as rp;
        let normalized = rp::normalize_path(req.uri().path())
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, "DPE", e.to_string()))?;
        // What is judged below is what the application receives.
        if let Cow::Owned(path) = normalized {
            *req.uri_mut() = filters::with_path(req.uri(), &path).ok_or_else(|| {
                let reason = format!("path {path:?} cannot be sent normalised");
                refuse(StatusCode::BAD_REQUEST, "DPE", reason)
            })?;
        }
        if model.request_policies.is_empty() {
            return Ok(());
        }
        let client = ctx.client;
        let (services, port): (Vec<&str>, u16) = match &client.target {
            Target::Service { key, port } => (vec![key.as_str()], *port),
            Target::Workload { addr, .. } => {
                let backs = model.workload_by_ip(addr.ip()).map(|w| &w.services[..]);
                (
                    backs
                        .unwrap_or_default()
                        .iter()
                        .map(String::as_str)
                        .collect(),
                    addr.port(),
                )
            }
        };
        let host = rp::normalize_host(&host_of(req));
        let decision = rp::judge_at(
            &model.request_policies,
            (&services, &self.key),
            &rp::Request {
                identity: Some(&client.identity),
                ip: client.addr.ip(),
                port,
                method: req.method().as_str(),
                path: req.uri().path(),
                host: &host,
                headers: req.headers(),
            },
        );
        if decision.allowed {
            Ok(())
        } else {
            Err(refuse(StatusCode::FORBIDDEN, "DENY", decision.reason))
        }
    }

    /// Runs `f` on `client`'s cache for `model` (emptied when the config
    /// moved on).
    fn cached<T>(
        &self,
        model: &Arc<Model>,
        client: &Client,
        f: impl FnOnce(&mut ConnCache) -> T,
    ) -> T {
        let mut c = client.cache.lock().expect("poisoned");
        if !c.model.as_ref().is_some_and(|m| Arc::ptr_eq(m, model)) {
            *c = ConnCache {
                model: Some(model.clone()),
                ..ConnCache::default()
            };
        }
        f(&mut c)
    }

    /// `route`: the rule serving this request (`None` for a Service with
    /// no route: served as itself, and for a workload).
    fn route(
        &self,
        model: &Arc<Model>,
        req: &Request<Incoming>,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), Refusal> {
        let Target::Service { key, port } = &ctx.client.target else {
            return Ok(());
        };
        let ns = ctx.client.identity.namespace();
        let table = self.cached(model, ctx.client, |c| {
            c.table
                .get_or_insert_with(|| self.table(model, key, *port, ns))
                .clone()
        });
        if table.is_empty() {
            return Ok(());
        }
        let r = routes::Request {
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        let selected = table
            .select(&r)
            .ok_or_else(|| refuse(StatusCode::NOT_FOUND, "NR", "no route matched"))?;
        ctx.route = Some(selected);
        Ok(())
    }

    fn table(
        &self,
        model: &Arc<Model>,
        service: &str,
        port: u16,
        client_ns: &str,
    ) -> Arc<RouteTable> {
        let mut tables = self.tables.lock().expect("poisoned");
        if !tables.0.as_ref().is_some_and(|m| Arc::ptr_eq(m, model)) {
            *tables = (Some(model.clone()), HashMap::new());
        }
        let key = (service.to_owned(), port, client_ns.to_owned());
        tables
            .1
            .entry(key)
            .or_insert_with(|| Arc::new(RouteTable::build(model, service, port, client_ns)))
            .clone()
    }

    /// `filters`: applies a rule's (or a backend's) filters in order;
    /// `Some` is the answer when one ends the request here.
    fn filters(
        &self,
        list: &[pb::RouteFilter],
        req: &mut Request<Incoming>,
        ctx: &mut Ctx<'_>,
    ) -> Option<Response<Body>> {
        use pb::route_filter::Filter;
        for f in list.iter().filter_map(|f| f.filter.as_ref()) {
            match f {
                Filter::RequestHeaders(m) => filters::modify_headers(req.headers_mut(), m),
                Filter::ResponseHeaders(m) => ctx.response_headers.push(m.clone()),
                Filter::Rewrite(r) => {
                    let mut uri = req.uri().clone();
                    let prefix = matched_prefix(ctx.route.as_ref(), uri.path());
                    filters::rewrite(&mut uri, req.headers_mut(), r, prefix);
                    *req.uri_mut() = uri;
                }
                Filter::Redirect(r) => {
                    let host = host_of(req);
                    let prefix = matched_prefix(ctx.route.as_ref(), req.uri().path());
                    let (status, location) = filters::redirect(req.uri(), &host, r, prefix);
                    let mut resp = status_response(status, "");
                    resp.headers_mut()
                        .insert(filters::REDIRECT_HEADER, location);
                    return Some(resp);
                }
                Filter::Fault(fault) => {
                    if let Some(resp) = self.fault(fault, req, ctx) {
                        return Some(resp);
                    }
                }
                Filter::Mirror(m) => self.mirror(m, req),
                Filter::RateLimit(rl) => {
                    if let Err(wait) = self.buckets.take(rl, &ctx.client.identity) {
                        ctx.flag = "RL";
                        let mut resp = status_response(
                            StatusCode::TOO_MANY_REQUESTS,
                            &format!("rate limited by {}", rl.key),
                        );
                        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                        resp.headers_mut()
                            .insert(http::header::RETRY_AFTER, secs.into());
                        return Some(resp);
                    }
                }
            }
        }
        None
    }

    /// A FaultInjection: a delay (added to `ctx`'s, waited before the
    /// request goes on or is answered), or an abort answered here.
    fn fault(
        &self,
        f: &pb::Fault,
        req: &Request<Incoming>,
        ctx: &mut Ctx<'_>,
    ) -> Option<Response<Body>> {
        let (delay, abort) = {
            let mut rng = rand::rng();
            (
                filters::hit(f.delay_percent, rng.random_range(0..100)),
                filters::hit(f.abort_percent, rng.random_range(0..100)),
            )
        };
        if delay && f.delay_ms > 0 {
            ctx.flag = "DI";
            ctx.delay += Duration::from_millis(f.delay_ms);
        }
        if !abort {
            return None;
        }
        ctx.flag = "FI";
        if f.abort_grpc_status > 0 && is_grpc(req) {
            return Some(grpc_status_response(f.abort_grpc_status, "fault injected"));
        }
        let status =
            StatusCode::from_u16(f.abort_status as u16).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        Some(status_response(status, "fault filter abort"))
    }

    /// A RequestMirror: a copy of a bodiless request, fire and forget; the
    /// answer never waits for it.
    fn mirror(&self, m: &pb::Mirror, req: &Request<Incoming>) {
        let sampled = filters::hit(m.percent.unwrap_or(100), rand::rng().random_range(0..100));
        let model = self.model.borrow().clone();
        let Some(ep) =
            endpoints(&model, &m.service, m.port as u16).and_then(|e| e.into_iter().next())
        else {
            return;
        };
        if !sampled || !is_bodiless(req) {
            return;
        }
        let mut copy = Request::builder()
            .method(req.method())
            .uri(req.uri())
            .version(http::Version::HTTP_11);
        if let Some(h) = copy.headers_mut() {
            *h = req.headers().clone();
        }
        let Ok(copy) = copy.body(empty()) else { return };
        self.stats.mirrored.fetch_add(1, Ordering::Relaxed);
        let upstreams = self.upstreams.clone();
        tokio::spawn(async move {
            if let Ok(sender) = upstreams.connect(&ep, false, DEFAULT_IDLE_TIMEOUT).await
                && let Ok(resp) = upstreams.send(sender, copy).await
            {
                let _ = resp.into_body().collect().await;
            }
        });
    }

    /// `backend`: the weighted pick among the rule's backendRefs and its
    /// ready endpoints, the balancer's choice first. An invalid backend's
    /// share gets 500; a backend with no ready endpoint, 503 (Gateway API).
    fn backend<'r>(
        &self,
        model: &Arc<Model>,
        rule: Option<&'r pb::RouteRule>,
        ctx: &mut Ctx<'_>,
    ) -> Result<(Destination, &'r [pb::RouteFilter]), Refusal> {
        let (service, port, filters): (&str, u16, &'r [pb::RouteFilter]) =
            match (&ctx.client.target, rule) {
                (Target::Workload { addr, identity }, _) => {
                    let ep = Endpoint {
                        addr: *addr,
                        identity: identity.clone(),
                    };
                    let one: Arc<[Endpoint]> = Arc::from([ep]);
                    let to = Destination {
                        endpoints: one.clone(),
                        all: one,
                        policy: None,
                        first: 0,
                    };
                    return Ok((to, &[]));
                }
                (Target::Service { key, port }, None) => (key, *port, &[]),
                (_, Some(rule)) => {
                    let b = weighted(rule)?;
                    (&b.service, b.port as u16, &b.filters)
                }
            };
        // What the Service is made of, looked up once per connection (and
        // config version): the name as records carry it, its ready
        // endpoints, its BackendPolicy.
        let found = self.cached(model, ctx.client, |c| {
            let found = c
                .backings
                .iter()
                .find(|b| *b.name == *service && b.port == port);
            if let Some(b) = found {
                return Some(b.clone());
            }
            let b = backing(model, service, port)?;
            c.backings.push(b.clone());
            Some(b)
        });
        let Some(b) = found.filter(|b| !b.endpoints.is_empty()) else {
            ctx.backend = Some(Arc::from(service));
            let reason = format!("no ready endpoint for {service}:{port}");
            return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "UH", reason));
        };
        ctx.backend = Some(b.name.clone());
        let outliers = b
            .policy
            .as_ref()
            .is_some_and(|p| p.spec.outlier_detection.is_some());
        let healthy = match outliers {
            true => self.resilience.healthy(&b.endpoints),
            false => b.endpoints.clone(),
        };
        let first = self.balance((&b.service, b.policy.as_deref()), &healthy);
        let to = Destination {
            first,
            endpoints: healthy,
            all: b.endpoints,
            policy: b.policy,
        };
        Ok((to, filters))
    }

    /// The endpoint a request to `service` tries first, by its backend
    /// policy: round robin (default), least request (the less loaded of
    /// two picked at random) or random.
    fn balance(&self, (service, policy): (&Service, Option<&Backend>), eps: &[Endpoint]) -> usize {
        use pb::backend::LoadBalancer;
        let n = eps.len();
        let lb = policy
            .and_then(|b| LoadBalancer::try_from(b.spec.load_balancer).ok())
            .unwrap_or(LoadBalancer::RoundRobin);
        match lb {
            LoadBalancer::RoundRobin => service.rotate() % n,
            LoadBalancer::Random => rand::rng().random_range(0..n),
            LoadBalancer::LeastRequest if n < 2 => 0,
            LoadBalancer::LeastRequest => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                let load = |i: usize| self.upstreams.in_flight(eps[i].addr);
                if load(b) < load(a) { b } else { a }
            }
        }
    }

    /// `upstream`: sends to an endpoint (round robin from a random start),
    /// within the Service's limits, retrying as the rule says (a kept body
    /// only), and on another endpoint whenever nothing reached the
    /// application (bounded); each answer feeds outlier detection. The
    /// answer goes back without its hop-by-hop headers, modified as the
    /// rule says, and joined to the client after a `101`.
    async fn upstream(&self, f: Forward, ctx: &mut Ctx<'_>) -> Result<Response<Body>, Refusal> {
        let Forward {
            req,
            to,
            route,
            client_upgrade,
            keep_body,
            ..
        } = f;
        let rule = route.as_ref().map(|s| s.rule());
        let spec = to.policy.as_ref().map(|p| &p.spec);
        let limits = spec.and_then(|s| s.limits.as_ref());
        let (h2, mut body) = match keep_body {
            false => Replay::once(req, &mut ctx.request_bytes),
            // Boxed: rare, and kilobytes in every request's future inline.
            true => Box::pin(Replay::kept(req, &mut ctx.request_bytes)).await?,
        };
        let _admitted = match limits {
            None => None,
            Some(l) => Some(
                self.resilience
                    .admit(ctx.service(), Some(l), !h2)
                    .await
                    .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, "UO", e))?,
            ),
        };
        let mut resp = self.tries(&to, &mut body, (rule, h2), ctx).await?;
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(resp.headers_mut(), switching);
        if let (true, Some(client)) = (switching, client_upgrade) {
            splice_upgrade(client, hyper::upgrade::on(&mut resp));
        }
        for m in &ctx.response_headers {
            filters::modify_headers(resp.headers_mut(), m);
        }
        Ok(resp)
    }

    /// The tries of one request: each on a connection to an endpoint,
    /// again on a retryable answer (a kept body only), and on the next
    /// endpoint when nothing was sent.
    async fn tries(
        &self,
        to: &Destination,
        body: &mut Replay,
        (rule, h2): (Option<&pb::RouteRule>, bool),
        ctx: &mut Ctx<'_>,
    ) -> Result<Response<Body>, Refusal> {
        let spec = to.policy.as_ref().map(|p| &p.spec);
        let limits = spec.and_then(|s| s.limits.as_ref());
        let per_try = rule.map_or(0, |r| r.backend_timeout_ms);
        let idle = match spec.map_or(0, |s| s.idle_timeout_ms) {
            0 => DEFAULT_IDLE_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        let connect_ms = match (per_try, spec.map_or(0, |s| s.connect_timeout_ms)) {
            (0, c) | (c, 0) => c,
            (a, b) => a.min(b),
        };
        let least_request =
            spec.is_some_and(|s| s.load_balancer == pb::backend::LoadBalancer::LeastRequest as i32);
        let service = ctx.service();
        let report = |ep: &Endpoint, failed| {
            let rules = spec.and_then(|s| s.outlier_detection.as_ref());
            if self.resilience.report(ep.addr, failed, (rules, &to.all)) {
                warn!(endpoint = %ep.addr, service, "endpoint ejected: consecutive failures (outlier detection)");
            }
        };
        let retry = rule.and_then(|r| r.retry.as_ref());
        let attempts = retry.map_or(1, |r| r.attempts.max(1)) as usize;
        let codes = retry.map_or(&[][..], |r| &r.codes[..]);
        let mut last = Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "UH",
            "no endpoint answered",
        ));
        let (mut tries, mut i, mut _retrying) = (0, 0, None);
        while tries < attempts && i < attempts + to.endpoints.len() {
            let ep = &to.endpoints[(to.first + i) % to.endpoints.len()];
            i += 1;
            if i > 1 {
                // Past maxRetries the last answer stands.
                let Some(slot) = self.resilience.retry(service, limits) else {
                    break;
                };
                _retrying = Some(slot);
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(retry.map_or(0, |r| r.backoff_ms))).await;
            }
            let connecting = self.upstreams.connect(ep, h2, idle);
            let sender = match bounded(connect_ms, BACKEND_TIMEOUT, connecting).await {
                Ok(Ok(sender)) => sender,
                Ok(Err(e)) => {
                    report(ep, true);
                    last = Err(refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        e.flag(),
                        e.to_string(),
                    ));
                    continue; // nothing was sent: another endpoint may take it
                }
                Err(t) => {
                    report(ep, true);
                    last = Err(t);
                    continue;
                }
            };
            let Some(req) = body.next() else { break };
            tries += 1;
            // Counted only where the balancer reads it.
            let _busy = least_request.then(|| self.upstreams.busy(ep.addr));
            let sending = self.upstreams.send(sender, req);
            match bounded(per_try, BACKEND_TIMEOUT, sending).await {
                Ok(Ok(resp)) => {
                    report(ep, resp.status().is_server_error());
                    let code = u32::from(resp.status().as_u16());
                    let again = codes.contains(&code) && tries < attempts && body.replayable();
                    if !again {
                        if codes.contains(&code) && tries > 1 {
                            ctx.flag = "URX";
                        }
                        return Ok(resp.map(|b| b.map_err(Into::into).boxed()));
                    }
                    last = Ok(resp.map(|b| b.map_err(Into::into).boxed()));
                }
                Ok(Err(e)) => {
                    last = Err(refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        e.flag(),
                        e.to_string(),
                    ))
                }
                Err(t) => last = Err(t),
            }
            if !body.replayable() {
                break;
            }
        }
        if last.is_ok() {
            ctx.flag = "URX";
        }
        last
    }
}

pin_project_lite::pin_project! {
    /// A future within `ms` milliseconds (0: unbounded, no timer); over
    /// time is 504 `UT`. A future of its own, not an `async fn`: that
    /// would hold the future it bounds twice, in every request's future.
    struct Bounded<F> {
        #[pin]
        inner: F,
        #[pin]
        timer: Option<tokio::time::Sleep>,
        ms: u64,
        what: &'static str,
    }
}

/// `f` within `ms` (0: unbounded); `what` names the bound in the refusal.
fn bounded<F: Future>(ms: u64, what: &'static str, f: F) -> Bounded<F> {
    Bounded {
        inner: f,
        timer: (ms > 0).then(|| tokio::time::sleep(Duration::from_millis(ms))),
        ms,
        what,
    }
}

impl<F: Future> Future for Bounded<F> {
    type Output = Result<F::Output, Refusal>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        match this.timer.as_pin_mut().map(|t| t.poll(cx)) {
            Some(Poll::Ready(())) => {
                let reason = format!("{} ({} ms)", this.what, this.ms);
                Poll::Ready(Err(refuse(StatusCode::GATEWAY_TIMEOUT, "UT", reason)))
            }
            _ => Poll::Pending,
        }
    }
}

/// The request's body for each try: streamed once, or kept (bounded) to be
/// sent again.
enum Replay {
    Once(Option<Request<Body>>),
    Kept(http::request::Parts, Bytes),
}

impl Replay {
    /// Whether `req` is kept to be sent again: it may be retried, and
    /// its body is small enough.
    fn keeps(req: &Request<Incoming>, rule: Option<&pb::RouteRule>) -> bool {
        let retries = rule
            .and_then(|r| r.retry.as_ref())
            .is_some_and(|r| r.attempts > 1);
        retries
            && hyper::body::Body::size_hint(req.body())
                .upper()
                .is_some_and(|n| n as usize <= RETRY_BUFFER)
    }

    /// The request streamed once (its body's bytes added to `tally` as
    /// they are read), and whether it is HTTP/2.
    fn once(req: Request<Incoming>, tally: &mut Option<Arc<AtomicU64>>) -> (bool, Replay) {
        let h2 = req.version() == http::Version::HTTP_2;
        let (parts, body) = req.into_parts();
        let body = match hyper::body::Body::is_end_stream(&body) {
            // Nothing to count or carry (and no allocation, as a box of a
            // body that carries something would be).
            true => empty(),
            false => tallied(body, tally.get_or_insert_with(Arc::default).clone()),
        };
        (h2, Replay::Once(Some(Request::from_parts(parts, body))))
    }

    /// The request with its body read (bounded) and kept, to be sent again.
    async fn kept(
        req: Request<Incoming>,
        tally: &mut Option<Arc<AtomicU64>>,
    ) -> Result<(bool, Replay), Refusal> {
        let h2 = req.version() == http::Version::HTTP_2;
        let (parts, body) = req.into_parts();
        let bytes = Limited::new(body, RETRY_BUFFER)
            .collect()
            .await
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, "DPE", format!("request body: {e}")))?
            .to_bytes();
        tally
            .get_or_insert_with(Arc::default)
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok((h2, Replay::Kept(parts, bytes)))
    }

    fn replayable(&self) -> bool {
        matches!(self, Replay::Kept(..))
    }

    fn next(&mut self) -> Option<Request<Body>> {
        match self {
            Replay::Once(req) => req.take(),
            Replay::Kept(parts, bytes) => {
                let mut req = Request::new(Full::new(bytes.clone()).map_err(Into::into).boxed());
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = parts.uri.clone();
                *req.version_mut() = parts.version;
                *req.headers_mut() = parts.headers.clone();
                Some(req)
            }
        }
    }
}

fn wants_upgrade(headers: &http::HeaderMap) -> bool {
    headers.contains_key(http::header::UPGRADE)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) end at this hop, those named by
/// `connection` too; an upgrade keeps `connection: upgrade` and `upgrade`
/// so the far side sees it. `te: trailers` (gRPC) passes.
fn strip_hop_by_hop(headers: &mut http::HeaderMap, upgrade: bool) {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    // Each name looked at once; only what the message carries is removed
    // (a lookup per absent name was most of this function's cost).
    let present = headers.keys().fold(0, |bits, n| bits | hop_by_hop_bit(n));
    // A value that is one such token alone, as nearly every message's is,
    // needs no taking apart.
    let plain = |v: &HeaderValue| names_nothing(v.as_bytes());
    if present & HOP_CONNECTION != 0 && !headers.get_all(CONNECTION).iter().all(plain) {
        let named: Vec<http::HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The usual tokens name no header to remove (keep-alive's is
            // removed below): skipped without making a name for them.
            .filter(|n| !names_nothing(n.as_bytes()))
            .filter_map(|n| http::HeaderName::from_bytes(n.as_bytes()).ok())
            .filter(|n| !(upgrade && *n == UPGRADE))
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    if present & HOP_OTHER != 0 {
        for n in HOP_BY_HOP_OTHER {
            headers.remove(n);
        }
    }
    if present & HOP_TRANSFER_ENCODING != 0 {
        headers.remove(TRANSFER_ENCODING);
    }
    if present & HOP_TE != 0 && headers.get(TE).is_some_and(|v| v != "trailers") {
        headers.remove(TE);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        if present & HOP_CONNECTION != 0 {
            headers.remove(CONNECTION);
        }
        if present & HOP_UPGRADE != 0 {
            headers.remove(UPGRADE);
        }
    }
}

const HOP_CONNECTION: u8 = 1;
const HOP_UPGRADE: u8 = 2;
const HOP_TE: u8 = 4;
const HOP_TRANSFER_ENCODING: u8 = 8;
const HOP_OTHER: u8 = 16;

/// The hop-by-hop headers without a rule of their own: always removed.
static HOP_BY_HOP_OTHER: [&str; 4] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Which hop-by-hop header `name` is, as a bit (0: none). Matched as
/// text: a length compare sends nearly every other name away at once.
fn hop_by_hop_bit(name: &http::HeaderName) -> u8 {
    match name.as_str() {
        "connection" => HOP_CONNECTION,
        "upgrade" => HOP_UPGRADE,
        "te" => HOP_TE,
        "transfer-encoding" => HOP_TRANSFER_ENCODING,
        n if HOP_BY_HOP_OTHER.contains(&n) => HOP_OTHER,
        _ => 0,
    }
}

/// The `Connection` tokens that name no header to remove (`keep-alive`'s
/// header goes as a hop-by-hop header of its own).
fn names_nothing(token: &[u8]) -> bool {
    token.eq_ignore_ascii_case(b"keep-alive") || token.eq_ignore_ascii_case(b"close")
}

/// After a `101`, the client's connection and the backend's are joined
/// byte for byte (WebSocket and other upgrades).
fn splice_upgrade(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (Ok(client), Ok(upstream)) = (client.await, upstream.await) else {
            return;
        };
        let (mut a, mut b) = (TokioIo::new(client), TokioIo::new(upstream));
        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
    });
}

/// Where a request goes: endpoints and the one to try first.
struct Destination {
    /// Where to try, ejected outliers left out.
    endpoints: Arc<[Endpoint]>,
    /// Every ready endpoint (what outlier detection's share is of).
    all: Arc<[Endpoint]>,
    /// The Service's BackendPolicy.
    policy: Option<Arc<Backend>>,
    first: usize,
}

/// What the phases before the upstream decided. Taken apart where it is
/// made, so its size costs nothing (boxed, an allocation per request).
#[allow(clippy::large_enum_variant)]
enum Plan {
    /// Answered here (a redirect, an abort, a rate limit).
    Answer(Response<Body>),
    Forward(Forward),
}

impl Plan {
    /// The request to send on, or its answer. A plan matched where it
    /// lies, its nested parts moved out, would stay in the request's
    /// future while the upstream answers (360 bytes, measured with
    /// `-Zprint-type-sizes`); taken apart here, it is moved whole. (The
    /// large `Err` is matched at once, never passed up.)
    #[allow(clippy::result_large_err)]
    fn forward(planned: Result<Plan, Refusal>) -> Result<Forward, Result<Response<Body>, Refusal>> {
        match planned {
            Ok(Plan::Forward(f)) => Ok(f),
            Ok(Plan::Answer(resp)) => Err(Ok(resp)),
            Err(r) => Err(Err(r)),
        }
    }
}

/// A request on its way to an endpoint.
struct Forward {
    req: Request<Incoming>,
    to: Destination,
    /// The rule serving it: the context's, held here because the context
    /// is borrowed mutably while the rule is read.
    route: Option<Selected>,
    /// The client's side of an upgrade it asked for.
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The body is kept, to be sent again on a retry.
    keep_body: bool,
    request_timeout_ms: u64,
}

/// The record completed with what the request's phases and answer tell.
fn complete(record: &mut Record, mut ctx: Ctx<'_>, resp: &Response<Body>) {
    record.flag = ctx.flag;
    record.status = resp.status().as_u16();
    record.route = ctx.route.take().map(|s| s.route);
    record.request_bytes = ctx.request_bytes.take();
    // The Service a backend was chosen from; until one was (and if none
    // was: a refusal), the Service the client asked for.
    record.destination_service = ctx.backend.take().or_else(|| match &ctx.client.target {
        Target::Service { key, .. } => Some(Arc::from(key.as_str())),
        Target::Workload { .. } => None,
    });
    // A trailers-only gRPC answer carries its status in the head.
    if record.protocol == "grpc" {
        record.grpc_status = resp
            .headers()
            .get(&GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
    }
}

/// The backendRef a request goes to, by weight; an invalid one is 500.
fn weighted(rule: &pb::RouteRule) -> Result<&pb::RouteBackend, Refusal> {
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    // One backend (most rules): nothing to draw.
    let draw = match rule.backends.len() {
        1 => 0,
        _ => rand::rng().random_range(0..total.max(1)),
    };
    let b = routes::pick_backend(rule, draw).ok_or_else(|| {
        refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "NR",
            "the rule has no backend with weight",
        )
    })?;
    if !b.invalid.is_empty() {
        return Err(refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "NR",
            b.invalid.clone(),
        ));
    }
    Ok(b)
}

/// A Service port as requests use it.
#[derive(Debug, Clone)]
struct Backing {
    /// `<namespace>/<name>`, shared with each request's record.
    name: Arc<str>,
    port: u16,
    service: Arc<Service>,
    /// Ready endpoints, at their target port.
    endpoints: Arc<[Endpoint]>,
    policy: Option<Arc<Backend>>,
}

fn backing(model: &Model, service: &str, port: u16) -> Option<Backing> {
    Some(Backing {
        name: Arc::from(service),
        port,
        service: model.service(service)?.clone(),
        endpoints: endpoints(model, service, port)?.into(),
        policy: model.backend(service).cloned(),
    })
}

/// The ready endpoints of `service` on its port `port`, at their target port.
fn endpoints(model: &Model, service: &str, port: u16) -> Option<Vec<Endpoint>> {
    let svc = model.service(service)?;
    let target = svc.target_port(port)?;
    Some(
        svc.endpoints()
            .iter()
            .filter(|w| w.meshed)
            .filter_map(|w| {
                let ip = *w.addresses.first()?;
                Some(Endpoint {
                    addr: SocketAddr::new(ip, target),
                    identity: w.identity.clone(),
                })
            })
            .collect(),
    )
}

/// The prefix the selected rule matched `path` on, for
/// `ReplacePrefixMatch`; worked out only when a filter needs it.
fn matched_prefix<'r>(route: Option<&'r Selected>, path: &str) -> Option<&'r str> {
    route?
        .rule()
        .matches
        .iter()
        .filter_map(|m| m.path.as_ref())
        .filter(|p| p.kind() == pb::string_match::Kind::Prefix)
        .map(|p| p.value.as_str())
        .filter(|p| path.starts_with(p.trim_end_matches('/')))
        .max_by_key(|p| p.len())
}

/// The client as metrics label it: its verified identity, and the
/// workload at its address when that workload runs as that identity.
fn source_labels(model: &Model, client: &Client) -> SourceLabels {
    let id = &client.identity;
    let workload = model
        .workload_by_ip(client.addr.ip())
        .filter(|w| w.identity == *id)
        .map_or_else(|| "unknown".to_owned(), |w| w.name.clone());
    SourceLabels::new(id.to_string(), workload, id.namespace().to_owned())
}

fn host_of(req: &Request<Incoming>) -> String {
    req.uri()
        .host()
        .map(str::to_owned)
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)?
                .to_str()
                .ok()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn is_bodiless(req: &Request<Incoming>) -> bool {
    hyper::body::Body::is_end_stream(req.body())
}

/// An empty body (boxed without an allocation: it has no state).
fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn status_response(status: StatusCode, reason: &str) -> Response<Body> {
    let body = if reason.is_empty() {
        String::new()
    } else {
        format!("{reason}\n")
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(Into::into).boxed());
    *resp.status_mut() = status;
    resp
}

/// A gRPC error as gRPC clients read it: HTTP 200, status in the headers.
fn grpc_status_response(code: u32, message: &str) -> Response<Body> {
    let mut resp = Response::new(empty());
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS, HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(message) {
        h.insert("grpc-message", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::hbone::pool::{Pool, PoolSettings};
    use weft_proto::tls::CertState;

    fn proxy(lb: pb::backend::LoadBalancer) -> (Proxy, Arc<Model>) {
        let yaml = "workloads:\n  - {name: a, serviceAccount: api, node: n, addresses: [10.0.0.1], services: [default/api]}\n  - {name: b, serviceAccount: api, node: n, addresses: [10.0.0.2], services: [default/api]}\nservices:\n  - {name: api, addresses: [10.96.0.1], ports: [{port: 80, targetPort: 8080}]}\n";
        let mut model = Model::from_yaml(yaml, "cluster.local").expect("model");
        let spec = pb::Backend {
            name: "p".into(),
            namespace: "default".into(),
            service: "default/api".into(),
            load_balancer: lb as i32,
            ..Default::default()
        };
        model.backends = vec![Arc::new(
            weft_proto::model::backend(spec, "p").expect("valid"),
        )];
        let model = Arc::new(model);
        let id = Identity::new("cluster.local", "default", "waypoint").expect("id");
        let cert = watch::channel(CertState::Initializing).1;
        let upstreams = Upstreams::new(Pool::new(PoolSettings::default()), id.clone(), cert);
        let (_, rx) = watch::channel(model.clone());
        let p = Proxy::new(
            "default/wp".into(),
            id,
            rx,
            Arc::new(upstreams),
            Limits::default(),
        );
        (p, model)
    }

    /// Each hop-by-hop header goes (RFC 9110 §7.6.1), whichever others the
    /// message carries, and nothing else does.
    #[test]
    fn hop_by_hop_headers_go_and_the_rest_stay() {
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, &'a [&'a str]);
        let cases: &[Case] = &[
            (
                &[("content-type", "text/plain"), ("x-a", "1")],
                false,
                &["content-type: text/plain", "x-a: 1"],
            ),
            (
                &[("connection", "keep-alive"), ("content-length", "2")],
                false,
                &["content-length: 2"],
            ),
            (
                &[
                    ("connection", "close, x-secret"),
                    ("x-secret", "s"),
                    ("x-b", "2"),
                ],
                false,
                &["x-b: 2"],
            ),
            (
                &[("x-b", "2"), ("keep-alive", "timeout=5")],
                false,
                &["x-b: 2"],
            ),
            (
                &[
                    ("connection", "Keep-Alive"),
                    ("connection", "x-secret"),
                    ("x-secret", "s"),
                ],
                false,
                &[],
            ),
            (
                &[("proxy-connection", "k"), ("proxy-authorization", "p")],
                false,
                &[],
            ),
            (
                &[
                    ("proxy-authenticate", "q"),
                    ("transfer-encoding", "chunked"),
                ],
                false,
                &[],
            ),
            (
                &[("te", "trailers"), ("upgrade", "h2c")],
                false,
                &["te: trailers"],
            ),
            (&[("te", "gzip")], false, &[]),
            (
                &[
                    ("connection", "Upgrade"),
                    ("upgrade", "websocket"),
                    ("sec-websocket-key", "k"),
                ],
                true,
                &[
                    "connection: upgrade",
                    "sec-websocket-key: k",
                    "upgrade: websocket",
                ],
            ),
        ];
        for (input, upgrade, want) in cases {
            let mut h = http::HeaderMap::new();
            for (k, v) in *input {
                let name = http::HeaderName::from_bytes(k.as_bytes()).expect("name");
                h.append(name, v.parse().expect("value"));
            }
            strip_hop_by_hop(&mut h, *upgrade);
            let mut left: Vec<String> = h
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().expect("ascii")))
                .collect();
            left.sort();
            assert_eq!(left, *want, "{input:?}");
        }
    }

    #[tokio::test]
    async fn balancers_choose_as_their_policy_says() {
        use pb::backend::LoadBalancer;
        let (p, model) = proxy(LoadBalancer::RoundRobin);
        let eps = endpoints(&model, "default/api", 80).expect("endpoints");
        let picks: Vec<usize> = (0..4)
            .map(|_| {
                p.balance(
                    (
                        model.service("default/api").expect("service"),
                        model.backend("default/api").map(|b| &**b),
                    ),
                    &eps,
                )
            })
            .collect();
        assert_eq!(picks, [0, 1, 0, 1]);

        // Least request: the endpoint with a request in flight is avoided.
        let (p, model) = proxy(LoadBalancer::LeastRequest);
        let _busy = p.upstreams.busy(eps[0].addr);
        assert!((0..50).all(|_| p.balance(
            (
                model.service("default/api").expect("service"),
                model.backend("default/api").map(|b| &**b)
            ),
            &eps
        ) == 1));
        drop(_busy);
        assert_eq!(p.upstreams.in_flight(eps[0].addr), 0);

        // Random: both, over 200 draws (each misses all with p = 2^-200).
        let (p, model) = proxy(LoadBalancer::Random);
        let seen: std::collections::HashSet<usize> = (0..200)
            .map(|_| {
                p.balance(
                    (
                        model.service("default/api").expect("service"),
                        model.backend("default/api").map(|b| &**b),
                    ),
                    &eps,
                )
            })
            .collect();
        assert_eq!(seen.len(), 2);
    }
}
