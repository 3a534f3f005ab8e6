//! gRPC channels to the controller over weft's own TLS config (SPIFFE
//! verification instead of hostname checks), shared by the CA client and the
//! config-stream client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::tls;

/// A lazily connecting channel to `addr`; it reconnects by itself after a
/// failure, on the next request.
pub fn tls_channel(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Channel {
    let connector = TlsConnector::from(config);
    // The scheme only fills the :scheme pseudo-header; TLS is done by the
    // connector below, with the peer's SPIFFE identity checked.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address is a valid URI authority")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(tls::server_name(), tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    }))
}
