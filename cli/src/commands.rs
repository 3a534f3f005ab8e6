//! `kubectl weft` commands that read the controller's REST API.

use std::path::PathBuf;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use tokio::net::TcpStream;
use weft_controller::source::translate::{
    FOR_SERVICE_ACCOUNT, MESH_LABEL, USE_WAYPOINT, WAYPOINT_CLASS,
};
use weft_proto::model::waypoint_proxy_name;

/// Where the controller is and how to authenticate.
#[derive(Clone)]
pub struct Target {
    /// `http://host:port` (local mode)
    pub controller: String,
    pub token_file: PathBuf,
    /// In a cluster: the API server, which proxies reads to the
    /// controller's aggregated API (`api.weft.dev`) for the kubeconfig's
    /// user; `controller` and `token_file` are then unused.
    pub cluster: Option<kube::Client>,
}

impl Target {
    /// The controller at `controller` (`http://host:port`), with the token
    /// in `token_file`.
    pub fn local(controller: impl Into<String>, token_file: impl Into<PathBuf>) -> Self {
        Target {
            controller: controller.into(),
            token_file: token_file.into(),
            cluster: None,
        }
    }
}

/// The aggregated API's prefix for the REST API's `/api/v1/`.
const AGGREGATED: &str = "/apis/api.weft.dev/v1alpha1/";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    /// A table with more columns.
    Wide,
    Json,
    Yaml,
}

/// The API's answer as JSON or YAML; `None` for a table.
pub(crate) fn structured(v: &Value, output: Output) -> Option<String> {
    match output {
        Output::Table | Output::Wide => None,
        Output::Json => Some(serde_json::to_string_pretty(v).unwrap_or_default() + "\n"),
        Output::Yaml => Some(serde_saphyr::to_string(v).unwrap_or_default()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("--controller {0:?} must look like http://host:port")]
    BadUrl(String),
    #[error(
        "cannot read the API token {path}: {reason}; pass --token-file (local mode: <data-dir>/api-token)"
    )]
    Token { path: PathBuf, reason: String },
    #[error(
        "cannot reach the controller at {url}: {reason}; is weft-controller running? (pass --controller)"
    )]
    Unreachable { url: String, reason: String },
    #[error("the controller refused the token (401); check --token-file")]
    Unauthorized,
    #[error("the controller answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("{0}")]
    Refused(String),
}

impl CliError {
    /// The process exit code: 3 when the controller could not be reached
    /// (try again, or fix --controller), 1 for anything it answered or
    /// refused. (2 is a usage error, from the argument parser.)
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } | CliError::BadUrl(_) => 3,
            _ => 1,
        }
    }
}

/// GET `path` from the REST API as JSON.
pub async fn get(target: &Target, path: &str) -> Result<Value, CliError> {
    request(target, http::Method::GET, path, String::new()).await
}

/// One request to the REST API; the answer as JSON.
async fn request(
    target: &Target,
    method: http::Method,
    path: &str,
    body: String,
) -> Result<Value, CliError> {
    if let Some(client) = &target.cluster {
        return through_api_server(client, method, path).await;
    }
    let authority = target
        .controller
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
        .filter(|a| !a.is_empty())
        .ok_or_else(|| CliError::BadUrl(target.controller.clone()))?;
    let token = std::fs::read_to_string(&target.token_file).map_err(|e| CliError::Token {
        path: target.token_file.clone(),
        reason: e.to_string(),
    })?;
    let token = token.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CliError::Token {
            path: target.token_file.clone(),
            reason: "the file does not hold a token (one word of printable characters)".into(),
        });
    }
    let unreachable = |reason: String| CliError::Unreachable {
        url: target.controller.clone(),
        reason,
    };
    let exchange = async {
        let tcp = TcpStream::connect(authority)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, authority)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok::<_, CliError>((status, body))
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| unreachable("no answer within 10 s".into()))??;
    if status == http::StatusCode::UNAUTHORIZED {
        return Err(CliError::Unauthorized);
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        return Err(CliError::Status {
            status: status.as_u16(),
            body: text,
        });
    }
    serde_json::from_str(&text).map_err(|e| CliError::Status {
        status: status.as_u16(),
        body: format!("not JSON: {e}"),
    })
}

/// A read of the controller's REST API, asked of the API server as the
/// kubeconfig's user (who needs RBAC on `api.weft.dev`, as weft-viewer
/// grants). Changes never go this way: they are Kubernetes objects.
async fn through_api_server(
    client: &kube::Client,
    method: http::Method,
    path: &str,
) -> Result<Value, CliError> {
    let Some(rest) = path
        .strip_prefix("/api/v1/")
        .filter(|_| method == http::Method::GET)
    else {
        return Err(CliError::Refused(
            "in a cluster this change is made with Kubernetes objects (kubectl), not through the controller".into(),
        ));
    };
    let req = http::Request::get(format!("{AGGREGATED}{rest}"))
        .body(Vec::new())
        .map_err(|e| CliError::Refused(e.to_string()))?;
    let answer = tokio::time::timeout(Duration::from_secs(15), client.request_text(req)).await;
    let text = match answer {
        Err(_) => {
            return Err(CliError::Unreachable {
                url: "the Kubernetes API".into(),
                reason: "no answer within 15 s".into(),
            });
        }
        Ok(Ok(text)) => text,
        Ok(Err(kube::Error::Api(s))) => return Err(aggregated_refusal(s.code, &s.message)),
        Ok(Err(e)) => {
            return Err(CliError::Unreachable {
                url: "the Kubernetes API".into(),
                reason: e.to_string(),
            });
        }
    };
    serde_json::from_str(&text).map_err(|e| CliError::Status {
        status: 200,
        body: format!("not JSON: {e}"),
    })
}

