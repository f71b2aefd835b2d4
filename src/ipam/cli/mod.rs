//! `tortie ipam`: the operator's view of IPAM against the API server (show, check, release).
//! Reads are one LIST per kind into a Snapshot; the analysis is pure and lives per verb.
//!
//! Exit codes: 0 success / no problem; 1 problems found (`check`), release refused or nothing
//! to release (`release` of an address nobody holds); 2 cannot run (kubeconfig, API error).

pub mod check;
pub mod release;
pub mod show;
pub mod snapshot;
pub mod table;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use chrono::Utc;
use kube::Api;

use self::release::Decision;
use self::snapshot::Snapshot;
use crate::config::KubeSource;
use crate::ipam::store::release::{AddrRelease, release_addr};

#[derive(Debug, clap::Args)]
pub struct IpamArgs {
    /// Kubeconfig file; without it (and without KUBECONFIG) the in-cluster service account.
    #[arg(long, env = "KUBECONFIG", global = true)]
    pub kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    pub command: IpamCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, clap::Subcommand)]
pub enum IpamCommand {
    /// Utilisation per pool; with flags, per block, borrowed addresses or one address.
    Show {
        /// Also list each block: CIDR, affine node, in use, free.
        #[arg(long)]
        show_blocks: bool,
        /// List addresses held for a node in a block affine to another node.
        #[arg(long)]
        show_borrowed: bool,
        /// Tell who holds this address.
        #[arg(long)]
        ip: Option<IpAddr>,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Look for leaked, orphaned and inconsistent IPAM objects; exit 1 when any is found.
    Check {
        /// Also write the report as JSON to this file.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// Release one address (its pod must be gone unless --force).
    Release {
        #[arg(long)]
        ip: IpAddr,
        /// Release even when the address's pod (or tunnel owner) still exists.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("connecting to the API server: {0}")]
    Connect(#[from] crate::datastore::DatastoreError),
    #[error("listing {kind}: {source}")]
    List {
        kind: &'static str,
        source: kube::Error,
    },
    #[error("writing report {path}: {source}")]
    Report {
        path: String,
        source: std::io::Error,
    },
    #[error("rendering JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Ipam(#[from] crate::ipam::IpamError),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Entry point of `tortie ipam`.
pub fn run(args: IpamArgs) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
        .and_then(|rt| rt.block_on(run_async(args)));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tortie ipam: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run_async(args: IpamArgs) -> Result<ExitCode, CliError> {
    let source = match args.kubeconfig {
        Some(p) if !p.as_os_str().is_empty() => KubeSource::Kubeconfig(p),
        _ => KubeSource::InCluster,
    };
    let client = crate::datastore::connect(&source).await?.client;
    match args.command {
        IpamCommand::Show {
            show_blocks,
            show_borrowed,
            ip,
            output,
        } => {
            let snap = Snapshot::load(&client, false).await?;
            print!(
                "{}",
                show_text(&snap, show_blocks, show_borrowed, ip, output)?
            );
            Ok(ExitCode::SUCCESS)
        }
        IpamCommand::Check { output } => {
            let snap = Snapshot::load(&client, true).await?;
            let report = check::check(&snap, Utc::now());
            print!("{}", check::render(&report));
            if let Some(path) = output {
                let json = serde_json::to_string_pretty(&report)?;
                std::fs::write(&path, json + "\n").map_err(|source| CliError::Report {
                    path: path.display().to_string(),
                    source,
                })?;
                println!("Report written to {}", path.display());
            }
            Ok(if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        IpamCommand::Release { ip, force } => {
            let snap = Snapshot::load(&client, true).await?;
            let (block, handle) = match release::decide(&snap, ip, force) {
                Decision::Release { block, handle } => (block, handle),
                Decision::Refuse { reason } => {
                    eprintln!("refusing to release: {reason}");
                    return Ok(ExitCode::FAILURE);
                }
                Decision::NotAllocated => {
                    eprintln!("IP {ip} is not allocated; nothing to release");
                    return Ok(ExitCode::FAILURE);
                }
                Decision::NotInAnyPool => {
                    eprintln!("IP {ip} is not in any pool; nothing to release");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let outcome = release_addr(
                &Api::all(client.clone()),
                &Api::all(client),
                block,
                ip,
                Some(handle.as_deref()),
                Utc::now(),
                snap.cooldown,
            )
            .await?;
            let name = |h: &Option<String>| h.clone().unwrap_or_else(|| "none".to_string());
            match outcome {
                AddrRelease::Released { handle } => {
                    println!("Released IP {ip} (handle {}, block {block})", name(&handle));
                    Ok(ExitCode::SUCCESS)
                }
                AddrRelease::NotAllocated => {
                    eprintln!("IP {ip} was released by someone else meanwhile; nothing to release");
                    Ok(ExitCode::FAILURE)
                }
                AddrRelease::HeldByOther { handle: now } => {
                    eprintln!(
                        "IP {ip} changed hands meanwhile (was {}, now {}); not released",
                        name(&handle),
                        name(&now)
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn show_text(
    snap: &Snapshot,
    show_blocks: bool,
    show_borrowed: bool,
    ip: Option<IpAddr>,
    output: Format,
) -> Result<String, CliError> {
    if let Some(ip) = ip {
        let info = show::ip_info(snap, ip);
        return Ok(match output {
            Format::Table => show::render_ip_info(&info),
            Format::Json => serde_json::to_string_pretty(&info)? + "\n",
        });
    }
    let usage = show::usage(snap);
    let borrowed = show_borrowed.then(|| show::borrowed(snap));
    Ok(match output {
        Format::Table => {
            let mut s = show::render_usage(&usage, show_blocks);
            if let Some(b) = &borrowed {
                s.push_str(&show::render_borrowed(b));
            }
            s
        }
        Format::Json => {
            let mut v = serde_json::to_value(&usage)?;
            if !show_blocks {
                for p in v["pools"].as_array_mut().into_iter().flatten() {
                    if let Some(o) = p.as_object_mut() {
                        o.remove("blocks");
                    }
                }
            }
            if let Some(b) = borrowed {
                v["borrowed"] = serde_json::to_value(b)?;
            }
            serde_json::to_string_pretty(&v)? + "\n"
        }
    })
}
