//! Instructions per proxied request, counted by valgrind's callgrind:
//! nginx as a plain reverse proxy against the waypoint's L7 engine, the same
//! backend, client and route as `weft-bench l7`. Requests per second on a
//! shared 2-vCPU VM swing by 2× from minute to minute; a count of user-space
//! instructions does not, so a change to the engine can be judged by it.
//! What it leaves out: the kernel's share (the same system calls on both
//! sides) and cache misses.

#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::cell::RefCell;
use std::rc::Rc;

use anyhow::Context;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::l7_bench::{Process, backend_server, free_port, nginx_under, proxy_server, wrk_output};

/// `weft-bench l7-serve PORT [bare]`: the plain engine of `weft-bench l7`
/// routing to a backend on `PORT` (or, with `bare`, [`start_bare`]); prints
/// its address, then serves until killed.
pub fn serve_forever(backend_port: u16, bare: bool) -> anyhow::Result<std::convert::Infallible> {
    let addr = if bare {
        start_bare(backend_port)?
    } else {
        let model = crate::l7_bench::model(backend_port)?;
        crate::l7_bench::start_engine(model, (0.0, None))?
    };
    println!("{addr}");
    loop {
        std::thread::park();
    }
}

const CALLGRIND: [&str; 2] = ["valgrind", "--tool=callgrind"];

pub async fn run(seconds: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (backend_port, nginx_port) = (free_port()?, free_port()?);
    let _backend = nginx_under(&[], dir.path(), "backend", &backend_server(backend_port))?;
    let out = |name: &str| dir.path().join(format!("{name}.out"));
    let out_flag = |name: &str| format!("--callgrind-out-file={}", out(name).display());
    let nginx_out = out_flag("nginx");
    let nginx = nginx_under(
        &[CALLGRIND[0], CALLGRIND[1], &nginx_out],
        dir.path(),
        "proxy",
        &proxy_server(backend_port, nginx_port),
    )?;
    let backend = backend_port.to_string();
    let (engine, engine_port) = serve_under(&out_flag("weft"), &[&backend])?;
    let (bare, bare_port) = serve_under(&out_flag("hyper"), &[&backend, "bare"])?;
    println!(
        "user-space instructions per proxied request (callgrind), wrk -t1 -c50 for {seconds} s \
         after a 2 s warm-up; HTTP/1.1 keep-alive, the route of `weft-bench l7`"
    );
    let mut counts = [0.0; 3];
    let proxies = [
        ("nginx", &nginx, nginx_port),
        ("weft", &engine, engine_port),
        ("hyper", &bare, bare_port),
    ];
    for (count_of, (name, process, port)) in counts.iter_mut().zip(proxies) {
        *count_of = count(process.0.id(), port, seconds, &out(name))?;
        println!("{name:<6} {count_of:>9.0} instructions per request");
    }
    println!(
        "weft / nginx {:.2}; hyper alone (no routing, headers or telemetry) / nginx {:.2}",
        counts[1] / counts[0],
        counts[2] / counts[0]
    );
    Ok(())
}

/// `weft-bench l7-serve ARGS` under callgrind (dumping per `out_flag`),
/// and the port it serves.
fn serve_under(out_flag: &str, args: &[&str]) -> anyhow::Result<(Process, u16)> {
    let mut process = Process(
        Command::new(CALLGRIND[0])
            .args([CALLGRIND[1], out_flag])
            .arg(std::env::current_exe()?)
            .arg("l7-serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("valgrind (apt-get install valgrind)")?,
    );
    let stdout = process.0.stdout.take().context("engine stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let port = line
        .trim()
        .parse::<std::net::SocketAddr>()
        .with_context(|| format!("engine address in {line:?}"))?
        .port();
    Ok((process, port))
}

/// Instructions per request of the callgrind process `pid` serving `port`:
/// counters zeroed after a warm-up, `seconds` of load, counters dumped.
fn count(pid: u32, port: u16, seconds: u64, out: &Path) -> anyhow::Result<f64> {
    wait_for(port)?;
    wrk_requests(port, 2)?;
    control("-z", pid)?;
    let requests = wrk_requests(port, seconds)?;
    control("-d", pid)?;
    let dump = format!("{}.1", out.display());
    let text = std::fs::read_to_string(&dump).with_context(|| format!("callgrind dump {dump}"))?;
    let total: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("totals:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("totals in {dump}"))?;
    anyhow::ensure!(requests > 0.0, "no requests completed on port {port}");
    Ok(total / requests)
}

/// Valgrind starts a large binary slowly: its port, within a minute.
fn wait_for(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "nothing listening on {port} after 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn control(what: &str, pid: u32) -> anyhow::Result<()> {
    let status = Command::new("callgrind_control")
        .args([what, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("callgrind_control")?;
    anyhow::ensure!(status.success(), "callgrind_control {what} {pid}: {status}");
    Ok(())
}

/// Requests wrk completed in `seconds` (its total, not a rate).
fn wrk_requests(port: u16, seconds: u64) -> anyhow::Result<f64> {
    let text = wrk_output(port, seconds)?;
    text.lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("wrk requests in {text}"))
}

/// Idle upstream connections of the bare proxy (its one thread's own).
type Idle = Rc<RefCell<Vec<http1::SendRequest<Incoming>>>>;

/// hyper alone, on one thread: an HTTP/1.1 server whose every request goes
/// as it came to the backend over a pooled hyper HTTP/1.1 client
/// connection, the response streamed back. No routing, headers, telemetry
/// or limits: the floor under any proxy built on hyper on both sides, which
/// is how far the engine's own work can be told from hyper's.
pub fn start_bare(backend_port: u16) -> anyhow::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("l7-bare".into())
        .spawn(move || {
            let serve = async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let idle = Idle::default();
                loop {
                    let (tcp, _) = listener.accept().await?;
                    let _ = tcp.set_nodelay(true);
                    let idle = idle.clone();
                    let service = service_fn(move |req| forward(req, idle.clone(), backend_port));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service);
                    tokio::task::spawn_local(conn);
                }
            };
            let local = tokio::task::LocalSet::new();
            let result: std::io::Result<()> = local.block_on(&runtime, serve);
            if let Err(e) = result {
                println!("bare proxy stopped: {e}");
            }
        })?;
    Ok(addr)
}

async fn forward(
    req: Request<Incoming>,
    idle: Idle,
    backend_port: u16,
) -> anyhow::Result<Response<Incoming>> {
    let pooled = idle.borrow_mut().pop();
    let mut sender = match pooled {
        Some(sender) => sender,
        None => {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", backend_port)).await?;
            let _ = tcp.set_nodelay(true);
            let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
            tokio::task::spawn_local(conn);
            sender
        }
    };
    sender.ready().await?;
    let response = sender.send_request(req).await?;
    // Back in the pool at once: its next user waits in `ready` until this
    // response's body has gone, as a pool returning it at the body's end.
    idle.borrow_mut().push(sender);
    Ok(response)
}
