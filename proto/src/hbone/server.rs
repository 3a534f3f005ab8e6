//! The HBONE server: TLS accept → peer identity → HTTP/2 → one handler call per
//! `CONNECT` stream.
//!
//! Errors before a stream exists (bad TLS, not HTTP/2, random bytes) close the
//! connection and are counted; a stream that is not a well-formed `CONNECT`
//! is refused with a status and the connection stays up for the others.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{H2Settings, H2Stream, HboneError, keepalive};
use crate::certs;
use crate::identity::Identity;
use crate::listen::Drain;
use crate::telemetry::{ByLabel, export_counter, export_gauge};
use crate::tls;

/// One `CONNECT` stream awaiting the handler's decision. Dropping it without
/// answering resets the stream.
pub struct InboundConnect {
    /// The client's SPIFFE identity, verified during the handshake.
    pub peer: Identity,
    /// Serial of the certificate the client presented (colon-separated hex).
    pub peer_serial: Arc<str>,
    pub peer_addr: SocketAddr,
    /// The listener address the connection arrived on.
    pub local_addr: SocketAddr,
    /// Where the client wants to go (`:authority`).
    pub authority: SocketAddr,
    pub headers: HeaderMap,
    respond: SendResponse<Bytes>,
    body: h2::RecvStream,
    /// A pending-stream slot of its connection, given back with the answer.
    _pending: tokio::sync::OwnedSemaphorePermit,
}

impl InboundConnect {
    /// Answers `200` and returns the tunnelled byte stream.
    pub fn accept(self) -> Result<H2Stream, HboneError> {
        self.accept_with(http::HeaderMap::new())
    }

    /// Answers `200` with `headers` (who answered, in `baggage`) and
    /// returns the tunnelled byte stream.
    pub fn accept_with(mut self, headers: http::HeaderMap) -> Result<H2Stream, HboneError> {
        let mut resp = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("static response is valid");
        *resp.headers_mut() = headers;
        let send = self.respond.send_response(resp, false)?;
        Ok(H2Stream::new(send, self.body, Some(self.peer), None))
    }

    /// Resolves when the client resets the stream before it was answered:
    /// whatever the handler was preparing (an application connect) is
    /// abandoned.
    pub async fn reset(&mut self) -> h2::Reason {
        std::future::poll_fn(|cx| self.respond.poll_reset(cx))
            .await
            .unwrap_or(h2::Reason::CANCEL)
    }

    /// Refuses the tunnel: `401/403` denied by policy, `400` a bad request,
    /// `503` destination unreachable (SPEC §3).
    pub fn refuse(mut self, status: StatusCode) {
        let resp = Response::builder()
            .status(status)
            .body(())
            .expect("static response is valid");
        let _ = self.respond.send_response(resp, true);
    }
}

/// What a listener does with each accepted stream.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, connect: InboundConnect) -> impl Future<Output = ()> + Send;
}

/// Counters a listener keeps; exported as metrics and read by tests.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections: AtomicU64,
    pub active_connections: AtomicU64,
    /// TLS refused: no/bad/foreign/expired certificate, not TLS at all.
    pub handshake_failures: AtomicU64,
    /// TLS fine but not HTTP/2 (e.g. HTTP/1.1 inside TLS), or a protocol error.
    pub protocol_failures: AtomicU64,
    pub streams: AtomicU64,
    /// Streams refused by the server itself (not CONNECT, bad authority).
    pub bad_requests: AtomicU64,
    /// Streams refused because their connection had too many unanswered.
    pub refused_pending: AtomicU64,
    /// Connections closed at once, by the limit the listener was at
    /// (`handshakes`, `connections`).
    pub refused: ByLabel,
}

impl ServerStats {
    /// The metrics these counts are (derived at scrape time).
    pub fn export(&self) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, count) in [
            ("weft_hbone_connections_accepted_total", &self.connections),
            (
                "weft_hbone_handshake_failures_total",
                &self.handshake_failures,
            ),
            (
                "weft_hbone_protocol_failures_total",
                &self.protocol_failures,
            ),
            ("weft_hbone_streams_total", &self.streams),
            ("weft_hbone_bad_requests_total", &self.bad_requests),
            (
                "weft_hbone_refused_pending_streams_total",
                &self.refused_pending,
            ),
        ] {
            export_counter(name, &[], get(count));
        }
        export_gauge(
            "weft_hbone_active_connections",
            get(&self.active_connections),
        );
        self.refused
            .export("weft_hbone_refused_connections_total", "limit");
    }
}

struct PeerCert {
    identity: Identity,
    serial: Arc<str>,
}

