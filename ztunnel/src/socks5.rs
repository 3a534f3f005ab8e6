//! SOCKS5 (RFC 1928) on 15080: explicit-proxy mode for hosts without
//! capture. CONNECT only, no authentication; the client is identified by its
//! source address, which must belong to a workload in the config (deny on
//! doubt). Destinations: IPv4, IPv6, or a service name from the config
//! (`<name>.<namespace>[.svc.cluster.local]`); no other DNS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;
use weft_proto::model::Model;

use crate::node::Node;
use crate::outbound::{self, Source};
use crate::telemetry::ConnRecord;
use weft_proto::listen::{Drain, accept_each};

/// A SOCKS handshake must finish within this, or the connection is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

// Reply codes (RFC 1928 §6).
const SUCCEEDED: u8 = 0;
const NOT_ALLOWED: u8 = 2;
const HOST_UNREACHABLE: u8 = 4;
const COMMAND_NOT_SUPPORTED: u8 = 7;
const ADDRESS_NOT_SUPPORTED: u8 = 8;

/// Connections closed for malformed SOCKS input (for /metrics and tests).
#[derive(Debug, Default)]
pub struct SocksStats {
    pub malformed: AtomicU64,
    pub refused: AtomicU64,
    pub connected: AtomicU64,
}

impl SocksStats {
    /// The metric these counts are (derived at scrape time).
    pub fn export(&self) {
        for (outcome, count) in [
            ("malformed", &self.malformed),
            ("refused", &self.refused),
            ("connected", &self.connected),
        ] {
            let n = count.load(Ordering::Relaxed);
            weft_proto::telemetry::export_counter(
                "weft_socks5_connections_total",
                &[("outcome", outcome)],
                n,
            );
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SocksError {
    #[error("malformed SOCKS5: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub async fn serve(node: Arc<Node>, listener: TcpListener, stats: Arc<SocksStats>, drain: Drain) {
    accept_each(listener, drain, "socks5", move |tcp, peer| {
        let (node, stats) = (node.clone(), stats.clone());
        async move { handle(&node, &stats, tcp, peer).await }
    })
    .await;
}

async fn handle(node: &Node, stats: &SocksStats, mut tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let model = node.model.borrow().clone();
    let dst = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut tcp, &model)).await {
        Ok(Ok(Ok(dst))) => dst,
        Ok(Ok(Err(code))) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            let _ = reply(&mut tcp, code).await;
            return;
        }
        Ok(Err(e)) => {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            debug!(error = %e, "SOCKS5 handshake failed");
            return;
        }
        Err(_) => {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let Some(workload) = model.workload_by_ip(peer.ip()).cloned() else {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        debug!("SOCKS5 client is not a workload in the config");
        let _ = reply(&mut tcp, NOT_ALLOWED).await;
        return;
    };
    let src = Source {
        identity: &workload.identity,
        workload: &workload.name,
        addr: peer,
        netns: None,
    };
    let mut rec = ConnRecord::outbound(peer, dst);
    rec.src_identity = Some(workload.identity.to_string());
    let upstream = outbound::open(node, &src, dst).await;
    let code = if upstream.is_ok() {
        SUCCEEDED
    } else {
        HOST_UNREACHABLE
    };
    if reply(&mut tcp, code).await.is_err() {
        return rec.finish("SOCKS5 client left before the reply", "DC");
    }
    if upstream.is_ok() {
        stats.connected.fetch_add(1, Ordering::Relaxed);
    }
    outbound::relay(node, &mut tcp, upstream, &mut rec).await;
}

/// Greeting and request; the destination, or the reply code that refuses it.
async fn handshake(
    tcp: &mut TcpStream,
    model: &Model,
) -> Result<Result<SocketAddr, u8>, SocksError> {
    let [version, nmethods] = read::<2>(tcp).await?;
    if version != 5 {
        return Err(SocksError::Malformed("version is not 5"));
    }
    let mut methods = vec![0u8; usize::from(nmethods)];
    tcp.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        tcp.write_all(&[5, 0xff]).await?;
        return Err(SocksError::Malformed("client offers no no-auth method"));
    }
    tcp.write_all(&[5, 0]).await?;
    let [version, command, _reserved, atyp] = read::<4>(tcp).await?;
    if version != 5 {
        return Err(SocksError::Malformed("request version is not 5"));
    }
    let host = match atyp {
        1 => Host::Ip(IpAddr::V4(Ipv4Addr::from(read::<4>(tcp).await?))),
        4 => Host::Ip(IpAddr::V6(Ipv6Addr::from(read::<16>(tcp).await?))),
        3 => {
            let [len] = read::<1>(tcp).await?;
            let mut name = vec![0u8; usize::from(len)];
            tcp.read_exact(&mut name).await?;
            Host::Name(
                String::from_utf8(name).map_err(|_| SocksError::Malformed("name is not UTF-8"))?,
            )
        }
        _ => return Ok(Err(ADDRESS_NOT_SUPPORTED)),
    };
    let port = u16::from_be_bytes(read::<2>(tcp).await?);
    if command != 1 {
        return Ok(Err(COMMAND_NOT_SUPPORTED));
    }
    Ok(match host {
        Host::Ip(ip) => Ok(SocketAddr::new(ip, port)),
        Host::Name(name) => resolve(model, &name)
            .map(|ip| SocketAddr::new(ip, port))
            .ok_or(HOST_UNREACHABLE),
    })
}

enum Host {
    Ip(IpAddr),
    Name(String),
}

/// `<name>.<namespace>` or `<name>.<namespace>.svc.<cluster domain>` → VIP.
fn resolve(model: &Model, name: &str) -> Option<IpAddr> {
    let mut parts = name.trim_end_matches('.').split('.');
    let (svc, ns) = (parts.next()?, parts.next()?);
    model
        .service(&format!("{ns}/{svc}"))?
        .addresses
        .first()
        .copied()
}

async fn read<const N: usize>(tcp: &mut TcpStream) -> Result<[u8; N], SocksError> {
    let mut buf = [0u8; N];
    tcp.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn reply(tcp: &mut TcpStream, code: u8) -> std::io::Result<()> {
    tcp.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    if code != SUCCEEDED {
        let _ = tcp.shutdown().await;
    }
    Ok(())
}
