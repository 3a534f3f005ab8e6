//! Node credentials and placement: which node may ask for which identities.
//!
//! Local mode: each node has a token file `<data-dir>/nodes/<node>.token`
//! (0600, 256 random bits). A node authenticates with it and is entitled only
//! to identities of workloads the controller places on that node.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rand::RngCore;
use tokio::sync::watch;
use weft_proto::identity::Identity;
use weft_proto::model::waypoint_proxy_name;

use crate::state::Snapshot;

use crate::ca::{CaError, write_atomic};
use crate::kube_auth::{ProxyReviewer, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node name {0:?} must be 1-253 characters of lowercase letters, digits, '-' and '.'")]
    BadName(String),
    #[error(transparent)]
    Io(#[from] CaError),
}

pub struct Nodes {
    dir: PathBuf,
    // node name → token
    tokens: RwLock<HashMap<String, String>>,
    // node name → identities of workloads placed there by hand (--place)
    placements: RwLock<HashMap<String, HashSet<Identity>>>,
    // the config the controller serves, and what was last derived from it:
    // (its version, node name → meshed identities placed there)
    config: std::sync::OnceLock<watch::Receiver<Arc<Snapshot>>>,
    from_config: RwLock<(u64, Placements)>,
    kubernetes: std::sync::OnceLock<ProxyReviewer>,
}

/// Who asks: the name its config and entitlements go by (a node, or
/// `waypoint.<ns>.<name>`), and, for a proxy that runs as one
/// ServiceAccount and may ask for nothing else (a waypoint in Kubernetes),
/// that account as (namespace, name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub only: Option<(String, String)>,
}

impl Caller {
    pub fn node(name: String) -> Self {
        Caller { name, only: None }
    }

    /// Whether this caller may ask for `identity` at all (placement is
    /// checked apart).
    pub fn may_ask_for(&self, identity: &Identity) -> bool {
        self.only
            .as_ref()
            .is_none_or(|(ns, sa)| identity.namespace() == ns && identity.service_account() == sa)
    }
}

type Placements = HashMap<String, HashSet<Identity>>;

