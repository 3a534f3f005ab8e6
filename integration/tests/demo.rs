//! The README's first command must keep working: run the demo's code path and
//! require that every check it shows passed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_passes_every_check() {
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        weft_cli::demo::run(false),
    )
    .await
    .expect("demo finishes within a minute")
    .expect("every demo check passes");
}
