//! The Kubernetes source: kube-runtime reflectors on every kind weft reads
//! feed the same pure [`translate`] the local directory uses. This layer
//! only watches, collects and debounces; resource versions, relists after
//! `410 Gone`, and deletions are kube-runtime's (its watcher restarts with
//! backoff and the reflector store replaces its contents on every relist).
//!
//! No API server can run on the build machines, so this file is exercised
//! in acceptance on a real cluster; everything it calls into is tested.
//! RBAC it needs: `manifests/weft.yaml` (get/list/watch on the kinds below,
//! create on tokenreviews).

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weft_proto::model::Model;

use super::crds::{AuthorizationPolicy, BackendPolicy, FaultInjection};
use super::translate::{apply_pods, translate};
use super::{Objects, SourceStatus};
use crate::xds::ConfigStore;

/// Changes arriving within this window are translated once.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// A running Kubernetes source.
pub struct Kubernetes {
    pub client: Client,
    pub status: watch::Receiver<Arc<SourceStatus>>,
    /// Changes applied pod by pod rather than by a full translation.
    pub incremental: Arc<AtomicU64>,
}

struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    service_accounts: Store<ServiceAccount>,
    nodes: Store<Node>,
    gateways: Store<Gateway>,
    http_routes: Store<HttpRoute>,
    grpc_routes: Store<GrpcRoute>,
    authorization_policies: Store<AuthorizationPolicy>,
    backend_policies: Store<BackendPolicy>,
    fault_injections: Store<FaultInjection>,
}

/// A client for the API `access` names: with neither a kubeconfig nor a
/// context, in-cluster config else `KUBECONFIG` (kube's default).
pub async fn client(access: &crate::app::KubeAccess) -> Result<Client, KubeAccessError> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let options = KubeConfigOptions {
        context: access.context.clone(),
        ..Default::default()
    };
    let config = match (&access.kubeconfig, &access.context) {
        (None, None) => return Ok(Client::try_default().await?),
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
    })?;
    Ok(Client::try_from(config)?)
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
    let changed = Arc::new(Notify::new());
    let pending = Arc::new(std::sync::Mutex::new(Pending::default()));
    let w = Watch {
        client: &client,
        changed: &changed,
        pending: &pending,
        shutdown: &shutdown,
    };
    let stores = Stores {
        namespaces: w.watch(),
        pods: w.watch_pods(),
        services: w.watch(),
        endpoint_slices: w.watch(),
        service_accounts: w.watch(),
        nodes: w.watch(),
        gateways: w.watch(),
        http_routes: w.watch(),
        grpc_routes: w.watch(),
        authorization_policies: w.watch(),
        backend_policies: w.watch(),
        fault_injections: w.watch(),
    };
    let (tx, status) = watch::channel(Arc::new(SourceStatus {
        source: "kubernetes".into(),
        location: client.default_namespace().to_owned(),
        ..Default::default()
    }));
    let td = trust_domain.to_owned();
    let incremental = Arc::new(AtomicU64::new(0));
    let counter = incremental.clone();
    tokio::spawn(async move {
        let incremental = counter;
        // Serve nothing until the kinds every config needs have listed once:
        // a half-listed cluster would look like deleted pods and policies.
        let ready = async {
            let _ = stores.namespaces.wait_until_ready().await;
            let _ = stores.pods.wait_until_ready().await;
            let _ = stores.services.wait_until_ready().await;
            let _ = stores.endpoint_slices.wait_until_ready().await;
            let _ = stores.authorization_policies.wait_until_ready().await;
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ready => info!("Kubernetes objects listed; serving config"),
        }
        // The objects behind the model served (for the pod-by-pod path),
        // and whether that translation was clean.
        let mut served: Option<Objects> = None;
        let mut clean = false;
        loop {
            let since = std::mem::take(&mut *pending.lock().expect("poisoned"));
            if !since.other && since.pods.is_empty() && served.is_some() {
                // A wake-up whose changes an earlier pass already took.
            } else if !since.other
                && clean
                && let Some(objects) = served.as_mut()
                && let Some(model) = pods_changed(&stores, objects, &store, &since.pods, &td)
            {
                incremental.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("weft_controller_incremental_updates_total").increment(1);
                store.set(model);
                // Nothing to report changed, but watchers learn a pass happened.
                tx.send_modify(|_| {});
            } else {
                let objects = stores.collect();
                let t = translate(&objects, &td);
                for p in t.problems.iter().filter(|p| p.refused) {
                    warn!(
                        object = p.object,
                        reason = p.reason,
                        "object not used as written"
                    );
                }
                metrics::gauge!("weft_controller_config_problems").set(t.problems.len() as f64);
                clean = t.problems.is_empty();
                match Model::from_specs(t.specs, &td) {
                    Ok(model) => {
                        store.set(model);
                        served = Some(objects);
                    }
                    Err(e) => {
                        metrics::counter!("weft_controller_config_errors_total").increment(1);
                        warn!(error = %e, "translated config does not validate; keeping the config served");
                        served = None;
                    }
                }
                tx.send_modify(|s| {
                    *s = Arc::new(SourceStatus {
                        problems: t.problems,
                        waypoints: t.waypoints,
                        routes: t.routes,
                        ..(**s).clone()
                    })
                });
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changed.notified() => {}
            }
            tokio::time::sleep(DEBOUNCE).await;
        }
    });
    Kubernetes {
        client,
        status,
        incremental,
    }
}

