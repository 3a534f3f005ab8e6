//! Every /metrics endpoint in Prometheus' own words: the controller's and a
//! ztunnel's scraped after real work, run through `promtool check metrics`
//! (Debian's `prometheus` package; CI installs it), and every weft series
//! declared with its help text.

use std::time::Duration;

use weft_cli::demo::mesh::{ZtunnelOptions, start_ztunnel};
use weft_integration::Mesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metrics_endpoint_parses_and_says_what_it_counts() {
    let mesh = Mesh::start().await;
    mesh.controller.config.set(
        weft_proto::model::Model::from_yaml(
            "workloads:\n  - {name: web, serviceAccount: web, node: a, addresses: [10.0.1.2]}\n",
            "cluster.local",
        )
        .expect("valid"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    // Config pushed over the stream: the controller's push metrics and the
    // ztunnel's certificate metrics both have series.
    let zt = start_ztunnel(
        &mesh.controller,
        "a",
        None,
        dir.path(),
        ZtunnelOptions::default(),
    )
    .await
    .expect("ztunnel");
    let web = weft_proto::Identity::new("cluster.local", "default", "web").expect("id");
    weft_proto::certs::wait_for_cert(zt.node.certs.watch(&web), &web, Duration::from_secs(10))
        .await
        .expect("certificate");
    for (who, addr) in [
        ("controller", mesh.controller.metrics_addr),
        ("ztunnel", zt.metrics_addr),
    ] {
        let (status, text) = weft_integration::curl(addr, "GET", "/metrics", None, None).await;
        assert_eq!(status, 200, "{who}: {text}");
        assert!(text.contains("weft_"), "{who}: no weft series:\n{text}");
        // The per-instance counts are derived into the registry at scrape
        // time: a scrape that forgot to derive them would lose the series.
        let derived = [
            "weft_inbound_connections_total{transport=\"hbone\"}",
            "weft_inbound_denied_total",
            "weft_outbound_connections_total{transport=\"passthrough\"}",
            "weft_hbone_connections_accepted_total",
            "weft_hbone_active_connections",
            "weft_hbone_connections_opened_total",
            "weft_socks5_connections_total{outcome=\"connected\"}",
        ];
        for series in derived.iter().filter(|_| who == "ztunnel") {
            assert!(text.contains(series), "{who}: {series} missing:\n{text}");
        }
        for line in text.lines().filter(|l| l.starts_with("# TYPE weft_")) {
            let name = line.split_whitespace().nth(2).expect("name");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{who}: {name} has no help text"
            );
        }
        if let Err(e) = weft_integration::promtool_check(&text) {
            panic!("{who}: promtool check metrics:\n{e}");
        }
    }
    zt.shutdown().await;
}
