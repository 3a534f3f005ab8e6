//! What every connection handler on this node shares.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::sync::watch;
use weft_proto::certs::CertManager;
use weft_proto::hbone::pool::Pool;
use weft_proto::model::Model;

use crate::pods::Pods;

/// Inbound plaintext (port 15006) handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Only HBONE reaches meshed pods (the default).
    Strict,
    /// Plaintext from outside the mesh is accepted, subject to policy.
    Permissive,
}

/// Connection counters, read by /metrics and by tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub inbound_hbone: AtomicU64,
    pub inbound_denied: AtomicU64,
    /// Live connections closed because a policy change now denies them.
    pub inbound_revoked: AtomicU64,
    pub inbound_plaintext: AtomicU64,
    pub plaintext_refused: AtomicU64,
    pub outbound_hbone: AtomicU64,
    pub outbound_passthrough: AtomicU64,
    pub outbound_failed: AtomicU64,
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
}
