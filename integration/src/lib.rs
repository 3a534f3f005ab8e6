//! Test harness: real parts on loopback with real certificates.
//!
//! ```ignore
//! let mesh = Mesh::start().await;
//! let node = mesh.node("node-a");
//! let web = node.workload("default", "web");
//! let cert = node.cert(&web).await;          // issued over gRPC by the CA
//! let server = HboneServer::echo(cert).await; // HBONE on 127.0.0.1:port
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weft_controller::app::{self, Bound, Config};
use weft_proto::certs::{CertConfig, CertManager, GrpcCaClient, wait_for_cert};
use weft_proto::hbone::H2Settings;
use weft_proto::hbone::server::{self, Handler, InboundConnect, ServerStats};
use weft_proto::identity::Identity;
use weft_proto::tls::{CertWatch, TrustBundle};

pub const TRUST_DOMAIN: &str = "cluster.local";

/// A controller (CA) on a fresh data directory, on 127.0.0.1.
pub struct Mesh {
    pub controller: Bound,
    pub data_dir: PathBuf,
    _dir: Option<TempDir>,
}

impl Mesh {
    pub async fn start() -> Mesh {
        Mesh::start_tuned(|_| {}).await
    }

    /// A controller in a temporary directory, its config adjusted by `tune`.
    pub async fn start_tuned(tune: impl FnOnce(&mut Config)) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut mesh = Mesh::start_with(dir.path().to_owned(), |c| {
            c.max_cert_ttl = Duration::from_secs(24 * 3600);
            tune(c)
        })
        .await;
        mesh._dir = Some(dir);
        mesh
    }

    /// Starts (or restarts) a controller on `data_dir`, which the caller owns.
    pub async fn start_in(data_dir: PathBuf, max_cert_ttl: Duration) -> Mesh {
        Mesh::start_with(data_dir, |c| c.max_cert_ttl = max_cert_ttl).await
    }

    async fn start_with(data_dir: PathBuf, tune: impl FnOnce(&mut Config)) -> Mesh {
        let mut config = Config {
            grpc_addr: "127.0.0.1:0".parse().expect("addr"),
            ..Config::local(data_dir.clone())
        };
        tune(&mut config);
        let controller = app::build(config).await.expect("controller starts");
        Mesh {
            controller,
            data_dir,
            _dir: None,
        }
    }

    /// The local source's directory of Kubernetes-shaped YAML.
    pub fn config_dir(&self) -> PathBuf {
        self.data_dir.join("config")
    }

    /// Waits (10 s at most) until the controller serves waypoint `key`
    /// with a ready instance; says what the source reported otherwise.
    pub async fn waypoint_served(&self, key: &str) -> anyhow::Result<()> {
        let ctl = &self.controller;
        let served = async {
            let mut rx = ctl.sources.clone();
            let has = || {
                let m = ctl.config.current().model.clone();
                m.waypoint(key).is_some_and(|w| !w.addresses.is_empty())
            };
            while !has() {
                let _ = rx.changed().await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .is_err()
        {
            let status = ctl.sources.borrow().clone();
            anyhow::bail!(
                "waypoint {key} not served: {:?} {:?}",
                status.files,
                status.problems
            );
        }
        Ok(())
    }

    /// Stops the controller (its config streams end, its ports close); the
    /// proxies are left to carry on alone.
    pub async fn stop(self) -> Stopped {
        let Mesh {
            controller,
            data_dir,
            _dir,
        } = self;
        let addrs = (controller.grpc_addr, controller.rest_addr);
        controller.shutdown().await;
        Stopped {
            addrs,
            data_dir,
            _dir,
        }
    }
}

/// A mesh whose controller is down.
pub struct Stopped {
    addrs: (SocketAddr, SocketAddr),
    data_dir: PathBuf,
    _dir: Option<TempDir>,
}

impl Stopped {
    /// Starts the controller again on the same data directory and ports, so
    /// proxies find it where it was.
    pub async fn start(self) -> Mesh {
        let controller = app::build(Config {
            grpc_addr: self.addrs.0,
            rest_addr: self.addrs.1,
            ..Config::local(self.data_dir.clone())
        })
        .await
        .expect("controller restarts on its old ports");
        Mesh {
            controller,
            data_dir: self.data_dir,
            _dir: self._dir,
        }
    }
}

impl Mesh {
    /// A ztunnel for `node` with `yaml` as its static config (written under
    /// `dir`), every port on 127.0.0.1:0. The controller is told which of
    /// the config's workloads run on `node`, as the config push will (#4).
    pub async fn ztunnel(
        &self,
        node: &str,
        yaml: &str,
        dir: &std::path::Path,
        options: weft_cli::demo::mesh::ZtunnelOptions,
    ) -> weft_ztunnel::app::Bound {
        let model = weft_proto::model::Model::from_yaml(yaml, TRUST_DOMAIN).expect("valid config");
        for w in model.workloads.iter().filter(|w| w.node == node) {
            self.controller.nodes.place(node, w.identity.clone());
        }
        std::fs::create_dir_all(dir).expect("dir");
        let config = dir.join(format!("{node}.yaml"));
        std::fs::write(&config, yaml).expect("config");
        weft_cli::demo::mesh::start_ztunnel(&self.controller, node, Some(&config), dir, options)
            .await
            .expect("ztunnel starts")
    }

    /// A ztunnel for `node` that takes its config from this controller's push.
    pub async fn ztunnel_pushed(
        &self,
        node: &str,
        dir: &std::path::Path,
        options: weft_cli::demo::mesh::ZtunnelOptions,
    ) -> weft_ztunnel::app::Bound {
        std::fs::create_dir_all(dir).expect("dir");
        weft_cli::demo::mesh::start_ztunnel(&self.controller, node, None, dir, options)
            .await
            .expect("ztunnel starts")
    }

    pub fn roots(&self) -> Arc<TrustBundle> {
        Arc::new(TrustBundle::from_pem(&self.controller.root_pem).expect("root parses"))
    }

    /// A simulated node with its own token and certificate manager, talking
    /// to the CA over gRPC as a ztunnel would.
    pub fn node(&self, name: &str) -> Node {
        self.node_with(name, CertConfig::default())
    }

    pub fn node_with(&self, name: &str, config: CertConfig) -> Node {
        let token_path = self.controller.nodes.ensure(name).expect("node token");
        let token = std::fs::read_to_string(&token_path).expect("token readable");
        let ca = GrpcCaClient::new(
            self.controller.grpc_addr,
            self.roots(),
            self.controller.identity.clone(),
            token.as_str(),
        );
        Node {
            name: name.to_owned(),
            token,
            certs: CertManager::new(Arc::new(ca), config),
            nodes: self.controller.nodes.clone(),
        }
    }
}

pub struct Node {
    pub name: String,
    pub token: String,
    pub certs: CertManager,
    nodes: Arc<weft_controller::nodes::Nodes>,
}

impl Node {
    /// Places a workload running as `ns/sa` on this node; returns its identity.
    pub fn workload(&self, ns: &str, sa: &str) -> Identity {
        let id = Identity::new(TRUST_DOMAIN, ns, sa).expect("valid identity");
        self.nodes.place(&self.name, id.clone());
        id
    }

    /// The workload's certificate watch, once the first certificate is in.
    pub async fn cert(&self, id: &Identity) -> CertWatch {
        let rx = self.certs.watch(id);
        wait_for_cert(rx.clone(), id, Duration::from_secs(10))
            .await
            .expect("certificate issued");
        rx
    }
}

/// The usual test pair: `default/web` and `default/api` on one node, with
/// api serving HBONE (echo) on 127.0.0.1.
pub struct Pair {
    pub mesh: Mesh,
    pub node: Node,
    pub web: Identity,
    pub api: Identity,
    pub server: HboneServer<Echo>,
}

impl Pair {
    pub async fn start() -> Pair {
        let mesh = Mesh::start().await;
        let node = mesh.node("node-a");
        let (web, api) = (
            node.workload("default", "web"),
            node.workload("default", "api"),
        );
        let server = HboneServer::echo(node.cert(&api).await).await;
        Pair {
            mesh,
            node,
            web,
            api,
            server,
        }
    }

    /// The pool key for web → api's server, and web's certificate.
    pub async fn web_to_api(&self) -> (weft_proto::hbone::pool::PoolKey, CertWatch) {
        let key = weft_proto::hbone::pool::PoolKey {
            src: self.web.clone(),
            dst: self.api.clone(),
            dst_addr: self.server.addr,
            src_ip: None,
        };
        (key, self.node.cert(&self.web).await)
    }
}

/// What an HBONE test server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub peer: Identity,
    pub peer_serial: String,
    pub peer_addr: SocketAddr,
    pub authority: SocketAddr,
    pub headers: http::HeaderMap,
}

