//! The waypoint, end to end in network namespaces: a controller reading
//! Kubernetes-shaped YAML, two nodes with their ztunnels, api pods behind a
//! Service bound to a waypoint running in its own namespace, and curl in
//! the client pod. Routes, splits, retries, timeouts, redirects, the
//! bypass refusal and failing closed, as a user would see them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use weft_cli::demo::mesh::ZtunnelOptions;
use weft_cli::demo::waypoint::{Waypoint, WaypointOptions, start_waypoint, start_waypoint_with};
use weft_integration::netns::{PodNs, Topology, is_root};
use weft_integration::{Mesh, enroll};
use weft_proto::hbone::pool::{ConnectRequest, Dialer, Pool, PoolKey, PoolSettings};
use weft_proto::identity::Identity;
use weft_waypoint::proxy::Limits;

const VIP: &str = "10.96.0.10";
const TD: &str = "cluster.local";

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root for network namespaces and nftables (CI runs as root)");
            return;
        }
    };
}

/// Requests each app received, by path prefix.
type Hits = Arc<std::sync::Mutex<BTreeMap<String, u64>>>;

/// A keep-alive HTTP/1.1 app on :8080 in `pod`. It answers
/// `<pod> <path> <x-weft-route or ->`; `/flaky` answers 503 on every
/// other request, `/down` always 503, `/slow` after 2 s.
async fn app(pod: &PodNs, hits: Hits) {
    let listener = pod
        .listen("0.0.0.0:8080".parse().expect("addr"))
        .await
        .expect("app listens");
    let name = pod.name.clone();
    let flaky = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (name, hits, flaky) = (name.clone(), hits.clone(), flaky.clone());
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                    let mut route = "-".to_owned();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("x-weft-route:") {
                            route = v.trim().to_owned();
                        }
                        // The trace context it was sent, for the tests to follow.
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("traceparent:") {
                            let seen = format!("traceparent {}", v.trim());
                            *hits.lock().expect("hits").entry(seen).or_default() += 1;
                        }
                    }
                    let first = path.split('/').nth(1).unwrap_or("").to_owned();
                    *hits.lock().expect("hits").entry(first.clone()).or_default() += 1;
                    let status = match first.as_str() {
                        "flaky" if flaky.fetch_add(1, Ordering::Relaxed) % 2 == 0 => {
                            "503 Service Unavailable"
                        }
                        // api-v1 alone is sick here (api-v2 answers 200).
                        "down" | "sick" => "503 Service Unavailable",
                        "slow" => {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            "200 OK"
                        }
                        _ => "200 OK",
                    };
                    let body = format!("{name} {path} {route}\n");
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// api-v2's app: hyper serving HTTP/1.1 and HTTP/2 (h2c) on :8080, the
/// same answers as [`app`] plus its protocol; `/ws` upgrades and echoes.
async fn h2_app(pod: &PodNs, hits: Hits) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let listener = pod
        .listen("0.0.0.0:8080".parse().expect("addr"))
        .await
        .expect("app listens");
    let name = pod.name.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (name, hits) = (name.clone(), hits.clone());
            let closed = hits.clone();
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    let name = name.clone();
                    let first = req.uri().path().split('/').nth(1).unwrap_or("").to_owned();
                    *hits.lock().expect("hits").entry(first).or_default() += 1;
                    async move {
                        let route = req
                            .headers()
                            .get("x-weft-route")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        let body =
                            format!("{name} {} {route} {:?}\n", req.uri().path(), req.version());
                        if req.method() == hyper::Method::POST {
                            // An upload endpoint reads what it is sent.
                            use http_body_util::BodyExt;
                            let _ = req.body_mut().collect().await;
                        }
                        let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
                        if req.uri().path() == "/ws" && req.headers().contains_key("upgrade") {
                            let upgrade = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(up) = upgrade.await {
                                    let (mut r, mut w) =
                                        tokio::io::split(hyper_util::rt::TokioIo::new(up));
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                            resp.headers_mut()
                                .insert("upgrade", "websocket".parse().expect("value"));
                            resp.headers_mut()
                                .insert("connection", "upgrade".parse().expect("value"));
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                },
            );
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let _ = builder
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
                // Connections that ended, for the idle-timeout test.
                *closed
                    .lock()
                    .expect("hits")
                    .entry("closed".into())
                    .or_default() += 1;
            });
        }
    });
}

