//! The certificate manager against the real CA going away and coming back.

use std::time::{Duration, SystemTime};

use weft_integration::Mesh;
use weft_proto::certs::CertConfig;
use weft_proto::tls::CertState;

#[tokio::test]
async fn old_certificate_is_served_until_expiry_while_the_ca_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = Mesh::start_in(dir.path().to_owned(), Duration::from_secs(3600)).await;
    let addr = mesh.controller.grpc_addr;
    let config = CertConfig {
        ttl: Duration::from_secs(4),
        min_backoff: Duration::from_millis(200),
        ..CertConfig::default()
    };
    let node = mesh.node_with("node-a", config);
    let web = node.workload("default", "web");
    let mut rx = node.cert(&web).await;
    let first = rx.borrow_and_update().cert().cloned().expect("cert");
    mesh.controller.shutdown().await;

    // Renewals fail from here on; the next change the watch shows must be
    // the switch to Unavailable, and only once the old certificate expired.
    let state = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| s.cert().is_none()))
        .await
        .expect("bounded")
        .expect("manager alive")
        .clone();
    assert!(
        SystemTime::now() >= first.not_after(),
        "old certificate dropped before it expired"
    );
    let CertState::Unavailable(reason) = state else {
        panic!("expected Unavailable")
    };
    assert!(reason.contains("CA unreachable"), "{reason}");

    // The CA comes back on the same address: the manager recovers by itself.
    let mut restarted = weft_controller::app::Config::local(dir.path().to_owned());
    restarted.grpc_addr = addr;
    let controller = weft_controller::app::build(restarted)
        .await
        .expect("restart");
    controller.nodes.place("node-a", web.clone());
    let back = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| s.cert().is_some()))
        .await
        .expect("recovers within the backoff")
        .expect("manager alive")
        .cert()
        .cloned()
        .expect("cert");
    assert_ne!(back.serial(), first.serial());
    controller.shutdown().await;
}