/// Accepts every stream, writes `"<peer identity>\n"`, then echoes.
#[derive(Default)]
pub struct Echo {
    pub seen: Mutex<Vec<Seen>>,
}

impl Handler for Echo {
    async fn handle(&self, c: InboundConnect) {
        self.seen.lock().expect("poisoned").push(Seen {
            peer: c.peer.clone(),
            peer_serial: c.peer_serial.to_string(),
            peer_addr: c.peer_addr,
            authority: c.authority,
            headers: c.headers.clone(),
        });
        let Ok(mut stream) = c.accept() else { return };
        let hello = format!(
            "{}\n",
            stream
                .peer_identity()
                .map(|p| p.to_string())
                .unwrap_or_default()
        );
        if stream.write_all(hello.as_bytes()).await.is_err() {
            return;
        }
        let (mut r, mut w) = tokio::io::split(stream);
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    }
}

/// An HBONE listener on 127.0.0.1 serving one identity.
pub struct HboneServer<H> {
    pub addr: SocketAddr,
    pub stats: Arc<ServerStats>,
    pub handler: Arc<H>,
    shutdown: CancellationToken,
}

impl HboneServer<Echo> {
    pub async fn echo(cert: CertWatch) -> Self {
        HboneServer::start(cert, Echo::default(), H2Settings::default()).await
    }
}

