//! The `brokerprobe` command line.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{ArgAction, Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use opentelemetry_sdk::trace::Sampler;
use probe_common::marker::Stage;
mod config_file;

use probe_userspace::{
    export::{
        otlp::{Protocol, Sampling, TracesConfig, env_var},
        prometheus::{MetricsConfig, check_buckets},
        report::ReportFormat,
    },
    inspect, notice,
    run::{self, AttachOptions, Mode, Targets},
    symbols::SymbolMap,
    target::Selector,
    usdt::UsdtMap,
};

#[derive(Parser)]
#[command(
    name = "brokerprobe",
    version,
    about = "Out-of-process eBPF latency profiler for LLM brokers",
    long_about = "Out-of-process eBPF latency profiler for LLM brokers.\n\n\
        Attaches to a running broker by PID (no restart, no recompile) through uprobes on \
        the probe-markers functions it links, and reports how long each stage of every \
        request took: route, keypool.acquire, upstream.chat, tool loops, serialization.\n\n\
        It also follows the broker's TCP sockets with tracepoints: upstream connect time, \
        network time to first byte, full upstream time, bytes and stream chunks, and the \
        inbound requests. A broker without markers, in any language, is profiled from its \
        sockets alone; one with USDT probes, per stage through a probe map (--usdt-map); one \
        with neither, its synchronous stages through a symbol map (--symbol-map).\n\n\
        Needs Linux >= 6.x with BTF, and root; or CAP_BPF + CAP_PERFMON for --mode sockets, \
        plus CAP_SYS_ADMIN for uprobes (markers, USDT, symbols) on kernels since 2025.",
    after_help = "Example:\n  sudo brokerprobe attach --pid $(pgrep -n my-broker) --interval 5s\n  \
        curl -s http://127.0.0.1:9464/metrics | grep brokerprobe_stage\n  \
        sudo brokerprobe attach --pid $(pgrep -n python3) --upstream openai=10.0.0.5:443\n  \
        sudo brokerprobe top --pid $(pgrep -n my-broker)\n\n\
        Exit status: 0 when detached (Ctrl-C, SIGTERM, --duration, q, or the broker exited); \
        1 on an error, said in one line on stderr (nothing was left attached); 2 on a bad \
        command line. Troubleshooting: docs/troubleshooting.md"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More detail on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to a running broker and profile it until Ctrl-C, --duration, or its exit.
    ///
    /// Serves per-stage and per-upstream Prometheus histograms while attached and prints
    /// tables (count, p50, p95, p99, max) on exit. Only whole requests are reported: those
    /// that begin once every probe is attached and end before detaching starts. Requests
    /// in flight at either edge are counted in the final health line, not reported.
    #[command(args_override_self = true)]
    Attach(Box<AttachArgs>),
    /// `attach --tui`: a live terminal view of a running broker (same flags as attach).
    ///
    /// Requests/s, errors and in-flight; per stage p50/p95/p99 with a sparkline of each
    /// second's p99; per model, or per upstream with its network TTFB against the
    /// broker-seen wait; the slowest requests with their stage waterfall and trace id.
    /// Keys: q quit (the report follows), f freeze, g by model/upstream. 80x24 is enough.
    #[command(args_override_self = true)]
    Top(Box<AttachArgs>),
    /// Show what a broker offers to attach to, without attaching: markers and their ABI,
    /// USDT probes, whether symbols are there, functions of known frameworks (axum, hyper,
    /// reqwest, tokio, serde_json) that could delimit stages, and the mode attach would use.
    Inspect(InspectArgs),
}

#[derive(Args)]
struct InspectArgs {
    /// A running broker (its executable as it runs, even if replaced on disk since).
    #[arg(long, short, conflicts_with = "path", required_unless_present = "path")]
    pid: Option<u32>,
    /// A broker's executable.
    path: Option<PathBuf>,
}

impl InspectArgs {
    fn run(self) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let (what, file) = match (self.pid, &self.path) {
            (Some(pid), _) => {
                let target = probe_userspace::target::Target::open(pid)?;
                let file = std::fs::File::open(&target.exe)?;
                let what = format!(
                    "PID {pid} ({}): {}",
                    target.name,
                    target.exe_display.display()
                );
                (what, file)
            }
            (None, Some(path)) => {
                let file = std::fs::File::open(path)
                    .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
                (path.display().to_string(), file)
            }
            (None, None) => unreachable!("clap requires one"),
        };
        // SAFETY: read-only map of an executable; a running one cannot be written
        // (ETXTBSY), and a file changing under an inspect only garbles its report.
        let map = unsafe { memmap2::Mmap::map(&file) }?;
        let inspection = inspect::inspect(&map).map_err(|e| anyhow::anyhow!("{what}: {e:#}"))?;
        println!("{what}\n{inspection}");
        println!("(inspected in {} ms)", started.elapsed().as_millis());
        Ok(())
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    /// Markers and sockets if the broker has usable markers, else sockets only.
    Auto,
    /// Markers (and sockets); fail if the broker has no usable markers.
    Markers,
    /// Sockets only, even if the broker has markers.
    Sockets,
}

