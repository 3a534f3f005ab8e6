//! TLS for HBONE and the controller's gRPC: rustls configs, certificate
//! resolvers that follow rotation, and verifiers that check the SPIFFE
//! identity, not merely "signed by our CA".
//!
//! Every config is TLS 1.3 only with ALPN `h2`. Certificates are read from a
//! [`CertWatch`] at each handshake, so a renewed certificate is used by the
//! next handshake while established connections keep the one they started
//! with. Session resumption is off: every connection proves its identity with
//! a full handshake, so an expired or rotated-out certificate cannot live on
//! through a ticket.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use tokio::sync::watch;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::identity::{Identity, IdentityError};

/// ALPN for HBONE and gRPC alike.
pub const ALPN_H2: &[u8] = b"h2";

static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();

/// The crypto provider every weft config uses: aws-lc-rs, offering the
/// post-quantum hybrid X25519MLKEM768 first and X25519 as the fallback
/// (a peer that offers only the hybrid, or only X25519, is met).
pub fn provider() -> Arc<CryptoProvider> {
    PROVIDER
        .get_or_init(|| Arc::new(build_provider(false)))
        .clone()
}

/// Offer and accept X25519MLKEM768 only (`--pq-only`): a peer without it
/// fails the handshake. Must be called before any TLS config is made;
/// false if one already was.
pub fn require_post_quantum() -> bool {
    PROVIDER.set(Arc::new(build_provider(true))).is_ok()
}

fn build_provider(pq_only: bool) -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::{self, kx_group};
    let mut p = aws_lc_rs::default_provider();
    p.kx_groups = if pq_only {
        vec![kx_group::X25519MLKEM768]
    } else {
        vec![kx_group::X25519MLKEM768, kx_group::X25519]
    };
    p
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate chain from the CA is empty")]
    EmptyChain,
    #[error("cannot parse PEM certificate: {0}")]
    Pem(String),
    #[error("cannot load private key: {0}")]
    Key(String),
    #[error("certificate is unusable: {0}")]
    Peer(#[from] PeerError),
    #[error("issued certificate names {got}, but {want} was requested")]
    WrongIdentity {
        want: Box<Identity>,
        got: Box<Identity>,
    },
    #[error("issued certificate does not verify against the root it came with: {0}")]
    Chain(String),
}

/// Why a peer (or issued) leaf certificate is not an acceptable workload certificate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("certificate is not valid X.509")]
    Malformed,
    #[error("certificate has no URI SAN; a workload certificate carries exactly one SPIFFE ID")]
    NoUriSan,
    #[error("certificate has {0} URI SANs; a workload certificate carries exactly one")]
    ManyUriSans(usize),
    #[error(
        "certificate carries a {0} SAN beside its SPIFFE ID; a workload certificate carries exactly one URI SAN and nothing else"
    )]
    OtherSan(&'static str),
    #[error("certificate URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(#[from] IdentityError),
    #[error("leaf certificate is a CA (basicConstraints CA:true)")]
    LeafIsCa,
    #[error("peer identity {got} is not the expected {want}")]
    UnexpectedIdentity { want: String, got: Box<Identity> },
    #[error("peer identity {got} is outside trust domain {want}")]
    ForeignTrustDomain { want: String, got: Box<Identity> },
    #[error("no trust bundle yet: the local certificate has not been issued")]
    NoTrustBundle,
}

