//! Restarts without a gap: a new ztunnel takes over the old one's
//! listening sockets, so no captured connection attempt is refused or reset
//! while one process replaces the other.
//!
//! The running ztunnel listens on a unix seqpacket socket in its state
//! directory. A new one, starting, connects and says `take`; the old one
//! sends every listening socket it has (SCM_RIGHTS: the node's admin,
//! metrics, readiness and SOCKS5 listeners, then each enrolled pod's three)
//! and `done`. The new one serves them — the same kernel sockets, so
//! connections queued meanwhile are simply accepted by whichever process
//! asks first — and says `taken`: only then does the old one stop
//! accepting and drain (its live connections finish up to the drain
//! deadline; HBONE peers get GOAWAY and reconnect, to the new one). If the
//! new one fails before `taken`, the old one keeps serving as if nothing
//! happened.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_seqpacket::ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage};
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::pods::{PodSpec, Pods};

/// Where a ztunnel offers its sockets: beside its persisted state.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("handover.sock")
}

/// How long the old process waits for the new one to say `taken` (it may
/// be waiting for its first config and certificates).
const TAKE_WAIT: Duration = Duration::from_secs(60);
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Message {
    Take,
    /// One node listener (one fd).
    Node {
        name: String,
    },
    /// One pod and its listeners (three fds: outbound, inbound plaintext,
    /// HBONE).
    Pod {
        spec: PodSpec,
    },
    Done,
    Taken,
}

/// The node-level listeners a ztunnel hands over, by name (`admin`,
/// `metrics`, `ready`, `socks5`): duplicates of the sockets it serves.
pub type NodeListeners = Vec<(&'static str, OwnedFd)>;

/// What a new ztunnel received from the old one.
pub struct Taken {
    conn: UnixSeqpacket,
    pub node: HashMap<String, OwnedFd>,
    pub pods: Vec<(PodSpec, [OwnedFd; 3])>,
}

impl Taken {
    /// Tells the old process everything is served here: it stops accepting
    /// and drains.
    pub async fn finish(self) -> std::io::Result<()> {
        send(&self.conn, &Message::Taken, &[]).await
    }
}

async fn send(conn: &UnixSeqpacket, msg: &Message, fds: &[&OwnedFd]) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let mut buffer = [0u8; 128];
    let mut ancillary = AncillaryMessageWriter::new(&mut buffer);
    if !fds.is_empty() {
        ancillary.add_fds(fds.iter().map(|f| f.as_fd()).collect::<Vec<_>>())?;
    }
    conn.send_with_ancillary(&body, &mut ancillary).await?;
    Ok(())
}

async fn recv(conn: &UnixSeqpacket) -> std::io::Result<(Message, Vec<OwnedFd>)> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut buffer = [0u8; 128];
    let (info, ancillary) = conn.recv_with_ancillary(&mut body, &mut buffer).await?;
    if info.bytes_read() == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let mut fds = Vec::new();
    for m in ancillary.into_messages() {
        if let OwnedAncillaryMessage::FileDescriptors(got) = m {
            fds.extend(got);
        }
    }
    let msg = serde_json::from_slice(&body[..info.bytes_read()])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok((msg, fds))
}

/// Asks a running ztunnel for its sockets; `None` when none is running.
pub async fn take(path: &Path) -> std::io::Result<Option<Taken>> {
    let conn = match UnixSeqpacket::connect(path).await {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    send(&conn, &Message::Take, &[]).await?;
    let mut taken = Taken {
        conn,
        node: HashMap::new(),
        pods: Vec::new(),
    };
    loop {
        let (msg, fds) = recv(&taken.conn).await?;
        let bad = || std::io::Error::other("handover: message without its sockets");
        match msg {
            Message::Node { name } => {
                let fd = fds.into_iter().next().ok_or_else(bad)?;
                taken.node.insert(name, fd);
            }
            Message::Pod { spec } => {
                let fds: [OwnedFd; 3] = fds.try_into().map_err(|_| bad())?;
                taken.pods.push((spec, fds));
            }
            Message::Done => break,
            other => {
                return Err(std::io::Error::other(format!(
                    "handover: unexpected {other:?}"
                )));
            }
        }
    }
    info!(
        pods = taken.pods.len(),
        listeners = taken.node.len(),
        "took over the running ztunnel's sockets"
    );
    Ok(Some(taken))
}

/// Offers this ztunnel's sockets at `path` until `stop`; `taken` fires once
/// a successor serves them.
pub async fn offer(
    path: PathBuf,
    node: NodeListeners,
    pods: Pods,
    taken: CancellationToken,
    stop: CancellationToken,
) {
    let _ = std::fs::remove_file(&path);
    let mut listener = match UnixSeqpacketListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot offer sockets for a restart; a restart will refuse connections briefly");
            return;
        }
    };
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = listener.accept() => match c { Ok(c) => c, Err(_) => continue },
        };
        match give(&conn, &node, &pods).await {
            Ok(()) => {
                info!("a new ztunnel serves this one's sockets; draining");
                taken.cancel();
                return;
            }
            Err(e) => warn!(error = %e, "handover abandoned; still serving"),
        }
    }
}

async fn give(conn: &UnixSeqpacket, node: &NodeListeners, pods: &Pods) -> std::io::Result<()> {
    match recv(conn).await? {
        (Message::Take, _) => {}
        (other, _) => {
            return Err(std::io::Error::other(format!(
                "expected take, got {other:?}"
            )));
        }
    }
    for (name, fd) in node {
        let msg = Message::Node {
            name: (*name).to_owned(),
        };
        send(conn, &msg, &[fd]).await?;
    }
    for (spec, fds) in pods.listeners()? {
        let fds: Vec<&OwnedFd> = fds.iter().collect();
        send(conn, &Message::Pod { spec }, &fds).await?;
    }
    send(conn, &Message::Done, &[]).await?;
    match tokio::time::timeout(TAKE_WAIT, recv(conn)).await {
        Ok(Ok((Message::Taken, _))) => Ok(()),
        Ok(Ok((other, _))) => Err(std::io::Error::other(format!(
            "expected taken, got {other:?}"
        ))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other("the new ztunnel never said taken")),
    }
}

/// A handed-over listening socket, served on the current runtime.
pub fn listener(fd: OwnedFd) -> std::io::Result<tokio::net::TcpListener> {
    let std = std::net::TcpListener::from(fd);
    std.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(std)
}
