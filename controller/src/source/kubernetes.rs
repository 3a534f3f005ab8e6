//! The Kubernetes source: kube-runtime reflectors on the kinds translation
//! reads feed the same pure [`translate`] the local directory uses. This
//! layer only watches, collects and debounces; resource versions, relists
//! after `410 Gone`, and deletions are kube-runtime's (its watcher restarts
//! with backoff and the reflector store replaces its contents on every
//! relist). The Gateway API kinds are watched only while discovery lists
//! them. Pod and EndpointSlice events are recorded by key and applied pod
//! by pod; anything else takes the full translation, and a relist of
//! nothing over nothing takes none.
//!
//! Tested against a stand-in API server (tests/kubernetes.rs); RBAC it
//! needs: `manifests/weft.yaml` (list/watch on [`watched`]; the reviews
//! callers need are crate::kube_auth's).

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gateway_api::experimental::httproutes::HttpRoute;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use weft_proto::model::Model;

use super::crds::{AuthorizationPolicy, BackendPolicy, FaultInjection, RateLimit};
use super::gateway::ReferenceGrant;
use super::translate::{apply_pods, apply_slices, translate};
use super::{Objects, SourceStatus};
use crate::state::ConfigStore;

/// Changes arriving within this window are translated once.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// The Gateway API: most clusters do not have it, so its kinds are watched
/// only while discovery lists them, and forgotten when it stops.
const GATEWAY_API: &str = "gateway.networking.k8s.io/v1";
/// ReferenceGrant: served at v1beta1 by every Gateway API release.
const GATEWAY_API_BETA: &str = "gateway.networking.k8s.io/v1beta1";
/// How often discovery is asked whether optional kinds came or went.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(10);

/// A running Kubernetes source.
pub struct Kubernetes {
    pub client: Client,
    pub status: watch::Receiver<Arc<SourceStatus>>,
    /// Changes applied pod by pod rather than by a full translation.
    pub incremental: Arc<AtomicU64>,
    /// Full translations made.
    pub full: Arc<AtomicU64>,
}

/// The kinds translation reads: nothing else is watched (a Node status
/// update every few seconds must cost nothing).
struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    authorization_policies: Store<AuthorizationPolicy>,
    backend_policies: Store<BackendPolicy>,
    fault_injections: Store<FaultInjection>,
    rate_limits: Store<RateLimit>,
    gateways: Optional<Gateway>,
    http_routes: Optional<HttpRoute>,
    grpc_routes: Optional<GrpcRoute>,
    reference_grants: Optional<ReferenceGrant>,
}

/// A kind watched only while the API server serves it.
struct Optional<K: Resource<DynamicType = ()> + Clone + 'static> {
    watching: std::sync::Mutex<Option<(Store<K>, CancellationToken)>>,
}

impl<K> Optional<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    fn new() -> Self {
        Optional {
            watching: std::sync::Mutex::new(None),
        }
    }

    /// Starts or stops the watch to match `served`; true when objects were
    /// forgotten (a translation is due). A new watch reports its own list.
    fn sync(&self, served: bool, w: &Watch) -> bool {
        let mut watching = self.watching.lock().expect("poisoned");
        match (served, watching.is_some()) {
            (true, false) => {
                info!(kind = %K::kind(&()), "kind served by the API server; watching it");
                let stop = w.shutdown.child_token();
                *watching = Some((w.watch_as::<K>(KeyedBy::No, stop.clone()), stop));
                false
            }
            (false, true) => {
                info!(kind = %K::kind(&()), "kind no longer served; its objects are forgotten");
                if let Some((_, stop)) = watching.take() {
                    stop.cancel();
                }
                true
            }
            _ => false,
        }
    }

    fn state(&self) -> Vec<Arc<K>> {
        let watching = self.watching.lock().expect("poisoned");
        watching
            .as_ref()
            .map(|(s, _)| s.state())
            .unwrap_or_default()
    }
}

/// A client for the API `access` names: with neither a kubeconfig nor a
/// context, in-cluster config else `KUBECONFIG` (kube's default).
pub async fn client(access: &crate::app::KubeAccess) -> Result<Client, KubeAccessError> {
    Ok(Client::try_from(config(access).await?)?)
}

