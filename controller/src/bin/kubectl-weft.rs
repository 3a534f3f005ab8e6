//! `kubectl weft` (also runs as `weft`): the command-line face of the mesh.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Operate a weft mesh. Run `kubectl weft demo` to see it work on this machine.
#[derive(Parser, Debug)]
#[command(name = "kubectl-weft", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a local mesh on this machine and show what it does.
    Demo {
        /// Leave the mesh running until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Print the Kubernetes manifests (for `| kubectl apply -f -`).
    Install,
    /// Add a namespace to the mesh.
    Join { namespace: String },
    /// Remove a namespace from the mesh.
    Leave { namespace: String },
    /// Mesh health at a glance.
    Status,
    /// Connected proxies and their config versions.
    ProxyStatus,
    /// Workloads the mesh knows.
    Workloads,
    /// Issued certificates.
    Certs,
    /// Explain whether SRC may reach DST on PORT.
    Policy {
        #[arg(num_args = 3, value_names = ["SRC", "DST", "PORT"])]
        args: Vec<String>,
    },
}

#[allow(clippy::print_stderr)]
fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo { keep } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(weft_controller::demo::run(keep)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        other => {
            eprintln!(
                "`{}` needs the controller's REST API, which arrives with issue #4; \
                 until then only `demo` works.",
                format!("{other:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap_or("command")
                    .to_lowercase()
            );
            ExitCode::from(2)
        }
    }
}
