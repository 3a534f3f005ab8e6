//! HBONE: one HTTP/2 `CONNECT` stream per proxied TCP connection, inside
//! mutual TLS 1.3 between SPIFFE identities (SPEC §3).
//!
//! - [`server`] accepts streams and hands each one, with the peer's verified
//!   identity, to a [`server::Handler`].
//! - [`pool`] opens streams, sharing one TLS connection per
//!   (source identity, destination identity, destination address) up to a
//!   stream limit.
//! - [`H2Stream`] is the byte stream both sides get: `AsyncRead + AsyncWrite`.

pub mod metadata;
pub mod pool;
pub mod relay;
pub mod server;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{Ping, PingPong, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::identity::Identity;

/// The port every HBONE listener uses.
pub const HBONE_PORT: u16 = 15008;

/// Headers weft sends on CONNECT.
pub const BAGGAGE: &str = "baggage";
pub const FORWARDED: &str = "forwarded";
pub const TRACEPARENT: &str = "traceparent";

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
    #[error("TLS handshake with {addr} failed: {reason}")]
    Tls {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("HTTP/2 error: {0}")]
    H2(#[from] h2::Error),
    #[error("peer refused the tunnel with HTTP status {0}")]
    Status(http::StatusCode),
    #[error("timed out during {0}")]
    Timeout(&'static str),
    #[error("no certificate for the source identity yet: {0}")]
    NoCertificate(String),
    #[error("invalid request: {0}")]
    Request(String),
}

impl HboneError {
    /// The destination could not take the tunnel at all (nothing listening,
    /// no route, a handshake with someone else, 503 from its ztunnel): no
    /// byte of the client's went anywhere, so another endpoint of the same
    /// service may be tried. A policy refusal (401/403) or a bad request is
    /// an answer, not an absence, and is never retried elsewhere.
    pub fn endpoint_unavailable(&self) -> bool {
        match self {
            HboneError::Connect { .. } | HboneError::Tls { .. } | HboneError::Timeout(_) => true,
            HboneError::Status(s) => *s == http::StatusCode::SERVICE_UNAVAILABLE,
            _ => false,
        }
    }
}

/// HTTP/2 tuning shared by both ends. Windows are sized for bulk transfer,
/// not HTTP defaults (64 KiB would cap a stream at window/RTT).
#[derive(Debug, Clone)]
pub struct H2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Streams allowed per connection by the server side.
    pub max_concurrent_streams: u32,
    /// Streams per connection not yet answered (the handler still deciding
    /// or connecting): a client that resets streams as fast as it opens
    /// them (rapid reset) frees HTTP/2's slots, not these. Past the bound a
    /// new stream is refused with REFUSED_STREAM.
    pub max_pending_streams: usize,
    /// TLS handshakes one listener runs at once, and connections it holds:
    /// past either, a new connection is closed at once, counted and logged
    /// (bounded work per listener).
    pub max_handshakes: usize,
    pub max_connections: usize,
    /// Ping interval; a peer that does not answer within `keepalive_timeout`
    /// is declared dead and its connection closed. `None` disables pings.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// Bound on TCP connect + TLS handshake + HTTP/2 preface.
    pub handshake_timeout: Duration,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 256 * 1024,
            max_concurrent_streams: 1000,
            max_pending_streams: 128,
            max_handshakes: 128,
            max_connections: 4096,
            keepalive_interval: Some(Duration::from_secs(10)),
            keepalive_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Resolves with an error when the peer stops answering pings; pending forever
/// while it answers (or when pings are disabled).
async fn keepalive(pp: Option<PingPong>, settings: &H2Settings) -> io::Error {
    let (Some(mut pp), Some(interval)) = (pp, settings.keepalive_interval) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(settings.keepalive_timeout, pp.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return io::Error::other(e),
            Err(_) => return io::Error::new(io::ErrorKind::TimedOut, "peer missed keepalive ping"),
        }
    }
}

/// One tunnelled TCP connection: an HTTP/2 stream as a byte stream.
/// Shutting down the write half ends the stream (a TCP half-close); dropping
/// it without shutdown resets the stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    buf: Bytes,
    write_closed: bool,
    peer: Option<Identity>,
    // Released when the stream ends, so the pool knows the connection's load.
    _guard: Option<pool::StreamGuard>,
}

impl H2Stream {
    fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        peer: Option<Identity>,
        guard: Option<pool::StreamGuard>,
    ) -> Self {
        H2Stream {
            peer,
            send,
            recv,
            buf: Bytes::new(),
            write_closed: false,
            _guard: guard,
        }
    }

    /// The verified identity of the far end (client side: the server that
    /// answered; server side: see [`server::InboundConnect::peer`]).
    pub fn peer_identity(&self) -> Option<&Identity> {
        self.peer.as_ref()
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.buf.is_empty() {
                let n = self.buf.len().min(out.remaining());
                out.put_slice(&self.buf[..n]);
                self.buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Hand the window back as soon as a frame is taken: at most
                    // one frame is ever buffered here.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.buf = data;
                }
                // The peer ended the stream cleanly after its last byte.
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_to_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data is handed to the connection task on write; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Ok(()));
        }
        self.write_closed = true;
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            // Reset by the peer: the write half is closed either way.
            Err(e) if e.reason().is_some() => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(h2_to_io(e))),
        }
    }
}

/// Bytes a copy has moved so far, readable while it runs and after it
/// ends, however it ended (a reset after 17 MB still moved 17 MB).
#[derive(Debug, Default)]
pub struct Transferred {
    pub a_to_b: std::sync::atomic::AtomicU64,
    pub b_to_a: std::sync::atomic::AtomicU64,
}

impl Transferred {
    /// (bytes a→b, bytes b→a).
    pub fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.a_to_b.load(Relaxed), self.b_to_a.load(Relaxed))
    }
}

/// Copies both ways until both sides are done (an end of input half-closes
/// the other side), counting into `moved` every byte written to either
/// side, however the copy ends. Reads grow from 1 KiB to 256 KiB while they
/// come back full and buffers are not zeroed: a short connection costs a
/// small buffer, a bulk one few large reads.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B, moved: &Transferred) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let forward = relay::pipe(&mut a_read, &mut b_write, &moved.a_to_b);
    let back = relay::pipe(&mut b_read, &mut a_write, &moved.b_to_a);
    tokio::try_join!(forward, back).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A peer that takes `limit` bytes, then resets (as wrk does on exit),
    /// and never sends anything.
    struct ResetAfter {
        taken: usize,
        limit: usize,
    }

    impl AsyncRead for ResetAfter {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for ResetAfter {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.taken == self.limit {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            let n = buf.len().min(self.limit - self.taken);
            self.taken += n;
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_copy_that_ends_in_an_error_still_counts_what_it_moved() {
        let (mut client, mut a) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 16 * 1024];
            for _ in 0..64 {
                if client.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            client
        });
        let mut b = ResetAfter {
            taken: 0,
            limit: 300_000,
        };
        let moved = Transferred::default();
        let copied = tokio::time::timeout(
            Duration::from_secs(10),
            copy_bidirectional(&mut a, &mut b, &moved),
        )
        .await
        .expect("bounded");
        assert_eq!(
            copied.expect_err("reset").kind(),
            io::ErrorKind::ConnectionReset
        );
        assert_eq!(moved.get(), (300_000, 0));
        drop(a);
        let _ = writer.await;
    }
}