/// The client settings [`client`] uses, for a caller that tunes them.
pub async fn config(access: &crate::app::KubeAccess) -> Result<kube::Config, KubeAccessError> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let options = KubeConfigOptions {
        context: access.context.clone(),
        ..Default::default()
    };
    match (&access.kubeconfig, &access.context) {
        (None, None) => {
            return kube::Config::infer()
                .await
                .map_err(|e| KubeAccessError::Kubeconfig {
                    path: "in-cluster or $KUBECONFIG".into(),
                    reason: e.to_string(),
                });
        }
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path).map_err(|e| KubeAccessError::Kubeconfig {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            kube::Config::from_custom_kubeconfig(file, &options).await
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&options).await,
    }
    .map_err(|e| KubeAccessError::Kubeconfig {
        path: access
            .kubeconfig
            .as_ref()
            .map_or("$KUBECONFIG".into(), |p| p.display().to_string()),
        reason: e.to_string(),
    })
}

/// Why the Kubernetes API could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum KubeAccessError {
    #[error("kubeconfig {path}: {reason} (check --kubeconfig and --context)")]
    Kubeconfig { path: String, reason: String },
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Starts watching through `client`.
pub fn start(
    client: Client,
    store: ConfigStore,
    trust_domain: &str,
    shutdown: CancellationToken,
) -> Kubernetes {
    start_with_discovery(client, store, trust_domain, shutdown, DISCOVERY_INTERVAL)
}

/// As [`start`], asking discovery for optional kinds every `interval`.
pub fn start_with_discovery(
    client: Client,
    store: ConfigStore,
    trust_domain: &str,
    shutdown: CancellationToken,
    interval: Duration,
) -> Kubernetes {
    let w = Watch {
        client: client.clone(),
        changed: Arc::new(Notify::new()),
        pending: Arc::new(std::sync::Mutex::new(Pending::default())),
        shutdown: shutdown.clone(),
    };
    let never = || shutdown.child_token();
    let stores = Arc::new(Stores {
        namespaces: w.watch_as(KeyedBy::No, never()),
        pods: w.watch_as(KeyedBy::Pods, never()),
        services: w.watch_as(KeyedBy::No, never()),
        endpoint_slices: w.watch_as(KeyedBy::Slices, never()),
        authorization_policies: w.watch_as(KeyedBy::No, never()),
        backend_policies: w.watch_as(KeyedBy::No, never()),
        fault_injections: w.watch_as(KeyedBy::No, never()),
        rate_limits: w.watch_as(KeyedBy::No, never()),
        gateways: Optional::new(),
        http_routes: Optional::new(),
        grpc_routes: Optional::new(),
        reference_grants: Optional::new(),
    });
    tokio::spawn(discover(stores.clone(), w.clone(), interval));
    let (tx, status) = watch::channel(Arc::new(SourceStatus {
        source: "kubernetes".into(),
        location: client.default_namespace().to_owned(),
        ..Default::default()
    }));
    let k8s = Kubernetes {
        client,
        status,
        incremental: Arc::new(AtomicU64::new(0)),
        full: Arc::new(AtomicU64::new(0)),
    };
    let translator = Translator {
        stores,
        store,
        trust_domain: trust_domain.to_owned(),
        tx,
        incremental: k8s.incremental.clone(),
        full: k8s.full.clone(),
    };
    tokio::spawn(translator.run(w));
    k8s
}

