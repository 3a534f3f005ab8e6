//! What a tunnel carries: HTTP (either version) or opaque TCP. A Service
//! port's `appProtocol` says; an undeclared port is judged by its first
//! bytes (the HTTP/2 preface or an HTTP/1 method), waiting a short bound
//! for them: a server-first protocol (the server speaks first) sends none
//! and passes as TCP after the wait. Declared TCP is never sniffed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tcp,
}

/// How long an undeclared port waits for the client's first bytes.
pub const SNIFF_WAIT: Duration = Duration::from_millis(300);

/// The protocol an `appProtocol` declares: the HTTP family is served at
/// L7; anything else (`tcp`, `mysql`, TLS such as `https`) passes as bytes.
pub fn declared(app_protocol: &str) -> Protocol {
    match app_protocol {
        "http" | "http2" | "h2c" | "grpc" | "grpc-web" | "kubernetes.io/h2c"
        | "kubernetes.io/ws" => Protocol::Http,
        _ => Protocol::Tcp,
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4) as far as it tells the
/// version: an HTTP/1 request line never starts so.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

const HTTP_STARTS: [&[u8]; 10] = [
    H2_PREFACE,
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// `None` while the bytes so far could still begin HTTP.
fn looks_like(b: &[u8]) -> Option<Protocol> {
    if HTTP_STARTS.iter().any(|m| b.starts_with(m)) {
        return Some(Protocol::Http);
    }
    let undecided = b.is_empty() || HTTP_STARTS.iter().any(|m| m.starts_with(b));
    (!undecided).then_some(Protocol::Tcp)
}

/// Reads the first bytes (at most [`SNIFF_WAIT`], a few bytes) and judges
/// them; returns what was read, to be replayed.
pub async fn sniff<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(32);
    let deadline = tokio::time::Instant::now() + SNIFF_WAIT;
    loop {
        if let Some(p) = looks_like(&buf) {
            return Ok((p, buf.freeze()));
        }
        match tokio::time::timeout_at(deadline, s.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return Ok((Protocol::Tcp, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Which HTTP version a client speaks, from its first bytes: HTTP/2 with
/// prior knowledge (the preface), else HTTP/1. Returns what was read, to
/// be replayed; the caller bounds the wait.
pub async fn http2<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<(bool, Bytes)> {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    loop {
        let seen = &buf[..buf.len().min(H2_PREFACE.len())];
        if !H2_PREFACE.starts_with(seen) || buf.len() >= H2_PREFACE.len() {
            return Ok((seen == H2_PREFACE, buf.freeze()));
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Ok((false, buf.freeze()));
        }
    }
}

/// A stream whose first bytes were already read: they are read again
/// first.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_decide() {
        assert_eq!(looks_like(b""), None);
        assert_eq!(looks_like(b"GE"), None);
        assert_eq!(looks_like(b"GET /"), Some(Protocol::Http));
        assert_eq!(looks_like(b"PRI * HTTP/2.0\r\n"), Some(Protocol::Http));
        assert_eq!(looks_like(b"PRI * HT"), None);
        assert_eq!(looks_like(b"\x16\x03\x01"), Some(Protocol::Tcp), "TLS");
        assert_eq!(looks_like(b"GETX"), Some(Protocol::Tcp));
        assert_eq!(declared("grpc"), Protocol::Http);
        assert_eq!(declared("https"), Protocol::Tcp);
    }

    #[tokio::test]
    async fn the_preface_tells_http2_from_http1() {
        let cases: [(&[u8], bool); 4] = [
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\n", false),
            (b"PRI * HTTP/1.1\r\n", false),
            (b"PR", false), // then the client closed
        ];
        for (sent, h2) in cases {
            let (mut a, mut b) = tokio::io::duplex(64);
            // Byte by byte: the answer must wait for enough of them.
            for byte in sent {
                tokio::io::AsyncWriteExt::write_all(&mut b, &[*byte])
                    .await
                    .expect("write");
            }
            drop(b);
            let (judged, prefix) = http2(&mut a).await.expect("read");
            assert_eq!(judged, h2, "{sent:?}");
            let mut replay = Prefixed::new(prefix, a);
            let mut all = Vec::new();
            replay.read_to_end(&mut all).await.expect("replay");
            assert_eq!(all, sent, "every byte replays");
        }
    }

    #[tokio::test]
    async fn a_silent_client_passes_as_tcp_after_the_wait_and_bytes_replay() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let started = tokio::time::Instant::now();
        let (p, prefix) = sniff(&mut a).await.expect("sniff");
        assert_eq!((p, prefix.len()), (Protocol::Tcp, 0));
        assert!(started.elapsed() >= SNIFF_WAIT);
        tokio::io::AsyncWriteExt::write_all(&mut b, b"POST /x HTTP/1.1\r\n")
            .await
            .expect("write");
        let (p, prefix) = sniff(&mut a).await.expect("sniff");
        assert_eq!(p, Protocol::Http);
        let mut replay = Prefixed::new(prefix, a);
        let mut line = [0u8; 7];
        replay.read_exact(&mut line).await.expect("read");
        assert_eq!(&line, b"POST /x");
    }
}
