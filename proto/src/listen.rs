//! The one accept loop every weft listener uses (pod ports, HBONE, admin,
//! SOCKS5, the controller's gRPC port): a task and a span per connection,
//! at most a bound at once (past it a connection is closed at once, counted
//! and logged), back off when accept fails; and the [`Drain`] every
//! connection task is tracked by, so stopping is: stop accepting, let live
//! connections finish up to a deadline, cut the rest.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

/// The life of a group of listeners and every task they start: accepting,
/// then draining (no new connections; HBONE says GOAWAY), then closed (what
/// is still open is cut: its task dropped, so its guards still log it).
/// Cheap to clone; clones share everything.
#[derive(Clone, Default)]
pub struct Drain {
    accepting: CancellationToken,
    closing: CancellationToken,
    tasks: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// A drain whose listeners stop accepting when `stop` fires.
    pub fn stopped_by(stop: CancellationToken) -> Self {
        Drain {
            accepting: stop,
            ..Self::default()
        }
    }

    /// A part (one pod's listeners) that can stop accepting on its own,
    /// and stops with this one; its tasks are this one's.
    pub fn child(&self) -> Drain {
        Drain {
            accepting: self.accepting.child_token(),
            closing: self.closing.clone(),
            tasks: self.tasks.clone(),
        }
    }

    /// Fires when listeners must stop accepting.
    pub fn stopping(&self) -> &CancellationToken {
        &self.accepting
    }

    /// Stops accepting (this part and its children).
    pub fn stop(&self) {
        self.accepting.cancel();
    }

    /// Runs `task` tracked: [`Drain::drain`] waits for it, and drops it at
    /// the deadline.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let closing = self.closing.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = closing.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// Tasks still running.
    pub fn open(&self) -> usize {
        self.tasks.len()
    }

    /// Stops accepting, lets tracked tasks finish for up to `deadline`,
    /// then cuts the rest; returns how many were cut.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.accepting.cancel();
        self.tasks.close();
        info!(
            open = self.tasks.len(),
            deadline_s = deadline.as_secs_f64(),
            "draining: no new connections; open ones may finish"
        );
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let cut = self.tasks.len();
        warn!(cut, "drain deadline reached; closing what is still open");
        self.closing.cancel();
        self.tasks.wait().await;
        cut
    }
}

/// Connections one listener serves at once (a pod's outbound or inbound
/// port, the admin port): bounded work per listener, so one pod's flood
/// cannot take the node's memory.
pub const MAX_CONNECTIONS: usize = 4096;

pub async fn accept_each<F, Fut>(listener: TcpListener, drain: Drain, kind: &'static str, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    accept_bounded(listener, drain, (kind, MAX_CONNECTIONS), handle).await
}

/// [`accept_each`] with its own bound.
pub async fn accept_bounded<F, Fut>(
    listener: TcpListener,
    drain: Drain,
    (kind, limit): (&'static str, usize),
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    accept_counted(listener, drain, (kind, limit), handle, |_| {}).await
}

/// [`accept_bounded`], telling `refused` of each connection refused.
pub async fn accept_counted<F, Fut>(
    listener: TcpListener,
    drain: Drain,
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
            _ = drain.stopping().cancelled() => return,
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
                drain.spawn(
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
        let drain = Drain::new();
        let (held_tx, mut held) = tokio::sync::mpsc::channel(8);
        tokio::spawn(accept_bounded(
            listener,
            drain.clone(),
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
        drain.stop();
    }

    /// Draining lets a live connection finish within the deadline and
    /// cuts one that outlives it; no new connection is served meanwhile.
    #[tokio::test]
    async fn drain_waits_for_live_connections_then_cuts_them() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let drain = Drain::new();
        tokio::spawn(accept_each(
            listener,
            drain.clone(),
            "test",
            |tcp, _| async move {
                // Echo one byte, then hold until the client closes.
                let mut tcp = tcp;
                let mut b = [0u8; 1];
                while let Ok(1) = tcp.read(&mut b).await {
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut tcp, &b).await;
                }
            },
        ));
        let mut quick = TcpStream::connect(addr).await.expect("connect");
        let mut held = TcpStream::connect(addr).await.expect("connect");
        for s in [&mut quick, &mut held] {
            tokio::io::AsyncWriteExt::write_all(s, b"x")
                .await
                .expect("write");
            s.read_exact(&mut [0u8; 1]).await.expect("echoed");
        }
        let draining = tokio::spawn({
            let drain = drain.clone();
            async move { drain.drain(Duration::from_millis(1500)).await }
        });
        // Still served while draining; closing one lets its task end.
        tokio::io::AsyncWriteExt::write_all(&mut held, b"y")
            .await
            .expect("write");
        held.read_exact(&mut [0u8; 1])
            .await
            .expect("served while draining");
        drop(quick);
        let cut = tokio::time::timeout(Duration::from_secs(10), draining)
            .await
            .expect("drain ends at its deadline")
            .expect("drain task");
        assert_eq!(cut, 1, "only the connection outliving the deadline is cut");
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), held.read(&mut b)).await;
        assert!(matches!(n, Ok(Ok(0) | Err(_))), "cut, not left open: {n:?}");
        assert_eq!(drain.open(), 0);
    }
}
