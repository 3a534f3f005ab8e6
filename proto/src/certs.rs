//! The certificate manager proxies use: one worker per identity that makes a
//! key locally, asks the CA to sign it, publishes the result on a `watch`, and
//! renews at half lifetime. While the CA is failing it backs off
//! exponentially (capped near [`CertConfig::max_backoff`]) and keeps serving
//! the old certificate until it expires.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::credential::Credential;
use crate::identity::Identity;
use crate::pb::ca::IstioCertificateRequest;
use crate::pb::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::roots::Roots;
use crate::tls::{self, CertState, CertWatch, TlsError, WorkloadCert};

/// Metadata key a node uses to ask for a workload's identity (Istio's name).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("CA refused the request: {0}")]
    Refused(String),
    #[error("CA unreachable: {0}")]
    Unreachable(String),
    #[error("cannot make a key or CSR: {0}")]
    Csr(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("no certificate for {identity} after {waited:?}: {reason}")]
    Timeout {
        identity: Box<Identity>,
        waited: Duration,
        reason: String,
    },
}

/// Anything that signs CSRs: the controller over gRPC in production.
pub trait CaClient: Send + Sync + 'static {
    /// Returns `[leaf, intermediates..., root]` as PEM.
    fn sign<'a>(
        &'a self,
        csr_pem: String,
        identity: &'a Identity,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<String>, CertError>> + Send + 'a>>;
}

#[derive(Debug, Clone)]
pub struct CertConfig {
    /// Lifetime asked of the CA (the CA may cap it).
    pub ttl: Duration,
    /// First retry delay after a CA failure; doubles per failure.
    pub min_backoff: Duration,
    /// Retry delay ceiling (Istio's ztunnel uses about 150 s).
    pub max_backoff: Duration,
    /// What the issued leaf may carry: a workload's one URI SAN, or the
    /// controller's serving names too.
    pub leaf: tls::Leaf,
    /// Mesh roots trusted beside each certificate's own (followed from the
    /// proxy's `--ca-root`: both roots during a rotation).
    pub roots: Option<Roots>,
}

impl Default for CertConfig {
    fn default() -> Self {
        CertConfig {
            ttl: Duration::from_secs(24 * 3600),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(150),
            leaf: tls::Leaf::Workload,
            roots: None,
        }
    }
}

/// Per-identity certificate cache. Cheap to clone.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<dyn CaClient>,
    config: CertConfig,
    /// Where renewal workers run: the runtime the manager was made on (a
    /// proxy's control runtime), wherever `watch` is called from.
    runtime: tokio::runtime::Handle,
    entries: Mutex<HashMap<Identity, Entry>>,
    shutdown: CancellationToken,
}

struct Entry {
    rx: CertWatch,
    stop: CancellationToken,
}

