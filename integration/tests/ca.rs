//! The controller's CA over real gRPC + TLS: who may ask for what, what is
//! issued, what survives a restart, and certificates a peer must refuse.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tonic::Code;
use weft_integration::{HboneServer, Mesh, Pair, eventually};
use weft_proto::certs::{IMPERSONATED_IDENTITY, make_csr};
use weft_proto::hbone::pool::{ConnectRequest, Pool, PoolKey, PoolSettings};
use weft_proto::pb::ca::IstioCertificateRequest;
use weft_proto::pb::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use weft_proto::tls::{self, WorkloadCert};
use x509_parser::prelude::{FromDer, X509Certificate};

type Client = IstioCertificateServiceClient<tonic::transport::Channel>;

fn client(mesh: &Mesh) -> Client {
    let config = tls::controller_client_config(
        tls::Trust::Static(mesh.roots()),
        mesh.controller.identity.clone(),
    );
    IstioCertificateServiceClient::new(weft_proto::grpc::tls_channel(
        mesh.controller.grpc_addr,
        config,
    ))
}

fn csr_request(
    csr: String,
    identity: &str,
    token: Option<&str>,
    ttl: i64,
) -> tonic::Request<IstioCertificateRequest> {
    let metadata = prost_types::Struct {
        fields: [(
            IMPERSONATED_IDENTITY.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(identity.into())),
            },
        )]
        .into(),
    };
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ttl,
        metadata: Some(metadata),
    });
    if let Some(t) = token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    req
}

#[tokio::test]
async fn csr_asking_for_more_gets_only_the_entitled_leaf() {
    let mesh = Mesh::start().await;
    let node = mesh.node("node-a");
    let web = node.workload("default", "web");
    // A CSR that asks for someone else's identity, a DNS name and CA:true.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::new(vec!["evil.example.com".to_owned()]).expect("params");
    params.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .try_into()
            .expect("uri"),
    ));
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let csr = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let ten_years = 10 * 365 * 24 * 3600;
    let resp = client(&mesh)
        .create_certificate(csr_request(
            csr,
            &web.to_string(),
            Some(&node.token),
            ten_years,
        ))
        .await
        .expect("issued")
        .into_inner();
    assert_eq!(resp.cert_chain.len(), 2, "leaf + root");
    let leaf_der = tls::certs_from_pem(&resp.cert_chain[0])
        .expect("pem")
        .remove(0);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).expect("x509");
    let san = leaf.subject_alternative_name().expect("ext").expect("san");
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, vec![format!("URI({web})")]);
    assert!(!leaf.is_ca());
    let lifetime = leaf.validity().not_after.timestamp()
        - SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("now")
            .as_secs() as i64;
    assert!(
        lifetime <= 24 * 3600 + 5,
        "capped at 24 h, got {lifetime} s"
    );
    // The root at the end of the chain is the CA's root.
    assert_eq!(resp.cert_chain[1], mesh.controller.root_pem);
}

/// Istio's CA client (and any HTTPS client) checks the host it dialled
/// against the server certificate's DNS and IP SANs, with plain WebPKI
/// verification under the mesh root: the controller's own leaf names the
/// Service and loopback, and still exactly one SPIFFE ID.
#[tokio::test]
async fn controller_certificate_names_the_hosts_clients_dial() {
    let mesh = Mesh::start().await;
    let mut roots = rustls::RootCertStore::empty();
    for root in tls::certs_from_pem(&mesh.controller.root_pem).expect("root") {
        roots.add(root).expect("root");
    }
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let dial = |name: &'static str| {
        let config = config.clone();
        let addr = mesh.controller.grpc_addr;
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from(name).expect("name");
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
        }
    };
    for name in [
        "weft-controller.weft-system.svc",
        "weft-controller.weft-system.svc.cluster.local",
        "localhost",
        "127.0.0.1",
    ] {
        let tls = dial(name).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let leaf = tls.get_ref().1.peer_certificates().expect("certs")[0].clone();
        let (_, cert) = X509Certificate::from_der(&leaf).expect("x509");
        let san = cert.subject_alternative_name().expect("ext").expect("san");
        let uris: Vec<String> = san
            .value
            .general_names
            .iter()
            .filter(|n| matches!(n, x509_parser::extensions::GeneralName::URI(_)))
            .map(|n| n.to_string())
            .collect();
        assert_eq!(uris, vec![format!("URI({})", mesh.controller.identity)]);
    }
    let err = dial("evil.example.com")
        .await
        .expect_err("a name it does not carry");
    // Refused for the name alone: the chain itself verified.
    assert!(
        err.to_string()
            .contains("certificate not valid for name \"evil.example.com\""),
        "{err}"
    );
}

