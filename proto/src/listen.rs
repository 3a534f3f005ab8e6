//! The one accept loop every weft listener uses (pod ports, HBONE, admin,
//! SOCKS5, the controller's gRPC port): a task and a span per connection,
//! at most a bound at once (past it a connection is closed at once, counted
//! and logged), stop on cancel, back off when accept fails.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

/// Connections one listener serves at once (a pod's outbound or inbound
/// port, the admin port): bounded work per listener, so one pod's flood
/// cannot take the node's memory.
pub const MAX_CONNECTIONS: usize = 4096;

pub async fn accept_each<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    kind: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    accept_bounded(listener, stop, (kind, MAX_CONNECTIONS), handle).await
}

/// [`accept_each`] with its own bound.
pub async fn accept_bounded<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    (kind, limit): (&'static str, usize),
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    accept_counted(listener, stop, (kind, limit), handle, |_| {}).await
}

/// [`accept_bounded`], telling `refused` of each connection refused.
pub async fn accept_counted<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    (kind, limit): (&'static str, usize),
    handle: F,
    refused: impl Fn(SocketAddr),
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limit));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    metrics::counter!("weft_listener_refusals_total", "listener" => kind)
                        .increment(1);
                    warn!(listener = kind, src.addr = %peer, limit, "connection refused: listener at its limit");
                    refused(peer);
                    drop(tcp);
                    continue;
                };
                let span = info_span!("conn", listener = kind, src.addr = %peer);
                let served = handle(tcp, peer);
                tokio::spawn(
                    async move {
                        served.await;
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // Usually out of file descriptors: spinning would only burn
                // the CPU the open connections need to finish.
                debug!(listener = kind, error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn past_its_limit_a_listener_closes_new_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let (held_tx, mut held) = tokio::sync::mpsc::channel(8);
        tokio::spawn(accept_bounded(
            listener,
            stop.clone(),
            ("test", 2),
            move |tcp, _| {
                let held_tx = held_tx.clone();
                async move {
                    // Served until the client closes.
                    let _ = held_tx.send(()).await;
                    let mut tcp = tcp;
                    let _ = tcp.read(&mut [0u8; 1]).await;
                }
            },
        ));
        let mut open = Vec::new();
        for _ in 0..2 {
            open.push(TcpStream::connect(addr).await.expect("connect"));
            held.recv().await.expect("served");
        }
        let mut third = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .expect("closed at once, not left hanging");
        assert!(matches!(n, Ok(0) | Err(_)), "the third was served: {n:?}");
        // One of the two leaves: a new connection is served again.
        drop(open.pop());
        let _fourth = TcpStream::connect(addr).await.expect("connect");
        tokio::time::timeout(Duration::from_secs(5), held.recv())
            .await
            .expect("served once a slot is free");
        stop.cancel();
    }
}
