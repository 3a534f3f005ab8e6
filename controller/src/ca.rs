//! The certificate authority: a signing certificate and key (a root weft made,
//! or an intermediate the user plugged in), and the one function that turns a
//! CSR into a workload leaf.
//!
//! On disk (SPEC §2), in the CA directory:
//! - `ca-cert.pem`, `ca-key.pem`: the signing certificate and its key (0600);
//! - `root-cert.pem`: the root every workload trusts;
//! - `cert-chain.pem`: the chain from `ca-cert.pem` up to the root.
//!
//! When weft generates its own root, all three certificate files hold that
//! root, so both setups load through one path.

use std::fs;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use tracing::info;
use weft_proto::certs::{CaClient, CertError};
use weft_proto::identity::Identity;
use x509_parser::prelude::FromDer;

const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
const ROOT_CERT: &str = "root-cert.pem";
const CERT_CHAIN: &str = "cert-chain.pem";
/// The CA's material, in a directory or a Secret's keys.
pub const CA_FILES: [&str; 4] = [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN];

/// Lifetime of a root weft generates for itself.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves start a minute in the past to absorb clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "CA key {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}` and start again"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error(
        "CA directory {dir} has only some of ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem (missing {missing}); supply all four, or none to let weft generate a root"
    )]
    Incomplete { dir: PathBuf, missing: String },
    #[error("invalid CA material in {path}: {reason}")]
    Material { path: PathBuf, reason: String },
    #[error("CSR rejected: {0}")]
    BadCsr(String),
    #[error("CSR key must be ECDSA P-256; got {0}")]
    UnsupportedKey(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Signs workload certificates. The signing material can be replaced while
/// running ([`CertificateAuthority::reload`]): a rotation step is an edit
/// of the CA directory (or the Secret), not a restart.
pub struct CertificateAuthority {
    dir: PathBuf,
    signer: std::sync::RwLock<Arc<Signer>>,
    /// The roots proxies are told to trust, for those that follow them.
    roots: tokio::sync::watch::Sender<String>,
    max_ttl: Duration,
    /// The latest certificate issued per identity (bounded by the
    /// identities placed on nodes), for the REST API.
    issued: std::sync::Mutex<std::collections::BTreeMap<String, Issued>>,
}

/// One set of signing material, as loaded from the CA directory.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// `cert-chain.pem` (from the signing cert up), root excluded.
    chain: Vec<String>,
    /// The root the chain ends at: the first in `root-cert.pem`.
    root: String,
    /// Every root in `root-cert.pem`: the current one first, then any still
    /// trusted during a rotation. What proxies are told to trust.
    bundle: String,
    /// The signing certificate (PEM): with `bundle` and `chain`, what
    /// tells one set of material from another.
    cert: String,
    issuer_not_after: SystemTime,
}

impl Signer {
    fn same(&self, other: &Signer) -> bool {
        (&self.cert, &self.chain, &self.bundle) == (&other.cert, &other.chain, &other.bundle)
    }
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertificateAuthority {
    /// The latest certificate issued to each identity.
    pub fn issued(&self) -> std::collections::BTreeMap<String, Issued> {
        self.issued.lock().expect("poisoned").clone()
    }

    /// Loads the CA from `dir`, or makes a new root there on first start.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        max_ttl: Duration,
    ) -> Result<Self, CaError> {
        let files = CA_FILES;
        let present: Vec<bool> = files.iter().map(|f| dir.join(f).exists()).collect();
        if present.iter().all(|p| !p) {
            generate_root(dir, trust_domain)?;
        } else if !present.iter().all(|p| *p) {
            let missing = files
                .iter()
                .zip(&present)
                .filter(|(_, p)| !**p)
                .map(|(f, _)| *f)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(CaError::Incomplete {
                dir: dir.to_owned(),
                missing,
            });
        }
        Self::load(dir, max_ttl)
    }

    fn load(dir: &Path, max_ttl: Duration) -> Result<Self, CaError> {
        let signer = Signer::load(dir)?;
        info!(dir = %dir.display(), intermediate = !signer.chain.is_empty(), "CA loaded");
        Ok(CertificateAuthority {
            dir: dir.to_owned(),
            roots: tokio::sync::watch::Sender::new(signer.bundle.clone()),
            signer: std::sync::RwLock::new(Arc::new(signer)),
            max_ttl,
            issued: Default::default(),
        })
    }

    /// Loads the CA directory again; the new material signs from now on if
    /// it differs (`Ok(true)`). Material that does not load leaves the
    /// current one signing.
    pub fn reload(&self) -> Result<bool, CaError> {
        let fresh = Signer::load(&self.dir)?;
        let mut signer = self.signer.write().expect("poisoned");
        if signer.same(&fresh) {
            return Ok(false);
        }
        info!(dir = %self.dir.display(), intermediate = !fresh.chain.is_empty(), "CA material replaced");
        self.roots.send_replace(fresh.bundle.clone());
        *signer = Arc::new(fresh);
        Ok(true)
    }