/// Istio's dedicated mode sends no ImpersonatedIdentity: the CSR's one URI
/// SAN is the identity asked for, and the node must be entitled to it.
#[tokio::test]
async fn csr_without_impersonation_asks_for_its_own_san() {
    let mesh = Mesh::start().await;
    let (a, b) = (mesh.node("node-a"), mesh.node("node-b"));
    let web = a.workload("default", "web");
    let bare = |csr: String, token: &str| {
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: 3600,
            metadata: None,
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        req
    };
    let (csr, _) = make_csr(&web).expect("csr");
    let resp = client(&mesh)
        .create_certificate(bare(csr.clone(), &a.token))
        .await
        .expect("issued to the entitled node")
        .into_inner();
    let der = tls::certs_from_pem(&resp.cert_chain[0])
        .expect("pem")
        .remove(0);
    assert_eq!(tls::leaf_identity(&der).expect("leaf"), web);
    let err = client(&mesh)
        .create_certificate(bare(csr, &b.token))
        .await
        .expect_err("node-b does not host web");
    assert_eq!(err.code(), Code::PermissionDenied);
    // A CSR naming nothing: refused, and the reason says what to send.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let nameless = CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let err = client(&mesh)
        .create_certificate(bare(nameless, &a.token))
        .await
        .expect_err("nothing to issue");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains(IMPERSONATED_IDENTITY),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn serials_are_random_and_128_bit() {
    let mesh = Mesh::start().await;
    let node = mesh.node("node-a");
    let web = node.workload("default", "web");
    let mut serials = std::collections::HashSet::new();
    for _ in 0..8 {
        let (csr, _) = make_csr(&web).expect("csr");
        let resp = client(&mesh)
            .create_certificate(csr_request(csr, &web.to_string(), Some(&node.token), 3600))
            .await
            .expect("issued")
            .into_inner();
        let der = tls::certs_from_pem(&resp.cert_chain[0])
            .expect("pem")
            .remove(0);
        let (_, leaf) = X509Certificate::from_der(&der).expect("x509");
        // 16 random bytes: 17 with the sign byte when the top bit is set,
        // 15 when the first byte happens to be 0 (1 in 256).
        let len = leaf.raw_serial().len();
        assert!((15..=17).contains(&len), "serial of {len} bytes");
        serials.insert(leaf.raw_serial().to_vec());
    }
    assert_eq!(serials.len(), 8);
}

#[tokio::test]
async fn refusals_name_the_reason() {
    let mesh = Mesh::start().await;
    let (a, b) = (mesh.node("node-a"), mesh.node("node-b"));
    let web = a.workload("default", "web");
    let api = b.workload("default", "api");
    let (csr, _) = make_csr(&api).expect("csr");
    let mut c = client(&mesh);

    // Node A asks for a workload that runs on node B.
    let err = c
        .create_certificate(csr_request(
            csr.clone(),
            &api.to_string(),
            Some(&a.token),
            3600,
        ))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("node-a hosts no workload running as"),
        "{}",
        err.message()
    );

    // No token, and a wrong token.
    let err = c
        .create_certificate(csr_request(csr.clone(), &web.to_string(), None, 3600))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = c
        .create_certificate(csr_request(
            csr.clone(),
            &web.to_string(),
            Some("0000"),
            3600,
        ))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unauthenticated);

    // Not a SPIFFE ID, another trust domain, garbage and tampered CSRs.
    let err = c
        .create_certificate(csr_request(
            csr.clone(),
            "spiffe://cluster.local/ns/x",
            Some(&a.token),
            3600,
        ))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .create_certificate(csr_request(
            csr.clone(),
            "spiffe://other.td/ns/default/sa/web",
            Some(&a.token),
            3600,
        ))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = c
        .create_certificate(csr_request(
            "not a csr".into(),
            &web.to_string(),
            Some(&a.token),
            3600,
        ))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    let (good, _) = make_csr(&web).expect("csr");
    let mut der = pem::parse(&good).expect("pem").into_contents();
    let n = der.len();
    der[n - 5] ^= 0x55; // flip bits in the signature
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    let err = c
        .create_certificate(csr_request(
            tampered,
            &web.to_string(),
            Some(&a.token),
            3600,
        ))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());

    // An oversized request is refused before it is decoded.
    let huge = "A".repeat(1024 * 1024);
    let err = c
        .create_certificate(csr_request(huge, &web.to_string(), Some(&a.token), 3600))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::OutOfRange, "{}", err.message());

    // And the service still works for a rightful request.
    let (csr, _) = make_csr(&web).expect("csr");
    c.create_certificate(csr_request(csr, &web.to_string(), Some(&a.token), 3600))
        .await
        .expect("issued");
}

