//! A proxy's control work runs on a runtime of its own: a data plane whose
//! every worker is busy still answers readiness.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use weft_cli::demo::mesh::{ZtunnelOptions, start_ztunnel_on};
use weft_integration::Mesh;
use weft_proto::process::ControlRuntime;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_data_plane_does_not_starve_readiness() {
    let mesh = Mesh::start().await;
    let control = ControlRuntime::start().expect("control runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("a.yaml");
    std::fs::write(
        &config,
        "workloads:\n  - {name: web, serviceAccount: web, node: a, addresses: [10.0.1.2]}\n",
    )
    .expect("config");
    let zt = start_ztunnel_on(
        &mesh.controller,
        "a",
        (Some(&config), dir.path()),
        ZtunnelOptions::default(),
        Some(control.handle()),
    )
    .await
    .expect("ztunnel starts");
    // Every data-plane worker busy (blocking its thread) for a while.
    let (busy, done) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    for _ in 0..2 {
        let (busy, done) = (busy.clone(), done.clone());
        tokio::spawn(async move {
            busy.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(3));
            done.store(true, Ordering::SeqCst);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while busy.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "workers never got busy");
        std::thread::yield_now();
    }
    // Asked with curl (on the blocking pool, awaited from this non-worker
    // thread) while both workers are held.
    let (status, body) =
        weft_integration::curl(zt.ready_addr, "GET", "/healthz/ready", None, None).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert!(
        !done.load(Ordering::SeqCst),
        "readiness waited for the data plane"
    );
    zt.shutdown().await;
}
