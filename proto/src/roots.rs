//! The mesh roots a proxy trusts, followed from its `--ca-root` file (in a
//! cluster, the `weft-trust-bundle` ConfigMap the kubelet updates in
//! place). A root rotation publishes the new root beside the old one
//! there first; proxies pick it up within a poll interval and trust both
//! — for the controller's connection and for peers (every certificate's
//! own root plus these) — so peers on either side of the rotation keep
//! talking during the overlap.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::tls::{TlsError, TrustBundle};

/// How often the file is read again (a ConfigMap update takes the kubelet
/// up to a minute anyway).
pub const POLL: Duration = Duration::from_secs(5);

/// The current roots; cheap to clone.
#[derive(Clone)]
pub struct Roots(watch::Receiver<Arc<TrustBundle>>);

impl fmt::Debug for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Roots({:?})", self.0.borrow())
    }
}

impl From<Arc<TrustBundle>> for Roots {
    /// Roots that never change (tests, in-process controllers).
    fn from(bundle: Arc<TrustBundle>) -> Self {
        Roots(watch::channel(bundle).1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("cannot read the mesh root {path}: {reason}; check --ca-root")]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("mesh root {path}: {reason}")]
    Bad { path: PathBuf, reason: TlsError },
}

fn load(path: &Path) -> Result<(String, TrustBundle), RootsError> {
    let pem = std::fs::read_to_string(path).map_err(|reason| RootsError::Read {
        path: path.to_owned(),
        reason,
    })?;
    let bundle = TrustBundle::from_pem(&pem).map_err(|reason| RootsError::Bad {
        path: path.to_owned(),
        reason,
    })?;
    Ok((pem, bundle))
}