impl<H: Handler> HboneServer<H> {
    pub async fn start(cert: CertWatch, handler: H, settings: H2Settings) -> Self {
        Self::start_on(
            "127.0.0.1:0".parse().expect("addr"),
            cert,
            handler,
            settings,
        )
        .await
    }

    pub async fn start_on(
        addr: SocketAddr,
        cert: CertWatch,
        handler: H,
        settings: H2Settings,
    ) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stats = Arc::new(ServerStats::default());
        let handler = Arc::new(handler);
        let shutdown = CancellationToken::new();
        tokio::spawn(server::serve(
            listener,
            (cert, TRUST_DOMAIN.into()),
            handler.clone(),
            settings,
            stats.clone(),
            weft_proto::listen::Drain::stopped_by(shutdown.clone()),
        ));
        HboneServer {
            addr,
            stats,
            handler,
            shutdown,
        }
    }
}

impl<H> Drop for HboneServer<H> {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Reads the `"<identity>\n"` line the echo server sends first.
pub async fn read_hello<R: AsyncReadExt + Unpin>(r: &mut R) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while r.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).expect("utf-8 hello")
}

/// Waits (bounded) until `cond` holds, checking after each scheduler turn.
/// For counters that settle when a background task finishes.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
}
/// Network-namespace topologies (shared with `weft demo`).
pub use weft_cli::demo::topology as netns;

/// Enrolls `pod` (namespace `default`, uid = name) with a ztunnel, as the
/// CNI plugin would; panics with the ztunnel's reason on refusal.
pub async fn enroll(zt: &weft_ztunnel::app::Bound, pod: &netns::PodNs) {
    let line = format!(
        r#"{{"op":"add","uid":"{0}","namespace":"default","name":"{0}","netns":"{1}","ips":["{2}"]}}"#,
        pod.name,
        pod.path.display(),
        pod.ip
    );
    let reply = weft_ztunnel::enroll::request(&zt.enroll_socket, &line)
        .await
        .expect("enroll");
    assert!(reply.ok, "enrolling {}: {:?}", pod.name, reply.error);
}
pub mod controller_bench;
pub mod l7_bench;
pub mod l7_instructions;
pub mod mesh_bench;
pub mod otlp;
pub mod waypoint_bench;

/// This process's resident memory, in KiB (from /proc).
pub fn rss_kib() -> u64 {
    proc_status_kib("self", "VmRSS:")
}

/// User + system CPU seconds from the text of a `/proc/.../stat` file.
pub fn stat_cpu_seconds(stat: &str) -> f64 {
    // Fields after the ")" of the command name: utime is 14th, stime 15th.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// A KiB figure of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`); 0 if gone.
pub fn proc_status_kib(pid: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(key))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// The median (the mean of the middle two for an even count); NaN if empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// An HTTP request with curl, the way a user would send it: (status, body).
/// The body goes as `application/yaml`.
pub async fn curl(
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

/// `promtool check metrics` on `text`: `Err` with its complaint; `Ok`
/// also when promtool is not installed (said on stderr; CI installs it).
pub fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut promtool) = spawned else {
        eprintln!("skipped promtool: not installed (apt-get install prometheus; CI has it)");
        return Ok(());
    };
    let stdin = promtool.stdin.take();
    stdin
        .ok_or("no stdin")?
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = promtool.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
