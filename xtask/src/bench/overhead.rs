//! What profiling costs the broker: the demo broker against a zero-delay upstream, driven
//! by the same load generator, under five set-ups measured in interleaved rounds:
//! A nothing attached; B brokerprobe, markers only; C brokerprobe, markers + sockets +
//! OTLP export; D the broker instrumented in-process (tracing + OpenTelemetry SDK +
//! Prometheus registry; feature `inprocess`); E bpftrace on the same markers, building
//! per-stage histograms.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};
use probe_common::marker::{MARKER_SYMBOL_PREFIX, MarkerKind};

use super::run::{
    Service, attached_brokerprobe, cpu_time, field, interleaved, listening, median_of,
    set_semaphore, spread_of, trace_store,
};

pub const SETUPS: [Setup; 5] = [Setup::A, Setup::B, Setup::C, Setup::D, Setup::E];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    A,
    B,
    C,
    D,
    E,
}

impl Setup {
    pub fn describe(self) -> &'static str {
        match self {
            Setup::A => "A: nothing attached",
            Setup::B => "B: brokerprobe, markers only",
            Setup::C => "C: brokerprobe, markers + sockets + OTLP export",
            Setup::D => "D: in-process tracing + OTel SDK export + Prometheus",
            Setup::E => "E: bpftrace on the markers, per-stage histograms",
        }
    }
}

/// Seconds of each measured load.
pub const SECONDS: u64 = 5;
/// Requests in flight at saturation.
const CONCURRENCY: &str = "32";
pub const ROUNDS: usize = 5;
/// Pause between the saturation load and the fixed-rate one.
const SETTLE: Duration = Duration::from_secs(1);

/// The request mix of the rounds: half streaming, one chunk per stream.
const MIX: [&str; 4] = ["--streaming", "0.5", "--models", "gpt-fast"];
/// Long streams: a model the upstream streams in STREAM_CHUNKS chunks, STREAM_INTERVAL_MS
/// apart, every request streaming, at STREAM_RATE requests per second.
const STREAM_MODEL: &str = "claude-slow";
pub const STREAM_CHUNKS: u32 = 40;
pub const STREAM_INTERVAL_MS: u64 = 1;
pub const STREAM_RATE: u32 = 300;
const STREAM_MIX: [&str; 4] = ["--streaming", "1", "--models", STREAM_MODEL];
/// Set-ups and rounds of the long-stream runs.
pub const STREAM_SETUPS: [Setup; 2] = [Setup::A, Setup::C];
pub const STREAM_ROUNDS: usize = 3;

/// One set-up's medians over the rounds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    /// At saturation: requests per second and broker CPU per request (µs).
    pub rps: f64,
    pub cpu_us: f64,
    /// At a fixed rate (a quarter of A's saturation in a warm-up run): latency
    /// percentiles (µs).
    pub p50_us: f64,
    pub p99_us: f64,
    /// Broker CPU per request (µs) at the fixed rate. At saturation that figure also moves
    /// with how many requests each of the broker's wake-ups serves, which CPU taken by
    /// anything else on the machine (brokerprobe, bpftrace) changes; with cores to spare
    /// it moves less with it.
    pub fixed_cpu_us: f64,
    /// Largest minus smallest p99 and CPU per request over the rounds: what comparisons
    /// of the medians can resolve.
    pub p99_spread_us: f64,
    pub cpu_spread_us: f64,
    pub fixed_cpu_spread_us: f64,
    /// Events brokerprobe received per request (its exit report; B and C only).
    pub events_per_request: f64,
}

pub struct Overhead {
    pub fixed_rate: f64,
    pub figures: Vec<(Setup, Figures)>,
    /// C's eBPF programs, dearest first.
    pub programs: Vec<ProgramCost>,
    /// Long streams, by set-up ([`STREAM_SETUPS`]).
    pub streams: Vec<(Setup, StreamFigures)>,
}

/// One set-up under long streams: medians over [`STREAM_ROUNDS`], with the spread of the
/// broker's CPU per request.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamFigures {
    pub broker_cpu_us: f64,
    pub broker_cpu_spread_us: f64,
    /// brokerprobe's own CPU per request, and the events it received per request (C).
    pub brokerprobe_cpu_us: f64,
    pub events_per_request: f64,
}

