//! The waypoint's L7 engine alone against nginx as a plain reverse proxy:
//! the same backend (nginx answering `ok`, one worker), the same client
//! (wrk, HTTP/1.1 keep-alive, 50 connections), plaintext in and out, on
//! loopback; direct, nginx and weft in alternating rounds. The engine
//! runs with routes applied (a header rule, a prefix rule with a header
//! filter, a default) on one thread, as nginx runs one worker.

#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use weft_proto::identity::Identity;
use weft_proto::model::{Model, route};
use weft_proto::pb::weft::v1 as pb;
use weft_proto::request_policy::compile;
use weft_waypoint::proxy::{Client, Limits, Proxy, Target};
use weft_waypoint::telemetry::Spans;
use weft_waypoint::upstream::Upstreams;

use crate::{median, proc_status_kib};

/// A process the bench started (nginx, or a proxy under valgrind);
/// stopped on drop.
pub(crate) struct Process(pub(crate) Child);

impl Drop for Process {
    /// SIGTERM, not SIGKILL: a killed nginx master leaves its worker
    /// behind, spinning on the closed channel and skewing the next run.
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let termed = Command::new("kill").args(["-TERM", &pid]).status();
        if !termed.is_ok_and(|s| s.success()) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// nginx with one worker and `server` as its only server block.
fn nginx(dir: &Path, name: &str, server: &str) -> anyhow::Result<Process> {
    nginx_under(&[], dir, name, server)
}

/// [`nginx`] run by the command `under` (e.g. valgrind), then as a single
/// process: the worker is the master, so `under` sees it.
pub(crate) fn nginx_under(
    under: &[&str],
    dir: &Path,
    name: &str,
    server: &str,
) -> anyhow::Result<Process> {
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(
        &conf,
        format!(
            "daemon off; worker_processes 1; {single}pid {pid}; error_log {dir}/{name}.err warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; {server} }}\n",
            single = if under.is_empty() {
                ""
            } else {
                "master_process off; "
            },
            pid = dir.join(format!("{name}.pid")).display(),
            dir = dir.display(),
        ),
    )?;
    let mut command = match under {
        [] => Command::new("nginx"),
        [program, args @ ..] => {
            let mut c = Command::new(program);
            c.args(args).arg("nginx");
            c
        }
    };
    let child = command
        .args([
            "-c",
            &conf.display().to_string(),
            "-p",
            &dir.display().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("nginx (apt-get install nginx)")?;
    Ok(Process(child))
}

/// The one backend every bench route sends to.
fn to_api() -> pb::RouteBackend {
    pb::RouteBackend {
        service: "default/api".into(),
        port: 80,
        weight: 1,
        ..Default::default()
    }
}

/// The engine's config: the backend as a Service with one endpoint, and a
/// route with three rules in front of it.
pub(crate) fn model(backend_port: u16) -> anyhow::Result<Model> {
    let yaml = format!(
        "workloads: [{{name: backend, serviceAccount: backend, node: n, addresses: [127.0.0.1], services: [default/api]}}]\n\
         services: [{{name: api, addresses: [10.255.0.1], ports: [{{port: 80, targetPort: {backend_port}}}]}}]\n"
    );
    let mut m = Model::from_yaml(&yaml, "cluster.local")?;
    let rule = |m: pb::RouteMatch, filters: Vec<pb::RouteFilter>| pb::RouteRule {
        matches: vec![m],
        filters,
        backends: vec![to_api()],
        ..Default::default()
    };
    let header = pb::RouteMatch {
        headers: vec![pb::NamedMatch {
            name: "x-canary".into(),
            value: Some(pb::StringMatch {
                kind: 0,
                value: "yes".into(),
            }),
        }],
        ..Default::default()
    };
    let prefix = pb::RouteMatch {
        path: Some(pb::StringMatch {
            kind: pb::string_match::Kind::Prefix as i32,
            value: "/admin".into(),
        }),
        ..Default::default()
    };
    let set = pb::RouteFilter {
        filter: Some(pb::route_filter::Filter::RequestHeaders(
            pb::HeaderModifier {
                set: vec![pb::NameValue {
                    name: "x-admin".into(),
                    value: "1".into(),
                }],
                ..Default::default()
            },
        )),
    };
    let spec = pb::Route {
        name: "bench".into(),
        namespace: "default".into(),
        kind: "HTTPRoute".into(),
        parents: vec![pb::ParentRef {
            service: "default/api".into(),
            port: 80,
        }],
        rules: vec![
            rule(header, vec![]),
            rule(prefix, vec![set]),
            rule(pb::RouteMatch::default(), vec![]),
        ],
        ..Default::default()
    };
    m.routes = vec![Arc::new(route(spec, "bench")?)];
    Ok(m)
}

/// [`model`] with the policy and route load of a busy waypoint in front of
/// the same backend: 49 more routes on the Service (exact paths with a
/// header match, so each is tried before the catch-all), 19 DENY policies
/// that never match and one ALLOW for the client: every request meets
/// every policy and most rules.
fn loaded_model(backend_port: u16) -> anyhow::Result<Model> {
    let mut m = model(backend_port)?;
    for i in 0..49 {
        let rule = pb::RouteRule {
            matches: vec![pb::RouteMatch {
                path: Some(pb::StringMatch {
                    kind: 0,
                    value: format!("/r{i}/items"),
                }),
                headers: vec![pb::NamedMatch {
                    name: format!("x-team-{i}"),
                    value: Some(pb::StringMatch {
                        kind: 0,
                        value: "on".into(),
                    }),
                }],
                ..Default::default()
            }],
            backends: vec![to_api()],
            ..Default::default()
        };
        let spec = pb::Route {
            name: format!("team-{i}"),
            namespace: "default".into(),
            kind: "HTTPRoute".into(),
            parents: m.routes[0].spec.parents.clone(),
            rules: vec![rule],
            ..Default::default()
        };
        m.routes.push(Arc::new(route(spec, &format!("team-{i}"))?));
    }
    let policy = |name: String, action: pb::Action, rule: pb::RequestRule| pb::RequestPolicy {
        name,
        namespace: "default".into(),
        action: action as i32,
        services: vec!["default/api".into()],
        rules: vec![rule],
        ..Default::default()
    };
    let mut policies: Vec<pb::RequestPolicy> = (0..19)
        .map(|i| {
            let rule = pb::RequestRule {
                methods: vec!["DELETE".into(), "PUT".into()],
                paths: vec![format!("/admin/{i}/*"), format!("*.secret{i}")],
                headers: vec![pb::NameValue {
                    name: "x-debug".into(),
                    value: format!("{i}"),
                }],
                ..Default::default()
            };
            policy(format!("deny-{i}"), pb::Action::Deny, rule)
        })
        .collect();
    let allow = pb::RequestRule {
        principals: vec!["spiffe://cluster.local/ns/default/sa/bench".into()],
        paths: vec!["/*".into()],
        ..Default::default()
    };
    policies.push(policy("allow-bench".into(), pb::Action::Allow, allow));
    for p in policies {
        let key = format!("default/{}", p.name);
        m.request_policies.push(Arc::new(compile(p, &key)?));
    }
    Ok(m)
}

/// How an engine traces: the share of requests sampled, and the
/// collector its spans go to (`None`: not exported).
pub(crate) type Tracing = (f64, Option<SocketAddr>);

/// Starts the engine on its own thread (one, as nginx's one worker):
/// plaintext connections on a loopback port, each request through the
/// phases, to the backend over plain TCP.
pub(crate) fn start_engine(
    model: Model,
    (sampling, collector): Tracing,
) -> anyhow::Result<SocketAddr> {
    let model = Arc::new(model);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("l7-engine".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let id = Identity::new("cluster.local", "default", "bench").expect("id");
                let (_tx, rx) = watch::channel(model);
                let upstreams = Arc::new(Upstreams::plain());
                upstreams.close_idle_connections();
                let mut proxy = Proxy::new(
                    "default/bench".into(),
                    id.clone(),
                    rx,
                    upstreams,
                    Limits::default(),
                );
                proxy.trace_sampling = sampling;
                proxy.spans = collector
                    .map(|c| Spans::export_to(&format!("http://{c}"), "default/bench"))
                    .transpose()
                    .expect("span exporter");
                let proxy = Arc::new(proxy);
                while let Ok((tcp, peer)) = listener.accept().await {
                    let _ = tcp.set_nodelay(true);
                    let target = Target::Service {
                        key: "default/api".into(),
                        port: 80,
                    };
                    let client = Arc::new(Client::new(id.clone(), peer, target));
                    tokio::spawn(proxy.clone().serve_http(tcp, client));
                }
            });
        })?;
    Ok(addr)
}

