//! Who a caller is, asked of the Kubernetes API. Every caller presents a
//! token checked by TokenReview; then
//! - a REST caller must be allowed the verb on the virtual resource
//!   `weft.dev/api` (SubjectAccessReview), so cluster RBAC decides who
//!   reads the mesh's topology;
//! - a proxy (ztunnel or waypoint) presents a projected ServiceAccount
//!   token for audience `weft-ca`, bound to its pod. The pod must still
//!   exist with the bound uid. A ztunnel's ServiceAccount makes it the node
//!   its pod runs on (`spec.nodeName`); a waypoint pod (label
//!   `gateway.networking.k8s.io/gateway-name`) is that waypoint. A new node
//!   needs nothing but the DaemonSet: no token copied by hand.
//!
//! Answers are cached for 30 s under a keyed hash of the token (the token
//! itself is not kept); an API server that cannot answer is never cached (a
//! blip must not lock valid callers out).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use tracing::warn;
use weft_proto::model::waypoint_proxy_name;

use crate::nodes::Caller;

const TTL: Duration = Duration::from_secs(30);
const CACHE_ENTRIES: usize = 4096;
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";

/// Why a caller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a valid Kubernetes token (TokenReview): {0}")]
    Unauthenticated(String),
    #[error("{user} may not {verb} weft.dev/api (bind the weft-viewer or weft-admin ClusterRole)")]
    Forbidden { user: String, verb: String },
    /// A valid token, but not one of a mesh proxy.
    #[error("{0}")]
    NotAProxy(String),
    /// The API server could not answer: says nothing about the caller.
    #[error("cannot check the token: Kubernetes API unreachable ({0}); try again")]
    Unavailable(String),
}

/// Answers per keyed token hash, for [`TTL`], bounded.
struct Cache<V> {
    hasher: std::collections::hash_map::RandomState,
    entries: Mutex<HashMap<u64, (Instant, V)>>,
}

impl<V: Clone> Cache<V> {
    fn new() -> Self {
        Cache {
            hasher: Default::default(),
            entries: Default::default(),
        }
    }

    fn get(&self, key: impl Hash) -> (u64, Option<V>) {
        let key = self.hasher.hash_one(key);
        let entries = self.entries.lock().expect("poisoned");
        let hit = entries.get(&key).filter(|(at, _)| at.elapsed() < TTL);
        (key, hit.map(|(_, v)| v.clone()))
    }

    fn put(&self, key: u64, value: V) {
        let mut entries = self.entries.lock().expect("poisoned");
        if entries.len() >= CACHE_ENTRIES {
            entries.clear(); // a flood of distinct tokens only costs reviews
        }
        entries.insert(key, (Instant::now(), value));
    }
}

/// `f` within `timeout` (kube's client retries 503s for minutes); the
/// answer is cached unless the API could not give one.
async fn answer<V: Clone>(
    cache: &Cache<Result<V, Refusal>>,
    key: impl Hash,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<V, Refusal>>,
) -> Result<V, Refusal> {
    let (key, hit) = cache.get(key);
    if let Some(hit) = hit {
        return hit;
    }
    let decision = tokio::time::timeout(timeout, f).await.unwrap_or_else(|_| {
        warn!(?timeout, "token review timed out");
        Err(Refusal::Unavailable("no answer in time".into()))
    });
    if !matches!(decision, Err(Refusal::Unavailable(_))) {
        cache.put(key, decision.clone());
    }
    decision
}

fn unavailable(what: &str, e: kube::Error) -> Refusal {
    warn!(error = %e, "{what} failed");
    Refusal::Unavailable(format!("{what}: {e}"))
}

/// The user a token authenticates as, for one of `audiences` (none: the
/// API server's own).
async fn review(client: &Client, token: &str, audiences: &[String]) -> Result<UserInfo, Refusal> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
        },
        ..Default::default()
    };
    let status = kube::Api::<TokenReview>::all(client.clone())
        .create(&kube::api::PostParams::default(), &review)
        .await
        .map_err(|e| unavailable("TokenReview", e))?
        .status
        .filter(|s| s.authenticated == Some(true))
        .ok_or_else(|| Refusal::Unauthenticated("rejected, expired or revoked".into()))?;
    // An audience-aware API server names the audience it matched; one
    // that names none did not check it.
    let matched = status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|x| audiences.contains(x)));
    if !audiences.is_empty() && !matched {
        return Err(Refusal::Unauthenticated(format!(
            "not issued for audience {}",
            audiences.join(" or ")
        )));
    }
    status
        .user
        .ok_or_else(|| Refusal::Unauthenticated("no user in the review".into()))
}

/// REST callers: TokenReview, then SubjectAccessReview on `weft.dev/api`.
pub struct Reviewer {
    client: Client,
    timeout: Duration,
    cache: Cache<Result<(), Refusal>>,
    users: Cache<Result<(), Refusal>>,
}

