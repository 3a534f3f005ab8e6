//! weft-ztunnel: the per-node proxy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// weft's node proxy: captures the TCP traffic of enrolled pods and carries it
/// between nodes in HBONE (HTTP/2 CONNECT in mutual TLS 1.3).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// This node's name, as the controller knows it.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Controller gRPC address (CA and config push).
    #[arg(long, default_value = "127.0.0.1:15012")]
    controller: SocketAddr,
    /// File holding this node's token (local mode).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Static config (Workload/Service/Authorization YAML) instead of the push.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[allow(clippy::print_stderr)]
fn main() -> ExitCode {
    let args = Args::parse();
    eprintln!(
        "weft-ztunnel (node {}): traffic capture and forwarding are not built yet (issue #3); \
         the HBONE, TLS and certificate libraries it will use are in weft-proto. Exiting.",
        args.node
    );
    let _ = (args.controller, args.token_file, args.config);
    ExitCode::from(2)
}
