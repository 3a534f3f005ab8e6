//! Pod enrollment: the unix-socket protocol the CNI plugin (and the demo and
//! tests) speak, and what enrolling a pod does.
//!
//! One JSON object per line, one reply line each:
//! `{"op":"add","uid":"…","namespace":"default","name":"web-1","netns":"/var/run/netns/x","ips":["10.244.1.2"]}`
//! `{"op":"remove","uid":"…"}`, `{"op":"check","uid":"…"}`
//! → `{"ok":true}` or `{"ok":false,"error":"…"}`. A workload that is not meshed is
//! acknowledged and left alone.
//! Lines over 64 KiB, bad JSON and unknown fields get an error reply; the
//! connection stays usable.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tracing::{debug, warn};
use weft_proto::hbone::server::{self, ServerStats};
use weft_proto::hbone::{H2Settings, HBONE_PORT};
use weft_proto::listen::Drain;

use crate::capture::{self, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::inbound::{self, Inbound};
use crate::netns::Netns;
use crate::node::Node;
use crate::outbound;
use crate::pods::{Pod, PodSpec, log_enrolled};

const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Add(PodSpec),
    Remove {
        uid: String,
    },
    /// Is the pod enrolled? (CNI CHECK)
    Check {
        uid: String,
    },
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("no workload {0} in config; cannot tell its identity")]
    UnknownWorkload(String),
    #[error("pod {0} is not enrolled")]
    NotEnrolled(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
}

/// Everything enrollment needs besides the node.
pub struct Enroller {
    pub node: Arc<Node>,
    pub state_file: PathBuf,
    pub hbone_stats: Arc<ServerStats>,
    /// Pod listeners and their connections are tracked by it; each pod's
    /// listeners stop on their own at removal.
    pub drain: Drain,
    /// Restored pods still being retried; persisted with the enrolled ones so
    /// a second restart does not forget them.
    pending: Mutex<Vec<PodSpec>>,
    /// One lock per pod: concurrent requests for the same pod (a runtime
    /// retrying ADD) are taken one after the other, so ADD stays idempotent.
    locks: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Held from reading the set to writing it: two pods changing at once
    /// must not let the older snapshot land last.
    persisting: Mutex<()>,
}

/// Where `weft-cni` records a pod deleted while the ztunnel could not be
/// told: beside the enrollment socket, one empty file per pod UID.
pub fn tombstones(socket: &Path) -> PathBuf {
    socket.with_file_name("deleted")
}

/// A UID that can name a file: the UUIDs and container IDs runtimes use.
pub fn tombstone_name(uid: &str) -> Option<&str> {
    let ok = !uid.is_empty()
        && uid.len() <= 128
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && uid != "-";
    ok.then_some(uid)
}

impl Enroller {
    pub fn new(
        node: Arc<Node>,
        state_file: PathBuf,
        hbone_stats: Arc<ServerStats>,
        drain: Drain,
    ) -> Self {
        Enroller {
            node,
            state_file,
            hbone_stats,
            drain,
            pending: Mutex::new(Vec::new()),
            locks: Mutex::new(Default::default()),
            persisting: Mutex::new(()),
        }
    }

    /// The pod's lock, made on first use; dropped with the pod.
    fn lock_for(&self, uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().expect("poisoned");
        locks.entry(uid.to_owned()).or_default().clone()
    }

    /// Captures the pod's traffic and opens its listeners. Idempotent, also
    /// under concurrent identical requests.
    pub async fn add(&self, spec: PodSpec) -> Result<(), EnrollError> {
        let lock = self.lock_for(&spec.uid);
        let _held = lock.lock().await;
        self.add_locked(spec, None).await
    }

    /// Enrolls a pod a previous ztunnel served, on the listening sockets it
    /// handed over (so nothing queued on them is lost).
    pub async fn adopt(&self, spec: PodSpec, listeners: [OwnedFd; 3]) -> Result<(), EnrollError> {
        let lock = self.lock_for(&spec.uid);
        let _held = lock.lock().await;
        self.add_locked(spec, Some(listeners)).await
    }

    /// Closes the pod's listeners and deletes its capture table.
    pub async fn remove(&self, uid: &str) -> Result<(), EnrollError> {
        let lock = self.lock_for(uid);
        let held = lock.lock().await;
        let result = self.remove_locked(uid).await;
        drop(held);
        let mut locks = self.locks.lock().expect("poisoned");
        // Forget the lock unless another request for this pod holds or waits on it.
        if locks.get(uid).is_some_and(|l| Arc::strong_count(l) <= 2) {
            locks.remove(uid);
        }
        result
    }

