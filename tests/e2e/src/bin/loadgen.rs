//! `loadgen`: drives an OpenAI-compatible broker with a deterministic request mix and
//! prints a one-line summary.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use e2e::load::{self, Mix, Outcome, Pace};
use serde_json::json;

#[derive(Parser)]
#[command(version, about = "Load generator for an OpenAI-compatible LLM broker")]
#[command(group = clap::ArgGroup::new("amount").required(true).args(["total", "duration"]))]
struct Cli {
    /// The broker's root URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// Send exactly this many requests.
    #[arg(long)]
    total: Option<usize>,
    /// Keep sending for this long (e.g. 500ms, 30s, 2m), or until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests started per second at most (default: as fast as slots free up).
    #[arg(long)]
    rate: Option<f64>,
    /// Seed of the request mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fraction of streaming requests.
    #[arg(long, default_value_t = Mix::default().streaming)]
    streaming: f64,
    /// Fraction of requests offering tools.
    #[arg(long, default_value_t = Mix::default().tools)]
    tools: f64,
    /// Fraction of requests for the failing model `flaky` (broker fallback).
    #[arg(long, default_value_t = Mix::default().fallback)]
    fallback: f64,
    /// Fraction of requests for a model the broker does not serve.
    #[arg(long, default_value_t = Mix::default().unknown_model)]
    unknown_model: f64,
    /// Give each unknown-model request a distinct, hostile model name (quotes, newlines,
    /// label syntax, long multi-byte strings): for testing label bounds and escaping.
    #[arg(long)]
    hostile_model_names: bool,
    /// Fraction of requests with a W3C traceparent header.
    #[arg(long, default_value_t = Mix::default().traceparent)]
    traceparent: f64,
    /// Also write one JSON line per request (what the client saw) to this file.
    #[arg(long, value_name = "FILE")]
    outcomes: Option<PathBuf>,
    /// Models the other requests use.
    #[arg(long, value_delimiter = ',', default_value = "gpt-fast,claude-slow")]
    models: Vec<String>,
}

fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("'{text}' does not start with a number"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" | "" => number,
        "m" => number * 60.0,
        _ => bail!("unknown unit '{unit}' in '{text}' (use ms, s or m)"),
    };
    Ok(Duration::from_secs_f64(seconds))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mix = Mix {
        streaming: cli.streaming,
        tools: cli.tools,
        fallback: cli.fallback,
        unknown_model: cli.unknown_model,
        hostile_model_names: cli.hostile_model_names,
        traceparent: cli.traceparent,
        models: cli.models,
    };
    let pace = Pace {
        total: cli.total,
        concurrency: cli.concurrency,
        rate: cli.rate,
    };
    let time_limit = cli.duration;
    let stop = async move {
        let time_up = async {
            match time_limit {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = time_up => {}
        }
    };
    let started = Instant::now();
    let outcomes = load::drive_paced(&cli.url, pace, &mix, cli.seed, stop).await?;
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(path) = &cli.outcomes {
        write_outcomes(path, &outcomes).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut errors_by_status = BTreeMap::new();
    for outcome in outcomes.iter().filter(|outcome| outcome.status >= 400) {
        *errors_by_status.entry(outcome.status).or_insert(0usize) += 1;
    }
    let errors: Vec<String> = errors_by_status
        .iter()
        .map(|(status, count)| format!("{status}={count}"))
        .collect();
    let errors = if errors.is_empty() {
        "none".to_owned()
    } else {
        errors.join(",")
    };
    let requests = outcomes.len();
    let mut latencies: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
    latencies.sort_unstable();
    let micros = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(0, |d| d.as_micros())
    };
    // One line of key=value pairs: `cargo xtask bench` reads it.
    println!(
        "requests={requests} errors_by_status={errors} elapsed={elapsed:.2}s rate={:.1}/s \
         p50_us={} p99_us={}",
        requests as f64 / elapsed,
        micros(0.5),
        micros(0.99)
    );
    Ok(())
}

fn write_outcomes(path: &Path, outcomes: &[Outcome]) -> std::io::Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    for outcome in outcomes {
        let line = json!({
            "request_id": outcome.request_id,
            "model": outcome.model,
            "streaming": outcome.kind.streaming,
            "tools": outcome.kind.tools,
            "target": format!("{:?}", outcome.kind.target),
            "status": outcome.status,
            "chunks": outcome.chunks,
            "traceparent": outcome.traceparent,
            "latency_ms": outcome.latency.as_secs_f64() * 1000.0,
        });
        writeln!(out, "{line}")?;
    }
    out.flush()
}
