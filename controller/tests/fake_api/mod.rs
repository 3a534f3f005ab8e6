//! The stand-in Kubernetes API server the controller's tests talk to.
//!
//! Test double: no Kubernetes API server can be installed on these machines,
//! so a small axum app plays the part of the API that kube-runtime and the
//! controller use, faithful to the real one where the controller relies on
//! it: lists with resource versions, watches with a streamed body of events
//! (a `410 Gone` forces a relist), discovery of an API group and the `404`
//! for the kinds of a group that is not installed, TokenReview (audiences,
//! and the bound pod in `user.extra` as projected tokens carry it),
//! SubjectAccessReview, single-object GET with `404 NotFound`, create with
//! `409 AlreadyExists`, and server-side apply.

#![allow(dead_code)] // each test binary uses a part

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The sending side of one watch's streamed body.
type Watcher = mpsc::Sender<Result<Bytes, Infallible>>;

#[derive(Default)]
pub struct Fake {
    /// Path → (resourceVersion, objects by name).
    pub lists: Mutex<HashMap<String, (u64, Vec<Value>)>>,
    pub watchers: Mutex<HashMap<String, Vec<Watcher>>>,
    /// Token and access reviews asked.
    pub reviews: Mutex<usize>,
    /// Reviews answered 503, as an API server behind a failing load
    /// balancer does.
    pub reviews_down: std::sync::atomic::AtomicBool,
    /// API groups not installed (`/apis/<group>/...` answers 404).
    pub absent: Mutex<std::collections::HashSet<String>>,
    /// Every path listed or watched, with how often.
    pub requested: Mutex<HashMap<String, usize>>,
    pub discoveries: std::sync::atomic::AtomicUsize,
    /// Projected ServiceAccount tokens: token → (its audiences, the user a
    /// TokenReview reports, `extra` naming the bound pod).
    pub tokens: Mutex<HashMap<String, (Vec<String>, Value)>>,
    /// Single objects by path (Secrets, ConfigMaps): create, get, apply.
    pub objects: Mutex<HashMap<String, Value>>,
    /// Every create asked: (path, the status answered).
    pub creates: Mutex<Vec<(String, u16)>>,
}

impl Fake {
    /// A token projected for `pod` (namespace/name, uid) running as
    /// ServiceAccount `sa`, valid for `audiences`.
    pub fn projected_token(
        &self,
        token: &str,
        pod: (&str, &str, &str),
        sa: &str,
        audiences: &[&str],
    ) {
        let (ns, name, uid) = pod;
        let user = json!({"username": format!("system:serviceaccount:{ns}:{sa}"),
            "uid": format!("sa-uid-{sa}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "extra": {"authentication.kubernetes.io/pod-name": [name],
                      "authentication.kubernetes.io/pod-uid": [uid]}});
        let audiences = audiences.iter().map(|a| a.to_string()).collect();
        self.tokens
            .lock()
            .expect("poisoned")
            .insert(token.to_owned(), (audiences, user));
    }

    pub fn put(&self, path: &str, object: Value) {
        let mut lists = self.lists.lock().expect("poisoned");
        let (rv, items) = lists.entry(path.to_owned()).or_default();
        *rv += 1;
        items.retain(|o| o["metadata"]["name"] != object["metadata"]["name"]);
        items.push(object);
    }

    pub fn remove(&self, path: &str, name: &str) {
        let mut lists = self.lists.lock().expect("poisoned");
        let (rv, items) = lists.entry(path.to_owned()).or_default();
        *rv += 1;
        items.retain(|o| o["metadata"]["name"] != name);
    }

    /// Sends a watch event to everyone watching `path`.
    pub async fn event(&self, path: &str, kind: &str, object: Value) {
        let line = format!("{}\n", json!({"type": kind, "object": object}));
        let senders = self
            .watchers
            .lock()
            .expect("poisoned")
            .get(path)
            .cloned()
            .unwrap_or_default();
        for tx in senders {
            let _ = tx.send(Ok(Bytes::from(line.clone()))).await;
        }
    }