/// What changed since the last translation: pods by key, or anything else.
#[derive(Default)]
struct Pending {
    pods: HashSet<String>,
    other: bool,
}

/// The pods in `keys` as the stores hold them now, applied pod by pod
/// (`translate::apply_pods`); `None` sends the caller to the full path.
fn pods_changed(
    stores: &Stores,
    objects: &mut Objects,
    store: &ConfigStore,
    keys: &HashSet<String>,
    trust_domain: &str,
) -> Option<Model> {
    let mut upserts = Vec::new();
    let mut gone = Vec::new();
    for key in keys {
        let (namespace, name) = key.split_once('/')?;
        match stores.pods.get(&ObjectRef::new(name).within(namespace)) {
            Some(pod) => upserts.push((key.clone(), pod)),
            None => gone.push(key.clone()),
        }
    }
    apply_pods(objects, &store.current().model, upserts, gone, trust_domain)
}

impl Stores {
    fn collect(&self) -> Objects {
        fn map<K: Resource + Clone>(store: &Store<K>) -> std::collections::BTreeMap<String, Arc<K>>
        where
            K::DynamicType: Default + Eq + std::hash::Hash + Clone,
        {
            store
                .state()
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
            namespaces: map(&self.namespaces),
            pods: map(&self.pods),
            services: map(&self.services),
            endpoint_slices: map(&self.endpoint_slices),
            service_accounts: map(&self.service_accounts),
            nodes: map(&self.nodes),
            gateways: map(&self.gateways),
            http_routes: map(&self.http_routes),
            grpc_routes: map(&self.grpc_routes),
            authorization_policies: map(&self.authorization_policies),
            backend_policies: map(&self.backend_policies),
            fault_injections: map(&self.fault_injections),
        }
    }
}

struct Watch<'a> {
    client: &'a Client,
    changed: &'a Arc<Notify>,
    pending: &'a Arc<std::sync::Mutex<Pending>>,
    shutdown: &'a CancellationToken,
}

impl Watch<'_> {
    /// A reflector on every `K` in the cluster; each event wakes the
    /// translator. Fields weft never reads are dropped before they are
    /// stored (managed fields, annotations), to keep memory per pod small.
    fn watch<K>(&self) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        self.watch_as(false)
    }

    /// Pods: their events are recorded by key, for the pod-by-pod path.
    fn watch_pods(&self) -> Store<Pod> {
        self.watch_as(true)
    }

    fn watch_as<K>(&self, by_key: bool) -> Store<K>
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
        let changed = self.changed.clone();
        let pending = self.pending.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = stream.next() => e,
                };
                match event {
                    Some(Ok(event)) => {
                        let mut p = pending.lock().expect("poisoned");
                        match event {
                            watcher::Event::Apply(o) | watcher::Event::Delete(o) if by_key => {
                                let ns = o.namespace().unwrap_or_default();
                                p.pods.insert(format!("{ns}/{}", o.name_any()));
                            }
                            // A relist, or a kind every pod may depend on.
                            _ => p.other = true,
                        }
                        drop(p);
                        changed.notify_one();
                    }
                    // The watcher retries with backoff; an absent CRD (no
                    // Gateway API installed) stays an empty store.
                    Some(Err(e)) => {
                        warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying")
                    }
                    None => return,
                }
            }
        });
        reader
    }
}