/// A gRPC server on :9090 in `pod`: a unary call (the CA's) that fails
/// with NOT_FOUND on request, and a stream (Delta xDS's) that sends three
/// responses and ends.
async fn grpc_app(pod: &PodNs) {
    use weft_proto::pb::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;
    use weft_proto::pb::xds::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
    let listener = pod
        .listen("0.0.0.0:9090".parse().expect("addr"))
        .await
        .expect("grpc listens");
    let svc = Grpc(pod.name.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IstioCertificateServiceServer::new(svc.clone()))
            .add_service(AggregatedDiscoveryServiceServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
}

#[derive(Clone)]
struct Grpc(String);

#[tonic::async_trait]
impl weft_proto::pb::istio::v1::auth::istio_certificate_service_server::IstioCertificateService
    for Grpc
{
    async fn create_certificate(
        &self,
        req: tonic::Request<weft_proto::pb::istio::v1::auth::IstioCertificateRequest>,
    ) -> Result<
        tonic::Response<weft_proto::pb::istio::v1::auth::IstioCertificateResponse>,
        tonic::Status,
    > {
        let csr = req.into_inner().csr;
        if csr == "fail" {
            return Err(tonic::Status::not_found("no such thing, said the server"));
        }
        Ok(tonic::Response::new(
            weft_proto::pb::istio::v1::auth::IstioCertificateResponse {
                cert_chain: vec![self.0.clone(), csr],
            },
        ))
    }
}

#[tonic::async_trait]
impl weft_proto::pb::xds::aggregated_discovery_service_server::AggregatedDiscoveryService for Grpc {
    type DeltaAggregatedResourcesStream = tokio_stream::wrappers::ReceiverStream<
        Result<weft_proto::pb::xds::DeltaDiscoveryResponse, tonic::Status>,
    >;

    async fn delta_aggregated_resources(
        &self,
        req: tonic::Request<tonic::Streaming<weft_proto::pb::xds::DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .map(|r| r.type_url)
            .unwrap_or_default();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let name = self.0.clone();
        tokio::spawn(async move {
            for i in 0..3 {
                let resp = weft_proto::pb::xds::DeltaDiscoveryResponse {
                    type_url: format!("{first} from {name}"),
                    nonce: i.to_string(),
                    ..Default::default()
                };
                let _ = tx.send(Ok(resp)).await;
            }
            // Then the rest of the client's stream, counted (both ways).
            let mut got = 1;
            while let Ok(Some(_)) = inbound.message().await {
                got += 1;
            }
            let done = weft_proto::pb::xds::DeltaDiscoveryResponse {
                nonce: format!("got {got}"),
                ..Default::default()
            };
            let _ = tx.send(Ok(done)).await;
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }
}

/// A server-first TCP app on :7000: it greets, then echoes.
async fn greeter(pod: &PodNs) {
    let listener = pod
        .listen("0.0.0.0:7000".parse().expect("addr"))
        .await
        .expect("listens");
    let hello = format!("hello from {}\n", pod.name);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let hello = hello.clone();
            tokio::spawn(async move {
                let _ = s.write_all(hello.as_bytes()).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

fn pod_yaml(pod: &PodNs, node: &str, sa: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, labels: {{{labels}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: app, image: test, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
         status: {{phase: Running, podIP: {}}}\n",
        pod.name, pod.ip
    )
}

fn service_yaml(name: &str, vip: &str, selector: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default, labels: {{{labels}}}}}\n\
         spec: {{clusterIP: {vip}, selector: {{{selector}}}, ports: [{{name: http, port: 80, targetPort: http}}, {{name: grpc, port: 9090, targetPort: 9090, appProtocol: grpc}}, {{name: tcp, port: 7000, targetPort: 7000, appProtocol: tcp}}, {{name: sniffed, port: 7001, targetPort: 7000}}]}}\n"
    )
}

const ROUTES: &str = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default, labels: {weft.dev/for-service-account: api}}
spec:
  gatewayClassName: weft-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /v2}}]
      filters:
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-weft-route, value: v2-path}]}}
        - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}
        - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-served-by, value: waypoint}]}}
      backendRefs: [{name: api-v2, port: 80}]
    - matches: [{headers: [{name: x-version, value: v2}]}]
      backendRefs: [{name: api-v2, port: 80}]
    - matches: [{method: DELETE}]
      backendRefs: [{name: api-v2, port: 80}]
    - matches: [{queryParams: [{name: canary, value: "1"}]}]
      backendRefs: [{name: api-v2, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /flaky}}, {path: {type: PathPrefix, value: /down}}]
      retry: {attempts: 3, codes: [503]}
      backendRefs: [{name: api-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /slow}}]
      timeouts: {request: 500ms}
      backendRefs: [{name: api-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /mirror}}]
      filters: [{type: RequestMirror, requestMirror: {backendRef: {name: api-v2, port: 80}}}]
      backendRefs: [{name: api-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /limited}}]
      filters: [{type: ExtensionRef, extensionRef: {group: weft.dev, kind: RateLimit, name: five-a-minute}}]
      backendRefs: [{name: api-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /sick}}]
      backendRefs: [{name: api, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /counted}}]
      backendRefs: [{name: api-up, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}}]
    - backendRefs: [{name: api-v1, port: 80, weight: 90}, {name: api-v2, port: 80, weight: 10}]
---
apiVersion: weft.dev/v1alpha1
kind: RateLimit
metadata: {name: five-a-minute, namespace: default}
spec: {requests: 5, interval: 1m}
---
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {name: up-idle, namespace: default}
spec:
  targetRef: {kind: Service, name: api-up}
  idleTimeout: 1s
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: api-grpc, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 9090}]
  rules:
    - matches: [{method: {service: istio.v1.auth.IstioCertificateService, method: CreateCertificate}}]
      backendRefs: [{name: api-v2, port: 9090}]
    - backendRefs: [{name: api, port: 9090}]
"#;

struct Cluster {
    _topo: Topology,
    mesh: Mesh,
    client: PodNs,
    outsider: PodNs,
    api_v1: PodNs,
    waypoint_pod: PodNs,
    hits_v1: Hits,
    hits_v2: Hits,
    zt_a: weft_ztunnel::app::Bound,
    _zt_b: weft_ztunnel::app::Bound,
    dir: std::path::PathBuf,
}

impl Cluster {
    async fn start() -> (Cluster, Waypoint) {
        Self::start_with(WaypointOptions::default()).await
    }

    async fn start_limited(limits: Limits) -> (Cluster, Waypoint) {
        let options = WaypointOptions {
            limits,
            ..Default::default()
        };
        Self::start_with(options).await
    }