fn wrk(port: u16, seconds: u64) -> anyhow::Result<f64> {
    let text = wrk_output(port, seconds)?;
    text.lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("wrk Requests/sec in {text}"))
}

/// wrk's report of `seconds` of keep-alive load at 50 connections; an
/// error if any answer was not 2xx.
pub(crate) fn wrk_output(port: u16, seconds: u64) -> anyhow::Result<String> {
    let out = Command::new("wrk")
        .args([
            "-t1",
            "-c50",
            &format!("-d{seconds}s"),
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .context("wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(!text.contains("Non-2xx"), "errors in the run: {text}");
    Ok(text)
}

/// This process's CPU seconds (the engine is all it does meanwhile).
fn cpu_seconds() -> f64 {
    crate::stat_cpu_seconds(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default())
}

/// The `weft-waypoint` binary's resident memory once it serves: its own
/// process, certificate issued and config held (no traffic).
async fn binary_idle_rss() -> anyhow::Result<u64> {
    let mesh = crate::Mesh::start().await;
    let config = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {weft.dev/mesh: enabled}}\n---\n\
        apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: bench, namespace: default}\n\
        spec: {gatewayClassName: weft-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: bench-1, namespace: default, labels: {gateway.networking.k8s.io/gateway-name: bench}}\n\
        spec: {nodeName: node-1, serviceAccountName: bench, containers: [{name: w, image: w}]}\nstatus: {phase: Running, podIP: 10.99.9.9}\n";
    std::fs::write(mesh.config_dir().join("bench.yaml"), config)?;
    mesh.waypoint_served("default/bench").await?;
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root.pem");
    std::fs::write(&root, &mesh.controller.root_pem)?;
    let token = mesh.controller.nodes.ensure("waypoint.default.bench")?;
    let mut child = Command::new(crate::mesh_bench::sibling("weft-waypoint")?)
        .args([
            "--name",
            "bench",
            "-n",
            "default",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--ca-addr", &mesh.controller.grpc_addr.to_string()])
        .arg("--ca-root")
        .arg(&root)
        .arg("--token-file")
        .arg(&token)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let served = async {
        loop {
            let acked = mesh
                .controller
                .proxies
                .get("waypoint.default.bench")
                .is_some_and(|p| p.connected && !p.acked.is_empty());
            if acked {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let up = tokio::time::timeout(Duration::from_secs(15), served).await;
    // Settled: the certificate arrives with the first config.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = proc_status_kib(&child.id().to_string(), "VmRSS:");
    let _ = child.kill();
    let _ = child.wait();
    up.context("weft-waypoint did not connect to the controller")?;
    Ok(rss)
}

/// `h2load --h1` at a fixed `rate` (requests/s, over 10 connections) for
/// `seconds`: the rate it reached.
fn h2load_at(port: u16, rate: u32, seconds: u64) -> anyhow::Result<f64> {
    let out = Command::new("h2load")
        .args(["--h1", "-t1", "-c10", &format!("--rps={}", rate / 10)])
        .args([
            &format!("-D{seconds}"),
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .context("h2load (apt-get install nghttp2-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(text.contains(" 0 failed"), "errors in the run: {text}");
    text.lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| {
            l.split(", ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("h2load req/s in {text}"))
}

/// CPU seconds of process `pid` and its children (nginx: master and
/// worker).
fn tree_cpu_seconds(pid: u32) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut total = 0.0;
    for e in entries.flatten() {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1));
        let name = e.file_name().to_string_lossy().to_string();
        if name == pid.to_string() || ppid == Some(&pid.to_string()) {
            total += crate::stat_cpu_seconds(&stat);
        }
    }
    total
}

/// The load figures of one proxy at 1,000 requests/s: CPU ms per second
/// (per mille of a core; `cpu` reads its CPU seconds) and this process's
/// RSS at the end, in KiB.
fn at_1000_rps(port: u16, seconds: u64, cpu: &dyn Fn() -> f64) -> anyhow::Result<(f64, u64)> {
    let before = cpu();
    let rate = h2load_at(port, 1000, seconds)?;
    let cpu_ms_per_s = (cpu() - before) * 1000.0 / seconds as f64;
    anyhow::ensure!(
        rate > 900.0,
        "the engine fell behind 1,000 req/s: {rate:.0}"
    );
    Ok((cpu_ms_per_s, proc_status_kib("self", "VmRSS:")))
}

/// The backend nginx and the reverse proxy nginx, and their ports.
fn nginx_pair(dir: &Path) -> anyhow::Result<((u16, u16), [Process; 2])> {
    let (backend_port, nginx_port) = (free_port()?, free_port()?);
    let backend = nginx(dir, "backend", &backend_server(backend_port))?;
    let proxy = nginx(dir, "proxy", &proxy_server(backend_port, nginx_port))?;
    Ok(((backend_port, nginx_port), [backend, proxy]))
}

/// The backend's server block: `ok` to every request.
pub(crate) fn backend_server(port: u16) -> String {
    format!("server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }}")
}

/// nginx as a plain reverse proxy to the backend, upstream keep-alive.
pub(crate) fn proxy_server(backend_port: u16, port: u16) -> String {
    format!(
        "upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 64; }}\n\
         server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://backend; \
         proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
    )
}

/// One row of the throughput table: direct, nginx, weft, weft with 20
/// policies and 50 routes (req/s), and weft's CPU ms per 1,000 requests.
type Row = (f64, f64, f64, f64, f64);

pub async fn run(seconds: u64, rounds: usize) -> anyhow::Result<()> {
    let binary_rss = binary_idle_rss().await?;
    println!("weft-waypoint binary, idle (config held, certificate issued): RSS {binary_rss} KiB");
    let dir = tempfile::tempdir()?;
    let ((backend_port, nginx_port), [_backend, nginx_proxy]) = nginx_pair(dir.path())?;
    let rss_before = proc_status_kib("self", "VmRSS:");
    let (collector, spans) = crate::otlp::collector().await?;
    let engine = start_engine(model(backend_port)?, (0.0, None))?;
    let loaded = start_engine(loaded_model(backend_port)?, (0.0, None))?;
    let traced = start_engine(model(backend_port)?, (0.01, Some(collector)))?;
    tokio::time::sleep(Duration::from_millis(300)).await; // nginx binding its ports
    let rss_idle = proc_status_kib("self", "VmRSS:");
    println!(
        "L7 engine vs nginx reverse proxy: wrk -t1 -c50, {seconds} s per run, {rounds} rounds; \
         loaded: the engine with 20 L7 policies and 50 routes"
    );
    println!(
        "round  direct req/s  nginx req/s  weft req/s  weft/nginx  loaded req/s  loaded/weft  weft CPU ms/1k req"
    );
    let mut rows: Vec<Row> = Vec::new();
    for round in 1..=rounds {
        let direct = wrk(backend_port, seconds)?;
        let via_nginx = wrk(nginx_port, seconds)?;
        let cpu = cpu_seconds();
        let via_weft = wrk(engine.port(), seconds)?;
        let cpu_ms = (cpu_seconds() - cpu) * 1000.0 / (via_weft * seconds as f64 / 1000.0);
        let via_loaded = wrk(loaded.port(), seconds)?;
        println!(
            "{round:>5}  {direct:>12.0}  {via_nginx:>11.0}  {via_weft:>10.0}  {:>10.2}  {via_loaded:>12.0}  {:>11.3}  {cpu_ms:>18.1}",
            via_weft / via_nginx,
            via_loaded / via_weft,
        );
        rows.push((direct, via_nginx, via_weft, via_loaded, cpu_ms));
    }
    let col = |f: fn(&Row) -> f64| median(rows.iter().map(f).collect());
    let (d, n, w, l, c) = (
        col(|r| r.0),
        col(|r| r.1),
        col(|r| r.2),
        col(|r| r.3),
        col(|r| r.4),
    );
    let ratio = col(|r| r.2 / r.1);
    let loaded_ratio = col(|r| r.3 / r.2);
    println!(
        "median {d:>12.0}  {n:>11.0}  {w:>10.0}  {ratio:>10.2}  {l:>12.0}  {loaded_ratio:>11.3}  {c:>18.1}"
    );
    println!(
        "nginx/direct {:.2}, weft/direct {:.2}; 20 policies + 50 routes cost {:.1}% of requests/s",
        n / d,
        w / d,
        (1.0 - loaded_ratio) * 100.0
    );
    println!("at 1,000 req/s (h2load --h1 -c10 --rps, {seconds} s), alternating:");
    println!(
        "round  nginx CPU ms/s  weft untraced CPU ms/s  RSS KiB  weft traced 1% CPU ms/s  RSS KiB"
    );
    let mut fixed = Vec::new();
    let nginx_pid = nginx_proxy.0.id();
    for round in 1..=rounds {
        let (cpu_n, _) = at_1000_rps(nginx_port, seconds, &|| tree_cpu_seconds(nginx_pid))?;
        let (cpu_u, rss_u) = at_1000_rps(engine.port(), seconds, &cpu_seconds)?;
        let (cpu_t, rss_t) = at_1000_rps(traced.port(), seconds, &cpu_seconds)?;
        println!("{round:>5}  {cpu_n:>14.1}  {cpu_u:>22.1}  {rss_u:>7}  {cpu_t:>23.1}  {rss_t:>7}");
        fixed.push((cpu_n, cpu_u, cpu_t));
    }
    let exported = spans.lock().map(|s| s.len()).unwrap_or(0);
    println!(
        "median CPU ms/s at 1,000 req/s: nginx {:.1}, weft untraced {:.1}, weft traced at 1% {:.1} ({exported} spans received by the collector)",
        median(fixed.iter().map(|f| f.0).collect()),
        median(fixed.iter().map(|f| f.1).collect()),
        median(fixed.iter().map(|f| f.2).collect()),
    );
    println!(
        "process RSS (three engines + collector + harness): before {rss_before} KiB, idle {rss_idle} KiB, peak {} KiB",
        proc_status_kib("self", "VmHWM:")
    );
    Ok(())
}
