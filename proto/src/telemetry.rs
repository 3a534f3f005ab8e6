//! Every metric weft exports, declared once with its help text and unit, so
//! each `/metrics` endpoint says what its series mean (a test runs them
//! through Prometheus' own `promtool check metrics`).
//!
//! An event is counted once. Counts a test or an admin page reads per
//! instance (a listener's handshake failures, a node's denied connections)
//! live in that instance's stats, and their metrics are derived from them
//! when /metrics is scraped ([`export_counter`]); everything else is
//! recorded straight into the registry.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::listen::{Drain, accept_each};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Sets the exported counter `name{labels}` to a per-instance count.
pub fn export_counter(name: &'static str, labels: &[(&'static str, &'static str)], value: u64) {
    metrics::counter!(name, labels).absolute(value);
}

/// Sets the exported gauge `name` to a per-instance value.
pub fn export_gauge(name: &'static str, value: u64) {
    metrics::gauge!(name).set(value as f64);
}

/// Per-instance counts by one label's value (a response flag, a limit):
/// read by tests, exported as one metric at scrape time.
#[derive(Debug, Default)]
pub struct ByLabel(Mutex<BTreeMap<&'static str, u64>>);

impl ByLabel {
    pub fn add(&self, value: &'static str) {
        *self.0.lock().expect("poisoned").entry(value).or_default() += 1;
    }

    pub fn get(&self, value: &str) -> u64 {
        self.0
            .lock()
            .expect("poisoned")
            .get(value)
            .copied()
            .unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.0.lock().expect("poisoned").values().sum()
    }

    /// Exports `name{label=value}` for every value seen.
    pub fn export(&self, name: &'static str, label: &'static str) {
        for (value, n) in self.0.lock().expect("poisoned").iter() {
            export_counter(name, &[(label, value)], *n);
        }
    }
}

/// GET path → (status, content type, body).
pub type Handler = Arc<dyn Fn(&str) -> (StatusCode, &'static str, String) + Send + Sync>;

/// A small HTTP/1.1 server: GET path → (status, content type, body).
pub async fn serve_http(listener: TcpListener, handler: Handler, drain: Drain) {
    accept_each(listener, drain, "http", move |tcp, _peer| {
        let handler = handler.clone();
        async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let (status, content_type, body) = handler(req.uri().path());
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", content_type)
                    .body(body)
                    .unwrap_or_default();
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(64 * 1024)
                .header_read_timeout(std::time::Duration::from_secs(5))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                debug!(error = %e, "admin HTTP connection error");
            }
        }
    })
    .await;
}