impl Nodes {
    /// Loads every `<node>.token` in `dir` (created if missing).
    pub fn load(dir: &Path) -> Result<Self, NodeError> {
        fs::create_dir_all(dir).map_err(|source| CaError::Io {
            action: "create",
            path: dir.to_owned(),
            source,
        })?;
        let mut tokens = HashMap::new();
        let entries = fs::read_dir(dir).map_err(|source| CaError::Io {
            action: "list",
            path: dir.to_owned(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let (Some(name), Some("token")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            if let Ok(token) = fs::read_to_string(&path) {
                tokens.insert(name.to_owned(), token.trim().to_owned());
            }
        }
        Ok(Nodes {
            dir: dir.to_owned(),
            tokens: RwLock::new(tokens),
            placements: RwLock::new(HashMap::new()),
            config: std::sync::OnceLock::new(),
            from_config: RwLock::new((0, HashMap::new())),
            kubernetes: std::sync::OnceLock::new(),
        })
    }

    /// Registers `node`, making its token on first use; returns the path of
    /// the token file to hand to that node's ztunnel.
    pub fn ensure(&self, node: &str) -> Result<PathBuf, NodeError> {
        check_name(node)?;
        let path = self.token_path(node);
        let mut tokens = self.tokens.write().expect("poisoned");
        if !tokens.contains_key(node) {
            let mut raw = [0u8; 32];
            rand::rng().fill_bytes(&mut raw);
            let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            write_atomic(&path, token.as_bytes(), 0o600)?;
            tokens.insert(node.to_owned(), token);
        }
        Ok(path)
    }

    pub fn token_path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.token"))
    }

    /// The node a bearer token belongs to. Compares against every token in
    /// constant time so timing reveals nothing about valid tokens.
    pub fn authenticate(&self, token: &str) -> Option<String> {
        let tokens = self.tokens.read().expect("poisoned");
        let mut found = None;
        for (node, t) in tokens.iter() {
            if ct_eq(t.as_bytes(), token.as_bytes()) {
                found = Some(node.clone());
            }
        }
        found
    }

    /// Who a gRPC request comes from, by its `authorization: Bearer`
    /// header: a node token, else (Kubernetes) a proxy's ServiceAccount
    /// token. `UNAUTHENTICATED`, `PERMISSION_DENIED` or `UNAVAILABLE`
    /// (logged) with what to do otherwise.
    pub async fn authenticate_request(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Caller, tonic::Status> {
        // Every refusal is logged with its reason and counted.
        let counted = |reason: &'static str| {
            metrics::counter!("weft_controller_auth_refusals_total", "reason" => reason)
                .increment(1);
        };
        let refuse = |why: &str| {
            counted("unauthenticated");
            tracing::warn!(reason = why, "request refused: unauthenticated");
            tonic::Status::unauthenticated(why)
        };
        let header = metadata.get("authorization").ok_or_else(|| {
            refuse("no authorization header; send \"Bearer <token>\" (local mode: <data-dir>/nodes/<node>.token; Kubernetes: the pod's projected ServiceAccount token, audience weft-ca)")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| refuse("authorization header is not \"Bearer <token>\""))?;
        if let Some(node) = self.authenticate(token) {
            return Ok(Caller::node(node));
        }
        let Some(kube) = self.kubernetes.get() else {
            return Err(refuse("node token not recognised"));
        };
        kube.proxy(token).await.map_err(|r| {
            tracing::warn!(reason = %r, "request refused");
            let (label, status): (_, fn(String) -> tonic::Status) = match r {
                Refusal::Unauthenticated(_) => ("unauthenticated", tonic::Status::unauthenticated),
                Refusal::Unavailable(_) => ("api_unreachable", tonic::Status::unavailable),
                Refusal::NotAProxy(_) | Refusal::Forbidden { .. } => {
                    ("not_a_proxy", tonic::Status::permission_denied)
                }
            };
            counted(label);
            status(r.to_string())
        })
    }

    /// Proxies may also present Kubernetes ServiceAccount tokens.
    pub fn accept_kubernetes_tokens(&self, reviewer: ProxyReviewer) {
        let _ = self.kubernetes.set(reviewer);
    }

    /// Replaces the placements that come from config (hand-made ones stay).
    /// Entitlements follow `config`: a node may get certificates for the
    /// meshed workloads the config places on it, derived here (by the CA
    /// side) from the version served when a request asks.
    pub fn follow(&self, config: watch::Receiver<Arc<Snapshot>>) {
        let _ = self.config.set(config);
    }

    /// Whether the config served now places `identity` on `node`.
    fn placed_by_config(&self, node: &str, identity: &Identity) -> bool {
        let Some(config) = self.config.get() else {
            return false;
        };
        let snapshot = config.borrow().clone();
        let placed = |p: &Placements| p.get(node).is_some_and(|s| s.contains(identity));
        {
            let derived = self.from_config.read().expect("poisoned");
            if derived.0 == snapshot.version {
                return placed(&derived.1);
            }
        }
        let mut placements: Placements = HashMap::new();
        for w in snapshot.model.workloads.iter().filter(|w| w.meshed) {
            placements
                .entry(w.node.clone())
                .or_default()
                .insert(w.identity.clone());
        }
        // A waypoint's proxy name is entitled to its identity alone.
        for w in &snapshot.model.waypoints {
            placements
                .entry(waypoint_proxy_name(&w.key))
                .or_default()
                .insert(w.identity.clone());
        }
        let answer = placed(&placements);
        *self.from_config.write().expect("poisoned") = (snapshot.version, placements);
        answer
    }

    /// Records that a workload running as `identity` is scheduled on `node`.
    pub fn place(&self, node: &str, identity: Identity) {
        self.placements
            .write()
            .expect("poisoned")
            .entry(node.to_owned())
            .or_default()
            .insert(identity);
    }

    pub fn entitled(&self, node: &str, identity: &Identity) -> bool {
        let by_hand = self
            .placements
            .read()
            .expect("poisoned")
            .get(node)
            .is_some_and(|s| s.contains(identity));
        by_hand || self.placed_by_config(node, identity)
    }
}

fn check_name(node: &str) -> Result<(), NodeError> {
    let ok = !node.is_empty()
        && node.len() <= 253
        && node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !node.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(NodeError::BadName(node.to_owned()))
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ConfigStore;
    use weft_proto::model::Model;

    fn model(node: &str) -> Model {
        let yaml = format!(
            "workloads:\n  - {{name: web, serviceAccount: web, node: {node}, addresses: [10.0.1.2]}}\n  - {{name: old, serviceAccount: old, node: a, addresses: [10.0.1.3], meshed: false}}\n"
        );
        Model::from_yaml(&yaml, "cluster.local").expect("valid")
    }

    /// The CA reads placements from the config served, version by version:
    /// a workload that moves takes its entitlement with it; an unmeshed one
    /// entitles nothing.
    #[test]
    fn entitlements_follow_the_config_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes = Nodes::load(dir.path()).expect("nodes");
        let store = ConfigStore::new();
        nodes.follow(store.subscribe());
        let id = |sa: &str| Identity::new("cluster.local", "default", sa).expect("id");
        assert!(!nodes.entitled("a", &id("web")), "nothing served yet");
        store.set(model("a"));
        assert!(nodes.entitled("a", &id("web")));
        assert!(!nodes.entitled("b", &id("web")));
        assert!(!nodes.entitled("a", &id("old")), "unmeshed");
        store.set(model("b"));
        assert!(!nodes.entitled("a", &id("web")), "moved away");
        assert!(nodes.entitled("b", &id("web")));
    }
}
