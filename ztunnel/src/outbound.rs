//! Outbound: connections leaving a workload, either captured in a pod
//! (redirected to 15001) or asked for over SOCKS5. Find where they go, then
//! HBONE to the destination pod (service VIPs balanced over endpoints), or
//! pass through for destinations outside the mesh.
//!
//! [`open`] routes and connects; [`relay`] copies, counts and logs. SOCKS5
//! answers its client between the two.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::HeaderMap;
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;
use weft_proto::certs::wait_for_cert;
use weft_proto::hbone::copy_bidirectional;
use weft_proto::hbone::metadata::{self, PeerMetadata};
use weft_proto::hbone::pool::{ConnectRequest, PoolKey};
use weft_proto::hbone::relay;
use weft_proto::hbone::{BAGGAGE, FORWARDED, HBONE_PORT};
use weft_proto::identity::Identity;
use weft_proto::model::{Model, Service, Workload};

use crate::error::ConnError;
use crate::netns::{Netns, original_dst};
use crate::node::Node;
use crate::pods::Pod;
use crate::telemetry::{ConnLabels, ConnRecord};
use weft_proto::listen::{Drain, accept_each};

/// How long a connection may wait for its source's first certificate.
const CERT_WAIT: Duration = Duration::from_secs(5);

/// Who an outbound connection is from.
pub struct Source<'a> {
    pub identity: &'a Identity,
    pub workload: &'a str,
    pub addr: SocketAddr,
    /// Dial from inside this namespace (a captured pod); `None`: from the
    /// ztunnel's own (SOCKS5 clients on the node).
    pub netns: Option<&'a Netns>,
}

/// The way to the destination: an HBONE tunnel, or plain TCP (passthrough).
pub enum Stream {
    Hbone(weft_proto::hbone::H2Stream),
    Tcp(TcpStream),
}

pub struct Upstream {
    stream: Stream,
    /// Set for HBONE (mesh traffic is what the metrics describe).
    labels: Option<ConnLabels>,
}

pub async fn serve(node: Arc<Node>, pod: Arc<Pod>, listener: TcpListener, drain: Drain) {
    accept_each(listener, drain, "outbound", move |tcp, peer| {
        let (node, pod) = (node.clone(), pod.clone());
        async move { captured(&node, &pod, tcp, peer).await }
    })
    .await;
}

async fn captured(node: &Node, pod: &Pod, mut tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let Ok(dst) = original_dst(&tcp) else { return };
    let mut rec = ConnRecord::outbound(peer, dst);
    rec.src_identity = Some(pod.identity.to_string());
    let src = Source {
        identity: &pod.identity,
        workload: &pod.spec.name,
        addr: peer,
        netns: Some(&pod.netns),
    };
    // Not redirected: someone connected to 15001 itself. Forwarding would
    // connect to 15001 again, and again — refuse instead of looping.
    let result = if tcp.local_addr().ok() == Some(dst) {
        Err(ConnError::Loop(dst))
    } else {
        open(node, &src, dst).await
    };
    relay(node, &mut tcp, result, &mut rec).await;
}

/// Tunnels tried per connection to a service: the first endpoint and up to
/// two others, so a rollout's departed pods cost no failed connection.
const SERVICE_ATTEMPTS: usize = 3;

