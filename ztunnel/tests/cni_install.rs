//! `weft-cni install` as the DaemonSet runs it: a real process that copies
//! itself into a scratch node's CNI bin dir, chains into Calico's config,
//! chains in again when Calico rewrites it, and on SIGTERM leaves the
//! config byte-identical to what Calico last wrote.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CALICO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/cni-configs/10-calico.conflist"
);

/// Kills the installer if the test fails before it stops.
struct Installer(Child);

impl Drop for Installer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chained(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.contains("\"weft-cni\""))
}

/// Polls `cond` every 20 ms for at most 10 s (the installer looks every
/// second).
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn installs_follows_rewrites_and_uninstalls_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (bin, conf, state) = (
        dir.path().join("bin"),
        dir.path().join("net.d"),
        dir.path().join("state"),
    );
    for d in [&bin, &conf] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let config = conf.join("10-calico.conflist");
    std::fs::copy(CALICO, &config).expect("sample");
    let child = Command::new(env!("CARGO_BIN_EXE_weft-cni"))
        .arg("install")
        .arg("--cni-bin-dir")
        .arg(&bin)
        .arg("--cni-conf-dir")
        .arg(&conf)
        .arg("--state-dir")
        .arg(&state)
        .args(["--owner", "pod-1", "--interval-seconds", "1"])
        .stdout(Stdio::null())
        .spawn()
        .expect("weft-cni install");
    let mut installer = Installer(child);
    eventually("chained", || chained(&config));
    let copied = std::fs::read(bin.join("weft-cni")).expect("binary copied");
    assert_eq!(
        copied,
        std::fs::read(env!("CARGO_BIN_EXE_weft-cni")).expect("self")
    );

    // Calico's installer rewrites its file: weft is chained in again.
    let rewritten = std::fs::read_to_string(CALICO)
        .expect("sample")
        .replace("\"mtu\": 0", "\"mtu\": 1450");
    std::fs::write(&config, &rewritten).expect("rewrite");
    eventually("chained again", || chained(&config));

    let pid = installer.0.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(sent.is_ok_and(|s| s.success()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = installer.0.try_wait().expect("wait") {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert_eq!(std::fs::read_to_string(&config).expect("read"), rewritten);
    assert!(!bin.join("weft-cni").exists(), "binary removed");
}