/// What an error from the aggregated API means to the user.
fn aggregated_refusal(code: u16, message: &str) -> CliError {
    match code {
        401 | 403 => CliError::Refused(format!(
            "the cluster refused to let you read the mesh ({message}); bind the weft-viewer ClusterRole to your user"
        )),
        404 if message.contains("could not find the requested resource") => CliError::Refused(
            "the API server does not serve api.weft.dev: install the APIService (kubectl weft install | kubectl apply -f -)".into(),
        ),
        503 => CliError::Unreachable {
            url: "the controller, through the API server".into(),
            reason: format!(
                "{message}; check `kubectl get apiservice v1alpha1.api.weft.dev` and the weft-controller pods"
            ),
        },
        _ => CliError::Status {
            status: code,
            body: message.to_owned(),
        },
    }
}

pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n") + "\n"
}

pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Which namespace a listing shows: `-n NS`, or every one (`-A`, the
/// default: in local mode there is no current namespace).
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub namespace: Option<String>,
}

impl Scope {
    fn admits(&self, ns: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == ns)
    }

    /// Refuses a namespace the controller does not know (a typo should
    /// not look like an empty mesh).
    async fn check(&self, target: &Target) -> Result<(), CliError> {
        let Some(ns) = &self.namespace else {
            return Ok(());
        };
        if let Some(client) = &target.cluster {
            let found = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
                .get_opt(ns)
                .await;
            return match found {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(CliError::Refused(format!(
                    "namespace {ns} does not exist; `-A` lists every namespace"
                ))),
                Err(e) => Err(aggregated_refusal(0, &e.to_string())),
            };
        }
        match get(target, &format!("/api/v1/objects/Namespace/{ns}")).await {
            Err(CliError::Status { status: 404, .. }) => Err(CliError::Refused(format!(
                "namespace {ns} is not known to the controller; `-A` lists every namespace"
            ))),
            other => other.map(|_| ()),
        }
    }

    /// `v`'s items narrowed to this scope, by the namespace `ns_of` reads.
    fn narrow(&self, mut v: Value, ns_of: impl Fn(&Value) -> String) -> Value {
        if let Some(items) = v["items"].as_array_mut() {
            items.retain(|i| self.admits(&ns_of(i)));
        }
        v
    }
}

/// A list endpoint as a table (one row per item) or as its JSON, narrowed
/// to `scope` by the namespace `ns_of` reads from each item.
async fn listing(
    target: &Target,
    (path, scope, ns_of): (&str, &Scope, fn(&Value) -> String),
    output: Output,
    headers: &[&str],
    fields: &[&str],
) -> Result<String, CliError> {
    scope.check(target).await?;
    let v = get(target, path).await?;
    let v = scope.narrow(v, ns_of);
    if let Some(text) = structured(&v, output) {
        return Ok(text);
    }
    let rows = v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| fields.iter().map(|f| s(&item[*f])).collect())
        .collect();
    Ok(table(headers, rows))
}

pub async fn workloads(target: &Target, scope: &Scope, output: Output) -> Result<String, CliError> {
    let mut headers = vec![
        "NAMESPACE",
        "NAME",
        "NODE",
        "ADDRESSES",
        "MESHED",
        "IDENTITY",
    ];
    let mut fields = vec![
        "namespace",
        "name",
        "node",
        "addresses",
        "meshed",
        "identity",
    ];
    if output == Output::Wide {
        headers.extend(["SERVICES", "WAYPOINT"]);
        fields.extend(["services", "waypoint"]);
    }
    listing(
        target,
        ("/api/v1/workloads", scope, |i| s(&i["namespace"])),
        output,
        &headers,
        &fields,
    )
    .await
}

