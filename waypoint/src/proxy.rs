//! One request through the waypoint, as a fixed list of phases over a
//! request context (pingora-style, not a tower stack):
//!
//! `accept` (HBONE, the client's verified identity, what it asked for) →
//! `route` (HTTPRoute/GRPCRoute) → `filters` (headers, redirect, rewrite,
//! fault, mirror) → `backend` (weighted backendRefs) → `upstream`
//! (endpoint, timeouts, retries) → `respond` → `log`.
//!
//! L7 authorization, circuit breaking, rate limits and request telemetry
//! (issue #13) are phases to add between `route` and `upstream`.
//! A refusal from here on is an HTTP status with a response flag.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rand::Rng;
use tokio::sync::watch;
use tracing::warn;
use weft_proto::hbone::server::{Handler, InboundConnect};
use weft_proto::identity::Identity;
use weft_proto::model::{Backend, Model};
use weft_proto::pb::weft::v1 as pb;
use weft_proto::routes::{self, RouteTable, Selected};
use weft_proto::telemetry::ByLabel;

use crate::filters;
use crate::resilience::{Buckets, Resilience};
use crate::sniff::{self, Protocol};
use crate::telemetry::{Record, SourceLabels, Spans, Trace, counted, tallied};
use crate::upstream::{Body, DEFAULT_IDLE_TIMEOUT, Endpoint, Upstreams};

/// Largest request body kept to be sent again on a retry; a larger one
/// streams once and is never retried.
const RETRY_BUFFER: usize = 64 * 1024;

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
}

impl Client {
    pub fn new(identity: Identity, addr: SocketAddr, target: Target) -> Self {
        Client {
            identity,
            addr,
            target,
            cache: Mutex::default(),
        }
    }
}

