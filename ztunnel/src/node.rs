//! What every connection handler on this node shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;
use weft_proto::certs::CertManager;
use weft_proto::hbone::pool::Pool;
use weft_proto::model::Model;
use weft_proto::telemetry::{ByLabel, export_counter};

use crate::pods::Pods;

/// Inbound plaintext (port 15006) handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Only HBONE reaches meshed pods (the default).
    Strict,
    /// Plaintext from outside the mesh is accepted, subject to policy.
    Permissive,
}

/// The node's connection counts: read by tests and the admin page; their
/// metrics are derived from them at scrape time ([`Stats::export`]), so
/// each event is counted once.
#[derive(Debug, Default)]
pub struct Stats {
    pub inbound_hbone: AtomicU64,
    /// Plaintext connections policy denied (denied tunnels are the
    /// `DENY` entries of `hbone_refusals`; [`Stats::denied`] adds both).
    pub plaintext_denied: AtomicU64,
    /// Live connections closed because a policy change now denies them.
    pub inbound_revoked: AtomicU64,
    pub inbound_plaintext: AtomicU64,
    pub plaintext_refused: AtomicU64,
    /// HBONE CONNECTs refused, by response flag.
    pub hbone_refusals: ByLabel,
    pub outbound_hbone: AtomicU64,
    pub outbound_passthrough: AtomicU64,
    /// Outbound connections that failed, by response flag.
    pub outbound_failed: ByLabel,
    /// Tunnels to a service endpoint that could not be opened and were
    /// tried again on another endpoint of the same service.
    pub outbound_retried: AtomicU64,
}

/// A metric, its labels, and the count it is.
type Series<'a> = (
    &'static str,
    &'a [(&'static str, &'static str)],
    &'a AtomicU64,
);

impl Stats {
    /// Connections and tunnels policy denied, HBONE or plaintext.
    pub fn denied(&self) -> u64 {
        self.plaintext_denied.load(Ordering::Relaxed) + self.hbone_refusals.get("DENY")
    }

    /// The metrics these counts are.
    pub fn export(&self) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        export_counter("weft_inbound_denied_total", &[], self.denied());
        let series: [Series<'_>; 6] = [
            (
                "weft_inbound_connections_total",
                &[("transport", "hbone")],
                &self.inbound_hbone,
            ),
            (
                "weft_inbound_connections_total",
                &[("transport", "plaintext")],
                &self.inbound_plaintext,
            ),
            ("weft_inbound_revoked_total", &[], &self.inbound_revoked),
            (
                "weft_inbound_plaintext_refused_total",
                &[],
                &self.plaintext_refused,
            ),
            (
                "weft_outbound_connections_total",
                &[("transport", "hbone")],
                &self.outbound_hbone,
            ),
            (
                "weft_outbound_connections_total",
                &[("transport", "passthrough")],
                &self.outbound_passthrough,
            ),
        ];
        for (name, labels, count) in series {
            export_counter(name, labels, get(count));
        }
        export_counter(
            "weft_outbound_endpoint_retries_total",
            &[],
            get(&self.outbound_retried),
        );
        self.hbone_refusals
            .export("weft_hbone_refusals_total", "response_flags");
        self.outbound_failed
            .export("weft_tcp_connections_failed_total", "response_flags");
    }
}

/// Endpoints that refused a tunnel, skipped by service traffic until the
/// config changes (a new model says what is really there).
#[derive(Default)]
pub struct Unavailable {
    /// The model the refusals were seen under (weakly held, so its address
    /// cannot be reused by a later model while compared), and the addresses.
    seen: std::sync::Mutex<(
        std::sync::Weak<Model>,
        std::collections::HashSet<std::net::IpAddr>,
    )>,
}

impl Unavailable {
    pub fn mark(&self, model: &Arc<Model>, ip: std::net::IpAddr) {
        let mut seen = self.seen.lock().expect("poisoned");
        if !std::ptr::eq(seen.0.as_ptr(), Arc::as_ptr(model)) {
            *seen = (Arc::downgrade(model), Default::default());
        }
        seen.1.insert(ip);
    }

    pub fn contains(&self, model: &Arc<Model>, ip: &std::net::IpAddr) -> bool {
        let seen = self.seen.lock().expect("poisoned");
        !seen.1.is_empty()
            && std::ptr::eq(seen.0.as_ptr(), Arc::as_ptr(model))
            && seen.1.contains(ip)
    }
}

pub struct Node {
    pub name: String,
    pub trust_domain: String,
    pub mode: Mode,
    /// Refuse outbound connections to destinations outside the mesh.
    pub deny_passthrough: bool,
    pub model: watch::Receiver<Arc<Model>>,
    pub certs: CertManager,
    pub pool: Pool,
    pub pods: Pods,
    pub stats: Stats,
    pub unavailable: Unavailable,
}
