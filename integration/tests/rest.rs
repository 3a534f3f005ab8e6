//! The controller's REST API, exercised with curl.

use std::time::Duration;

use weft_integration::{Mesh, curl};
use weft_proto::xds::{self, XdsConfig};

const ENDPOINTS: [&str; 13] = [
    "/api/v1/workloads",
    "/api/v1/services",
    "/api/v1/policies",
    "/api/v1/waypoints",
    "/api/v1/routes",
    "/api/v1/proxies",
    "/api/v1/certificates",
    "/api/v1/sources",
    "/api/v1/objects",
    "/api/v1/trust-bundle",
    "/api/v1/openapi.json",
    "/api/v1/objects/Pod/default/web",
    "/api/v1/workloads/default/web",
];

const POD: &str = "/api/v1/objects/Pod/default/web";
const GOOD: &str = "apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {nodeName: a, serviceAccountName: web, containers: [{name: web, image: web}]}
status: {podIP: 10.0.1.2}
";

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
        for (method, body) in [("GET", None), ("PUT", Some(GOOD)), ("DELETE", None)] {
            let body = body.map(|b| b.as_bytes().to_vec());
            for wrong in [None, Some("wrong")] {
                let (status, _) = curl(api, method, path, wrong, body.clone()).await;
                // Refused before anything else: a caller without the token
                // learns nothing, not even which methods a path has.
                assert_eq!(status, 401, "{method} {path} with {wrong:?}");
            }
        }
        let status = curl(api, "GET", path, Some(&token), None).await.0;
        // 404: the single-object paths name what does not exist yet.
        assert!(
            status == 200 || (status == 404 && path.ends_with("/web")),
            "{path} with the token: {status}"
        );
    }
    let (_, doc) = curl(api, "GET", "/api/v1/openapi.json", Some(&token), None).await;
    let doc: serde_json::Value = serde_json::from_str(&doc).expect("OpenAPI JSON");
    assert!(doc["paths"]["/api/v1/workloads"].is_object());
    assert!(doc["paths"]["/api/v1/objects/{kind}/{namespace}/{name}"]["put"].is_object());
    every_route_is_documented_and_served(api, &token, &doc).await;

    // Writes are validated first; a bad one changes nothing.
    let (status, body) = curl(api, "PUT", POD, Some(&token), Some(GOOD.into())).await;
    assert_eq!(status, 200, "{body}");
    assert!(dir.path().join("config/pod.default.web.yaml").exists());
    let clash = GOOD.replace("name: web,", "name: web2,");
    let bad = [
        (
            POD,
            GOOD.replace("labels:", "lables:"),
            422,
            "unknown field metadata.lables",
        ),
        (POD, "{{{{".to_owned(), 400, "not JSON or YAML"),
        (
            POD,
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}".to_owned(),
            422,
            "not a kind weft reads",
        ),
        (
            "/api/v1/objects/Pod/default/other",
            GOOD.to_owned(),
            400,
            "the path names Pod default/other",
        ),
        (
            "/api/v1/objects/Pod/default/web2",
            clash,
            422,
            "IP 10.0.1.2 is also default/web's",
        ),
        (
            "/api/v1/objects/Pod/default/web3",
            GOOD.replace("name: web,", "name: web3,")
                .replace("10.0.1.2", "10.0.1.300"),
            422,
            "\\\"10.0.1.300\\\" is not an IP",
        ),
    ];
    for (path, yaml, want_status, want) in bad {
        let (status, body) = curl(api, "PUT", path, Some(&token), Some(yaml.clone().into())).await;
        assert_eq!(status, want_status, "{yaml}: {body}");
        assert!(body.contains(want), "{yaml}: {body}");
    }
    // Names Kubernetes would refuse, refused the same way (422), never 500,
    // whatever the method. Percent-encoded so they reach the server as is.
    let long = "a".repeat(300);
    for (path, want) in [
        ("/api/v1/objects/Pod/default/%2e%2e", "name"),
        ("/api/v1/objects/Pod/default/%2e%2e%2f%2e%2e%2fevil", "name"),
        ("/api/v1/objects/Pod/default/a%00b", "name"),
        (&format!("/api/v1/objects/Pod/default/{long}"), "name"),
        ("/api/v1/objects/Pod/Default/web", "namespace"),
        ("/api/v1/objects/Namespace/-shop", "name"),
    ] {
        for method in ["GET", "PUT", "DELETE"] {
            let body = (method == "PUT").then(|| GOOD.as_bytes().to_vec());
            let (status, body) = curl(api, method, path, Some(&token), body).await;
            assert_eq!(status, 422, "{method} {path}: {body}");
            assert!(
                body.contains(&format!("not a valid Kubernetes {want}")),
                "{method} {path}: {body}"
            );
        }
    }
    let (status, _) = curl(
        api,
        "PUT",
        POD,
        Some(&token),
        Some(vec![b'#'; 2 * 1024 * 1024]),
    )
    .await;
    assert_eq!(status, 413);
    // Hostile YAML: an alias bomb and brackets nested 400,000 deep (which
    // the YAML parser alone would chew on for minutes) are refused at once.
    let mut bomb = GOOD.to_owned() + "x0: &x0 [a, a, a, a, a, a, a, a, a]\n";
    for i in 1..9 {
        let p = i - 1;
        bomb += &format!(
            "x{i}: &x{i} [*x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}]\n"
        );
    }
    let deep = format!("{GOOD}x: {}{}\n", "[".repeat(400_000), "]".repeat(400_000));
    for (what, body, want) in [
        ("alias bomb", bomb, "budget breached"),
        ("deep nesting", deep, "recursion limit exceeded"),
    ] {
        let (status, body) = curl(api, "PUT", POD, Some(&token), Some(body.into())).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert!(body.contains(want), "{what}: {body}");
    }
    assert!(
        !dir.path().join("config/pod.default.web2.yaml").exists(),
        "a refused write leaves no file"
    );
    // A hand-written file's objects are edited by hand; deletes of what does not exist say so.
    std::fs::write(
        dir.path().join("config/hand.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {weft.dev/mesh: enabled}}\n",
    )
    .expect("write");
    // The directory is polled: wait (bounded) until the file is seen.
    let sources = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (_, s) = curl(api, "GET", "/api/v1/sources", Some(&token), None).await;
            if s.contains("hand.yaml") {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the hand-written file is picked up within 10 s");
    let sources: serde_json::Value = serde_json::from_str(&sources).expect("JSON");
    assert_eq!(sources["source"], "local");
    let ns = "/api/v1/objects/Namespace/default";
    let (status, body) = curl(api, "DELETE", ns, Some(&token), None).await;
    assert_eq!((status, body.contains("hand.yaml")), (409, true), "{body}");
    let (status, body) = curl(api, "GET", POD, Some(&token), None).await;
    assert_eq!(status, 200, "{body}");
    let pod: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(pod["status"]["podIP"], "10.0.1.2", "{pod}");
    let (status, body) = curl(
        api,
        "GET",
        "/api/v1/workloads/default/web",
        Some(&token),
        None,
    )
    .await;
    assert!(
        status == 200 && body.contains("spiffe://cluster.local/ns/default/sa/web"),
        "{body}"
    );
    let (status, _) = curl(
        api,
        "GET",
        "/api/v1/workloads/default/nope",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = curl(
        api,
        "DELETE",
        "/api/v1/objects/Pod/default/nope",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 404);
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
    assert_eq!(
        listed["items"][0]["meshed"], true,
        "the namespace joined: {listed}"
    );

    // A proxy on the config stream shows up with its ACKed version.
    let node_token = mesh.node("a").token;
    let (mut rx, _) = xds::spawn(XdsConfig {
        controller: mesh.controller.grpc_addr,
        roots: mesh.roots().into(),
        controller_identity: mesh.controller.identity.clone(),
        credential: node_token.as_str().into(),
        node: "a".into(),
        trust_domain: "cluster.local".into(),
        types: &weft_proto::resources::ZTUNNEL_TYPES,
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
    let target =
        weft_cli::commands::Target::local(format!("http://{api}"), dir.path().join("api-token"));
    let table = weft_cli::commands::workloads(
        &target,
        &Default::default(),
        weft_cli::commands::Output::Table,
    )
    .await
    .expect("workloads");
    assert!(table.starts_with("NAMESPACE  NAME"), "{table}");
    assert!(
        table.contains("spiffe://cluster.local/ns/default/sa/web"),
        "{table}"
    );
    let status = weft_cli::commands::proxy_status(&target, weft_cli::commands::Output::Table)
        .await
        .expect("proxy-status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with('a') && l.contains("yes") && l.contains("SYNCED")),
        "{status}"
    );
    let summary = weft_cli::commands::status(&target).await.expect("status");
    assert!(
        summary.contains("1 connected, 1 on the current config"),
        "{summary}"
    );
    // kubectl weft join/leave edit the Namespace's label through the API.
    use weft_cli::commands::set_membership;
    let pod_in_shop = GOOD
        .replace("namespace: default", "namespace: shop")
        .replace("10.0.1.2", "10.0.9.2");
    let (status, body) = curl(
        api,
        "PUT",
        "/api/v1/objects/Pod/shop/web",
        Some(&token),
        Some(pod_in_shop.into()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let meshed = |m: &weft_proto::model::Model| m.workload("shop", "web").is_some_and(|w| w.meshed);
    assert!(!meshed(&mesh.controller.config.current().model));
    let said = set_membership(&target, "shop", true).await.expect("join");
    assert!(said.contains("shop joined the mesh"), "{said}");
    assert!(
        meshed(&mesh.controller.config.current().model),
        "applied at once"
    );
    let said = set_membership(&target, "shop", true)
        .await
        .expect("join again");
    assert!(said.contains("already in"), "{said}");
    let said = set_membership(&target, "shop", false).await.expect("leave");
    assert!(said.contains("shop left the mesh"), "{said}");
    assert!(!meshed(&mesh.controller.config.current().model));
    let err = set_membership(&target, "default", false)
        .await
        .expect_err("default is in a hand-written file");
    assert!(err.to_string().contains("hand.yaml"), "{err}");
    let (status, _) = curl(
        api,
        "DELETE",
        "/api/v1/objects/Pod/shop/web",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let yaml = weft_cli::commands::workloads(
        &target,
        &Default::default(),
        weft_cli::commands::Output::Yaml,
    )
    .await
    .expect("workloads -o yaml");
    assert!(
        yaml.contains("identity: spiffe://cluster.local/ns/default/sa/web"),
        "{yaml}"
    );
    let certs = weft_cli::commands::certs(
        &target,
        &Default::default(),
        weft_cli::commands::Output::Table,
    )
    .await
    .expect("certs");
    assert!(
        certs.starts_with("IDENTITY")
            && certs.contains("spiffe://cluster.local/ns/weft-system/sa/"),
        "{certs}"
    );
    let wrong_file = dir.path().join("wrong-token");
    std::fs::write(&wrong_file, "0123456789abcdef").expect("write");
    let wrong = weft_cli::commands::Target {
        token_file: wrong_file,
        ..target.clone()
    };
    let err = weft_cli::commands::workloads(
        &wrong,
        &Default::default(),
        weft_cli::commands::Output::Json,
    )
    .await
    .expect_err("wrong token");
    assert!(err.to_string().contains("refused the token"), "{err}");
    let not_a_token = weft_cli::commands::Target {
        token_file: dir.path().join("config/pod.default.web.yaml"),
        ..target.clone()
    };
    let err = weft_cli::commands::workloads(
        &not_a_token,
        &Default::default(),
        weft_cli::commands::Output::Json,
    )
    .await
    .expect_err("not a token");
    assert!(err.to_string().contains("does not hold a token"), "{err}");

    // Nothing accepted is lost on restart.
    mesh.controller.shutdown().await;
    let mesh = Mesh::start_in(dir.path().to_owned(), Duration::from_secs(3600)).await;
    assert_eq!(mesh.controller.api_token, token, "same token after restart");
    let api = mesh.controller.rest_addr;
    let get = |path: &'static str| {
        let token = token.clone();
        async move { curl(api, "GET", path, Some(&token), None).await.1 }
    };
    let listed = get("/api/v1/workloads").await;
    assert!(listed.contains("sa/web"), "{listed}");
    // The controller's own certificate is listed with its serial; a delete applies.
    let certs = get("/api/v1/certificates").await;
    assert!(
        certs.contains("spiffe://cluster.local/ns/weft-system") && certs.contains("\"serial\""),
        "{certs}"
    );
    let (status, _) = curl(api, "DELETE", POD, Some(&token), None).await;
    assert_eq!(status, 200);
    let listed = get("/api/v1/workloads").await;
    assert!(!listed.contains("sa/web"), "{listed}");
}

/// The document is derived from the routes; check it both ways: every
/// endpoint a client uses is in it, and every path and method in it is
/// served (answered by its handler, not the router's fallback or a 405).
async fn every_route_is_documented_and_served(
    api: std::net::SocketAddr,
    token: &str,
    doc: &serde_json::Value,
) {
    let paths = doc["paths"].as_object().expect("paths");
    let matches = |template: &str, path: &str| {
        let (t, p): (Vec<_>, Vec<_>) = (template.split('/').collect(), path.split('/').collect());
        t.len() == p.len() && t.iter().zip(&p).all(|(t, p)| t.starts_with('{') || t == p)
    };
    for path in ENDPOINTS.iter().chain(&["/healthz"]) {
        assert!(
            paths.keys().any(|t| matches(t, path)),
            "{path} is served but not in the OpenAPI document"
        );
    }
    for (template, methods) in paths {
        let path = template
            .replace("{what}", "workloads")
            .replace("{kind}", "Pod")
            .replace("{namespace}", "default")
            .replace("{name}", "nobody");
        for method in methods.as_object().expect("methods").keys() {
            let body = (method == "put").then(|| b"not: [yaml".to_vec());
            let (status, text) = curl(api, &method.to_uppercase(), &path, Some(token), body).await;
            assert!(
                status != 405 && !text.contains("no such endpoint"),
                "{method} {template} is documented but not served: {status} {text}"
            );
        }
    }
}
