//! A deterministic load generator for an OpenAI-compatible broker: given a seed, the same
//! requests (kinds, models, bodies, traceparents) are sent in the same order.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Value, json};
use tokio::time::{Interval, MissedTickBehavior};

/// Which requests to send, as fractions in 0..=1.
#[derive(Clone, Debug)]
pub struct Mix {
    /// Requests with `"stream": true`.
    pub streaming: f64,
    /// Requests offering tools (the demo broker then runs a tool loop).
    pub tools: f64,
    /// Requests for `flaky`, whose upstream fails so the broker falls back.
    pub fallback: f64,
    /// Requests for a model the broker does not serve (404).
    pub unknown_model: f64,
    /// Those unknown models each get a name of their own, made to be hostile: distinct,
    /// often longer than brokerprobe's 64-byte copy, with quotes, backslashes, newlines,
    /// label syntax and multi-byte characters that the cut may split.
    pub hostile_model_names: bool,
    /// Requests carrying a random W3C `traceparent` header.
    pub traceparent: f64,
    /// The models the remaining requests pick from, uniformly.
    pub models: Vec<String>,
}

impl Mix {
    /// Streaming requests for gpt-fast only: no tools, fallbacks, unknown models or
    /// traceparents.
    pub fn streaming_only() -> Self {
        Self {
            streaming: 1.0,
            tools: 0.0,
            fallback: 0.0,
            unknown_model: 0.0,
            hostile_model_names: false,
            traceparent: 0.0,
            models: vec!["gpt-fast".into()],
        }
    }
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            streaming: 0.5,
            tools: 0.2,
            fallback: 0.05,
            unknown_model: 0.05,
            hostile_model_names: false,
            traceparent: 0.5,
            models: vec!["gpt-fast".into(), "claude-slow".into()],
        }
    }
}

/// The model the demo broker falls back from.
pub const FALLBACK_MODEL: &str = "flaky";
/// A model no broker serves.
pub const UNKNOWN_MODEL: &str = "no-such-model";

/// Tools a request may offer: two the demo broker implements and one it only simulates.
const TOOL_NAMES: [&str; 3] = ["get_time", "calculator", "web_search"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// One of [`Mix::models`].
    Model,
    Fallback,
    UnknownModel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    pub streaming: bool,
    pub tools: bool,
    pub target: Target,
}

/// What one request got.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The broker's `x-request-id`.
    pub request_id: u64,
    pub kind: Kind,
    pub model: String,
    pub status: u16,
    /// SSE `data:` events the client received, `[DONE]` excluded.
    pub chunks: u32,
    pub traceparent: Option<String>,
    /// From sending the request to the end of the body.
    pub latency: Duration,
}

/// How hard to push: a request count (None: until `stop`), in-flight cap, start rate.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub total: Option<usize>,
    pub concurrency: usize,
    /// Requests started per second, at most; None starts them as fast as slots free up.
    pub rate: Option<f64>,
}

/// Sends exactly `total` requests to `base_url` (the broker's root URL), at most
/// `concurrency` at a time; outcomes come in the order the requests were planned.
pub async fn drive(
    base_url: &str,
    total: usize,
    concurrency: usize,
    mix: &Mix,
    seed: u64,
) -> anyhow::Result<Vec<Outcome>> {
    let pace = Pace {
        total: Some(total),
        concurrency,
        rate: None,
    };
    drive_paced(base_url, pace, mix, seed, std::future::pending()).await
}

/// Like [`drive`], but paced by `pace` and ending early when `stop` completes (requests
/// in flight then still finish). Fails on the first request that fails at the transport
/// level or comes back without `x-request-id`.
pub async fn drive_paced(
    base_url: &str,
    pace: Pace,
    mix: &Mix,
    seed: u64,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<Vec<Outcome>> {
    if pace.concurrency == 0 {
        bail!("concurrency must be at least 1");
    }
    if mix.models.is_empty() {
        bail!("the mix names no models");
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(pace.concurrency)
        .build()?;
    let url = format!("{}/v1/chat/completions", base_url.trim_end_matches('/'));
    let mut planner = Planner {
        mix,
        rng: SplitMix64(seed),
        seed,
    };
    let mut ticker = pace.rate.map(|rate| {
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker
    });
    let mut stop = std::pin::pin!(stop);
    let mut stopped = false;
    let mut in_flight = FuturesUnordered::new();
    let mut outcomes = Vec::new();
    let mut planned = 0;
    loop {
        let more_to_send = !stopped && pace.total.is_none_or(|total| planned < total);
        if !more_to_send && in_flight.is_empty() {
            break;
        }
        let may_start = more_to_send && in_flight.len() < pace.concurrency;
        tokio::select! {
            () = &mut stop, if more_to_send => stopped = true,
            Some(done) = in_flight.next(), if !in_flight.is_empty() => outcomes.push(done?),
            () = next_tick(&mut ticker), if may_start => {
                let request = planner.plan(planned);
                in_flight.push(send(&client, &url, seed, planned, request));
                planned += 1;
            }
        }
    }
    outcomes.sort_by_key(|(index, _)| *index);
    Ok(outcomes.into_iter().map(|(_, outcome)| outcome).collect())
}

async fn next_tick(ticker: &mut Option<Interval>) {
    if let Some(ticker) = ticker {
        ticker.tick().await;
    }
}

struct PlannedRequest {
    kind: Kind,
    model: String,
    body: Value,
    traceparent: Option<String>,
}

struct Planner<'a> {
    mix: &'a Mix,
    rng: SplitMix64,
    /// Makes names distinct across runs of different seeds.
    seed: u64,
}

impl Planner<'_> {
    fn plan(&mut self, index: usize) -> PlannedRequest {
        let rng = &mut self.rng;
        let roll = rng.unit();
        let (target, model) = if roll < self.mix.unknown_model {
            let model = if self.mix.hostile_model_names {
                hostile_model_name(seed_base(self.seed) + index as u64, rng)
            } else {
                UNKNOWN_MODEL.to_owned()
            };
            (Target::UnknownModel, model)
        } else if roll < self.mix.unknown_model + self.mix.fallback {
            (Target::Fallback, FALLBACK_MODEL.to_owned())
        } else {
            (
                Target::Model,
                self.mix.models[rng.below(self.mix.models.len())].clone(),
            )
        };
        let kind = Kind {
            streaming: rng.chance(self.mix.streaming),
            tools: rng.chance(self.mix.tools),
            target,
        };
        // Prompts of varying length so token counts vary.
        let prompt = format!(
            "Request {index}: {}",
            "please answer briefly ".repeat(1 + rng.below(20))
        );
        let mut body = json!({
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": kind.streaming,
        });
        if kind.tools {
            let skipped = rng.below(TOOL_NAMES.len());
            let tools: Vec<Value> = (0..TOOL_NAMES.len())
                .filter(|&i| i != skipped)
                .map(|i| json!({"type": "function", "function": {"name": TOOL_NAMES[i], "parameters": {"type": "object"}}}))
                .collect();
            body["tools"] = Value::Array(tools);
        }
        let traceparent = rng
            .chance(self.mix.traceparent)
            .then(|| random_traceparent(rng));
        PlannedRequest {
            kind,
            model,
            body,
            traceparent,
        }
    }
}

