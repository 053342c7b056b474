//! `cargo xtask setup`: installs what a fresh machine lacks, says what it did, and is
//! idempotent. The recipe and why each step exists: docs/build.md.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::run;

/// Debian packages: the eBPF-capable toolchain (rustc with a prebuilt bpfel core), the
/// real Prometheus/promtool the tests check our exposition with, protoc, which the
/// embedded trace store (otlp-embedded) needs to build, and a C++ compiler for libFuzzer.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "prometheus",
    "protobuf-compiler",
    "g++",
    // The live view's end-to-end test drives it in a tmux pane.
    "tmux",
    // systemd-analyze verifies the shipped unit (deploy/systemd); util-linux's setpriv
    // runs the shipped command lines with only their capabilities.
    "systemd",
    "util-linux",
];

/// cargo-fuzz, which `cargo xtask test` fuzzes with (fuzz/).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Only the benchmarks need these (bpftrace: the least-work uprobe to compare against).
pub const BENCH_APT_PACKAGES: &[&str] = &["bpftrace"];

/// The name under which rustup knows Debian's toolchain; probe-userspace/build.rs uses it.
pub const EBPF_TOOLCHAIN: &str = "debian-bpf";
const BPF_LINKER_VERSION: &str = "0.13.0";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

/// Runs every set-up step; returns quickly when all is in place.
pub fn setup() -> Result<()> {
    setup_with(&[])
}

/// Set-up plus some extra Debian packages (the benchmarks' tools).
pub fn setup_with(extra_packages: &[&'static str]) -> Result<()> {
    let mut done = Vec::new();
    install_apt_packages(extra_packages, &mut done)?;
    link_rustup_toolchain(&mut done)?;
    install_bpf_linker(&mut done)?;
    install_cargo_fuzz(&mut done)?;
    check_kernel()?;
    if done.is_empty() {
        eprintln!("setup: everything already in place");
    } else {
        for step in &done {
            eprintln!("setup: {step}");
        }
    }
    Ok(())
}

/// True when nothing needs installing, so callers can skip the (slower) full setup.
pub fn is_complete() -> bool {
    missing_apt_packages(&[]).is_empty()
        && rustup_has_toolchain().unwrap_or(true)
        && bpf_linker_matches(&debian_llvm_major().unwrap_or_default())
        && cargo_fuzz_installed()
}

fn cargo_fuzz_installed() -> bool {
    Command::new(cargo_bin_dir().join("cargo-fuzz"))
        .arg("--version")
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(CARGO_FUZZ_VERSION)
        })
}