    async fn start_with(options: WaypointOptions) -> (Cluster, Waypoint) {
        let mut topo = Topology::new();
        let mesh = Mesh::start().await;
        let a = topo.node("a", "10.244.1.0/24").expect("topology");
        let b = topo.node("b", "10.244.2.0/24").expect("topology");
        topo.link(&a, &b).expect("topology");
        let client = topo.pod(&a, "client").expect("topology");
        let outsider = topo.pod(&a, "outsider").expect("topology");
        let api_v1 = topo.pod(&b, "api-v1").expect("topology");
        let api_v2 = topo.pod(&b, "api-v2").expect("topology");
        let waypoint_pod = topo.pod(&b, "waypoint").expect("topology");
        let mut yaml = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {weft.dev/mesh: enabled}}\n",
        );
        yaml += &pod_yaml(&client, "node-a", "client", "app: client");
        yaml += &pod_yaml(
            &outsider,
            "node-a",
            "outsider",
            "app: outsider, weft.dev/mesh: disabled",
        );
        yaml += &pod_yaml(&api_v1, "node-b", "api", "app: api, version: v1");
        yaml += &pod_yaml(&api_v2, "node-b", "api", "app: api, version: v2");
        yaml += &pod_yaml(
            &waypoint_pod,
            "node-b",
            "waypoint",
            "gateway.networking.k8s.io/gateway-name: waypoint",
        );
        yaml += &service_yaml("api", VIP, "app: api", "weft.dev/use-waypoint: waypoint");
        yaml += &service_yaml("api-v1", "10.96.0.11", "version: v1", "");
        yaml += &service_yaml("api-v2", "10.96.0.12", "version: v2", "");
        // Only the upload-counting test sends here: its metrics are its own.
        yaml += &service_yaml("api-up", "10.96.0.13", "version: v2", "");
        yaml += ROUTES;
        std::fs::write(mesh.config_dir().join("shop.yaml"), yaml).expect("config written");
        let served = async {
            let mut rx = mesh.controller.sources.clone();
            loop {
                let m = mesh.controller.config.current().model.clone();
                if m.routes.len() == 2
                    && m.waypoints.first().is_some_and(|w| !w.addresses.is_empty())
                {
                    return;
                }
                rx.changed().await.expect("source");
            }
        };
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("controller serves the config");
        let dir = topo.dir.path().to_owned();
        let zt_options = ZtunnelOptions {
            drain_deadline: Duration::from_secs(1),
            ..ZtunnelOptions::default()
        };
        let zt_a = mesh
            .ztunnel_pushed("node-a", &dir.join("zt-a"), zt_options)
            .await;
        let zt_b = mesh
            .ztunnel_pushed("node-b", &dir.join("zt-b"), zt_options)
            .await;
        for (zt, pod) in [(&zt_a, &client), (&zt_b, &api_v1), (&zt_b, &api_v2)] {
            enroll(zt, pod).await;
        }
        let (hits_v1, hits_v2) = (Hits::default(), Hits::default());
        app(&api_v1, hits_v1.clone()).await;
        h2_app(&api_v2, hits_v2.clone()).await;
        for pod in [&api_v1, &api_v2] {
            grpc_app(pod).await;
            greeter(pod).await;
        }
        let wp = start_waypoint_with(
            &mesh.controller,
            ("default/waypoint", "waypoint"),
            &waypoint_pod,
            &dir.join("wp"),
            options,
        )
        .await
        .expect("waypoint starts");
        let c = Cluster {
            _topo: topo,
            mesh,
            client,
            outsider,
            api_v1,
            waypoint_pod,
            hits_v1,
            hits_v2,
            zt_a,
            _zt_b: zt_b,
            dir,
        };
        (c, wp)
    }

    async fn waypoint(&self) -> Waypoint {
        start_waypoint(
            &self.mesh.controller,
            "default/waypoint",
            "waypoint",
            &self.waypoint_pod,
            &self.dir.join("wp"),
        )
        .await
        .expect("waypoint starts")
    }

    /// curl from inside the client pod: (status, headers and body).
    async fn curl(&self, args: &[&str]) -> (u16, String) {
        let mut cmd = vec![
            "netns",
            "exec",
            &self.client.netns,
            "curl",
            "-s",
            "-i",
            "--max-time",
            "5",
        ];
        cmd.extend_from_slice(args);
        let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        let out = tokio::task::spawn_blocking(move || Command::new("ip").args(&cmd).output())
            .await
            .expect("curl thread")
            .expect("curl runs (install curl)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, text)
    }
}

