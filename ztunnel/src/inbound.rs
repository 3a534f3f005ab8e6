//! Inbound: HBONE on 15008 and plaintext on 15006, inside each pod's
//! namespace. Authorize, then connect to the application from inside the
//! pod with a marked socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::{TcpListener, TcpStream};
use weft_proto::hbone::metadata::PeerMetadata;
use weft_proto::hbone::relay::relay;
use weft_proto::hbone::server::{Handler, InboundConnect};
use weft_proto::hbone::{BAGGAGE, HBONE_PORT, copy_bidirectional};
use weft_proto::identity::Identity;
use weft_proto::model::{Decision, Source};

use crate::capture::{INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::error::InboundRefusal;
use crate::netns::original_dst;
use crate::node::{Mode, Node};
use crate::pods::Pod;
use crate::telemetry::{ConnLabels, ConnRecord};
use weft_proto::listen::{Drain, accept_each};

pub struct Inbound {
    pub node: Arc<Node>,
    pub pod: Arc<Pod>,
}

impl Handler for Inbound {
    async fn handle(&self, mut c: InboundConnect) {
        let mut rec = self.record(&c);
        // Phase 1, before the 200: every refusal is an HTTP status.
        // An HBONE listener is never a relay: only this pod's addresses,
        // and only its application ports (never the ztunnel's own in it).
        if !self.pod.ips.contains(&c.authority.ip()) {
            return self.refuse(c, InboundRefusal::NotThisPod, &mut rec);
        }
        if ZTUNNEL_PORTS.contains(&c.authority.port()) {
            return self.refuse(c, InboundRefusal::ZtunnelPort, &mut rec);
        }
        let src = Source {
            identity: Some(&c.peer),
            ip: c.peer_addr.ip(),
        };
        if let Err(reason) = authorize(&self.node, &self.pod, src, c.authority.port()) {
            return self.refuse(c, InboundRefusal::Denied(reason), &mut rec);
        }
        // A client that resets the stream meanwhile (rapid reset) takes the
        // connect with it: nothing is opened for a stream no one wants.
        let connected = tokio::select! {
            app = self.pod.netns.connect(c.authority) => app,
            reason = c.reset() => {
                metrics::counter!("weft_hbone_abandoned_connects_total").increment(1);
                let reason = format!("stream reset by the client ({reason:?}) before the application answered");
                return rec.finish(reason, "DC");
            }
        };
        let mut app = match connected {
            Ok(app) => app,
            Err(e) => return self.refuse(c, InboundRefusal::AppUnreachable(e), &mut rec),
        };
        // Phase 2, after the 200: an error is a stream reset.
        let (peer, peer_addr, authority) = (c.peer.clone(), c.peer_addr, c.authority);
        // Who called, as its baggage says (a hint for telemetry only, for
        // peers the config does not list, such as another mesh's pods).
        let caller = c
            .headers
            .get(BAGGAGE)
            .and_then(|v| v.to_str().ok())
            .map(PeerMetadata::from_baggage);
        let Ok(tunnel) = c.accept_with(self.answer_headers()) else {
            return rec.finish("stream reset before the 200 was sent", "DC");
        };
        let stats = &self.node.stats;
        stats.inbound_hbone.fetch_add(1, Ordering::Relaxed);
        rec.opened(labels(
            &self.node,
            &self.pod,
            Some(&peer),
            peer_addr,
            caller.as_ref(),
        ));
        let src = Source {
            identity: Some(&peer),
            ip: peer_addr.ip(),
        };
        let port = authority.port();
        let (node, pod) = (&self.node, &self.pod);
        let moved = &rec.moved;
        // The tunnel's bytes go to the application as they arrive, and back.
        let copy = relay(app.split(), tunnel, (&moved.b_to_a, &moved.a_to_b));
        let (reason, flag) = copy_while_allowed(node, pod, src, port, copy).await;
        rec.finish(reason, flag);
    }
}

/// The ztunnel's own ports (SPEC §3): its listeners in each pod's
/// namespace, and its admin, metrics and readiness ports. Never a CONNECT
/// target, or a tunnel could be looped into the mesh's plumbing.
const ZTUNNEL_PORTS: [u16; 6] = [
    OUTBOUND_PORT,
    INBOUND_PLAINTEXT_PORT,
    HBONE_PORT,
    15000,
    15020,
    15021,
];

impl Inbound {
    /// The 200's headers: who answered, in baggage.
    fn answer_headers(&self) -> http::HeaderMap {
        let model = self.node.model.borrow().clone();
        let (ns, name) = (&self.pod.spec.namespace, &self.pod.spec.name);
        let none = std::collections::BTreeMap::new();
        let labels = self.pod.workload(&model).map_or(&none, |w| &w.labels);
        let me = PeerMetadata::for_pod(ns, name, labels);
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = me.to_baggage().parse() {
            headers.insert(BAGGAGE, v);
        }
        headers
    }

    /// The connection's record: who called whom, logged once at its end.
    fn record(&self, c: &InboundConnect) -> ConnRecord {
        let mut rec = ConnRecord::inbound(c.peer_addr, c.authority);
        rec.src_identity = Some(c.peer.to_string());
        rec.dst_identity = Some(self.pod.identity.to_string());
        rec.dst_workload = Some(self.pod.key.clone());
        rec.security = "mutual_tls";
        rec
    }

    /// Phase-1 refusal: logged once with its response flag, counted by
    /// status and flag, answered with its HTTP status.
    fn refuse(&self, c: InboundConnect, why: InboundRefusal, rec: &mut ConnRecord) {
        let (status, flag) = (why.status(), why.flag());
        self.node.stats.hbone_refusals.add(flag);
        rec.finish(format!("{why} [{flag}]"), flag);
        c.refuse(status);
    }
}

fn authorize(node: &Node, pod: &Pod, src: Source<'_>, port: u16) -> Result<(), String> {
    let model = node.model.borrow().clone();
    // Deny on doubt: a pod the config no longer knows gets no traffic.
    let Some(workload) = pod.workload(&model) else {
        return Err("destination workload not in config".into());
    };
    match model.authorize(workload, src, port) {
        Decision::Allow => Ok(()),
        Decision::Deny(reason) => Err(format!("denied: {reason}")),
    }
}

/// Plaintext arriving at the pod (redirected to 15006): refused in STRICT,
/// authorized by source IP alone in PERMISSIVE.
pub async fn serve_plaintext(node: Arc<Node>, pod: Arc<Pod>, listener: TcpListener, drain: Drain) {
    accept_each(listener, drain, "inbound_plaintext", move |tcp, peer| {
        let (node, pod) = (node.clone(), pod.clone());
        async move { plaintext(&node, &pod, tcp, peer).await }
    })
    .await;
}

async fn plaintext(node: &Node, pod: &Pod, mut tcp: TcpStream, peer: SocketAddr) {
    let Ok(dst) = original_dst(&tcp) else { return };
    let mut rec = ConnRecord::inbound(peer, dst);
    rec.dst_identity = Some(pod.identity.to_string());
    rec.dst_workload = Some(pod.key.clone());
    // Not redirected (a direct connection to 15006): forwarding would loop
    // back into this listener. Refused like plaintext in STRICT mode.
    if node.mode == Mode::Strict || tcp.local_addr().ok() == Some(dst) {
        node.stats.plaintext_refused.fetch_add(1, Ordering::Relaxed);
        let reason = if node.mode == Mode::Strict {
            "refused: plaintext in STRICT mode"
        } else {
            "refused: connection to the inbound port itself"
        };
        return rec.finish(reason, "DENY");
    }
    let src = Source {
        identity: None,
        ip: peer.ip(),
    };
    if let Err(reason) = authorize(node, pod, src, dst.port()) {
        node.stats.plaintext_denied.fetch_add(1, Ordering::Relaxed);
        return rec.finish(reason, "DENY");
    }
    let mut app = match pod.netns.connect(dst).await {
        Ok(app) => app,
        Err(e) => return rec.finish(format!("application unreachable: {e}"), "UF"),
    };
    node.stats.inbound_plaintext.fetch_add(1, Ordering::Relaxed);
    rec.opened(labels(node, pod, None, peer, None));
    let copy = copy_bidirectional(&mut tcp, &mut app, &rec.moved);
    let (reason, flag) = copy_while_allowed(node, pod, src, dst.port(), copy).await;
    rec.finish(reason, flag);
}

/// Copies until either side closes, or until a config change means policy
/// would no longer admit this connection: then it is closed, so a new DENY
/// also ends the connections it covers. `copy` counts what it moves as it
/// goes; returns why it ended and the response flag.
async fn copy_while_allowed(
    node: &Node,
    pod: &Pod,
    src: Source<'_>,
    port: u16,
    copy: impl std::future::Future<Output = std::io::Result<()>>,
) -> (String, &'static str) {
    let mut model = node.model.clone();
    model.mark_unchanged();
    let revoked = async {
        loop {
            if model.changed().await.is_err() {
                return std::future::pending::<String>().await;
            }
            if let Err(reason) = authorize(node, pod, src, port) {
                return reason;
            }
        }
    };
    tokio::select! {
        copied = copy => match copied {
            Ok(()) => ("closed".to_owned(), "-"),
            Err(e) => (format!("error: {e}"), "-"),
        },
        reason = revoked => {
            node.stats.inbound_revoked.fetch_add(1, Ordering::Relaxed);
            (format!("closed by a policy change: {reason}"), "DENY")
        }
    }
}

/// Metrics labels for a connection this pod received.
fn labels(
    node: &Node,
    pod: &Pod,
    peer: Option<&Identity>,
    peer_addr: SocketAddr,
    caller: Option<&PeerMetadata>,
) -> ConnLabels {
    let model = node.model.borrow().clone();
    let source_workload = model
        .workload_by_ip(peer_addr.ip())
        .map(|w| w.name.clone())
        .or_else(|| caller.and_then(|c| c.workload.clone()))
        .unwrap_or_else(|| "unknown".into());
    let destination_service = pod
        .workload(&model)
        .and_then(|w| w.services.first().cloned())
        .unwrap_or_else(|| "unknown".into());
    ConnLabels {
        reporter: "destination",
        source_workload,
        source_principal: peer
            .map(|p| p.to_string())
            .unwrap_or_else(|| "unknown".into()),
        destination_workload: pod.spec.name.clone(),
        destination_service,
        security: if peer.is_some() { "mutual_tls" } else { "none" },
    }
}