    async fn add_locked(
        &self,
        spec: PodSpec,
        handed: Option<[OwnedFd; 3]>,
    ) -> Result<(), EnrollError> {
        if self
            .node
            .pods
            .get(&spec.uid)
            .is_some_and(|p| p.spec == spec)
        {
            return Ok(());
        }
        self.remove_locked(&spec.uid).await?;
        let key = format!("{}/{}", spec.namespace, spec.name);
        let workload = self
            .node
            .model
            .borrow()
            .workload(&spec.namespace, &spec.name)
            .cloned()
            .ok_or_else(|| EnrollError::UnknownWorkload(key.clone()))?;
        if !workload.meshed {
            // Not in the mesh: nothing to capture, and the pod may start.
            debug!(pod = key, "workload not meshed; enrollment skipped");
            return Ok(());
        }
        let netns = Netns::open(&spec.netns)?;
        let ips = if spec.ips.is_empty() {
            workload.addresses.clone()
        } else {
            spec.ips.clone()
        };
        // Start the certificate now so the first connection does not wait.
        let cert = self.node.certs.watch(&workload.identity);
        let pod = Arc::new(Pod {
            key: workload.key.clone(),
            spec,
            netns,
            ips,
            identity: workload.identity.clone(),
        });
        let drain = self.drain.child();
        let [out_l, plain_l, hbone_l] = pod_listeners(&pod.netns, handed).await?;
        let kept = [
            out_l.as_fd().try_clone_to_owned()?,
            plain_l.as_fd().try_clone_to_owned()?,
            hbone_l.as_fd().try_clone_to_owned()?,
        ];
        capture::install(&pod.netns).await?;
        let node = &self.node;
        // Known before its listeners accept: a handed-over listener may hold
        // connections already, and their tunnels dial from the pod.
        node.pods.insert(pod.clone(), drain.clone(), kept);
        let (n, p) = (node.clone(), pod.clone());
        self.drain
            .spawn(outbound::serve(n, p, out_l, drain.clone()));
        let (n, p) = (node.clone(), pod.clone());
        self.drain
            .spawn(inbound::serve_plaintext(n, p, plain_l, drain.clone()));
        let handler = Arc::new(Inbound {
            node: node.clone(),
            pod: pod.clone(),
        });
        self.drain.spawn(server::serve(
            hbone_l,
            (cert, node.trust_domain.clone()),
            handler,
            H2Settings::default(),
            self.hbone_stats.clone(),
            drain.clone(),
        ));
        log_enrolled(&pod);
        self.persist();
        Ok(())
    }

    async fn remove_locked(&self, uid: &str) -> Result<(), EnrollError> {
        self.pending
            .lock()
            .expect("poisoned")
            .retain(|p| p.uid != uid);
        let Some(pod) = self.node.pods.remove(uid) else {
            return Ok(());
        };
        let result = capture::remove(&pod.netns).await;
        if !self.node.pods.uses_identity(&pod.identity) {
            self.node.certs.forget(&pod.identity);
        }
        self.persist();
        debug!(uid, "pod removed");
        Ok(result?)
    }

