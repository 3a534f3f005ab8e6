//! Doing things inside a pod's network namespace from the node's ztunnel.
//!
//! A socket belongs to the namespace it was created in, whichever thread
//! uses it later. So each pod's namespace gets one worker thread that enters
//! it once and then creates that pod's sockets (listeners, marked upstream
//! sockets) on request; tokio drives them from then on. Tokio's own threads
//! never change namespace: a reused thread in the wrong namespace would be a
//! silent, cross-pod bug. One thread per pod bounds the thread count, and no
//! connection pays for a thread spawn.
//!
//! Only making a socket needs the namespace; connecting it does not. So the
//! thread keeps a few IPv4 sockets made ahead, and a connection takes one
//! without waiting for the thread (which then makes the next in the
//! background): no thread hand-off on a connection's path.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Mark on the ztunnel's own sockets inside pods; capture rules let them pass.
pub const MARK: u32 = 0x539;

type Job = Box<dyn FnOnce() + Send>;

/// A handle on a network namespace and its worker thread; the thread ends
/// when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Netns {
    path: PathBuf,
    jobs: std::sync::mpsc::Sender<Job>,
    spare: Arc<Spare>,
}

/// IPv4 sockets made ahead in the namespace, marked, for connections.
#[derive(Debug, Default)]
struct Spare {
    sockets: Mutex<Vec<Socket>>,
    /// A refill is queued on the namespace's thread.
    refilling: AtomicBool,
}

/// Sockets kept made ahead per namespace.
const SPARE_SOCKETS: usize = 8;

/// A socket for a connection from inside the namespace, marked so capture
/// lets it through instead of looping it back into the ztunnel. Must run
/// on the namespace's thread.
fn marked_socket(ipv4: bool) -> io::Result<Socket> {
    let domain = if ipv4 { Domain::IPV4 } else { Domain::IPV6 };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_mark(MARK)?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

impl Netns {
    /// Opens the namespace and starts its worker (which enters it once).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", path.display())))?;
        let fd: OwnedFd = file.into();
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let (entered_tx, entered) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("weft-netns".into())
            .spawn(move || {
                let entered = setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered);
                if ok {
                    while let Ok(job) = queue.recv() {
                        job();
                    }
                }
            })?;
        entered
            .recv()
            .map_err(|_| io::Error::other("netns worker died"))?
            .map_err(|e| {
                io::Error::new(e.kind(), format!("enter netns {}: {e}", path.display()))
            })?;
        let netns = Netns {
            path: path.to_owned(),
            jobs,
            spare: Arc::default(),
        };
        netns.refill();
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on this namespace's worker thread. Keep `f` short (socket
    /// creation, a quick command): the pod's other requests queue behind it.
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns worker stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("netns worker dropped the request (it panicked)"))?
    }

    /// A listener inside the namespace.
    pub async fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let std = self
            .run(move || {
                let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                s.set_reuse_address(true)?;
                s.bind(&addr.into())?;
                s.listen(1024)?;
                s.set_nonblocking(true)?;
                Ok(std::net::TcpListener::from(s))
            })
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("listen on {addr} in {}: {e}", self.path.display()),
                )
            })?;
        TcpListener::from_std(std)
    }

    /// A connection from inside the namespace, marked so capture lets it
    /// through instead of looping it back into the ztunnel.
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let ipv4 = dst.is_ipv4();
        let spare = ipv4
            .then(|| self.spare.sockets.lock().expect("poisoned").pop())
            .flatten();
        let socket = match spare {
            Some(s) => s,
            None => self.run(move || marked_socket(ipv4)).await?,
        };
        if ipv4 {
            self.refill();
        }
        let socket = std::net::TcpStream::from(OwnedFd::from(socket));
        tokio::net::TcpSocket::from_std_stream(socket)
            .connect(dst)
            .await
    }

    /// Makes spare sockets up to [`SPARE_SOCKETS`] on the namespace's
    /// thread, in the background; one refill queued at a time.
    fn refill(&self) {
        if self.spare.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let spare = self.spare.clone();
        let _ = self.jobs.send(Box::new(move || {
            let missing =
                SPARE_SOCKETS.saturating_sub(spare.sockets.lock().expect("poisoned").len());
            let made: Vec<Socket> = (0..missing)
                .filter_map(|_| marked_socket(true).ok())
                .collect();
            spare.sockets.lock().expect("poisoned").extend(made);
            spare.refilling.store(false, Ordering::Release);
        }));
    }
}

/// The destination a captured connection was headed for (before the
/// nftables redirect).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))
}
