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

use crate::ca::CertificateAuthority;
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

fn requested_identity(req: &IstioCertificateRequest) -> Result<Identity, Status> {
    let value = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "metadata {IMPERSONATED_IDENTITY} (string SPIFFE ID) is required"
            ))
        })?;
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
        let result = self.issue(request);
        let name = if result.is_ok() {
            "weft_controller_certificates_issued_total"
        } else {
            "weft_controller_certificate_refusals_total"
        };
        metrics::counter!(name).increment(1);
        result
    }
}

impl CaService {
    fn issue(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let node = self.nodes.authenticate_request(request.metadata())?;
        let req = request.into_inner();
        let identity = requested_identity(&req)?;
        if identity.trust_domain() != self.trust_domain {
            warn!(node, identity = %identity, "CSR refused: foreign trust domain");
            return Err(Status::permission_denied(format!(
                "{identity} is outside trust domain {}",
                self.trust_domain
            )));
        }
        if !self.nodes.entitled(&node, &identity) {
            warn!(node, identity = %identity, "CSR refused: no workload with that identity on the node");
            return Err(Status::permission_denied(format!(
                "node {node} hosts no workload running as {identity}"
            )));
        }
        let ttl = Duration::from_secs(req.validity_duration.max(0) as u64);
        let chain = self.ca.sign_csr(&req.csr, &identity, ttl).map_err(|e| {
            warn!(node, identity = %identity, error = %e, "CSR refused");
            Status::invalid_argument(e.to_string())
        })?;
        info!(node, identity = %identity, "certificate issued");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}