/// Asks discovery which optional kinds the API server serves, now and
/// every `interval`, and watches exactly those. An unanswered question
/// (the API unreachable) changes nothing.
async fn discover(stores: Arc<Stores>, w: Watch, interval: Duration) {
    let mut backoff = interval;
    loop {
        let (served, grants) = tokio::join!(served(&w, GATEWAY_API), served(&w, GATEWAY_API_BETA));
        let mut forgot = false;
        if let Some(served) = &served {
            let has = |k: &str| served.contains(k);
            forgot |= stores.gateways.sync(has(&Gateway::plural(&())), &w);
            forgot |= stores.http_routes.sync(has(&HttpRoute::plural(&())), &w);
            forgot |= stores.grpc_routes.sync(has(&GrpcRoute::plural(&())), &w);
        }
        if let Some(grants) = &grants {
            let has = grants.contains(&*ReferenceGrant::plural(&()));
            forgot |= stores.reference_grants.sync(has, &w);
        }
        if forgot {
            w.pending.lock().expect("poisoned").other = true;
            w.changed.notify_one();
        }
        // An unanswered question changes nothing; ask again later.
        backoff = if served.is_some() && grants.is_some() {
            interval
        } else {
            (backoff * 2).min(interval * 6)
        };
        tokio::select! {
            _ = w.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}

/// The resources discovery lists for `group_version` (none when the API
/// server does not serve it); `None` when it could not answer.
async fn served(w: &Watch, group_version: &str) -> Option<HashSet<String>> {
    match w.client.list_api_group_resources(group_version).await {
        Ok(list) => Some(list.resources.into_iter().map(|r| r.name).collect()),
        Err(kube::Error::Api(s)) if s.code == 404 => Some(HashSet::new()),
        Err(e) => {
            debug!(error = %e, "discovery of {group_version} failed; keeping what is watched");
            None
        }
    }
}

/// Turns the stores into the served model after each change.
struct Translator {
    stores: Arc<Stores>,
    store: ConfigStore,
    trust_domain: String,
    tx: watch::Sender<Arc<SourceStatus>>,
    incremental: Arc<AtomicU64>,
    full: Arc<AtomicU64>,
}

impl Translator {
    async fn run(self, w: Watch) {
        // Serve nothing until the kinds every config needs have listed once:
        // a half-listed cluster would look like deleted pods and policies.
        let ready = async {
            let _ = self.stores.namespaces.wait_until_ready().await;
            let _ = self.stores.pods.wait_until_ready().await;
            let _ = self.stores.services.wait_until_ready().await;
            let _ = self.stores.endpoint_slices.wait_until_ready().await;
            let _ = self.stores.authorization_policies.wait_until_ready().await;
        };
        tokio::select! {
            _ = w.shutdown.cancelled() => return,
            _ = ready => info!("Kubernetes objects listed; serving config"),
        }
        // The objects behind the model served (for the pod-by-pod path),
        // and whether that translation was clean.
        let mut served: Option<Objects> = None;
        let mut clean = false;
        loop {
            let since = std::mem::take(&mut *w.pending.lock().expect("poisoned"));
            let keyed_only = !since.other;
            if keyed_only && since.pods.is_empty() && since.slices.is_empty() && served.is_some() {
                // A wake-up whose changes an earlier pass already took.
            } else if keyed_only
                && clean
                && let Some(objects) = served.as_mut()
                && let Some(model) = self.keyed(objects, &since)
            {
                self.incremental.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("weft_controller_incremental_updates_total").increment(1);
                self.store.set(model);
                // Nothing to report changed, but watchers learn a pass happened.
                self.tx.send_modify(|_| {});
            } else {
                (served, clean) = self.full_pass();
            }
            tokio::select! {
                _ = w.shutdown.cancelled() => return,
                _ = w.changed.notified() => {}
            }
            tokio::time::sleep(DEBOUNCE).await;
        }
    }

    /// Changed EndpointSlices, then changed pods, applied pod by pod;
    /// `None` sends the caller to the full path.
    fn keyed(&self, objects: &mut Objects, since: &Pending) -> Option<Model> {
        let td = &self.trust_domain;
        let mut model = self.store.current().model.clone();
        if !since.slices.is_empty() {
            let (upserts, gone) = current(&self.stores.endpoint_slices, &since.slices)?;
            model = Arc::new(apply_slices(objects, &model, upserts, gone, td)?);
        }
        if !since.pods.is_empty() {
            let (upserts, gone) = current(&self.stores.pods, &since.pods)?;
            model = Arc::new(apply_pods(objects, &model, upserts, gone, td)?);
        }
        Arc::into_inner(model)
    }

    /// Translates everything the stores hold; the objects served and
    /// whether the translation was clean.
    fn full_pass(&self) -> (Option<Objects>, bool) {
        self.full.fetch_add(1, Ordering::Relaxed);
        let objects = self.stores.collect();
        let t = translate(&objects, &self.trust_domain);
        for p in t.problems.iter().filter(|p| p.refused) {
            warn!(
                object = p.object,
                reason = p.reason,
                "object not used as written"
            );
        }
        metrics::gauge!("weft_controller_config_problems").set(t.problems.len() as f64);
        let clean = t.problems.is_empty();
        let served = match Model::from_specs(t.specs, &self.trust_domain) {
            Ok(model) => {
                self.store.set(model);
                Some(objects)
            }
            Err(e) => {
                metrics::counter!("weft_controller_config_errors_total").increment(1);
                warn!(error = %e, "translated config does not validate; keeping the config served");
                None
            }
        };
        self.tx.send_modify(|s| {
            *s = Arc::new(SourceStatus {
                problems: t.problems,
                waypoints: t.waypoints,
                routes: t.routes,
                ..(**s).clone()
            })
        });
        (served, clean)
    }
}

/// What changed since the last translation: pods and EndpointSlices by
/// key, or anything else.
#[derive(Default)]
struct Pending {
    pods: HashSet<String>,
    slices: HashSet<String>,
    other: bool,
}

/// Objects to upsert and keys gone, for `keys`, as `store` holds them now.
type Current<K> = (Vec<(String, Arc<K>)>, Vec<String>);

fn current<K>(store: &Store<K>, keys: &HashSet<String>) -> Option<Current<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let mut upserts = Vec::new();
    let mut gone = Vec::new();
    for key in keys {
        let (namespace, name) = key.split_once('/')?;
        match store.get(&ObjectRef::new(name).within(namespace)) {
            Some(o) => upserts.push((key.clone(), o)),
            None => gone.push(key.clone()),
        }
    }
    Some((upserts, gone))
}

impl Stores {
    fn collect(&self) -> Objects {
        fn map<K: Resource + Clone>(
            state: Vec<Arc<K>>,
        ) -> std::collections::BTreeMap<String, Arc<K>> {
            state
                .into_iter()
                .map(|o| {
                    let key = match o.namespace() {
                        Some(ns) => format!("{ns}/{}", o.name_any()),
                        None => o.name_any(),
                    };
                    (key, o)
                })
                .collect()
        }
        Objects {
            namespaces: map(self.namespaces.state()),
            pods: map(self.pods.state()),
            services: map(self.services.state()),
            endpoint_slices: map(self.endpoint_slices.state()),
            gateways: map(self.gateways.state()),
            http_routes: map(self.http_routes.state()),
            grpc_routes: map(self.grpc_routes.state()),
            authorization_policies: map(self.authorization_policies.state()),
            backend_policies: map(self.backend_policies.state()),
            fault_injections: map(self.fault_injections.state()),
            rate_limits: map(self.rate_limits.state()),
            reference_grants: map(self.reference_grants.state()),
            ..Objects::default()
        }
    }
}

/// Which events are recorded by key, for the pod-by-pod path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyedBy {
    No,
    Pods,
    Slices,
}

