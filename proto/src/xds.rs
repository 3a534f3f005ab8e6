//! The config-stream client proxies use: Delta xDS to the controller,
//! resources applied to a local cache and validated into a [`Model`].
//!
//! - No model is published until every subscribed type has had its first
//!   response: a half-received config (workloads but no policies yet) would
//!   briefly mean "allow everything".
//! - A response that does not validate is NACKed with the reason and not
//!   applied; the last good model keeps serving.
//! - When the controller goes away the last good model keeps serving; the
//!   client reconnects with jittered backoff and tells the controller what
//!   it has, so only changes are resent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::credential::Credential;
use crate::identity::Identity;
use crate::model::{Changes, Model};
use crate::pb::google::rpc::Status as RpcStatus;
use crate::pb::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::pb::xds::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use crate::resources;
use crate::roots::Roots;
use crate::tls;

#[derive(Debug, Clone)]
pub struct XdsConfig {
    pub controller: SocketAddr,
    pub roots: Roots,
    pub controller_identity: Identity,
    pub credential: Credential,
    pub node: String,
    pub trust_domain: String,
    /// The kinds this proxy subscribes to (a ztunnel:
    /// [`resources::ZTUNNEL_TYPES`]; a waypoint, its own);
    /// nothing is published until each has had its first response.
    pub types: &'static [&'static str],
}

/// Counters for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct XdsStats {
    pub connects: AtomicU64,
    pub responses: AtomicU64,
    pub nacks: AtomicU64,
}

/// What the proxy holds: the versions it has, per type and name (what a
/// reconnect reports), and the model they make. A response decodes only
/// what it carries and is applied to the model incrementally.
#[derive(Default)]
struct Cache {
    versions: BTreeMap<String, BTreeMap<String, String>>,
    model: Arc<Model>,
}

