//! The loopback variant of `weft demo`, for machines where it cannot run as
//! root: the controller's CA on a fresh data dir, two nodes that
//! authenticate with their tokens and obtain workload certificates over gRPC,
//! and a request carried through an HBONE tunnel between them, with both
//! identities verified and two refusals shown.

#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weft_proto::certs::{CaClient, CertConfig, CertManager, GrpcCaClient, make_csr};
use weft_proto::hbone::pool::{ConnectRequest, Pool, PoolKey, PoolSettings};
use weft_proto::hbone::server::{self, Handler, InboundConnect, ServerStats};
use weft_proto::hbone::{H2Settings, HboneError};
use weft_proto::identity::Identity;
use weft_proto::tls::{self, TrustBundle};

use weft_controller::app::{self, Config};

const PAYLOAD: usize = 1024 * 1024;

/// The "api" application behind the HBONE listener: greets the caller by the
/// identity HBONE verified, then echoes what it is sent.
struct Api;

impl Handler for Api {
    async fn handle(&self, c: InboundConnect) {
        let greeting = format!("hello {}, this is api\n", c.peer);
        let Ok(mut s) = c.accept() else { return };
        if s.write_all(greeting.as_bytes()).await.is_err() {
            return;
        }
        let (mut r, mut w) = tokio::io::split(s);
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    }
}

struct Check {
    ok: bool,
    what: String,
}

pub async fn run(keep: bool) -> anyhow::Result<()> {
    let dir = tempdir()?;
    println!("weft demo (loopback variant) — identity, CA and HBONE on 127.0.0.1\n");
    let controller = app::build(Config {
        grpc_addr: "127.0.0.1:0".parse()?,
        ..Config::local(dir.clone())
    })
    .await
    .context("starting the controller")?;
    let roots = Arc::new(TrustBundle::from_pem(&controller.root_pem)?);
    println!(
        "controller  CA on {} as {}",
        controller.grpc_addr, controller.identity
    );
    println!("            data dir {} (root key 0600)", dir.display());

    let td = "cluster.local";
    let web = Identity::new(td, "default", "web")?;
    let api = Identity::new(td, "prod", "api")?;
    let node_client = |name: &str| -> anyhow::Result<GrpcCaClient> {
        let token_path = controller.nodes.ensure(name)?;
        Ok(GrpcCaClient::new(
            controller.grpc_addr,
            roots.clone(),
            controller.identity.clone(),
            token_path,
        ))
    };
    let (ca_a, ca_b) = (
        Arc::new(node_client("node-a")?),
        Arc::new(node_client("node-b")?),
    );
    controller.nodes.place("node-a", web.clone());
    controller.nodes.place("node-b", api.clone());
    let certs_a = CertManager::new(ca_a.clone(), CertConfig::default());
    let certs_b = CertManager::new(ca_b, CertConfig::default());
    let web_cert = certs_a.get(&web, Duration::from_secs(10)).await?;
    let api_cert = certs_b.get(&api, Duration::from_secs(10)).await?;
    for (node, c) in [("node-a", &web_cert), ("node-b", &api_cert)] {
        println!(
            "{node}      {} — certificate {} valid {}s, key made on the node",
            c.identity(),
            short(c.serial()),
            c.remaining().as_secs()
        );
    }

    // node-b: HBONE listener for api.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let hbone_addr = listener.local_addr()?;
    let stats = Arc::new(ServerStats::default());
    let stop = CancellationToken::new();
    tokio::spawn(server::serve(
        listener,
        (certs_b.watch(&api), td.into()),
        Arc::new(Api),
        H2Settings::default(),
        stats.clone(),
        weft_proto::listen::Drain::stopped_by(stop.clone()),
    ));
    println!("node-b      HBONE listener {hbone_addr} for {api}\n");

    let mut checks = Vec::new();
    let pool = Pool::new(PoolSettings::default());
    let key = PoolKey {
        src: web.clone(),
        dst: api.clone(),
        dst_addr: hbone_addr,
        src_ip: None,
    };
    checks.push(traffic(&pool, &key, &certs_a.watch(&web)).await);
    checks.push(pooling(&pool, &key, &certs_a.watch(&web)).await);
    checks.push(wrong_server(&pool, &web, &certs_a.watch(&web), hbone_addr).await);
    checks.push(stolen_identity(ca_a.as_ref(), &api).await);

    println!();
    let failed: Vec<&Check> = checks.iter().filter(|c| !c.ok).collect();
    for c in &checks {
        println!("{} {}", if c.ok { "  ok  " } else { " FAIL " }, c.what);
    }
    println!(
        "\n{} of {} checks passed; HBONE server refused {} handshakes, served {} streams",
        checks.len() - failed.len(),
        checks.len(),
        stats
            .handshake_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        stats.streams.load(std::sync::atomic::Ordering::Relaxed),
    );
    if keep {
        println!(
            "\n--keep: CA on {}, HBONE on {hbone_addr}; Ctrl-C to stop",
            controller.grpc_addr
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    stop.cancel();
    controller.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    if !failed.is_empty() {
        bail!(
            "{}",
            failed
                .iter()
                .map(|c| c.what.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}

/// web → api: 1 MiB through the tunnel and back, identities checked both ways.
async fn traffic(pool: &Pool, key: &PoolKey, cert: &tls::CertWatch) -> Check {
    let started = Instant::now();
    let result = async {
        let authority: SocketAddr = "10.0.2.15:8080".parse()?;
        let mut s = pool
            .connect(
                key,
                cert,
                ConnectRequest {
                    authority,
                    headers: Default::default(),
                },
            )
            .await?;
        let server_id = s.peer_identity().cloned().context("no peer identity")?;
        let mut greeting = Vec::new();
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).await.is_ok() && b[0] != b'\n' {
            greeting.push(b[0]);
        }
        let greeting = String::from_utf8(greeting)?;
        let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i % 253) as u8).collect();
        let (mut r, mut w) = tokio::io::split(s);
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await?;
            w.shutdown().await
        });
        let mut back = Vec::with_capacity(PAYLOAD);
        r.read_to_end(&mut back).await?;
        writer.await??;
        anyhow::ensure!(back == payload, "echo differs from what was sent");
        Ok::<_, anyhow::Error>((server_id, greeting))
    }
    .await;
    match result {
        Ok((server_id, greeting)) => {
            println!("traffic     web → api over HBONE (TLS 1.3, h2 CONNECT)");
            println!("            client verified server as {server_id}");
            println!("            server says: \"{greeting}\"");
            println!(
                "            1 MiB sent and echoed intact in {} ms",
                started.elapsed().as_millis()
            );
            Check {
                ok: server_id == key.dst && greeting.contains(&key.src.to_string()),
                what: "web ↔ api traffic with both identities verified".into(),
            }
        }
        Err(e) => Check {
            ok: false,
            what: format!("web → api traffic: {e}"),
        },
    }
}

