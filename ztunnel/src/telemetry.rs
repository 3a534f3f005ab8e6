//! Metrics (labels follow Istio's standard TCP metrics so dashboards port)
//! and the admin, metrics and readiness HTTP endpoints.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use weft_proto::listen::{Drain, accept_each};

pub use weft_proto::process::prometheus;

/// Who talked to whom, as one connection's metrics labels.
pub struct ConnLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_service: String,
    pub security: &'static str,
}

impl ConnLabels {
    fn labels(&self) -> [(&'static str, String); 6] {
        [
            ("reporter", self.reporter.to_owned()),
            ("source_workload", self.source_workload.clone()),
            ("source_principal", self.source_principal.clone()),
            ("destination_workload", self.destination_workload.clone()),
            ("destination_service", self.destination_service.clone()),
            ("connection_security_policy", self.security.to_owned()),
        ]
    }

    pub fn opened(&self) {
        metrics::counter!("weft_tcp_connections_opened_total", &self.labels()).increment(1);
    }

    /// `sent`/`received` from the point of view of the reporting workload's
    /// peer-facing side: bytes the source sent and received.
    pub fn closed(&self, sent: u64, received: u64) {
        let labels = self.labels();
        metrics::counter!("weft_tcp_connections_closed_total", &labels).increment(1);
        metrics::counter!("weft_tcp_sent_bytes_total", &labels).increment(sent);
        metrics::counter!("weft_tcp_received_bytes_total", &labels).increment(received);
    }
}

/// GET path → (status, content type, body).
pub type Handler = Arc<dyn Fn(&str) -> (StatusCode, &'static str, String) + Send + Sync>;

/// A small HTTP/1.1 server: GET path → (status, content type, body).
pub async fn serve_http(listener: TcpListener, handler: Handler, drain: Drain) {
    accept_each(listener, drain, "http", move |tcp, _peer| {
        let handler = handler.clone();
        async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let (status, content_type, body) = handler(req.uri().path());
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", content_type)
                    .body(body)
                    .unwrap_or_default();
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(64 * 1024)
                .header_read_timeout(std::time::Duration::from_secs(5))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                debug!(error = %e, "admin HTTP connection error");
            }
        }
    })
    .await;
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}