fn install_cargo_fuzz(done: &mut Vec<String>) -> Result<()> {
    if cargo_fuzz_installed() {
        return Ok(());
    }
    eprintln!("setup: building cargo-fuzz {CARGO_FUZZ_VERSION} (1-3 min)");
    let cargo_home = cargo_bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    run(Command::new("cargo")
        .args([
            "install",
            "--locked",
            "--force",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .arg("--root")
        .arg(&cargo_home))?;
    done.push(format!(
        "installed cargo-fuzz {CARGO_FUZZ_VERSION} in {}",
        cargo_bin_dir().display()
    ));
    Ok(())
}

fn missing_apt_packages(extra: &[&'static str]) -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .chain(extra)
        .copied()
        .filter(|pkg| {
            let status = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output();
            !matches!(status, Ok(out) if String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        })
        .collect()
}

fn install_apt_packages(extra: &[&'static str], done: &mut Vec<String>) -> Result<()> {
    let missing = missing_apt_packages(extra);
    if missing.is_empty() {
        return Ok(());
    }
    require_root(&format!("install Debian packages {}", missing.join(" ")))?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        run(&mut cmd)
    };
    apt(&["update", "-q"])?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)?;
    done.push(format!("installed Debian packages: {}", missing.join(" ")));
    Ok(())
}

/// `None` when rustup is absent: then cargo runs Debian's toolchain directly.
fn rustup_has_toolchain() -> Option<bool> {
    let out = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .ok()?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|line| line.starts_with(EBPF_TOOLCHAIN)),
    )
}

fn link_rustup_toolchain(done: &mut Vec<String>) -> Result<()> {
    if rustup_has_toolchain() == Some(false) {
        run(Command::new("rustup").args(["toolchain", "link", EBPF_TOOLCHAIN, "/usr"]))?;
        done.push(format!("linked rustup toolchain {EBPF_TOOLCHAIN} -> /usr"));
    }
    Ok(())
}

/// LLVM major version of Debian's rustc: bpf-linker must be built against the same one.
fn debian_llvm_major() -> Result<String> {
    let out = Command::new(DEBIAN_RUSTC)
        .arg("-vV")
        .output()
        .with_context(|| format!("running {DEBIAN_RUSTC} -vV"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
        .with_context(|| format!("no LLVM version in `{DEBIAN_RUSTC} -vV` output"))
}

pub fn cargo_bin_dir() -> PathBuf {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    home.join("bin")
}

/// Records which LLVM the installed bpf-linker was built for (it does not say itself).
fn bpf_linker_stamp() -> PathBuf {
    cargo_bin_dir().join(".bpf-linker.llvm")
}

fn bpf_linker_matches(llvm_major: &str) -> bool {
    let installed = Command::new(cargo_bin_dir().join("bpf-linker"))
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION));
    let stamp = fs::read_to_string(bpf_linker_stamp()).unwrap_or_default();
    installed && stamp.trim() == llvm_major
}

fn install_bpf_linker(done: &mut Vec<String>) -> Result<()> {
    let llvm = debian_llvm_major()?;
    if bpf_linker_matches(&llvm) {
        return Ok(());
    }
    let libllvm = find_libllvm(&llvm)?;
    // llvm-sys wants a prefix with lib/libLLVM.so; point one at Debian's shared library
    // instead of installing the multi-hundred-MB llvm-NN-dev.
    // Under target/, not a predictable /tmp path another user could prepare for root.
    let prefix = crate::workspace_root().join(format!("target/bpf-linker-llvm-{llvm}"));
    fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (2-6 min)");
    let cargo_home = cargo_bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    run(Command::new("cargo")
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            "--locked",
            "--force",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm}"),
        ])
        .arg("--root")
        .arg(&cargo_home))?;
    fs::write(bpf_linker_stamp(), &llvm)?;
    done.push(format!(
        "installed bpf-linker {BPF_LINKER_VERSION} (LLVM {llvm}) in {}",
        cargo_bin_dir().display()
    ));
    Ok(())
}

fn find_libllvm(major: &str) -> Result<PathBuf> {
    let dir = Path::new("/usr/lib/x86_64-linux-gnu");
    let wanted = format!("libLLVM.so.{major}");
    let mut found: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&wanted))
        })
        .collect();
    found.sort();
    found.pop().with_context(|| {
        format!(
            "{wanted}* not found in {}: is rustc-web installed?",
            dir.display()
        )
    })
}

pub fn check_kernel() -> Result<()> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "this kernel has no BTF (/sys/kernel/btf/vmlinux): brokerprobe needs CONFIG_DEBUG_INFO_BTF"
        );
    }
    mount_tracefs()
}

/// The socket tracepoints are found through tracefs; a minimal VM may not mount it.
fn mount_tracefs() -> Result<()> {
    const TRACEFS: &str = "/sys/kernel/tracing";
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(());
    }
    require_root("mount tracefs")?;
    println!("setup: mounting tracefs at {TRACEFS}");
    let status = Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .status()
        .context("running mount")?;
    if !status.success() {
        bail!("mounting tracefs at {TRACEFS} failed ({status}): the socket probes need it");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("setup needs root to {what}: run it as root (or install them yourself)");
    }
    Ok(())
}