#[derive(Args)]
struct AttachArgs {
    /// PID of the broker process; several (comma-separated or repeated) for replicas of one
    /// broker, reported apart (label `replica`) and together. Ends when the last exits.
    #[arg(
        long,
        short,
        value_delimiter = ',',
        required_unless_present = "follow",
        value_name = "PID"
    )]
    pid: Vec<u32>,
    /// Profile every process running this executable (a name, or a path when it has a
    /// `/`), now and whenever one starts: a restarted broker is attached again within a
    /// second, and its series continue. Runs until stopped.
    #[arg(long, value_name = "NAME|PATH", conflicts_with = "pid", value_parser = Selector::parse)]
    follow: Option<Selector>,
    /// Which probes to use: markers give stages, sockets give the network's view.
    #[arg(long, value_enum, default_value = "auto")]
    mode: ModeArg,
    /// Do not follow the broker's sockets (markers only).
    #[arg(long, conflicts_with = "mode")]
    no_sockets: bool,
    /// Time requests from the broker's USDT (SystemTap SDT) probes instead of markers:
    /// FILE (TOML) says which probe is which event and which argument carries the request
    /// id, the model, the status… (docs/modes/usdt.md; `brokerprobe inspect` lists the
    /// probes). Gated probes are switched on while attached.
    #[arg(long, value_name = "FILE", conflicts_with = "mode")]
    usdt_map: Option<PathBuf>,
    /// Time stages of a broker without markers or USDT probes from its functions: FILE
    /// (TOML) maps each stage to the function whose call it is, by demangled name with
    /// `*` wildcards (docs/modes/symbols.md). Only synchronous functions can be timed:
    /// async fn bodies and poll methods are refused.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["mode", "usdt_map"])]
    symbol_map: Option<PathBuf>,
    /// Name an upstream peer in metrics and reports, e.g. openai=10.0.0.5:443 (repeat for
    /// more; a host name is resolved once, at start). Unnamed peers appear as IP:PORT.
    #[arg(long = "upstream", value_name = "NAME=HOST:PORT", value_parser = parse_upstream)]
    upstreams: Vec<Vec<(SocketAddr, String)>>,
    /// An exchange whose response has been quiet this long is over (its connection stays
    /// open for keep-alive, so only the next request or a close would say so).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    exchange_idle: Duration,
    /// Where to serve /metrics (Prometheus) and /stats (JSON quantiles). Loopback by
    /// default; other addresses expose them.
    #[arg(long, default_value = "127.0.0.1:9464", value_name = "ADDR:PORT")]
    metrics_addr: SocketAddr,
    /// Detach after this long (e.g. 30s, 5m); default: until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Print the per-stage table this often while attached (e.g. 2s).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    interval: Option<Duration>,
    /// Show a live terminal view instead of printing (same as `brokerprobe top`): keys q
    /// quit, f freeze, g by model/upstream. Notices and warnings go to its status line.
    #[arg(long, conflicts_with = "interval")]
    tui: bool,
    /// Write every finished request, with its stage timeline, as a JSON line to FILE.
    #[arg(long, value_name = "FILE")]
    requests_out: Option<PathBuf>,
    /// Write every finished socket exchange (upstream call or inbound request) as a JSON
    /// line to FILE.
    #[arg(long, value_name = "FILE")]
    exchanges_out: Option<PathBuf>,
    /// With --symbol-map: write every call of a mapped function as a JSON line to FILE
    /// (process, thread, stage, entry and return times).
    #[arg(long, value_name = "FILE", requires = "symbol_map")]
    stages_out: Option<PathBuf>,
    /// The report written at exit and whenever brokerprobe gets SIGUSR1 (`kill -USR1`):
    /// stage and upstream tables, what was lost or dropped, and the slowest requests with
    /// their stage waterfall and trace id (docs/report.md).
    #[arg(long, value_enum, default_value = "table", value_name = "FORMAT")]
    report: ReportFormat,
    /// Write the report to FILE, replaced whole each time, instead of standard output
    /// (the tables still go to standard output at exit).
    #[arg(long, value_name = "FILE")]
    report_out: Option<PathBuf>,
    /// How many of the slowest requests the report and /stats list (0 to 1000).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(0..=1000), value_name = "N")]
    report_slowest: u16,
    /// Drop (and count) requests whose end marker has not come after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Track at most this many open requests at once; more are counted, not tracked.
    #[arg(long, default_value_t = 100_000)]
    max_open_requests: usize,
    /// Distinct values each of the labels model, provider, stage, tool, error_type,
    /// upstream and path may take; later values are reported as `other` (model names come
    /// from clients: this bounds memory whatever they send).
    #[arg(long, default_value_t = 100)]
    max_label_values: usize,
    /// Bucket bounds in seconds of every duration histogram, comma-separated and
    /// increasing [default: 50µs to 300s, see docs/metrics.md].
    #[arg(long, value_name = "SECONDS,...", value_parser = parse_buckets)]
    latency_buckets: Option<Buckets>,
    /// Bucket bounds of gen_ai_client_token_usage, comma-separated and increasing
    /// [default: 1 to 131072].
    #[arg(long, value_name = "TOKENS,...", value_parser = parse_buckets)]
    token_buckets: Option<Buckets>,
    /// Read settings from FILE (TOML): each key a long flag's name, e.g.
    /// `metrics-addr = "127.0.0.1:9464"`, `pid = [1234, 1235]`, `[trace-keep-stage]`
    /// `"upstream.chat" = "5s"`. Flags given here win over the file's.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    traces: TraceArgs,
}