fn url(path: &str) -> String {
    format!("http://{VIP}{path}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_split_retry_and_time_out_through_the_waypoint() {
    require_root!();
    let (c, wp) = Cluster::start().await;
    // Path prefix: rewritten, header set on the way in and out.
    let (status, text) = c.curl(&[&url("/v2/orders")]).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.ends_with("api-v2 /orders v2-path HTTP/1.1\n"),
        "{text}"
    );
    assert!(
        text.to_ascii_lowercase().contains("x-served-by: waypoint"),
        "{text}"
    );
    // Header, method and query matches.
    let (_, text) = c.curl(&["-H", "x-version: v2", &url("/a")]).await;
    assert!(text.ends_with("api-v2 /a - HTTP/1.1\n"), "{text}");
    let (_, text) = c.curl(&["-X", "DELETE", &url("/a")]).await;
    assert!(text.ends_with("api-v2 /a - HTTP/1.1\n"), "{text}");
    let (_, text) = c.curl(&[&url("/a?canary=1")]).await;
    assert!(text.ends_with("api-v2 /a - HTTP/1.1\n"), "{text}");
    // Expect: 100-continue: the waypoint says 100 as soon as the body is
    // wanted (curl would otherwise wait 1 s before sending it).
    let body = c.dir.join("upload.bin");
    std::fs::write(&body, vec![b'x'; 64 * 1024]).expect("body file");
    let data = format!("@{}", body.display());
    let started = std::time::Instant::now();
    let expect = [
        "-H",
        "x-version: v2",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
    ];
    let (_, text) = c
        .curl(&[&expect[..], &[&data, &url("/upload")]].concat())
        .await;
    assert!(text.starts_with("HTTP/1.1 100 Continue"), "{text}");
    assert!(text.ends_with("api-v2 /upload - HTTP/1.1\n"), "{text}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(900),
        "100 came at once, not after curl's 1 s wait: {took:?}"
    );
    // A mirrored request: the client's answer is api-v1's; api-v2 gets the
    // copy (fire and forget).
    let (_, text) = c.curl(&[&url("/mirror/x")]).await;
    assert!(text.ends_with("api-v1 /mirror/x -\n"), "{text}");
    let mirrored = || c.hits_v2.lock().expect("hits").get("mirror") == Some(&1);
    weft_integration::eventually("api-v2 receives the mirrored copy", mirrored).await;
    // A redirect is answered by the waypoint itself.
    let (status, text) = c.curl(&[&url("/old/x")]).await;
    assert_eq!(status, 301, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("location: http://10.96.0.10/new"),
        "{text}"
    );

    // 1,000 requests over one keep-alive connection split 90/10: api-v2's
    // count is Binomial(1000, 0.1), mean 100, sd 9.5; [69, 131] is ±3.29
    // sd, so a correct split fails this with p < 0.001.
    let (_, text) = c.curl(&["-o", "-", &url("/split/[1-1000]")]).await;
    let v1 = text
        .lines()
        .filter(|l| l.starts_with("api-v1 /split/"))
        .count();
    let v2 = text
        .lines()
        .filter(|l| l.starts_with("api-v2 /split/"))
        .count();
    eprintln!("split: api-v1 {v1}, api-v2 {v2}");
    assert_eq!(v1 + v2, 1000, "every request answered");
    assert!((69..=131).contains(&v2), "api-v2 got {v2} of 1000");

    // Retry: the first attempt gets 503, the client sees 200; the app saw
    // exactly two requests. A backend that always fails is tried exactly
    // three times (the route's attempts) and its 503 passes through.
    let retries = wp.proxy.stats.retries.load(Ordering::Relaxed);
    let (status, text) = c.curl(&[&url("/flaky")]).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(c.hits_v1.lock().expect("hits").get("flaky"), Some(&2));
    assert!(
        wp.proxy.stats.retries.load(Ordering::Relaxed) > retries,
        "the retry is counted"
    );
    let (status, _) = c.curl(&[&url("/down")]).await;
    assert_eq!(status, 503);
    assert_eq!(
        c.hits_v1.lock().expect("hits").get("down"),
        Some(&3),
        "attempts never exceed 3"
    );
    // Request timeout: 504 at 500 ms, not the app's 2 s.
    let started = std::time::Instant::now();
    let (status, _) = c.curl(&[&url("/slow")]).await;
    assert_eq!(status, 504);
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    drop(c);
    wp.stop().await;
}

/// A connection made inside the pod at `netns`, as its application would.
async fn dial_from(
    netns: std::path::PathBuf,
    dst: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    weft_integration::netns::connect_in(&netns, dst).await
}

/// An HBONE client dialling from inside the outsider pod (not captured).
struct FromPod(std::path::PathBuf);