    /// Re-enrolls what a previous run had. A pod deleted while we were down
    /// is dropped: its namespace is gone, `weft-cni` left a tombstone for it
    /// in `tombstones`, or a config that has arrived no longer lists it. Any
    /// other failure is retried in the background, and the pod stays in
    /// the persisted set.
    pub async fn restore(
        self: &Arc<Self>,
        specs: Vec<PodSpec>,
        tombstones: &Path,
        config_in: bool,
    ) {
        for spec in specs {
            let deleted = tombstone_name(&spec.uid).is_some_and(|n| tombstones.join(n).exists());
            let unlisted = config_in
                && self
                    .node
                    .model
                    .borrow()
                    .workload(&spec.namespace, &spec.name)
                    .is_none();
            let why = if !spec.netns.exists() {
                "its namespace is gone"
            } else if deleted {
                "it was deleted while the ztunnel was away"
            } else if unlisted {
                "the config no longer lists it"
            } else {
                ""
            };
            if !why.is_empty() {
                warn!(uid = spec.uid, netns = %spec.netns.display(), reason = why, "not restoring pod");
                if spec.netns.exists()
                    && let Ok(netns) = Netns::open(&spec.netns)
                {
                    let _ = capture::remove(&netns).await; // leave its namespace clean
                }
                continue;
            }
            if let Err(e) = self.add(spec.clone()).await {
                warn!(uid = spec.uid, error = %e, "could not restore pod yet; retrying");
                self.pending.lock().expect("poisoned").push(spec.clone());
                tokio::spawn(self.clone().retry(spec));
            }
        }
        // Every tombstone has done its work: the persisted set now knows.
        if let Ok(dir) = std::fs::read_dir(tombstones) {
            for entry in dir.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        self.persist();
    }

    async fn retry(self: Arc<Self>, spec: PodSpec) {
        let mut delay = Duration::from_millis(100);
        loop {
            tokio::select! {
                _ = self.drain.stopping().cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            let still_pending = self.pending.lock().expect("poisoned").contains(&spec);
            if !still_pending || !spec.netns.exists() {
                break;
            }
            match self.add(spec.clone()).await {
                Ok(()) => break,
                Err(e) => debug!(uid = spec.uid, error = %e, "restore retry failed"),
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        self.pending
            .lock()
            .expect("poisoned")
            .retain(|p| p != &spec);
        self.persist();
    }

    fn persist(&self) {
        let _one_at_a_time = self.persisting.lock().expect("poisoned");
        let pending = self.pending.lock().expect("poisoned").clone();
        if let Err(e) = self.node.pods.persist(&self.state_file, &pending) {
            warn!(path = %self.state_file.display(), error = %e, "cannot persist enrolled pods");
        }
    }
}

/// The pod's outbound, inbound-plaintext and HBONE listeners: the ones a
/// previous ztunnel handed over, or new ones in its namespace.
async fn pod_listeners(
    netns: &Netns,
    handed: Option<[OwnedFd; 3]>,
) -> std::io::Result<[TcpListener; 3]> {
    if let Some([a, b, c]) = handed {
        use crate::handover::listener;
        return Ok([listener(a)?, listener(b)?, listener(c)?]);
    }
    let any = |port| std::net::SocketAddr::from(([0, 0, 0, 0], port));
    Ok([
        netns.listen(any(OUTBOUND_PORT)).await?,
        netns.listen(any(INBOUND_PLAINTEXT_PORT)).await?,
        netns.listen(any(HBONE_PORT)).await?,
    ])
}

/// Serves the enrollment socket (mode 0600) until shutdown.
pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(enroller: Arc<Enroller>, listener: UnixListener) {
    loop {
        let stream = tokio::select! {
            _ = enroller.drain.stopping().cancelled() => return,
            a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
        };
        tokio::spawn(connection(enroller.clone(), stream));
    }
}

async fn connection(enroller: Arc<Enroller>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = String::new();
        // Bounded: a peer that never sends a newline cannot grow this buffer.
        let n = match (&mut reader).take(MAX_LINE + 1).read_line(&mut line).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                return reply_and_close(&mut write, &format!("unreadable request: {e}")).await;
            }
        };
        if n as u64 > MAX_LINE {
            return reply_and_close(&mut write, "request line over 64 KiB").await;
        }
        let reply = match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => Reply {
                ok: false,
                error: Some(format!("bad request: {e}")),
            },
            Ok(req) => {
                let result = match req {
                    Request::Add(spec) => enroller.add(spec).await,
                    Request::Remove { uid } => enroller.remove(&uid).await,
                    Request::Check { uid } => match enroller.node.pods.get(&uid) {
                        Some(_) => Ok(()),
                        None => Err(EnrollError::NotEnrolled(uid)),
                    },
                };
                match result {
                    Ok(()) => Reply {
                        ok: true,
                        error: None,
                    },
                    Err(e) => Reply {
                        ok: false,
                        error: Some(e.to_string()),
                    },
                }
            }
        };
        if send(&mut write, &reply).await.is_err() {
            return;
        }
    }
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await
}

async fn reply_and_close(w: &mut tokio::net::unix::OwnedWriteHalf, error: &str) {
    let _ = send(
        w,
        &Reply {
            ok: false,
            error: Some(error.into()),
        },
    )
    .await;
}

/// Client side, for the CNI plugin, the demo and tests.
pub async fn request(socket: &Path, line: &str) -> std::io::Result<Reply> {
    let stream = UnixStream::connect(socket).await?;
    let (read, mut write) = stream.into_split();
    write.write_all(line.as_bytes()).await?;
    write.write_all(b"\n").await?;
    let mut reply = String::new();
    BufReader::new(read)
        .take(MAX_LINE)
        .read_line(&mut reply)
        .await?;
    serde_json::from_str(&reply).map_err(std::io::Error::other)
}
