//! SOCKS5 on the ztunnel, for hosts without capture. Loopback only, no root:
//! the client is this process on 127.0.0.1 (a workload in the config), the
//! destination an HBONE server on 127.0.0.2:15008.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use weft_cli::demo::mesh::ZtunnelOptions;
use weft_integration::{HboneServer, Mesh, read_hello};
use weft_proto::hbone::H2Settings;
use weft_ztunnel::app::Bound;
use weft_ztunnel::node::Mode;

fn config(api: [u8; 4]) -> String {
    let api = std::net::Ipv4Addr::from(api);
    format!(
        "workloads:
  - {{name: host, serviceAccount: host, node: n, addresses: [127.0.0.1]}}
  - {{name: api, serviceAccount: api, node: n, addresses: [{api}], services: [default/api]}}
services:
  - {{name: api, addresses: [10.96.0.10], ports: [{{port: 80, targetPort: 8080}}]}}
"
    )
}

/// A loopback address of this run's own for the destination's HBONE port,
/// so parallel tests and parallel runs never collide on 15008.
fn api_ip() -> [u8; 4] {
    static N: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
    [
        127,
        10 + (std::process::id() % 200) as u8,
        N.fetch_add(1, Ordering::Relaxed),
        2,
    ]
}

struct Setup {
    _mesh: Mesh,
    zt: Bound,
    server: HboneServer<weft_integration::Echo>,
    api: [u8; 4],
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let api_addr = api_ip();
    let mesh = Mesh::start().await;
    let node = mesh.node("n");
    let _host = node.workload("default", "host");
    let api = node.workload("default", "api");
    let server = HboneServer::start_on(
        (api_addr, 15008).into(),
        node.cert(&api).await,
        weft_integration::Echo::default(),
        H2Settings::default(),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let options = ZtunnelOptions {
        mode: Mode::Strict,
        deny_passthrough: true,
        ..Default::default()
    };
    let zt = mesh
        .ztunnel("n", &config(api_addr), dir.path(), options)
        .await;
    Setup {
        _mesh: mesh,
        zt,
        server,
        api: api_addr,
        _dir: dir,
    }
}

/// Greeting + CONNECT; returns the reply code and the stream.
async fn socks_connect(from: &str, proxy: std::net::SocketAddr, request: &[u8]) -> (u8, TcpStream) {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{from}:0").parse().expect("addr"))
        .expect("bind");
    let mut s = sock.connect(proxy).await.expect("connect");
    s.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await.expect("method");
    assert_eq!(choice, [5, 0]);
    s.write_all(request).await.expect("request");
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.expect("reply");
    (reply[1], s)
}

fn connect_ipv4(ip: [u8; 4], port: u16) -> Vec<u8> {
    let mut r = vec![5, 1, 0, 1];
    r.extend(ip);
    r.extend(port.to_be_bytes());
    r
}

fn connect_name(name: &str, port: u16) -> Vec<u8> {
    let mut r = vec![5, 1, 0, 3, name.len() as u8];
    r.extend(name.as_bytes());
    r.extend(port.to_be_bytes());
    r
}

#[tokio::test]
async fn connect_by_ip_and_by_service_name_goes_over_hbone() {
    let setup = setup().await;
    let (zt, server, api) = (&setup.zt, &setup.server, setup.api);
    for request in [
        connect_ipv4(api, 8080),
        connect_name("api.default.svc.cluster.local", 80),
    ] {
        let (code, mut s) = socks_connect("127.0.0.1", zt.socks5_addr, &request).await;
        assert_eq!(code, 0, "SOCKS5 CONNECT refused");
        // The far side saw the host's own SPIFFE identity.
        assert_eq!(
            read_hello(&mut s).await,
            "spiffe://cluster.local/ns/default/sa/host"
        );
        s.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"ping");
    }
    let seen = server.handler.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.authority == (api, 8080).into()));
    // The CONNECT carried who is calling and what it asked for, as Istio's
    // ztunnel spells it (SPEC §3 headers).
    for s in &seen {
        let forwarded = s.headers["forwarded"].to_str().expect("ascii");
        assert!(forwarded.starts_with("for=\"127.0.0.1:"), "{forwarded}");
        assert_eq!(
            s.headers["baggage"],
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.pod.name=host,service.name=host,service.version=latest"
        );
    }
    let by_name = seen[1].headers["forwarded"].to_str().expect("ascii");
    assert!(
        by_name.ends_with("\";host=api.default.svc.cluster.local"),
        "{by_name}"
    );
    assert!(
        !seen[0].headers["forwarded"]
            .to_str()
            .expect("ascii")
            .contains("host=")
    );
    assert_eq!(zt.socks5_stats.connected.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn refusals_and_malformed_input() {
    let setup = setup().await;
    let (zt, api) = (&setup.zt, setup.api);
    let proxy = zt.socks5_addr;
    // Not a workload: refused (not allowed).
    let (code, _) = socks_connect("127.0.0.3", proxy, &connect_ipv4(api, 8080)).await;
    assert_eq!(code, 2);
    // Unknown name; BIND instead of CONNECT; an address type that does not exist.
    let (code, _) = socks_connect("127.0.0.1", proxy, &connect_name("nope.default", 80)).await;
    assert_eq!(code, 4);
    let (code, _) = socks_connect("127.0.0.1", proxy, &[5, 2, 0, 1, 127, 0, 0, 9, 0, 80]).await;
    assert_eq!(code, 7);
    let (code, _) = socks_connect("127.0.0.1", proxy, &[5, 1, 0, 9, 0, 80]).await;
    assert_eq!(code, 8);
    // Outside the mesh with passthrough denied: refused (host unreachable).
    let (code, _) = socks_connect("127.0.0.1", proxy, &connect_ipv4([127, 0, 0, 9], 80)).await;
    assert_eq!(code, 4);
    assert_eq!(zt.socks5_stats.refused.load(Ordering::Relaxed), 4);

    // Garbage, wrong version, truncated: closed, counted, never a panic.
    let garbage: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\n\r\n",
        &[4, 1, 0, 80, 127, 0, 0, 1, 0],
        &[5, 200],
        &[5, 1, 0, 5, 1, 0, 3, 255],
    ];
    for input in garbage {
        let mut s = TcpStream::connect(proxy).await.expect("connect");
        let _ = s.write_all(input).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink))
            .await
            .expect("closed promptly")
            .ok();
    }
    weft_integration::eventually("malformed inputs counted", || {
        zt.socks5_stats.malformed.load(Ordering::Relaxed) == 4
    })
    .await;
    // Still serving afterwards.
    let (code, _) = socks_connect("127.0.0.1", proxy, &connect_ipv4(api, 8080)).await;
    assert_eq!(code, 0);
}