/// Routes `dst` and connects to it on `src`'s behalf. A Service VIP is
/// balanced over its endpoints, and an endpoint that cannot take the
/// tunnel is skipped for another (bounded, counted); a pod IP dialled
/// directly is that pod or nothing.
pub async fn open(node: &Node, src: &Source<'_>, dst: SocketAddr) -> Result<Upstream, ConnError> {
    let model = node.model.borrow().clone();
    let Some(svc) = model.service_by_vip(dst.ip()) else {
        return match model.workload_by_ip(dst.ip()) {
            Some(w) if w.meshed && w.waypoint.is_some() => {
                let to = Bound {
                    waypoint: w.waypoint.as_deref().unwrap_or_default(),
                    service: None,
                    workload: &w.name,
                };
                via_waypoint(node, src, &model, to, dst).await
            }
            Some(w) => open_workload(node, src, w, dst.port(), None).await,
            None => passthrough(node, src, dst).await,
        };
    };
    if let Some(waypoint) = &svc.waypoint {
        let to = Bound {
            waypoint,
            service: Some(&svc.key),
            workload: "unknown",
        };
        return via_waypoint(node, src, &model, to, dst).await;
    }
    let port = svc
        .target_port(dst.port())
        .ok_or_else(|| ConnError::NoPort {
            service: svc.key.clone(),
            port: dst.port(),
        })?;
    let mut last = ConnError::NoHealthyUpstream(svc.key.clone());
    for attempt in 0..SERVICE_ATTEMPTS {
        let Some(ep) = pick_available(node, &model, svc) else {
            break;
        };
        if attempt > 0 {
            node.stats.outbound_retried.fetch_add(1, Ordering::Relaxed);
        }
        match open_workload(node, src, ep, port, Some(svc.key.clone())).await {
            Ok(up) => return Ok(up),
            Err(e) if !e.endpoint_unavailable() => return Err(e),
            Err(reason) => {
                warn!(
                    service = svc.key,
                    endpoint = ep.name,
                    reason = %reason,
                    response_flags = reason.flag(),
                    "endpoint unavailable; trying another"
                );
                if let Some(ip) = ep.addresses.first() {
                    node.unavailable.mark(&model, *ip);
                }
                last = reason;
            }
        }
    }
    Err(last)
}

/// The next endpoint in rotation that has not refused a tunnel under this
/// config; when all have, the next one regardless (the marks may be stale).
fn pick_available<'m>(
    node: &Node,
    model: &Arc<Model>,
    svc: &'m Service,
) -> Option<&'m Arc<Workload>> {
    let first = svc.pick()?;
    let usable = |w: &Arc<Workload>| {
        w.addresses
            .first()
            .is_some_and(|ip| !node.unavailable.contains(model, ip))
    };
    if usable(first) {
        return Some(first);
    }
    (1..svc.endpoints().len())
        .filter_map(|_| svc.pick())
        .find(|w| usable(w))
        .or(Some(first))
}

/// A destination bound to a waypoint: what the tunnel's labels say it is.
struct Bound<'a> {
    waypoint: &'a str,
    service: Option<&'a str>,
    workload: &'a str,
}

/// Tunnels to the waypoint `to` is bound to, asking for the original
/// destination (`:authority` = VIP:port or pod IP:port). Fails closed: an
/// unknown waypoint, one with no ready instance, or one that cannot be
/// reached refuses the connection; it is never sent direct.
async fn via_waypoint(
    node: &Node,
    src: &Source<'_>,
    model: &Model,
    to: Bound<'_>,
    dst: SocketAddr,
) -> Result<Upstream, ConnError> {
    let unavailable = |reason: String| ConnError::WaypointUnavailable {
        waypoint: to.waypoint.to_owned(),
        reason,
    };
    let wp = model
        .waypoint(to.waypoint)
        .ok_or_else(|| unavailable("no such waypoint in config".into()))?;
    let ip = wp
        .pick()
        .ok_or_else(|| unavailable("no ready instance".into()))?;
    let stream = hbone(
        node,
        src,
        Dial {
            ip,
            identity: &wp.identity,
        },
        dst,
        to.service,
    )
    .await
    .map_err(|e| match e {
        e @ ConnError::NoCertificate(_) => e,
        e => unavailable(e.to_string()),
    })?;
    Ok(mesh_upstream(src, stream, to.workload, to.service))
}

/// An HBONE upstream and the labels its metrics carry.
fn mesh_upstream(
    src: &Source<'_>,
    stream: weft_proto::hbone::H2Stream,
    workload: &str,
    service: Option<&str>,
) -> Upstream {
    Upstream {
        stream: Stream::Hbone(stream),
        labels: Some(ConnLabels {
            reporter: "source",
            source_workload: src.workload.to_owned(),
            source_principal: src.identity.to_string(),
            destination_workload: workload.to_owned(),
            destination_service: service.unwrap_or("unknown").to_owned(),
            security: "mutual_tls",
        }),
    }
}

/// Where a tunnel goes: the peer's HBONE address and who it must be.
struct Dial<'a> {
    ip: std::net::IpAddr,
    identity: &'a Identity,
}

