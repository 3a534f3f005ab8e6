//! The pods enrolled on this node: their namespaces, capture rules and
//! listeners, persisted so a restarted ztunnel picks them all up again.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tracing::{info, warn};
use weft_proto::hbone::pool::Dialer;
use weft_proto::identity::Identity;
use weft_proto::listen::Drain;
use weft_proto::model::{Model, Workload};

use crate::netns::Netns;

/// A pod as the enrollment message (and the persisted set) describe it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSpec {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub netns: PathBuf,
    /// The pod's IPs (from the CNI result); empty: take them from config.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

#[derive(Debug)]
pub struct Pod {
    pub spec: PodSpec,
    /// `<namespace>/<name>`: the pod's workload key, made once, not per
    /// connection.
    pub key: String,
    pub netns: Netns,
    pub ips: Vec<IpAddr>,
    pub identity: Identity,
}

impl Pod {
    /// The pod's workload in `model` (gone if the config no longer lists it).
    pub fn workload<'m>(&self, model: &'m Model) -> Option<&'m Arc<Workload>> {
        model.workload_by_key(&self.key)
    }
}

struct Enrolled {
    pod: Arc<Pod>,
    /// Stops the pod's listeners.
    drain: Drain,
    /// The pod's listening sockets (outbound, inbound plaintext, HBONE),
    /// kept to hand over to a successor; closed with the pod.
    listeners: [OwnedFd; 3],
}

/// Cheap to clone.
#[derive(Clone, Default)]
pub struct Pods {
    inner: Arc<Mutex<HashMap<String, Enrolled>>>,
}

impl Pods {
    pub fn get(&self, uid: &str) -> Option<Arc<Pod>> {
        self.lock().get(uid).map(|e| e.pod.clone())
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        self.lock()
            .values()
            .find(|e| e.pod.ips.contains(&ip))
            .map(|e| e.pod.clone())
    }

    pub fn insert(&self, pod: Arc<Pod>, drain: Drain, listeners: [OwnedFd; 3]) {
        let uid = pod.spec.uid.clone();
        let enrolled = Enrolled {
            pod,
            drain,
            listeners,
        };
        self.lock().insert(uid, enrolled);
    }

    /// Every pod with a copy of its listening sockets, to hand over.
    pub fn listeners(&self) -> std::io::Result<Vec<(PodSpec, [OwnedFd; 3])>> {
        let pods = self.lock();
        let mut out = Vec::with_capacity(pods.len());
        for e in pods.values() {
            let [a, b, c] = &e.listeners;
            let fds = [a.try_clone()?, b.try_clone()?, c.try_clone()?];
            out.push((e.pod.spec.clone(), fds));
        }
        Ok(out)
    }

    /// Removes the pod and stops its listeners.
    pub fn remove(&self, uid: &str) -> Option<Arc<Pod>> {
        let e = self.lock().remove(uid)?;
        e.drain.stop();
        Some(e.pod)
    }

    pub fn uses_identity(&self, id: &Identity) -> bool {
        self.lock().values().any(|e| &e.pod.identity == id)
    }

    pub fn specs(&self) -> Vec<PodSpec> {
        let mut v: Vec<_> = self.lock().values().map(|e| e.pod.spec.clone()).collect();
        v.sort_by(|a, b| a.uid.cmp(&b.uid));
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Enrolled>> {
        self.inner.lock().expect("pods poisoned")
    }

    /// Writes the enrolled set (plus `pending` restores) atomically.
    pub fn persist(&self, path: &Path, pending: &[PodSpec]) -> std::io::Result<()> {
        let mut specs = self.specs();
        specs.extend(
            pending
                .iter()
                .filter(|p| !specs.iter().any(|s| s.uid == p.uid))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let json = serde_json::to_vec_pretty(&specs).map_err(std::io::Error::other)?;
        weft_proto::process::write_atomic(path, &json, 0o600)
    }
}

/// Reads the set persisted by a previous run (empty if none).
pub fn load_persisted(path: &Path) -> Vec<PodSpec> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(path = %path.display(), error = %e, "ignoring unreadable enrolled-pod state");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

/// Dials HBONE from inside the source pod's namespace, so the far side sees
/// the pod's own address; without a source pod, from the ztunnel's own.
pub struct PodDialer(pub Pods);

impl Dialer for PodDialer {
    fn dial(
        &self,
        src: Option<IpAddr>,
        dst: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send + '_>> {
        Box::pin(async move {
            let Some(ip) = src else {
                // No source pod: a SOCKS5 client on the node itself.
                return TcpStream::connect(dst).await;
            };
            let pod = self.0.by_ip(ip).ok_or_else(|| {
                std::io::Error::other(format!("no enrolled pod with source address {ip}"))
            })?;
            pod.netns.connect(dst).await
        })
    }
}

pub fn log_enrolled(pod: &Pod) {
    info!(
        pod = %format!("{}/{}", pod.spec.namespace, pod.spec.name),
        uid = %pod.spec.uid,
        identity = %pod.identity,
        ips = ?pod.ips,
        netns = %pod.netns.path().display(),
        "pod enrolled"
    );
}
