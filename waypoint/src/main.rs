//! weft-waypoint: the optional L7 proxy.

use std::process::ExitCode;

use clap::Parser;

/// weft's L7 proxy, one per namespace or service account: Gateway API routes,
/// retries, timeouts, fault injection, L7 authorization.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Waypoint name (the Gateway object's name).
    #[arg(long)]
    name: String,
    /// Namespace of the Gateway.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
}

#[allow(clippy::print_stderr)]
fn main() -> ExitCode {
    let args = Args::parse();
    eprintln!(
        "weft-waypoint {}/{}: L7 proxying is not built yet (waypoint issue). Exiting.",
        args.namespace, args.name
    );
    ExitCode::from(2)
}