#[tokio::test]
async fn ca_key_survives_restart_and_must_be_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = Mesh::start_in(dir.path().to_owned(), Duration::from_secs(3600)).await;
    let root = mesh.controller.root_pem.clone();
    let node = mesh.node("node-a");
    let web = node.workload("default", "web");
    let before = node
        .cert(&web)
        .await
        .borrow()
        .cert()
        .cloned()
        .expect("cert");
    let token = node.token.clone();
    drop(node);
    mesh.controller.shutdown().await;

    let mesh = Mesh::start_in(dir.path().to_owned(), Duration::from_secs(3600)).await;
    assert_eq!(mesh.controller.root_pem, root, "same root after restart");
    // The node's token also survived; a certificate from before still verifies.
    let node = mesh.node("node-a");
    assert_eq!(node.token, token);
    let web = node.workload("default", "web");
    let after = node
        .cert(&web)
        .await
        .borrow()
        .cert()
        .cloned()
        .expect("cert");
    assert_eq!(before.bundle().roots(), after.bundle().roots());
    mesh.controller.shutdown().await;

    // A CA key readable by others stops the controller with a fix in the message.
    use std::os::unix::fs::PermissionsExt;
    let key = dir.path().join("ca/ca-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = weft_controller::app::build(weft_controller::app::Config {
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        ..weft_controller::app::Config::local(dir.path().to_owned())
    })
    .await
    .err()
    .expect("refuses to start");
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

/// An external root and an intermediate, as a user would plug in.
#[tokio::test]
async fn plugged_intermediate_serves_the_full_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    std::fs::create_dir_all(&ca_dir).expect("mkdir");
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut root_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "corp root");
    root_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = root_params.self_signed(&root_key).expect("root");
    let root_issuer = Issuer::new(root_params, root_key);
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut int_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    int_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "weft intermediate");
    int_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    let int = int_params
        .signed_by(&int_key, &root_issuer)
        .expect("intermediate");
    let write = |name: &str, data: String, mode: u32| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(ca_dir.join(name))
            .expect("open");
        f.write_all(data.as_bytes()).expect("write");
    };
    write("ca-cert.pem", int.pem(), 0o644);
    write("ca-key.pem", int_key.serialize_pem(), 0o600);
    write("root-cert.pem", root.pem(), 0o644);
    write(
        "cert-chain.pem",
        format!("{}{}", int.pem(), root.pem()),
        0o644,
    );

    let mesh = Mesh::start_in(dir.path().to_owned(), Duration::from_secs(3600)).await;
    let node = mesh.node("node-a");
    let (web, api) = (
        node.workload("default", "web"),
        node.workload("default", "api"),
    );
    let (csr, _) = make_csr(&web).expect("csr");
    let resp = client(&mesh)
        .create_certificate(csr_request(csr, &web.to_string(), Some(&node.token), 3600))
        .await
        .expect("issued")
        .into_inner();
    assert_eq!(resp.cert_chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(resp.cert_chain[1], int.pem());
    assert_eq!(resp.cert_chain[2], root.pem());
    // And HBONE works across the intermediate.
    let server = HboneServer::echo(node.cert(&api).await).await;
    let pool = Pool::new(PoolSettings::default());
    let key = PoolKey {
        src: web.clone(),
        dst: api.clone(),
        dst_addr: server.addr,
        src_ip: None,
    };
    let s = pool
        .connect(
            &key,
            &node.cert(&web).await,
            ConnectRequest {
                authority: server.addr,
                headers: Default::default(),
            },
        )
        .await
        .expect("tunnel through intermediate chain");
    assert_eq!(s.peer_identity(), Some(&api));
}

