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
//! `409 AlreadyExists`, and server-side apply. It also aggregates
//! `api.weft.dev` as kube-aggregator does: the caller's bearer token
//! authenticated by TokenReview, the request proxied over TLS to the
//! controller under a front-proxy client certificate (verifying the
//! controller against the APIService's `caBundle`), the user in
//! `X-Remote-User`/`X-Remote-Group`. (It does not check RBAC on the
//! aggregated resources first, as the real one does: the controller's own
//! check is what the tests watch.)

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
    /// Every single object read (GET), with how often.
    pub gets: Mutex<HashMap<String, usize>>,
    pub discoveries: std::sync::atomic::AtomicUsize,
    /// Projected ServiceAccount tokens: token → (its audiences, the user a
    /// TokenReview reports, `extra` naming the bound pod).
    pub tokens: Mutex<HashMap<String, (Vec<String>, Value)>>,
    /// Single objects by path (Secrets, ConfigMaps): create, get, apply.
    pub objects: Mutex<HashMap<String, Value>>,
    /// Every create asked: (path, the status answered).
    pub creates: Mutex<Vec<(String, u16)>>,
    /// The last resourceVersion given to a single object.
    pub versions: std::sync::atomic::AtomicU64,
    /// Where `api.weft.dev` is served (the APIService's Service) and the
    /// front proxy that reaches it.
    pub aggregated: Mutex<Option<(std::net::SocketAddr, Arc<FrontProxy>)>>,
}

pub const API_SERVICE: &str = "/apis/apiregistration.k8s.io/v1/apiservices/v1alpha1.api.weft.dev";
pub const FRONT_PROXY_SETTINGS: &str =
    "/api/v1/namespaces/kube-system/configmaps/extension-apiserver-authentication";

/// The API server's front proxy: a request-header CA and the client
/// certificate it signed (CN `front-proxy-client`, as kubeadm makes it).
pub struct FrontProxy {
    pub ca_pem: String,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Default for FrontProxy {
    fn default() -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "front-proxy-ca");
        let ca = params.self_signed(&ca_key).expect("ca");
        FrontProxy {
            ca_pem: ca.pem(),
            ca,
            ca_key,
        }
    }
}

impl FrontProxy {
    /// A client presenting a certificate for `cn` from this CA (none:
    /// no certificate), trusting `roots` (PEM) for the server.
    pub fn client(&self, cn: Option<&str>, roots: &str) -> Arc<rustls::ClientConfig> {
        let mut store = rustls::RootCertStore::empty();
        for c in pem::parse_many(roots).expect("roots PEM") {
            store
                .add(rustls::pki_types::CertificateDer::from(c.into_contents()))
                .expect("root");
        }
        let builder = rustls::ClientConfig::builder_with_provider(weft_proto::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls 1.3")
            .with_root_certificates(store);
        let Some(cn) = cn else {
            return Arc::new(builder.with_no_client_auth());
        };
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = rcgen::Issuer::from_ca_cert_der(self.ca.der(), &self.ca_key).expect("issuer");
        let cert = params.signed_by(&key, &issuer).expect("client cert");
        let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
        let config = builder
            .with_client_auth_cert(vec![cert.der().clone()], der)
            .expect("client auth");
        Arc::new(config)
    }

    /// The ConfigMap `kube-system/extension-apiserver-authentication`.
    pub fn settings(&self) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "extension-apiserver-authentication", "namespace": "kube-system"},
            "data": {"requestheader-client-ca-file": self.ca_pem,
                "requestheader-allowed-names": "[\"front-proxy-client\"]",
                "requestheader-username-headers": "[\"X-Remote-User\"]",
                "requestheader-group-headers": "[\"X-Remote-Group\"]",
                "requestheader-extra-headers-prefix": "[\"X-Remote-Extra-\"]"}})
    }
}

/// One HTTP/1.1 GET over TLS with `client` to `addr` (server name
/// `weft-controller.weft-system.svc`), with `headers`: the status and body.
pub async fn tls_get(
    client: Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Value), String> {
    tls_request(client, addr, (http::Method::GET, path), headers).await
}

/// [`tls_get`] with any method (an empty body).
pub async fn tls_request(
    client: Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    (method, path): (http::Method, &str),
    headers: &[(&str, &str)],
) -> Result<(u16, Value), String> {
    let tls = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("weft-controller.weft-system.svc")
            .expect("name");
        tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))
    };
    let tls = tokio::time::timeout(Duration::from_secs(10), tls)
        .await
        .map_err(|_| "no handshake in 10 s".to_owned())??;
    request_over(tls, (method, path), headers).await
}

