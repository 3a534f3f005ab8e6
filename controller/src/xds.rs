//! The config push: Delta xDS (`DeltaAggregatedResources`) on 15012.
//!
//! A proxy subscribes to weft's resource types; the first response for each
//! type carries everything it lacks (its `initial_resource_versions` say what
//! it already has, so a reconnect resends only what changed meanwhile); later
//! responses carry only the resources that changed and the names removed.
//! ACKs and NACKs are recorded per proxy; a NACKed version is not resent
//! until the config changes again.
//!
//! A ztunnel receives every workload and service (it may dial any
//! destination) but only the policies that select a workload on its node
//! (it enforces inbound only).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};
use weft_proto::pb::xds::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use weft_proto::pb::xds::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as PbResource};
use weft_proto::resources::{self, Resource, ZTUNNEL_TYPES};

use crate::nodes::Nodes;
use crate::state::Snapshot;
use crate::state::{ConfigStore, Proxies};

pub struct XdsService {
    store: ConfigStore,
    nodes: Arc<Nodes>,
    proxies: Proxies,
    /// Streams never end by themselves; shutdown ends them.
    shutdown: CancellationToken,
    sync_slots: Arc<tokio::sync::Semaphore>,
}

/// Proxies whose first sync (subscriptions read, the whole config encoded,
/// sent and ACKed) runs at once, by default (`--first-syncs`). A first sync
/// holds the mesh's size in flight (the request's versions, the response
/// and its encoding), so a mass reconnect of 1,000 proxies costs this many
/// of those, not 1,000; the rest wait their turn, serving their last config.
pub const FIRST_SYNCS_AT_ONCE: usize = 8;
/// A slot is given back after this even if the proxy never ACKs.
const FIRST_SYNC_HOLD: Duration = Duration::from_secs(30);