/// One trace per request (docs/spans.md). Flags override the OTEL_* variables.
#[derive(Args)]
#[command(next_help_heading = "Traces (OpenTelemetry, docs/spans.md)")]
struct TraceArgs {
    /// Export a trace per request over OTLP to URL, e.g. http://HOST:4318 (http/protobuf;
    /// /v1/traces is added to a URL without a path) or http://HOST:4317 (grpc). Default:
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT; neither set
    /// (or OTEL_SDK_DISABLED=true, OTEL_TRACES_EXPORTER=none): no OTLP export.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// OTLP transport [default: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else
    /// OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf].
    #[arg(long, value_name = "PROTOCOL", value_parser = ["http/protobuf", "grpc"])]
    otlp_protocol: Option<String>,
    /// Deadline of one export call, retries included [default:
    /// OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, else OTEL_EXPORTER_OTLP_TIMEOUT (ms), else 10s].
    /// OTEL_EXPORTER_OTLP_HEADERS are sent as well.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    otlp_timeout: Option<Duration>,
    /// service.name of the spans [default: OTEL_SERVICE_NAME, else OTEL_RESOURCE_ATTRIBUTES'
    /// service.name, else the broker's process name]. OTEL_RESOURCE_ATTRIBUTES adds
    /// resource attributes.
    #[arg(long, value_name = "NAME")]
    service_name: Option<String>,
    /// Head sampler, decided per trace id and the caller's sampled flag [default:
    /// OTEL_TRACES_SAMPLER, else parentbased_always_on].
    #[arg(long, value_enum)]
    trace_sampler: Option<SamplerName>,
    /// Ratio (0 to 1) of the traceidratio samplers [default: OTEL_TRACES_SAMPLER_ARG, else 1].
    #[arg(long, value_parser = parse_ratio, value_name = "RATIO")]
    trace_sampler_arg: Option<f64>,
    /// Keep every request at least this slow, whatever the sampler says (0s: off).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    trace_keep_slower_than: Duration,
    /// Keep every request with a STAGE instance at least this slow, whatever the sampler
    /// says, e.g. upstream.chat=5s (repeat for more). STAGE is a name from docs/markers.md
    /// (route, keypool.acquire, upstream.chat, ...) or custom:NAME for a broker's own.
    #[arg(long, value_name = "STAGE=DURATION", value_parser = parse_stage_bound)]
    trace_keep_stage: Vec<(String, Duration)>,
    /// Sample failed requests like the others (by default every failed request is kept).
    #[arg(long)]
    trace_sample_errors: bool,
    /// Traces waiting for export at most; more are dropped (counted in
    /// brokerprobe_trace_spans_dropped_total).
    #[arg(long, default_value_t = 1024, value_name = "TRACES", value_parser = clap::value_parser!(u32).range(1..))]
    trace_queue: u32,
    /// Keep traces in memory (10,000 at most) and serve a Jaeger UI and query API here,
    /// e.g. 127.0.0.1:16686. Loopback unless you say otherwise.
    #[arg(long, value_name = "ADDR:PORT")]
    trace_ui: Option<SocketAddr>,
}

