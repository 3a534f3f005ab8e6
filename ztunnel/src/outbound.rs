//! Outbound: captured connections from a pod (redirected to 15001). Find
//! where they were going, then HBONE to the destination pod (service VIPs
//! balanced over endpoints), or pass through for destinations outside the
//! mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::HeaderMap;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};
use weft_proto::certs::wait_for_cert;
use weft_proto::hbone::copy_bidirectional;
use weft_proto::hbone::pool::{ConnectRequest, PoolKey};
use weft_proto::hbone::{FORWARDED, HBONE_PORT};
use weft_proto::identity::Identity;

use crate::netns::original_dst;
use crate::node::Node;
use crate::pods::Pod;
use crate::telemetry::ConnLabels;

/// How long a connection may wait for its pod's first certificate.
const CERT_WAIT: Duration = Duration::from_secs(5);

pub async fn serve(node: Arc<Node>, pod: Arc<Pod>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let (node, pod) = (node.clone(), pod.clone());
        let span = info_span!("outbound", src.addr = %peer);
        tokio::spawn(async move { handle(&node, &pod, tcp, peer).await }.instrument(span));
    }
}

/// Where a captured connection goes.
enum Route {
    Hbone {
        endpoint: SocketAddr,
        identity: Identity,
        /// For metrics labels.
        workload: String,
        service: String,
    },
    Passthrough(SocketAddr),
}

fn route(node: &Node, dst: SocketAddr) -> Option<Route> {
    let model = node.model.borrow().clone();
    let (workload, port, service) = match model.service_by_vip(dst.ip()) {
        Some(svc) => (
            svc.pick()?.clone(),
            svc.target_port(dst.port())?,
            svc.key.clone(),
        ),
        None => match model.workload_by_ip(dst.ip()) {
            Some(w) => (w.clone(), dst.port(), "unknown".to_owned()),
            None => return Some(Route::Passthrough(dst)),
        },
    };
    let ip = *workload.addresses.first()?;
    if !workload.meshed {
        return Some(Route::Passthrough(SocketAddr::new(ip, port)));
    }
    Some(Route::Hbone {
        endpoint: SocketAddr::new(ip, port),
        identity: workload.identity.clone(),
        workload: workload.name.clone(),
        service,
    })
}

async fn handle(node: &Node, pod: &Pod, mut tcp: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let Ok(dst) = original_dst(&tcp) else { return };
    let result = match route(node, dst) {
        None => Err(format!(
            "{dst} is a service with no ready endpoint for that port"
        )),
        Some(Route::Passthrough(_)) if node.deny_passthrough => {
            Err("destination outside the mesh and passthrough is denied".into())
        }
        Some(Route::Passthrough(to)) => passthrough(node, pod, &mut tcp, to).await,
        Some(Route::Hbone {
            endpoint,
            identity,
            workload,
            service,
        }) => {
            let labels = ConnLabels {
                reporter: "source",
                source_workload: pod.spec.name.clone(),
                source_principal: pod.identity.to_string(),
                destination_workload: workload,
                destination_service: service,
                security: "mutual_tls",
            };
            labels.opened();
            let result = hbone(node, pod, &mut tcp, peer, endpoint, &identity).await;
            let (sent, received) = result.as_ref().copied().unwrap_or_default();
            labels.closed(sent, received);
            result
        }
    };
    let (bytes, reason) = match result {
        Ok(b) => (b, "closed".to_owned()),
        Err(reason) => {
            node.stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
            ((0, 0), reason)
        }
    };
    info!(
        target: "access",
        direction = "outbound",
        src.identity = %pod.identity,
        src.addr = %peer,
        dst.addr = %dst,
        bytes_sent = bytes.0,
        bytes_received = bytes.1,
        duration_ms = started.elapsed().as_millis() as u64,
        reason,
        "connection"
    );
}

async fn passthrough(
    node: &Node,
    pod: &Pod,
    tcp: &mut TcpStream,
    to: SocketAddr,
) -> Result<(u64, u64), String> {
    let mut upstream = pod
        .netns
        .connect(to)
        .await
        .map_err(|e| format!("connect {to}: {e}"))?;
    node.stats
        .outbound_passthrough
        .fetch_add(1, Ordering::Relaxed);
    copy_bidirectional(tcp, &mut upstream)
        .await
        .map_err(|e| e.to_string())
}

async fn hbone(
    node: &Node,
    pod: &Pod,
    tcp: &mut TcpStream,
    peer: SocketAddr,
    endpoint: SocketAddr,
    dst_identity: &Identity,
) -> Result<(u64, u64), String> {
    // The first certificate may still be in flight: wait, bounded.
    let cert = node.certs.watch(&pod.identity);
    wait_for_cert(cert.clone(), &pod.identity, CERT_WAIT)
        .await
        .map_err(|e| e.to_string())?;
    let key = PoolKey {
        src: pod.identity.clone(),
        dst: dst_identity.clone(),
        dst_addr: SocketAddr::new(endpoint.ip(), HBONE_PORT),
        src_ip: Some(peer.ip()),
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = format!("for={}", peer.ip()).parse() {
        headers.insert(FORWARDED, v);
    }
    let req = ConnectRequest {
        authority: endpoint,
        headers,
    };
    let mut tunnel = node
        .pool
        .connect(&key, &cert, req)
        .await
        .map_err(|e| e.to_string())?;
    node.stats.outbound_hbone.fetch_add(1, Ordering::Relaxed);
    copy_bidirectional(tcp, &mut tunnel)
        .await
        .map_err(|e| e.to_string())
}
