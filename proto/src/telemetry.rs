//! Every metric weft exports, declared once with its help text and unit, so
//! each `/metrics` endpoint says what its series mean (a test runs them
//! through Prometheus' own `promtool check metrics`).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

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
        "CONNECT streams refused by the ztunnel, by HTTP status.",
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
const HISTOGRAMS: &[(&str, Unit, &str)] = &[(
    "weft_controller_push_latency_seconds",
    Unit::Seconds,
    "From a config change, or a subscription, to the proxy's ACK.",
)];

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
