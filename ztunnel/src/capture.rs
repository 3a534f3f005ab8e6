//! The nftables table weft owns inside each enrolled pod's namespace:
//! outbound TCP → 15001 (except loopback and the ztunnel's marked sockets),
//! inbound TCP → 15006 (except HBONE on 15008, which has its own listener).

use std::io::Write;
use std::process::{Command, Stdio};

use crate::netns::{MARK, Netns};

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const TABLE: &str = "weft";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("nft in {netns}: {reason}")]
    Nft { netns: String, reason: String },
}

fn ruleset() -> String {
    format!(
        "add table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {MARK:#x} return
    ip daddr 127.0.0.0/8 return
    ip6 daddr ::1 return
    meta l4proto tcp redirect to :{OUTBOUND_PORT}
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    tcp dport 15008 return
    meta l4proto tcp redirect to :{INBOUND_PLAINTEXT_PORT}
  }}
}}
"
    )
}

/// Installs (or replaces) the table. Idempotent.
pub async fn install(netns: &Netns) -> Result<(), CaptureError> {
    nft(netns, ruleset()).await
}

/// Deletes the table; a missing table is not an error.
pub async fn remove(netns: &Netns) -> Result<(), CaptureError> {
    nft(
        netns,
        format!("add table inet {TABLE}\ndelete table inet {TABLE}\n"),
    )
    .await
}

/// Runs `nft -f -` inside the namespace (a child process inherits the
/// namespace of the thread that starts it).
async fn nft(netns: &Netns, script: String) -> Result<(), CaptureError> {
    let name = netns.path().display().to_string();
    let err = |reason: String| CaptureError::Nft {
        netns: name.clone(),
        reason,
    };
    let output = netns
        .run(move || {
            let mut child = Command::new("nft")
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            child
                .stdin
                .take()
                .ok_or_else(|| std::io::Error::other("no stdin"))?
                .write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .await
        .map_err(|e| err(format!("cannot run nft (is nftables installed?): {e}")))?;
    if !output.status.success() {
        return Err(err(String::from_utf8_lossy(&output.stderr)
            .trim()
            .to_owned()));
    }
    Ok(())
}
