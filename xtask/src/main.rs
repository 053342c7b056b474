//! Developer tasks: `cargo xtask setup|build|demo|test|bench`.

mod setup;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "brokerprobe developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (Debian toolchain, bpf-linker); idempotent.
    Setup,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
    }
}

/// Runs a command with inherited stdio and fails with the command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
