//! brokerprobe's own cost: CPU and memory while it follows a broker at 100 and 1,000
//! requests per second, its CPU by what it follows (markers, sockets, OTLP export), and
//! how long attaching and `inspect` take on a large binary.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::run::{
    Service, attached_brokerprobe, cpu_time, interleaved, listening, median, rss_kb, trace_store,
};
use crate::{cargo, run, workspace_root};

/// Requests per second of the two measured loads.
pub const RATES: [u64; 2] = [100, 1_000];
const SECONDS: u64 = 10;
/// Symbols of the generated large binary, and code bytes it carries besides (issue 8:
/// `inspect` fast on a 150 MB binary with 160k symbols).
pub const SYMBOLS: usize = 160_000;
const PADDING_BYTES: usize = 150_000_000;

pub struct Load {
    pub rate: u64,
    /// Requests per second the broker served.
    pub served: f64,
    /// brokerprobe's CPU, percent of one core.
    pub cpu_percent: f64,
    pub rss_kb: u64,
}

pub fn loads(bins: &Path) -> Result<Vec<Load>> {
    let fixture = Fixture::start(bins)?;
    let endpoint = fixture.otlp_endpoint();
    RATES
        .iter()
        .map(|rate| fixture.load(*rate, &["--otlp-endpoint", &endpoint]))
        .collect()
}

/// What brokerprobe follows, each adding to the one before.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Following {
    Markers,
    MarkersSockets,
    MarkersSocketsOtlp,
}

impl Following {
    pub const ALL: [Following; 3] = [
        Following::Markers,
        Following::MarkersSockets,
        Following::MarkersSocketsOtlp,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Following::Markers => "markers",
            Following::MarkersSockets => "markers + sockets",
            Following::MarkersSocketsOtlp => "markers + sockets + OTLP export",
        }
    }
}

/// Rounds of [`by_feature`].
pub const FEATURE_ROUNDS: usize = 3;

/// brokerprobe's CPU per request at [`FEATURE_RATE`] by what it follows, interleaved over
/// [`FEATURE_ROUNDS`] rounds: each configuration's per-round figures (µs per request).
pub fn by_feature(bins: &Path) -> Result<Vec<(Following, Vec<f64>)>> {
    let fixture = Fixture::start(bins)?;
    let endpoint = fixture.otlp_endpoint();
    interleaved(
        &Following::ALL,
        FEATURE_ROUNDS,
        "brokerprobe by feature, round",
        Following::describe,
        |following| {
            let extra: &[&str] = match following {
                Following::Markers => &["--no-sockets"],
                Following::MarkersSockets => &[],
                Following::MarkersSocketsOtlp => &["--otlp-endpoint", &endpoint],
            };
            let load = fixture.load(FEATURE_RATE, extra)?;
            Ok(load.cpu_percent / 100.0 * 1e6 / load.served.max(1.0))
        },
    )
}

/// The requests/s of [`by_feature`]: the busier of [`RATES`].
pub const FEATURE_RATE: u64 = RATES[1];

/// A demo broker with its in-process upstream, and a trace receiver.
struct Fixture<'a> {
    bins: &'a Path,
    broker: Service,
    url: String,
    otlp: String,
    _store: Service,
}

impl<'a> Fixture<'a> {
    fn start(bins: &'a Path) -> Result<Self> {
        let (store, otlp) = trace_store(bins)?;
        let (broker, addr) = listening(
            "demo-broker",
            Command::new(bins.join("demo-broker"))
                .args(["--fake", "--listen", "127.0.0.1:0"])
                .args(["--keys", "64", "--per-key-concurrency", "64"]),
        )?;
        Ok(Self {
            bins,
            broker,
            url: format!("http://{addr}"),
            otlp,
            _store: store,
        })
    }

    fn otlp_endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.otlp)
    }

    /// brokerprobe attached with `extra` while the broker serves `rate` requests/s for
    /// [`SECONDS`]: its CPU over the load and its RSS at the end.
    fn load(&self, rate: u64, extra: &[&str]) -> Result<Load> {
        let probe = attached_brokerprobe(
            Command::new(self.bins.join("brokerprobe")),
            self.broker.pid(),
            extra,
        )?;
        let cpu_before = cpu_time(probe.pid())?;
        let out = Command::new(self.bins.join("loadgen"))
            .args(["--url", &self.url, "--rate", &rate.to_string()])
            .args(["--models", "gpt-fast"])
            .args(["--concurrency", "256", "--duration", &format!("{SECONDS}s")])
            .output()?;
        let cpu = cpu_time(probe.pid())?.saturating_sub(cpu_before);
        let rss_kb = rss_kb(probe.pid())?;
        probe.stop(libc::SIGINT)?;
        let summary = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(Load {
            rate,
            served: super::run::field(&summary, "rate").unwrap_or(0.0),
            cpu_percent: cpu.as_secs_f64() * 100.0 / SECONDS as f64,
            rss_kb,
        })
    }
}