/// One HTTP/1.1 GET over `io`: the status and the body as JSON (null if
/// it is not), within 10 s.
pub async fn get_over<IO>(
    io: IO,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Value), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    request_over(io, (http::Method::GET, path), headers).await
}

/// [`get_over`] with any method (an empty body).
pub async fn request_over<IO>(
    io: IO,
    (method, path): (http::Method, &str),
    headers: &[(&str, &str)],
) -> Result<(u16, Value), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "weft-controller.weft-system.svc");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = sender
            .send_request(req.body(String::new()).expect("request"))
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no answer in 10 s".to_owned())?
}

/// kube-aggregator's part: authenticate, then proxy to the APIService.
async fn aggregate(fake: &Fake, req: Request) -> Response {
    let Some((addr, proxy)) = fake.aggregated.lock().expect("poisoned").clone() else {
        return status(503, "ServiceUnavailable", "the APIService is not available");
    };
    let token = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default();
    let review = token_review(fake, &json!({"spec": {"token": token}}));
    let user = &review["status"]["user"];
    let Some(name) = user["username"].as_str() else {
        return status(401, "Unauthorized", "Unauthorized");
    };
    let groups: Vec<String> = user["groups"]
        .as_array()
        .map(|g| {
            g.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut headers = vec![("X-Remote-User", name)];
    headers.extend(groups.iter().map(|g| ("X-Remote-Group", g.as_str())));
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let bundle = fake
        .objects
        .lock()
        .expect("poisoned")
        .get(API_SERVICE)
        .map(|o| o["spec"]["caBundle"].clone());
    let Some(Ok(roots)) = bundle.map(serde_json::from_value::<k8s_openapi::ByteString>) else {
        return status(503, "ServiceUnavailable", "the APIService has no caBundle");
    };
    let roots = String::from_utf8_lossy(&roots.0).into_owned();
    let client = proxy.client(Some("front-proxy-client"), &roots);
    match tls_get(client, addr, path, &headers).await {
        Ok((code, body)) => {
            let mut r = Response::new(Body::from(body.to_string()));
            *r.status_mut() = http::StatusCode::from_u16(code).expect("status");
            r
        }
        Err(e) => status(
            503,
            "ServiceUnavailable",
            &format!("error trying to reach service: {e}"),
        ),
    }
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
    if path == format!("/apis/{GATEWAY_GROUP}/v1beta1")
        && !fake
            .absent
            .lock()
            .expect("poisoned")
            .contains(GATEWAY_GROUP)
    {
        let list = json!({"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": format!("{GATEWAY_GROUP}/v1beta1"), "resources": [
                {"name": "referencegrants", "singularName": "", "namespaced": true,
                 "kind": "ReferenceGrant", "verbs": ["get", "list", "watch"]}]});
        return Response::new(Body::from(list.to_string()));
    }
    if discovery {
        fake.discoveries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    if group == "api.weft.dev" {
        return aggregate(&fake, req).await;
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
    let (rv, mut items) = fake
        .lists
        .lock()
        .expect("poisoned")
        .get(&path)
        .cloned()
        .unwrap_or_default();
    items.retain(|o| selected(&query, o));
    let list = json!({"apiVersion": "v1", "kind": "List",
        "metadata": {"resourceVersion": rv.to_string()}, "items": items});
    Response::new(Body::from(list.to_string()))
}

/// Whether `o` matches the list's `labelSelector` (terms `key` and
/// `key=value`, comma-separated, all required; none: everything).
fn selected(query: &str, o: &Value) -> bool {
    let Some(selector) = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("labelSelector="))
    else {
        return true;
    };
    let selector = selector
        .replace("%2F", "/")
        .replace("%3D", "=")
        .replace("%2C", ",");
    let labels = &o["metadata"]["labels"];
    selector
        .split(',')
        .filter(|t| !t.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => labels[k] == v,
            None => !labels[term].is_null(),
        })
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
    kubeconfig_as(dir, addr, None)
}

/// [`kubeconfig`] for a user with a bearer token.
pub fn kubeconfig_as(
    dir: &std::path::Path,
    addr: std::net::SocketAddr,
    token: Option<&str>,
) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let user = token.map_or("{}".to_owned(), |t| format!("{{token: {t}}}"));
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
         clusters: [{{name: fake, cluster: {{server: \"http://{addr}\"}}}}]\n\
         users: [{{name: tester, user: {user}}}]\n\
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

/// Single namespaced objects under any API group:
/// `.../namespaces/NS/KIND[/NAME[/status]]`. GET (pods from the
/// `/api/v1/pods` list; `404 NotFound`), POST (create; `409 AlreadyExists`),
/// PUT (replace; `409 Conflict` unless the resourceVersion read is the one
/// stored), PATCH (server-side apply: create or replace; on `/status`, the
/// status alone). Every write moves the resourceVersion. Anything else is
/// handed back for the list/watch handler.
async fn object(fake: &Fake, req: Request, path: &str) -> Result<Response, Request> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let Some(i) = parts
        .iter()
        .position(|p| *p == "namespaces")
        .filter(|i| *i >= 2)
    else {
        return cluster_object(fake, req, &parts).await;
    };
    let rest = parts[i + 1..].to_vec();
    if rest.len() == 1 && parts[..i] == ["api", "v1"] {
        return Ok(namespace_object(fake, req, rest[0]).await);
    }
    let method = req.method().as_str().to_owned();
    let status_of = rest.len() == 4 && rest[3] == "status";
    // The object's own path (a `/status` write lands on the object).
    let key = match rest.len() {
        3 | 4 => format!("/{}", parts[..i + 4].join("/")),
        _ => String::new(),
    };
    if method == "GET" && rest.len() == 3 {
        *fake
            .gets
            .lock()
            .expect("poisoned")
            .entry(key.clone())
            .or_default() += 1;
    }
    match (method.as_str(), rest.len()) {
        ("GET", 3) => Ok(
            match lookup(fake, path, &parts[..i].join("/"), rest[0], rest[1], rest[2]) {
                Some(o) => ok(&o),
                None => status(
                    404,
                    "NotFound",
                    &format!("{} \"{}\" not found", rest[1], rest[2]),
                ),
            },
        ),
        ("POST", 2) => {
            let o = body(req).await;
            let name = o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            Ok(create(fake, format!("{path}/{name}"), o))
        }
        ("PUT", 3) => Ok(replace(fake, &key, body(req).await)),
        ("DELETE", 3) => Ok(match fake.objects.lock().expect("poisoned").remove(&key) {
            Some(_) => ok(&json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})),
            None => status(
                404,
                "NotFound",
                &format!("{} \"{}\" not found", rest[1], rest[2]),
            ),
        }),
        ("PATCH", 3) | ("PATCH", 4) => {
            let stored = lookup(fake, &key, &parts[..i].join("/"), rest[0], rest[1], rest[2]);
            let merge = is_merge_patch(&req);
            let patch = body(req).await;
            Ok(match (merge, stored) {
                (true, Some(mut o)) => {
                    merge_patch(&mut o, &patch);
                    apply(fake, &key, Some(o.clone()), o, false)
                }
                (true, None) => status(404, "NotFound", "not found"),
                (false, stored) => apply(fake, &key, stored, patch, status_of),
            })
        }
        _ => Err(req),
    }
}

/// A cluster-scoped object under an API group
/// (`/apis/GROUP/VERSION/KIND/NAME[/status]`): server-side apply only.
async fn cluster_object(fake: &Fake, req: Request, parts: &[&str]) -> Result<Response, Request> {
    let grouped = parts.first() == Some(&"apis");
    match (req.method().as_str(), parts.len()) {
        ("PATCH", 5 | 6) if grouped => {
            let key = format!("/{}", parts[..5].join("/"));
            let stored = fake.objects.lock().expect("poisoned").get(&key).cloned();
            let status_only = parts.len() == 6 && parts[5] == "status";
            Ok(apply(fake, &key, stored, body(req).await, status_only))
        }
        _ => Err(req),
    }
}

fn is_merge_patch(req: &Request) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/merge-patch+json"))
}

/// RFC 7386: objects merge key by key, `null` deletes, anything else
/// replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("an object");
    for (k, v) in fields {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// A Namespace (`/api/v1/namespaces/NAME`): GET, and merge patches, from
/// and to the `/api/v1/namespaces` list the watchers read.
async fn namespace_object(fake: &Fake, req: Request, name: &str) -> Response {
    const LIST: &str = "/api/v1/namespaces";
    let find = |fake: &Fake| {
        let lists = fake.lists.lock().expect("poisoned");
        lists.get(LIST).and_then(|(_, items)| {
            items
                .iter()
                .find(|o| o["metadata"]["name"] == name)
                .cloned()
        })
    };
    let Some(mut ns) = find(fake) else {
        return status(404, "NotFound", &format!("namespaces \"{name}\" not found"));
    };
    match req.method().as_str() {
        "GET" => ok(&ns),
        "PATCH" if is_merge_patch(&req) => {
            merge_patch(&mut ns, &body(req).await);
            fake.put(LIST, ns.clone());
            ok(&ns)
        }
        _ => status(405, "MethodNotAllowed", "only GET and merge PATCH here"),
    }
}

async fn body(req: Request) -> Value {
    let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or_default()
}

fn ok(o: &Value) -> Response {
    Response::new(Body::from(o.to_string()))
}

/// A single object: as written here, else from the cluster-wide list of
/// its kind (where the tests put what the source watches).
fn lookup(
    fake: &Fake,
    path: &str,
    prefix: &str,
    ns: &str,
    kind: &str,
    name: &str,
) -> Option<Value> {
    if let Some(o) = fake.objects.lock().expect("poisoned").get(path) {
        return Some(o.clone());
    }
    let lists = fake.lists.lock().expect("poisoned");
    lists
        .get(&format!("/{prefix}/{kind}"))
        .and_then(|(_, items)| {
            items
                .iter()
                .find(|o| o["metadata"]["namespace"] == ns && o["metadata"]["name"] == name)
                .cloned()
        })
}

fn next_version(fake: &Fake) -> String {
    let n = fake
        .versions
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    n.to_string()
}

fn create(fake: &Fake, at: String, mut o: Value) -> Response {
    let mut objects = fake.objects.lock().expect("poisoned");
    let code = if objects.contains_key(&at) { 409 } else { 201 };
    fake.creates
        .lock()
        .expect("poisoned")
        .push((at.clone(), code));
    if code == 409 {
        return status(409, "AlreadyExists", "already exists");
    }
    o["metadata"]["resourceVersion"] = json!(next_version(fake));
    o["metadata"]["uid"] = json!(format!("uid-{at}"));
    objects.insert(at, o.clone());
    let mut r = ok(&o);
    *r.status_mut() = http::StatusCode::CREATED;
    r
}

fn replace(fake: &Fake, at: &str, mut o: Value) -> Response {
    let mut objects = fake.objects.lock().expect("poisoned");
    let Some(stored) = objects.get(at) else {
        return status(404, "NotFound", "not found");
    };
    if stored["metadata"]["resourceVersion"] != o["metadata"]["resourceVersion"] {
        return status(
            409,
            "Conflict",
            "the object has been modified; please apply your changes to the latest version and try again",
        );
    }
    o["metadata"]["resourceVersion"] = json!(next_version(fake));
    o["metadata"]["uid"] = stored["metadata"]["uid"].clone();
    objects.insert(at.to_owned(), o.clone());
    ok(&o)
}

fn apply(fake: &Fake, at: &str, stored: Option<Value>, o: Value, status_only: bool) -> Response {
    let mut next = match (status_only, stored.as_ref()) {
        (true, Some(stored)) => {
            let mut s = stored.clone();
            s["status"] = o["status"].clone();
            s
        }
        (true, None) => return status(404, "NotFound", "not found"),
        // The main resource: the applied fields merge into what others
        // wrote (lists replaced whole; unlike the real one, fields this
        // manager stops applying are not pruned); its status is a
        // subresource, kept as it was.
        (false, stored) => {
            let mut n = stored.cloned().unwrap_or(json!({}));
            merge_patch(&mut n, &o);
            n["metadata"]["uid"] = stored
                .as_ref()
                .map_or(json!(format!("uid-{at}")), |s| s["metadata"]["uid"].clone());
            match stored.map(|s| s["status"].clone()) {
                Some(status) if !status.is_null() => n["status"] = status,
                _ => {
                    if let Some(m) = n.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            n
        }
    };
    next["metadata"]["resourceVersion"] = json!(next_version(fake));
    let mut objects = fake.objects.lock().expect("poisoned");
    objects.insert(at.to_owned(), next.clone());
    ok(&next)
}
