//! HBONE over real TCP and real rustls, with certificates issued by the real
//! CA over gRPC. No root needed.

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_integration::{HboneServer, Mesh, Pair, eventually, read_hello};
use weft_proto::certs::CertConfig;
use weft_proto::hbone::HboneError;
use weft_proto::hbone::pool::{ConnectRequest, Pool, PoolKey, PoolSettings};
use weft_proto::tls::CertState;

fn request(authority: std::net::SocketAddr) -> ConnectRequest {
    let mut headers = HeaderMap::new();
    headers.insert("forwarded", "for=10.0.0.1".parse().expect("header"));
    ConnectRequest { authority, headers }
}

#[tokio::test]
async fn bytes_round_trip_with_both_identities() {
    let mesh = Mesh::start().await;
    let (a, b) = (mesh.node("node-a"), mesh.node("node-b"));
    let web = a.workload("default", "web");
    let api = b.workload("prod", "api");
    let server = HboneServer::echo(b.cert(&api).await).await;
    let web_cert = a.cert(&web).await;

    let pool = Pool::new(PoolSettings::default());
    let key = PoolKey {
        src: web.clone(),
        dst: api.clone(),
        dst_addr: server.addr,
        src_ip: None,
    };
    let target = "10.1.2.3:8080".parse().expect("addr");
    let mut stream = pool
        .connect(&key, &web_cert, request(target))
        .await
        .expect("tunnel");
    // Client side: the server proved it is `api`.
    assert_eq!(stream.peer_identity(), Some(&api));
    // Server side: it saw the client as `web` (first line of the echo).
    assert_eq!(read_hello(&mut stream).await, web.to_string());

    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(stream);
    let send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&send).await.expect("write");
        w.shutdown().await.expect("half-close");
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut echoed))
        .await
        .expect("bounded")
        .expect("read");
    writer.await.expect("writer");
    assert_eq!(echoed, payload);

    let seen = server.handler.seen.lock().expect("lock")[0].clone();
    assert_eq!(seen.peer, web);
    assert_eq!(seen.authority, target);
    assert_eq!(seen.headers["forwarded"], "for=10.0.0.1");
}