/// 20 concurrent tunnels share one TLS connection.
async fn pooling(pool: &Pool, key: &PoolKey, cert: &tls::CertWatch) -> Check {
    let before = pool
        .stats()
        .connections_opened
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut streams = Vec::new();
    for _ in 0..20 {
        let req = ConnectRequest {
            authority: key.dst_addr,
            headers: Default::default(),
        };
        match pool.connect(key, cert, req).await {
            Ok(s) => streams.push(s),
            Err(e) => {
                return Check {
                    ok: false,
                    what: format!("pooling: {e}"),
                };
            }
        }
    }
    let opened = pool
        .stats()
        .connections_opened
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    println!("pooling     20 concurrent tunnels, {opened} new TLS connection(s)");
    Check {
        ok: opened == 0,
        what: "concurrent tunnels reuse the pooled connection".into(),
    }
}

/// web is told the destination runs as prod/db; api's certificate says otherwise.
async fn wrong_server(
    pool: &Pool,
    web: &Identity,
    cert: &tls::CertWatch,
    addr: SocketAddr,
) -> Check {
    let db = match Identity::new(web.trust_domain(), "prod", "db") {
        Ok(id) => id,
        Err(e) => {
            return Check {
                ok: false,
                what: e.to_string(),
            };
        }
    };
    let key = PoolKey {
        src: web.clone(),
        dst: db,
        dst_addr: addr,
        src_ip: None,
    };
    let req = ConnectRequest {
        authority: addr,
        headers: Default::default(),
    };
    match pool.connect(&key, cert, req).await {
        Err(HboneError::Tls { reason, .. }) => {
            println!("denied      web expecting prod/db at api's address: {reason}");
            Check {
                ok: true,
                what: "a server with the wrong identity is refused".into(),
            }
        }
        Err(e) => Check {
            ok: false,
            what: format!("wrong-identity server: unexpected error {e}"),
        },
        Ok(_) => Check {
            ok: false,
            what: "wrong-identity server was accepted".into(),
        },
    }
}

/// node-a asks the CA for api's identity, which runs on node-b.
async fn stolen_identity(ca: &dyn CaClient, api: &Identity) -> Check {
    let result = match make_csr(api) {
        Ok((csr, _key)) => ca.sign(csr, api, Duration::from_secs(3600)).await,
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.to_string().contains("PermissionDenied") => {
            println!("denied      node-a asking the CA for {api}: {e}");
            Check {
                ok: true,
                what: "a node cannot obtain another node's workload identity".into(),
            }
        }
        Err(e) => Check {
            ok: false,
            what: format!("stolen identity: unexpected error {e}"),
        },
        Ok(_) => Check {
            ok: false,
            what: "node-a was issued api's identity".into(),
        },
    }
}

fn short(serial: &str) -> String {
    serial.split(':').take(4).collect::<Vec<_>>().join(":") + "…"
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("weft-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