/// (API group, plural) of every kind watched: what the RBAC in
/// `manifests/weft.yaml` must grant.
pub fn watched() -> Vec<(String, String)> {
    fn r<K: Resource<DynamicType = ()>>() -> (String, String) {
        (K::group(&()).into_owned(), K::plural(&()).into_owned())
    }
    vec![
        r::<Namespace>(),
        r::<Pod>(),
        r::<Service>(),
        r::<EndpointSlice>(),
        r::<ServiceAccount>(),
        r::<Node>(),
        r::<Gateway>(),
        r::<HttpRoute>(),
        r::<GrpcRoute>(),
        r::<AuthorizationPolicy>(),
        r::<BackendPolicy>(),
        r::<FaultInjection>(),
    ]
}

/// Why a REST caller was refused, in Kubernetes mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a valid Kubernetes token (TokenReview)")]
    Unauthenticated,
    #[error("{user} may not {verb} weft.dev/api (bind the weft-viewer or weft-admin ClusterRole)")]
    Forbidden { user: String, verb: String },
    /// The API server could not answer: says nothing about the caller, so
    /// it is never cached (a blip must not lock valid users out).
    #[error("cannot check your token: Kubernetes API unreachable ({0}); try again")]
    Unavailable(String),
}

/// REST callers in Kubernetes mode: who they are by TokenReview, what they
/// may do by SubjectAccessReview on the virtual resource `weft.dev/api`
/// (verbs get, update, delete), so cluster RBAC decides who reads the
/// mesh's topology. Decisions are cached for 30 s under a keyed hash of the
/// token (the token itself is not kept), so a busy client costs the API
/// server two calls per half minute.
pub struct Reviewer {
    client: Client,
    /// How long a caller waits for the API's answer (kube's client retries
    /// 503s for minutes) before it gets a 503 of ours.
    timeout: Duration,
    hasher: std::collections::hash_map::RandomState,
    cache: std::sync::Mutex<std::collections::HashMap<u64, Decision>>,
}

/// When a decision was made, and what it was.
type Decision = (std::time::Instant, Result<(), Refusal>);

const REVIEW_TTL: Duration = Duration::from_secs(30);
const REVIEW_CACHE: usize = 4096;

impl Reviewer {
    pub fn new(client: Client) -> Self {
        Reviewer {
            client,
            timeout: Duration::from_secs(5),
            hasher: Default::default(),
            cache: Default::default(),
        }
    }

    /// Bounds each review at `timeout` instead of 5 s.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub async fn review(&self, token: &str, verb: &str) -> Result<(), Refusal> {
        use std::hash::BuildHasher;
        let key = self.hasher.hash_one((token, verb));
        if let Some((at, decision)) = self.cache.lock().expect("poisoned").get(&key)
            && at.elapsed() < REVIEW_TTL
        {
            return decision.clone();
        }
        let decision = tokio::time::timeout(self.timeout, self.ask(token, verb))
            .await
            .unwrap_or_else(|_| {
                warn!(timeout = ?self.timeout, "token review timed out; answering 503");
                Err(Refusal::Unavailable("no answer in time".into()))
            });
        if matches!(decision, Err(Refusal::Unavailable(_))) {
            return decision;
        }
        let mut cache = self.cache.lock().expect("poisoned");
        if cache.len() >= REVIEW_CACHE {
            cache.clear(); // bounded; a flood of distinct tokens only costs reviews
        }
        cache.insert(key, (std::time::Instant::now(), decision.clone()));
        decision
    }

    async fn ask(&self, token: &str, verb: &str) -> Result<(), Refusal> {
        use k8s_openapi::api::authorization::v1::{
            ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: None,
            },
            ..Default::default()
        };
        let post = kube::api::PostParams::default();
        let unavailable = |what: &str, e: kube::Error| {
            warn!(error = %e, "{what} failed; answering 503");
            Refusal::Unavailable(format!("{what}: {e}"))
        };
        let reviewed = kube::Api::<TokenReview>::all(self.client.clone())
            .create(&post, &review)
            .await
            .map_err(|e| unavailable("TokenReview", e))?
            .status
            .filter(|s| s.authenticated == Some(true))
            .and_then(|s| s.user)
            .ok_or(Refusal::Unauthenticated)?;
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: reviewed.username.clone(),
                groups: reviewed.groups.clone(),
                uid: reviewed.uid.clone(),
                resource_attributes: Some(ResourceAttributes {
                    group: Some("weft.dev".into()),
                    resource: Some("api".into()),
                    verb: Some(verb.to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let allowed = kube::Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&post, &access)
            .await
            .map_err(|e| unavailable("SubjectAccessReview", e))?
            .status
            .is_some_and(|s| s.allowed);
        if allowed {
            Ok(())
        } else {
            Err(Refusal::Forbidden {
                user: reviewed.username.unwrap_or_default(),
                verb: verb.to_owned(),
            })
        }
    }
}
