//! An OTLP trace collector on loopback: tonic serving the OTLP/gRPC trace
//! service, as an OpenTelemetry Collector does, keeping the spans it is
//! sent for a test or a bench to read.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
pub use opentelemetry_proto::tonic::trace::v1::Span;

/// The spans received so far.
pub type Received = Arc<Mutex<Vec<Span>>>;

struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = req.into_inner().resource_spans.into_iter();
        let spans = spans.flat_map(|r| r.scope_spans).flat_map(|s| s.spans);
        self.0
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?
            .extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts a collector on `127.0.0.1` (a free port) on the current runtime.
pub async fn collector() -> std::io::Result<(SocketAddr, Received)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let spans = Received::default();
    let service = TraceServiceServer::new(Collector(spans.clone()));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    Ok((addr, spans))
}