/// OTEL_TRACES_SAMPLER's names.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum SamplerName {
    #[value(name = "always_on")]
    AlwaysOn,
    #[value(name = "always_off")]
    AlwaysOff,
    #[value(name = "traceidratio")]
    TraceIdRatio,
    #[value(name = "parentbased_always_on")]
    ParentBasedAlwaysOn,
    #[value(name = "parentbased_always_off")]
    ParentBasedAlwaysOff,
    #[value(name = "parentbased_traceidratio")]
    ParentBasedTraceIdRatio,
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("{text:?} is not a ratio from 0 to 1")),
    }
}

/// An OTel variable, disabled as the spec says: OTEL_SDK_DISABLED, OTEL_TRACES_EXPORTER=none.
fn otel_traces_disabled() -> bool {
    env_var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env_var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
}

impl TraceArgs {
    /// What to do with traces; None: nothing (no endpoint and no UI). The OTEL_* variables
    /// are read only then, so variables meant for another program cannot stop an attach.
    fn config(
        self,
        exchange_idle: Duration,
        max_names: usize,
    ) -> Result<Option<TracesConfig>, String> {
        let env_endpoint = !otel_traces_disabled()
            && (env_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
                || env_var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some());
        if self.otlp_endpoint.is_none() && !env_endpoint && self.trace_ui.is_none() {
            return Ok(None);
        }
        let protocol = Protocol::resolve(self.otlp_protocol.as_deref())?;
        let endpoint = match &self.otlp_endpoint {
            Some(url) => protocol.endpoint(Some(url)),
            None if env_endpoint => protocol.endpoint(None),
            None => None,
        };
        let sampler = self.trace_sampler.unwrap_or_else(|| {
            let name = env_var("OTEL_TRACES_SAMPLER")
                .unwrap_or_default()
                .to_lowercase();
            if name.is_empty() {
                return SamplerName::ParentBasedAlwaysOn;
            }
            SamplerName::from_str(&name, true).unwrap_or_else(|_| {
                // The spec: an unknown or unsupported sampler falls back, with a warning.
                log::warn!(
                    "OTEL_TRACES_SAMPLER={name} is not supported here: parentbased_always_on"
                );
                SamplerName::ParentBasedAlwaysOn
            })
        });
        let ratio = self.trace_sampler_arg.unwrap_or_else(|| {
            let Some(arg) = env_var("OTEL_TRACES_SAMPLER_ARG") else {
                return 1.0;
            };
            parse_ratio(&arg).unwrap_or_else(|e| {
                log::warn!("OTEL_TRACES_SAMPLER_ARG: {e}: using 1");
                1.0
            })
        });
        let head = match sampler {
            SamplerName::AlwaysOn => Sampler::AlwaysOn,
            SamplerName::AlwaysOff => Sampler::AlwaysOff,
            SamplerName::TraceIdRatio => Sampler::TraceIdRatioBased(ratio),
            SamplerName::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            SamplerName::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            SamplerName::ParentBasedTraceIdRatio => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
            }
        };
        let timeout = self.otlp_timeout.unwrap_or_else(|| {
            env_var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
                .or_else(|| env_var("OTEL_EXPORTER_OTLP_TIMEOUT"))
                .and_then(|ms| ms.trim().parse().ok())
                .map_or(Duration::from_secs(10), Duration::from_millis)
        });
        Ok(Some(TracesConfig {
            endpoint,
            protocol,
            timeout,
            service_name: self.service_name.or_else(|| env_var("OTEL_SERVICE_NAME")),
            sampling: Sampling {
                head,
                keep_errors: !self.trace_sample_errors,
                keep_slower_than: Some(self.trace_keep_slower_than).filter(|d| !d.is_zero()),
                keep_stages_slower_than: self.trace_keep_stage,
            },
            queue: self.trace_queue as usize,
            ui: self.trace_ui,
            // Exchanges end at the connection's next request, its close, or idleness.
            wait_for_sockets: exchange_idle + Duration::from_secs(1),
            max_names,
        }))
    }
}

