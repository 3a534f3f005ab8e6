//! weft-cni: chained CNI plugin that enrolls pods with the node's ztunnel.

use std::process::ExitCode;

use clap::Parser;

/// Chained CNI plugin (CNI spec 1.0) that hands each new pod to the node's
/// ztunnel. Invoked by the container runtime with CNI_COMMAND and a config on
/// stdin, not by hand.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {}

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    let _ = Args::parse();
    // A CNI error document, so a runtime that calls us reports a clear reason
    // instead of starting a pod unprotected.
    println!(
        r#"{{"cniVersion":"1.0.0","code":999,"msg":"weft-cni is not implemented yet (issue #3)","details":"pod enrollment arrives with the ztunnel capture work"}}"#
    );
    ExitCode::from(1)
}
