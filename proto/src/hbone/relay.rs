//! Relaying a TCP connection through an HBONE stream without copying bytes
//! between buffers, and without more wake-ups than the data needs.
//!
//! - TCP → HBONE: each read lands in a buffer that is handed to HTTP/2 as it
//!   is (`Bytes`, no copy). Reads start at 1 KiB and double while they come
//!   back full, up to 256 KiB: a request/response connection never pays for
//!   a large buffer; a bulk stream is carried in few, large reads.
//! - HBONE → TCP: each DATA frame is written to the socket as it came; its
//!   flow-control window is given back once written, so a slow reader holds
//!   the sender back instead of buffering here.
//! - One direction ending half-closes the other side, as
//!   `copy_bidirectional` does; an error ends both.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{H2Stream, h2_to_io};

const FIRST_READ: usize = 1024;
const LARGEST_READ: usize = 256 * 1024;

/// Relays `tcp` ⇄ `h2` until both directions are done; counts the bytes
/// each way into `(tcp_to_h2, h2_to_tcp)` as they are handed on.
pub async fn relay<R, W>(
    (mut tcp_read, mut tcp_write): (R, W),
    h2: H2Stream,
    (tcp_to_h2, h2_to_tcp): (&AtomicU64, &AtomicU64),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let H2Stream {
        send,
        recv,
        buf,
        _guard,
        ..
    } = h2;
    let up = upload(&mut tcp_read, send, tcp_to_h2);
    let down = download(buf, recv, &mut tcp_write, h2_to_tcp);
    tokio::try_join!(up, down).map(drop)
}

/// Copies `read` → `write` until the end of input, then half-closes
/// `write`; reads grow as in [`relay`], one buffer reused, never zeroed.
pub(super) async fn pipe<R, W>(read: &mut R, write: &mut W, count: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut size = FIRST_READ;
    let mut buf = BytesMut::new();
    loop {
        buf.clear();
        buf.reserve(size);
        let n = read.read_buf(&mut buf).await?;
        if n == 0 {
            return write.shutdown().await;
        }
        if n >= size && size < LARGEST_READ {
            size *= 2;
        }
        // Counted write by write: bytes the far side took before an
        // error are still counted.
        let mut sent = 0;
        while sent < n {
            let w = write.write(&buf[sent..]).await?;
            if w == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            sent += w;
            count.fetch_add(w as u64, Ordering::Relaxed);
        }
    }
}

async fn upload<R: AsyncRead + Unpin>(
    tcp: &mut R,
    mut send: SendStream<Bytes>,
    count: &AtomicU64,
) -> io::Result<()> {
    let mut size = FIRST_READ;
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(size);
        let n = tcp.read_buf(&mut buf).await?;
        if n == 0 {
            return match send.send_data(Bytes::new(), true) {
                // Reset by the peer: the write half is closed either way.
                Err(e) if e.reason().is_none() => Err(h2_to_io(e)),
                _ => Ok(()),
            };
        }
        if n >= size && size < LARGEST_READ {
            size *= 2;
        }
        send_all(&mut send, buf.split().freeze()).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Hands `chunk` to HTTP/2 as flow control allows.
async fn send_all(send: &mut SendStream<Bytes>, mut chunk: Bytes) -> io::Result<()> {
    while !chunk.is_empty() {
        send.reserve_capacity(chunk.len());
        let granted = std::future::poll_fn(|cx| send.poll_capacity(cx)).await;
        let n = match granted {
            Some(Ok(n)) => n.min(chunk.len()),
            Some(Err(e)) => return Err(h2_to_io(e)),
            None => {
                let closed = "HBONE stream closed";
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, closed));
            }
        };
        if n > 0 {
            send.send_data(chunk.split_to(n), false).map_err(h2_to_io)?;
        }
    }
    Ok(())
}

async fn download<W: AsyncWrite + Unpin>(
    pending: Bytes,
    mut recv: RecvStream,
    tcp: &mut W,
    count: &AtomicU64,
) -> io::Result<()> {
    if !pending.is_empty() {
        tcp.write_all(&pending).await?;
        count.fetch_add(pending.len() as u64, Ordering::Relaxed);
    }
    loop {
        match recv.data().await {
            Some(Ok(data)) => {
                tcp.write_all(&data).await?;
                let _ = recv.flow_control().release_capacity(data.len());
                count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            // The peer ended the stream cleanly after its last byte.
            Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => break,
            Some(Err(e)) => return Err(h2_to_io(e)),
            None => break,
        }
    }
    tcp.shutdown().await
}
