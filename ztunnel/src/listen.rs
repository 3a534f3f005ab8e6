//! The one accept loop every ztunnel listener uses: a task and a span per
//! connection, stop on cancel, back off when accept fails.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span};

pub async fn accept_each<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    kind: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let span = info_span!("conn", listener = kind, src.addr = %peer);
                tokio::spawn(handle(tcp, peer).instrument(span));
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