pub struct Attach {
    pub symbols: usize,
    pub binary_mb: f64,
    /// Medians over runs: spawn → probes in place, spawn → first event (ms).
    pub attached_ms: f64,
    pub first_event_ms: f64,
    /// `brokerprobe inspect PATH`, start to exit (ms, median).
    pub inspect_ms: f64,
}

/// Builds a broker with [`SYMBOLS`] extra symbols (generated assembly) that hits a marker
/// every millisecond, and times `brokerprobe attach` and `brokerprobe inspect` on it.
pub fn attach(bins: &Path) -> Result<Attach> {
    let binary = big_binary()?;
    let mut broker = Service::start("big-broker", &mut Command::new(&binary))?;
    broker.wait_for("ready", Duration::from_secs(10))?;
    let (mut attached, mut first) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let started = Instant::now();
        let mut probe = attached_brokerprobe(
            Command::new(bins.join("brokerprobe")),
            broker.pid(),
            &["--no-sockets"],
        )?;
        attached.push(started.elapsed().as_secs_f64() * 1e3);
        probe.wait_for("first event", Duration::from_secs(60))?;
        first.push(started.elapsed().as_secs_f64() * 1e3);
        probe.stop(libc::SIGINT)?;
    }
    let mut inspect = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let out = Command::new(bins.join("brokerprobe"))
            .arg("inspect")
            .arg(&binary)
            .output()?;
        inspect.push(started.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ABI v1: 9 of 9"),
            "inspect on the large binary: {out:?}"
        );
    }
    let symbols = symbol_count(&binary)?;
    Ok(Attach {
        symbols,
        binary_mb: fs::metadata(&binary)?.len() as f64 / 1e6,
        attached_ms: median(&mut attached),
        first_event_ms: median(&mut first),
        inspect_ms: median(&mut inspect),
    })
}

fn symbol_count(binary: &Path) -> Result<usize> {
    let out = Command::new("nm").arg(binary).output().context("nm")?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

/// A crate outside the workspace (under target/), built into the shared target dir.
fn big_binary() -> Result<PathBuf> {
    let root = workspace_root();
    let dir = root.join("target/bench-big");
    fs::create_dir_all(dir.join("src"))?;
    fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"big-broker\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\
             publish = false\n\n[dependencies]\nprobe-markers = {{ path = \"{}\" }}\n\n\
             [workspace]\n",
            root.join("probe-markers").display()
        ),
    )?;
    let mut asm = String::from(".text\n");
    for i in 0..SYMBOLS {
        let _ = writeln!(
            asm,
            ".globl big_symbol_{i}\n.type big_symbol_{i},@function\nbig_symbol_{i}:\n ret\n\
             .size big_symbol_{i}, 1"
        );
    }
    // Code a real broker of this size would have: file bytes inspect must not read.
    let _ = writeln!(asm, ".skip {PADDING_BYTES}, 0xcc");
    fs::write(dir.join("src/symbols.s"), asm)?;
    fs::write(
        dir.join("src/main.rs"),
        r#"//! Generated by `cargo xtask bench`: a broker-sized symbol table and a marker hit
//! every millisecond.
use probe_markers::{RequestId, Stage};
core::arch::global_asm!(include_str!("symbols.s"));
unsafe extern "C" {
    fn big_symbol_0();
}
fn main() {
    let id = RequestId::from_raw(1);
    probe_markers::request_begin(id, "m", None);
    probe_markers::provider(id, "p");
    drop(probe_markers::stage(id, Stage::Route));
    probe_markers::first_byte(id);
    probe_markers::chunk(id);
    probe_markers::token_usage(id, 1, 1);
    probe_markers::fallback(id, "a", "b");
    probe_markers::request_end(id, 200, None);
    // SAFETY: a bare `ret`; called so that the linker keeps the symbols' section.
    unsafe { big_symbol_0() };
    println!("ready");
    loop {
        probe_markers::first_byte(id);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
"#,
    )?;
    run(cargo()
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", root.join("target")))?;
    Ok(root.join("target/release/big-broker"))
}
