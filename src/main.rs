//! The `tortie` binary: one executable, several entry points. `main` only parses the command
//! line, sets up logging and hands over; the work lives in the library modules.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tortie::{config, metrics::BuildInfo, node, telemetry};

#[derive(Parser)]
#[command(
    name = "tortie",
    version,
    about = "Kubernetes node networking: Calico-compatible IPAM, CNI, overlay, policy"
)]
struct Cli {
    #[command(flatten)]
    log: telemetry::LogArgs,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process; boxing the node's flags would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the node daemon (DaemonSet, hostNetwork).
    Node(config::NodeArgs),
    /// Operator view of IPAM: show utilisation, check consistency, release an address.
    Ipam(tortie::ipam::cli::IpamArgs),
    /// Network policy tools: explain why a flow is allowed or denied.
    Policy(tortie::policy::cli::PolicyArgs),
    /// Print version, git commit, compiler and target.
    Version,
    /// (Re)write the CRD manifests generated from src/api.
    Crdgen {
        /// Folder to write `crd.projectcalico.org_<plural>.yaml` files into.
        #[arg(long, default_value = tortie::api::crdgen::MANIFEST_DIR)]
        dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    // ---- CNI plugin dispatch -------------------------------------------------------------
    // When the container runtime runs us as a CNI plugin, CNI_COMMAND is set: hand over to
    // the plugin before clap (the runtime passes no arguments) and before any tokio runtime.
    if std::env::var_os("CNI_COMMAND").is_some() {
        return tortie::cni::plugin::run();
    }
    // ---------------------------------------------------------------------------------------

    let cli = Cli::parse();
    if let Err(e) = telemetry::init(&cli.log) {
        eprintln!("tortie: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Node(args) => node::main(args),
        Command::Ipam(args) => tortie::ipam::cli::run(args),
        Command::Policy(args) => tortie::policy::cli::run(args),
        Command::Version => {
            print!("{}", BuildInfo::CURRENT.render());
            ExitCode::SUCCESS
        }
        Command::Crdgen { dir } => match tortie::api::crdgen::write_all(&dir) {
            Ok(paths) => {
                paths.iter().for_each(|p| println!("{}", p.display()));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tortie crdgen: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
