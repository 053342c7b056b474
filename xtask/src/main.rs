//! Developer tasks: `cargo xtask setup|build|demo|test|bench`.

mod bench;
mod demo;
mod fuzz;
mod setup;

use std::{env, ffi::OsString, fs, path::PathBuf, process::Command};

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
    /// Install what this machine lacks (Debian toolchain, bpf-linker, Prometheus); idempotent.
    Setup,
    /// Set up if needed, then build brokerprobe, the demo broker and the test tools (release).
    Build,
    /// Start the demo broker under mixed load and attach brokerprobe to it; Ctrl-C stops all.
    Demo(demo::DemoArgs),
    /// Set up, check formatting and lints, build, run every test (needs root), then fuzz
    /// each fuzz target for a minute.
    Test,
    /// Run the benchmarks and write BENCHMARKS.md with what they measured.
    Bench(bench::BenchArgs),
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Build => build(),
        Task::Demo(args) => {
            require_root("cargo xtask demo attaches eBPF probes")?;
            build()?;
            demo::demo(&args)
        }
        Task::Test => test(),
        Task::Bench(args) => bench::bench(&args),
    }
}

fn test() -> Result<()> {
    require_root("cargo xtask test attaches eBPF probes in its end-to-end tests")?;
    ensure_setup()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    let clippy = ["clippy", "--release", "--all-targets"];
    let deny_warnings = ["--", "-D", "warnings"];
    run(cargo().args(clippy).args(deny_warnings))?;
    // The marker crate's compiled-away variant must build too (A/B runs and brokers use it).
    run(cargo()
        .args(clippy)
        .args(["-p", "probe-markers", "--features", "disabled"])
        .args(deny_warnings))?;
    // The USDT test broker (docs/modes/usdt.md), linted and kept aside before the plain
    // build overwrites demo-broker.
    run(cargo()
        .args(clippy)
        .args(["-p", "demo-broker", "--features", "usdt"])
        .args(deny_warnings))?;
    build_demo_broker_variant("usdt")?;
    build()?;
    // --nocapture: the end-to-end tests print what they measured; CI logs should show it.
    run(cargo()
        .args(["test", "--release", "--", "--test-threads=1", "--nocapture"])
        .env("BROKERPROBE_BIN_DIR", bin_dir()))?;
    fuzz::run_all(cargo, fuzz::TEST_TIME)
}

fn build() -> Result<()> {
    ensure_setup()?;
    run(cargo().args(["build", "--release"]))
}

/// The demo broker built with cargo feature `feature`, kept as demo-broker-FEATURE: a
/// plain build overwrites demo-broker.
pub fn build_demo_broker_variant(feature: &str) -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "demo-broker",
        "--features",
        feature,
    ]))?;
    let variant = bin_dir().join(format!("demo-broker-{feature}"));
    fs::copy(bin_dir().join("demo-broker"), &variant)
        .with_context(|| format!("keeping the demo broker aside as {}", variant.display()))?;
    Ok(())
}

fn ensure_setup() -> Result<()> {
    if setup::is_complete() {
        setup::check_kernel()
    } else {
        setup::setup()
    }
}

/// `cargo` from the workspace root, with bpf-linker on PATH for the eBPF build.
fn cargo() -> Command {
    let mut path = vec![setup::cargo_bin_dir()];
    path.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(workspace_root()).env(
        "PATH",
        env::join_paths(path).expect("PATH entries contain no ':'"),
    );
    cmd
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

pub fn bin_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("release")
}

fn require_root(why: &str) -> Result<()> {
    if !setup::is_root() {
        bail!("{why}: run it as root (sudo -E cargo xtask ...)");
    }
    Ok(())
}

/// Runs a command with inherited stdio and fails with the command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