impl XdsService {
    pub fn new(
        store: ConfigStore,
        nodes: Arc<Nodes>,
        proxies: Proxies,
        shutdown: CancellationToken,
        first_syncs: usize,
    ) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(XdsService {
            store,
            nodes,
            proxies,
            shutdown,
            sync_slots: Arc::new(tokio::sync::Semaphore::new(first_syncs.max(1))),
        })
        // A resubscribing proxy lists every resource it holds with its
        // version (~40 bytes each): 50,000 workloads is ~2 MB. Bounded, and
        // only read after the node token was checked.
        .max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

/// The largest config-stream request read: room for the initial versions
/// of a 1,000,000-resource mesh.
const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let node = self
            .nodes
            .authenticate_request(request.metadata())
            .await?
            .name;
        let (tx, rx) = mpsc::channel(16);
        let session = Session {
            node: node.clone(),
            tx,
            proxies: self.proxies.clone(),
            have: HashMap::new(),
            pending: HashMap::new(),
            nacked: HashSet::new(),
            nonce: 0,
        };
        info!(node, "proxy connected to the config stream");
        tokio::spawn(session.run(
            request.into_inner(),
            self.store.subscribe(),
            self.shutdown.clone(),
            self.sync_slots.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What a proxy has of one type.
enum Have {
    /// Exactly what this version held: a proxy in step costs the controller
    /// one pointer per type, not a copy of the mesh's names.
    Snapshot(Arc<Snapshot>),
    /// Name → version: what the proxy said it had when it subscribed, or
    /// what it was sent of a type filtered for its node.
    Names(HashMap<String, String>),
}

struct Session {
    node: String,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    proxies: Proxies,
    /// What the proxy has (or was last sent), per type.
    have: HashMap<String, Have>,
    /// Unanswered responses: nonce → (type, config version, when it was set).
    pending: HashMap<String, (String, u64, std::time::Instant)>,
    /// Types whose latest response the proxy refused.
    nacked: HashSet<String>,
    nonce: u64,
}

impl Session {
    async fn run(
        mut self,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        mut store: watch::Receiver<Arc<Snapshot>>,
        shutdown: CancellationToken,
        sync_slots: Arc<tokio::sync::Semaphore>,
    ) {
        self.proxies.update(&self.node, |s| s.connected = true);
        metrics::gauge!("weft_controller_connected_proxies").increment(1.0);
        // Nothing of this proxy's is read until its first sync has a slot.
        let mut slot = tokio::select! {
            _ = shutdown.cancelled() => None,
            s = sync_slots.acquire_owned() => s.ok(),
        };
        let hold = tokio::time::sleep(FIRST_SYNC_HOLD);
        tokio::pin!(hold);
        loop {
            if slot.is_some() && self.synced() {
                slot = None;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = &mut hold, if slot.is_some() => slot = None,
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        // Clone the snapshot out: a watch guard must not live across an await.
                        let snapshot = store.borrow().clone();
                        if self.on_request(req, &snapshot).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // A request that does not decode: say why, rather than
                        // ending the stream as if all were well (a reset
                        // client never reads it, which costs nothing).
                        debug!(node = self.node, error = %e, "config stream ended");
                        let status = Status::invalid_argument(format!(
                            "malformed DeltaDiscoveryRequest: {}",
                            e.message()
                        ));
                        let _ = self.tx.send(Err(status)).await;
                        break;
                    }
                },
                changed = store.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = store.borrow_and_update().clone();
                    let types: Vec<String> = self.have.keys().cloned().collect();
                    for t in types {
                        if self.push(&t, &snapshot, false).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        self.proxies.update(&self.node, |s| s.connected = false);
        metrics::gauge!("weft_controller_connected_proxies").decrement(1.0);
        info!(
            node = self.node,
            "proxy disconnected from the config stream"
        );
    }

    /// Every type subscribed, and every response ACKed or NACKed.
    fn synced(&self) -> bool {
        ZTUNNEL_TYPES.iter().all(|t| self.have.contains_key(*t)) && self.pending.is_empty()
    }

    async fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        snapshot: &Arc<Snapshot>,
    ) -> Result<(), ()> {
        if !req.response_nonce.is_empty() {
            let Some((type_url, version, created)) = self.pending.remove(&req.response_nonce)
            else {
                return Ok(()); // stale nonce: superseded by a newer response
            };
            match req.error_detail {
                Some(err) => {
                    metrics::counter!("weft_controller_nacks_total").increment(1);
                    warn!(
                        node = self.node,
                        type_url,
                        version,
                        reason = err.message,
                        "proxy NACKed config"
                    );
                    self.nacked.insert(type_url.clone());
                    // The reason is the proxy's text: bounded in length and number.
                    let reason: String = err.message.chars().take(512).collect();
                    self.proxies.update(&self.node, |s| {
                        if s.nacks.len() >= 10 {
                            s.nacks.remove(0);
                        }
                        s.nacks.push(format!("{type_url} v{version}: {reason}"))
                    });
                }
                None => {
                    // Config change (or subscription) to this proxy's ACK.
                    metrics::histogram!("weft_controller_push_latency_seconds")
                        .record(created.elapsed().as_secs_f64());
                    self.nacked.remove(&type_url);
                    self.proxies.update(&self.node, |s| {
                        s.acked.insert(type_url, version);
                    });
                }
            }
            return Ok(());
        }
        if resources::kind(&req.type_url).is_none() {
            // Ignoring it would leave a foreign client waiting forever.
            warn!(
                node = self.node,
                type_url = req.type_url,
                "subscription to a type not served; ending the stream"
            );
            metrics::counter!("weft_controller_xds_refusals_total", "reason" => "unknown_type")
                .increment(1);
            let status = Status::invalid_argument(format!(
                "type {:?} is not served here; weft serves {}",
                req.type_url,
                resources::KINDS.each_ref().map(|k| k.type_url).join(", ")
            ));
            let _ = self.tx.send(Err(status)).await;
            return Err(());
        }
        // A (re)subscription: start from what the proxy says it has.
        self.have.insert(
            req.type_url.clone(),
            Have::Names(req.initial_resource_versions.into_iter().collect()),
        );
        self.push(&req.type_url, snapshot, true).await
    }

    /// Sends what `type_url`'s resources lack relative to `snapshot`. The
    /// first response for a type is sent even when empty, so the proxy
    /// knows its view is complete.
    async fn push(
        &mut self,
        type_url: &str,
        snapshot: &Arc<Snapshot>,
        always: bool,
    ) -> Result<(), ()> {
        let empty = BTreeMap::new();
        let current = snapshot.resources.get(type_url).unwrap_or(&empty);
        // Kinds for selected nodes are filtered by name; the rest sent whole.
        let selected = snapshot.selected_for(type_url, &self.node);
        let filtered = selected.is_some();
        let wanted = |name: &str| selected.is_none_or(|s| s.contains(name));
        let have = self
            .have
            .entry(type_url.to_owned())
            .or_insert_with(|| Have::Names(HashMap::new()));
        let (changed, removed): (Vec<&Arc<Resource>>, Vec<String>) = match &*have {
            Have::Snapshot(prev) => {
                let precomputed = snapshot
                    .delta
                    .as_ref()
                    .filter(|d| d.from == prev.version)
                    .and_then(|d| d.types.get(type_url));
                let computed;
                let d = match precomputed {
                    Some(d) => d,
                    None => {
                        let old = prev.resources.get(type_url).unwrap_or(&empty);
                        computed = resources::delta_named(old, current);
                        &computed
                    }
                };
                let changed = d.changed.iter().filter_map(|n| current.get(n)).collect();
                (changed, d.removed.clone())
            }
            Have::Names(names) => {
                let changed = current
                    .values()
                    .filter(|r| wanted(&r.name) && names.get(&r.name) != Some(&r.version))
                    .collect();
                let removed = names
                    .keys()
                    .filter(|n| !current.contains_key(*n) || !wanted(n))
                    .cloned()
                    .collect();
                (changed, removed)
            }
        };
        // What the proxy has once this is applied: for whole types, exactly
        // this version (shared, not copied per proxy); for filtered ones,
        // the names it was sent.
        match have {
            Have::Names(names) if filtered => {
                for r in &changed {
                    names.insert(r.name.clone(), r.version.clone());
                }
                for n in &removed {
                    names.remove(n);
                }
            }
            _ => *have = Have::Snapshot(snapshot.clone()),
        }
        if changed.is_empty() && removed.is_empty() && !always {
            // Nothing to send: a proxy in step for this type stays in step
            // with the new version (so "ACKed version" reads as "has all of").
            let in_flight = self.pending.values().any(|(t, _, _)| t == type_url);
            if !in_flight && !self.nacked.contains(type_url) {
                let version = snapshot.version;
                self.proxies.update(&self.node, |s| {
                    s.acked.insert(type_url.to_owned(), version);
                });
            }
            return Ok(());
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        // A subscription's latency counts from now, not from the config's birth.
        let start = if always {
            std::time::Instant::now()
        } else {
            snapshot.created
        };
        self.pending.insert(
            nonce.clone(),
            (type_url.to_owned(), snapshot.version, start),
        );
        let count = changed.len();
        let resp = DeltaDiscoveryResponse {
            system_version_info: snapshot.version.to_string(),
            resources: changed
                .into_iter()
                .map(|r| PbResource {
                    version: r.version.clone(),
                    resource: Some(r.body.clone()),
                    name: r.name.clone(),
                    aliases: vec![],
                })
                .collect(),
            type_url: type_url.to_owned(),
            nonce,
            removed_resources: removed,
        };
        self.proxies.update(&self.node, |s| {
            s.last_push_resources = count;
            s.resources_sent += count as u64;
        });
        metrics::counter!("weft_controller_pushes_total").increment(1);
        metrics::counter!("weft_controller_pushed_resources_total").increment(count as u64);
        self.tx.send(Ok(resp)).await.map_err(|_| ())
    }
}