/// A pod's first inbound connection can arrive while its first certificate
/// is still being fetched (the bench's client dialled 3 ms after the
/// server pod was enrolled and was refused with AccessDenied): the server
/// waits for the certificate instead of failing the handshake.
#[tokio::test]
async fn a_listener_waits_for_its_first_certificate() {
    let pair = Pair::start().await;
    let (publish, pending) = tokio::sync::watch::channel(CertState::Initializing);
    // api's listener as a just-enrolled pod's: no certificate yet.
    let server = HboneServer::echo(pending).await;
    let (mut key, web_cert) = pair.web_to_api().await;
    key.dst_addr = server.addr;
    let pool = Pool::new(PoolSettings::default());
    let target = "10.1.2.3:8080".parse().expect("addr");
    let dial = tokio::spawn(async move { pool.connect(&key, &web_cert, request(target)).await });
    eventually("the listener took the connection", || {
        server.stats.connections.load(Ordering::Relaxed) == 1
    })
    .await;
    let issued = pair.node.cert(&pair.api).await.borrow().clone();
    publish.send(issued).expect("listener alive");
    let mut stream = tokio::time::timeout(Duration::from_secs(10), dial)
        .await
        .expect("bounded")
        .expect("task")
        .expect("tunnel once the certificate is in");
    assert_eq!(stream.peer_identity(), Some(&pair.api));
    assert_eq!(read_hello(&mut stream).await, pair.web.to_string());
    assert_eq!(server.stats.handshake_failures.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn concurrent_streams_share_a_connection_until_the_limit() {
    let Pair {
        mesh: _mesh,
        node,
        web,
        api,
        server,
    } = Pair::start().await;
    let web_cert = node.cert(&web).await;
    let key = PoolKey {
        src: web.clone(),
        dst: api.clone(),
        dst_addr: server.addr,
        src_ip: None,
    };

    // (streams per connection, connections spread over, connections made
    // for 50 streams held at once)
    for (limit, spread, want_conns) in [(100, 1, 1), (10, 1, 5), (100, 3, 3), (10, 3, 5)] {
        let pool = Pool::new(PoolSettings {
            max_streams_per_connection: limit,
            spread,
            ..Default::default()
        });
        let opens = (0..50).map(|_| {
            let (pool, key, cert) = (pool.clone(), key.clone(), web_cert.clone());
            tokio::spawn(async move {
                let mut s = pool
                    .connect(&key, &cert, request(key.dst_addr))
                    .await
                    .expect("tunnel");
                read_hello(&mut s).await;
                s
            })
        });
        // Hold all 50 open at once, so the limit is what decides.
        let mut streams = Vec::new();
        for o in opens {
            streams.push(o.await.expect("task"));
        }
        assert_eq!(
            pool.stats().connections_opened.load(Ordering::Relaxed),
            want_conns,
            "limit {limit}, spread {spread}"
        );
        assert_eq!(pool.connection_count(), want_conns as usize);
        for s in &mut streams {
            s.write_all(b"x").await.expect("write");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.expect("echo");
        }
    }
    assert_eq!(
        server.stats.connections.load(Ordering::Relaxed),
        1 + 5 + 3 + 5
    );
}

/// Spreading is for concurrency only: streams one after another, however
/// many, share one connection.
#[tokio::test]
async fn sequential_streams_keep_one_connection_whatever_the_spread() {
    let pair = Pair::start().await;
    let (key, web_cert) = pair.web_to_api().await;
    let server = &pair.server;
    let pool = Pool::new(PoolSettings {
        spread: 4,
        ..Default::default()
    });
    for _ in 0..20 {
        let mut s = pool
            .connect(&key, &web_cert, request(key.dst_addr))
            .await
            .expect("tunnel");
        read_hello(&mut s).await;
    }
    assert_eq!(pool.stats().connections_opened.load(Ordering::Relaxed), 1);
    assert_eq!(server.stats.connections.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn client_refuses_server_with_unexpected_identity() {
    let mesh = Mesh::start().await;
    let node = mesh.node("node-a");
    let (web, api, db) = (
        node.workload("default", "web"),
        node.workload("default", "api"),
        node.workload("default", "db"),
    );
    let server = HboneServer::echo(node.cert(&db).await).await;
    let pool = Pool::new(PoolSettings::default());
    // Config says the destination runs as `api`; the listener is `db`.
    let key = PoolKey {
        src: web.clone(),
        dst: api,
        dst_addr: server.addr,
        src_ip: None,
    };
    let err = pool
        .connect(&key, &node.cert(&web).await, request(server.addr))
        .await
        .err()
        .expect("must refuse");
    assert!(matches!(err, HboneError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("not the expected"), "{err}");
    assert!(server.handler.seen.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn foreign_ca_is_refused_both_ways() {
    let (mesh, other) = (Mesh::start().await, Mesh::start().await);
    let (node, stranger) = (mesh.node("node-a"), other.node("node-x"));
    let (web, api) = (
        node.workload("default", "web"),
        node.workload("default", "api"),
    );
    // Same identity names, different root.
    let (fake_web, fake_api) = (
        stranger.workload("default", "web"),
        stranger.workload("default", "api"),
    );

    // Client from a foreign CA → our server refuses it.
    let server = HboneServer::echo(node.cert(&api).await).await;
    let pool = Pool::new(PoolSettings::default());
    let key = PoolKey {
        src: fake_web.clone(),
        dst: api.clone(),
        dst_addr: server.addr,
        src_ip: None,
    };
    let _ = pool
        .connect(&key, &stranger.cert(&fake_web).await, request(server.addr))
        .await;
    // (The client may or may not see the alert before its request fails;
    // what matters is the server refused and never ran the handler.)
    eventually("server counts the refused handshake", || {
        server.stats.handshake_failures.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(server.handler.seen.lock().expect("lock").is_empty());

    // Server from a foreign CA → our client refuses it.
    let fake_server = HboneServer::echo(stranger.cert(&fake_api).await).await;
    let key = PoolKey {
        src: web.clone(),
        dst: api.clone(),
        dst_addr: fake_server.addr,
        src_ip: None,
    };
    let err = pool
        .connect(&key, &node.cert(&web).await, request(fake_server.addr))
        .await
        .err()
        .expect("must refuse");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    assert!(fake_server.handler.seen.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn garbage_on_the_hbone_port_is_closed_and_counted() {
    let Pair {
        mesh: _mesh,
        node,
        web,
        api,
        server,
    } = Pair::start().await;

    let inputs: [&[u8]; 4] = [
        b"hello plaintext\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00], // TLS record claiming 64 KiB, then nothing useful
        &[
            0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07,
        ],
    ];
    for input in inputs {
        let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
        let _ = tcp.write_all(input).await;
        let _ = tcp.shutdown().await;
        let mut sink = Vec::new();
        // Closed by the server: EOF or reset, bounded in time.
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink))
            .await
            .expect("server closes the connection");
    }
    eventually("all four refused handshakes counted", || {
        server.stats.handshake_failures.load(Ordering::Relaxed) == 4
    })
    .await;

    // Valid mTLS, then HTTP/1.1 instead of HTTP/2.
    let cert = node.cert(&web).await;
    let config = weft_proto::tls::client_config(
        Some(cert.clone()),
        weft_proto::tls::Trust::OwnCert(cert),
        vec![api.clone()],
    );
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(weft_proto::tls::server_name(), tcp)
        .await
        .expect("mTLS is fine");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut sink))
        .await
        .expect("server closes the connection");
    eventually("HTTP/1.1-in-TLS counted as a protocol failure", || {
        server.stats.protocol_failures.load(Ordering::Relaxed) == 1
    })
    .await;

    // No connection task left behind, and nothing reached the handler.
    eventually("no active connections", || {
        server.stats.active_connections.load(Ordering::Relaxed) == 0
    })
    .await;
    assert!(server.handler.seen.lock().expect("lock").is_empty());
    assert_eq!(server.stats.streams.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn non_connect_and_bad_authority_are_refused_per_stream() {
    let Pair {
        mesh: _mesh,
        node,
        web,
        api,
        server,
    } = Pair::start().await;
    let cert = node.cert(&web).await;
    let config = weft_proto::tls::client_config(
        Some(cert.clone()),
        weft_proto::tls::Trust::OwnCert(cert.clone()),
        vec![api.clone()],
    );
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(weft_proto::tls::server_name(), tcp)
        .await
        .expect("mTLS");
    let (mut h2, conn) = h2::client::handshake(tls).await.expect("h2");
    tokio::spawn(conn);
    let get = http::Request::get("http://10.0.0.1:80/")
        .body(())
        .expect("req");
    let (resp, _) = h2.send_request(get, true).expect("send");
    assert_eq!(resp.await.expect("response").status(), 405);
    let bad = http::Request::builder()
        .method("CONNECT")
        .uri("not-an-ip:80")
        .body(())
        .expect("req");
    let (resp, _) = h2.send_request(bad, true).expect("send");
    assert_eq!(resp.await.expect("response").status(), 400);
    // The connection still serves a good stream after the refusals.
    let pool_cert = cert;
    let pool = Pool::new(PoolSettings::default());
    let key = PoolKey {
        src: web,
        dst: api,
        dst_addr: server.addr,
        src_ip: None,
    };
    let mut s = pool
        .connect(&key, &pool_cert, request(server.addr))
        .await
        .expect("tunnel");
    read_hello(&mut s).await;
    assert_eq!(server.stats.bad_requests.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn rotation_keeps_old_streams_and_new_streams_use_the_new_certificate() {
    let mesh = Mesh::start().await;
    // A 4-second certificate renews after about 2 seconds.
    let short = CertConfig {
        ttl: Duration::from_secs(4),
        ..CertConfig::default()
    };
    let node = mesh.node_with("node-a", short);
    let (web, api) = (
        node.workload("default", "web"),
        node.workload("default", "api"),
    );
    let server = HboneServer::echo(node.cert(&api).await).await;
    let mut web_cert = node.cert(&web).await;
    let first_serial = web_cert.borrow().cert().expect("cert").serial().to_owned();

    let pool = Pool::new(PoolSettings::default());
    let key = PoolKey {
        src: web.clone(),
        dst: api.clone(),
        dst_addr: server.addr,
        src_ip: None,
    };
    let mut old = pool
        .connect(&key, &web_cert, request(server.addr))
        .await
        .expect("tunnel");
    read_hello(&mut old).await;

    // Wait for the renewal itself, not for a guessed amount of time.
    web_cert.borrow_and_update();
    tokio::time::timeout(Duration::from_secs(10), web_cert.changed())
        .await
        .expect("renewed within 10 s")
        .expect("manager alive");
    let second_serial = web_cert.borrow().cert().expect("cert").serial().to_owned();
    assert_ne!(first_serial, second_serial);

    // The stream opened before renewal still flows.
    old.write_all(b"still here").await.expect("write");
    let mut buf = [0u8; 10];
    old.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"still here");

    // A new stream goes over a new connection presenting the new certificate.
    let mut new = pool
        .connect(&key, &web_cert, request(server.addr))
        .await
        .expect("tunnel");
    read_hello(&mut new).await;
    assert_eq!(pool.stats().connections_opened.load(Ordering::Relaxed), 2);
    let seen = server.handler.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].peer_serial, first_serial);
    assert_eq!(seen[1].peer_serial, second_serial);
}

#[tokio::test]
async fn idle_connections_are_evicted() {
    let Pair {
        mesh: _mesh,
        node,
        web,
        api,
        server,
    } = Pair::start().await;
    let pool = Pool::new(PoolSettings {
        idle_timeout: Duration::from_millis(200),
        ..Default::default()
    });
    let key = PoolKey {
        src: web.clone(),
        dst: api,
        dst_addr: server.addr,
        src_ip: None,
    };
    let mut s = pool
        .connect(&key, &node.cert(&web).await, request(server.addr))
        .await
        .expect("tunnel");
    read_hello(&mut s).await;
    drop(s);
    eventually("idle connection evicted", || pool.connection_count() == 0).await;
    eventually("server sees the connection close", || {
        server.stats.active_connections.load(Ordering::Relaxed) == 0
    })
    .await;
}

/// A TCP relay that can be frozen: sockets stay open, bytes stop moving — a
/// peer that died without closing (power loss, a partition).
async fn freezable_relay(
    target: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let freeze = tokio_util::sync::CancellationToken::new();
    let f = freeze.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut outbound = TcpStream::connect(target).await.expect("relay connect");
            let f = f.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = f.cancelled() => {}
                }
                // Frozen: hold both sockets open and silent until the test ends.
                std::future::pending::<()>().await;
                drop((inbound, outbound));
            });
        }
    });
    (addr, freeze)
}

#[tokio::test]
async fn keepalive_detects_a_dead_peer() {
    let Pair {
        mesh: _mesh,
        node,
        web,
        api,
        server,
    } = Pair::start().await;
    let (relay, freeze) = freezable_relay(server.addr).await;
    let mut settings = PoolSettings::default();
    settings.h2.keepalive_interval = Some(Duration::from_millis(100));
    settings.h2.keepalive_timeout = Duration::from_millis(300);
    let pool = Pool::new(settings);
    let key = PoolKey {
        src: web.clone(),
        dst: api,
        dst_addr: relay,
        src_ip: None,
    };
    let mut s = pool
        .connect(&key, &node.cert(&web).await, request(relay))
        .await
        .expect("tunnel");
    read_hello(&mut s).await;
    assert_eq!(pool.connection_count(), 1);
    freeze.cancel();
    eventually("dead peer's connection closed by keepalive", || {
        pool.connection_count() == 0
    })
    .await;
    // The stream on it fails instead of hanging.
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("bounded");
    assert!(matches!(read, Err(_) | Ok(0)), "{read:?}");
}

/// A raw HTTP/2 client over mTLS to `addr`, presenting `cert` and expecting
/// `server`: the request handle and the connection's driver task (it ends
/// when the connection does).
async fn raw_h2(
    addr: std::net::SocketAddr,
    cert: weft_proto::tls::CertWatch,
    server: &weft_proto::Identity,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let config = weft_proto::tls::client_config(
        Some(cert.clone()),
        weft_proto::tls::Trust::OwnCert(cert),
        vec![server.clone()],
    );
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(weft_proto::tls::server_name(), tcp)
        .await
        .expect("mTLS");
    let (h2, conn) = h2::client::handshake(tls).await.expect("h2");
    (h2, tokio::spawn(conn))
}

fn connect_to(authority: &str) -> http::Request<()> {
    http::Request::builder()
        .method("CONNECT")
        .uri(authority)
        .body(())
        .expect("req")
}

/// A certificate that expires while its connection is open: the server
/// sends GOAWAY and takes no new stream (pings no longer keep it open);
/// the pool opens no stream on a connection whose peer certificate has
/// expired. Waits are for the certificates' own expiry, bounded.
#[tokio::test]
async fn expired_certificates_end_their_connections() {
    let mesh = Mesh::start().await;
    let short = mesh.node_with(
        "node-a",
        CertConfig {
            ttl: Duration::from_secs(3),
            ..CertConfig::default()
        },
    );
    let long = mesh.node("node-b");
    let (web, api) = (
        short.workload("default", "web"),
        long.workload("default", "api"),
    );
    // Frozen: no renewal rescues either connection.
    let frozen = |w: weft_proto::tls::CertWatch| {
        weft_proto::tls::fixed_cert(w.borrow().cert().expect("cert").clone())
    };
    let web_cert = frozen(short.cert(&web).await);
    let web_expiry = web_cert.borrow().cert().expect("cert").not_after();

    // Server side: a client whose certificate expires mid-connection.
    let server = HboneServer::echo(long.cert(&api).await).await;
    let (mut h2, conn) = raw_h2(server.addr, web_cert.clone(), &api).await;
    let connect = connect_to(&server.addr.to_string());
    let (resp, mut body) = h2.send_request(connect, false).expect("send");
    assert_eq!(resp.await.expect("response").status(), 200);
    body.send_data(bytes::Bytes::new(), true)
        .expect("end stream");
    let ended = tokio::time::timeout(Duration::from_secs(15), conn)
        .await
        .expect("the server ends the connection once the client certificate expires");
    assert!(ended.is_ok());
    assert!(
        std::time::SystemTime::now() >= web_expiry,
        "not before expiry"
    );

    // Pool side: the server's certificate expires; the client's does not.
    let server_cert = frozen(short.cert(&web).await);
    let server_expiry = server_cert.borrow().cert().expect("cert").not_after();
    let server = HboneServer::echo(server_cert).await;
    let pool = Pool::new(PoolSettings::default());
    let key = weft_proto::hbone::pool::PoolKey {
        src: api.clone(),
        dst: web.clone(),
        dst_addr: server.addr,
        src_ip: None,
    };
    let api_cert = long.cert(&api).await;
    let mut s = pool
        .connect(&key, &api_cert, request(server.addr))
        .await
        .expect("tunnel while valid");
    read_hello(&mut s).await;
    drop(s);
    // The certificate's own lifetime, and the second X.509 validity counts
    // in: a handshake within its last second still succeeds.
    let past = server_expiry + Duration::from_millis(1100);
    if let Ok(left) = past.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    let again = pool.connect(&key, &api_cert, request(server.addr)).await;
    assert!(
        again.is_err(),
        "a connection whose peer certificate expired takes no new stream"
    );
}

/// A handler that never answers: it either waits for the client to reset
/// the stream (and counts it abandoned) or, with `ignore_resets`, holds the
/// stream forever.
#[derive(Default)]
struct Stall {
    ignore_resets: bool,
    started: std::sync::atomic::AtomicUsize,
    abandoned: std::sync::atomic::AtomicUsize,
}

impl weft_proto::hbone::server::Handler for Stall {
    async fn handle(&self, mut c: weft_proto::hbone::server::InboundConnect) {
        self.started.fetch_add(1, Ordering::SeqCst);
        if self.ignore_resets {
            std::future::pending::<()>().await;
        }
        c.reset().await;
        self.abandoned.fetch_add(1, Ordering::SeqCst);
    }
}

/// A paced rapid-reset client: each CONNECT is reset once the server has
/// taken it. Reset streams are abandoned by the handler; a handler that
/// ignores resets holds at most `max_pending_streams` of them per
/// connection, and the rest are refused.
#[tokio::test]
async fn rapid_reset_streams_are_abandoned_and_bounded() {
    let Pair { node, web, api, .. } = Pair::start().await;
    let settings = weft_proto::hbone::H2Settings::default();
    let bound = settings.max_pending_streams;
    let rounds = bound + 72;
    for ignore_resets in [false, true] {
        let handler = Stall {
            ignore_resets,
            ..Stall::default()
        };
        let server = HboneServer::start(node.cert(&api).await, handler, settings.clone()).await;
        let (mut h2, _conn) = raw_h2(server.addr, node.cert(&web).await, &api).await;
        let taken = || {
            server.handler.started.load(Ordering::SeqCst) as u64
                + server.stats.refused_pending.load(Ordering::Relaxed)
        };
        for i in 0..rounds {
            h2 = h2.ready().await.expect("connection open");
            let (_resp, mut send) = h2
                .send_request(connect_to("10.0.0.1:80"), false)
                .expect("send");
            eventually("the server took the stream", || taken() > i as u64).await;
            send.send_reset(h2::Reason::CANCEL);
        }
        let started = server.handler.started.load(Ordering::SeqCst);
        if ignore_resets {
            assert_eq!(started, bound, "pending streams held per connection");
            assert_eq!(
                server.stats.refused_pending.load(Ordering::Relaxed),
                (rounds - bound) as u64
            );
        } else {
            assert_eq!(started, rounds);
            eventually("every reset stream abandoned", || {
                server.handler.abandoned.load(Ordering::SeqCst) == rounds
            })
            .await;
            assert_eq!(server.stats.refused_pending.load(Ordering::Relaxed), 0);
        }
    }
}

/// Root rotation on the server side: a connection whose peer was checked
/// against the old trust bundle is retired (GOAWAY, no new stream) once the
/// listener's own certificate comes with another bundle.
#[tokio::test]
async fn a_new_trust_bundle_retires_connections_checked_against_the_old() {
    let Pair { node, web, api, .. } = Pair::start().await;
    let other = Mesh::start().await; // another root
    let other_node = other.node("node-x");
    let api_elsewhere = other_node.workload("default", "api");
    let first = node.cert(&api).await.borrow().clone();
    let (own, watch) = tokio::sync::watch::channel(first);
    let server = HboneServer::echo(watch).await;
    let (mut h2, conn) = raw_h2(server.addr, node.cert(&web).await, &api).await;
    let (resp, mut body) = h2
        .send_request(connect_to(&server.addr.to_string()), false)
        .expect("send");
    assert_eq!(resp.await.expect("response").status(), 200);
    body.send_data(bytes::Bytes::new(), true)
        .expect("end stream");
    // The listener's certificate now comes from the other root.
    let rotated = other_node.cert(&api_elsewhere).await.borrow().clone();
    own.send(rotated).expect("server alive");
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the connection is retired once the roots change");
    assert!(ended.is_ok());
}

/// Bounded work per listener: past its handshakes in flight, or its
/// connections, a new connection is closed at once and counted; a slot
/// given back serves the next.
#[tokio::test]
async fn a_listener_bounds_its_handshakes_and_connections() {
    let Pair { node, web, api, .. } = Pair::start().await;
    let settings = weft_proto::hbone::H2Settings {
        max_handshakes: 2,
        max_connections: 3,
        ..Default::default()
    };
    let server = HboneServer::start(
        node.cert(&api).await,
        weft_integration::Echo::default(),
        settings,
    )
    .await;
    let refused = || server.stats.refused.total();
    let closed_at_once = |mut s: TcpStream| async move {
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    };
    // Two silent clients hold both handshake slots.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    eventually("both handshakes in flight", || {
        server.stats.active_connections.load(Ordering::Relaxed) == 2
    })
    .await;
    closed_at_once(TcpStream::connect(server.addr).await.expect("connect")).await;
    assert_eq!(refused(), 1);
    drop(silent);
    eventually("silent clients gone", || {
        server.stats.active_connections.load(Ordering::Relaxed) == 0
    })
    .await;
    // Three real connections fill the listener; a fourth is refused.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(raw_h2(server.addr, node.cert(&web).await, &api).await);
    }
    closed_at_once(TcpStream::connect(server.addr).await.expect("connect")).await;
    assert_eq!(refused(), 2);
    drop(held.pop());
    eventually("a slot given back", || {
        server.stats.active_connections.load(Ordering::Relaxed) == 2
    })
    .await;
    let (mut h2, _conn) = raw_h2(server.addr, node.cert(&web).await, &api).await;
    let (resp, _) = h2
        .send_request(connect_to(&server.addr.to_string()), false)
        .expect("send");
    assert_eq!(resp.await.expect("response").status(), 200);
}
