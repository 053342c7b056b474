//! `cargo xtask demo`: fake upstream + demo broker + mixed load, with brokerprobe attached
//! by PID showing the live per-stage table. Ctrl-C stops everything it started.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::bin_dir;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// Concurrent client requests.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Where brokerprobe serves /metrics and /stats.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_addr: String,
    /// Where brokerprobe serves its in-memory traces with a Jaeger UI.
    #[arg(long, default_value = "127.0.0.1:16686")]
    trace_ui: String,
}

/// Kills the child when the demo ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

pub fn demo(args: &DemoArgs) -> Result<()> {
    let bins = bin_dir();
    let mut broker = Command::new(bins.join("demo-broker"))
        .args(["--fake", "--listen", "127.0.0.1:0"])
        // A small key pool, so keypool.acquire visibly waits at the demo's load.
        .args(["--keys", "2", "--per-key-concurrency", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting demo-broker")?;
    let stdout = broker.stdout.take().expect("stdout is piped");
    let broker = Running(broker);
    let mut stdout = BufReader::new(stdout);
    let mut first = String::new();
    stdout.read_line(&mut first)?;
    // Keep draining so the broker never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let Some(addr) = first.trim().strip_prefix("listening on ") else {
        bail!("demo-broker did not start: {first:?}");
    };
    let url = format!("http://{addr}");
    println!(
        "demo: broker PID {} serving {url} (fake upstream in-process)",
        broker.0.id()
    );

    let mut load = Command::new(bins.join("loadgen"));
    load.args([
        "--url",
        &url,
        "--concurrency",
        &args.concurrency.to_string(),
    ]);
    if let Some(seconds) = args.seconds {
        load.args(["--duration", &format!("{}s", seconds + 2)]);
    } else {
        load.args(["--duration", "24h"]);
    }
    let _load = Running(load.spawn().context("starting loadgen")?);
    // Let the broker warm up (keep-alive pools, key pools) before attaching to it.
    std::thread::sleep(Duration::from_secs(1));

    let mut probe = Command::new(bins.join("brokerprobe"));
    probe.args([
        "attach",
        "--pid",
        &broker.0.id().to_string(),
        "--interval",
        "2s",
    ]);
    probe.args(["--metrics-addr", &args.metrics_addr]);
    probe.args(["--trace-ui", &args.trace_ui]);
    if let Some(seconds) = args.seconds {
        probe.args(["--duration", &format!("{seconds}s")]);
    }
    println!("demo: attaching brokerprobe; Ctrl-C stops the demo");
    // Ctrl-C reaches brokerprobe (same process group), which prints its final table; we
    // only wait for it, then stop the load and the broker.
    ignore_sigint();
    let status = probe.status().context("starting brokerprobe")?;
    if !status.success() {
        bail!("brokerprobe failed: {status}");
    }
    Ok(())
}

fn ignore_sigint() {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: installs a handler that does nothing; handlers (unlike SIG_IGN) are reset
    // in children on exec, so the broker and brokerprobe still get Ctrl-C.
    unsafe { libc::signal(libc::SIGINT, nothing as *const () as libc::sighandler_t) };
}
