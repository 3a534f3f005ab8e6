//! The config stream: controller → proxy over Delta xDS, on loopback.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use weft_integration::Mesh;
use weft_proto::model::Model;
use weft_proto::resources::{AUTHORIZATION, WORKLOAD};
use weft_proto::xds::{self, XdsConfig};

const Y1: &str = "workloads:
  - {name: web, serviceAccount: web, node: a, addresses: [10.0.1.2]}
  - {name: api, serviceAccount: api, node: b, addresses: [10.0.2.2], services: [default/api]}
services:
  - {name: api, addresses: [10.96.0.10], ports: [{port: 80, targetPort: 8080}]}
";

fn model(yaml: &str) -> Model {
    Model::from_yaml(yaml, "cluster.local").expect("valid")
}

fn client(
    mesh: &Mesh,
    node: &str,
    token: &str,
) -> (watch::Receiver<Option<Arc<Model>>>, Arc<xds::XdsStats>) {
    xds::spawn(XdsConfig {
        controller: mesh.controller.grpc_addr,
        roots: mesh.roots().into(),
        controller_identity: mesh.controller.identity.clone(),
        credential: token.into(),
        node: node.to_owned(),
        trust_domain: "cluster.local".into(),
        types: &weft_proto::resources::ZTUNNEL_TYPES,
    })
}

