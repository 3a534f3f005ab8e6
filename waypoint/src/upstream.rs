//! HTTP to an endpoint: a new HBONE tunnel under the waypoint's own
//! identity, requiring the endpoint's (SPEC §3), with HTTP/1.1 or HTTP/2
//! on it. Tunnels ride the shared HBONE pool; HTTP/1.1 connections are
//! kept alive and reused per endpoint, and HTTP/2 (gRPC) multiplexes every
//! request to an endpoint over one tunnel.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::either::Either;
use weft_proto::hbone::pool::{ConnectRequest, Pool, PoolKey};
use weft_proto::hbone::{H2Stream, HBONE_PORT, HboneError};
use weft_proto::identity::Identity;
use weft_proto::shards::FastMap;
use weft_proto::tls::CertWatch;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the waypoint sends: streamed from a peer, or made here.
pub type Body = BoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections kept per endpoint.
const IDLE_PER_ENDPOINT: usize = 256;

/// How long a pooled connection may sit unused when the Service's
/// BackendPolicy says nothing (Envoy's and Istio's default too).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// A pooled connection and how long it may stay unused.
struct Pooled<S> {
    sender: S,
    used: Instant,
    idle_timeout: Duration,
}

impl<S> Pooled<S> {
    fn new(sender: S, idle_timeout: Duration) -> Self {
        Pooled {
            sender,
            used: Instant::now(),
            idle_timeout,
        }
    }

    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.used) >= self.idle_timeout
    }
}

/// One endpoint: the pod's application address and who it must be.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub identity: Identity,
}

/// A byte stream to an endpoint: an HBONE tunnel, or plain TCP (the L7
/// engine measured alone).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// How the waypoint reaches endpoints.
enum Transport {
    /// HBONE under the waypoint's identity (always, in the mesh).
    Hbone {
        pool: Pool,
        identity: Identity,
        cert: CertWatch,
    },
    /// Plain TCP: only for measuring the L7 engine on its own.
    Plain,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("tunnel to {0}: {1}")]
    Tunnel(SocketAddr, HboneError),
    #[error("connect {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("HTTP handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
    #[error("request to {0} failed: {1}")]
    Request(SocketAddr, hyper::Error),
}

impl UpstreamError {
    /// Envoy's flag: `UF` upstream connection failure, `UC` the upstream
    /// closed or reset mid-request.
    pub fn flag(&self) -> &'static str {
        match self {
            UpstreamError::Tunnel(..)
            | UpstreamError::Connect(..)
            | UpstreamError::Handshake(..) => "UF",
            UpstreamError::Request(..) => "UC",
        }
    }

    /// Nothing reached the application: safe to try another endpoint.
    pub fn unprocessed(&self) -> bool {
        !matches!(self, UpstreamError::Request(..))
    }
}

/// A connection ready to carry one request; an HTTP/1.1 one goes back
/// to the pool afterwards, to stay there unused at most `Duration`.
pub enum Sender {
    H1(Endpoint, http1::SendRequest<Body>, Duration),
    H2(Endpoint, http2::SendRequest<Body>),
}

pub struct Upstreams {
    transport: Transport,
    /// Oldest parked first: the likeliest to have finished its response.
    idle: Mutex<FastMap<SocketAddr, VecDeque<Pooled<http1::SendRequest<Body>>>>>,
    multiplexed: Mutex<FastMap<SocketAddr, Pooled<http2::SendRequest<Body>>>>,
    /// Requests awaiting a response, per endpoint: counted only for
    /// Services balanced by least request, the one reader.
    pending: Mutex<FastMap<SocketAddr, Arc<AtomicUsize>>>,
}