impl Reviewer {
    pub fn new(client: Client) -> Self {
        Reviewer {
            client,
            timeout: Duration::from_secs(5),
            cache: Cache::new(),
            users: Cache::new(),
        }
    }

    /// Bounds each review at `timeout` instead of 5 s.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub async fn review(&self, token: &str, verb: &str) -> Result<(), Refusal> {
        answer(
            &self.cache,
            (token, verb),
            self.timeout,
            self.ask(token, verb),
        )
        .await
    }

    async fn ask(&self, token: &str, verb: &str) -> Result<(), Refusal> {
        let user = review(&self.client, token, &[]).await?;
        self.access(&user, verb).await
    }

    /// Whether `user` (authenticated by someone else: the API server's
    /// front proxy) may `verb` `weft.dev/api`; cached like a token's answer.
    pub async fn authorize(&self, user: &UserInfo, verb: &str) -> Result<(), Refusal> {
        let key = (&user.username, &user.groups, &user.uid, &user.extra, verb);
        answer(&self.users, key, self.timeout, self.access(user, verb)).await
    }

    async fn access(&self, user: &UserInfo, verb: &str) -> Result<(), Refusal> {
        use k8s_openapi::api::authorization::v1::{
            ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
        };
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
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
            .create(&kube::api::PostParams::default(), &access)
            .await
            .map_err(|e| unavailable("SubjectAccessReview", e))?
            .status
            .is_some_and(|s| s.allowed);
        if allowed {
            Ok(())
        } else {
            Err(Refusal::Forbidden {
                user: user.username.clone().unwrap_or_default(),
                verb: verb.to_owned(),
            })
        }
    }
}

/// Settings for proxies' tokens.
#[derive(Debug, Clone)]
pub struct ProxyTokens {
    /// Audiences a proxy token must carry (default `weft-ca`).
    pub audiences: Vec<String>,
    /// The ztunnel DaemonSet's ServiceAccount, `<namespace>/<name>`.
    pub ztunnel_account: String,
}

impl Default for ProxyTokens {
    fn default() -> Self {
        ProxyTokens {
            audiences: vec!["weft-ca".into()],
            ztunnel_account: "weft-system/ztunnel".into(),
        }
    }
}

/// Proxies (CA and config stream): TokenReview, then the bound pod.
pub struct ProxyReviewer {
    client: Client,
    settings: ProxyTokens,
    timeout: Duration,
    cache: Cache<Result<Caller, Refusal>>,
}

impl ProxyReviewer {
    pub fn new(client: Client, settings: ProxyTokens) -> Self {
        ProxyReviewer {
            client,
            settings,
            timeout: Duration::from_secs(5),
            cache: Cache::new(),
        }
    }

    pub async fn proxy(&self, token: &str) -> Result<Caller, Refusal> {
        answer(&self.cache, token, self.timeout, self.ask(token)).await
    }

    async fn ask(&self, token: &str) -> Result<Caller, Refusal> {
        let user = review(&self.client, token, &self.settings.audiences).await?;
        let username = user.username.unwrap_or_default();
        let (namespace, account) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
            .ok_or_else(|| {
                Refusal::NotAProxy(format!("{username} is not a ServiceAccount; proxies present their pod's projected ServiceAccount token"))
            })?;
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(Refusal::NotAProxy(format!(
                "the token of {namespace}/{account} is not bound to a pod; mount a projected ServiceAccount token (audience {})",
                self.settings.audiences.join(",")
            )));
        };
        let pod = kube::Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(&pod_name)
            .await
            .map_err(|e| unavailable("reading the token's pod", e))?
            .filter(|p| p.metadata.uid.as_deref() == Some(pod_uid.as_str()))
            .ok_or_else(|| {
                Refusal::Unauthenticated(format!(
                    "the token's pod {namespace}/{pod_name} no longer exists"
                ))
            })?;
        self.caller(namespace, account, &pod_name, &pod)
    }

    /// The node a ztunnel pod runs on (any identity placed there), or the
    /// waypoint a waypoint pod is (its own ServiceAccount's identity only).
    fn caller(
        &self,
        namespace: &str,
        account: &str,
        pod_name: &str,
        pod: &Pod,
    ) -> Result<Caller, Refusal> {
        if format!("{namespace}/{account}") == self.settings.ztunnel_account {
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            return node
                .filter(|n| !n.is_empty())
                .map(Caller::node)
                .ok_or_else(|| {
                    Refusal::NotAProxy(format!(
                        "ztunnel pod {namespace}/{pod_name} has no node yet"
                    ))
                });
        }
        let gateway = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(GATEWAY_NAME));
        match gateway {
            Some(g) => Ok(Caller {
                name: waypoint_proxy_name(&format!("{namespace}/{g}")),
                only: Some((namespace.to_owned(), account.to_owned())),
            }),
            None => Err(Refusal::NotAProxy(format!(
                "ServiceAccount {namespace}/{account} is neither the ztunnel's ({}) nor a waypoint's (pod label {GATEWAY_NAME})",
                self.settings.ztunnel_account
            ))),
        }
    }
}
