//! `kubectl weft` (also runs as `weft`): the command-line face of the mesh.

use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use weft_cli::commands::{self as cli, Output, Target};

/// Operate a weft mesh. Run `kubectl weft demo` to see it work on this machine.
#[derive(Parser, Debug)]
#[command(name = "kubectl-weft", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The controller's REST API (local mode).
    #[arg(
        long,
        global = true,
        env = "WEFT_CONTROLLER",
        default_value = "http://127.0.0.1:8080"
    )]
    controller: String,
    /// The API token (local mode: <data-dir>/api-token).
    #[arg(
        long,
        global = true,
        env = "WEFT_TOKEN_FILE",
        default_value = "/var/lib/weft/api-token"
    )]
    token_file: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Format,
    /// Work on a cluster: join, leave and waypoint apply/delete write
    /// Kubernetes objects with your kubeconfig's credentials. Implied by
    /// --kubeconfig and --context.
    #[arg(long, short = 'k', global = true)]
    kubernetes: bool,
    /// The kubeconfig to use (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current one).
    #[arg(long, global = true)]
    context: Option<String>,
}

impl Cli {
    fn in_cluster(&self) -> bool {
        self.kubernetes || self.kubeconfig.is_some() || self.context.is_some()
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Table,
    /// A table with more columns.
    Wide,
    Json,
    Yaml,
}

/// Which namespace to list (kubectl's flags). Without either: every one.
#[derive(clap::Args, Debug)]
struct Namespaces {
    /// Only this namespace.
    #[arg(long, short = 'n', conflicts_with = "all_namespaces")]
    namespace: Option<String>,
    /// Every namespace (the default).
    #[arg(long, short = 'A')]
    all_namespaces: bool,
}

impl Namespaces {
    fn scope(&self) -> cli::Scope {
        cli::Scope {
            namespace: self.namespace.clone(),
        }
    }
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
    Workloads {
        #[command(flatten)]
        ns: Namespaces,
    },
    /// Issued certificates.
    Certs {
        #[command(flatten)]
        ns: Namespaces,
    },
    /// Routes: which rule would serve a request (the waypoint's own matcher).
    Route {
        #[command(subcommand)]
        action: RouteAction,
    },
    /// Print a shell completion script: `source <(kubectl weft completion bash)`.
    Completion { shell: clap_complete::Shell },
    /// Waypoints: the L7 hop for a namespace or a service account.
    Waypoint {
        #[command(subcommand)]
        action: WaypointAction,
    },
    /// Authorization: which policy decides, at L7 and L4.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyAction {
    /// Whether SRC (namespace/name) may reach DST (a Service or workload)
    /// on PORT, and which policy and rule decide at each layer; exit 1
    /// when denied.
    Check(cli::PolicyQuery),
}

#[derive(Subcommand, Debug)]
enum RouteAction {
    /// Which route and rule serve METHOD PATH on SERVICE:PORT, and where
    /// it goes; exit 1 when none does.
    Explain(cli::RouteQuery),
}

#[derive(Subcommand, Debug)]
enum WaypointAction {
    /// Write a waypoint's Gateway (local mode: into the mesh's config; in a
    /// cluster: the Gateway object).
    Apply(ApplyArgs),
    /// Waypoints, what is bound to each, and whether it is in effect.
    List,
    /// Remove a waypoint (local mode), and its namespace binding.
    Delete {
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "waypoint")]
        name: String,
    },
}

/// A command against a cluster: the ones that change the mesh write
/// Kubernetes objects; reads of the controller's state go through the API
/// server's aggregated API (`api.weft.dev`), both as the kubeconfig's user.
async fn in_cluster(
    command: Command,
    (kubeconfig, context): (Option<PathBuf>, Option<String>),
    output: Output,
) -> Result<String, cli::CliError> {
    if let Command::Install = command {
        return Ok(cli::install());
    }
    let cluster = || weft_cli::cluster::Cluster::connect(kubeconfig.clone(), context.clone());
    match command {
        Command::Status => cluster().await?.status("weft-system").await,
        Command::Waypoint {
            action: WaypointAction::List,
        } => cluster().await?.waypoint_list(output).await,
        Command::Join { namespace } => cluster().await?.set_membership(&namespace, true).await,
        Command::Leave { namespace } => cluster().await?.set_membership(&namespace, false).await,
        Command::Waypoint {
            action: WaypointAction::Delete { namespace, name },
        } => cluster().await?.waypoint_delete(&namespace, &name).await,
        Command::Waypoint {
            action: WaypointAction::Apply(args),
        } => {
            let c = cluster().await?;
            let (spec, wait) = args.split();
            let mut out = c.waypoint_apply(&spec).await?;
            if let Some(timeout) = wait {
                out += &c
                    .waypoint_wait(&spec.namespace, &spec.name, timeout)
                    .await?;
            }
            Ok(out)
        }
        // Reads of the controller's state: through the aggregated API.
        Command::Workloads { ns } => {
            cli::workloads(&cluster().await?.target(), &ns.scope(), output).await
        }
        Command::Certs { ns } => cli::certs(&cluster().await?.target(), &ns.scope(), output).await,
        Command::ProxyStatus => cli::proxy_status(&cluster().await?.target(), output).await,
        Command::Route {
            action: RouteAction::Explain(q),
        } => cli::route_explain(&cluster().await?.target(), &q, output).await,
        Command::Policy {
            action: PolicyAction::Check(q),
        } => cli::policy_check(&cluster().await?.target(), &q, output).await,
        other => Err(cli::CliError::Refused(format!(
            "`{}` does not run against a cluster",
            format!("{other:?}")
                .split([' ', '{'])
                .next()
                .unwrap_or("command")
                .to_lowercase()
        ))),
    }
}