/// Counts a connection as active, and holds its slot, until it ends.
struct ActiveGuard {
    stats: Arc<ServerStats>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.stats
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every connection of one listener shares.
struct Shared<H> {
    acceptor: TlsAcceptor,
    handler: Arc<H>,
    settings: H2Settings,
    stats: Arc<ServerStats>,
    /// The listener's own certificate: its trust bundle is what each peer
    /// was checked against.
    own: tls::CertWatch,
    handshakes: Arc<tokio::sync::Semaphore>,
}

impl<H> Shared<H> {
    /// A connection closed at once: the listener is at `limit`.
    fn refuse(&self, peer_addr: SocketAddr, limit: &'static str) {
        self.stats.refused.add(limit);
        warn!(src.addr = %peer_addr, limit, "HBONE connection refused: listener at its limit");
    }
}

/// Serves HBONE as `own`'s identity on `listener`, to clients with a
/// certificate of `trust_domain`, until `drain` stops it; then stops
/// accepting and lets open streams finish (HTTP/2 GOAWAY) within the
/// drain's deadline. Every connection and stream task is the drain's.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    (own, trust_domain): (tls::CertWatch, String),
    handler: Arc<H>,
    settings: H2Settings,
    stats: Arc<ServerStats>,
    drain: Drain,
) {
    let config = tls::server_config(own.clone(), tls::ClientAuth::Required { trust_domain });
    let shared = Arc::new(Shared {
        acceptor: TlsAcceptor::from(config),
        handler,
        handshakes: Arc::new(tokio::sync::Semaphore::new(settings.max_handshakes)),
        settings,
        stats,
        own,
    });
    let limit = ("hbone", shared.settings.max_connections);
    let on_refused = |peer| shared.refuse(peer, "connections");
    let serve = |tcp, peer_addr| {
        let stats = &shared.stats;
        stats.connections.fetch_add(1, Ordering::Relaxed);
        stats.active_connections.fetch_add(1, Ordering::Relaxed);
        let guard = ActiveGuard {
            stats: stats.clone(),
        };
        serve_connection(tcp, peer_addr, shared.clone(), drain.clone(), guard)
    };
    crate::listen::accept_counted(listener, drain.clone(), limit, serve, on_refused).await;
}

async fn serve_connection<H: Handler>(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    shared: Arc<Shared<H>>,
    drain: Drain,
    _guard: ActiveGuard,
) {
    let (stats, settings) = (&shared.stats, &shared.settings);
    let _ = tcp.set_nodelay(true);
    let Ok(local_addr) = tcp.local_addr() else {
        return;
    };
    let Ok(handshaking) = shared.handshakes.clone().try_acquire_owned() else {
        return shared.refuse(peer_addr, "handshakes");
    };
    // A pod just enrolled may still be fetching its first certificate: the
    // client waits for it (bounded), as it would for a slow handshake,
    // rather than being refused for a moment nobody can see. The roots
    // this peer is checked against come with it: a new bundle retires it.
    let roots = match certs::first_cert(shared.own.clone(), settings.handshake_timeout).await {
        Ok(own) => Some(own.bundle().clone()),
        Err(reason) => {
            return handshake_failed(stats, &format!("no certificate to present: {reason}"));
        }
    };
    // Phase 1: TLS. A failure here means the client never proved an identity.
    let handshake = shared.acceptor.accept(tcp);
    let tls = match tokio::time::timeout(settings.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return handshake_failed(stats, &tls::describe_handshake_error(&e)),
        Err(_) => return handshake_failed(stats, "handshake timed out"),
    };
    let peer = match tls::peer_identity_and_serial(tls.get_ref().1.peer_certificates()) {
        Ok((identity, serial)) => PeerCert {
            identity,
            serial: serial.into(),
        },
        Err(e) => return handshake_failed(stats, &e.to_string()),
    };
    // The peer's chain was checked once, at the handshake: the connection
    // takes no stream past its earliest expiry.
    let expires = tls::chain_not_after(tls.get_ref().1.peer_certificates())
        .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
        .unwrap_or_default();
    // Phase 2: HTTP/2 preface and settings.
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(16 * 1024);
    let handshake = builder.handshake::<_, Bytes>(tls);
    let conn = match tokio::time::timeout(settings.handshake_timeout, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return protocol_failed(stats, &e.to_string()),
        Err(_) => return protocol_failed(stats, "HTTP/2 preface timed out"),
    };
    drop(handshaking);
    debug!(src.identity = %peer.identity, "HBONE connection established");
    let trust = Trusted {
        expires,
        roots,
        own: shared.own.clone(),
    };
    let from = (peer_addr, local_addr);
    serve_streams(conn, &shared, &peer, from, trust, drain).await;
}

/// How long a connection's peer stays trusted: until its chain expires, or
/// until the roots it was checked against are no longer ours.
struct Trusted {
    expires: std::time::Duration,
    roots: Option<Arc<tls::TrustBundle>>,
    own: tls::CertWatch,
}