/// One of brokerprobe's eBPF programs in set-up C at the fixed rate. Its runs include
/// every process's events that reach it (the load generator's and the upstream's socket
/// reads and writes pass the socket tracepoints too, and stop at the process filter).
pub struct ProgramCost {
    pub name: String,
    pub runs_per_request: f64,
    pub ns_per_run: f64,
    /// Kernel time per request, all processes together.
    pub us_per_request: f64,
}

/// Everything the set-ups share: the upstream, the trace receiver, both brokers.
struct Bench<'a> {
    bins: &'a Path,
    broker: Service,
    broker_url: String,
    inprocess: Service,
    inprocess_url: String,
    otlp_http: String,
    _upstream: Service,
    _store: Service,
}

pub fn run(bins: &Path) -> Result<Overhead> {
    // Zero delay, one chunk; the long-stream model streams STREAM_CHUNKS chunks.
    let upstream_config = std::env::temp_dir().join("brokerprobe-bench-upstream.json");
    std::fs::write(
        &upstream_config,
        format!(
            r#"{{"default": {{"ttfb_ms": 0, "chunks": 1, "chunk_interval_ms": 0}},
               "models": {{"{STREAM_MODEL}": {{"ttfb_ms": 0, "chunks": {STREAM_CHUNKS},
                 "chunk_interval_ms": {STREAM_INTERVAL_MS}}}}}}}"#
        ),
    )
    .context("writing the fake upstream's script")?;
    let (upstream, upstream_addr) = listening(
        "fake-upstream",
        Command::new(bins.join("fake-upstream"))
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(&upstream_config),
    )?;
    let (store, otlp_http) = trace_store(bins)?;
    let upstream_url = format!("http://{upstream_addr}");
    let broker_args = |command: &mut Command| {
        command.args(["--listen", "127.0.0.1:0", "--upstream", &upstream_url]);
        // Keys never hold requests back here: the broker's own work is measured.
        command.args(["--keys", "64", "--per-key-concurrency", "64"]);
    };
    let mut broker = Command::new(bins.join("demo-broker"));
    broker_args(&mut broker);
    let (broker, broker_addr) = listening("demo-broker", &mut broker)?;
    let mut inprocess = Command::new(bins.join("demo-broker-inprocess"));
    broker_args(&mut inprocess);
    inprocess.args(["--inprocess-otlp", &format!("http://{otlp_http}/v1/traces")]);
    let (inprocess, inprocess_addr) = listening("demo-broker (inprocess)", &mut inprocess)?;
    let bench = Bench {
        bins,
        broker,
        broker_url: format!("http://{broker_addr}"),
        inprocess,
        inprocess_url: format!("http://{inprocess_addr}"),
        otlp_http,
        _upstream: upstream,
        _store: store,
    };
    for url in [&bench.broker_url, &bench.inprocess_url] {
        load(
            bins,
            url,
            &MIX,
            &["--duration", "2s", "--concurrency", CONCURRENCY],
        )?;
    }
    // The fixed rate: a quarter of what the bare broker sustains.
    let (bare, _) = bench.saturation(Setup::A)?;
    let fixed_rate = (bare.rps / 4.0).round().max(10.0);

    let figures = interleaved(&SETUPS, ROUNDS, "round", Setup::describe, |setup| {
        bench.measure(setup, fixed_rate)
    })?
    .into_iter()
    .map(|(setup, rounds)| {
        let figures = Figures {
            rps: median_of(&rounds, |f| f.rps),
            cpu_us: median_of(&rounds, |f| f.cpu_us),
            p50_us: median_of(&rounds, |f| f.p50_us),
            p99_us: median_of(&rounds, |f| f.p99_us),
            fixed_cpu_us: median_of(&rounds, |f| f.fixed_cpu_us),
            p99_spread_us: spread_of(&rounds, |f| f.p99_us),
            cpu_spread_us: spread_of(&rounds, |f| f.cpu_us),
            fixed_cpu_spread_us: spread_of(&rounds, |f| f.fixed_cpu_us),
            events_per_request: median_of(&rounds, |f| f.events_per_request),
        };
        (setup, figures)
    })
    .collect();
    eprintln!("bench: C's eBPF programs, BPF run-time statistics on");
    let programs = bench.program_costs(fixed_rate)?;
    let streams = bench.long_streams()?;
    Ok(Overhead {
        fixed_rate,
        figures,
        programs,
        streams,
    })
}