impl Dialer for FromPod {
    fn dial(
        &self,
        _src: Option<std::net::IpAddr>,
        dst: SocketAddr,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send + '_>,
    > {
        Box::pin(dial_from(self.0.clone(), dst))
    }
}

/// Runs a command inside the client pod; its stdout.
async fn in_client(c: &Cluster, args: &[&str]) -> String {
    let mut cmd = vec![
        "netns".to_owned(),
        "exec".to_owned(),
        c.client.netns.clone(),
    ];
    cmd.extend(args.iter().map(|s| s.to_string()));
    let out = tokio::task::spawn_blocking(move || Command::new("ip").args(&cmd).output())
        .await
        .expect("thread")
        .expect("runs");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_grpc_and_upgrades_pass_the_waypoint() {
    use weft_proto::pb::istio::v1::auth::IstioCertificateRequest;
    use weft_proto::pb::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
    use weft_proto::pb::xds::DeltaDiscoveryRequest;
    use weft_proto::pb::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    require_root!();
    let (c, wp) = Cluster::start().await;
    // h2load speaks HTTP/2 with prior knowledge; the route sends it to the
    // HTTP/2-capable api-v2, which sees HTTP/2 too.
    let h2load = [
        "h2load",
        "-n",
        "1000",
        "-c",
        "4",
        "-m",
        "10",
        "-H",
        "x-version: v2",
    ];
    let out = in_client(&c, &[&h2load[..], &[&url("/h2")]].concat()).await;
    assert!(
        out.contains("1000 succeeded") && out.contains("1000 2xx"),
        "{out}"
    );
    let curl = [
        "curl",
        "-s",
        "--http2-prior-knowledge",
        "-H",
        "x-version: v2",
    ];
    let out = in_client(&c, &[&curl[..], &[&url("/h2")]].concat()).await;
    assert_eq!(out, "api-v2 /h2 - HTTP/2.0\n");

    // gRPC (tonic both ends): unary, an error status with its message,
    // and a stream both ways, all with their trailers.
    let netns = c.client.path.clone();
    let dst: SocketAddr = format!("{VIP}:9090").parse().expect("addr");
    let channel = tonic::transport::Endpoint::from_static("http://api.default:9090")
        .connect_with_connector(tower::service_fn(move |_| {
            let netns = netns.clone();
            async move {
                dial_from(netns, dst)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .expect("gRPC channel through the mesh");
    let mut ca = IstioCertificateServiceClient::new(channel.clone());
    let req = |csr: &str| IstioCertificateRequest {
        csr: csr.into(),
        ..Default::default()
    };
    // The GRPCRoute sends CreateCertificate to api-v2, every time.
    for _ in 0..5 {
        let ok = ca
            .create_certificate(req("hello"))
            .await
            .expect("unary call")
            .into_inner();
        assert_eq!(ok.cert_chain, ["api-v2", "hello"]);
    }
    let err = ca
        .create_certificate(req("fail"))
        .await
        .expect_err("NOT_FOUND");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "no such thing, said the server");
    let mut ads = AggregatedDiscoveryServiceClient::new(channel);
    let asks = (0..3).map(|i| DeltaDiscoveryRequest {
        type_url: format!("t{i}"),
        ..Default::default()
    });
    let mut stream = ads
        .delta_aggregated_resources(tokio_stream::iter(asks))
        .await
        .expect("stream opens")
        .into_inner();
    let mut nonces = Vec::new();
    while let Some(msg) = stream
        .message()
        .await
        .expect("stream ends with OK trailers")
    {
        nonces.push(msg.nonce);
    }
    assert_eq!(nonces, ["0", "1", "2", "got 3"], "streams both ways");

    // An upgrade (the WebSocket handshake): 101, then bytes both ways.
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("addr");
    let s = dial_from(c.client.path.clone(), vip)
        .await
        .expect("connect");
    let mut r = BufReader::new(s);
    let hello = "GET /ws HTTP/1.1\r\nhost: api\r\nx-version: v2\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
                 sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    r.get_mut()
        .write_all(hello.as_bytes())
        .await
        .expect("write");
    let mut status = String::new();
    r.read_line(&mut status).await.expect("status line");
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await.expect("header");
        if h == "\r\n" || h.is_empty() {
            break;
        }
    }
    r.get_mut()
        .write_all(b"ping over the upgrade\n")
        .await
        .expect("write");
    let mut echoed = String::new();
    tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut echoed))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(echoed, "ping over the upgrade\n");

    // Opaque TCP through the waypoint, server first: a port declared `tcp`
    // at once, an undeclared one after the sniffing wait; bytes untouched.
    for port in [7000, 7001] {
        let to: SocketAddr = format!("{VIP}:{port}").parse().expect("addr");
        let s = dial_from(c.client.path.clone(), to).await.expect("connect");
        let mut r = BufReader::new(s);
        let mut greeting = String::new();
        tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut greeting))
            .await
            .expect("greeting in time")
            .expect("read");
        assert!(
            greeting.starts_with("hello from api-v"),
            "{port}: {greeting}"
        );
        r.get_mut()
            .write_all(b"\x00\x01 binary\n")
            .await
            .expect("write");
        let mut echoed = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), r.read_until(b'\n', &mut echoed))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(echoed, b"\x00\x01 binary\n");
    }
    assert!(wp.proxy.stats.opaque.load(Ordering::Relaxed) >= 2);
    drop(c);
    wp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_traffic_fails_closed_and_cannot_bypass_the_waypoint() {
    require_root!();
    let (c, wp) = Cluster::start().await;
    // A pod IP dialled directly is still served, through the waypoint.
    let direct = format!("http://{}:8080/direct", c.api_v1.ip);
    let (status, text) = c.curl(&[&direct]).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("api-v1 /direct -\n"), "{text}");
    assert!(wp.proxy.stats.requests.get("-") >= 1);

    // A mesh client with a valid certificate that skips the waypoint and
    // tunnels straight to api-v1 is refused by api-v1's ztunnel.
    let node = c.mesh.node("node-a");
    let client_id = Identity::new(TD, "default", "client").expect("id");
    let cert = node.cert(&client_id).await;
    let pool = Pool::with_dialer(
        PoolSettings::default(),
        Arc::new(FromPod(c.outsider.path.clone())),
    );
    let key = PoolKey {
        src: client_id,
        dst: Identity::new(TD, "default", "api").expect("id"),
        dst_addr: SocketAddr::new(c.api_v1.ip, 15008),
        src_ip: None,
    };
    let req = ConnectRequest {
        authority: SocketAddr::new(c.api_v1.ip, 8080),
        headers: Default::default(),
    };
    let refused = pool
        .connect(&key, &cert, req)
        .await
        .err()
        .expect("bypass refused");
    assert!(refused.to_string().contains("403"), "{refused}");

    // Waypoint gone: bound traffic fails closed at the source ztunnel
    // (counted as UH), never sent direct. Back: served again, no ztunnel
    // touched.
    wp.stop().await;
    let before = c.zt_a.node.stats.outbound_failed.get("UH");
    let (status, text) = c.curl(&[&url("/a")]).await;
    assert_eq!(status, 0, "no answer while the waypoint is down: {text}");
    assert!(
        c.zt_a.node.stats.outbound_failed.get("UH") > before,
        "refusal counted as UH"
    );
    let wp = c.waypoint().await;
    let (status, text) = c.curl(&[&url("/a")]).await;
    assert_eq!(status, 200, "{text}");
    drop(c);
    wp.stop().await;
}

