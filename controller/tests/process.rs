//! The `weft-controller` binary as an operator runs it: flags, log output
//! to a pipe, and the metrics it exposes.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_weft-controller");

/// Kills the child on drop, so a failed assertion leaves no process behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the controller to completion (bounded) and returns (success, stderr).
fn run_to_end(args: &[&str]) -> (bool, String) {
    let mut child = Running(
        Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn weft-controller"),
    );
    let mut stderr = child.0.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "weft-controller {args:?} did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.success(), reader.join().expect("reader"))
}

#[test]
fn kubeconfig_and_context_flags() {
    let (ok, err) = run_to_end(&["--context", "prod"]);
    assert!(!ok);
    assert!(err.contains("--kubernetes"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (ok, err) = run_to_end(&[
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--kubernetes",
        "--kubeconfig",
        "/nonexistent/weft-kubeconfig",
        "--context",
        "prod",
        "--grpc-addr",
        "127.0.0.1:0",
        "--rest-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    assert!(!ok, "a kubeconfig that is not there stops the controller");
    assert!(err.contains("/nonexistent/weft-kubeconfig"), "{err}");
    assert!(!err.contains('\x1b'), "no colour into a pipe: {err:?}");
}

/// A running controller on loopback, its data dir, and its "controller
/// ready" log line (the addresses it bound), waited for (bounded); every
/// log line is checked for colour codes on the way.
async fn spawn_controller(extra: &[&str]) -> (Running, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let web = "spiffe://cluster.local/ns/default/sa/web";
    let mut child = Running(
        Command::new(BIN)
            .args(["--data-dir", data.to_str().expect("utf-8")])
            .args(["--grpc-addr", "127.0.0.1:0", "--rest-addr", "127.0.0.1:0"])
            .args(["--metrics-addr", "127.0.0.1:0", "--node", "a"])
            .args(["--place", &format!("a={web}")])
            .args(extra)
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn weft-controller"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    // Drained to the end: a closed pipe would fail the controller's writes.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if std::env::var_os("WEFT_TEST_LOG").is_some() {
                eprintln!("controller: {line}");
            }
            let _ = tx.send(line);
        }
    });
    // Nodes are registered after the controller is ready: wait for both.
    let mut seen: Vec<String> = Vec::new();
    while !seen.iter().any(|l| l.contains("node registered")) {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no \"node registered\" line: {seen:#?}"));
        assert!(
            !line.contains('\x1b'),
            "colour code in a piped log: {line:?}"
        );
        seen.push(line);
    }
    let ready = seen
        .iter()
        .find(|l| l.contains("controller ready"))
        .expect("ready line")
        .clone();
    (child, dir, ready)
}

/// One plain HTTP/1.1 GET, blocking and bounded; the whole response.
fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// An address from the ready line, by field name.
fn field(ready: &str, name: &str) -> std::net::SocketAddr {
    let at = ready.find(&format!("{name}=")).expect("field") + name.len() + 1;
    ready[at..]
        .split_whitespace()
        .next()
        .expect("value")
        .parse()
        .expect("addr")
}

/// Logs into a pipe carry no colour codes; a certificate issued over gRPC
/// is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_logs_and_one_count_per_certificate() {
    let (_child, dir, ready) = spawn_controller(&[]).await;
    let data = dir.path().join("data");
    let (grpc, metrics) = (field(&ready, "grpc"), field(&ready, "metrics"));

    let roots = std::fs::read_to_string(data.join("ca/root-cert.pem")).expect("root");
    let roots = Arc::new(weft_proto::tls::TrustBundle::from_pem(&roots).expect("root"));
    let token = std::fs::read_to_string(data.join("nodes/a.token")).expect("token");
    let controller = weft_proto::identity::controller("cluster.local").expect("id");
    let ca = weft_proto::certs::GrpcCaClient::new(grpc, roots, controller, token.as_str());
    let id: weft_proto::Identity = "spiffe://cluster.local/ns/default/sa/web"
        .parse()
        .expect("id");
    let (csr, _) = weft_proto::certs::make_csr(&id).expect("csr");
    use weft_proto::certs::CaClient;
    ca.sign(csr, &id, Duration::from_secs(3600))
        .await
        .expect("issued");

    let scrape = tokio::task::spawn_blocking(move || get(metrics, "/metrics"))
        .await
        .expect("scrape");
    let issued = scrape
        .lines()
        .find(|l| l.starts_with("weft_controller_certificates_issued_total "))
        .unwrap_or_else(|| panic!("no issued counter in:\n{scrape}"));
    // The controller's own serving certificate, and the one asked for.
    assert_eq!(
        issued, "weft_controller_certificates_issued_total 2",
        "{scrape}"
    );
}

/// `--pq-only`: a peer offering only X25519 is refused; one offering the
/// hybrid is met.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pq_only_refuses_classical_key_exchange() {
    use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
    let (_child, dir, ready) = spawn_controller(&["--pq-only"]).await;
    let grpc = field(&ready, "grpc");
    let root = std::fs::read_to_string(dir.path().join("data/ca/root-cert.pem")).expect("root");
    let mut roots = rustls::RootCertStore::empty();
    for r in weft_proto::tls::certs_from_pem(&root).expect("root") {
        roots.add(r).expect("root");
    }
    let dial = |group: &'static dyn rustls::crypto::SupportedKxGroup| {
        let provider = rustls::crypto::CryptoProvider {
            kx_groups: vec![group],
            ..default_provider()
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        async move {
            let tcp = tokio::net::TcpStream::connect(grpc).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map(drop)
        }
    };
    assert!(
        dial(kx_group::X25519).await.is_err(),
        "X25519 alone is refused"
    );
    dial(kx_group::X25519MLKEM768)
        .await
        .expect("the hybrid is met");
}

/// A log pipe that closes (a log shipper restarting) must not take the
/// controller down: lines are lost, requests are still served.
#[test]
fn a_closed_log_pipe_loses_lines_not_the_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut child = Running(
        Command::new(BIN)
            .args(["--data-dir", data.to_str().expect("utf-8")])
            .args(["--grpc-addr", "127.0.0.1:0", "--rest-addr", "127.0.0.1:0"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn weft-controller"),
    );
    let mut lines = BufReader::new(child.0.stderr.take().expect("stderr")).lines();
    let ready = loop {
        let line = lines.next().expect("a ready line").expect("utf-8");
        if line.contains("controller ready") {
            break line;
        }
    };
    drop(lines); // the reading end closes
    let rest = field(&ready, "rest");
    for _ in 0..3 {
        // Each refused request writes a log line into the closed pipe.
        let out = get(rest, "/api/v1/workloads");
        assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    }
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "the controller exited"
    );
}
