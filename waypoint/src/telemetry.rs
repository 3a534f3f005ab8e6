//! Request telemetry: one [`Record`] per request, written once — the
//! access-log line and the request metrics — when the response body ends,
//! or when it is dropped unfinished (a request cut short still logs, with
//! flag `DC` if nothing else went wrong). Trace context (W3C
//! `traceparent`) is continued or started here and sent on.
//!
//! Metric labels follow Istio's standard request metrics where they have
//! one (`reporter`, `source_*`, `destination_service`, `response_code`,
//! `grpc_response_status`, `response_flags`, `request_protocol`).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::Entry;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame, SizeHint};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{KeyValue, SpanId};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};
use rand::Rng;
use tracing::{info, warn};

use weft_proto::model::Route;

use crate::proxy::GRPC_STATUS;
use crate::upstream::{Body, BoxError};

/// Who is calling, as the metrics label them (resolved once per
/// connection), with the metric handles of the outcomes its requests had.
#[derive(Debug)]
pub struct SourceLabels {
    pub principal: String,
    pub workload: String,
    pub namespace: String,
    /// Looking a labelled metric up in the registry builds, sorts and
    /// hashes nine labels; a connection's requests mostly share a few
    /// outcomes, so each outcome's handles are looked up once.
    handles: Mutex<Vec<(Outcome, Arc<Handles>)>>,
}

/// Outcomes whose handles one connection keeps (beyond: looked up each
/// time, so a hostile peer cannot grow a connection's memory).
const OUTCOMES_KEPT: usize = 32;

/// The labels of a request's metrics beyond its source.
#[derive(Debug)]
struct Outcome {
    destination: String,
    status: u16,
    grpc: Option<String>,
    flag: &'static str,
    protocol: &'static str,
}

/// The request metrics for one source and outcome.
#[derive(Debug)]
struct Handles {
    requests: metrics::Counter,
    duration: metrics::Histogram,
    request_bytes: metrics::Counter,
    response_bytes: metrics::Counter,
}

impl SourceLabels {
    pub fn new(principal: String, workload: String, namespace: String) -> SourceLabels {
        SourceLabels {
            principal,
            workload,
            namespace,
            handles: Mutex::default(),
        }
    }

    fn handles(&self, r: &Record) -> Arc<Handles> {
        let mut kept = self.handles.lock().expect("poisoned");
        let same = |o: &Outcome| {
            o.status == r.status
                && o.flag == r.flag
                && o.protocol == r.protocol
                && o.destination == r.destination()
                && o.grpc == r.grpc_status
        };
        if let Some((_, h)) = kept.iter().find(|(o, _)| same(o)) {
            return h.clone();
        }
        let outcome = Outcome {
            destination: r.destination().to_owned(),
            status: r.status,
            grpc: r.grpc_status.clone(),
            flag: r.flag,
            protocol: r.protocol,
        };
        let labels = vec![
            ("reporter", "waypoint".to_owned()),
            ("source_workload", self.workload.clone()),
            ("source_workload_namespace", self.namespace.clone()),
            ("source_principal", self.principal.clone()),
            ("destination_service", outcome.destination.clone()),
            ("request_protocol", outcome.protocol.to_owned()),
            ("response_code", outcome.status.to_string()),
            (
                "grpc_response_status",
                outcome.grpc.clone().unwrap_or_else(|| "-".into()),
            ),
            ("response_flags", outcome.flag.to_owned()),
        ];
        let handles = Arc::new(Handles {
            requests: metrics::counter!("weft_requests_total", &labels),
            duration: metrics::histogram!("weft_request_duration_seconds", &labels),
            request_bytes: metrics::counter!("weft_request_bytes_total", &labels),
            response_bytes: metrics::counter!("weft_response_bytes_total", &labels),
        });
        if kept.len() < OUTCOMES_KEPT {
            kept.push((outcome, handles.clone()));
        }
        handles
    }
}

/// W3C trace context for one request at this hop. The ids are
/// OpenTelemetry's own (numbers, formatted only when written out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub trace_id: TraceId,
    /// This hop's span (the parent of the upstream's).
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    pub sampled: bool,
}

