//! The controller's REST API, exercised with curl.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use weft_integration::Mesh;
use weft_proto::xds::{self, XdsConfig};

const ENDPOINTS: [&str; 7] = [
    "/api/v1/workloads",
    "/api/v1/services",
    "/api/v1/policies",
    "/api/v1/proxies",
    "/api/v1/trust-bundle",
    "/api/v1/config",
    "/api/v1/openapi.json",
];

/// (status, body)
async fn curl(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, String) {
    let mut args = vec![
        "-s".to_owned(),
        "--max-time".into(),
        "5".into(),
        "-X".into(),
        method.into(),
    ];
    if let Some(t) = token {
        args.extend(["-H".into(), format!("Authorization: Bearer {t}")]);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    if let Some(b) = body {
        let f = dir.path().join("body");
        std::fs::write(&f, b).expect("body");
        args.extend([
            "-H".into(),
            "content-type: application/yaml".into(),
            "--data-binary".into(),
            format!("@{}", f.display()),
        ]);
    }
    args.extend([
        "-w".into(),
        "\n%{http_code}".into(),
        format!("http://{addr}{path}"),
    ]);
    let out = tokio::task::spawn_blocking(move || Command::new("curl").args(&args).output())
        .await
        .expect("curl thread")
        .expect("curl (install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

const GOOD: &str =
    "workloads:\n  - {name: web, serviceAccount: web, node: a, addresses: [10.0.1.2]}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_reads_validated_writes_and_persistence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = Mesh::start_in(dir.path().to_owned(), Duration::from_secs(3600)).await;
    let (api, token) = (mesh.controller.rest_addr, mesh.controller.api_token.clone());
    let key = std::fs::metadata(dir.path().join("api-token")).expect("token file");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );

    assert_eq!(curl(api, "GET", "/healthz", None, None).await.0, 200);
    for path in ENDPOINTS {
        assert_eq!(
            curl(api, "GET", path, None, None).await.0,
            401,
            "{path} without a token"
        );
        assert_eq!(
            curl(api, "GET", path, Some("wrong"), None).await.0,
            401,
            "{path} with a wrong token"
        );
        assert_eq!(
            curl(api, "GET", path, Some(&token), None).await.0,
            200,
            "{path} with the token"
        );
    }
    assert_eq!(
        curl(api, "PUT", "/api/v1/config", None, Some(GOOD.into()))
            .await
            .0,
        401
    );
    let (_, doc) = curl(api, "GET", "/api/v1/openapi.json", Some(&token), None).await;
    let doc: serde_json::Value = serde_json::from_str(&doc).expect("OpenAPI JSON");
    assert!(doc["paths"]["/api/v1/workloads"].is_object());

    // Writes are validated first; a bad one changes nothing.
    let (status, body) = curl(
        api,
        "PUT",
        "/api/v1/config",
        Some(&token),
        Some(GOOD.into()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let bad = [
        (
            "workloads: [{name: w, node: a, addresses: []}]",
            "workloads[0] (default/w): addresses",
        ),
        (
            "workloads: [{name: w, node: a, addresses: [1.2.3.4], color: red}]",
            "unknown field",
        ),
        ("{{{{", "not valid YAML"),
    ];
    for (yaml, want) in bad {
        let (status, body) = curl(
            api,
            "PUT",
            "/api/v1/config",
            Some(&token),
            Some(yaml.into()),
        )
        .await;
        assert_eq!(status, 422, "{yaml}: {body}");
        assert!(body.contains(want), "{yaml}: {body}");
    }
    let (status, _) = curl(
        api,
        "PUT",
        "/api/v1/config",
        Some(&token),
        Some(vec![b'#'; 2 * 1024 * 1024]),
    )
    .await;
    assert_eq!(status, 413);
    let (_, listed) = curl(api, "GET", "/api/v1/workloads", Some(&token), None).await;
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("JSON");
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    assert_eq!(
        listed["items"][0]["identity"],
        "spiffe://cluster.local/ns/default/sa/web"
    );

    // A proxy on the config stream shows up with its ACKed version.
    let node_token = mesh.node("a").token;
    let (mut rx, _) = xds::spawn(XdsConfig {
        controller: mesh.controller.grpc_addr,
        roots: mesh.roots(),
        controller_identity: mesh.controller.identity.clone(),
        token: node_token,
        node: "a".into(),
        trust_domain: "cluster.local".into(),
    });
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|m| m.is_some()))
        .await
        .expect("config")
        .expect("client");
    weft_integration::eventually("proxy listed as connected with an ACKed version", || {
        mesh.controller
            .proxies
            .get("a")
            .is_some_and(|s| s.connected && !s.acked.is_empty())
    })
    .await;
    let (_, proxies) = curl(api, "GET", "/api/v1/proxies", Some(&token), None).await;
    let proxies: serde_json::Value = serde_json::from_str(&proxies).expect("JSON");
    assert_eq!(proxies["items"][0]["node"], "a");
    assert_eq!(proxies["items"][0]["connected"], true);
    assert!(
        proxies["items"][0]["ackedVersions"]
            .as_object()
            .is_some_and(|m| !m.is_empty())
    );

    // kubectl weft, reading the same API.
    let target = weft_controller::cli::Target {
        controller: format!("http://{api}"),
        token_file: dir.path().join("api-token"),
    };
    let table = weft_controller::cli::workloads(&target, weft_controller::cli::Output::Table)
        .await
        .expect("workloads");
    assert!(table.starts_with("NAMESPACE  NAME"), "{table}");
    assert!(
        table.contains("spiffe://cluster.local/ns/default/sa/web"),
        "{table}"
    );
    let status = weft_controller::cli::proxy_status(&target, weft_controller::cli::Output::Table)
        .await
        .expect("proxy-status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with('a') && l.contains("yes") && l.contains("SYNCED")),
        "{status}"
    );
    let summary = weft_controller::cli::status(&target).await.expect("status");
    assert!(
        summary.contains("1 connected, 1 on the current config"),
        "{summary}"
    );
    let wrong_file = dir.path().join("wrong-token");
    std::fs::write(&wrong_file, "0123456789abcdef").expect("write");
    let wrong = weft_controller::cli::Target {
        token_file: wrong_file,
        ..target.clone()
    };
    let err = weft_controller::cli::workloads(&wrong, weft_controller::cli::Output::Json)
        .await
        .expect_err("wrong token");
    assert!(err.to_string().contains("refused the token"), "{err}");
    let not_a_token = weft_controller::cli::Target {
        token_file: dir.path().join("config.yaml"),
        ..target.clone()
    };
    let err = weft_controller::cli::workloads(&not_a_token, weft_controller::cli::Output::Json)
        .await
        .expect_err("not a token");
    assert!(err.to_string().contains("does not hold a token"), "{err}");

    // Nothing accepted is lost on restart.
    mesh.controller.shutdown().await;
    let mesh = Mesh::start_in(dir.path().to_owned(), Duration::from_secs(3600)).await;
    assert_eq!(mesh.controller.api_token, token, "same token after restart");
    let (_, listed) = curl(
        mesh.controller.rest_addr,
        "GET",
        "/api/v1/workloads",
        Some(&token),
        None,
    )
    .await;
    assert!(listed.contains("sa/web"), "{listed}");
}