impl Roots {
    /// The roots in `path` now, then as the file changes (read every
    /// `every`). A file that no longer parses keeps the last good roots.
    /// Must be called inside a tokio runtime (the follower runs there).
    pub fn follow(path: &Path, every: Duration) -> Result<Roots, RootsError> {
        let (mut last, bundle) = load(path)?;
        let (tx, rx) = watch::channel(Arc::new(bundle));
        let path = path.to_owned();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if tx.is_closed() {
                    return;
                }
                match load(&path) {
                    Ok((pem, _)) if pem == last => {}
                    Ok((pem, bundle)) => {
                        info!(path = %path.display(), roots = bundle.roots().len(), "mesh roots changed");
                        tx.send_replace(Arc::new(bundle));
                        last = pem;
                    }
                    Err(e) => warn!(error = %e, "keeping the last mesh roots"),
                }
            }
        });
        Ok(Roots(rx))
    }

    pub fn current(&self) -> Arc<TrustBundle> {
        self.0.borrow().clone()
    }

    /// Waits for the next change; `None` once nothing follows the file.
    pub async fn changed(&mut self) -> Option<Arc<TrustBundle>> {
        self.0.changed().await.ok()?;
        Some(self.0.borrow_and_update().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::tls::{self, ClientAuth, Trust, WorkloadCert};

    struct Ca {
        pem: String,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    fn ca(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).expect("self-signed").pem();
        Ca {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn root(name: &str) -> String {
        ca(name).pem
    }

    /// A workload certificate for `sa` from `ca`, as the CA would issue it.
    fn leaf(ca: &Ca, sa: &str) -> WorkloadCert {
        let id = Identity::new("cluster.local", "default", sa).expect("id");
        let (csr, key) = crate::certs::make_csr(&id).expect("csr");
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&csr).expect("csr");
        let mut params = csr.params;
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&csr.public_key, &ca.issuer)
            .expect("signed");
        WorkloadCert::from_pem_chain(&id, key, &[cert.pem(), ca.pem.clone()]).expect("leaf")
    }

    /// One mTLS handshake between a client holding `client` and a server
    /// holding `server`; whether both sides accepted.
    async fn handshake(client: WorkloadCert, server: WorkloadCert) -> bool {
        let server_id = server.identity().clone();
        let server_cfg = tls::server_config(
            tls::fixed_cert(Arc::new(server)),
            ClientAuth::Required {
                trust_domain: "cluster.local".into(),
            },
        );
        let client_watch = tls::fixed_cert(Arc::new(client));
        let client_cfg = tls::client_config(
            Some(client_watch.clone()),
            Trust::OwnCert(client_watch),
            vec![server_id],
        );
        let (a, b) = tokio::io::duplex(64 * 1024);
        let accept = tokio_rustls::TlsAcceptor::from(server_cfg).accept(b);
        let connect = tokio_rustls::TlsConnector::from(client_cfg).connect(tls::server_name(), a);
        let (s, c) = tokio::join!(accept, connect);
        s.is_ok() && c.is_ok()
    }

    /// During a rotation, a proxy renewed under the new root and one still
    /// on the old one trust each other once both follow a bundle of both
    /// roots; without it they do not.
    #[tokio::test]
    async fn peers_on_either_root_talk_during_a_rotation() {
        let (old, new) = (ca("old root"), ca("new root"));
        let both = TrustBundle::from_pem(&format!("{}{}", new.pem, old.pem)).expect("bundle");
        assert!(
            !handshake(leaf(&old, "web"), leaf(&new, "api")).await,
            "one root each: refused"
        );
        let web = leaf(&old, "web").with_extra_roots(&both);
        let api = leaf(&new, "api").with_extra_roots(&both);
        assert!(handshake(web, api).await, "both roots followed: accepted");
        let web = leaf(&old, "web").with_extra_roots(&both);
        assert!(handshake(leaf(&new, "api").with_extra_roots(&both), web).await);
    }

    /// A rotation: the file gains a second root.
    #[tokio::test]
    async fn follows_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("root-cert.pem");
        let (a, b) = (root("A"), root("B"));
        std::fs::write(&path, &a).expect("write");
        let mut roots = Roots::follow(&path, Duration::from_millis(20)).expect("roots");
        assert_eq!(roots.current().roots().len(), 1);
        std::fs::write(&path, format!("{b}{a}")).expect("write");
        let next = tokio::time::timeout(Duration::from_secs(5), roots.changed())
            .await
            .expect("in time")
            .expect("followed");
        assert_eq!(next.roots().len(), 2);
        assert!(matches!(
            Roots::follow(&dir.path().join("missing"), POLL),
            Err(RootsError::Read { .. })
        ));
    }

    struct TestCa(Ca);

    impl crate::certs::CaClient for TestCa {
        fn sign<'a>(
            &'a self,
            csr_pem: String,
            _identity: &'a Identity,
            _ttl: Duration,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<Vec<String>, crate::certs::CertError>>
                    + Send
                    + 'a,
            >,
        > {
            Box::pin(async move {
                let csr = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).expect("csr");
                let cert = csr
                    .params
                    .signed_by(&csr.public_key, &self.0.issuer)
                    .expect("signed");
                Ok(vec![cert.pem(), self.0.pem.clone()])
            })
        }
    }

    /// A root added to the followed file reaches certificates already
    /// issued, without a new key or a trip to the CA.
    #[tokio::test]
    async fn issued_certificates_follow_the_roots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("root-cert.pem");
        let (old, new) = (ca("old root"), ca("new root"));
        std::fs::write(&path, &old.pem).expect("write");
        let new_pem = new.pem.clone();
        let roots = Roots::follow(&path, Duration::from_millis(20)).expect("roots");
        let config = crate::certs::CertConfig {
            roots: Some(roots),
            ..Default::default()
        };
        let certs = crate::certs::CertManager::new(Arc::new(TestCa(old)), config);
        let id = Identity::new("cluster.local", "default", "web").expect("id");
        let mut watch = certs.watch(&id);
        let first = crate::certs::wait_for_cert(watch.clone(), &id, Duration::from_secs(5))
            .await
            .expect("issued");
        assert_eq!(first.bundle().roots().len(), 1);
        std::fs::write(
            &path,
            format!("{new_pem}{}", std::fs::read_to_string(&path).expect("r")),
        )
        .expect("write");
        let both = watch.wait_for(|s| s.cert().is_some_and(|c| c.bundle().roots().len() == 2));
        let cert = tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .expect("in time")
            .expect("watch")
            .cert()
            .cloned()
            .expect("cert");
        assert_eq!(cert.serial(), first.serial(), "the same certificate");
    }
}