impl Trace {
    /// Continues the caller's trace (a valid `traceparent`), or starts
    /// one sampled with probability `ratio`; then sets `traceparent` to
    /// this hop's span for the upstream. A sampled request's span is
    /// started in `spans` (when exported) and its ids are this hop's.
    pub fn continue_or_start(
        headers: &mut HeaderMap,
        ratio: f64,
        spans: Option<&Spans>,
    ) -> (Trace, Option<Box<Span>>) {
        // One lookup, for the caller's value and this hop's.
        let entry = headers.entry(TRACEPARENT);
        let parent = match &entry {
            Entry::Occupied(caller) => caller.get().to_str().ok().and_then(parse_traceparent),
            Entry::Vacant(_) => None,
        };
        let mut rng = rand::rng();
        let sampled = match &parent {
            Some((.., sampled)) => *sampled,
            None if ratio <= 0.0 => false,
            None => rng.random_bool(ratio.min(1.0)),
        };
        let (parent_trace, parent_id) = parent.map(|(t, p, _)| (t, p)).unzip();
        let span = spans
            .filter(|_| sampled)
            .map(|s| Box::new(s.start(parent_trace.zip(parent_id))));
        let (trace_id, span_id) = match &span {
            Some(span) => (
                span.span_context().trace_id(),
                span.span_context().span_id(),
            ),
            // Ids must not be zero (W3C); `max(1)` keeps them uniform but
            // for one value in 2^64, without range sampling's rejection
            // loop (a measurable share of a request).
            None => {
                let trace = parent_trace.unwrap_or_else(|| rng.random::<u128>().max(1).into());
                (trace, rng.random::<u64>().max(1).into())
            }
        };
        let trace = Trace {
            trace_id,
            span_id,
            parent_id,
            sampled,
        };
        if let Some(value) = trace.traceparent() {
            match entry {
                Entry::Occupied(mut caller) => {
                    caller.insert(value);
                }
                Entry::Vacant(none) => {
                    none.insert(value);
                }
            }
        }
        (trace, span)
    }

    /// `traceparent` for the upstream: this hop's span as its parent.
    fn traceparent(&self) -> Option<HeaderValue> {
        // Written by hand on the stack: every request sends one, and
        // `write!` of the two ids was 5 % of a proxied request's
        // instructions (docs/benchmarks.md).
        let mut value = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex_into(&mut value[3..35], &self.trace_id.to_bytes());
        hex_into(&mut value[36..52], &self.span_id.to_bytes());
        value[54] = if self.sampled { b'1' } else { b'0' };
        HeaderValue::from_bytes(&value).ok()
    }
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// `bytes` as lower-case hex into `out` (twice as long), a byte's two
/// digits at a time.
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
    }
}

/// Each byte's two lower-case hex digits.
static HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0; 2]; 256];
    let mut b = 0;
    while b < 256 {
        pairs[b] = [DIGITS[b >> 4], DIGITS[b & 0xf]];
        b += 1;
    }
    pairs
};

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot export spans to {endpoint}: {reason} (give an OTLP/gRPC collector as http://HOST:4317)"
)]
pub struct SpansError {
    endpoint: String,
    reason: String,
}

/// Request spans exported over OTLP/gRPC: one SERVER span per sampled
/// request, in batches from the SDK's own thread (its queue is bounded:
/// when the collector is slow, spans are dropped, never requests).
#[derive(Clone)]
pub struct Spans {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
}

impl std::fmt::Debug for Spans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Spans")
    }
}

impl Spans {
    /// Spans to the collector at `endpoint`, as service `weft-waypoint`
    /// with the waypoint's key. Needs a tokio runtime: the gRPC channel's
    /// task runs on it.
    pub fn export_to(endpoint: &str, waypoint: &str) -> Result<Spans, SpansError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| SpansError {
                endpoint: endpoint.to_owned(),
                reason: e.to_string(),
            })?;
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name("weft-waypoint")
            .with_attribute(KeyValue::new("weft.waypoint", waypoint.to_owned()))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        use opentelemetry::trace::TracerProvider as _;
        let tracer = provider.tracer("weft-waypoint");
        Ok(Spans { tracer, provider })
    }

    /// Starts this hop's span (the request is sampled): in the caller's
    /// trace when there is one, else in a new one. It is named when it
    /// ends, once the route is known.
    fn start(&self, parent: Option<(TraceId, SpanId)>) -> Span {
        let remote = parent.map(|(t, p)| {
            let context = SpanContext::new(t, p, TraceFlags::SAMPLED, true, TraceState::default());
            opentelemetry::Context::new().with_remote_span_context(context)
        });
        self.tracer
            .span_builder("request")
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &remote.unwrap_or_default())
    }

    /// Sends what is queued and stops the exporter (blocks: call it off
    /// the data path).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            warn!(error = %e, "spans not all exported at shutdown");
        }
    }
}