/// Counts a request as in flight to an endpoint until dropped.
pub struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstreams {
    pub fn new(pool: Pool, identity: Identity, cert: CertWatch) -> Self {
        Self::with(Transport::Hbone {
            pool,
            identity,
            cert,
        })
    }

    /// Endpoints over plain TCP: the L7 engine measured alone (never in
    /// the mesh, where every hop is mTLS).
    pub fn plain() -> Self {
        Self::with(Transport::Plain)
    }

    fn with(transport: Transport) -> Self {
        Upstreams {
            transport,
            idle: Mutex::default(),
            multiplexed: Mutex::default(),
            pending: Mutex::default(),
        }
    }

    /// Marks a request in flight to `addr` until the guard is dropped.
    pub fn busy(&self, addr: SocketAddr) -> Busy {
        let mut pending = self.pending.lock().expect("poisoned");
        let n = pending.entry(addr).or_default().clone();
        n.fetch_add(1, Ordering::Relaxed);
        Busy(n)
    }

    /// Requests in flight to `addr` now.
    pub fn in_flight(&self, addr: SocketAddr) -> usize {
        let pending = self.pending.lock().expect("poisoned");
        pending.get(&addr).map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// A connection to `ep`: an idle or shared one if there is one, else a
    /// new tunnel and handshake. No byte of the request is sent yet, so a
    /// failure here may be retried elsewhere. `idle_timeout`: how long the
    /// connection may then sit unused in the pool.
    pub async fn connect(
        &self,
        ep: &Endpoint,
        h2: bool,
        idle_timeout: Duration,
    ) -> Result<Sender, UpstreamError> {
        if h2 {
            let mut shared = self.multiplexed.lock().expect("poisoned");
            if let Some(p) = shared.get_mut(&ep.addr).filter(|p| !p.sender.is_closed()) {
                p.used = Instant::now();
                p.idle_timeout = idle_timeout;
                return Ok(Sender::H2(ep.clone(), p.sender.clone()));
            }
        } else if let Some(s) = self.take_idle(ep.addr) {
            return Ok(Sender::H1(ep.clone(), s, idle_timeout));
        }
        // Boxed: a tunnel's handshakes make a future of kilobytes that
        // every request's future would otherwise carry (and move) inline.
        Box::pin(self.open(ep, h2, idle_timeout)).await
    }

    /// A new connection to `ep`: tunnel, then the HTTP handshake.
    async fn open(
        &self,
        ep: &Endpoint,
        h2: bool,
        idle_timeout: Duration,
    ) -> Result<Sender, UpstreamError> {
        let io = TokioIo::new(self.tunnel(ep).await?);
        let handshake = |e| UpstreamError::Handshake(ep.addr, e);
        if h2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(handshake)?;
            tokio::spawn(conn);
            self.multiplexed
                .lock()
                .expect("poisoned")
                .insert(ep.addr, Pooled::new(sender.clone(), idle_timeout));
            return Ok(Sender::H2(ep.clone(), sender));
        }
        let (sender, conn) = http1::handshake(io).await.map_err(handshake)?;
        tokio::spawn(conn.with_upgrades());
        Ok(Sender::H1(ep.clone(), sender, idle_timeout))
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock().expect("poisoned");
        let list = idle.get_mut(&addr)?;
        // Closed ones are dropped on the way (expired ones by the sweep,
        // within a second: no clock read per request); one still reading
        // its last response body goes to the back, for later.
        for _ in 0..list.len() {
            let p = list.pop_front()?;
            if p.sender.is_closed() {
                continue;
            }
            if p.sender.is_ready() {
                return Some(p.sender);
            }
            list.push_back(p);
        }
        None
    }

    /// Closes pooled connections unused for longer than their idle
    /// timeout, every second, for as long as the pool exists.
    pub fn close_idle_connections(self: &Arc<Self>) {
        let pool: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep(Instant::now());
            }
        });
    }

    fn sweep(&self, now: Instant) {
        let mut idle = self.idle.lock().expect("poisoned");
        for list in idle.values_mut() {
            list.retain(|p| !p.sender.is_closed() && !p.expired(now));
        }
        idle.retain(|_, list| !list.is_empty());
        drop(idle);
        let mut shared = self.multiplexed.lock().expect("poisoned");
        // Requests in flight hold their own handles: the connection closes
        // once they end.
        shared.retain(|_, p| !p.sender.is_closed() && !p.expired(now));
    }

    /// An HBONE tunnel to `ep` under the waypoint's identity.
    pub async fn tunnel(&self, ep: &Endpoint) -> Result<Box<dyn Io>, UpstreamError> {
        let (pool, identity, cert) = match &self.transport {
            Transport::Hbone {
                pool,
                identity,
                cert,
            } => (pool, identity, cert),
            Transport::Plain => {
                let tcp = tokio::net::TcpStream::connect(ep.addr)
                    .await
                    .map_err(|e| UpstreamError::Connect(ep.addr, e))?;
                let _ = tcp.set_nodelay(true);
                return Ok(Box::new(tcp));
            }
        };
        let key = PoolKey {
            src: identity.clone(),
            dst: ep.identity.clone(),
            dst_addr: SocketAddr::new(ep.addr.ip(), HBONE_PORT),
            src_ip: None,
        };
        let req = ConnectRequest {
            authority: ep.addr,
            headers: http::HeaderMap::new(),
        };
        let stream: H2Stream = pool
            .connect(&key, cert, req)
            .await
            .map_err(|e| UpstreamError::Tunnel(ep.addr, e))?;
        Ok(Box::new(stream))
    }

    /// Sends `req` on `sender`; an HTTP/1.1 connection goes back to the
    /// idle list once it can take another request. The request is handed
    /// to the connection here; what is awaited holds only its answer.
    pub fn send(
        &self,
        sender: Sender,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Incoming>, UpstreamError>> + '_ {
        let (addr, answer, keep) = match sender {
            Sender::H2(ep, mut s) => (ep.addr, Either::Left(s.send_request(req)), None),
            Sender::H1(ep, mut s, idle_timeout) => (
                ep.addr,
                Either::Right(s.send_request(req)),
                Some((s, idle_timeout)),
            ),
        };
        Answer {
            answer,
            keep,
            addr,
            pool: self,
        }
    }

    /// Keeps an HTTP/1.1 connection for reuse once its response body is
    /// read (hyper reports it ready then).
    fn park(&self, addr: SocketAddr, p: Pooled<http1::SendRequest<Body>>) {
        let mut idle = self.idle.lock().expect("poisoned");
        let list = idle.entry(addr).or_default();
        if list.len() < IDLE_PER_ENDPOINT {
            list.push_back(p);
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer to a request on a connection; an HTTP/1.1 connection
    /// is parked with it. A future of its own, not an `async` block: that
    /// would hold the answer's future twice, in every request's future.
    struct Answer<'a, F> {
        #[pin]
        answer: F,
        keep: Option<(http1::SendRequest<Body>, Duration)>,
        addr: SocketAddr,
        pool: &'a Upstreams,
    }
}

impl<F: Future<Output = hyper::Result<Response<Incoming>>>> Future for Answer<'_, F> {
    type Output = Result<Response<Incoming>, UpstreamError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.answer.poll(cx))
            .map_err(|e| UpstreamError::Request(*this.addr, e))?;
        if let Some((s, idle_timeout)) = this.keep.take() {
            this.pool.park(*this.addr, Pooled::new(s, idle_timeout));
        }
        Poll::Ready(Ok(resp))
    }
}
