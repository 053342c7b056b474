//! Marker cost: unattached (ns per call, against an empty call) and attached (ns per hit,
//! our 5-byte-NOP markers against an ordinary function entry).

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result};
use probe_common::marker::{MARKER_SYMBOL_PREFIX, MarkerKind};

use super::run::{Service, attached_brokerprobe, set_semaphore};
use crate::cargo;

/// Calls per case and round with probes attached (each round also fills brokerprobe's
/// ring buffer: kept well under its 8 MiB).
const ATTACHED_CALLS: &str = "20000";

/// Markdown rows `| case | median ns/call | ratio |` for the unattached marker cost, with
/// the markers compiled in and compiled away.
pub fn unattached() -> Result<(String, String)> {
    let example = [
        "run",
        "--release",
        "--quiet",
        "-p",
        "probe-markers",
        "--example",
        "marker_cost",
    ];
    let compiled_in = output(cargo().args(example))?;
    // The same loop with the markers compiled away: what remains is the loop itself.
    let compiled_away = output(cargo().args(example).args(["--features", "disabled"]))?;
    Ok((compiled_in, compiled_away))
}

/// Ns per call of one marker and one plain function, with probes on them.
pub struct Attached {
    pub marker_brokerprobe: f64,
    pub plain_unprobed: f64,
    pub marker_bpftrace: f64,
    pub plain_bpftrace: f64,
    /// Marker events brokerprobe lost while measured (should be 0: the figure holds).
    pub lost: u64,
}

pub fn attached(bins: &Path) -> Result<Attached> {
    let examples = bins.join("examples");
    let start = || {
        let mut load = Service::start(
            "marker_load",
            Command::new(examples.join("marker_load")).args(["hits", ATTACHED_CALLS]),
        )?;
        load.wait_for("ready", Duration::from_secs(10))?;
        anyhow::Ok(load)
    };
    let results = |load: &mut Service| -> Result<(f64, f64)> {
        let value = |line: String| -> Result<f64> {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("marker_load printed {line:?}"))
        };
        let marker = value(load.wait_for("first_byte ", Duration::from_secs(120))?)?;
        let plain = value(load.wait_for("plain_function ", Duration::from_secs(120))?)?;
        Ok((marker, plain))
    };

    // brokerprobe on every marker (the plain function has no probe).
    let mut load = start()?;
    let probe = attached_brokerprobe(
        Command::new(bins.join("brokerprobe")),
        load.pid(),
        &["--no-sockets"],
    )?;
    load.go()?;
    let (marker_brokerprobe, plain_unprobed) = results(&mut load)?;
    let lines = probe.stop(libc::SIGINT)?;
    let lost = lines
        .iter()
        .find_map(|l| l.split("(lost: ").nth(1)?.split(' ').next()?.parse().ok())
        .context("no loss figure in brokerprobe's health line")?;

    // bpftrace counting hits on both: the same uprobe mechanism, the least a probe can do.
    let mut load = start()?;
    set_semaphore(load.pid(), 1)?;
    let pid = load.pid().to_string();
    let marker = MarkerKind::FirstByte.symbol_suffix();
    let script = format!(
        "uprobe:/proc/{pid}/exe:{MARKER_SYMBOL_PREFIX}{marker} {{ @marker = count(); }} \
         uprobe:/proc/{pid}/exe:plain_function {{ @plain = count(); }}"
    );
    let mut bpftrace = Service::start(
        "bpftrace",
        Command::new("bpftrace").args(["-p", &pid, "-e", &script]),
    )?;
    bpftrace.wait_for("Attaching", Duration::from_secs(60))?;
    // bpftrace says "Attaching" before it has; give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    load.go()?;
    let (marker_bpftrace, plain_bpftrace) = results(&mut load)?;
    drop(bpftrace.stop(libc::SIGINT));
    Ok(Attached {
        marker_brokerprobe,
        plain_unprobed,
        marker_bpftrace,
        plain_bpftrace,
        lost,
    })
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        anyhow::bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}
