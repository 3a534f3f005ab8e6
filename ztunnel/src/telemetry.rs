//! Metrics (labels follow Istio's standard TCP metrics so dashboards port)
//! and the admin, metrics and readiness HTTP endpoints.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::TcpListener;
use tracing::info;
use weft_proto::hbone::Transferred;

pub use weft_proto::process::prometheus;

/// Who talked to whom, as one connection's metrics labels.
pub struct ConnLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_service: String,
    pub security: &'static str,
}

/// One connection's counters, resolved once when it opens (the labels are
/// built and looked up once, not per update).
struct ConnCounters {
    closed: metrics::Counter,
    sent: metrics::Counter,
    received: metrics::Counter,
}

impl ConnLabels {
    /// Counts the connection as opened; returns its other counters.
    fn opened(self) -> ConnCounters {
        let labels = vec![
            metrics::Label::new("reporter", self.reporter),
            metrics::Label::new("source_workload", self.source_workload),
            metrics::Label::new("source_principal", self.source_principal),
            metrics::Label::new("destination_workload", self.destination_workload),
            metrics::Label::new("destination_service", self.destination_service),
            metrics::Label::new("connection_security_policy", self.security),
        ];
        metrics::counter!("weft_tcp_connections_opened_total", labels.clone()).increment(1);
        ConnCounters {
            closed: metrics::counter!("weft_tcp_connections_closed_total", labels.clone()),
            sent: metrics::counter!("weft_tcp_sent_bytes_total", labels.clone()),
            received: metrics::counter!("weft_tcp_received_bytes_total", labels),
        }
    }
}

impl ConnCounters {
    /// `sent`/`received` from the point of view of the reporting workload's
    /// peer-facing side: bytes the source sent and received.
    fn closed(&self, sent: u64, received: u64) {
        self.closed.increment(1);
        self.sent.increment(sent);
        self.received.increment(received);
    }
}

/// One connection's telemetry, written once. `opened` counts it when its
/// tunnel is up; when the record is dropped — however the connection
/// ended, a task cut at the drain deadline included — the closed counters
/// and the one access-log line are written, with what was copied so far.
pub struct ConnRecord {
    direction: &'static str,
    pub src_identity: Option<String>,
    pub src_addr: SocketAddr,
    pub dst_identity: Option<String>,
    pub dst_addr: SocketAddr,
    pub dst_workload: Option<String>,
    /// `mutual_tls` once the peer proved an identity (or the tunnel is up).
    pub security: &'static str,
    started: Instant,
    counters: Option<ConnCounters>,
    /// What the copy moved: (initiator → target, target → initiator).
    pub moved: Transferred,
    outcome: Option<(String, &'static str)>,
}

/// The response flag of a connection whose task ended before it did (cut
/// at the drain deadline): Envoy's "duration limit reached".
pub const CUT_SHORT: &str = "DT";

impl ConnRecord {
    pub fn inbound(src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        Self::new("inbound", src_addr, dst_addr)
    }

    pub fn outbound(src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        Self::new("outbound", src_addr, dst_addr)
    }

    fn new(direction: &'static str, src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        ConnRecord {
            direction,
            src_identity: None,
            src_addr,
            dst_identity: None,
            dst_addr,
            dst_workload: None,
            security: "none",
            started: Instant::now(),
            counters: None,
            moved: Transferred::default(),
            outcome: None,
        }
    }

    /// The tunnel is up: counted as opened under `labels`.
    pub fn opened(&mut self, labels: ConnLabels) {
        self.security = labels.security;
        self.counters = Some(labels.opened());
    }

    /// How the connection ended, with its response flag (`-`: fine).
    pub fn finish(&mut self, reason: impl Into<String>, flag: &'static str) {
        self.outcome = Some((reason.into(), flag));
    }
}

impl Drop for ConnRecord {
    fn drop(&mut self) {
        let (forward, back) = self.moved.get();
        if let Some(c) = &self.counters {
            c.closed(forward, back);
        }
        let (reason, flags) = self.outcome.take().unwrap_or_else(|| {
            let cut = "cut short: closed by the ztunnel (drain deadline or shutdown)";
            (cut.to_owned(), CUT_SHORT)
        });
        // Bytes from the reporting side's view: an inbound connection
        // received what its initiator sent.
        let (sent, received) = match self.direction {
            "inbound" => (back, forward),
            _ => (forward, back),
        };
        let none = || "-".to_owned();
        info!(
            target: "access",
            direction = self.direction,
            src.identity = %self.src_identity.clone().unwrap_or_else(none),
            src.addr = %self.src_addr,
            dst.identity = %self.dst_identity.clone().unwrap_or_else(none),
            dst.addr = %self.dst_addr,
            dst.workload = %self.dst_workload.clone().unwrap_or_else(none),
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = self.started.elapsed().as_millis() as u64,
            security = self.security,
            response_flags = flags,
            reason,
            "connection"
        );
    }
}

pub use weft_proto::telemetry::{Handler, metrics_handler, serve_http};

pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}