fn main() -> ExitCode {
    let attach = Cli::command()
        .find_subcommand("attach")
        .cloned()
        .expect("the attach subcommand");
    let args = match config_file::expand(std::env::args_os().collect(), &attach) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("brokerprobe: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(args);
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        (false, _) => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_target(false)
        .target(env_logger::Target::Pipe(Box::new(notice::LogOutput)))
        .init();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = runtime.map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            match cli.command {
                Command::Attach(args) => run::attach((*args).try_into()?).await,
                Command::Top(mut args) => {
                    args.tui = true;
                    run::attach((*args).try_into()?).await
                }
                Command::Inspect(args) => args.run(),
            }
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("brokerprobe: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `STAGE=DURATION`, STAGE a stage name brokerprobe reports (docs/markers.md) or
/// `custom:NAME`.
fn parse_stage_bound(text: &str) -> Result<(String, Duration), String> {
    let (stage, bound) = text
        .split_once('=')
        .ok_or_else(|| format!("expected STAGE=DURATION, got {text:?}"))?;
    let known: Vec<&str> = Stage::ALL
        .iter()
        .filter(|s| **s != Stage::Custom)
        .map(|s| s.name())
        .collect();
    let stage = match stage.strip_prefix("custom:") {
        Some(custom) if !custom.is_empty() => custom.to_owned(),
        _ if known.contains(&stage) => stage.to_owned(),
        _ => {
            return Err(format!(
                "unknown stage {stage:?}: stages are {}, or custom:NAME for a broker's own",
                known.join(", ")
            ));
        }
    };
    let bound = humantime::parse_duration(bound).map_err(|e| format!("{bound:?}: {e}"))?;
    Ok((stage, bound))
}

/// Histogram bucket bounds from the command line.
#[derive(Clone, Debug)]
struct Buckets(Vec<f64>);

fn parse_buckets(text: &str) -> Result<Buckets, String> {
    let bounds = text
        .split(',')
        .map(|bound| {
            bound
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("{bound:?} is not a number"))
        })
        .collect::<Result<Vec<f64>, String>>()?;
    check_buckets(&bounds)?;
    Ok(Buckets(bounds))
}

impl TryFrom<AttachArgs> for AttachOptions {
    type Error = anyhow::Error;

    fn try_from(args: AttachArgs) -> anyhow::Result<Self> {
        if args.tui && args.interval.is_some() {
            anyhow::bail!(
                "--interval prints tables, the live view (--tui, top) shows them: use one"
            );
        }
        let defaults = MetricsConfig::default();
        let traces = args
            .traces
            .config(args.exchange_idle, args.max_label_values)
            .map_err(anyhow::Error::msg)?;
        Ok(AttachOptions {
            targets: match args.follow {
                Some(selector) => Targets::Follow(selector),
                None => Targets::Pids(args.pid),
            },
            mode: match args.mode {
                ModeArg::Auto => Mode::Auto,
                ModeArg::Markers => Mode::Markers,
                ModeArg::Sockets => Mode::Sockets,
            },
            sockets: !args.no_sockets,
            usdt: args.usdt_map.as_deref().map(UsdtMap::load).transpose()?,
            symbols: args
                .symbol_map
                .as_deref()
                .map(SymbolMap::load)
                .transpose()?,
            upstream_names: args.upstreams.into_iter().flatten().collect(),
            exchange_idle: args.exchange_idle,
            exchanges_out: args.exchanges_out,
            stages_out: args.stages_out,
            metrics_addr: args.metrics_addr,
            duration: args.duration,
            live_interval: args.interval,
            requests_out: args.requests_out,
            request_timeout: args.request_timeout,
            max_open_requests: args.max_open_requests,
            metrics: MetricsConfig {
                latency_buckets: args
                    .latency_buckets
                    .map_or(defaults.latency_buckets, |b| b.0),
                token_buckets: args.token_buckets.map_or(defaults.token_buckets, |b| b.0),
                max_label_values: args.max_label_values,
            },
            traces,
            report: args.report,
            report_out: args.report_out,
            report_slowest: args.report_slowest.into(),
            live_view: args.tui,
        })
    }
}

/// `NAME=HOST:PORT` → every address HOST:PORT resolves to, named NAME.
fn parse_upstream(text: &str) -> Result<Vec<(SocketAddr, String)>, String> {
    use std::net::ToSocketAddrs as _;
    let (name, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=HOST:PORT, got {text:?}"))?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "upstream name {name:?}: use printable ASCII without spaces"
        ));
    }
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{addr} resolves to no address"));
    }
    Ok(addrs.into_iter().map(|a| (a, name.to_owned())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What serves data binds loopback unless told otherwise: /metrics by default, the
    /// trace UI only where it is told.
    #[test]
    fn endpoints_bind_loopback_by_default() {
        let cli = Cli::try_parse_from(["brokerprobe", "attach", "--pid", "1"]).unwrap();
        let Command::Attach(args) = cli.command else {
            panic!("attach expected");
        };
        assert!(args.metrics_addr.ip().is_loopback());
        assert!(args.traces.trace_ui.is_none());
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