    /// Whether `dir` holds material that would load.
    pub fn check(dir: &Path) -> Result<(), CaError> {
        Signer::load(dir).map(|_| ())
    }

    fn current(&self) -> Arc<Signer> {
        self.signer.read().expect("poisoned").clone()
    }
}

impl Signer {
    fn load(dir: &Path) -> Result<Self, CaError> {
        let key_path = dir.join(CA_KEY);
        check_key_permissions(&key_path)?;
        let key_pem = read(&key_path)?;
        let material = |path: &Path, reason: String| CaError::Material {
            path: path.to_owned(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| material(&key_path, e.to_string()))?;
        let cert_path = dir.join(CA_CERT);
        let cert_pem = read(&cert_path)?;
        let cert_der = pem_blocks(&cert_pem)
            .into_iter()
            .next()
            .ok_or_else(|| material(&cert_path, "no certificate".into()))?;
        let (_, x509) = x509_parser::certificate::X509Certificate::from_der(&cert_der)
            .map_err(|e| material(&cert_path, e.to_string()))?;
        if !x509.is_ca() {
            return Err(material(
                &cert_path,
                "certificate is not a CA (CA:false)".into(),
            ));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(material(&key_path, format!("key does not match {CA_CERT}")));
        }
        let issuer_not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(x509.validity().not_after.timestamp().max(0) as u64);
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key)
            .map_err(|e| material(&cert_path, e.to_string()))?;
        let root_path = dir.join(ROOT_CERT);
        let root = read(&root_path)?;
        let root_der = pem_blocks(&root)
            .into_iter()
            .next()
            .ok_or_else(|| material(&root_path, "no certificate".into()))?;
        // The chain sent to workloads: signing cert first, root excluded.
        let chain_path = dir.join(CERT_CHAIN);
        let mut chain: Vec<Vec<u8>> = pem_blocks(&read(&chain_path)?);
        chain.retain(|c| *c != root_der);
        if chain.first() != Some(&cert_der) {
            chain.retain(|c| *c != cert_der);
            if cert_der != root_der {
                chain.insert(0, cert_der);
            }
        }
        let bundle: String = pem_blocks(&root).iter().map(|d| to_pem(d)).collect();
        Ok(Signer {
            issuer,
            chain: chain.iter().map(|d| to_pem(d)).collect(),
            root: to_pem(&root_der),
            bundle,
            cert: cert_pem,
            issuer_not_after,
        })
    }
}

impl CertificateAuthority {
    /// The roots every proxy trusts (PEM): the current root first, then
    /// any `root-cert.pem` still lists during a rotation.
    pub fn root_pem(&self) -> String {
        self.current().bundle.clone()
    }

    /// [`Self::root_pem`], followed.
    pub fn roots(&self) -> tokio::sync::watch::Receiver<String> {
        self.roots.subscribe()
    }

    /// Issues a leaf for `identity` to the key in `csr_pem`. Whatever else the
    /// CSR asks for (SANs, CA:true, key usages) is ignored: the leaf carries
    /// exactly `identity`, CA:false, for at most the configured lifetime.
    /// Returns `[leaf, chain..., root]` as PEM.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        self.sign(csr_pem, identity, &[], ttl)
    }

    /// A leaf for a server dialled by name or address as well as by
    /// identity (the controller's own gRPC port: an Istio CA client checks
    /// the host it dialled against DNS and IP SANs). Workload leaves never
    /// carry `names`.
    pub fn sign_serving(
        &self,
        csr_pem: &str,
        identity: &Identity,
        names: &ServingNames,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let mut sans = Vec::with_capacity(names.dns.len() + names.ips.len());
        for dns in &names.dns {
            let name = rcgen::string::Ia5String::try_from(dns.as_str())
                .map_err(|e| CaError::Sign(format!("DNS name {dns:?}: {e}")))?;
            sans.push(SanType::DnsName(name));
        }
        sans.extend(names.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        self.sign(csr_pem, identity, &sans, ttl)
    }

    fn sign(
        &self,
        csr_pem: &str,
        identity: &Identity,
        extra_sans: &[SanType],
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::UnsupportedKey(format!(
                "{:?}",
                csr.public_key.algorithm()
            )));
        }
        let now = SystemTime::now();
        let ttl = if ttl.is_zero() {
            self.max_ttl
        } else {
            ttl.min(self.max_ttl)
        };
        let signer = self.current();
        let not_after = (now + ttl).min(signer.issuer_not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(identity.to_string())
            .map_err(|e| CaError::Sign(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.subject_alt_names.extend_from_slice(extra_sans);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let serial = random_serial();
        let serial_hex: String = serial.as_ref().iter().map(|b| format!("{b:02X}")).collect();
        params.serial_number = Some(serial);
        params.not_before = OffsetDateTime::from(now - BACKDATE);
        params.not_after = OffsetDateTime::from(not_after);
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&csr.public_key, &signer.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        self.issued.lock().expect("poisoned").insert(
            identity.to_string(),
            Issued {
                serial: serial_hex,
                not_before: now - BACKDATE,
                not_after,
            },
        );
        metrics::counter!("weft_controller_certificates_issued_total").increment(1);
        let mut out = Vec::with_capacity(signer.chain.len() + 2);
        out.push(leaf.pem());
        out.extend(signer.chain.iter().cloned());
        out.push(signer.root.clone());
        Ok(out)
    }
}

/// The one SPIFFE ID a CSR asks for in its SANs (Istio's dedicated mode
/// sends no `ImpersonatedIdentity`). Anything but exactly one URI SAN, and
/// SANs of other types beside it, are refused: ambiguity is never guessed.
pub fn csr_identity(csr_pem: &str) -> Result<Identity, CaError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CaError::BadCsr(e.to_string()))?;
    let sans = &csr.params.subject_alt_names;
    match sans.as_slice() {
        [SanType::URI(uri)] => uri
            .as_str()
            .parse()
            .map_err(|e| CaError::BadCsr(format!("URI SAN {:?}: {e}", uri.as_str()))),
        [] => Err(CaError::BadCsr("the CSR has no SAN".into())),
        _ => Err(CaError::BadCsr(format!(
            "the CSR has {} SANs; exactly one URI SAN (a SPIFFE ID) is needed",
            sans.len()
        ))),
    }
}