async fn until(
    rx: &mut watch::Receiver<Option<Arc<Model>>>,
    what: &str,
    f: impl Fn(&Model) -> bool,
) -> Arc<Model> {
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|m| m.as_deref().is_some_and(&f)),
    )
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    .expect("client alive")
    .clone()
    .expect("model")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_changes_and_survives_a_controller_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = Mesh::start_in(dir.path().to_owned(), Duration::from_secs(3600)).await;
    let addr = mesh.controller.grpc_addr;
    mesh.controller.config.set(model(Y1));
    let token = mesh.node("a").token;
    let (mut rx, stats) = client(&mesh, "a", &token);
    let m = until(&mut rx, "the first config", |m| m.workloads.len() == 2).await;
    assert!(
        m.service_by_vip("10.96.0.10".parse().expect("ip"))
            .is_some()
    );
    // Placement follows config: node a may now get web's certificate.
    let web = weft_proto::Identity::new("cluster.local", "default", "web").expect("id");
    assert!(mesh.controller.nodes.entitled("a", &web));
    assert!(!mesh.controller.nodes.entitled("b", &web));

    // One pod changes: one resource is pushed, and the proxy ACKs it.
    let y2 = Y1.replace("10.0.1.2", "10.0.1.9");
    let version = mesh.controller.config.set(model(&y2));
    until(&mut rx, "the changed pod", |m| {
        m.workload_by_ip("10.0.1.9".parse().expect("ip")).is_some()
    })
    .await;
    let status = || mesh.controller.proxies.get("a").expect("proxy known");
    weft_integration::eventually("ACK of the new version", || {
        status().acked.get(WORKLOAD) == Some(&version)
    })
    .await;
    assert_eq!(
        status().last_push_resources,
        1,
        "a one-pod change sends one resource"
    );
    assert!(status().connected);
    assert!(status().nacks.is_empty());

    // The controller's own metrics on 15014 tell the same story.
    let url = format!("http://{}/metrics", mesh.controller.metrics_addr);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sSf", "--max-time", "5", &url])
            .output()
    })
    .await
    .expect("curl thread")
    .expect("curl (install curl)");
    let metrics = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{metrics}"))
    };
    assert!(value("weft_controller_connected_proxies") >= 1.0);
    assert!(
        value("weft_controller_pushes_total") >= 4.0,
        "three subscriptions and a change"
    );
    assert!(value("weft_controller_push_latency_seconds_count") >= 1.0);
    assert!(
        metrics.contains("weft_controller_push_latency_seconds_bucket"),
        "a real histogram"
    );

    // A wrong token gets nothing, however often it retries.
    let (mut stranger, stranger_stats) = client(&mesh, "a", "not-a-token");
    weft_integration::eventually("stranger retried", || {
        stranger_stats.connects.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert!(stranger.borrow_and_update().is_none());

    // The controller goes away: the proxy keeps serving its last config.
    mesh.controller.shutdown().await;
    assert!(
        rx.borrow()
            .as_ref()
            .expect("kept")
            .workload_by_ip("10.0.1.9".parse().expect("ip"))
            .is_some()
    );

    // It comes back (same data dir, same address) with a new policy: the
    // proxy reconnects, says what it has, and receives only the policy.
    let y3 = format!(
        "{y2}policies:\n  - {{name: p, action: DENY, rules: [{{principals: [\"spiffe://cluster.local/ns/default/sa/web\"]}}]}}\n"
    );
    let mut config = weft_controller::app::Config::local(dir.path().to_owned());
    config.grpc_addr = addr;
    let controller = weft_controller::app::build(config).await.expect("restart");
    let v3 = controller.config.set(model(&y3));
    until(&mut rx, "the policy after the restart", |m| {
        m.policies.len() == 1
    })
    .await;
    weft_integration::eventually("ACK after reconnect", || {
        controller
            .proxies
            .get("a")
            .is_some_and(|s| s.acked.get(AUTHORIZATION) == Some(&v3))
    })
    .await;
    let after = controller.proxies.get("a").expect("proxy");
    assert_eq!(
        after.resources_sent, 1,
        "only the new policy was sent after the reconnect"
    );
    assert!(stats.connects.load(Ordering::Relaxed) >= 2);
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_receives_only_the_policies_of_its_workloads() {
    let mesh = Mesh::start().await;
    let y = "workloads:
  - {name: web, serviceAccount: web, node: a, addresses: [10.0.1.2], labels: {app: web}}
  - {name: api, serviceAccount: api, node: b, addresses: [10.0.2.2], labels: {app: api}}
policies:
  - {name: api-only-web, action: ALLOW, selector: {app: api}, rules: [{principals: [\"spiffe://cluster.local/ns/default/sa/web\"]}]}
  - {name: everyone, action: DENY, rules: [{ipBlocks: [192.0.2.0/24]}]}
";
    mesh.controller.config.set(model(y));
    let (mut a, _) = client(&mesh, "a", &mesh.node("a").token);
    let (mut b, _) = client(&mesh, "b", &mesh.node("b").token);
    let keys = |m: &Model| -> Vec<String> { m.policies.iter().map(|p| p.key.clone()).collect() };
    let ma = until(&mut a, "a's config", |m| m.workloads.len() == 2).await;
    let mb = until(&mut b, "b's config", |m| m.workloads.len() == 2).await;
    assert_eq!(
        keys(&ma),
        ["default/everyone"],
        "a runs no app=api workload"
    );
    assert_eq!(keys(&mb), ["default/api-only-web", "default/everyone"]);

    // api moves to node a: the policy follows it.
    mesh.controller.config.set(model(&y.replace(
        "node: b, addresses: [10.0.2.2]",
        "node: a, addresses: [10.0.2.2]",
    )));
    until(&mut a, "the policy arriving on a", |m| {
        m.policies.len() == 2
    })
    .await;
    until(&mut b, "both leaving b, which runs nothing now", |m| {
        m.policies.is_empty()
    })
    .await;
}

/// One raw gRPC exchange on the config stream: `payload` framed as one
/// message, then the grpc-status and grpc-message the controller answers
/// with (from the trailers, or a trailers-only response).
async fn raw_xds(mesh: &Mesh, token: &str, payload: &[u8]) -> (String, String) {
    let config = weft_proto::tls::controller_client_config(
        weft_proto::tls::Trust::Static(mesh.roots()),
        mesh.controller.identity.clone(),
    );
    let tcp = tokio::net::TcpStream::connect(mesh.controller.grpc_addr)
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(weft_proto::tls::server_name(), tcp)
        .await
        .expect("tls");
    let (mut h2, conn) = h2::client::handshake(tls).await.expect("h2");
    tokio::spawn(conn);
    let req = http::Request::post(
        "https://weft.mesh/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
    )
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("authorization", format!("Bearer {token}"))
    .body(())
    .expect("request");
    let (response, mut body) = h2.send_request(req, false).expect("send");
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    body.send_data(frame.into(), false).expect("data");
    let exchange = async {
        let response = response.await.expect("response");
        let header = |h: &http::HeaderMap, k: &str| {
            h.get(k).map(|v| v.to_str().unwrap_or_default().to_owned())
        };
        if let Some(code) = header(response.headers(), "grpc-status") {
            let msg = header(response.headers(), "grpc-message").unwrap_or_default();
            return (code, msg);
        }
        let mut recv = response.into_body();
        while let Some(data) = recv.data().await {
            let _ = data.expect("data");
        }
        let trailers = recv
            .trailers()
            .await
            .expect("trailers")
            .expect("some trailers");
        let code = header(&trailers, "grpc-status").unwrap_or_default();
        let msg = header(&trailers, "grpc-message").unwrap_or_default();
        (code, msg)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the controller answers, not hangs")
}

#[tokio::test]
async fn foreign_and_malformed_requests_get_a_named_error() {
    use prost::Message;
    let mesh = Mesh::start().await;
    let node = mesh.node("a");
    // A type weft does not serve (an Envoy client asking for clusters).
    let cds = weft_proto::pb::xds::DeltaDiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..Default::default()
    };
    let (code, msg) = raw_xds(&mesh, &node.token, &cds.encode_to_vec()).await;
    assert_eq!(code, "3", "INVALID_ARGUMENT: {msg}");
    assert!(msg.contains("envoy.config.cluster.v3.Cluster"), "{msg}");
    // Bytes that are not a DeltaDiscoveryRequest.
    let (code, msg) = raw_xds(&mesh, &node.token, &[0xff; 8]).await;
    assert_eq!(code, "3", "INVALID_ARGUMENT, not OK: {msg}");
    assert!(msg.contains("malformed"), "{msg}");
}

type Raw = (
    tokio::sync::mpsc::Sender<weft_proto::pb::xds::DeltaDiscoveryRequest>,
    tonic::Streaming<weft_proto::pb::xds::DeltaDiscoveryResponse>,
);

/// A bare config stream for `node`, subscribed with `subscribe`, on its own
/// connection.
async fn raw_stream(
    mesh: &Mesh,
    node: &str,
    subscribe: weft_proto::pb::xds::DeltaDiscoveryRequest,
) -> Result<Raw, tonic::Status> {
    use weft_proto::pb::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let token = mesh.node(node).token;
    let config = weft_proto::tls::controller_client_config(
        weft_proto::tls::Trust::Static(mesh.roots()),
        mesh.controller.identity.clone(),
    );
    let channel = weft_proto::grpc::tls_channel(mesh.controller.grpc_addr, config);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(subscribe).await.expect("queued");
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().expect("header"),
    );
    let responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    Ok((tx, responses))
}

fn subscription(type_url: &str) -> weft_proto::pb::xds::DeltaDiscoveryRequest {
    weft_proto::pb::xds::DeltaDiscoveryRequest {
        type_url: type_url.into(),
        ..Default::default()
    }
}

/// A proxy resubscribing after a reconnect lists everything it holds: at
/// 50,000 workloads that request is ~2 MB, and must be read, not refused.
#[tokio::test]
async fn a_large_mesh_resubscription_is_read() {
    let mesh = Mesh::start().await;
    let mut subscribe = subscription(WORKLOAD);
    subscribe.initial_resource_versions = (0..50_000)
        .map(|i| (format!("ns{}/w{i}", i % 50), format!("{:016x}", i * 7919)))
        .collect();
    let first = async {
        let (tx, mut responses) = raw_stream(&mesh, "a", subscribe).await?;
        responses.message().await.map(|r| (r, tx))
    };
    let (resp, _tx) = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("answered")
        .expect("the resubscription is read, not refused");
    let resp = resp.expect("a response");
    assert_eq!(resp.type_url, WORKLOAD);
    // What the proxy holds and the mesh does not is removed, by name.
    assert_eq!(resp.removed_resources.len(), 50_000);
}

/// A mass reconnect costs a few first syncs in flight, not one per proxy:
/// with every slot held by proxies that never ACK, the next proxy waits,
/// and is served the moment one leaves.
#[tokio::test]
async fn first_syncs_take_turns() {
    let mesh = Mesh::start().await;
    mesh.controller.config.set(model(Y1));
    let mut holders = Vec::new();
    for i in 0..weft_controller::xds::FIRST_SYNCS_AT_ONCE {
        let (tx, mut responses) = raw_stream(&mesh, &format!("h{i}"), subscription(WORKLOAD))
            .await
            .expect("stream");
        tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .expect("a holder with a slot is served")
            .expect("response");
        holders.push((tx, responses));
    }
    let (_tx, mut late) = raw_stream(&mesh, "late", subscription(WORKLOAD))
        .await
        .expect("stream");
    // Bounded wait for an absence: 300 ms is ample for a loopback answer.
    let early = tokio::time::timeout(Duration::from_millis(300), late.message()).await;
    assert!(early.is_err(), "answered while every slot was held");
    drop(holders.pop()); // one holder's stream ends: its slot is free
    let resp = tokio::time::timeout(Duration::from_secs(10), late.message())
        .await
        .expect("served once a slot is free")
        .expect("response")
        .expect("a response");
    assert_eq!(resp.type_url, WORKLOAD);
}