/// Ends a request's span with what its record knows (OpenTelemetry HTTP
/// server conventions; weft's own fields under `weft.`).
fn end_span(mut span: Span, r: &Record) {
    span.update_name(match &r.route {
        None => r.method.to_string(),
        Some(route) => format!("{} {}", r.method, route.key),
    });
    let mut attributes = vec![
        KeyValue::new("http.request.method", r.method.to_string()),
        KeyValue::new("url.path", r.path().to_owned()),
        KeyValue::new("http.response.status_code", i64::from(r.status)),
        KeyValue::new("http.route", r.route_key().to_owned()),
        KeyValue::new("network.protocol.name", r.protocol),
        KeyValue::new("weft.response_flags", r.flag),
        KeyValue::new("weft.destination_service", r.destination().to_owned()),
        KeyValue::new("weft.source_principal", r.source.principal.clone()),
    ];
    if let Some(g) = &r.grpc_status {
        attributes.push(KeyValue::new("rpc.grpc.status_code", g.clone()));
    }
    span.set_attributes(attributes);
    if r.status >= 500 {
        span.set_status(Status::error(r.flag));
    }
    span.end();
}

/// `00-<32 hex>-<16 hex>-<2 hex>`, not all-zero ids: (trace id, parent
/// span id, sampled).
fn parse_traceparent(v: &str) -> Option<(TraceId, SpanId, bool)> {
    let mut parts = v.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // W3C: exactly so many lower-case hex digits (`from_hex` alone would
    // take fewer, upper case, or a sign).
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = parts.next().is_none()
        && hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2);
    if !valid {
        return None;
    }
    let trace = TraceId::from_hex(trace)
        .ok()
        .filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span)
        .ok()
        .filter(|s| *s != SpanId::INVALID)?;
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    Some((trace, span, sampled))
}

/// Everything one request's log line and metrics say.
#[derive(Debug)]
pub struct Record {
    pub started: Instant,
    pub method: Method,
    /// The path as the client sent it (its query, if any, is not logged).
    pub path: Option<PathAndQuery>,
    pub source: Arc<SourceLabels>,
    pub trace: Trace,
    /// The request body's bytes as they pass to the upstream ([`tallied`];
    /// `None`: it had none).
    pub request_bytes: Option<Arc<AtomicU64>>,
    pub protocol: &'static str,
    /// The route that served the request, if one did.
    pub route: Option<Arc<Route>>,
    /// `None`: unknown (the request was refused before it had one).
    pub destination_service: Option<Arc<str>>,
    pub status: u16,
    pub grpc_status: Option<String>,
    pub flag: &'static str,
    pub response_bytes: u64,
    /// The exported span of a sampled request (when spans are exported),
    /// boxed: a record moves several times and few requests have one.
    pub span: Option<Box<Span>>,
    finished: bool,
}

impl Record {
    pub fn new(
        (method, path): (Method, Option<PathAndQuery>),
        source: Arc<SourceLabels>,
        trace: Trace,
        protocol: &'static str,
    ) -> Record {
        Record {
            started: Instant::now(),
            method,
            path,
            source,
            trace,
            request_bytes: None,
            protocol,
            route: None,
            destination_service: None,
            status: 0,
            grpc_status: None,
            flag: "-",
            response_bytes: 0,
            span: None,
            finished: false,
        }
    }

    /// The path, as `Uri::path` gives it (empty for a request without
    /// one, such as a CONNECT).
    pub fn path(&self) -> &str {
        self.path.as_ref().map_or("", |p| p.path())
    }

    pub fn destination(&self) -> &str {
        self.destination_service.as_deref().unwrap_or("unknown")
    }

    /// The serving route's key, `-` when none did.
    pub fn route_key(&self) -> &str {
        self.route.as_ref().map_or("-", |r| &r.key)
    }

