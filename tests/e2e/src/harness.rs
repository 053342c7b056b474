//! Running the real binaries in tests: the demo broker, brokerprobe, and their output.

use std::{
    env,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use prometheus_parse::{Scrape, Value};

/// Where `cargo xtask test` put the release binaries.
pub fn bin(name: &str) -> PathBuf {
    let dir = env::var_os("BROKERPROBE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target"))
                });
            target.join("release")
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run the end-to-end tests through `cargo xtask test`",
        path.display()
    );
    path
}

/// The end-to-end tests attach eBPF programs and uprobes: they need root.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid_is_root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
    assert!(
        uid_is_root,
        "end-to-end tests need root to attach eBPF probes: run `sudo cargo xtask test`"
    );
}

/// Some kernel thread's PID (status says `Kthread: 1`), whatever the PID namespace.
pub fn kernel_thread_pid() -> u32 {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines()
                    .any(|l| l.split_whitespace().eq(["Kthread:", "1"]))
            })
        })
        .expect("a kernel thread visible in /proc")
}

/// A child process whose stdout lines are collected; killed if dropped while running.
pub struct Proc {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub stdout: Vec<String>,
}

impl Proc {
    pub fn spawn(name: &str, command: &mut Command) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
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
        let stdin = child.stdin.take();
        Ok(Self {
            name: name.to_owned(),
            child,
            stdin,
            lines,
            stdout: Vec::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line containing `needle`; returns it.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "{} printed no line with {needle:?} within {timeout:?}",
                        self.name
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!("{} exited ({status}) before printing {needle:?}", self.name)
                }
            }
        }
    }

    /// Writes one line to its standard input.
    pub fn write_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Sends `signal` (a `kill -s` name such as INT or TERM).
    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -s {signal} {} ({}) failed", self.pid(), self.name);
        }
        Ok(())
    }

    /// Interrupts it (SIGINT) and waits for a clean exit; fails with its output otherwise.
    pub fn interrupt(&mut self) -> Result<()> {
        self.signal("INT")?;
        let status = self.wait_exit(Duration::from_secs(30))?;
        if !status.success() {
            bail!("{} exited with {status}: {:#?}", self.name, self.stdout);
        }
        Ok(())
    }

    /// Waits for exit, collecting the rest of stdout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.stdout.extend(self.lines.try_iter());
                // The reader thread may still hold the last lines for a moment.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.stdout.push(line);
                }
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            self.stdout.extend(self.lines.try_iter());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The demo broker with its in-process fake upstream; returns it and its base URL.
pub fn start_demo_broker(extra_args: &[&str]) -> Result<(Proc, String)> {
    start_broker_binary("demo-broker", extra_args)
}

/// [`start_demo_broker`] built with cargo feature `feature` (`cargo xtask test` keeps it
/// as demo-broker-FEATURE).
pub fn start_demo_broker_variant(feature: &str, extra_args: &[&str]) -> Result<(Proc, String)> {
    start_broker_binary(&format!("demo-broker-{feature}"), extra_args)
}

fn start_broker_binary(name: &str, extra_args: &[&str]) -> Result<(Proc, String)> {
    let mut command = Command::new(bin(name));
    command
        .args(["--fake", "--listen", "127.0.0.1:0"])
        .args(extra_args);
    let (broker, addr) = start_listening(name, &mut command)?;
    Ok((broker, format!("http://{addr}")))
}

/// The demo broker's symbol map (docs/modes/symbols.md).
pub fn demo_broker_symbol_map() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../demo-broker/symbol-map.toml"
    ))
}

/// The probe map of the demo broker's USDT variant (docs/modes/usdt.md).
pub fn demo_broker_usdt_map() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../demo-broker/usdt-map.toml"
    ))
}

/// Starts a server that prints `listening on ADDR` once bound; returns it and ADDR.
pub fn start_listening(name: &str, command: &mut Command) -> Result<(Proc, String)> {
    let mut server = Proc::spawn(name, command)?;
    let line = server.wait_for_line("listening on", Duration::from_secs(30))?;
    let addr = line
        .rsplit(' ')
        .next()
        .context("no address in the listening line")?
        .to_owned();
    Ok((server, addr))
}