/// A model name no other request uses (`unique` is), shaped to break careless exporters.
fn hostile_model_name(unique: u64, rng: &mut SplitMix64) -> String {
    const NASTY: [&str; 8] = [
        "\"} 1\nbrokerprobe_requests_total{model=\"",
        "\\",
        "\n# TYPE x counter\n",
        "{le=\"+Inf\"}",
        "\u{202e}\u{0}\u{7f}",
        "ééééé",
        "🦀🦀🦀",
        " \t ",
    ];
    let nasty = NASTY[rng.below(NASTY.len())];
    // Multi-byte characters around byte 64 make the kernel's cut split one.
    let filler = "ü".repeat(rng.below(60));
    format!("m{unique}-{nasty}{filler}")
}

/// A valid W3C traceparent (version 00, sampled) with random non-zero ids.
fn random_traceparent(rng: &mut SplitMix64) -> String {
    let trace_id = (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())).max(1);
    let parent_id = rng.next_u64().max(1);
    format!("00-{trace_id:032x}-{parent_id:016x}-01")
}

/// Client-chosen request ids of one seed's run start here: distinct across runs.
fn seed_base(seed: u64) -> u64 {
    seed.wrapping_mul(1_000_000_000)
}

async fn send(
    client: &reqwest::Client,
    url: &str,
    seed: u64,
    index: usize,
    planned: PlannedRequest,
) -> anyhow::Result<(usize, Outcome)> {
    let PlannedRequest {
        kind,
        model,
        body,
        traceparent,
    } = planned;
    let context = || format!("request #{index} (model {model}, {kind:?})");
    let started = Instant::now();
    // Brokers that pass a client's id on (the test Python broker) echo it; the demo
    // broker answers with its own.
    let client_id = seed_base(seed) + index as u64;
    let mut request = client
        .post(url)
        .header("x-request-id", client_id)
        .json(&body);
    if let Some(traceparent) = &traceparent {
        request = request.header("traceparent", traceparent);
    }
    let response = request.send().await.with_context(context)?;
    let status = response.status().as_u16();
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok()?.parse().ok())
        .with_context(|| format!("{}: no valid x-request-id in the response", context()))?;
    let is_event_stream = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
    let body = response.bytes().await.with_context(context)?;
    let latency = started.elapsed();
    let chunks = if is_event_stream {
        count_data_events(&body)
    } else {
        0
    };
    Ok((
        index,
        Outcome {
            request_id,
            kind,
            model,
            status,
            chunks,
            traceparent,
            latency,
        },
    ))
}

/// `data:` events in an SSE body, `[DONE]` excluded.
fn count_data_events(body: &[u8]) -> u32 {
    let text = String::from_utf8_lossy(body);
    let events = text
        .split("\n\n")
        .filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data:")));
    events.filter(|data| data.trim() != "[DONE]").count() as u32
}

/// splitmix64: tiny, fast and good enough to plan a load deterministically.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, probability: f64) -> bool {
        self.unit() < probability
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize
    }
}

/// Statuses the demo broker must give each kind of request.
pub fn check_statuses(outcomes: &[Outcome]) {
    for o in outcomes {
        let expected = if o.kind.target == Target::UnknownModel {
            404
        } else {
            200
        };
        assert_eq!(
            o.status, expected,
            "request {} ({:?})",
            o.request_id, o.kind
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_deterministic_per_seed() {
        let mix = Mix::default();
        let plan = |seed| {
            let mut planner = Planner {
                mix: &mix,
                rng: SplitMix64(seed),
                seed,
            };
            (0..50)
                .map(|i| planner.plan(i))
                .map(|p| (p.kind, p.body.to_string(), p.traceparent))
                .collect::<Vec<_>>()
        };
        assert_eq!(plan(7), plan(7));
        assert_ne!(plan(7), plan(8));
    }

    #[test]
    fn traceparents_are_well_formed() {
        let mut rng = SplitMix64(1);
        let traceparent = random_traceparent(&mut rng);
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [2, 32, 16, 2]
        );
        assert!(parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        }));
    }

    #[test]
    fn counts_data_events_without_done() {
        let body = b"data: {\"a\":1}\n\n: keep-alive\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n";
        assert_eq!(count_data_events(body), 2);
    }
}
