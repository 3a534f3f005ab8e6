//! `weft-waypoint` as an operator (or a bad manifest) starts it: help,
//! and clear errors with a non-zero exit for flags it cannot use.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weft-waypoint"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("weft-waypoint runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn help_and_clear_errors() {
    let (ok, text) = run(&["--help"]);
    assert!(ok && text.contains("Usage: weft-waypoint"), "{text}");

    let (ok, text) = run(&["--no-such-flag"]);
    assert!(!ok && text.contains("--no-such-flag"), "{text}");
    let (ok, text) = run(&["--name", "w", "--listen", "not-an-address"]);
    assert!(!ok && text.contains("not-an-address"), "{text}");

    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("root-cert.pem");
    let token = dir.path().join("token");
    std::fs::write(&token, "t").expect("token");
    let (ok, text) = run(&[
        "--name",
        "w",
        "--ca-root",
        missing.to_str().expect("utf-8"),
        "--token-file",
        token.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(
        !ok && text.contains("root-cert.pem"),
        "names the file: {text}"
    );
}