/// What every watch shares: the client, and the translator's wake-up.
#[derive(Clone)]
struct Watch {
    client: Client,
    changed: Arc<Notify>,
    pending: Arc<std::sync::Mutex<Pending>>,
    shutdown: CancellationToken,
}

impl Watch {
    /// A reflector on every `K` in the cluster until `stop`; each event
    /// that changes something wakes the translator. Fields weft never reads
    /// are dropped before they are stored (managed fields, annotations).
    fn watch_as<K>(&self, keyed: KeyedBy, stop: CancellationToken) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        let (reader, writer) = reflector::store();
        let api = kube::Api::<K>::all(self.client.clone());
        let stream = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default().any_semantic())
                .default_backoff()
                .modify(|o: &mut K| {
                    o.managed_fields_mut().clear();
                    o.annotations_mut().clear();
                }),
        );
        let w = self.clone();
        let store = reader.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // Objects held before a relist began, and objects it listed.
            let (mut held, mut listed) = (0usize, 0usize);
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => return,
                    e = stream.next() => e,
                };
                let event = match event {
                    Some(Ok(event)) => event,
                    // The watcher retries with backoff.
                    Some(Err(e)) => {
                        warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying");
                        continue;
                    }
                    None => return,
                };
                let key = |o: &K| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
                let mut p = w.pending.lock().expect("poisoned");
                match event {
                    watcher::Event::Apply(o) | watcher::Event::Delete(o) => match keyed {
                        KeyedBy::Pods => drop(p.pods.insert(key(&o))),
                        KeyedBy::Slices => drop(p.slices.insert(key(&o))),
                        KeyedBy::No => p.other = true,
                    },
                    watcher::Event::Init => {
                        (held, listed) = (store.len(), 0);
                        continue;
                    }
                    watcher::Event::InitApply(_) => {
                        listed += 1;
                        continue;
                    }
                    // A relist of nothing over nothing changes nothing.
                    watcher::Event::InitDone if held == 0 && listed == 0 => continue,
                    watcher::Event::InitDone => p.other = true,
                }
                drop(p);
                w.changed.notify_one();
            }
        });
        reader
    }
}

/// (API group, plural) of every kind watched, the optional ones included:
/// what the RBAC in `manifests/weft.yaml` must grant.
pub fn watched() -> Vec<(String, String)> {
    fn r<K: Resource<DynamicType = ()>>() -> (String, String) {
        (K::group(&()).into_owned(), K::plural(&()).into_owned())
    }
    vec![
        r::<Namespace>(),
        r::<Pod>(),
        r::<Service>(),
        r::<EndpointSlice>(),
        r::<Gateway>(),
        r::<HttpRoute>(),
        r::<GrpcRoute>(),
        r::<AuthorizationPolicy>(),
        r::<BackendPolicy>(),
        r::<FaultInjection>(),
        r::<RateLimit>(),
        r::<ReferenceGrant>(),
    ]
}
