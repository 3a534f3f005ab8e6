//! Running the real `kubectl-weft` binary from a test.

#![allow(dead_code)] // each test binary uses a part

use std::ffi::OsString;

/// `waypoint apply` of waypoint shop/wp for service account api.
pub const APPLY_WP: [&str; 8] = [
    "waypoint",
    "apply",
    "-n",
    "shop",
    "--name",
    "wp",
    "--for-service-account",
    "api",
];

/// What a run printed, and its exit code.
pub struct Run {
    pub code: i32,
    pub out: String,
    pub err: String,
}

/// Runs `kubectl-weft ARGS` (off the async runtime: it blocks).
pub async fn kubectl_weft(args: Vec<OsString>) -> Run {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-weft"));
    cmd.args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("joined")
        .expect("kubectl-weft runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