async fn open_workload(
    node: &Node,
    src: &Source<'_>,
    workload: &Arc<Workload>,
    port: u16,
    service: Option<String>,
) -> Result<Upstream, ConnError> {
    let ip = *workload
        .addresses
        .first()
        .ok_or_else(|| ConnError::NoAddress(workload.key.clone()))?;
    let endpoint = SocketAddr::new(ip, port);
    if !workload.meshed {
        return passthrough(node, src, endpoint).await;
    }
    let to = Dial {
        ip,
        identity: &workload.identity,
    };
    let stream = hbone(node, src, to, endpoint, service.as_deref()).await?;
    Ok(mesh_upstream(
        src,
        stream,
        &workload.name,
        service.as_deref(),
    ))
}

async fn passthrough(node: &Node, src: &Source<'_>, to: SocketAddr) -> Result<Upstream, ConnError> {
    if node.deny_passthrough {
        return Err(ConnError::PassthroughDenied(to));
    }
    let connected = match src.netns {
        Some(netns) => netns.connect(to).await,
        None => TcpStream::connect(to).await,
    };
    let stream = connected.map_err(|source| ConnError::Connect { addr: to, source })?;
    node.stats
        .outbound_passthrough
        .fetch_add(1, Ordering::Relaxed);
    Ok(Upstream {
        stream: Stream::Tcp(stream),
        labels: None,
    })
}

/// An HBONE stream to `to` asking for `authority`.
async fn hbone(
    node: &Node,
    src: &Source<'_>,
    to: Dial<'_>,
    authority: SocketAddr,
    service: Option<&str>,
) -> Result<weft_proto::hbone::H2Stream, ConnError> {
    // The first certificate may still be in flight: wait, bounded.
    let cert = node.certs.watch(src.identity);
    wait_for_cert(cert.clone(), src.identity, CERT_WAIT)
        .await
        .map_err(|e| ConnError::NoCertificate(e.to_string()))?;
    let key = PoolKey {
        src: src.identity.clone(),
        dst: to.identity.clone(),
        dst_addr: SocketAddr::new(to.ip, HBONE_PORT),
        src_ip: src.netns.map(|_| src.addr.ip()),
    };
    // Who is calling and what it asked for, as Istio's ztunnel says it, so
    // the far side (either mesh) labels telemetry without guessing.
    let mut headers = HeaderMap::new();
    let host = service.map(weft_proto::model::service_host);
    if let Ok(v) = metadata::forwarded(src.addr, host.as_deref()).parse() {
        headers.insert(FORWARDED, v);
    }
    let namespace = src.identity.namespace();
    let model = node.model.borrow().clone();
    let labels = model.workload(namespace, src.workload).map(|w| &w.labels);
    let me = PeerMetadata::for_pod(namespace, src.workload, labels.unwrap_or(&BTreeMap::new()));
    if let Ok(v) = me.to_baggage().parse() {
        headers.insert(BAGGAGE, v);
    }
    let req = ConnectRequest { authority, headers };
    let stream = node.pool.connect(&key, &cert, req).await?;
    node.stats.outbound_hbone.fetch_add(1, Ordering::Relaxed);
    Ok(stream)
}

/// Copies between the client and the upstream (if `open` succeeded); `rec`
/// writes the metrics and the one access-log line when it is dropped.
pub async fn relay(
    node: &Node,
    client: &mut TcpStream,
    upstream: Result<Upstream, ConnError>,
    rec: &mut ConnRecord,
) {
    let mut up = match upstream {
        Ok(up) => up,
        Err(e) => return failed(node, rec, e),
    };
    if let Some(labels) = up.labels.take() {
        rec.opened(labels);
    }
    let moved = &rec.moved;
    let copied = match up.stream {
        // Mesh traffic: the client's bytes go into the tunnel as read.
        Stream::Hbone(h2) => relay::relay(client.split(), h2, (&moved.a_to_b, &moved.b_to_a)).await,
        Stream::Tcp(mut tcp) => copy_bidirectional(client, &mut tcp, moved).await,
    };
    match copied {
        Ok(()) => rec.finish("closed", "-"),
        Err(e) => failed(node, rec, ConnError::Copy(e)),
    }
}

fn failed(node: &Node, rec: &mut ConnRecord, e: ConnError) {
    node.stats.outbound_failed.add(e.flag());
    rec.finish(e.to_string(), e.flag());
}