impl Cache {
    fn versions(&self, type_url: &str) -> std::collections::HashMap<String, String> {
        self.versions
            .get(type_url)
            .map(|m| m.iter().map(|(n, v)| (n.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}

/// Starts the client; the watch holds `None` until the first complete config.
pub fn spawn(config: XdsConfig) -> (watch::Receiver<Option<Arc<Model>>>, Arc<XdsStats>) {
    let (tx, rx) = watch::channel(None);
    let stats = Arc::new(XdsStats::default());
    tokio::spawn(run(config, tx, stats.clone()));
    (rx, stats)
}

async fn run(config: XdsConfig, tx: watch::Sender<Option<Arc<Model>>>, stats: Arc<XdsStats>) {
    let tls = tls::controller_client_config(
        tls::Trust::Followed(config.roots.clone()),
        config.controller_identity.clone(),
    );
    let channel = crate::grpc::tls_channel(config.controller, tls);
    let mut cache = Cache::default();
    let mut delay = Duration::from_millis(200);
    loop {
        stats.connects.fetch_add(1, Ordering::Relaxed);
        let before = stats.responses.load(Ordering::Relaxed);
        let result = session(&config, channel.clone(), &mut cache, &tx, &stats).await;
        if stats.responses.load(Ordering::Relaxed) > before {
            delay = Duration::from_millis(200); // it worked for a while
        }
        match result {
            Ok(()) => info!("config stream closed by the controller; reconnecting"),
            Err(e) => warn!(error = %e, "config stream failed; serving the last good config"),
        }
        if tx.is_closed() {
            return;
        }
        let jittered = delay.mul_f64(rand::rng().random_range(0.8..1.2));
        tokio::time::sleep(jittered).await;
        delay = (delay * 2).min(Duration::from_secs(15));
    }
}

async fn session(
    config: &XdsConfig,
    channel: tonic::transport::Channel,
    cache: &mut Cache,
    tx: &watch::Sender<Option<Arc<Model>>>,
    stats: &XdsStats,
) -> Result<(), tonic::Status> {
    let (req_tx, req_rx) = mpsc::channel(16);
    for &type_url in config.types {
        let have = cache.versions(type_url);
        let subscribe = DeltaDiscoveryRequest {
            node: Some(Node {
                id: config.node.clone(),
                ..Default::default()
            }),
            type_url: type_url.to_owned(),
            initial_resource_versions: have,
            ..Default::default()
        };
        let _ = req_tx.send(subscribe).await;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(req_rx));
    let bearer = config
        .credential
        .bearer()
        .map_err(|e| tonic::Status::unauthenticated(e.to_string()))?;
    request.metadata_mut().insert("authorization", bearer);
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    let mut seen: Vec<String> = Vec::new();
    while let Some(resp) = responses.message().await? {
        stats.responses.fetch_add(1, Ordering::Relaxed);
        let type_url = resp.type_url.clone();
        let nonce = resp.nonce.clone();
        let error = match apply(cache, resp, &config.trust_domain) {
            Ok(model) => {
                if !seen.contains(&type_url) {
                    seen.push(type_url.clone());
                }
                // Publish only once every type has arrived at least once.
                if config.types.iter().all(|t| seen.iter().any(|s| s == t)) || tx.borrow().is_some()
                {
                    tx.send_replace(Some(model));
                }
                None
            }
            Err(reason) => {
                stats.nacks.fetch_add(1, Ordering::Relaxed);
                warn!(
                    type_url,
                    reason, "config rejected (NACK); keeping the last good config"
                );
                Some(RpcStatus {
                    code: 3,
                    message: reason,
                    details: vec![],
                })
            }
        };
        let ack = DeltaDiscoveryRequest {
            type_url,
            response_nonce: nonce,
            error_detail: error,
            ..Default::default()
        };
        if req_tx.send(ack).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Applies one response; if the result is invalid the cache is left as it
/// was. Only the resources in the response are decoded, and the model is
/// patched, not rebuilt.
fn apply(
    cache: &mut Cache,
    resp: DeltaDiscoveryResponse,
    trust_domain: &str,
) -> Result<Arc<Model>, String> {
    let type_url = resp.type_url;
    // A type weft does not know is refused whole, never read as another.
    let kind = resources::kind(&type_url).ok_or_else(|| {
        format!("type {type_url:?} is not one weft subscribes to; response refused")
    })?;
    let mut changes = Changes::default();
    for name in &resp.removed_resources {
        kind.remove_into(name.clone(), &mut changes);
    }
    let mut versions = Vec::with_capacity(resp.resources.len());
    for r in resp.resources {
        let body = r
            .resource
            .ok_or_else(|| format!("resource {} has no body", r.name))?;
        kind.decode_into(&r.name, &body, trust_domain, &mut changes)
            .map_err(|e| e.to_string())?;
        versions.push((r.name, r.version));
    }
    let model = Arc::new(cache.model.apply(changes).map_err(|e| e.to_string())?);
    let have = cache.versions.entry(type_url).or_default();
    for name in &resp.removed_resources {
        have.remove(name);
    }
    have.extend(versions);
    cache.model = model.clone();
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::xds::Resource as PbResource;

    fn response(
        type_url: &str,
        resources: Vec<(&str, prost_types::Any)>,
        removed: Vec<&str>,
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            nonce: "1".into(),
            resources: resources
                .into_iter()
                .map(|(n, a)| PbResource {
                    name: n.into(),
                    version: "v".into(),
                    resource: Some(a),
                    aliases: vec![],
                })
                .collect(),
            removed_resources: removed.into_iter().map(String::from).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn invalid_response_is_refused_and_cache_untouched() {
        let model = Model::from_yaml(
            "workloads: [{name: a, node: n, addresses: [10.0.0.1]}]",
            "cluster.local",
        )
        .expect("valid");
        let enc = resources::encode(&model);
        let a = enc[resources::WORKLOAD]["default/a"].body.clone();
        let mut cache = Cache::default();
        apply(
            &mut cache,
            response(resources::WORKLOAD, vec![("default/a", a.clone())], vec![]),
            "cluster.local",
        )
        .expect("valid");
        // A second workload claiming the same IP: the whole config is invalid.
        let clash = Model::from_yaml(
            "workloads: [{name: b, node: n, addresses: [10.0.0.1]}]",
            "cluster.local",
        )
        .expect("valid");
        let b = resources::encode(&clash)[resources::WORKLOAD]["default/b"]
            .body
            .clone();
        let err = apply(
            &mut cache,
            response(resources::WORKLOAD, vec![("default/b", b)], vec![]),
            "cluster.local",
        )
        .expect_err("clash");
        assert!(err.contains("already used"), "{err}");
        assert_eq!(
            (
                cache.versions[resources::WORKLOAD].len(),
                cache.model.workloads.len()
            ),
            (1, 1),
            "refused response left the cache as it was"
        );
        // Removal applies.
        let m = apply(
            &mut cache,
            response(resources::WORKLOAD, vec![], vec!["default/a"]),
            "cluster.local",
        )
        .expect("valid");
        assert!(m.workloads.is_empty());
        // A body of the wrong type is refused.
        let wrong = response(resources::SERVICE, vec![("x", a)], vec![]);
        assert!(apply(&mut cache, wrong, "cluster.local").is_err());
    }

    /// A response of a type weft does not know is refused loudly, never
    /// mapped onto another kind (its removals once removed policies).
    #[test]
    fn an_unknown_type_is_refused_not_read_as_another() {
        let model = Model::from_yaml(
            "workloads: [{name: a, node: n, addresses: [10.0.0.1]}]\npolicies: [{name: p, action: DENY, rules: [{}]}]",
            "cluster.local",
        )
        .expect("valid");
        let enc = resources::encode(&model);
        let mut cache = Cache::default();
        for t in [resources::WORKLOAD, resources::AUTHORIZATION] {
            let items = enc[t]
                .values()
                .map(|r| (r.name.as_str(), r.body.clone()))
                .collect();
            apply(&mut cache, response(t, items, vec![]), "cluster.local").expect("valid");
        }
        let foreign = response(
            "type.googleapis.com/weft.v1.Nope",
            vec![],
            vec!["default/p"],
        );
        let err = apply(&mut cache, foreign, "cluster.local").expect_err("refused");
        assert!(err.contains("weft.v1.Nope"), "{err}");
        assert_eq!(cache.model.policies.len(), 1, "the policy is still there");
    }
}
