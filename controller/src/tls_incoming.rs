//! TLS in front of tonic: accepts TCP, handshakes each connection in its own
//! task (bounded in time and number), and yields the streams to the gRPC
//! server with the peer's identity, if it presented a certificate.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::debug;
use weft_proto::identity::Identity;
use weft_proto::tls;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HANDSHAKES: usize = 512;

pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// Present when the client authenticated with a certificate.
    pub identity: Option<Identity>,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
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

/// The stream of handshaken connections for `Server::serve_with_incoming`,
/// and the accept loop's task (done once `shutdown` is seen and the
/// listener closed: a restart on the same port waits for it).
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> (
    ReceiverStream<io::Result<TlsConn>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    // The shared accept loop bounds the handshakes in flight (past it a
    // connection is closed at once and counted), each in its own task.
    let handshake = move |tcp: TcpStream, remote: SocketAddr| {
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        async move {
            let _ = tcp.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(inner)) => {
                    let identity = tls::peer_identity(inner.get_ref().1.peer_certificates()).ok();
                    let conn = TlsConn {
                        inner,
                        info: PeerInfo { remote, identity },
                    };
                    let _ = tx.send(Ok(conn)).await;
                }
                Ok(Err(e)) => {
                    debug!(src.addr = %remote, error = %e, "controller TLS handshake failed")
                }
                Err(_) => debug!(src.addr = %remote, "controller TLS handshake timed out"),
            }
        }
    };
    let accepting = tokio::spawn(weft_proto::listen::accept_bounded(
        listener,
        weft_proto::listen::Drain::stopped_by(shutdown),
        ("controller", MAX_HANDSHAKES),
        handshake,
    ));
    (ReceiverStream::new(rx), accepting)
}
