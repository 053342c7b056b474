//! How many events brokerprobe takes in without loss on one core, and what happens past
//! that: a generator hits a marker at a set rate on one CPU, brokerprobe runs pinned to
//! the other, and every hit is either received or counted as lost.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result};

use super::run::{Service, attached_brokerprobe, cpu_time, rss_kb};

/// Hits per second asked of the generator (the last is more than one core makes).
const RATES: [u64; 5] = [250_000, 500_000, 1_000_000, 2_000_000, 8_000_000];
const SECONDS: &str = "2";

pub struct Step {
    pub asked: u64,
    /// brokerprobe stopped (SIGSTOP) this long mid-step: a consumer far past its limit.
    pub stalled: Option<Duration>,
    /// Hits the generator made, per second.
    pub made: f64,
    pub hits: u64,
    pub received: u64,
    pub lost: u64,
    pub rss_before_kb: u64,
    pub rss_after_kb: u64,
    /// brokerprobe's CPU time while taking the events in (seconds).
    pub cpu_seconds: f64,
}

impl Step {
    /// Every hit received or counted as lost.
    pub fn exact(&self) -> bool {
        self.received + self.lost == self.hits
    }

    /// Events brokerprobe takes in per second of its own CPU: what one core of it would
    /// sustain, whatever the generator could make.
    pub fn per_cpu_second(&self) -> f64 {
        self.received as f64 / self.cpu_seconds
    }
}

/// How long brokerprobe is stopped in the last step.
const STALL: Duration = Duration::from_secs(1);

pub fn run(bins: &Path) -> Result<Vec<Step>> {
    let mut steps: Vec<Step> = RATES
        .iter()
        .map(|rate| step(bins, *rate, None))
        .collect::<Result<_>>()?;
    let fastest = RATES[RATES.len() - 1];
    steps.push(step(bins, fastest, Some(STALL))?);
    Ok(steps)
}

fn step(bins: &Path, rate: u64, stalled: Option<Duration>) -> Result<Step> {
    let mut generator = Service::start(
        "marker_load",
        Command::new("taskset")
            .args(["-c", "1"])
            .arg(bins.join("examples/marker_load"))
            .args(["storm", &rate.to_string(), SECONDS]),
    )?;
    generator.wait_for("ready", Duration::from_secs(10))?;
    let mut brokerprobe = Command::new("taskset");
    brokerprobe.args(["-c", "0"]).arg(bins.join("brokerprobe"));
    let probe = attached_brokerprobe(brokerprobe, generator.pid(), &["--no-sockets"])?;
    let rss_before_kb = rss_kb(probe.pid())?;
    let cpu_before = cpu_time(probe.pid())?;
    generator.go()?;
    if let Some(stall) = stalled {
        std::thread::sleep(Duration::from_millis(300));
        signal(probe.pid(), libc::SIGSTOP)?;
        std::thread::sleep(stall);
        signal(probe.pid(), libc::SIGCONT)?;
    }
    let done = generator.wait_for("hits ", Duration::from_secs(60))?;
    let words: Vec<&str> = done.split_whitespace().collect();
    let hits: u64 = words.get(1).and_then(|w| w.parse().ok()).context("hits")?;
    let seconds: f64 = words
        .get(3)
        .and_then(|w| w.parse().ok())
        .context("seconds")?;
    // Let brokerprobe drain what the ring buffer still holds.
    std::thread::sleep(Duration::from_secs(1));
    let rss_after_kb = rss_kb(probe.pid())?;
    let cpu_seconds = cpu_time(probe.pid())?
        .saturating_sub(cpu_before)
        .as_secs_f64();
    let lines = probe.stop(libc::SIGINT)?;
    let health = lines
        .iter()
        .find(|l| l.starts_with("events "))
        .context("no health line")?;
    let number = |after: &str| -> Result<u64> {
        health
            .split(after)
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no {after:?} in {health}"))
    };
    Ok(Step {
        asked: rate,
        stalled,
        made: hits as f64 / seconds,
        hits,
        received: number("events ")?,
        lost: number("(lost: ")?,
        rss_before_kb,
        rss_after_kb,
        cpu_seconds,
    })
}

fn signal(pid: u32, signal: i32) -> Result<()> {
    // SAFETY: kill has no memory effects; the pid is our own child.
    if unsafe { libc::kill(pid as i32, signal) } != 0 {
        return Err(std::io::Error::last_os_error()).context("signalling brokerprobe");
    }
    Ok(())
}
