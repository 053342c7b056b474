//! `cargo xtask bench`: runs the benchmarks and writes BENCHMARKS.md from what it measured.

use std::{fmt::Write as _, fs, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, workspace_root};

pub fn bench() -> Result<()> {
    let example = [
        "run",
        "--release",
        "--quiet",
        "-p",
        "probe-markers",
        "--example",
        "marker_cost",
    ];
    let marker_rows = output(cargo().args(example))?;
    // The same loop with the markers compiled away: what remains is the loop itself.
    let disabled_rows = output(cargo().args(example).args(["--features", "disabled"]))?;
    let mut doc = String::from(
        "# Benchmarks\n\nWritten by `cargo xtask bench`; every figure below was measured by that run.\n\n",
    );
    let _ = writeln!(
        doc,
        "- date: {}",
        output(Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC"))?.trim()
    );
    let _ = writeln!(
        doc,
        "- kernel: {}",
        output(Command::new("uname").arg("-r"))?.trim()
    );
    let _ = writeln!(
        doc,
        "- CPU: {} ({} cores)",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    doc.push_str(
        "\n## Marker cost, nobody attached\n\n\
         Method: one process calls each case 20 M times per round, cases interleaved, 7 rounds;\n\
         the median ns per call is shown, and its ratio to an empty non-inlined function call\n\
         (the floor for any call). Absolute ns drift on this shared machine; the ratios are\n\
         taken side by side. Command: `cargo run --release -p probe-markers --example marker_cost`.\n\n\
         | case | median ns/call | ratio to baseline |\n|---|---|---|\n",
    );
    doc.push_str(&marker_rows);
    doc.push_str(
        "\nThe same run with `--features disabled` (marker calls compiled away), so the loop's own\n\
         cost per iteration can be told apart from the calls:\n\n\
         | case | median ns/call | ratio to baseline |\n|---|---|---|\n",
    );
    doc.push_str(&disabled_rows);
    fs::write(workspace_root().join("BENCHMARKS.md"), &doc)?;
    print!("{doc}");
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split(':').nth(1))
        })
        .map_or_else(|| "unknown".to_owned(), |m| m.trim().to_owned())
}
