//! The HBONE client: a pool of mTLS HTTP/2 connections keyed by
//! (source identity, destination identity, destination address).
//!
//! - Streams share a connection up to `max_streams_per_connection`; past that
//!   a new connection opens.
//! - One connect in flight per key: concurrent callers for a new key wait for
//!   the first handshake instead of each opening their own.
//! - A connection made under a source certificate that has since been renewed
//!   takes no new streams (its open streams carry on), so new streams always
//!   present the current certificate; nor does one whose own or peer
//!   certificate chain has expired since its handshake.
//! - Idle connections are closed after `idle_timeout`; keepalive pings close
//!   connections to dead peers.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::{Instrument, debug, info_span};

use super::{H2Settings, H2Stream, HboneError, keepalive};
use crate::identity::Identity;
use crate::tls::{self, CertWatch, WorkloadCert};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: Identity,
    pub dst: Identity,
    pub dst_addr: SocketAddr,
    /// The source pod's address when connections must originate from it (a
    /// ztunnel dials from inside the pod's network namespace); pods sharing
    /// an identity still get separate connections, so the far side sees the
    /// true source IP.
    pub src_ip: Option<IpAddr>,
}

/// Makes the TCP connection under an HBONE tunnel.
pub trait Dialer: Send + Sync + 'static {
    fn dial(
        &self,
        src: Option<IpAddr>,
        dst: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send + '_>>;
}

/// Connects from the process's own network namespace.
pub struct DirectDialer;

impl Dialer for DirectDialer {
    fn dial(
        &self,
        _src: Option<IpAddr>,
        dst: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send + '_>> {
        Box::pin(TcpStream::connect(dst))
    }
}

#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub h2: H2Settings,
    pub max_streams_per_connection: usize,
    /// Connections per key that concurrent streams are spread over before
    /// they share one: a busy key uses up to this many (each its own TLS
    /// session, on its own core); a quiet one keeps one. Default: one per
    /// core.
    pub spread: usize,
    pub idle_timeout: Duration,
    /// Bound on waiting for the `CONNECT` response.
    pub response_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            h2: H2Settings::default(),
            max_streams_per_connection: 100,
            spread: std::thread::available_parallelism().map_or(1, |n| n.get()),
            idle_timeout: Duration::from_secs(60),
            response_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters the pool keeps; exported as metrics and read by tests.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub connections_opened: AtomicU64,
    pub connections_evicted: AtomicU64,
}

impl PoolStats {
    /// The metrics these counts are (derived at scrape time).
    pub fn export(&self) {
        use crate::telemetry::export_counter;
        let opened = self.connections_opened.load(Ordering::Relaxed);
        let evicted = self.connections_evicted.load(Ordering::Relaxed);
        export_counter("weft_hbone_connections_opened_total", &[], opened);
        export_counter("weft_hbone_connections_evicted_total", &[], evicted);
    }
}

/// Cheap to clone; all clones share connections.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    settings: PoolSettings,
    dialer: Arc<dyn Dialer>,
    keys: Mutex<HashMap<PoolKey, Arc<KeyConns>>>,
    stats: Arc<PoolStats>,
}

#[derive(Default)]
struct KeyConns {
    conns: Mutex<Vec<Arc<Conn>>>,
    // Held while a new connection is being made for this key.
    connecting: tokio::sync::Mutex<()>,
}

struct Conn {
    sender: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    /// Serial of the source certificate presented in this connection's handshake.
    serial: String,
    /// The server's verified identity.
    peer: Identity,
    /// When either side's certificate chain expires: no new stream after.
    /// (The trust bundle travels with our certificate, so a new bundle
    /// comes with a new serial and a new connection.)
    expires: std::time::SystemTime,
    last_used: Mutex<Instant>,
}

/// Counts a stream against its connection until the stream is dropped.
pub struct StreamGuard(Arc<Conn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        *self.0.last_used.lock().expect("poisoned") = Instant::now();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What to ask the far side for.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// `<destination pod IP>:<port>` (or `<service VIP>:<port>` to a waypoint).
    pub authority: SocketAddr,
    /// `baggage`, `forwarded`, `traceparent`.
    pub headers: HeaderMap,
}

impl Pool {
    /// Must be called inside a tokio runtime (starts the idle sweeper).
    pub fn new(settings: PoolSettings) -> Self {
        Pool::with_dialer(settings, Arc::new(DirectDialer))
    }

