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

use anyhow::Context;

use crate::l7_bench::{Process, backend_server, free_port, nginx_under, proxy_server, wrk_output};

/// `weft-bench l7-serve PORT`: the plain engine of `weft-bench l7` routing
/// to a backend on `PORT`; prints its address, then serves until killed.
pub fn serve_forever(backend_port: u16) -> anyhow::Result<std::convert::Infallible> {
    let model = crate::l7_bench::model(backend_port)?;
    let addr = crate::l7_bench::start_engine(model, (0.0, None))?;
    println!("{addr}");
    loop {
        std::thread::park();
    }
}

pub async fn run(seconds: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (backend_port, nginx_port) = (free_port()?, free_port()?);
    let _backend = nginx_under(&[], dir.path(), "backend", &backend_server(backend_port))?;
    let out = |name: &str| dir.path().join(format!("{name}.out"));
    let out_flag = |name: &str| format!("--callgrind-out-file={}", out(name).display());
    let callgrind = ["valgrind", "--tool=callgrind"];
    let nginx_out = out_flag("nginx");
    let nginx = nginx_under(
        &[callgrind[0], callgrind[1], &nginx_out],
        dir.path(),
        "proxy",
        &proxy_server(backend_port, nginx_port),
    )?;
    let mut engine = Process(
        Command::new(callgrind[0])
            .args([callgrind[1], &out_flag("weft")])
            .arg(std::env::current_exe()?)
            .args(["l7-serve", &backend_port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("valgrind (apt-get install valgrind)")?,
    );
    let stdout = engine.0.stdout.take().context("engine stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let engine_port = line
        .trim()
        .parse::<std::net::SocketAddr>()
        .with_context(|| format!("engine address in {line:?}"))?
        .port();
    println!(
        "user-space instructions per proxied request (callgrind), wrk -t1 -c50 for {seconds} s \
         after a 2 s warm-up; HTTP/1.1 keep-alive, the route of `weft-bench l7`"
    );
    let mut counts = [0.0; 2];
    let proxies = [
        ("nginx", &nginx, nginx_port),
        ("weft", &engine, engine_port),
    ];
    for (count_of, (name, process, port)) in counts.iter_mut().zip(proxies) {
        *count_of = count(process.0.id(), port, seconds, &out(name))?;
        println!("{name:<6} {count_of:>9.0} instructions per request");
    }
    println!("weft / nginx {:.2}", counts[1] / counts[0]);
    Ok(())
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