/// A connection's view of one config version.
#[derive(Debug, Default)]
struct ConnCache {
    model: Option<Arc<Model>>,
    table: Option<Arc<RouteTable>>,
    /// (Service, port) → its ready endpoints.
    endpoints: Vec<(String, u16, Arc<[Endpoint]>)>,
    xfcc: Option<HeaderValue>,
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
    /// The Service and port the request went to.
    backend: (String, u16),
    flag: &'static str,
    /// The request body's bytes sent on, for its record.
    request_bytes: Arc<AtomicU64>,
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
    pub async fn serve_http<I>(self: Arc<Self>, io: I, client: Arc<Client>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let client_id = client.identity.clone();
        let proxy = self.clone();
        let svc = service_fn(move |req| {
            let (proxy, client) = (proxy.clone(), client.clone());
            async move { Ok::<_, Infallible>(proxy.serve(req, &client).await) }
        });
        let l = &self.limits;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(l.header_read_timeout)
            .max_buf_size(l.max_header_bytes)
            .max_headers(l.max_headers);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(l.max_header_bytes as u32)
            .max_concurrent_streams(l.max_streams)
            .max_pending_accept_reset_streams(l.max_resets)
            .max_local_error_reset_streams(l.max_resets);
        let served = builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .await;
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
    /// request's record (log line, metrics) when it ends.
    pub async fn serve(&self, mut req: Request<Incoming>, client: &Client) -> Response<Body> {
        let (trace, span) =
            Trace::continue_or_start(req.headers_mut(), self.trace_sampling, self.spans.as_ref());
        // One config version for the whole request, its record included.
        let model = self.model.borrow().clone();
        let mut record = self.record(&model, &req, client, trace);
        record.span = span;
        let mut ctx = Ctx {
            client,
            route: None,
            response_headers: Vec::new(),
            backend: (String::new(), 0),
            flag: "-",
            request_bytes: record.request_bytes.clone(),
        };
        let resp = match self.phases(&model, req, &mut ctx).await {
            Ok(resp) => resp,
            Err(r) => {
                ctx.flag = r.flag;
                warn!(method = %record.method, path = %record.path, client = %client.identity, status = r.status.as_u16(), response_flags = r.flag, reason = r.reason, trace_id = %record.trace.trace_id, "request refused");
                status_response(r.status, &r.reason)
            }
        };
        self.stats.requests.add(ctx.flag);
        record.flag = ctx.flag;
        record.status = resp.status().as_u16();
        record.route = ctx.route.take().map(|s| s.route);
        // The Service a backend was chosen from; until one was (and if
        // none was: a refusal), the Service the client asked for.
        if !ctx.backend.0.is_empty() {
            record.destination_service = std::mem::take(&mut ctx.backend.0).into();
        } else if let Target::Service { key, .. } = &client.target {
            record.destination_service = key.clone().into();
        }
        // A trailers-only gRPC answer carries its status in the head.
        record.grpc_status = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        resp.map(|body| counted(body, record))
    }

    /// The request's record, as far as its head tells.
    fn record(
        &self,
        model: &Arc<Model>,
        req: &Request<Incoming>,
        client: &Client,
        trace: Trace,
    ) -> Record {
        let source = self.cached(model, client, |c| {
            c.source
                .get_or_insert_with(|| Arc::new(source_labels(model, client)))
                .clone()
        });
        let protocol = if is_grpc(req) {
            "grpc"
        } else if req.version() == http::Version::HTTP_2 {
            "http2"
        } else {
            "http"
        };
        let head = (req.method().clone(), req.uri().path().to_owned());
        Record::new(head, source, trace, protocol)
    }

    async fn phases(
        &self,
        model: &Arc<Model>,
        mut req: Request<Incoming>,
        ctx: &mut Ctx<'_>,
    ) -> Result<Response<Body>, Refusal> {
        // Who called, as the handshake verified it: a client's own
        // x-forwarded-client-cert is never passed on.
        let xfcc = self.cached(model, ctx.client, |c| {
            let make = || {
                let v = format!("By={};URI={}", self.identity, ctx.client.identity);
                HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static(""))
            };
            c.xfcc.get_or_insert_with(make).clone()
        });
        req.headers_mut().insert("x-forwarded-client-cert", xfcc);
        self.authorize(model, &mut req, ctx)?;
        self.route(model, &req, ctx)?;
        let selected = ctx.route.clone();
        let rule = selected.as_ref().map(|s| s.rule());
        let filters = rule.map_or(&[][..], |r| &r.filters[..]);
        if let Some(resp) = self.filters(filters, &mut req, ctx).await? {
            return Ok(resp);
        }
        let chosen = self.backend(model, rule, ctx)?;
        if let Some(resp) = self.filters(chosen.filters, &mut req, ctx).await? {
            return Ok(resp);
        }
        let upgrade = wants_upgrade(req.headers());
        strip_hop_by_hop(req.headers_mut(), upgrade);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let timeout = rule.map_or(0, |r| r.request_timeout_ms);
        let tries = Tries {
            endpoints: &chosen.endpoints,
            all: &chosen.all,
            policy: chosen.policy.as_deref(),
            first: chosen.first,
        };
        // Boxed: the tries, timeouts and connection futures are most of a
        // request's state; inline, every move of the request's future
        // (hyper moves it into its dispatcher) copied kilobytes.
        let upstream = Box::pin(self.upstream(req, tries, rule, ctx));
        let mut resp = match timeout {
            0 => upstream.await?,
            ms => tokio::time::timeout(Duration::from_millis(ms), upstream)
                .await
                .map_err(|_| {
                    refuse(
                        StatusCode::GATEWAY_TIMEOUT,
                        "UT",
                        format!("request timeout ({ms} ms)"),
                    )
                })??,
        };
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
                xfcc: c.xfcc.take(),
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
    async fn filters(
        &self,
        list: &[pb::RouteFilter],
        req: &mut Request<Incoming>,
        ctx: &mut Ctx<'_>,
    ) -> Result<Option<Response<Body>>, Refusal> {
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
                    return Ok(Some(resp));
                }
                Filter::Fault(fault) => {
                    if let Some(resp) = self.fault(fault, req, ctx).await {
                        return Ok(Some(resp));
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
                        return Ok(Some(resp));
                    }
                }
            }
        }
        Ok(None)
    }

    /// A FaultInjection: a delay (then on), or an abort answered here.
    async fn fault(
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
            tokio::time::sleep(Duration::from_millis(f.delay_ms)).await;
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
    ) -> Result<Chosen<'r>, Refusal> {
        let (service, port, filters): (&str, u16, &'r [pb::RouteFilter]) =
            match (&ctx.client.target, rule) {
                (Target::Workload { addr, identity }, _) => {
                    let ep = Endpoint {
                        addr: *addr,
                        identity: identity.clone(),
                    };
                    let one: Arc<[Endpoint]> = Arc::from([ep]);
                    return Ok(Chosen {
                        endpoints: one.clone(),
                        all: one,
                        policy: None,
                        first: 0,
                        filters: &[],
                    });
                }
                (Target::Service { key, port }, None) => (key, *port, &[]),
                (_, Some(rule)) => {
                    let b = weighted(rule)?;
                    (&b.service, b.port as u16, &b.filters)
                }
            };
        ctx.backend = (service.to_owned(), port);
        let eps = self.cached(model, ctx.client, |c| {
            let found = c
                .endpoints
                .iter()
                .find(|(s, p, _)| s == service && *p == port);
            if let Some((.., eps)) = found {
                return Some(eps.clone());
            }
            let eps: Arc<[Endpoint]> = endpoints(model, service, port)?.into();
            c.endpoints.push((service.to_owned(), port, eps.clone()));
            Some(eps)
        });
        let eps = eps.filter(|e| !e.is_empty()).ok_or_else(|| {
            let reason = format!("no ready endpoint for {service}:{port}");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "UH", reason)
        })?;
        // The Service's BackendPolicy, looked up once for every phase after.
        let policy = model.backend(service).cloned();
        let outliers = policy
            .as_ref()
            .is_some_and(|b| b.spec.outlier_detection.is_some());
        let healthy = match outliers {
            true => self.resilience.healthy(&eps),
            false => eps.clone(),
        };
        let first = self.balance(model, (service, policy.as_deref()), &healthy);
        Ok(Chosen {
            first,
            endpoints: healthy,
            all: eps,
            policy,
            filters,
        })
    }

    /// The endpoint a request to `service` tries first, by its backend
    /// policy: round robin (default), least request (the less loaded of
    /// two picked at random) or random.
    fn balance(
        &self,
        model: &Model,
        (service, policy): (&str, Option<&Backend>),
        eps: &[Endpoint],
    ) -> usize {
        use pb::backend::LoadBalancer;
        let n = eps.len();
        let lb = policy
            .and_then(|b| LoadBalancer::try_from(b.spec.load_balancer).ok())
            .unwrap_or(LoadBalancer::RoundRobin);
        let mut rng = rand::rng();
        match lb {
            LoadBalancer::RoundRobin => model.service(service).map_or(0, |s| s.rotate()) % n,
            LoadBalancer::Random => rng.random_range(0..n),
            LoadBalancer::LeastRequest if n < 2 => 0,
            LoadBalancer::LeastRequest => {
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
    /// application (bounded); each answer feeds outlier detection.
    async fn upstream(
        &self,
        req: Request<Incoming>,
        at: Tries<'_>,
        rule: Option<&pb::RouteRule>,
        ctx: &mut Ctx<'_>,
    ) -> Result<Response<Body>, Refusal> {
        let spec = at.policy.map(|p| &p.spec);
        let limits = spec.and_then(|s| s.limits.as_ref());
        let retry = rule.and_then(|r| r.retry.clone()).unwrap_or_default();
        let per_try = rule.map_or(0, |r| r.backend_timeout_ms);
        let idle = match spec.map_or(0, |s| s.idle_timeout_ms) {
            0 => DEFAULT_IDLE_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        let connect_ms = match (per_try, spec.map_or(0, |s| s.connect_timeout_ms)) {
            (0, c) | (c, 0) => c,
            (a, b) => a.min(b),
        };
        let h2 = req.version() == http::Version::HTTP_2;
        let service = &ctx.backend.0;
        let _admitted = self
            .resilience
            .admit(service, limits, !h2)
            .await
            .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, "UO", e))?;
        let report = |ep: &Endpoint, failed| {
            let rules = spec.and_then(|s| s.outlier_detection.as_ref());
            if self.resilience.report(ep.addr, failed, (rules, at.all)) {
                warn!(endpoint = %ep.addr, service, "endpoint ejected: consecutive failures (outlier detection)");
            }
        };
        let attempts = retry.attempts.max(1) as usize;
        let mut body = Replay::new(req, attempts > 1, &ctx.request_bytes).await?;
        let mut last = Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "UH",
            "no endpoint answered",
        ));
        let (mut tries, mut i, mut _retrying) = (0, 0, None);
        while tries < attempts && i < attempts + at.endpoints.len() {
            let ep = &at.endpoints[(at.first + i) % at.endpoints.len()];
            i += 1;
            if i > 1 {
                // Past maxRetries the last answer stands.
                let Some(slot) = self.resilience.retry(service, limits) else {
                    break;
                };
                _retrying = Some(slot);
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(retry.backoff_ms)).await;
            }
            let sender = match bounded(connect_ms, self.upstreams.connect(ep, h2, idle)).await {
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
            let _busy = self.upstreams.busy(ep.addr);
            match bounded(per_try, self.upstreams.send(sender, req)).await {
                Ok(Ok(resp)) => {
                    report(ep, resp.status().is_server_error());
                    let code = u32::from(resp.status().as_u16());
                    let again =
                        retry.codes.contains(&code) && tries < attempts && body.replayable();
                    if !again {
                        if retry.codes.contains(&code) && tries > 1 {
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

/// Where a request may go: the endpoints to try from `first`, and all of
/// the Service's ready ones.
struct Tries<'a> {
    endpoints: &'a [Endpoint],
    all: &'a [Endpoint],
    policy: Option<&'a Backend>,
    first: usize,
}

/// `f` within `ms` (0: unbounded); over time is 504 `UT`.
async fn bounded<T>(ms: u64, f: impl std::future::Future<Output = T>) -> Result<T, Refusal> {
    if ms == 0 {
        return Ok(f.await);
    }
    tokio::time::timeout(Duration::from_millis(ms), f)
        .await
        .map_err(|_| {
            refuse(
                StatusCode::GATEWAY_TIMEOUT,
                "UT",
                format!("backend request timeout ({ms} ms)"),
            )
        })
}

/// The request's body for each try: streamed once, or kept (bounded) to be
/// sent again.
enum Replay {
    Once(Option<Request<Body>>),
    Kept(http::request::Parts, Bytes),
}

impl Replay {
    /// `tally` adds up the body's bytes as they are read.
    async fn new(
        req: Request<Incoming>,
        retries: bool,
        tally: &Arc<AtomicU64>,
    ) -> Result<Replay, Refusal> {
        let (parts, body) = req.into_parts();
        let small = hyper::body::Body::size_hint(&body)
            .upper()
            .is_some_and(|n| n as usize <= RETRY_BUFFER);
        if !retries || !small {
            let mut body = body.map_err(Into::into).boxed();
            if !hyper::body::Body::is_end_stream(&body) {
                body = tallied(body, tally.clone());
            }
            return Ok(Replay::Once(Some(Request::from_parts(parts, body))));
        }
        let bytes = Limited::new(body, RETRY_BUFFER)
            .collect()
            .await
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, "DPE", format!("request body: {e}")))?
            .to_bytes();
        tally.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(Replay::Kept(parts, bytes))
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
        for n in &HOP_BY_HOP_OTHER {
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

/// The hop-by-hop headers without a rule of their own: always removed. A
/// `static`, not a `const`: a const array is built anew at each use.
static HOP_BY_HOP_OTHER: [http::HeaderName; 4] = [
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
];

/// Which hop-by-hop header `name` is, as a bit (0: none).
fn hop_by_hop_bit(name: &http::HeaderName) -> u8 {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    match name {
        n if *n == CONNECTION => HOP_CONNECTION,
        n if *n == UPGRADE => HOP_UPGRADE,
        n if *n == TE => HOP_TE,
        n if *n == TRANSFER_ENCODING => HOP_TRANSFER_ENCODING,
        n if HOP_BY_HOP_OTHER.contains(n) => HOP_OTHER,
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

/// Where a request goes: endpoints, the one to try first, and the
/// backendRef's own filters.
struct Chosen<'r> {
    /// Where to try, ejected outliers left out.
    endpoints: Arc<[Endpoint]>,
    /// Every ready endpoint (what outlier detection's share is of).
    all: Arc<[Endpoint]>,
    /// The Service's BackendPolicy.
    policy: Option<Arc<Backend>>,
    first: usize,
    filters: &'r [pb::RouteFilter],
}

/// The backendRef a request goes to, by weight; an invalid one is 500.
fn weighted(rule: &pb::RouteRule) -> Result<&pb::RouteBackend, Refusal> {
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    let draw = rand::rng().random_range(0..total.max(1));
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

fn empty() -> Body {
    Full::new(Bytes::new()).map_err(Into::into).boxed()
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
    h.insert("grpc-status", HeaderValue::from(code));
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
                    &model,
                    ("default/api", model.backend("default/api").map(|b| &**b)),
                    &eps,
                )
            })
            .collect();
        assert_eq!(picks, [0, 1, 0, 1]);

        // Least request: the endpoint with a request in flight is avoided.
        let (p, model) = proxy(LoadBalancer::LeastRequest);
        let _busy = p.upstreams.busy(eps[0].addr);
        assert!((0..50).all(|_| p.balance(
            &model,
            ("default/api", model.backend("default/api").map(|b| &**b)),
            &eps
        ) == 1));
        drop(_busy);
        assert_eq!(p.upstreams.in_flight(eps[0].addr), 0);

        // Random: both, over 200 draws (each misses all with p = 2^-200).
        let (p, model) = proxy(LoadBalancer::Random);
        let seen: std::collections::HashSet<usize> = (0..200)
            .map(|_| {
                p.balance(
                    &model,
                    ("default/api", model.backend("default/api").map(|b| &**b)),
                    &eps,
                )
            })
            .collect();
        assert_eq!(seen.len(), 2);
    }
}
