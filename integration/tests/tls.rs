//! The TLS wire shape every weft endpoint shows a peer: the key-exchange
//! groups offered (post-quantum hybrid first, X25519 as the fallback) and
//! accepted, checked against plain rustls clients and a raw ClientHello.

use std::sync::Arc;

use rustls::NamedGroup;
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
use tokio::io::AsyncReadExt;
use weft_integration::Mesh;
use weft_proto::tls;

/// A client that verifies the controller as any HTTPS client would
/// (WebPKI, mesh root, DNS name) and offers only `groups`.
fn client_offering(
    mesh: &Mesh,
    groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for root in tls::certs_from_pem(&mesh.controller.root_pem).expect("root") {
        roots.add(root).expect("root");
    }
    let provider = CryptoProvider {
        kx_groups: groups,
        ..default_provider()
    };
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

async fn handshake(
    mesh: &Mesh,
    config: Arc<rustls::ClientConfig>,
) -> Result<Option<NamedGroup>, std::io::Error> {
    let tcp = tokio::net::TcpStream::connect(mesh.controller.grpc_addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok(tls
        .get_ref()
        .1
        .negotiated_key_exchange_group()
        .map(|g| g.name()))
}

#[tokio::test]
async fn servers_accept_the_hybrid_and_the_fallback_only() {
    let mesh = Mesh::start().await;
    let pq = handshake(
        &mesh,
        client_offering(&mesh, vec![kx_group::X25519MLKEM768]),
    )
    .await;
    assert_eq!(
        pq.expect("a PQ-only peer is met"),
        Some(NamedGroup::X25519MLKEM768)
    );
    let classic = handshake(&mesh, client_offering(&mesh, vec![kx_group::X25519])).await;
    assert_eq!(
        classic.expect("an X25519 peer is met"),
        Some(NamedGroup::X25519)
    );
    let other = handshake(&mesh, client_offering(&mesh, vec![kx_group::SECP256R1])).await;
    assert!(other.is_err(), "no group in common: {other:?}");
}

/// The groups in a ClientHello's supported_groups and key_share extensions.
fn offered_groups(hello: &[u8]) -> (Vec<u16>, Vec<u16>) {
    let u16_at = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    assert_eq!(hello[0], 22, "a handshake record");
    let body = &hello[5 + 4..]; // record header, handshake header
    let mut i = 2 + 32; // legacy version, random
    i += 1 + body[i] as usize; // session id
    i += 2 + u16_at(body, i) as usize; // cipher suites
    i += 1 + body[i] as usize; // compression methods
    let end = i + 2 + u16_at(body, i) as usize;
    i += 2;
    let (mut supported, mut shares) = (Vec::new(), Vec::new());
    while i + 4 <= end {
        let (kind, len) = (u16_at(body, i), u16_at(body, i + 2) as usize);
        let data = &body[i + 4..i + 4 + len];
        match kind {
            0x000a => {
                supported = (2..data.len())
                    .step_by(2)
                    .map(|j| u16_at(data, j))
                    .collect()
            }
            0x0033 => {
                let mut j = 2;
                while j + 4 <= data.len() {
                    shares.push(u16_at(data, j));
                    j += 4 + u16_at(data, j + 2) as usize;
                }
            }
            _ => {}
        }
        i += 4 + len;
    }
    (supported, shares)
}

#[tokio::test]
async fn clients_offer_the_hybrid_first_then_x25519() {
    let mesh = Mesh::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // weft's client for the controller's port, as proxies dial it.
    let config = tls::controller_client_config(
        tls::Trust::Static(mesh.roots()),
        mesh.controller.identity.clone(),
    );
    tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = tokio_rustls::TlsConnector::from(config)
            .connect(tls::server_name(), tcp)
            .await;
    });
    let (mut s, _) = listener.accept().await.expect("accept");
    let mut hello = vec![0u8; 5];
    s.read_exact(&mut hello).await.expect("record header");
    let len = u16::from_be_bytes([hello[3], hello[4]]) as usize;
    hello.resize(5 + len, 0);
    s.read_exact(&mut hello[5..]).await.expect("ClientHello");
    let (supported, shares) = offered_groups(&hello);
    let (hybrid, x25519) = (0x11ec, 0x001d);
    assert_eq!(supported, [hybrid, x25519], "supported_groups");
    assert_eq!(
        shares.first(),
        Some(&hybrid),
        "key_share leads with the hybrid: {shares:x?}"
    );
}