/// The bundle the listener checks peers against now: shared, not copied,
/// per connection.
fn roots_of(own: &tls::CertWatch) -> Option<Arc<tls::TrustBundle>> {
    own.borrow().cert().map(|c| c.bundle().clone())
}

/// Whether `now` trusts other roots than `then` (a renewal under the same
/// root carries a new bundle with the same roots).
fn roots_changed(
    then: &Option<Arc<tls::TrustBundle>>,
    now: &Option<Arc<tls::TrustBundle>>,
) -> bool {
    match (then, now) {
        (Some(a), Some(b)) => !Arc::ptr_eq(a, b) && a.roots() != b.roots(),
        (None, None) => false,
        _ => true,
    }
}

/// Phase 3: streams. The connection must keep being polled for any stream
/// to make progress, so this runs until the last stream ends. Shutdown, the
/// peer's chain expiring and a new trust bundle all end it the same way:
/// GOAWAY, no new stream, pings no longer keeping it open.
async fn serve_streams<H: Handler>(
    mut conn: h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>,
    shared: &Shared<H>,
    peer: &PeerCert,
    from: (SocketAddr, SocketAddr),
    mut trust: Trusted,
    drain: Drain,
) {
    let stats = &shared.stats;
    let ka = keepalive(conn.ping_pong(), &shared.settings);
    let expiry = tokio::time::sleep(trust.expires);
    let pending = Arc::new(tokio::sync::Semaphore::new(
        shared.settings.max_pending_streams,
    ));
    tokio::pin!(ka, expiry);
    let (mut draining, mut settled) = (false, false);
    loop {
        let retire = tokio::select! {
            req = conn.accept() => match req {
                Some(Ok((req, mut respond))) => {
                    stats.streams.fetch_add(1, Ordering::Relaxed);
                    let Ok(slot) = pending.clone().try_acquire_owned() else {
                        stats.refused_pending.fetch_add(1, Ordering::Relaxed);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    };
                    let stream = (req, respond, slot);
                    dispatch(&shared.handler, &drain, stats, stream, peer, from);
                    None
                }
                Some(Err(e)) => return protocol_failed(stats, &e.to_string()),
                None => return,
            },
            e = &mut ka => {
                debug!(error = %e, "HBONE peer dead, closing");
                return;
            }
            _ = drain.stopping().cancelled(), if !draining => Some("shutting down"),
            _ = &mut expiry, if !draining => Some("peer certificate expired"),
            changed = trust.own.changed(), if !draining && !settled => match changed {
                Ok(()) if roots_changed(&trust.roots, &roots_of(&trust.own)) => {
                    Some("trust bundle changed")
                }
                Ok(()) => None,
                // No more changes will come: the roots stay what they are.
                Err(_) => {
                    settled = true;
                    None
                }
            },
        };
        if let Some(reason) = retire {
            draining = true;
            metrics::counter!("weft_hbone_connections_retired_total", "reason" => reason)
                .increment(1);
            info!(src.identity = %peer.identity, reason, "GOAWAY: no new streams on this connection");
            conn.graceful_shutdown();
        }
    }
}

type Stream = (
    Request<h2::RecvStream>,
    SendResponse<Bytes>,
    tokio::sync::OwnedSemaphorePermit,
);

fn dispatch<H: Handler>(
    handler: &Arc<H>,
    drain: &Drain,
    stats: &ServerStats,
    (req, mut respond, slot): Stream,
    peer: &PeerCert,
    (peer_addr, local_addr): (SocketAddr, SocketAddr),
) {
    let authority = if req.method() != Method::CONNECT {
        Err(StatusCode::METHOD_NOT_ALLOWED)
    } else {
        req.uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
            .ok_or(StatusCode::BAD_REQUEST)
    };
    let authority = match authority {
        Ok(a) => a,
        Err(status) => {
            stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            let resp = Response::builder()
                .status(status)
                .body(())
                .expect("static response is valid");
            let _ = respond.send_response(resp, true);
            return;
        }
    };
    let (parts, body) = req.into_parts();
    let connect = InboundConnect {
        peer: peer.identity.clone(),
        peer_serial: peer.serial.clone(),
        peer_addr,
        local_addr,
        authority,
        headers: parts.headers,
        respond,
        body,
        _pending: slot,
    };
    let handler = handler.clone();
    let span = info_span!("stream", dst.addr = %authority, src.identity = %peer.identity);
    drain.spawn(async move { handler.handle(connect).await }.instrument(span));
}

fn handshake_failed(stats: &ServerStats, reason: &str) {
    stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
    debug!(reason, "HBONE TLS handshake refused");
}

fn protocol_failed(stats: &ServerStats, reason: &str) {
    stats.protocol_failures.fetch_add(1, Ordering::Relaxed);
    debug!(reason, "HBONE connection closed on protocol error");
}
