//! weft-cni: chained CNI plugin that enrolls pods with the node's ztunnel.
//! Invoked by the container runtime (CNI_COMMAND in the environment, the
//! network config on stdin); see `weft_ztunnel::cni`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use weft_ztunnel::cni::{self, Env};
use weft_ztunnel::cni_install::{self, Installer};

/// `weft-cni install`: put weft-cni into this node's CNI chain and keep it
/// there (re-chained when the primary CNI rewrites its config); on SIGTERM
/// take it out, leaving the config as it was, unless a newer installer
/// (a rolling update) has taken over. Runs in the ztunnel DaemonSet.
#[derive(Parser, Debug)]
#[command(name = "weft-cni install", version)]
struct InstallArgs {
    /// The node's CNI binary directory, as mounted here.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The node's CNI config directory, as mounted here.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Where the installer records what it changed (shared with the
    /// ztunnel and its successor on the node).
    #[arg(long, default_value = "/var/lib/weft/ztunnel")]
    state_dir: PathBuf,
    /// The ztunnel's enrollment socket as the host (the runtime) sees it.
    #[arg(long, default_value = "/var/run/weft/ztunnel.sock")]
    socket: PathBuf,
    /// Who this installer is (the pod's uid in the DaemonSet).
    #[arg(long, env = "POD_UID")]
    owner: String,
    /// How often to check the chain is still in place.
    #[arg(long, default_value_t = 2)]
    interval_seconds: u64,
    #[arg(long, default_value = "text")]
    log_format: weft_proto::process::LogFormat,
}

fn install(args: impl Iterator<Item = String>) -> ExitCode {
    let a = InstallArgs::parse_from(std::iter::once("weft-cni install".to_owned()).chain(args));
    weft_proto::process::init_logging(a.log_format);
    let installer = Installer {
        bin_dir: a.cni_bin_dir,
        conf_dir: a.cni_conf_dir,
        state_dir: a.state_dir,
        socket: a.socket,
        me: a.owner,
    };
    let interval = std::time::Duration::from_secs(a.interval_seconds.max(1));
    let served = std::env::current_exe()
        .map_err(|e| e.to_string())
        .and_then(|exe| cni_install::serve(&installer, &exe, interval).map_err(|e| e.to_string()));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "weft-cni install failed");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("install") {
        return install(std::env::args().skip(2));
    }
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!(
            "weft-cni {}: chained CNI plugin (spec 1.0: ADD, DEL, CHECK, VERSION).\n\
             Run by the container runtime, not by hand: it reads CNI_COMMAND, CNI_NETNS and\n\
             CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID) and the network config\n\
             on stdin, e.g. {{\"type\":\"weft-cni\",\"socket\":\"/var/run/weft/ztunnel.sock\",\"timeoutSeconds\":5}}.\n\
             `weft-cni install --help`: chain it into the node's CNI config (the DaemonSet does).",
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
