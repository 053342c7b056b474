//! Running the benchmark's processes: start, wait for a line, read /proc, stop.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use probe_common::marker::SEMAPHORE_SYMBOL;

/// `brokerprobe attach --pid PID --metrics-addr 127.0.0.1:0 EXTRA...`, once attached;
/// `brokerprobe` runs it (directly, or under `taskset`).
pub fn attached_brokerprobe(mut brokerprobe: Command, pid: u32, extra: &[&str]) -> Result<Service> {
    let pid = pid.to_string();
    let mut probe = Service::start(
        "brokerprobe",
        brokerprobe
            .args(["attach", "--pid", &pid, "--metrics-addr", "127.0.0.1:0"])
            .args(extra),
    )?;
    probe.wait_for("brokerprobe: attached", Duration::from_secs(60))?;
    Ok(probe)
}

/// A child whose stdout lines are collected; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Service {
    pub name: String,
    child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Service {
    pub fn start(name: &str, command: &mut Command) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdin(&mut self) -> &mut ChildStdin {
        self.child.stdin.as_mut().expect("stdin is piped")
    }

    /// Writes a line to its stdin (the benchmark programs wait for one to start).
    pub fn go(&mut self) -> Result<()> {
        writeln!(self.stdin(), "go")?;
        self.stdin().flush()?;
        Ok(())
    }

    /// The next stdout line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("{} printed no {needle:?} within {timeout:?}", self.name)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!(
                        "{} ended before printing {needle:?}: {:?}",
                        self.name,
                        self.seen
                    )
                }
            }
        }
    }

    /// Sends `signal` and waits for the exit; returns every line it printed.
    pub fn stop(mut self, signal: i32) -> Result<Vec<String>> {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("{} did not stop", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(300)) {
            self.seen.push(line);
        }
        Ok(std::mem::take(&mut self.seen))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_millis(200));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts a server that prints `listening on ADDR`; returns it and ADDR.
pub fn listening(name: &str, command: &mut Command) -> Result<(Service, String)> {
    let mut service = Service::start(name, command)?;
    let line = service.wait_for("listening on", Duration::from_secs(30))?;
    let addr = line.rsplit(' ').next().unwrap_or_default().to_owned();
    Ok((service, addr))
}

/// The tests' OTLP receiver, and its OTLP/HTTP address.
pub fn trace_store(bins: &Path) -> Result<(Service, String)> {
    let (store, _) = listening("trace-store", &mut Command::new(bins.join("trace-store")))?;
    let http = store
        .seen
        .iter()
        .find_map(|l| l.strip_prefix("http on "))
        .context("trace-store printed no http address")?
        .to_owned();
    Ok((store, http))
}

/// CPU time a process has used so far (user + system).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    // schedstat: nanoseconds, where /proc/PID/stat counts 10 ms ticks.
    let mut nanos = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may end between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue;
        };
        nanos += stat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .context("malformed schedstat")?;
    }
    Ok(Duration::from_nanos(nanos))
}

/// Resident memory, KiB.
pub fn rss_kb(pid: u32) -> Result<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// `key=value` pairs of a line (loadgen's summary).
pub fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_end_matches(|c: char| !c.is_ascii_digit() && c != '.'))
        .and_then(|v| v.parse().ok())
}

/// The median of some samples.
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Measures every set-up `rounds` times, the order rotated each round (so no set-up
/// always follows the same one); each set-up's samples in round order.
pub fn interleaved<S: Copy, F>(
    setups: &[S],
    rounds: usize,
    label: &str,
    describe: impl Fn(S) -> &'static str,
    mut measure: impl FnMut(S) -> Result<F>,
) -> Result<Vec<(S, Vec<F>)>> {
    let mut samples: Vec<(S, Vec<F>)> = setups.iter().map(|s| (*s, Vec::new())).collect();
    for round in 0..rounds {
        for i in 0..setups.len() {
            let setup = setups[(i + round) % setups.len()];
            eprintln!("bench: {label} {}/{rounds}, {}", round + 1, describe(setup));
            let figures = measure(setup)?;
            samples[(i + round) % setups.len()].1.push(figures);
        }
    }
    Ok(samples)
}

/// Over one set-up's rounds: the median of figure `f`.
pub fn median_of<F>(rounds: &[F], f: fn(&F) -> f64) -> f64 {
    median(&mut rounds.iter().map(f).collect::<Vec<_>>())
}

/// Over one set-up's rounds: the largest minus the smallest of figure `f`.
pub fn spread_of<F>(rounds: &[F], f: fn(&F) -> f64) -> f64 {
    rounds.iter().map(f).fold(f64::MIN, f64::max) - rounds.iter().map(f).fold(f64::MAX, f64::min)
}

/// Switches a broker's markers on (1) or off (0) for a tool that does not know their
/// semaphore (bpftrace): writes [`SEMAPHORE_SYMBOL`] through /proc/PID/mem.
pub fn set_semaphore(pid: u32, value: u16) -> Result<()> {
    use std::io::{Seek as _, SeekFrom};
    let exe = format!("/proc/{pid}/exe");
    let symbols = Command::new("nm").arg(&exe).output().context("nm")?;
    let vaddr = String::from_utf8_lossy(&symbols.stdout)
        .lines()
        .find(|l| l.split(' ').next_back() == Some(SEMAPHORE_SYMBOL))
        .and_then(|l| u64::from_str_radix(l.split(' ').next()?, 16).ok())
        .with_context(|| format!("no {SEMAPHORE_SYMBOL} in {exe}"))?;
    // A PIE's first mapping (file offset 0) is where its address 0 was loaded.
    let path = std::fs::read_link(&exe)?;
    let base = std::fs::read_to_string(format!("/proc/{pid}/maps"))?
        .lines()
        .find(|l| l.ends_with(path.to_str().unwrap_or_default()))
        .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
        .context("executable not mapped")?;
    let mut mem = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))?;
    mem.seek(SeekFrom::Start(base + vaddr))?;
    mem.write_all(&value.to_ne_bytes())?;
    Ok(())
}
