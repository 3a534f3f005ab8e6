//! weft-cni: chained CNI plugin that enrolls pods with the node's ztunnel.
//! Invoked by the container runtime (CNI_COMMAND in the environment, the
//! network config on stdin); see `weft_ztunnel::cni`.

use std::io::Read;
use std::process::ExitCode;

use weft_ztunnel::cni::{self, Env};

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!(
            "weft-cni {}: chained CNI plugin (spec 1.0: ADD, DEL, CHECK, VERSION).\n\
             Run by the container runtime, not by hand: it reads CNI_COMMAND, CNI_NETNS and\n\
             CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID) and the network config\n\
             on stdin, e.g. {{\"type\":\"weft-cni\",\"socket\":\"/var/run/weft/ztunnel.sock\",\"timeoutSeconds\":5}}.",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let mut stdin = Vec::new();
    // Bounded: a network config is a few KiB.
    let _ = std::io::stdin().take(1024 * 1024).read_to_end(&mut stdin);
    match cni::run(&Env::from_process(), &stdin) {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err((version, e)) => {
            println!("{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