impl Bench<'_> {
    /// One round of one set-up: attach what it needs, load at saturation and at the fixed
    /// rate, detach.
    fn measure(&self, setup: Setup, fixed_rate: f64) -> Result<Figures> {
        let attached = self.attach(setup)?;
        let (mut figures, _) = self.saturation(setup)?;
        // Work the saturation load left behind (D's exporter runs in the broker) is not
        // the fixed rate's.
        std::thread::sleep(SETTLE);
        let (fixed_cpu_us, line) =
            self.broker_cpu_per_request(setup, || self.fixed_rate_load(setup, fixed_rate))?;
        figures.fixed_cpu_us = fixed_cpu_us;
        figures.p50_us = field(&line, "p50_us").unwrap_or(f64::NAN);
        figures.p99_us = field(&line, "p99_us").unwrap_or(f64::NAN);
        figures.events_per_request = f64::NAN;
        if let Some(attached) = attached {
            let lines = attached.stop(libc::SIGINT)?;
            if matches!(setup, Setup::B | Setup::C) {
                figures.events_per_request = events_per_request(&lines)?;
            }
        }
        if setup == Setup::E {
            set_semaphore(self.broker.pid(), 0)?;
        }
        Ok(figures)
    }

    /// Long streams, A and C interleaved: the broker's CPU per request, brokerprobe's, and
    /// the events it received per request.
    fn long_streams(&self) -> Result<Vec<(Setup, StreamFigures)>> {
        let rate = STREAM_RATE.to_string();
        let samples = interleaved(
            &STREAM_SETUPS,
            STREAM_ROUNDS,
            "long streams, round",
            Setup::describe,
            |setup| {
                let attached = self.attach(setup)?;
                let probe_before = attached.as_ref().map(|a| cpu_time(a.pid())).transpose()?;
                let (broker_cpu_us, line) = self.broker_cpu_per_request(setup, || {
                    self.timed_load(setup, &STREAM_MIX, "128", &["--rate", &rate])
                })?;
                let mut figures = StreamFigures {
                    broker_cpu_us,
                    ..StreamFigures::default()
                };
                if let (Some(attached), Some(before)) = (attached, probe_before) {
                    let requests = field(&line, "requests").context("loadgen: no request count")?;
                    let used = cpu_time(attached.pid())?.saturating_sub(before);
                    figures.brokerprobe_cpu_us = used.as_secs_f64() * 1e6 / requests.max(1.0);
                    figures.events_per_request = events_per_request(&attached.stop(libc::SIGINT)?)?;
                }
                Ok(figures)
            },
        )?;
        Ok(samples
            .into_iter()
            .map(|(setup, rounds)| {
                let figures = StreamFigures {
                    broker_cpu_us: median_of(&rounds, |f| f.broker_cpu_us),
                    broker_cpu_spread_us: spread_of(&rounds, |f| f.broker_cpu_us),
                    brokerprobe_cpu_us: median_of(&rounds, |f| f.brokerprobe_cpu_us),
                    events_per_request: median_of(&rounds, |f| f.events_per_request),
                };
                (setup, figures)
            })
            .collect())
    }

    /// Set-up C at the fixed rate, with the kernel's BPF run-time statistics switched on
    /// (a clock read per program run, so not during the rounds above): run count and
    /// time of each program brokerprobe loaded, per request served.
    fn program_costs(&self, fixed_rate: f64) -> Result<Vec<ProgramCost>> {
        let earlier: HashSet<u32> = programs()?.into_keys().collect();
        let attached = self
            .attach(Setup::C)?
            .context("set-up C attaches nothing")?;
        let _stats =
            enable_stats(Stats::RunTime).context("switching BPF run-time statistics on")?;
        let ours = |all: HashMap<u32, (String, u64, Duration)>| {
            all.into_iter()
                .filter(|(id, _)| !earlier.contains(id))
                .collect::<HashMap<_, _>>()
        };
        let before = ours(programs()?);
        let line = self.fixed_rate_load(Setup::C, fixed_rate)?;
        let after = ours(programs()?);
        attached.stop(libc::SIGINT)?;
        let requests = field(&line, "requests").context("loadgen: no request count")?;
        let mut costs: Vec<ProgramCost> = after
            .into_iter()
            .filter_map(|(id, (name, runs, time))| {
                let (_, runs_before, time_before) = before.get(&id)?;
                let runs = runs.saturating_sub(*runs_before);
                let ns = time.saturating_sub(*time_before).as_nanos() as f64;
                (runs > 0).then(|| ProgramCost {
                    name,
                    runs_per_request: runs as f64 / requests.max(1.0),
                    ns_per_run: ns / runs as f64,
                    us_per_request: ns / 1e3 / requests.max(1.0),
                })
            })
            .collect();
        anyhow::ensure!(
            !costs.is_empty(),
            "no brokerprobe program ran during the load"
        );
        costs.sort_by(|a, b| b.us_per_request.total_cmp(&a.us_per_request));
        Ok(costs)
    }

    /// The latency load: `fixed_rate` requests per second for [`SECONDS`]; loadgen's
    /// summary line.
    fn fixed_rate_load(&self, setup: Setup, fixed_rate: f64) -> Result<String> {
        self.timed_load(setup, &MIX, "64", &["--rate", &fixed_rate.to_string()])
    }

    /// [`SECONDS`] of request mix `mix` on the set-up's broker with `concurrency` requests
    /// in flight at most; loadgen's summary line.
    fn timed_load(
        &self,
        setup: Setup,
        mix: &[&str],
        concurrency: &str,
        extra: &[&str],
    ) -> Result<String> {
        let duration = format!("{SECONDS}s");
        let mut args = vec!["--duration", &duration, "--concurrency", concurrency];
        args.extend_from_slice(extra);
        load(self.bins, self.url(setup), mix, &args)
    }

    fn url(&self, setup: Setup) -> &str {
        match setup {
            Setup::D => &self.inprocess_url,
            _ => &self.broker_url,
        }
    }

    fn broker_pid(&self, setup: Setup) -> u32 {
        match setup {
            Setup::D => self.inprocess.pid(),
            _ => self.broker.pid(),
        }
    }

    /// The broker's CPU per request (µs) over `run_load`, and loadgen's summary line.
    fn broker_cpu_per_request(
        &self,
        setup: Setup,
        run_load: impl FnOnce() -> Result<String>,
    ) -> Result<(f64, String)> {
        let pid = self.broker_pid(setup);
        let cpu_before = cpu_time(pid)?;
        let line = run_load()?;
        let cpu = cpu_time(pid)?.saturating_sub(cpu_before);
        let requests = field(&line, "requests").context("loadgen: no request count")?;
        Ok((cpu.as_secs_f64() * 1e6 / requests.max(1.0), line))
    }

    /// Throughput and broker CPU per request at saturation.
    fn saturation(&self, setup: Setup) -> Result<(Figures, String)> {
        let (cpu_us, line) =
            self.broker_cpu_per_request(setup, || self.timed_load(setup, &MIX, CONCURRENCY, &[]))?;
        let figures = Figures {
            rps: field(&line, "rate").context("loadgen: no rate")?,
            cpu_us,
            ..Figures::default()
        };
        Ok((figures, line))
    }

    /// What the set-up attaches to the broker, attached.
    fn attach(&self, setup: Setup) -> Result<Option<Service>> {
        let pid = self.broker.pid();
        let brokerprobe = |extra: &[&str]| {
            attached_brokerprobe(Command::new(self.bins.join("brokerprobe")), pid, extra)
        };
        Ok(match setup {
            Setup::A | Setup::D => None,
            Setup::B => Some(brokerprobe(&["--no-sockets"])?),
            Setup::C => {
                let endpoint = format!("http://{}/v1/traces", self.otlp_http);
                Some(brokerprobe(&[
                    "--otlp-endpoint",
                    &endpoint,
                    "--exchange-idle",
                    "300ms",
                ])?)
            }
            Setup::E => {
                set_semaphore(pid, 1)?;
                let pid = pid.to_string();
                let mut bpftrace = Service::start(
                    "bpftrace",
                    Command::new("bpftrace").args(["-p", &pid, "-e", &bpftrace_script(&pid)]),
                )?;
                bpftrace.wait_for("Attaching", Duration::from_secs(60))?;
                std::thread::sleep(Duration::from_millis(500));
                Some(bpftrace)
            }
        })
    }
}