    fn write(&mut self) {
        if let Some(span) = self.span.take() {
            end_span(*span, self);
        }
        let secs = self.started.elapsed().as_secs_f64();
        let s = &self.source;
        let h = s.handles(self);
        h.requests.increment(1);
        h.duration.record(secs);
        let request_bytes = self
            .request_bytes
            .as_ref()
            .map_or(0, |n| n.load(Ordering::Relaxed));
        h.request_bytes.increment(request_bytes);
        h.response_bytes.increment(self.response_bytes);
        let grpc = self.grpc_status.as_deref().unwrap_or("-");
        info!(
            method = %self.method, path = self.path(), client = %s.principal,
            status = self.status, grpc_status = %grpc, route = self.route_key(),
            backend = self.destination(), response_flags = self.flag,
            request_bytes, response_bytes = self.response_bytes,
            duration_ms = (secs * 1000.0) as u64, trace_id = %self.trace.trace_id,
            span_id = %self.trace.span_id, "request"
        );
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.finished && self.flag == "-" {
            self.flag = "DC"; // the client went away before the answer ended
        }
        self.write();
    }
}

/// What a body's poll gave.
type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

/// A body passed on unchanged, each poll shown to `seen` first (with
/// whether the body has ended).
pub struct Observed<B, F> {
    inner: B,
    seen: F,
}

impl<B, F> hyper::body::Body for Observed<B, F>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    F: FnMut(&Polled, bool) + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map(|f| f.map(|f| f.map_err(Into::into)));
        let ended = this.inner.is_end_stream() || matches!(polled, Poll::Ready(None));
        (this.seen)(&polled, ended);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that counts what it carries and writes its request's
/// record when it ends (or is dropped).
pub fn counted(inner: Body, mut record: Record) -> Body {
    if inner.is_end_stream() {
        record.finished = true;
    }
    let mut record = Some(record);
    let seen = move |polled: &Polled, ended: bool| {
        let Some(r) = record.as_mut() else { return };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    r.response_bytes += data.len() as u64;
                }
                if let Some(t) = frame.trailers_ref()
                    && let Some(g) = t.get(&GRPC_STATUS).and_then(|v| v.to_str().ok())
                {
                    r.grpc_status = Some(g.to_owned());
                }
            }
            Poll::Ready(Some(Err(_))) => r.flag = "UC",
            Poll::Ready(None) | Poll::Pending => {}
        }
        if ended && let Some(mut r) = record.take() {
            r.finished = true; // written as it drops
        }
    };
    Observed { inner, seen }.boxed()
}

/// A request body that counts the bytes the client sends as they pass on
/// (a body sent again on a retry is counted once, where it is kept).
pub fn tallied<B>(inner: B, count: Arc<AtomicU64>) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let seen = move |polled: &Polled, _| {
        if let Poll::Ready(Some(Ok(frame))) = polled
            && let Some(data) = frame.data_ref()
        {
            count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    };
    Observed { inner, seen }.boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_collector_address_that_is_no_url_is_refused() {
        let e = Spans::export_to("not a url", "ns/wp").expect_err("refused");
        assert!(e.to_string().contains("http://HOST:4317"), "{e}");
        let spans = Spans::export_to("http://127.0.0.1:4317", "ns/wp").expect("lazy");
        // No collector there: nothing waits on it.
        tokio::task::spawn_blocking(move || spans.shutdown())
            .await
            .expect("shut down");
    }

    #[test]
    fn traces_continue_or_start() {
        let mut h = HeaderMap::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", parent.parse().expect("value"));
        let (t, _) = Trace::continue_or_start(&mut h, 0.0, None);
        assert_eq!(t.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            t.parent_id.map(|p| p.to_string()).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert!(t.sampled, "the caller's decision is kept");
        let sent = h["traceparent"].to_str().expect("ascii").to_owned();
        assert_eq!(sent, format!("00-{}-{}-01", t.trace_id, t.span_id));
        assert_ne!(t.span_id.to_string(), "00f067aa0ba902b7");
        // A started trace sends what a next hop parses back, unsampled too.
        for ratio in [0.0, 1.0] {
            let mut h = HeaderMap::new();
            let (t, _) = Trace::continue_or_start(&mut h, ratio, None);
            let sent = h["traceparent"].to_str().expect("ascii");
            assert_eq!(sent.len(), 55, "{sent}");
            assert_eq!(
                parse_traceparent(sent),
                Some((t.trace_id, t.span_id, ratio == 1.0)),
                "{sent}"
            );
        }
        for bad in [
            "junk",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", bad.parse().expect("value"));
            let (t, _) = Trace::continue_or_start(&mut h, 1.0, None);
            assert!(
                t.parent_id.is_none() && t.sampled,
                "{bad}: a new sampled trace"
            );
        }
    }
}