    pub fn watched_paths(&self) -> usize {
        let w = self.watchers.lock().expect("poisoned");
        w.values()
            .filter(|v| v.iter().any(|s| !s.is_closed()))
            .count()
    }

    pub fn watching(&self, path: &str) -> usize {
        let w = self.watchers.lock().expect("poisoned");
        w.get(path)
            .map_or(0, |v| v.iter().filter(|s| !s.is_closed()).count())
    }
}

pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

pub fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = http::StatusCode::from_u16(code).expect("status");
    r
}

pub async fn api(State(fake): State<Arc<Fake>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let group = path
        .strip_prefix("/apis/")
        .and_then(|p| p.split('/').next())
        .unwrap_or_default();
    let discovery = path == format!("/apis/{GATEWAY_GROUP}/v1");
    if discovery {
        fake.discoveries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    if fake.absent.lock().expect("poisoned").contains(group) {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    if discovery {
        let resources: Vec<Value> = [
            ("gateways", "Gateway"),
            ("httproutes", "HTTPRoute"),
            ("grpcroutes", "GRPCRoute"),
        ]
        .iter()
        .map(|(name, kind)| {
            json!({"name": name, "singularName": "", "namespaced": true, "kind": kind,
                "verbs": ["get", "list", "watch"]})
        })
        .collect();
        let list = json!({"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": format!("{GATEWAY_GROUP}/v1"), "resources": resources});
        return Response::new(Body::from(list.to_string()));
    }
    if path.ends_with("/tokenreviews") || path.ends_with("/subjectaccessreviews") {
        *fake.reviews.lock().expect("poisoned") += 1;
        if fake.reviews_down.load(std::sync::atomic::Ordering::Relaxed) {
            return status(503, "ServiceUnavailable", "service unavailable");
        }
        let body = axum::body::to_bytes(req.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        let review: Value = serde_json::from_slice(&body).unwrap_or_default();
        let answer = if path.ends_with("/tokenreviews") {
            token_review(&fake, &review)
        } else {
            // RBAC: alice may read weft.dev/api; bob may do nothing.
            let attrs = &review["spec"]["resourceAttributes"];
            let allowed = review["spec"]["user"] == "alice"
                && attrs["group"] == "weft.dev"
                && attrs["resource"] == "api"
                && attrs["verb"] == "get";
            json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                "spec": review["spec"], "status": {"allowed": allowed}})
        };
        return Response::new(Body::from(answer.to_string()));
    }
    if let Ok(answer) = object(&fake, req, &path).await {
        return answer;
    }
    *fake
        .requested
        .lock()
        .expect("poisoned")
        .entry(path.clone())
        .or_default() += 1;
    if query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1")
    {
        let (tx, rx) = mpsc::channel(64);
        fake.watchers
            .lock()
            .expect("poisoned")
            .entry(path)
            .or_default()
            .push(tx);
        return Response::new(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
    }
    let (rv, items) = fake
        .lists
        .lock()
        .expect("poisoned")
        .get(&path)
        .cloned()
        .unwrap_or_default();
    let list = json!({"apiVersion": "v1", "kind": "List",
        "metadata": {"resourceVersion": rv.to_string()}, "items": items});
    Response::new(Body::from(list.to_string()))
}

/// Serves `fake` on loopback; its address.
pub async fn listen(fake: Arc<Fake>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().fallback(api).with_state(fake);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Serves `fake` on loopback; a client for it.
pub async fn serve(fake: Arc<Fake>) -> kube::Client {
    let addr = listen(fake).await;
    let config = kube::Config::new(format!("http://{addr}").parse().expect("uri"));
    kube::Client::try_from(config).expect("client")
}

/// A kubeconfig in `dir` naming the fake at `addr`, as `--kubeconfig` takes.
pub fn kubeconfig(dir: &std::path::Path, addr: std::net::SocketAddr) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
         clusters: [{{name: fake, cluster: {{server: \"http://{addr}\"}}}}]\n\
         users: [{{name: tester, user: {{}}}}]\n\
         contexts: [{{name: fake, context: {{cluster: fake, user: tester}}}}]\n"
    );
    std::fs::write(&path, text).expect("kubeconfig");
    path
}

/// Waits (bounded) until `cond` holds, polling as it yields.
pub async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// alice and bob have valid plain tokens; a projected token is valid for
/// its audiences only and names its pod; anything else is not a token. An
/// audience-aware server answers with the audiences it matched.
fn token_review(fake: &Fake, review: &Value) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let asked: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let (user, audiences) = match token {
        "alice-token" => (
            json!({"username": "alice", "groups": ["system:authenticated"]}),
            vec![],
        ),
        "bob-token" => (json!({"username": "bob"}), vec![]),
        _ => match fake.tokens.lock().expect("poisoned").get(token) {
            Some((theirs, user)) => {
                let matched: Vec<String> = if asked.is_empty() {
                    theirs.clone()
                } else {
                    asked
                        .iter()
                        .filter(|a| theirs.contains(a))
                        .cloned()
                        .collect()
                };
                if matched.is_empty() {
                    (Value::Null, vec![])
                } else {
                    (user.clone(), matched)
                }
            }
            None => (Value::Null, vec![]),
        },
    };
    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": review["spec"],
        "status": {"authenticated": !user.is_null(), "user": user, "audiences": audiences}})
}

/// Single objects: GET `/api/v1/namespaces/NS/KIND/NAME` (pods from the
/// `/api/v1/pods` list), POST to `/api/v1/namespaces/NS/KIND` (409 when the
/// name exists), PATCH (server-side apply: create or replace). Anything
/// else is handed back for the list/watch handler.
async fn object(fake: &Fake, req: Request, path: &str) -> Result<Response, Request> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["api", "v1", "namespaces", ns, kind, name]) => {
            let found = if *kind == "pods" {
                let lists = fake.lists.lock().expect("poisoned");
                lists.get("/api/v1/pods").and_then(|(_, items)| {
                    items
                        .iter()
                        .find(|p| {
                            p["metadata"]["namespace"] == *ns && p["metadata"]["name"] == *name
                        })
                        .cloned()
                })
            } else {
                fake.objects.lock().expect("poisoned").get(path).cloned()
            };
            Ok(match found {
                Some(o) => Response::new(Body::from(o.to_string())),
                None => status(404, "NotFound", &format!("{kind} \"{name}\" not found")),
            })
        }
        ("POST", ["api", "v1", "namespaces", _, _]) => {
            let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            let mut o: Value = serde_json::from_slice(&body).unwrap_or_default();
            let name = o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let at = format!("{path}/{name}");
            let mut objects = fake.objects.lock().expect("poisoned");
            let code = if objects.contains_key(&at) { 409 } else { 201 };
            fake.creates
                .lock()
                .expect("poisoned")
                .push((at.clone(), code));
            if code == 409 {
                return Ok(status(
                    409,
                    "AlreadyExists",
                    &format!("\"{name}\" already exists"),
                ));
            }
            o["metadata"]["resourceVersion"] = json!("1");
            o["metadata"]["uid"] = json!(format!("uid-{name}"));
            objects.insert(at, o.clone());
            let mut r = Response::new(Body::from(o.to_string()));
            *r.status_mut() = http::StatusCode::CREATED;
            Ok(r)
        }
        ("PATCH", ["api", "v1", "namespaces", _, _, _]) => {
            let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            let o: Value = serde_json::from_slice(&body).unwrap_or_default();
            fake.objects
                .lock()
                .expect("poisoned")
                .insert(path.to_owned(), o.clone());
            Ok(Response::new(Body::from(o.to_string())))
        }
        _ => Err(req),
    }
}