/// Adds a namespace to the mesh (`join`) or takes it out (`leave`) by its
/// `weft.dev/mesh` label, through the controller's config objects (local
/// mode). In Kubernetes, label the namespace with kubectl instead.
pub async fn set_membership(
    target: &Target,
    namespace: &str,
    join: bool,
) -> Result<String, CliError> {
    let path = format!("/api/v1/objects/Namespace/{namespace}");
    let mut object = match get(target, &path).await {
        Ok(o) => o,
        Err(CliError::Status { status: 404, .. }) if join => {
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        }
        Err(CliError::Status { status: 404, .. }) => {
            return Ok(format!(
                "namespace {namespace} is not in the mesh (the controller does not know it)\n"
            ));
        }
        Err(e) => return Err(e),
    };
    let labels = &mut object["metadata"]["labels"];
    if !labels.is_object() {
        *labels = serde_json::json!({});
    }
    let was = labels[MESH_LABEL] == "enabled";
    if was == join {
        let state = if join { "already in" } else { "not in" };
        return Ok(format!("namespace {namespace} is {state} the mesh\n"));
    }
    if let Some(map) = labels.as_object_mut() {
        if join {
            map.insert(MESH_LABEL.into(), "enabled".into());
        } else {
            map.remove(MESH_LABEL);
        }
    }
    let answer = request(target, http::Method::PUT, &path, object.to_string()).await?;
    let verb = if join { "joined" } else { "left" };
    Ok(format!(
        "namespace {namespace} {verb} the mesh (config version {})\n",
        answer["version"]
    ))
}

/// Certificates the CA issued (the latest per identity, since it started).
pub async fn certs(target: &Target, scope: &Scope, output: Output) -> Result<String, CliError> {
    // spiffe://<td>/ns/<namespace>/sa/<sa>
    let ns_of = |i: &Value| {
        let id = s(&i["identity"]);
        let ns = id.split("/ns/").nth(1).and_then(|r| r.split('/').next());
        ns.unwrap_or_default().to_owned()
    };
    listing(
        target,
        ("/api/v1/certificates", scope, ns_of),
        output,
        &["IDENTITY", "SERIAL", "NOT AFTER"],
        &["identity", "serial", "notAfter"],
    )
    .await
}

/// Proxies and whether each has ACKed the config being served.
pub async fn proxy_status(target: &Target, output: Output) -> Result<String, CliError> {
    let v = get(target, "/api/v1/proxies").await?;
    if let Some(text) = structured(&v, output) {
        return Ok(text);
    }
    let current = v["configVersion"].as_u64().unwrap_or(0);
    let rows = v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let acked: Vec<u64> = p["ackedVersions"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, v)| v.as_u64())
                .collect();
            let newest = acked.iter().copied().max().unwrap_or(0);
            let sync = if p["nacks"].as_array().is_some_and(|n| !n.is_empty()) {
                "NACKED".to_owned()
            } else if newest == current {
                "SYNCED".to_owned()
            } else {
                format!("STALE (v{newest} of v{current})")
            };
            let connected = if p["connected"] == Value::Bool(true) {
                "yes"
            } else {
                "no"
            };
            let seen = p["lastSeenSecondsAgo"]
                .as_u64()
                .map(|s| format!("{s}s ago"))
                .unwrap_or_else(|| "-".into());
            vec![s(&p["node"]), connected.to_owned(), sync, seen]
        })
        .collect();
    Ok(table(&["NODE", "CONNECTED", "CONFIG", "LAST SEEN"], rows))
}

/// The mesh at a glance.
pub async fn status(target: &Target) -> Result<String, CliError> {
    Ok(format!("controller  {}\n", target.controller) + &controller_view(target).await?)
}

/// What the controller knows: config, proxies in sync, problems and
/// certificates near expiry.
pub async fn controller_view(target: &Target) -> Result<String, CliError> {
    let workloads = get(target, "/api/v1/workloads").await?;
    let proxies = get(target, "/api/v1/proxies").await?;
    let current = proxies["configVersion"].as_u64().unwrap_or(0);
    let items = proxies["items"].as_array().cloned().unwrap_or_default();
    let connected = items
        .iter()
        .filter(|p| p["connected"] == Value::Bool(true))
        .count();
    let synced = items
        .iter()
        .filter(|p| {
            p["ackedVersions"]
                .as_object()
                .is_some_and(|m| m.values().any(|v| v.as_u64() == Some(current)))
        })
        .count();
    let n = workloads["items"].as_array().map(Vec::len).unwrap_or(0);
    let mut out = format!(
        "config      version {current}, {n} workloads\nproxies     {connected} connected, {synced} on the current config\n"
    );
    let sources = get(target, "/api/v1/sources").await?;
    let problems = sources["problems"].as_array().cloned().unwrap_or_default();
    out += &format!("problems    {}\n", problems.len());
    for p in &problems {
        out += &format!("  {}: {}\n", s(&p["object"]), s(&p["reason"]));
    }
    let certs = get(target, "/api/v1/certificates").await?;
    let soon = expiring(&certs, SOON);
    out += &format!("certificates {} expiring within an hour\n", soon.len());
    for id in soon {
        out += &format!("  {id}\n");
    }
    Ok(out)
}

/// "Expiring soon" for `status`: renewal starts at half a lifetime, so a
/// certificate this close to its end has failed to renew for hours.
const SOON: Duration = Duration::from_secs(3600);

/// Identities whose latest certificate ends within `within`.
fn expiring(certs: &Value, within: Duration) -> Vec<String> {
    let limit = k8s_openapi::jiff::Timestamp::now()
        .checked_add(k8s_openapi::jiff::SignedDuration::try_from(within).unwrap_or_default())
        .unwrap_or(k8s_openapi::jiff::Timestamp::MAX);
    certs["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| {
            c["notAfter"]
                .as_str()
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                .is_some_and(|t| t < limit)
        })
        .map(|c| s(&c["identity"]))
        .collect()
}