/// Leaves a peer must refuse even though our CA key signed them.
#[tokio::test]
async fn peers_refuse_expired_ca_and_ambiguous_leaves() {
    let Pair {
        mesh, web, server, ..
    } = Pair::start().await;
    let root_pem = mesh.controller.root_pem.clone();
    let ca_key = KeyPair::from_pem(
        &std::fs::read_to_string(mesh.data_dir.join("ca/ca-key.pem")).expect("key"),
    )
    .expect("key");
    let issuer = Issuer::from_ca_cert_pem(&root_pem, ca_key).expect("issuer");

    type Tweak = fn(&mut CertificateParams);
    let cases: [(&str, Tweak); 7] = [
        ("expired", |p| {
            p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
            p.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        }),
        ("CA:true leaf", |p| {
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
        }),
        ("two URI SANs", |p| {
            p.subject_alt_names.push(SanType::URI(
                "spiffe://cluster.local/ns/default/sa/other"
                    .try_into()
                    .expect("uri"),
            ))
        }),
        ("no URI SAN", |p| {
            p.subject_alt_names = vec![SanType::DnsName("web.default".try_into().expect("dns"))]
        }),
        ("a DNS SAN beside the SPIFFE ID", |p| {
            p.subject_alt_names
                .push(SanType::DnsName("web.default".try_into().expect("dns")))
        }),
        ("an IP SAN beside the SPIFFE ID", |p| {
            p.subject_alt_names
                .push(SanType::IpAddress([10, 0, 0, 1].into()))
        }),
        ("an otherName SAN beside the SPIFFE ID", |p| {
            // The UPN otherName Windows logons use.
            p.subject_alt_names.push(SanType::OtherName((
                vec![1, 3, 6, 1, 4, 1, 311, 20, 2, 3],
                rcgen::OtherNameValue::Utf8String("admin@example.com".into()),
            )))
        }),
    ];
    for (i, (what, tweak)) in cases.into_iter().enumerate() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = vec![SanType::URI(web.to_string().try_into().expect("uri"))];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ];
        tweak(&mut params);
        let leaf = params.signed_by(&key, &issuer).expect("leaf");
        // Build a WorkloadCert the way the manager would; it must refuse too.
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let built = WorkloadCert::from_pem_chain(&web, key_der, &[leaf.pem(), root_pem.clone()]);
        assert!(
            built.is_err(),
            "{what}: the certificate manager must not accept it"
        );

        // Present it on the wire anyway.
        let config = Arc::new(crafted_client(&key, &leaf));
        let tcp = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        let result = tokio_rustls::TlsConnector::from(config)
            .connect(tls::server_name(), tcp)
            .await;
        if let Ok(mut s) = result {
            // TLS 1.3: the client may finish before the server's alert arrives.
            let mut buf = [0u8; 1];
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read(&mut s, &mut buf),
            )
            .await;
        }
        eventually(what, || {
            server.stats.handshake_failures.load(Ordering::Relaxed) == i as u64 + 1
        })
        .await;
    }
    assert!(server.handler.seen.lock().expect("lock").is_empty());
    let _ = web;
}

/// A client that presents `leaf` and trusts any server: only the server's
/// verdict is under test.
fn crafted_client(key: &KeyPair, leaf: &rcgen::Certificate) -> rustls::ClientConfig {
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_auth_cert(vec![leaf.der().clone()], key)
        .expect("client cert");
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
