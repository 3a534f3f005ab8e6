//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: who may ask for
//! which identity, then the CA signs.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::{info, warn};
use weft_proto::certs::IMPERSONATED_IDENTITY;
use weft_proto::identity::Identity;
use weft_proto::pb::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use weft_proto::pb::ca::{IstioCertificateRequest, IstioCertificateResponse};

use crate::ca::{CertificateAuthority, csr_identity};
use crate::nodes::Nodes;

/// A CSR is well under a kilobyte; anything near this is hostile.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

pub struct CaService {
    ca: Arc<CertificateAuthority>,
    nodes: Arc<Nodes>,
    trust_domain: String,
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        nodes: Arc<Nodes>,
        trust_domain: String,
    ) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(CaService {
            ca,
            nodes,
            trust_domain,
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

/// The identity asked for: `ImpersonatedIdentity` when present (weft's and
/// Istio's node proxies send it), else the CSR's one URI SAN (Istio's
/// dedicated mode, where a proxy asks for its own identity). Either way the
/// caller must be entitled to it; the leaf carries only that identity.
fn requested_identity(req: &IstioCertificateRequest) -> Result<Identity, Status> {
    let field = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY));
    let Some(field) = field else {
        return csr_identity(&req.csr).map_err(|e| {
            Status::invalid_argument(format!(
                "no {IMPERSONATED_IDENTITY} in the request metadata, and the CSR names no identity: {e}"
            ))
        });
    };
    let value = match &field.kind {
        Some(prost_types::value::Kind::StringValue(s)) => s.as_str(),
        _ => {
            return Err(Status::invalid_argument(format!(
                "metadata {IMPERSONATED_IDENTITY} must be a string SPIFFE ID"
            )));
        }
    };
    value
        .parse()
        .map_err(|e| Status::invalid_argument(format!("{IMPERSONATED_IDENTITY} {value:?}: {e}")))
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        // Issued certificates are counted where they are signed (the CA),
        // which also covers the controller's own; refusals here, each with
        // a log line naming its reason.
        let remote = request.remote_addr();
        let result = self.issue(request).await;
        if let Err(status) = &result {
            metrics::counter!("weft_controller_certificate_refusals_total", "code" => format!("{:?}", status.code())).increment(1);
            warn!(
                src.addr = ?remote,
                code = ?status.code(),
                reason = status.message(),
                "certificate request refused"
            );
        }
        result
    }
}

impl CaService {
    async fn issue(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = self.nodes.authenticate_request(request.metadata()).await?;
        let node = caller.name.as_str();
        let req = request.into_inner();
        let identity = requested_identity(&req)?;
        if identity.trust_domain() != self.trust_domain {
            return Err(Status::permission_denied(format!(
                "node {node}: {identity} is outside trust domain {}",
                self.trust_domain
            )));
        }
        if !caller.may_ask_for(&identity) {
            return Err(Status::permission_denied(format!(
                "{node} runs as its own ServiceAccount and may ask only for its identity, not {identity}"
            )));
        }
        if !self.nodes.entitled(node, &identity) {
            return Err(Status::permission_denied(format!(
                "node {node} hosts no workload running as {identity}"
            )));
        }
        let ttl = Duration::from_secs(req.validity_duration.max(0) as u64);
        let chain = self
            .ca
            .sign_csr(&req.csr, &identity, ttl)
            .map_err(|e| Status::invalid_argument(format!("node {node}, {identity}: {e}")))?;
        info!(node, identity = %identity, "certificate issued");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}