    /// A pool whose connections are made by `dialer`.
    pub fn with_dialer(settings: PoolSettings, dialer: Arc<dyn Dialer>) -> Self {
        let inner = Arc::new(PoolInner {
            settings,
            dialer,
            keys: Mutex::new(HashMap::new()),
            stats: Arc::new(PoolStats::default()),
        });
        tokio::spawn(sweep_idle(Arc::downgrade(&inner)));
        Pool { inner }
    }

    pub fn stats(&self) -> Arc<PoolStats> {
        self.inner.stats.clone()
    }

    /// Open connections (for tests and `/debug`).
    pub fn connection_count(&self) -> usize {
        let keys = self.inner.keys.lock().expect("poisoned");
        keys.values()
            .map(|k| {
                let conns = k.conns.lock().expect("poisoned");
                conns
                    .iter()
                    .filter(|c| !c.closed.load(Ordering::Acquire))
                    .count()
            })
            .sum()
    }

    /// Opens a tunnel to `key.dst_addr`, presenting `cert` (which must be
    /// `key.src`'s) and requiring the server to be `key.dst`.
    pub async fn connect(
        &self,
        key: &PoolKey,
        cert: &CertWatch,
        req: ConnectRequest,
    ) -> Result<H2Stream, HboneError> {
        let current = cert
            .borrow()
            .cert()
            .cloned()
            .ok_or_else(|| HboneError::NoCertificate(key.src.to_string()))?;
        match self.connect_once(key, &current, &req).await {
            // The server was going away (a draining or restarted ztunnel):
            // the stream was never processed, so it is safe to send again,
            // on a new connection (RFC 9113 §8.7).
            Err(HboneError::H2(e)) if unprocessed(&e) => {
                self.connect_once(key, &current, &req).await
            }
            other => other,
        }
    }

    async fn connect_once(
        &self,
        key: &PoolKey,
        current: &Arc<WorkloadCert>,
        req: &ConnectRequest,
    ) -> Result<H2Stream, HboneError> {
        let conn = self.checkout(key, current).await?;
        let guard = StreamGuard(conn.clone());
        let sender = conn.sender.clone();
        let request = build_request(req)?;
        let timeout = self.inner.settings.response_timeout;
        let open = async move {
            let mut sender = sender.ready().await?;
            let (response, send) = sender.send_request(request, false)?;
            let response = response.await?;
            Ok::<_, HboneError>((response, send))
        };
        let opened = tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| HboneError::Timeout("CONNECT response"))?;
        let (response, send) = match opened {
            Err(HboneError::H2(e)) if unprocessed(&e) => {
                // No new stream on this connection, for anyone.
                conn.closed.store(true, Ordering::Release);
                return Err(HboneError::H2(e));
            }
            other => other?,
        };
        if response.status() != StatusCode::OK {
            return Err(HboneError::Status(response.status()));
        }
        let peer = Some(conn.peer.clone());
        Ok(H2Stream::new(send, response.into_body(), peer, Some(guard)))
    }

    async fn checkout(
        &self,
        key: &PoolKey,
        cert: &Arc<WorkloadCert>,
    ) -> Result<Arc<Conn>, HboneError> {
        let settings = &self.inner.settings;
        let limit = (settings.max_streams_per_connection, settings.spread.max(1));
        let entry = {
            let mut keys = self.inner.keys.lock().expect("poisoned");
            keys.entry(key.clone()).or_default().clone()
        };
        if let Some(c) = entry.reserve(limit, cert.serial()) {
            return Ok(c);
        }
        let _connecting = entry.connecting.lock().await;
        // Someone may have connected while we waited for the lock.
        if let Some(c) = entry.reserve(limit, cert.serial()) {
            return Ok(c);
        }
        let conn = Arc::new(self.open(key, cert).await?);
        conn.active.store(1, Ordering::Release);
        entry.conns.lock().expect("poisoned").push(conn.clone());
        Ok(conn)
    }

    async fn open(&self, key: &PoolKey, cert: &Arc<WorkloadCert>) -> Result<Conn, HboneError> {
        let settings = &self.inner.settings.h2;
        let addr = key.dst_addr;
        // Pin this handshake to the certificate we checked out with, so the
        // serial recorded below is the one the server saw.
        let config = tls::client_config(
            Some(tls::fixed_cert(cert.clone())),
            tls::Trust::Static(cert.bundle().clone()),
            vec![key.dst.clone()],
        );
        let handshake = async {
            let tcp = self
                .inner
                .dialer
                .dial(key.src_ip, addr)
                .await
                .map_err(|source| HboneError::Connect { addr, source })?;
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(config)
                .connect(tls::server_name(), tcp)
                .await
                .map_err(|e| HboneError::Tls {
                    addr,
                    reason: tls::describe_handshake_error(&e),
                })?;
            let mut builder = h2::client::Builder::new();
            builder
                .initial_window_size(settings.stream_window)
                .initial_connection_window_size(settings.connection_window)
                .max_frame_size(settings.max_frame_size)
                .max_header_list_size(16 * 1024);
            let presented = tls.get_ref().1.peer_certificates();
            let peer = tls::peer_identity(presented).map_err(|e| HboneError::Tls {
                addr,
                reason: e.to_string(),
            })?;
            let expires = tls::chain_not_after(presented)
                .unwrap_or(std::time::UNIX_EPOCH)
                .min(cert.not_after());
            let (sender, connection) = builder.handshake::<_, Bytes>(tls).await?;
            Ok::<_, HboneError>((sender, connection, (peer, expires)))
        };
        let (sender, mut connection, (peer, expires)) =
            tokio::time::timeout(settings.handshake_timeout, handshake)
                .await
                .map_err(|_| HboneError::Timeout("HBONE connection setup"))??;
        self.inner
            .stats
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(AtomicBool::new(false));
        let driver_closed = closed.clone();
        let h2 = settings.clone();
        let span = info_span!("hbone_out", dst.addr = %addr, dst.identity = %key.dst);
        tokio::spawn(
            async move {
                let ka = keepalive(connection.ping_pong(), &h2);
                tokio::select! {
                    r = &mut connection => if let Err(e) = r { debug!(error = %e, "HBONE connection ended") },
                    e = ka => debug!(error = %e, "HBONE peer dead, closing"),
                }
                driver_closed.store(true, Ordering::Release);
            }
            .instrument(span),
        );
        debug!(dst.addr = %addr, dst.identity = %key.dst, "HBONE connection opened");
        Ok(Conn {
            sender,
            active: AtomicUsize::new(0),
            closed,
            serial: cert.serial().to_owned(),
            peer,
            expires,
            last_used: Mutex::new(Instant::now()),
        })
    }
}

