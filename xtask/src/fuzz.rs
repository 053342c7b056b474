//! Fuzzing (cargo fuzz, fuzz/) of what brokerprobe reads that others write: ring-buffer
//! records and executables. `cargo xtask test` runs each target for a bounded time from
//! the corpus kept in fuzz/corpus/, which it leaves as it is (new inputs go to target/).

use std::{fs, process::Command, time::Duration};

use anyhow::Result;

use crate::{run, workspace_root};

/// (target, largest input in bytes): a record is at most a few hundred bytes; an
/// executable with markers, ten thousand.
const TARGETS: &[(&str, usize)] = &[("decode_event", 512), ("executable", 65_536)];

/// How long each target runs in `cargo xtask test`.
pub const TEST_TIME: Duration = Duration::from_secs(60);

/// Runs every target for `time`; fails on the first crash (libFuzzer writes the input
/// that caused it under fuzz/artifacts/ and prints how to replay it).
pub fn run_all(cargo: impl Fn() -> Command, time: Duration) -> Result<()> {
    for (target, max_len) in TARGETS {
        let root = workspace_root();
        let found = root.join("target/fuzz-corpus").join(target);
        fs::create_dir_all(&found)?;
        eprintln!("fuzz: {target} for {} s", time.as_secs());
        run(cargo()
            .current_dir(root.join("fuzz"))
            // Shared with the workspace: cargo fuzz builds for an explicit --target, so
            // its instrumented artifacts live apart from the release build's.
            .env("CARGO_TARGET_DIR", root.join("target"))
            // Coverage instrumentation only: without a sanitizer cargo fuzz needs no -Z
            // flag, so Debian's stable rustc builds it (a Rust panic is the crash found).
            .args(["fuzz", "run", "--sanitizer", "none", target])
            .arg(&found)
            .arg(root.join("fuzz/corpus").join(target))
            .args([
                "--",
                &format!("-max_total_time={}", time.as_secs()),
                &format!("-max_len={max_len}"),
                "-print_final_stats=1",
            ]))?;
    }
    Ok(())
}