impl CertManager {
    pub fn new(ca: Arc<dyn CaClient>, config: CertConfig) -> Self {
        CertManager {
            inner: Arc::new(Inner {
                runtime: tokio::runtime::Handle::current(),
                ca,
                config,
                entries: Mutex::new(HashMap::new()),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// Follows `identity`'s certificate, starting its worker on first use.
    /// Must be called inside a tokio runtime.
    pub fn watch(&self, identity: &Identity) -> CertWatch {
        let mut entries = self.inner.entries.lock().expect("cert map poisoned");
        if let Some(e) = entries.get(identity) {
            return e.rx.clone();
        }
        let (tx, rx) = watch::channel(CertState::Initializing);
        let stop = self.inner.shutdown.child_token();
        self.inner.runtime.spawn(worker(
            self.inner.ca.clone(),
            self.inner.config.clone(),
            identity.clone(),
            tx,
            stop.clone(),
        ));
        entries.insert(
            identity.clone(),
            Entry {
                rx: rx.clone(),
                stop,
            },
        );
        rx
    }

    /// The current certificate, waiting up to `timeout` for the first one.
    pub async fn get(
        &self,
        identity: &Identity,
        timeout: Duration,
    ) -> Result<Arc<WorkloadCert>, CertError> {
        wait_for_cert(self.watch(identity), identity, timeout).await
    }

    /// Stops renewing `identity` (its pod left the node).
    pub fn forget(&self, identity: &Identity) {
        let entry = self
            .inner
            .entries
            .lock()
            .expect("cert map poisoned")
            .remove(identity);
        if let Some(e) = entry {
            e.stop.cancel();
        }
    }

    /// Identities currently managed, with their state.
    pub fn snapshot(&self) -> Vec<(Identity, CertState)> {
        let entries = self.inner.entries.lock().expect("cert map poisoned");
        let mut out: Vec<_> = entries
            .iter()
            .map(|(id, e)| (id.clone(), e.rx.borrow().clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits (bounded) until `rx` holds a certificate.
pub async fn wait_for_cert(
    rx: CertWatch,
    identity: &Identity,
    timeout: Duration,
) -> Result<Arc<WorkloadCert>, CertError> {
    first_cert(rx, timeout)
        .await
        .map_err(|reason| CertError::Timeout {
            identity: Box::new(identity.clone()),
            waited: timeout,
            reason,
        })
}

/// Waits (bounded) until `rx` holds a certificate; otherwise why it does
/// not (the last fetch's failure, or a fetch still in flight). For a
/// caller that may not know whose certificate it waits for (a listener).
pub async fn first_cert(mut rx: CertWatch, timeout: Duration) -> Result<Arc<WorkloadCert>, String> {
    let waited = tokio::time::timeout(timeout, rx.wait_for(|s| s.cert().is_some()))
        .await
        .map(|r| r.map(|state| state.cert().cloned()));
    match waited {
        Ok(Ok(Some(cert))) => Ok(cert),
        _ => Err(match &*rx.borrow() {
            CertState::Unavailable(r) => r.to_string(),
            CertState::Initializing => "first fetch still in flight".into(),
            CertState::Available(_) => "worker stopped".into(),
        }),
    }
}

async fn worker(
    ca: Arc<dyn CaClient>,
    config: CertConfig,
    identity: Identity,
    tx: watch::Sender<CertState>,
    stop: CancellationToken,
) {
    let mut failures: u32 = 0;
    let mut roots = config.roots.clone();
    loop {
        let delay = match fetch(ca.as_ref(), &identity, &config).await {
            Ok(cert) => {
                failures = 0;
                metrics::counter!("weft_certificates_issued_total").increment(1);
                let expiry = cert
                    .not_after()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                metrics::gauge!("weft_certificate_expiration_timestamp_seconds",
                    "identity" => identity.to_string())
                .set(expiry.as_secs_f64());
                info!(identity = %identity, serial = cert.serial(), "certificate issued");
                let delay = renew_delay(cert.remaining());
                tx.send_replace(CertState::Available(cert));
                delay
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                metrics::counter!("weft_certificate_fetch_failures_total").increment(1);
                warn!(identity = %identity, error = %e, failures, "certificate fetch failed");
                // Keep serving the old certificate while it is still valid.
                let keep = tx
                    .borrow()
                    .cert()
                    .is_some_and(|c| c.not_after() > SystemTime::now());
                if !keep {
                    tx.send_replace(CertState::Unavailable(e.to_string().into()));
                }
                backoff(&config, failures)
            }
        };
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        // Until renewal: a change of the mesh roots re-publishes the
        // certificate trusting them, without a new key.
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut sleep => break,
                Some(bundle) = changed(&mut roots) => {
                    let cert = tx.borrow().cert().map(|c| c.with_extra_roots(&bundle));
                    if let Some(cert) = cert {
                        tx.send_replace(CertState::Available(Arc::new(cert)));
                    }
                }
            }
        }
    }
}

/// The next change of the followed roots; pending forever without any.
async fn changed(roots: &mut Option<Roots>) -> Option<Arc<tls::TrustBundle>> {
    match roots {
        Some(r) => match r.changed().await {
            Some(b) => Some(b),
            None => {
                *roots = None; // nothing follows the file any more
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// Renew when about half the remaining lifetime is gone, minus up to 10%
/// jitter so a node's certificates do not all renew in the same second.
fn renew_delay(remaining: Duration) -> Duration {
    let jitter = rand::rng().random_range(0.9..=1.0);
    remaining.mul_f64(0.5 * jitter).max(Duration::from_secs(1))
}

fn backoff(config: &CertConfig, failures: u32) -> Duration {
    let exp = config
        .min_backoff
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let base = exp.min(config.max_backoff);
    base.mul_f64(rand::rng().random_range(0.9..=1.1))
}

/// One key, one CSR, one signed certificate.
async fn fetch(
    ca: &dyn CaClient,
    identity: &Identity,
    config: &CertConfig,
) -> Result<Arc<WorkloadCert>, CertError> {
    let (csr, key) = make_csr(identity)?;
    let chain = ca.sign(csr, identity, config.ttl).await?;
    let cert = WorkloadCert::from_pem_chain_as(identity, key, &chain, config.leaf)?;
    Ok(Arc::new(match &config.roots {
        Some(roots) => cert.with_extra_roots(&roots.current()),
        None => cert,
    }))
}

/// A fresh ECDSA P-256 key and a CSR for `identity`. The key never leaves
/// this process.
pub fn make_csr(identity: &Identity) -> Result<(String, PrivateKeyDer<'static>), CertError> {
    let csr_err = |e: rcgen::Error| CertError::Csr(e.to_string());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(csr_err)?;
    let mut params = rcgen::CertificateParams::default();
    let uri = rcgen::string::Ia5String::try_from(identity.to_string()).map_err(csr_err)?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(csr_err)?;
    let pem = csr.pem().map_err(csr_err)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((pem, der))
}

/// The controller's CA over gRPC, authenticated with the proxy's
/// credential (read at each request: a projected token rotates).
pub struct GrpcCaClient {
    client: IstioCertificateServiceClient<tonic::transport::Channel>,
    credential: Credential,
}

impl GrpcCaClient {
    /// Connects lazily (on first request, and again after failures) to the
    /// controller at `addr`, which must present `controller`'s identity under
    /// `roots`.
    pub fn new(
        addr: SocketAddr,
        roots: impl Into<Roots>,
        controller: Identity,
        credential: impl Into<Credential>,
    ) -> Self {
        let tls = tls::controller_client_config(tls::Trust::Followed(roots.into()), controller);
        let channel = crate::grpc::tls_channel(addr, tls);
        GrpcCaClient {
            client: IstioCertificateServiceClient::new(channel),
            credential: credential.into(),
        }
    }
}

impl CaClient for GrpcCaClient {
    fn sign<'a>(
        &'a self,
        csr_pem: String,
        identity: &'a Identity,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<String>, CertError>> + Send + 'a>> {
        Box::pin(async move {
            let metadata = prost_types::Struct {
                fields: [(
                    IMPERSONATED_IDENTITY.to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
                    },
                )]
                .into(),
            };
            let mut req = tonic::Request::new(IstioCertificateRequest {
                csr: csr_pem,
                validity_duration: ttl.as_secs() as i64,
                metadata: Some(metadata),
            });
            let bearer = self
                .credential
                .bearer()
                .map_err(|e| CertError::Refused(e.to_string()))?;
            req.metadata_mut().insert("authorization", bearer);
            let resp = self
                .client
                .clone()
                .create_certificate(req)
                .await
                .map_err(|s| match s.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::DeadlineExceeded => {
                        CertError::Unreachable(s.message().to_owned())
                    }
                    code => CertError::Refused(format!("{code:?}: {}", s.message())),
                })?;
            Ok(resp.into_inner().cert_chain)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps_near_150s() {
        let c = CertConfig::default();
        let b1 = backoff(&c, 1);
        assert!(b1 >= Duration::from_millis(450) && b1 <= Duration::from_millis(550));
        let b3 = backoff(&c, 3);
        assert!(b3 >= Duration::from_millis(1800) && b3 <= Duration::from_millis(2200));
        for n in [10, 20, 1000, u32::MAX] {
            let b = backoff(&c, n);
            assert!(
                b >= Duration::from_secs(135) && b <= Duration::from_secs(165),
                "{b:?}"
            );
        }
    }

    #[test]
    fn renews_at_about_half_life() {
        let d = renew_delay(Duration::from_secs(24 * 3600));
        assert!(d <= Duration::from_secs(12 * 3600));
        assert!(d >= Duration::from_secs(12 * 3600).mul_f64(0.9));
    }

    #[test]
    fn csr_names_identity_and_key_is_p256() {
        let id: Identity = "spiffe://td/ns/a/sa/b".parse().expect("valid");
        let (pem, _key) = make_csr(&id).expect("csr");
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&pem).expect("parses");
        assert_eq!(
            parsed.public_key.algorithm(),
            &rcgen::PKCS_ECDSA_P256_SHA256
        );
        assert_eq!(parsed.params.subject_alt_names.len(), 1);
    }
}