/// The DNS names and addresses the controller's serving certificate carries
/// beside its SPIFFE ID.
#[derive(Debug, Clone, Default)]
pub struct ServingNames {
    pub dns: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
}

impl ServingNames {
    /// The Service names of the shipped manifests, `localhost`, and `extra`
    /// (the controller's `--server-name` flags); loopback and `addr`'s IP
    /// when it is a specific address, plus `extra_ips`.
    pub fn for_listener(
        addr: std::net::SocketAddr,
        extra: &[String],
        extra_ips: &[std::net::IpAddr],
    ) -> Self {
        let mut dns: Vec<String> = [
            "weft-controller.weft-system.svc",
            "weft-controller.weft-system.svc.cluster.local",
            "localhost",
        ]
        .map(String::from)
        .into();
        dns.extend(extra.iter().cloned());
        dns.sort();
        dns.dedup();
        let mut ips: Vec<std::net::IpAddr> =
            vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
        if !addr.ip().is_unspecified() {
            ips.push(addr.ip());
        }
        ips.extend_from_slice(extra_ips);
        ips.sort();
        ips.dedup();
        ServingNames { dns, ips }
    }
}

/// The controller's own certificate (for its gRPC port) comes from the same
/// manager proxies use, signing in-process instead of over the network.
pub struct ServingSigner {
    pub ca: std::sync::Arc<CertificateAuthority>,
    pub names: ServingNames,
}

impl CaClient for ServingSigner {
    fn sign<'a>(
        &'a self,
        csr_pem: String,
        identity: &'a Identity,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<String>, CertError>> + Send + 'a>> {
        Box::pin(async move {
            self.ca
                .sign_serving(&csr_pem, identity, &self.names, ttl)
                .map_err(|e| CertError::Refused(e.to_string()))
        })
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    SerialNumber::from_slice(&bytes)
}

fn generate_root(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
    fs::create_dir_all(dir).map_err(|source| CaError::Io {
        action: "create",
        path: dir.to_owned(),
        source,
    })?;
    let sign_err = |e: rcgen::Error| CaError::Sign(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    // A random suffix tells two meshes' roots apart, for people reading
    // certificates and for verifiers choosing an issuer by name.
    let mut tag = [0u8; 4];
    rand::rng().fill_bytes(&mut tag);
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("weft root CA {tag}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    let now = SystemTime::now();
    params.not_before = OffsetDateTime::from(now - BACKDATE);
    params.not_after = OffsetDateTime::from(now + ROOT_LIFETIME);
    let cert = params.self_signed(&key).map_err(sign_err)?;
    // Key first: a crash between the writes leaves an incomplete directory,
    // which the next start reports rather than silently re-rooting the mesh.
    write_atomic(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
    for name in [CA_CERT, ROOT_CERT, CERT_CHAIN] {
        write_atomic(&dir.join(name), cert.pem().as_bytes(), 0o644)?;
    }
    info!(dir = %dir.display(), trust_domain, "generated a new root CA");
    Ok(())
}

fn check_key_permissions(path: &Path) -> Result<(), CaError> {
    let meta = fs::metadata(path).map_err(|source| CaError::Io {
        action: "stat",
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

/// [`weft_proto::process::write_atomic`], its error naming the path.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    weft_proto::process::write_atomic(path, data, mode).map_err(|source| CaError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })
}

fn pem_blocks(pem: &str) -> Vec<Vec<u8>> {
    weft_proto::tls::certs_from_pem(pem)
        .map(|certs| certs.into_iter().map(|c| c.to_vec()).collect())
        .unwrap_or_default()
}

fn to_pem(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), config)
}