#[derive(clap::Args, Debug)]
struct ApplyArgs {
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    #[arg(long, default_value = "waypoint")]
    name: String,
    /// Serve only this service account's workloads.
    #[arg(long)]
    for_service_account: Option<String>,
    /// Also bind the namespace to it (label weft.dev/use-waypoint).
    #[arg(long)]
    enroll_namespace: bool,
    /// Wait until the waypoint is serving (connected, config in hand).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

impl ApplyArgs {
    /// The Gateway to write, and how long to wait for it (with --wait).
    fn split(self) -> (cli::WaypointSpec, Option<std::time::Duration>) {
        let spec = cli::WaypointSpec {
            namespace: self.namespace,
            name: self.name,
            for_service_account: self.for_service_account,
            enroll_namespace: self.enroll_namespace,
        };
        let wait = self
            .wait
            .then(|| std::time::Duration::from_secs(self.timeout));
        (spec, wait)
    }
}

#[allow(clippy::print_stderr, clippy::print_stdout)]
fn main() -> ExitCode {
    let cli = Cli::parse();
    let target = Target::local(cli.controller.clone(), cli.token_file.clone());
    let output = match cli.output {
        Format::Table => Output::Table,
        Format::Wide => Output::Wide,
        Format::Json => Output::Json,
        Format::Yaml => Output::Yaml,
    };
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    };
    let print = |result: Result<String, cli::CliError>| match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    };
    if cli.in_cluster() {
        let (kubeconfig, context) = (cli.kubeconfig.clone(), cli.context.clone());
        return print(runtime().block_on(in_cluster(cli.command, (kubeconfig, context), output)));
    }
    match cli.command {
        Command::Workloads { ns } => {
            print(runtime().block_on(cli::workloads(&target, &ns.scope(), output)))
        }
        Command::ProxyStatus => print(runtime().block_on(cli::proxy_status(&target, output))),
        Command::Status => print(runtime().block_on(cli::status(&target))),
        Command::Certs { ns } => {
            print(runtime().block_on(cli::certs(&target, &ns.scope(), output)))
        }
        Command::Completion { shell } => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "kubectl-weft", &mut out);
            print(Ok(String::from_utf8_lossy(&out).into_owned()))
        }
        Command::Install => print(Ok(cli::install())),
        Command::Route {
            action: RouteAction::Explain(q),
        } => print(runtime().block_on(cli::route_explain(&target, &q, output))),
        Command::Policy {
            action: PolicyAction::Check(q),
        } => print(runtime().block_on(cli::policy_check(&target, &q, output))),
        Command::Waypoint { action } => match action {
            WaypointAction::Apply(args) => {
                let (spec, wait) = args.split();
                print(runtime().block_on(async {
                    let mut out = cli::waypoint_apply(&target, &spec).await?;
                    if let Some(timeout) = wait {
                        out += &cli::waypoint_wait(&target, &spec.namespace, &spec.name, timeout)
                            .await?;
                    }
                    Ok(out)
                }))
            }
            WaypointAction::List => print(runtime().block_on(cli::waypoint_list(&target, output))),
            WaypointAction::Delete { namespace, name } => {
                print(runtime().block_on(cli::waypoint_delete(&target, &namespace, &name)))
            }
        },
        Command::Join { namespace } => {
            print(runtime().block_on(cli::set_membership(&target, &namespace, true)))
        }
        Command::Leave { namespace } => {
            print(runtime().block_on(cli::set_membership(&target, &namespace, false)))
        }
        Command::Demo { keep } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(weft_cli::demo::run(keep)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