impl KeyConns {
    /// Takes a stream slot on the least busy live connection made with the
    /// current certificate, neither side's certificate expired, if one has
    /// room — unless every one is busy and fewer than `spread` exist: then
    /// `None`, and the caller opens another.
    fn reserve(&self, (limit, spread): (usize, usize), serial: &str) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().expect("poisoned");
        conns.retain(|c| !c.closed.load(Ordering::Acquire));
        let now = std::time::SystemTime::now();
        let usable = |c: &&Arc<Conn>| c.serial == serial && now < c.expires;
        let quietest = conns
            .iter()
            .filter(usable)
            .min_by_key(|c| c.active.load(Ordering::Acquire))?;
        if quietest.active.load(Ordering::Acquire) > 0
            && conns.iter().filter(usable).count() < spread
        {
            return None;
        }
        quietest
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| quietest.clone())
    }
}

fn build_request(req: &ConnectRequest) -> Result<Request<()>, HboneError> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(req.authority.to_string())
        .body(())
        .map_err(|e| HboneError::Request(e.to_string()))?;
    *request.headers_mut() = req.headers.clone();
    Ok(request)
}

/// Closes connections idle longer than the timeout. Ends with the pool.
async fn sweep_idle(pool: Weak<PoolInner>) {
    let period = match pool.upgrade() {
        Some(p) => (p.settings.idle_timeout / 2).max(Duration::from_millis(10)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        let idle = pool.settings.idle_timeout;
        let mut evicted = 0u64;
        let mut keys = pool.keys.lock().expect("poisoned");
        keys.retain(|_, entry| {
            let mut conns = entry.conns.lock().expect("poisoned");
            conns.retain(|c| {
                let unused = c.active.load(Ordering::Acquire) == 0
                    && c.last_used.lock().expect("poisoned").elapsed() >= idle;
                let keep = !c.closed.load(Ordering::Acquire) && !unused;
                if !keep {
                    evicted += 1;
                }
                keep
            });
            !conns.is_empty()
        });
        drop(keys);
        if evicted > 0 {
            pool.stats
                .connections_evicted
                .fetch_add(evicted, Ordering::Relaxed);
            debug!(evicted, "HBONE idle connections closed");
        }
    }
}

/// Whether `e` says the server never processed the stream: it was refused,
/// or the connection was going away (GOAWAY) before it was taken.
fn unprocessed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM)
        || (e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR))
}