/// Every eBPF program loaded on the machine: id → (name, run count, run time).
fn programs() -> Result<HashMap<u32, (String, u64, Duration)>> {
    loaded_programs()
        .map(|info| {
            let info = info.context("listing loaded eBPF programs")?;
            let name = info.name_as_str().unwrap_or("?").to_owned();
            Ok((info.id(), (name, info.run_count(), info.run_time())))
        })
        .collect()
}

/// From brokerprobe's health line: `events N (...); requests M complete, ...`.
fn events_per_request(lines: &[String]) -> Result<f64> {
    let health = lines
        .iter()
        .find(|l| l.starts_with("events "))
        .context("brokerprobe printed no health line")?;
    let number = |after: &str| {
        health
            .split(after)
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<f64>().ok())
            .with_context(|| format!("no {after:?} in {health}"))
    };
    Ok(number("events ")? / number("requests ")?.max(1.0))
}

/// The histograms brokerprobe keeps, the bpftrace way, from the markers B hits here (all
/// but `fallback`, which the load never calls): per-stage and per-request durations by
/// model (and provider, status), time to first byte, token counts and chunks per request,
/// keyed by request id while it is open.
fn bpftrace_script(pid: &str) -> String {
    let exe = format!("/proc/{pid}/exe");
    let probe = |marker: MarkerKind| {
        format!(
            "uprobe:{exe}:{MARKER_SYMBOL_PREFIX}{}",
            marker.symbol_suffix()
        )
    };
    [
        format!(
            "{} {{ @begin[arg0] = nsecs; @model[arg0] = str(arg1, arg2); }}",
            probe(MarkerKind::RequestBegin)
        ),
        format!(
            "{} {{ @provider[arg0] = str(arg1, arg2); }}",
            probe(MarkerKind::Provider)
        ),
        format!(
            "{} {{ @stage_begin[arg0, arg1] = nsecs; }}",
            probe(MarkerKind::StageBegin)
        ),
        format!(
            "{} /@stage_begin[arg0, arg1]/ {{ \
             @stage[arg1, @model[arg0]] = hist(nsecs - @stage_begin[arg0, arg1]); \
             delete(@stage_begin[arg0, arg1]); }}",
            probe(MarkerKind::StageEnd)
        ),
        format!(
            "{} /@begin[arg0]/ {{ @ttfb[@model[arg0]] = hist(nsecs - @begin[arg0]); }}",
            probe(MarkerKind::FirstByte)
        ),
        format!("{} {{ @chunks[arg0]++; }}", probe(MarkerKind::Chunk)),
        format!(
            "{} {{ @input_tokens[@model[arg0]] = hist(arg1); \
             @output_tokens[@model[arg0]] = hist(arg2); }}",
            probe(MarkerKind::TokenUsage)
        ),
        format!(
            "{} /@begin[arg0]/ {{ \
             @request[@model[arg0], @provider[arg0], arg1] = hist(nsecs - @begin[arg0]); \
             @chunks_per_request = hist(@chunks[arg0]); delete(@begin[arg0]); \
             delete(@model[arg0]); delete(@provider[arg0]); delete(@chunks[arg0]); }}",
            probe(MarkerKind::RequestEnd)
        ),
    ]
    .join("\n")
}

/// Runs the load generator with request mix `mix` (streaming share and models); returns
/// its summary line.
fn load(bins: &Path, url: &str, mix: &[&str], args: &[&str]) -> Result<String> {
    let out = Command::new(bins.join("loadgen"))
        .args(["--url", url])
        .args(["--tools", "0", "--fallback", "0"])
        .args(["--unknown-model", "0", "--traceparent", "0"])
        .args(mix)
        .args(args)
        .output()
        .context("starting loadgen")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "loadgen failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    text.lines()
        .find(|l| l.starts_with("requests="))
        .map(str::to_owned)
        .context("loadgen printed no summary")
}