/// `/metrics`: the registry, with the per-instance counts `export`
/// derives into it first.
pub fn metrics_handler(export: impl Fn() + Send + Sync + 'static) -> Handler {
    Arc::new(move |path: &str| match path {
        "/metrics" => {
            export();
            let text = crate::process::prometheus().render();
            (StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics\n".to_owned(),
        ),
    })
}

/// (name, unit, help) of every counter.
const COUNTERS: &[(&str, Unit, &str)] = &[
    (
        "weft_certificate_fetch_failures_total",
        Unit::Count,
        "Certificate requests to the CA that failed (retried with backoff).",
    ),
    (
        "weft_certificates_issued_total",
        Unit::Count,
        "Certificates this proxy obtained from the CA.",
    ),
    (
        "weft_controller_certificate_refusals_total",
        Unit::Count,
        "CSRs the CA refused, by gRPC code.",
    ),
    (
        "weft_controller_certificates_issued_total",
        Unit::Count,
        "Certificates the CA signed, the controller's own included.",
    ),
    (
        "weft_controller_config_errors_total",
        Unit::Count,
        "Config input refused: files, REST writes, translations that do not validate.",
    ),
    (
        "weft_controller_incremental_updates_total",
        Unit::Count,
        "Source changes applied pod by pod instead of a full translation.",
    ),
    (
        "weft_controller_nacks_total",
        Unit::Count,
        "Config responses proxies refused (NACK).",
    ),
    (
        "weft_controller_pushed_resources_total",
        Unit::Count,
        "Resources sent on the config stream.",
    ),
    (
        "weft_controller_pushes_total",
        Unit::Count,
        "Responses sent on the config stream.",
    ),
    (
        "weft_controller_rest_refusals_total",
        Unit::Count,
        "REST requests refused, by reason.",
    ),
    (
        "weft_controller_xds_refusals_total",
        Unit::Count,
        "Config-stream requests refused, by reason.",
    ),
    (
        "weft_hbone_abandoned_connects_total",
        Unit::Count,
        "Application connects abandoned because the client reset the stream.",
    ),
    (
        "weft_hbone_bad_requests_total",
        Unit::Count,
        "HBONE streams that were not a well-formed CONNECT.",
    ),
    (
        "weft_hbone_connections_opened_total",
        Unit::Count,
        "HBONE client connections opened by the pool.",
    ),
    (
        "weft_hbone_connections_retired_total",
        Unit::Count,
        "HBONE server connections sent GOAWAY, by reason.",
    ),
    (
        "weft_hbone_handshake_failures_total",
        Unit::Count,
        "HBONE connections refused at TLS: no, bad, foreign or expired certificate, or not TLS.",
    ),
    (
        "weft_hbone_protocol_failures_total",
        Unit::Count,
        "HBONE connections closed on an HTTP/2 error.",
    ),
    (
        "weft_hbone_refusals_total",
        Unit::Count,
        "CONNECT streams refused by the ztunnel, by response flag (NR: 400, DENY: 403, UF: 503).",
    ),
    (
        "weft_hbone_refused_connections_total",
        Unit::Count,
        "HBONE connections closed at once: the listener was at its limit.",
    ),
    (
        "weft_hbone_refused_pending_streams_total",
        Unit::Count,
        "HBONE streams refused: their connection had too many unanswered.",
    ),
    (
        "weft_hbone_connections_accepted_total",
        Unit::Count,
        "HBONE connections accepted by the node's listeners (before TLS).",
    ),
    (
        "weft_hbone_connections_evicted_total",
        Unit::Count,
        "Idle or expired HBONE client connections the pool closed.",
    ),
    (
        "weft_hbone_streams_total",
        Unit::Count,
        "CONNECT streams received on HBONE connections.",
    ),
    (
        "weft_inbound_connections_total",
        Unit::Count,
        "Connections delivered to a pod's application, by transport (hbone, plaintext).",
    ),
    (
        "weft_inbound_denied_total",
        Unit::Count,
        "Inbound connections and tunnels policy denied (HBONE or plaintext).",
    ),
    (
        "weft_inbound_plaintext_refused_total",
        Unit::Count,
        "Plaintext refused at a pod: STRICT mode, or a connection to the capture port itself.",
    ),
    (
        "weft_inbound_revoked_total",
        Unit::Count,
        "Live connections closed because a policy change denies them.",
    ),
    (
        "weft_outbound_connections_total",
        Unit::Count,
        "Outbound connections opened, by transport (hbone, passthrough).",
    ),
    (
        "weft_socks5_connections_total",
        Unit::Count,
        "SOCKS5 connections, by outcome (connected, refused, malformed).",
    ),
    (
        "weft_tcp_connections_failed_total",
        Unit::Count,
        "Outbound connections that failed, by response flag (NR, UH, UF, UT, DPE).",
    ),
    (
        "weft_listener_refusals_total",
        Unit::Count,
        "Connections closed at once: the listener was at its limit.",
    ),
    (
        "weft_outbound_endpoint_retries_total",
        Unit::Count,
        "Service connections tried again on another endpoint.",
    ),
    (
        "weft_tcp_connections_closed_total",
        Unit::Count,
        "Proxied TCP connections closed.",
    ),
    (
        "weft_tcp_connections_opened_total",
        Unit::Count,
        "Proxied TCP connections opened.",
    ),
    (
        "weft_tcp_received_bytes_total",
        Unit::Bytes,
        "Bytes the source side received on proxied connections.",
    ),
    (
        "weft_tcp_sent_bytes_total",
        Unit::Bytes,
        "Bytes the source side sent on proxied connections.",
    ),
    (
        "weft_requests_total",
        Unit::Count,
        "HTTP and gRPC requests a waypoint answered, by source, destination, response code, gRPC status and response flags.",
    ),
    (
        "weft_request_bytes_total",
        Unit::Bytes,
        "Request body bytes sent on to the upstream, by the request labels.",
    ),
    (
        "weft_response_bytes_total",
        Unit::Bytes,
        "Response body bytes a waypoint sent to its clients, by the request labels.",
    ),
    (
        "weft_waypoint_connection_errors_total",
        Unit::Count,
        "Client connections a waypoint closed on a protocol error or a limit.",
    ),
    (
        "weft_waypoint_tunnels_refused_total",
        Unit::Count,
        "Tunnels a waypoint refused: a destination it does not serve.",
    ),
    (
        "weft_waypoint_retries_total",
        Unit::Count,
        "Requests a waypoint tried again (route retry or connect failure).",
    ),
];

/// (name, unit, help) of every gauge.
const GAUGES: &[(&str, Unit, &str)] = &[
    (
        "weft_certificate_expiration_timestamp_seconds",
        Unit::Seconds,
        "When each identity's current certificate expires (Unix time).",
    ),
    (
        "weft_controller_config_problems",
        Unit::Count,
        "Objects the source holds and could not use as written.",
    ),
    (
        "weft_controller_config_version",
        Unit::Count,
        "The config version served.",
    ),
    (
        "weft_controller_connected_proxies",
        Unit::Count,
        "Proxies on the config stream.",
    ),
    (
        "weft_hbone_active_connections",
        Unit::Count,
        "Open HBONE server connections.",
    ),
];

/// (name, unit, help) of every histogram.
const HISTOGRAMS: &[(&str, Unit, &str)] = &[
    (
        "weft_controller_push_latency_seconds",
        Unit::Seconds,
        "From a config change, or a subscription, to the proxy's ACK.",
    ),
    (
        "weft_request_duration_seconds",
        Unit::Seconds,
        "From a request's head to the end of its answer, at the waypoint, by the request labels.",
    ),
];

/// Declares every metric to the installed recorder.
pub fn describe() {
    for (name, unit, help) in COUNTERS {
        describe_counter!(*name, *unit, *help);
    }
    for (name, unit, help) in GAUGES {
        describe_gauge!(*name, *unit, *help);
    }
    for (name, unit, help) in HISTOGRAMS {
        describe_histogram!(*name, *unit, *help);
    }
}