/// The Kubernetes manifests (`kubectl weft install | kubectl apply -f -`):
/// the weft.dev CRDs, generated from their Rust types, then the controller,
/// its RBAC, and the ztunnel DaemonSet.
pub fn install() -> String {
    format!(
        "{}---\n{}",
        include_str!("../../manifests/crds.yaml"),
        include_str!("../../manifests/weft.yaml")
    )
}

/// `manifests/crds.yaml` as the Rust types generate it (a test keeps the
/// committed file equal: `WEFT_WRITE_CRDS=1 cargo test -p weft-cli` rewrites it).
pub fn crds_file() -> String {
    format!(
        "# Generated from controller/src/source/crds.rs; do not edit (a test checks it).\n{}",
        weft_controller::source::crds::crd_yaml()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_covers_every_kind_the_controller_watches() {
        let text = install();
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&text).expect("every document is YAML");
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == "CustomResourceDefinition")
                .count(),
            4,
            "AuthorizationPolicy, BackendPolicy, FaultInjection, RateLimit"
        );
        let role = docs
            .iter()
            .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "weft-controller")
            .expect("the controller's ClusterRole");
        let granted = |group: &str, plural: &str, verb: &str| {
            role["rules"].as_array().into_iter().flatten().any(|r| {
                let has = |field: &str, want: &str| {
                    r[field].as_array().into_iter().flatten().any(|v| v == want)
                };
                has("apiGroups", group) && has("resources", plural) && has("verbs", verb)
            })
        };
        for (group, plural) in weft_controller::source::kubernetes::watched() {
            for verb in ["list", "watch"] {
                assert!(
                    granted(&group, &plural, verb),
                    "RBAC lacks {verb} on {group}/{plural}"
                );
            }
        }
        assert!(granted("", "pods", "get"), "a proxy token's pod is read");
        assert!(granted("authentication.k8s.io", "tokenreviews", "create"));
        assert!(granted(
            "authorization.k8s.io",
            "subjectaccessreviews",
            "create"
        ));
    }
}

#[cfg(test)]
mod manifest_tests {
    use k8s_openapi::api::{apps, core, policy, rbac};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
    use serde_json::{Value, json};

    use super::s;