/// brokerprobe attached to `pid`; returns it and its /metrics URL once attached.
pub fn attach_brokerprobe(pid: u32, extra_args: &[&str]) -> Result<(Proc, String)> {
    attach_brokerprobe_env(pid, extra_args, &[])
}

/// [`attach_brokerprobe`] with environment variables (e.g. OTEL_*) set for it.
pub fn attach_brokerprobe_env(
    pid: u32,
    extra_args: &[&str],
    env: &[(&str, &str)],
) -> Result<(Proc, String)> {
    let mut probe = Proc::spawn(
        "brokerprobe",
        Command::new(bin("brokerprobe"))
            .args([
                "attach",
                "--pid",
                &pid.to_string(),
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(extra_args)
            .envs(env.iter().copied()),
    )?;
    let line = probe.wait_for_line("brokerprobe: attached", Duration::from_secs(60))?;
    let url = line
        .rsplit(' ')
        .next()
        .context("no metrics URL in the attach line")?;
    Ok((probe, url.to_owned()))
}

/// Polls brokerprobe's /metrics until it has counted `expected` requests (or 15 s pass);
/// returns the last exposition text.
pub async fn wait_for_requests(metrics_url: &str, expected: usize) -> anyhow::Result<String> {
    // request_end fires as the body ends, a moment after the client has read it all.
    wait_for_counter(metrics_url, "brokerprobe_requests_total", expected).await
}

/// Polls brokerprobe's /metrics until counter `metric` (summed over its labels) reaches
/// `expected` (or 15 s pass); returns the last exposition text.
pub async fn wait_for_counter(
    metrics_url: &str,
    metric: &str,
    expected: usize,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = reqwest::get(metrics_url)
            .await?
            .error_for_status()?
            .text()
            .await?;
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
        let seen = counter_sum(&scrape, metric);
        if seen >= expected as f64 || Instant::now() > deadline {
            return Ok(text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// brokerprobe's /stats (the report's JSON, docs/report.md), served beside `metrics_url`.
pub async fn stats(metrics_url: &str) -> anyhow::Result<serde_json::Value> {
    let url = metrics_url.replace("/metrics", "/stats");
    Ok(reqwest::get(url).await?.error_for_status()?.json().await?)
}

/// Polls /stats until it has completed `expected` requests (or 30 s pass) and returns it;
/// panics if it then counts any other number.
pub async fn wait_for_completed(metrics_url: &str, expected: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(stats) = stats(metrics_url).await {
            let completed = stats["requests"]["completed"].as_u64().unwrap();
            if completed >= expected as u64 || Instant::now() > deadline {
                assert_eq!(completed, expected as u64, "requests completed per /stats");
                return stats;
            }
        }
        assert!(Instant::now() < deadline, "/stats never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sum of counter `metric` over all its label sets.
pub fn counter_sum(scrape: &Scrape, metric: &str) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .map(|s| match s.value {
            Value::Counter(v) => v,
            ref other => panic!("{metric} is not a counter: {other:?}"),
        })
        .sum()
}

/// The first 5 bytes of each marker function as they are in `pid`'s memory now: the NOP
/// when nothing is attached, a breakpoint or trampoline call while a uprobe is on it.
pub fn marker_entry_bytes(pid: u32) -> Result<Vec<[u8; 5]>> {
    let scan = marker_scan(pid)?;
    scan.markers
        .iter()
        .map(|marker| {
            let mut entry = [0u8; 5];
            read_mapped(pid, marker.file_offset, 'x', &mut entry)
                .with_context(|| format!("reading {:?}", marker.kind))?;
            Ok(entry)
        })
        .collect()
}

/// The broker's marker semaphore as it is in `pid`'s memory now (non-zero: markers on).
pub fn marker_semaphore(pid: u32) -> Result<u16> {
    let semaphore = marker_scan(pid)?
        .semaphore
        .context("the broker has no marker semaphore")?;
    let mut value = [0u8; 2];
    read_mapped(pid, semaphore.counter_offset, 'w', &mut value)?;
    Ok(u16::from_ne_bytes(value))
}

/// The semaphores of the USDT probes the demo broker's probe map names, as they are in
/// `pid`'s memory now (non-zero: the probe fires).
pub fn usdt_semaphores(pid: u32) -> Result<Vec<u16>> {
    let map = probe_userspace::usdt::UsdtMap::load(&demo_broker_usdt_map())?;
    let exe = std::fs::read(format!("/proc/{pid}/exe"))?;
    map.resolve(&exe)?
        .iter()
        .map(|probe| {
            let offset = probe
                .semaphore_offset
                .with_context(|| format!("USDT probe {probe} has no semaphore"))?;
            let mut value = [0u8; 2];
            read_mapped(pid, offset, 'w', &mut value)?;
            Ok(u16::from_ne_bytes(value))
        })
        .collect()
}

fn marker_scan(pid: u32) -> Result<probe_userspace::target::MarkerScan> {
    let scan =
        probe_userspace::target::find_markers(&std::fs::File::open(format!("/proc/{pid}/exe"))?)?;
    if let Some(problem) = &scan.problem {
        bail!("{problem}");
    }
    Ok(scan)
}

/// Reads `pid`'s memory where its executable's `file_offset` is mapped, in the mapping
/// with permission `perm` (`x` code, `w` data) if two share the file page.
fn read_mapped(pid: u32, file_offset: u64, perm: char, buf: &mut [u8]) -> Result<()> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let address = probe_userspace::usdt::mapped_address(pid, &exe, file_offset, perm)?;
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    mem.seek(SeekFrom::Start(address))?;
    mem.read_exact(buf)?;
    Ok(())
}

/// A fresh directory for one test's files, under the system's temp dir.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = env::temp_dir().join(format!("brokerprobe-e2e-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir
}

/// A JSON-lines file (brokerprobe's --requests-out, the demo's ground truth), parsed.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The demo broker's ground truth (`--ground-truth FILE`): its record of each request,
/// by request id.
pub fn ground_truth(path: &Path) -> std::collections::HashMap<u64, serde_json::Value> {
    read_jsonl(path)
        .into_iter()
        .map(|record| (record["request_id"].as_u64().unwrap(), record))
        .collect()
}

/// Resident memory of a process, KiB.
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// The figure right after `label` in brokerprobe's final health line (e.g. `events `).
pub fn health_figure(stdout: &[String], label: &str) -> u64 {
    let health = stdout
        .iter()
        .find(|l| l.starts_with("events "))
        .unwrap_or_else(|| panic!("no health line in {stdout:#?}"));
    health
        .split(label)
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no figure after {label:?} in {health}"))
}

/// Ids of the eBPF programs loaded in the kernel now, whoever loaded them.
pub fn loaded_bpf_programs() -> std::collections::BTreeSet<u32> {
    aya::programs::loaded_programs()
        .map(|info| info.expect("listing loaded eBPF programs").id())
        .collect()
}

/// Open chunk tallies (`CHUNK_TALLIES`, docs/maps.md) of broker `pid` in the maps brokerprobe
/// `probe` holds: its map found through its own file descriptors, so no other loader's
/// map is read.
pub fn chunk_tallies_of(probe: u32, pid: u32) -> Result<usize> {
    use aya::maps::{HashMap, Map, MapData};
    use probe_common::marker::{ChunkTally, TallyKey};
    for entry in std::fs::read_dir(format!("/proc/{probe}/fdinfo"))? {
        let info = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        let Some(id) = info
            .lines()
            .find_map(|line| line.strip_prefix("map_id:"))
            .and_then(|id| id.trim().parse().ok())
        else {
            continue;
        };
        // (A map whose fd closed meanwhile is not the one sought.)
        let Ok(map) = MapData::from_id(id) else {
            continue;
        };
        if map.info()?.name_as_str() != Some("CHUNK_TALLIES") {
            continue;
        }
        let tallies = HashMap::<_, TallyKey, ChunkTally>::try_from(Map::HashMap(map))?;
        let keys: Vec<TallyKey> = tallies.keys().collect::<Result<_, _>>()?;
        return Ok(keys.iter().filter(|key| key.tgid == pid).count());
    }
    bail!("brokerprobe (PID {probe}) holds no CHUNK_TALLIES map")
}