/// The roots a peer's chain must lead to.
#[derive(Clone)]
pub struct TrustBundle {
    anchors: Vec<TrustAnchor<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn from_der(roots: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        let anchors = roots
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsError::Pem(format!("root certificate: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustBundle { anchors, roots })
    }

    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        Self::from_der(certs_from_pem(pem)?)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// These roots and `other`'s, each once.
    pub fn merged(&self, other: &TrustBundle) -> TrustBundle {
        let mut out = TrustBundle {
            anchors: self.anchors.clone(),
            roots: self.roots.clone(),
        };
        for (der, anchor) in other.roots.iter().zip(&other.anchors) {
            if !out.roots.contains(der) {
                out.roots.push(der.clone());
                out.anchors.push(anchor.clone());
            }
        }
        out
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustBundle({} roots)", self.roots.len())
    }
}

/// A workload's certificate and key, ready for rustls, with the roots it was
/// issued under.
pub struct WorkloadCert {
    identity: Identity,
    certified: Arc<CertifiedKey>,
    bundle: Arc<TrustBundle>,
    not_after: SystemTime,
    serial: String,
}

impl WorkloadCert {
    /// Builds from a CA response (`[leaf, intermediates..., root]`) and the
    /// key made locally. Checks that the leaf names `identity` and verifies to
    /// the root it came with, so a confused CA cannot hand us a certificate
    /// that peers will refuse or, worse, one for someone else.
    pub fn from_pem_chain(
        identity: &Identity,
        key: PrivateKeyDer<'static>,
        chain: &[String],
    ) -> Result<Self, TlsError> {
        Self::from_pem_chain_as(identity, key, chain, Leaf::Workload)
    }

    /// As [`Self::from_pem_chain`], for a leaf of the given kind.
    pub fn from_pem_chain_as(
        identity: &Identity,
        key: PrivateKeyDer<'static>,
        chain: &[String],
        kind: Leaf,
    ) -> Result<Self, TlsError> {
        let mut ders = Vec::with_capacity(chain.len());
        for pem in chain {
            ders.extend(certs_from_pem(pem)?);
        }
        let root = ders.pop().ok_or(TlsError::EmptyChain)?;
        if ders.is_empty() {
            // A self-signed leaf: only sensible when the "chain" is one cert.
            ders.push(root.clone());
        }
        let bundle = TrustBundle::from_der(vec![root])?;
        let (got, _) = leaf_identity_and_serial(&ders[0], kind)?;
        if &got != identity {
            return Err(TlsError::WrongIdentity {
                want: Box::new(identity.clone()),
                got: Box::new(got),
            });
        }
        verify_chain(
            &ders[0],
            &ders[1..],
            &bundle,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .map_err(|e| TlsError::Chain(e.to_string()))?;
        let (not_after, serial) = validity(&ders[0])?;
        let signing_key = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Key(e.to_string()))?;
        Ok(WorkloadCert {
            identity: identity.clone(),
            certified: Arc::new(CertifiedKey::new(ders, signing_key)),
            bundle: Arc::new(bundle),
            not_after,
            serial,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The same certificate, trusting `extra` roots beside its own (the
    /// mesh roots the proxy follows: both roots during a rotation).
    pub fn with_extra_roots(&self, extra: &TrustBundle) -> WorkloadCert {
        WorkloadCert {
            identity: self.identity.clone(),
            certified: self.certified.clone(),
            bundle: Arc::new(self.bundle.merged(extra)),
            not_after: self.not_after,
            serial: self.serial.clone(),
        }
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Serial number, colon-separated hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn bundle(&self) -> &Arc<TrustBundle> {
        &self.bundle
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.certified.cert[0]
    }

    /// Time left before expiry (zero once expired).
    pub fn remaining(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

// Hand-written so the private key can never end up in a log line.
impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The state of one identity's certificate, as the certificate manager
/// publishes it.
#[derive(Debug, Clone, Default)]
pub enum CertState {
    /// First fetch in flight.
    #[default]
    Initializing,
    /// A valid certificate (possibly being renewed in the background).
    Available(Arc<WorkloadCert>),
    /// No usable certificate; the reason the last fetch failed.
    Unavailable(Arc<str>),
}

impl CertState {
    pub fn cert(&self) -> Option<&Arc<WorkloadCert>> {
        match self {
            CertState::Available(c) => Some(c),
            _ => None,
        }
    }
}

/// Follows one identity's certificate through renewals.
pub type CertWatch = watch::Receiver<CertState>;

/// A watch that always holds one fixed certificate (the controller's own).
pub fn fixed_cert(cert: Arc<WorkloadCert>) -> CertWatch {
    watch::channel(CertState::Available(cert)).1
}

/// Where a verifier finds the roots to check a peer against.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Roots known up front.
    Static(Arc<TrustBundle>),
    /// The mesh roots as the proxy follows them (the controller's
    /// connection: a rotated root is trusted once published).
    Followed(crate::roots::Roots),
    /// The roots that came with our own current certificate, so a trust
    /// bundle change travels with certificate renewal.
    OwnCert(CertWatch),
}

impl Trust {
    fn bundle(&self) -> Result<Arc<TrustBundle>, PeerError> {
        match self {
            Trust::Static(b) => Ok(b.clone()),
            Trust::Followed(r) => Ok(r.current()),
            Trust::OwnCert(w) => w
                .borrow()
                .cert()
                .map(|c| c.bundle.clone())
                .ok_or(PeerError::NoTrustBundle),
        }
    }
}

/// Which client certificates a server asks for.
#[derive(Clone, Debug)]
pub enum ClientAuth {
    /// HBONE: a client must present a SPIFFE certificate of this trust domain.
    Required { trust_domain: String },
    /// The controller's port: nodes bootstrap with a token before they have
    /// a certificate; a certificate, when presented, must still verify.
    Optional { trust_domain: String },
}

/// Server config for a listener that presents `cert`'s identity.
pub fn server_config(cert: CertWatch, client_auth: ClientAuth) -> Arc<ServerConfig> {
    let (trust_domain, mandatory) = match client_auth {
        ClientAuth::Required { trust_domain } => (trust_domain, true),
        ClientAuth::Optional { trust_domain } => (trust_domain, false),
    };
    let verifier = Arc::new(ClientVerifier {
        trust: Trust::OwnCert(cert.clone()),
        trust_domain,
        mandatory,
    });
    server_config_verifying(cert, verifier, ALPN_H2)
}

/// Server config presenting `cert` (renewed like any certificate here) to
/// clients `verifier` judges: for a listener whose clients are not mesh
/// workloads (the Kubernetes API server's front proxy).
pub fn server_config_verifying(
    cert: CertWatch,
    verifier: Arc<dyn ClientCertVerifier>,
    alpn: &[u8],
) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs provider supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Resolver(cert)));
    config.alpn_protocols = vec![alpn.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// Client config that presents `cert` (if any) and accepts only a workload
/// server whose SPIFFE ID is one of `expected`.
pub fn client_config(
    cert: Option<CertWatch>,
    trust: Trust,
    expected: Vec<Identity>,
) -> Arc<ClientConfig> {
    client_config_for(cert, trust, expected, Leaf::Workload)
}

/// Client config for the controller's port: its identity must be
/// `controller`; its leaf may also carry the names it is dialled by.
pub fn controller_client_config(trust: Trust, controller: Identity) -> Arc<ClientConfig> {
    client_config_for(None, trust, vec![controller], Leaf::Serving)
}

fn client_config_for(
    cert: Option<CertWatch>,
    trust: Trust,
    expected: Vec<Identity>,
    leaf: Leaf,
) -> Arc<ClientConfig> {
    let verifier = Arc::new(ServerVerifier {
        trust,
        expected,
        leaf,
    });
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(Resolver(cert))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// The name sent in SNI. Verifiers ignore it (identity is in the URI SAN);
/// a fixed name keeps peer addresses out of the clear-text ClientHello.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("weft.mesh").expect("static name is valid")
}

/// The identity in a verified peer certificate chain, as rustls hands it over
/// after the handshake.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Identity, PeerError> {
    let leaf = certs.and_then(|c| c.first()).ok_or(PeerError::Malformed)?;
    leaf_identity(leaf)
}

/// What a leaf may carry beside its one SPIFFE URI SAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    /// A workload's certificate: nothing else, of any SAN type.
    Workload,
    /// The controller's serving certificate: DNS and IP SANs too, for
    /// clients that check the host they dialled.
    Serving,
}

/// The one SPIFFE ID a workload leaf carries; refuses CA certificates,
/// anything with zero or several URI SANs, and any other SAN.
pub fn leaf_identity(der: &CertificateDer<'_>) -> Result<Identity, PeerError> {
    leaf_identity_and_serial(der, Leaf::Workload).map(|(id, _)| id)
}

/// The peer's identity and certificate serial (colon-separated hex), from
/// one parse of the leaf.
pub fn peer_identity_and_serial(
    certs: Option<&[CertificateDer<'_>]>,
) -> Result<(Identity, String), PeerError> {
    let leaf = certs.and_then(|c| c.first()).ok_or(PeerError::Malformed)?;
    leaf_identity_and_serial(leaf, Leaf::Workload)
}

fn leaf_identity_and_serial(
    der: &CertificateDer<'_>,
    kind: Leaf,
) -> Result<(Identity, String), PeerError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|_| PeerError::Malformed)?;
    if cert.is_ca() {
        return Err(PeerError::LeafIsCa);
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PeerError::Malformed)?
        .ok_or(PeerError::NoUriSan)?;
    let mut uris: Vec<&str> = Vec::with_capacity(1);
    for name in &san.value.general_names {
        match (name, kind) {
            (GeneralName::URI(u), _) => uris.push(u),
            (GeneralName::DNSName(_) | GeneralName::IPAddress(_), Leaf::Serving) => {}
            (other, _) => return Err(PeerError::OtherSan(san_kind(other))),
        }
    }
    let identity = match uris.as_slice() {
        [] => return Err(PeerError::NoUriSan),
        [uri] => uri.parse()?,
        many => return Err(PeerError::ManyUriSans(many.len())),
    };
    Ok((identity, cert.raw_serial_as_string()))
}

fn san_kind(name: &GeneralName<'_>) -> &'static str {
    match name {
        GeneralName::OtherName(..) => "otherName",
        GeneralName::RFC822Name(_) => "email",
        GeneralName::DNSName(_) => "DNS",
        GeneralName::X400Address(_) => "X.400",
        GeneralName::DirectoryName(_) => "directory name",
        GeneralName::EDIPartyName(_) => "EDI party",
        GeneralName::URI(_) => "URI",
        GeneralName::IPAddress(_) => "IP",
        GeneralName::RegisteredID(_) => "registered ID",
        GeneralName::Invalid(..) => "malformed",
    }
}

/// A handshake failure in words an operator can act on (rustls prints our
/// own verification errors with `Debug`).
pub fn describe_handshake_error(e: &std::io::Error) -> String {
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match inner {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(o))) => {
            format!("peer certificate refused: {o}")
        }
        rustls::Error::InvalidCertificate(c) => format!("peer certificate refused: {c:?}"),
        other => other.to_string(),
    }
}

/// When a presented chain stops being valid: the earliest `notAfter` in it.
/// A connection checked against it must not outlive it.
pub fn chain_not_after(certs: Option<&[CertificateDer<'_>]>) -> Option<SystemTime> {
    certs?
        .iter()
        .filter_map(|der| validity(der).ok().map(|(not_after, _)| not_after))
        .min()
}

fn validity(der: &CertificateDer<'_>) -> Result<(SystemTime, String), TlsError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|_| TlsError::Peer(PeerError::Malformed))?;
    let not_after = cert.validity().not_after.timestamp();
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
    Ok((not_after, cert.raw_serial_as_string()))
}

/// Parses every certificate in a PEM string.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), rustls::Error> {
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(pki_error)?;
    ee.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &bundle.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(pki_error)?;
    Ok(())
}

/// Chain to the trust bundle, then the SPIFFE identity of the leaf.
fn verify_peer(
    trust: &Trust,
    (leaf, kind): (&CertificateDer<'_>, Leaf),
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<Identity, rustls::Error> {
    let bundle = trust.bundle().map_err(other)?;
    verify_chain(leaf, intermediates, &bundle, now, usage)?;
    leaf_identity_and_serial(leaf, kind)
        .map(|(id, _)| id)
        .map_err(other)
}

fn other(e: PeerError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

#[derive(Debug)]
struct Resolver(CertWatch);

impl Resolver {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0.borrow().cert().map(|c| c.certified.clone())
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Client side: the server must chain to our roots and be one of `expected`.
#[derive(Debug)]
struct ServerVerifier {
    trust: Trust,
    expected: Vec<Identity>,
    leaf: Leaf,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = verify_peer(
            &self.trust,
            (end_entity, self.leaf),
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if !self.expected.contains(&got) {
            let want = self
                .expected
                .iter()
                .map(Identity::to_string)
                .collect::<Vec<_>>()
                .join(" or ");
            return Err(other(PeerError::UnexpectedIdentity {
                want,
                got: Box::new(got),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server side: the client must chain to our roots and carry a SPIFFE ID of
/// the local trust domain. Which identities may do what is authorization's
/// job, after the handshake.
#[derive(Debug)]
struct ClientVerifier {
    trust: Trust,
    trust_domain: String,
    mandatory: bool,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let got = verify_peer(
            &self.trust,
            (end_entity, Leaf::Workload),
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        if got.trust_domain() != self.trust_domain {
            return Err(other(PeerError::ForeignTrustDomain {
                want: self.trust_domain.clone(),
                got: Box::new(got),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// Both configs are TLS 1.3 only, so rustls never asks for a TLS 1.2 signature.
fn no_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls13RequiredForQuic,
    ))
}

fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}