    /// `doc` read as `T` and written back is `doc`: a misspelt or
    /// misplaced field (which the API server would drop or refuse) fails.
    fn round_trips<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) {
        let typed: T = serde_json::from_value(doc.clone())
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", doc["metadata"]["name"]));
        let back = serde_json::to_value(&typed).expect("serialises");
        assert_eq!(&back, doc, "{} has fields its type lacks", doc["kind"]);
    }

    /// The committed CRDs are what the Rust types generate.
    #[test]
    fn committed_crds_match_the_rust_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crds.yaml");
        let generated = super::crds_file();
        if std::env::var_os("WEFT_WRITE_CRDS").is_some() {
            std::fs::write(path, &generated).expect("write crds.yaml");
        }
        let committed = std::fs::read_to_string(path).expect("manifests/crds.yaml");
        assert!(
            committed == generated,
            "manifests/crds.yaml differs from the Rust types; run WEFT_WRITE_CRDS=1 cargo test -p weft-cli committed_crds"
        );
    }

    /// `kubectl kustomize manifests/` renders the files the kustomization
    /// lists; `kubectl weft install` prints the same objects.
    #[test]
    fn the_kustomization_and_install_hold_the_same_objects() {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests"));
        let k: Value = serde_saphyr::from_str(
            &std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization"),
        )
        .expect("YAML");
        assert_eq!(k["kind"], "Kustomization");
        // Every manifest in the directory is listed (samples are applied
        // by hand), so a new file cannot be left out of either install.
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .expect("manifests/")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
            .collect();
        files.sort();
        let mut listed_files: Vec<String> = k["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .map(|f| f.as_str().unwrap_or_default().to_owned())
            .collect();
        listed_files.sort();
        assert_eq!(
            listed_files, files,
            "kustomization.yaml lists every manifest"
        );
        let key = |d: &Value| {
            format!(
                "{}/{}/{}",
                d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]
            )
        };
        let mut listed: Vec<(String, Value)> = Vec::new();
        for file in k["resources"].as_array().expect("resources") {
            let text =
                std::fs::read_to_string(dir.join(file.as_str().expect("a file"))).expect("read");
            let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
            listed.extend(docs.into_iter().map(|d| (key(&d), d)));
        }
        let docs: Vec<Value> = serde_saphyr::from_multiple(&super::install()).expect("YAML");
        let mut installed: Vec<(String, Value)> = docs.into_iter().map(|d| (key(&d), d)).collect();
        listed.sort_by(|a, b| a.0.cmp(&b.0));
        installed.sort_by(|a, b| a.0.cmp(&b.0));
        let keys = |v: &[(String, Value)]| v.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&listed), keys(&installed));
        for ((key, a), (_, b)) in listed.iter().zip(&installed) {
            assert!(
                a == b,
                "{key} differs between the kustomization and install"
            );
        }
    }

    /// The quick-start sample: the workload kinds parse as their
    /// Kubernetes types, every kind weft reads parses as weft reads it
    /// (the weft.dev ones through the Rust types their CRD schemas are
    /// generated from), and the whole translates with no problem: the
    /// Service bound to the waypoint, the route accepted.
    #[test]
    fn the_sample_application_is_valid() {
        use weft_controller::source::{Objects, parse_object, translate::translate};
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../manifests/samples/shop.yaml"
        );
        let text = std::fs::read_to_string(path).expect("sample");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
        let mut objects = Objects::default();
        for doc in &docs {
            match doc["kind"].as_str().unwrap_or_default() {
                "Deployment" => round_trips::<apps::v1::Deployment>(doc),
                "ServiceAccount" => round_trips::<core::v1::ServiceAccount>(doc),
                kind => {
                    let object = parse_object(&doc.to_string())
                        .unwrap_or_else(|e| panic!("{kind} {}: {e}", doc["metadata"]["name"]));
                    objects.insert(object);
                }
            }
        }
        let out = translate(&objects, "cluster.local");
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        let api = out
            .specs
            .services
            .iter()
            .find(|s| s.name == "api")
            .expect("api");
        assert_eq!(api.waypoint.as_deref(), Some("shop/waypoint"));
        assert_eq!(out.routes.len(), 1, "the split route");
        assert_eq!(out.specs.policies.len(), 1);
    }

    /// What the API server would refuse in `v` under a CRD's structural
    /// schema with strict field validation (kubectl's default): a wrong
    /// type, a missing required field, a value outside an enum, an unknown
    /// field. (CEL rules and formats are not checked.)
    fn schema_errors(schema: &Value, v: &Value, at: &str, out: &mut Vec<String>) {
        let fail = |out: &mut Vec<String>, what: String| out.push(format!("{at}: {what}"));
        match (schema["type"].as_str(), v) {
            (_, Value::Null) if schema["nullable"] == true => {}
            (Some("object"), Value::Object(fields)) => {
                for name in schema["required"].as_array().into_iter().flatten() {
                    if !fields.contains_key(name.as_str().unwrap_or_default()) {
                        fail(out, format!("missing required field {name}"));
                    }
                }
                for (k, x) in fields {
                    let path = format!("{at}.{k}");
                    match schema["properties"].get(k) {
                        Some(field) => schema_errors(field, x, &path, out),
                        None if schema["additionalProperties"].is_object() => {
                            schema_errors(&schema["additionalProperties"], x, &path, out)
                        }
                        None if schema["x-kubernetes-preserve-unknown-fields"] == true => {}
                        None if at.is_empty()
                            && ["apiVersion", "kind", "metadata"].contains(&k.as_str()) => {}
                        None => fail(out, format!("unknown field {k}")),
                    }
                }
            }
            (Some("array"), Value::Array(items)) => {
                for (i, x) in items.iter().enumerate() {
                    schema_errors(&schema["items"], x, &format!("{at}[{i}]"), out);
                }
            }
            (Some("string"), Value::String(text)) => {
                if let Some(allowed) = schema["enum"].as_array()
                    && !allowed.iter().any(|a| a == text)
                {
                    fail(out, format!("{text:?} is not one of {allowed:?}"));
                }
            }
            (Some("integer"), Value::Number(n)) if n.is_i64() || n.is_u64() => {}
            (Some("number"), Value::Number(_)) | (Some("boolean"), Value::Bool(_)) => {}
            // int-or-string, anyOf: left to the parser.
            (None, _) => {}
            (Some(ty), other) => fail(out, format!("expected {ty}, got {other}")),
        }
    }

    /// Every weft.dev object in the samples validates against the schema in
    /// the committed CRDs, as the API server would check it.
    #[test]
    fn the_samples_validate_against_the_committed_crds() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests");
        let crds: Vec<Value> = serde_saphyr::from_multiple(
            &std::fs::read_to_string(format!("{dir}/crds.yaml")).expect("crds.yaml"),
        )
        .expect("YAML");
        let schema_of = |doc: &Value| {
            let (group, version) = s(&doc["apiVersion"])
                .split_once('/')
                .map(|(g, v)| (g.to_owned(), v.to_owned()))?;
            let crd = crds.iter().find(|c| {
                c["spec"]["group"] == group.as_str() && c["spec"]["names"]["kind"] == doc["kind"]
            })?;
            let versions = crd["spec"]["versions"].as_array()?;
            let v = versions.iter().find(|v| v["name"] == version.as_str())?;
            Some(v["schema"]["openAPIV3Schema"].clone())
        };
        let text = std::fs::read_to_string(format!("{dir}/samples/shop.yaml")).expect("sample");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
        let mut checked = 0;
        for doc in docs
            .iter()
            .filter(|d| s(&d["apiVersion"]).starts_with("weft.dev/"))
        {
            let schema = schema_of(doc).unwrap_or_else(|| panic!("no CRD serves {}", doc["kind"]));
            let mut errors = Vec::new();
            schema_errors(&schema, doc, "", &mut errors);
            assert!(
                errors.is_empty(),
                "{} {}: {errors:?}",
                doc["kind"],
                doc["metadata"]["name"]
            );
            // The check can fail: a typo'd field, a wrong type, a bad enum.
            for (path, bad) in [
                ("rulez", json!([])),
                ("rules", json!("all")),
                ("action", json!("PERMIT")),
            ] {
                let mut typo = doc.clone();
                typo["spec"][path] = bad;
                let mut errors = Vec::new();
                schema_errors(&schema, &typo, "", &mut errors);
                assert!(!errors.is_empty(), "spec.{path} accepted");
            }
            checked += 1;
        }
        assert!(checked > 0, "the sample holds weft.dev objects");
    }

    #[test]
    fn every_manifest_is_a_valid_kubernetes_object() {
        let text = super::install();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
        for doc in &docs {
            match doc["kind"].as_str().unwrap_or_default() {
                "Namespace" => round_trips::<core::v1::Namespace>(doc),
                "ServiceAccount" => round_trips::<core::v1::ServiceAccount>(doc),
                "Service" => round_trips::<core::v1::Service>(doc),
                "ClusterRole" => round_trips::<rbac::v1::ClusterRole>(doc),
                "ClusterRoleBinding" => round_trips::<rbac::v1::ClusterRoleBinding>(doc),
                "Role" => round_trips::<rbac::v1::Role>(doc),
                "RoleBinding" => round_trips::<rbac::v1::RoleBinding>(doc),
                "Deployment" => round_trips::<apps::v1::Deployment>(doc),
                "DaemonSet" => round_trips::<apps::v1::DaemonSet>(doc),
                "PodDisruptionBudget" => round_trips::<policy::v1::PodDisruptionBudget>(doc),
                "CustomResourceDefinition" => round_trips::<CustomResourceDefinition>(doc),
                "APIService" => round_trips::<APIService>(doc),
                other => panic!("no check for kind {other}"),
            }
        }
        // The APIService names what the controller serves, on a port of
        // its Service that reaches the controller's aggregated port.
        let find = |kind: &str, name: &str| {
            docs.iter()
                .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("{kind} {name}"))
        };
        use weft_controller::aggregated::{API_SERVICE, GROUP, VERSION};
        let api = find("APIService", API_SERVICE);
        assert_eq!(
            (&api["spec"]["group"], &api["spec"]["version"]),
            (&GROUP.into(), &VERSION.into())
        );
        let svc = find("Service", s(&api["spec"]["service"]["name"]).as_str());
        let port = svc["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["port"] == api["spec"]["service"]["port"])
            .expect("the APIService's port on the Service");
        let controller =
            &find("Deployment", "weft-controller")["spec"]["template"]["spec"]["containers"][0];
        let target = controller["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == port["targetPort"])
            .expect("the Service's target port on the controller");
        assert_eq!(
            target["containerPort"], 8443,
            "the controller's --aggregated-addr default"
        );
        // The ztunnel runs as the account whose tokens make a node, with
        // a projected token for the CA's audience.
        let ds = docs
            .iter()
            .find(|d| d["kind"] == "DaemonSet")
            .expect("ztunnel");
        let account = format!(
            "{}/{}",
            ds["metadata"]["namespace"].as_str().unwrap_or_default(),
            ds["spec"]["template"]["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or_default()
        );
        let tokens = weft_controller::kube_auth::ProxyTokens::default();
        assert_eq!(account, tokens.ztunnel_account);
        let projected = ds["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["projected"]["sources"].as_array())
            .flatten()
            .any(|s| s["serviceAccountToken"]["audience"] == tokens.audiences[0].as_str());
        assert!(
            projected,
            "the ztunnel mounts a token for {:?}",
            tokens.audiences
        );
    }
}

/// What `waypoint apply` makes.
#[derive(Debug, Clone)]
pub struct WaypointSpec {
    pub namespace: String,
    pub name: String,
    /// Serve only this service account's workloads.
    pub for_service_account: Option<String>,
    /// Also bind the whole namespace to it (`weft.dev/use-waypoint`).
    pub enroll_namespace: bool,
}

/// The Gateway of class `weft-waypoint` that makes a waypoint.
pub fn waypoint_gateway(spec: &WaypointSpec) -> Value {
    let mut gw = serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": spec.name, "namespace": spec.namespace},
        "spec": {"gatewayClassName": WAYPOINT_CLASS,
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    });
    if let Some(sa) = &spec.for_service_account {
        gw["metadata"]["labels"] = serde_json::json!({ FOR_SERVICE_ACCOUNT: sa });
    }
    gw
}

/// Writes a waypoint's Gateway into the controller's config (local mode),
/// and with `enroll_namespace` labels the namespace to use it. Serving it
/// takes a running `weft-waypoint` (the demo starts one).
pub async fn waypoint_apply(target: &Target, spec: &WaypointSpec) -> Result<String, CliError> {
    let (ns, name) = (&spec.namespace, &spec.name);
    let path = format!("/api/v1/objects/Gateway/{ns}/{name}");
    let body = waypoint_gateway(spec).to_string();
    let answer = request(target, http::Method::PUT, &path, body).await?;
    let mut out = format!(
        "waypoint {ns}/{name} applied (config version {})\n",
        answer["version"]
    );
    if spec.enroll_namespace {
        let path = format!("/api/v1/objects/Namespace/{ns}");
        let mut object = get(target, &path).await?;
        if !object["metadata"]["labels"].is_object() {
            object["metadata"]["labels"] = serde_json::json!({});
        }
        object["metadata"]["labels"][USE_WAYPOINT] = Value::String(name.clone());
        let answer = request(target, http::Method::PUT, &path, object.to_string()).await?;
        out += &format!(
            "namespace {ns} now uses it (config version {})\n",
            answer["version"]
        );
    }
    out += &format!(
        "serve it with: weft-waypoint -n {ns} --name {name} --ca-root <root.pem> --token-file <data-dir>/nodes/{}.token\n",
        waypoint_proxy_name(&format!("{ns}/{name}"))
    );
    Ok(out)
}

/// A request to explain: `route explain SERVICE PORT ...`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RouteQuery {
    /// The Service, namespace/name.
    pub service: String,
    pub port: u16,
    #[arg(long, default_value = "/")]
    pub path: String,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// A request header, NAME:VALUE. Repeatable.
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// The client's namespace (consumer routes); default: the Service's.
    #[arg(long)]
    pub from: Option<String>,
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved).
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `name=value&...` (values encoded, absent ones left out), then a
/// `header=` for each `NAME:VALUE`.
fn query_string(pairs: &[(&str, Option<&String>)], headers: &[String]) -> String {
    let given = pairs
        .iter()
        .filter_map(|(k, v)| Some((*k, v.as_ref()?.as_str())));
    let all = given.chain(headers.iter().map(|h| ("header", h.as_str())));
    all.map(|(k, v)| format!("{k}={}", encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Which route and rule would serve a request through the Service's
/// waypoint, decided by the controller with the matcher the waypoint runs;
/// a request no rule serves is an error (exit 1) saying what happens.
pub async fn route_explain(
    target: &Target,
    q: &RouteQuery,
    output: Output,
) -> Result<String, CliError> {
    let port = q.port.to_string();
    let pairs = [
        ("service", Some(&q.service)),
        ("port", Some(&port)),
        ("path", Some(&q.path)),
        ("method", Some(&q.method)),
        ("from", q.from.as_ref()),
    ];
    let query = query_string(&pairs, &q.headers);
    let v = get(target, &format!("/api/v1/routes/explain?{query}")).await?;
    if v["matched"] != true {
        return Err(CliError::Refused(format!(
            "{} {} on {}:{}: {}",
            q.method,
            q.path,
            q.service,
            q.port,
            s(&v["reason"])
        )));
    }
    if let Some(text) = structured(&v, output) {
        return Ok(text);
    }
    let rows = v["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            vec![
                format!("{}:{}", s(&b["service"]), s(&b["port"])),
                s(&b["weight"]),
                s(&b["invalid"]),
            ]
        })
        .collect();
    Ok(format!(
        "route {} rule {} (waypoint {})\n{}",
        s(&v["route"]),
        s(&v["rule"]),
        s(&v["waypoint"]),
        table(&["BACKEND", "WEIGHT", "INVALID"], rows)
    ))
}

/// `kubectl weft policy check SRC DST PORT`.
#[derive(clap::Args, Debug, Clone)]
pub struct PolicyQuery {
    /// The client workload, namespace/name.
    pub src: String,
    /// A Service or workload, namespace/name.
    pub dst: String,
    pub port: u16,
    #[arg(long, default_value = "/")]
    pub path: String,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// The Host the client sends (default: the destination's name).
    #[arg(long)]
    pub host: Option<String>,
    /// A request header, NAME:VALUE. Repeatable.
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
}

/// Which policy and rule decide whether SRC reaches DST, at L7 (the
/// waypoint) and L4 (each endpoint's ztunnel), decided by the controller
/// with the proxies' own code; a denial is an error (exit 1).
pub async fn policy_check(
    target: &Target,
    q: &PolicyQuery,
    output: Output,
) -> Result<String, CliError> {
    let port = q.port.to_string();
    let pairs = [
        ("from", Some(&q.src)),
        ("to", Some(&q.dst)),
        ("port", Some(&port)),
        ("path", Some(&q.path)),
        ("method", Some(&q.method)),
        ("host", q.host.as_ref()),
    ];
    let query = query_string(&pairs, &q.headers);
    let v = get(target, &format!("/api/v1/policies/check?{query}")).await?;
    let text = structured(&v, output).unwrap_or_else(|| {
        let mut rows = vec![match v["l7"]["applies"] == true {
            true => vec![
                "L7".into(),
                format!("waypoint {}", s(&v["waypoint"])),
                verdict(&v["l7"]),
                s(&v["l7"]["reason"]),
            ],
            false => vec!["L7".into(), "-".into(), "-".into(), s(&v["l7"]["reason"])],
        }];
        for d in v["l4"].as_array().into_iter().flatten() {
            rows.push(vec![
                "L4".into(),
                format!(
                    "{} (from {}, port {})",
                    s(&d["workload"]),
                    s(&d["as"]),
                    s(&d["port"])
                ),
                verdict(d),
                s(&d["reason"]),
            ]);
        }
        table(&["LAYER", "WHERE", "DECISION", "WHY"], rows)
    });
    if v["allowed"] == true {
        Ok(text)
    } else {
        Err(CliError::Refused(format!(
            "{} may not reach {}:{}\n{text}",
            q.src, q.dst, q.port
        )))
    }
}

fn verdict(d: &Value) -> String {
    if d["allowed"] == true {
        "ALLOW"
    } else {
        "DENY"
    }
    .into()
}

/// Removes a waypoint's Gateway (local mode), and the namespace's
/// `weft.dev/use-waypoint` label when it names this waypoint; Services
/// still bound to it are named (their traffic is refused until they are
/// rebound: fail closed).
pub async fn waypoint_delete(
    target: &Target,
    namespace: &str,
    name: &str,
) -> Result<String, CliError> {
    let path = format!("/api/v1/objects/Gateway/{namespace}/{name}");
    let answer = match request(target, http::Method::DELETE, &path, String::new()).await {
        Err(CliError::Status { status: 404, .. }) => {
            return Err(CliError::Refused(format!(
                "no waypoint {namespace}/{name}; `kubectl weft waypoint list` shows the waypoints"
            )));
        }
        other => other?,
    };
    let mut out = format!(
        "waypoint {namespace}/{name} deleted (config version {})\n",
        answer["version"]
    );
    let ns_path = format!("/api/v1/objects/Namespace/{namespace}");
    if let Ok(mut ns) = get(target, &ns_path).await
        && ns["metadata"]["labels"][USE_WAYPOINT] == name
    {
        if let Some(labels) = ns["metadata"]["labels"].as_object_mut() {
            labels.remove(USE_WAYPOINT);
        }
        request(target, http::Method::PUT, &ns_path, ns.to_string()).await?;
        out += &format!("namespace {namespace} no longer uses it\n");
    }
    let key = format!("{namespace}/{name}");
    let listed = get(target, "/api/v1/waypoints").await?;
    for b in listed["bindings"].as_array().into_iter().flatten() {
        if b["waypoint"] == key.as_str() && b["kind"] == "Service" {
            out += &format!(
                "Service {} is still bound to it (label {USE_WAYPOINT}); its traffic is refused until you remove the label\n",
                s(&b["name"])
            );
        }
    }
    Ok(out)
}

/// Waits (up to `timeout`) until waypoint `namespace/name` is connected to
/// the controller with its config: `waypoint apply --wait`.
pub async fn waypoint_wait(
    target: &Target,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<String, CliError> {
    let key = format!("{namespace}/{name}");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut why = String::from("not listed yet");
    loop {
        let listed = get(target, "/api/v1/waypoints").await?;
        let item = listed["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["waypoint"] == key.as_str())
            .cloned();
        if let Some(item) = item {
            if item["connected"] == true {
                return Ok(format!("waypoint {key} is serving\n"));
            }
            why = match s(&item["reason"]) {
                r if r.is_empty() || r == "-" => "no instance connected to the controller".into(),
                r => r,
            };
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::Refused(format!(
                "waypoint {key} not serving after {}s: {why} (is weft-waypoint running for it?)",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waypoints, and every Namespace and Service bound to one: whether the
/// binding is in effect and, if not, why.
pub async fn waypoint_list(target: &Target, output: Output) -> Result<String, CliError> {
    let v = get(target, "/api/v1/waypoints").await?;
    if let Some(text) = structured(&v, output) {
        return Ok(text);
    }
    let fields = |item: &Value, names: &[&str]| names.iter().map(|f| s(&item[*f])).collect();
    let rows = |key: &str, names: &[&str]| -> Vec<Vec<String>> {
        v[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| fields(i, names))
            .collect()
    };
    let waypoints = table(
        &[
            "WAYPOINT",
            "FOR-SA",
            "ADDRESSES",
            "CONNECTED",
            "IN-EFFECT",
            "REASON",
        ],
        rows(
            "items",
            &[
                "waypoint",
                "forServiceAccount",
                "addresses",
                "connected",
                "inEffect",
                "reason",
            ],
        ),
    );
    let bindings = table(
        &["KIND", "NAME", "WAYPOINT", "IN-EFFECT", "REASON"],
        rows(
            "bindings",
            &["kind", "name", "waypoint", "inEffect", "reason"],
        ),
    );
    Ok(format!("{waypoints}\n{bindings}"))
}