/// Sends `bytes` from the client pod to the api VIP and reads what comes
/// back until the waypoint closes (bounded): the answer, if any.
async fn raw(c: &Cluster, bytes: &[u8]) -> String {
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("addr");
    let mut s = dial_from(c.client.path.clone(), vip)
        .await
        .expect("connect");
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the waypoint answers or closes in time");
    String::from_utf8_lossy(&out).to_string()
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_is_refused_or_closed_and_others_are_served() {
    require_root!();
    let limits = Limits {
        header_read_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let (c, wp) = Cluster::start_limited(limits).await;
    let rss = weft_integration::rss_kib();
    let errors = || wp.proxy.stats.connection_errors.load(Ordering::Relaxed);

    // Oversized head (100 KiB of one header): never reaches a backend.
    let big = format!(
        "GET / HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let answer = raw(&c, big.as_bytes()).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    // Content-Length and Transfer-Encoding together; a bad chunk size.
    let smuggle = "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n";
    let answer = raw(&c, smuggle.as_bytes()).await;
    assert!(
        !answer.contains("/smuggled"),
        "a smuggled request was served: {answer}"
    );
    // hyper lets Transfer-Encoding win and closes after answering (RFC
    // 9112 §6.3): one answer, never a second request off the same bytes.
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    let answer = raw(
        &c,
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    )
    .await;
    assert!(!answer.starts_with("HTTP/1.1 2"), "{answer}");
    // Slowloris: a head that never ends is cut at the header timeout (1 s).
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("addr");
    cut_at_header_timeout(&c, vip, b"GET / HTTP/1.1\r\nhost: a\r\nx-slow: a").await;
    // A client that sends nothing at all on a port declared HTTP (no
    // sniffing wait in front): closed at the header timeout too, counted
    // before its connection ends.
    let before = errors();
    let declared: SocketAddr = format!("{VIP}:9090").parse().expect("addr");
    cut_at_header_timeout(&c, declared, b"").await;
    assert_eq!(errors(), before + 1, "the silent connection is counted");

    // HTTP/2 CONTINUATION flood: a header block that never ends.
    let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    flood.extend(frame(0x4, 0, 0, &[]));
    flood.extend(frame(0x1, 0x1, 1, &[0x82, 0x86, 0x84])); // GET http / , no END_HEADERS
    let filler: Vec<u8> = std::iter::repeat_n([0x00u8, 0x01, b'x', 0x01, b'y'], 3000)
        .flatten()
        .collect();
    let mut s = dial_from(c.client.path.clone(), vip)
        .await
        .expect("connect");
    s.write_all(&flood).await.expect("preface");
    let mut sent = 0usize;
    while sent < 8 * 1024 * 1024 {
        if s.write_all(&frame(0x9, 0, 1, &filler)).await.is_err() {
            break;
        }
        sent += filler.len();
    }
    let mut back = Vec::new();
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut back),
    )
    .await;
    assert!(
        closed.is_ok(),
        "the flood's connection is closed (sent {sent} bytes)"
    );

    // HTTP/2 rapid reset: streams opened and reset at once, over and over.
    let tcp = dial_from(c.client.path.clone(), vip)
        .await
        .expect("connect");
    let (mut h2, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(conn);
    let mut reset = 0;
    for _ in 0..5000 {
        let req = http::Request::get(format!("http://{VIP}/"))
            .body(())
            .expect("request");
        let Ok(ready) = h2.ready().await else { break };
        h2 = ready;
        match h2.send_request(req, true) {
            Ok((_, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                reset += 1;
            }
            Err(_) => break,
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), driver).await;
    assert!(
        ended.is_ok(),
        "the resetting connection is closed (after {reset} resets)"
    );
    assert!(
        reset < 5000,
        "the waypoint stopped the reset flood (at {reset})"
    );

    // Every refusal is counted; other clients are served; memory flat.
    assert!(errors() >= 3, "counted: {}", errors());
    let (status, text) = c.curl(&[&url("/after")]).await;
    assert_eq!(status, 200, "{text}");
    let grown = weft_integration::rss_kib().saturating_sub(rss);
    assert!(grown < 64 * 1024, "RSS grew {grown} KiB");
    drop(c);
    wp.stop().await;
}

/// A connection to `to` that sends `head` and no more is closed (EOF, no
/// answer) at the waypoint's 1 s header timeout; the bound leaves room
/// for a loaded machine.
async fn cut_at_header_timeout(c: &Cluster, to: SocketAddr, head: &[u8]) {
    let mut s = dial_from(c.client.path.clone(), to).await.expect("connect");
    let started = std::time::Instant::now();
    s.write_all(head).await.expect("write");
    let mut rest = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut rest);
    let r = tokio::time::timeout(Duration::from_secs(5), read).await;
    assert!(matches!(r, Ok(Ok(0))) && rest.is_empty(), "{r:?} {rest:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "cut at ~1 s, not {took:?}");
}

impl Cluster {
    /// Writes `yaml` as `file` in the mesh's config and waits (bounded)
    /// until the waypoint holds L7 policies satisfying `done`.
    async fn l7_policies(
        &self,
        wp: &Waypoint,
        (file, yaml): (&str, &str),
        done: impl Fn(&[Arc<weft_proto::request_policy::RequestPolicy>]) -> bool,
    ) {
        std::fs::write(self.mesh.config_dir().join(file), yaml).expect("policy written");
        let mut model = wp.proxy.model.clone();
        let reached = async {
            while !done(&model.borrow_and_update().request_policies) {
                model.changed().await.expect("config stream");
            }
        };
        tokio::time::timeout(Duration::from_secs(10), reached)
            .await
            .expect("the waypoint receives the policies");
    }
}

const NO_ADMIN: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  targetRefs: [{group: "", kind: Service, name: api}]
  action: DENY
  rules:
    - paths: [/admin, /admin/*]
    - hosts: [blocked.example]
"#;

fn only(principal: &str) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: only, namespace: default}}\nspec:\n  \
         targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}]\n  \
         action: ALLOW\n  rules: [{{principals: [\"spiffe://{TD}/ns/default/sa/{principal}\"]}}]\n"
    )
}

/// L7 AuthorizationPolicy at the waypoint: a DENY on a path and a host
/// holds however the request spells them (escapes, dot segments, doubled
/// slashes, fragment, host case, port, trailing dot), a path that cannot
/// be normalised is refused, every refusal is counted; an ALLOW by
/// principal admits that principal only, judged by the verified identity
/// whatever headers claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_policy_judges_normalised_requests_by_the_verified_identity() {
    require_root!();
    let (c, wp) = Cluster::start().await;
    c.l7_policies(&wp, ("no-admin.yaml", NO_ADMIN), |p| p.len() == 1)
        .await;
    let denied = wp.proxy.stats.requests.get("DENY");
    let spellings = [
        "/admin",
        "/%61dmin",
        "/x/../admin",
        "//admin",
        "/./admin/",
        "/admin/x",
        "/ADMIN/../admin",
    ];
    for path in spellings {
        let (status, text) = c.curl(&["--path-as-is", &url(path)]).await;
        assert_eq!(status, 403, "{path}: {text}");
    }
    let (status, text) = c.curl(&[&url("/items")]).await;
    assert_eq!(status, 200, "{text}");
    for host in ["blocked.example", "BLOCKED.Example:80", "blocked.example."] {
        let (status, text) = c
            .curl(&["-H", &format!("Host: {host}"), &url("/items")])
            .await;
        assert_eq!(status, 403, "{host}: {text}");
    }
    let fragment = raw(
        &c,
        b"GET /admin#top HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(fragment.starts_with("HTTP/1.1 403"), "{fragment}");
    let encoded_slash = raw(
        &c,
        b"GET /admin%2Fx HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(encoded_slash.starts_with("HTTP/1.1 400"), "{encoded_slash}");
    let counted = wp.proxy.stats.requests.get("DENY") - denied;
    assert_eq!(counted, spellings.len() as u64 + 4, "every denial counted");

    // ALLOW someone else only: the client is refused, even claiming that
    // identity in headers; then ALLOW the client: served.
    c.l7_policies(&wp, ("only.yaml", &only("someone-else")), |p| p.len() == 2)
        .await;
    let forged = format!(
        "By=spiffe://{TD}/ns/default/sa/waypoint;URI=spiffe://{TD}/ns/default/sa/someone-else"
    );
    let xfcc = format!("x-forwarded-client-cert: {forged}");
    let items = url("/items");
    let baggage = "baggage: k8s.serviceaccount.name=someone-else";
    let (status, text) = c.curl(&["-H", &xfcc, "-H", baggage, &items]).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("no ALLOW policy matched"), "{text}");
    let client = format!("spiffe://{TD}/ns/default/sa/client");
    c.l7_policies(&wp, ("only.yaml", &only("client")), |p| {
        p.iter()
            .any(|p| p.spec.rules.iter().any(|r| r.principals.contains(&client)))
    })
    .await;
    let (status, text) = c.curl(&[&url("/items")]).await;
    assert_eq!(status, 200, "{text}");
    let (status, _) = c.curl(&["--path-as-is", &url("/x/../admin")]).await;
    assert_eq!(status, 403, "DENY still wins");
    drop(c);
    wp.stop().await;
}

/// GET `path` on `addr` from inside the pod at `netns`: the body.
async fn get_in(netns: std::path::PathBuf, addr: SocketAddr, path: &str) -> String {
    let mut s = dial_from(netns, addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut out);
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("answered in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).to_string();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// Request telemetry at the waypoint: the caller's trace is continued
/// (same trace id, a new span) and one is started when absent; the
/// request metrics carry the source, destination, code and flags, and the
/// waypoint's /metrics passes promtool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_traced_and_measured() {
    require_root!();
    let (collector, spans) = weft_integration::otlp::collector()
        .await
        .expect("collector");
    let options = WaypointOptions {
        otlp_endpoint: Some(format!("http://{collector}")),
        ..Default::default()
    };
    let (c, wp) = Cluster::start_with(options).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("traceparent: 00-{trace}-00f067aa0ba902b7-01");
    let (status, text) = c.curl(&["-H", &parent, &url("/mirror/a")]).await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = c.curl(&[&url("/mirror/b")]).await;
    assert_eq!(status, 200, "{text}");
    let (status, _) = c.curl(&[&url("/down")]).await;
    assert_eq!(status, 503);
    // A streamed upload (chunked, no Content-Length) is counted as sent.
    let upload = "u".repeat(10_000);
    let chunked = [
        "-X",
        "POST",
        "-H",
        "transfer-encoding: chunked",
        "--data-binary",
    ];
    let (status, text) = c
        .curl(&[&chunked[..], &[&upload, &url("/counted")]].concat())
        .await;
    assert_eq!(status, 200, "{text}");
    // api-up's BackendPolicy closes its connections after 1 s unused.
    let closed = || c.hits_v2.lock().expect("hits").get("closed").copied();
    let quiet = std::time::Instant::now();
    let idle_closed = async {
        while closed().is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), idle_closed)
        .await
        .expect("the idle upstream connection is closed");
    // Closed by a sweep at least a second after it was parked (just
    // before the answer reached curl; half a second of slack for a busy
    // machine), not before.
    assert!(
        quiet.elapsed() >= Duration::from_millis(500),
        "not before it was idle"
    );
    let seen: Vec<String> = c
        .hits_v1
        .lock()
        .expect("hits")
        .keys()
        .filter_map(|k| k.strip_prefix("traceparent ").map(str::to_owned))
        .collect();
    let continued: Vec<&String> = seen.iter().filter(|t| t.contains(trace)).collect();
    assert_eq!(continued.len(), 1, "{seen:?}");
    assert!(
        !continued[0].contains("00f067aa0ba902b7"),
        "a new span: {seen:?}"
    );
    assert!(continued[0].ends_with("-01"), "sampled as the caller said");
    assert!(
        seen.iter().any(|t| !t.contains(trace)),
        "a trace started: {seen:?}"
    );

    let metrics = wp.metrics_addr.expect("metrics served");
    let text = get_in(c.waypoint_pod.path.clone(), metrics, "/metrics").await;
    let client = format!("source_principal=\"spiffe://{TD}/ns/default/sa/client\"");
    let requests: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("weft_requests_total{"))
        .collect();
    let has = |parts: &[&str]| requests.iter().any(|l| parts.iter().all(|p| l.contains(p)));
    assert!(
        has(&[
            &client,
            "source_workload=\"client\"",
            "destination_service=\"default/api-v1\"",
            "response_code=\"200\"",
            "response_flags=\"-\""
        ]),
        "{requests:#?}"
    );
    assert!(
        has(&[&client, "response_code=\"503\"", "response_flags=\"URX\""]),
        "{requests:#?}"
    );
    assert!(
        text.contains("weft_request_duration_seconds_bucket{"),
        "a histogram"
    );
    assert!(text.contains("# HELP weft_requests_total "));
    let uploaded: f64 = text
        .lines()
        .filter(|l| l.starts_with("weft_request_bytes_total{"))
        .filter(|l| l.contains("destination_service=\"default/api-up\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(uploaded, 10_000.0, "the streamed body's bytes:\n{text}");
    if let Err(e) = weft_integration::promtool_check(&text) {
        panic!("promtool check metrics:\n{e}");
    }
    drop(c);
    // Stopping sends the last batch of spans.
    wp.stop().await;
    let spans = spans.lock().expect("spans").clone();
    assert_eq!(spans.len(), 4, "one span per request: {spans:#?}");
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mine = spans
        .iter()
        .find(|s| hex(&s.trace_id) == trace)
        .expect("the caller's trace has the waypoint's span");
    assert_eq!(hex(&mine.parent_span_id), "00f067aa0ba902b7");
    assert!(
        continued[0].contains(&hex(&mine.span_id)),
        "the backend's parent is the exported span: {continued:?}"
    );
    assert_eq!(mine.kind, 2, "SERVER");
    let code = |s: &SpanPb| {
        s.attributes
            .iter()
            .find(|a| a.key == "http.response.status_code")
            .and_then(|a| a.value.clone()?.value)
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    assert_eq!(code(mine), Some(Value::IntValue(200)));
    let failed = spans
        .iter()
        .find(|s| code(s) == Some(Value::IntValue(503)))
        .expect("the failed request's span");
    assert_eq!(failed.status.as_ref().map(|s| s.code), Some(2), "ERROR");
    assert!(failed.parent_span_id.is_empty(), "a trace started here");
    for s in &seen {
        let exported = spans.iter().any(|x| s.contains(&hex(&x.span_id)));
        assert!(exported, "{s}: every request sent on has its span");
    }
}

use weft_integration::otlp::Span as SpanPb;

const RESILIENCE: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {name: v1-limits, namespace: default}
spec:
  targetRef: {kind: Service, name: api-v1}
  limits: {maxRequests: 1, maxPendingRequests: 0}
---
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {name: api-outliers, namespace: default}
spec:
  targetRef: {kind: Service, name: api}
  outlierDetection: {consecutive5xx: 2, baseEjectionTime: 60s, maxEjectionPercent: 50}
"#;

/// BackendPolicy at the waypoint: a circuit breaker opens at its limit
/// (503 `UO` at once, counted) and closes as requests finish; an endpoint
/// answering 5xx in a row is ejected and gets no traffic while its peer,
/// healthy, serves everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breakers_open_and_outliers_are_ejected() {
    require_root!();
    let (c, wp) = Cluster::start().await;
    std::fs::write(c.mesh.config_dir().join("resilience.yaml"), RESILIENCE).expect("written");
    let mut model = wp.proxy.model.clone();
    let reached = async {
        // up-idle, from the start, and these two.
        while model.borrow_and_update().backends.len() < 3 {
            model.changed().await.expect("config stream");
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reached)
        .await
        .expect("policies arrive");

    // Six at once to api-v1 (each held 500 ms by /slow's timeout): one
    // slot, no room to wait.
    let slow = url("/slow");
    let args: [&str; 1] = [&slow];
    let (a, b, c3, d, e, f) = tokio::join!(
        c.curl(&args),
        c.curl(&args),
        c.curl(&args),
        c.curl(&args),
        c.curl(&args),
        c.curl(&args)
    );
    let answers = [a, b, c3, d, e, f];
    let open = answers
        .iter()
        .filter(|(s, t)| *s == 503 && t.contains("circuit open"))
        .count();
    let timed_out = answers.iter().filter(|(s, _)| *s == 504).count();
    assert!(open >= 3 && timed_out >= 1, "{answers:#?}");
    assert!(wp.proxy.stats.requests.get("UO") >= open as u64);
    let (status, text) = c.curl(&[&url("/mirror/after")]).await;
    assert_eq!(status, 200, "closed again: {text}");

    // api-v1 answers /sick with 503, api-v2 with 200; round robin puts
    // both in turn until api-v1 is ejected after its second failure.
    let sick_v1 = || {
        c.hits_v1
            .lock()
            .expect("hits")
            .get("sick")
            .copied()
            .unwrap_or(0)
    };
    let mut failures = 0;
    for i in 0..10 {
        let (status, _) = c.curl(&[&url(&format!("/sick/{i}"))]).await;
        failures += usize::from(status == 503);
    }
    assert!(
        (2..=3).contains(&failures),
        "ejected after two failures: {failures}"
    );
    let before = sick_v1();
    for i in 0..10 {
        let (status, text) = c.curl(&[&url(&format!("/sick/again{i}"))]).await;
        assert_eq!(status, 200, "only the healthy endpoint serves: {text}");
    }
    assert_eq!(sick_v1(), before, "the ejected endpoint got no traffic");
    drop(c);
    wp.stop().await;
}

/// A RateLimit by ExtensionRef: a burst over it gets 429 with
/// `retry-after` for what is over (the budget refills at 5 a minute, so
/// at most one more gets through while the burst lasts), counted; other
/// routes are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_past_the_budget() {
    require_root!();
    let (c, wp) = Cluster::start().await;
    let mut limited = 0;
    for i in 0..20 {
        let (status, text) = c.curl(&[&url(&format!("/limited/{i}"))]).await;
        match status {
            200 => {}
            429 => {
                limited += 1;
                let retry_after = text
                    .lines()
                    .find_map(|l| l.strip_prefix("retry-after: "))
                    .and_then(|v| v.trim().parse::<u64>().ok());
                assert!(retry_after.is_some_and(|s| (1..=12).contains(&s)), "{text}");
            }
            other => panic!("{other}: {text}"),
        }
    }
    assert!(
        (14..=15).contains(&limited),
        "5 allowed (+1 if the refill came): {limited} limited"
    );
    assert_eq!(wp.proxy.stats.requests.get("RL"), limited as u64);
    let (status, text) = c.curl(&[&url("/mirror/free")]).await;
    assert_eq!(status, 200, "other routes are not limited: {text}");
    drop(c);
    wp.stop().await;
}
