//! Prometheus end to end: a real Prometheus server scrapes brokerprobe attached to the demo
//! broker, and PromQL answers agree with the broker's own ground truth; hostile,
//! ever-new model names keep series and memory bounded.

use std::{collections::HashMap, time::Duration};

use e2e::{
    harness::{
        attach_brokerprobe, read_jsonl, require_root, rss_kb, scratch_dir, start_demo_broker,
        wait_for_completed, wait_for_requests,
    },
    load::{self, Mix, Outcome},
    prometheus::{Prometheus, promtool_check},
};
use probe_userspace::export::prometheus::LATENCY_BUCKETS;
use serde_json::Value as Json;

const REQUESTS: usize = 1_500;
const CONCURRENCY: usize = 32;

#[test]
fn real_prometheus_agrees_with_the_ground_truth() {
    require_root();
    let dir = scratch_dir("prometheus");
    let truth_path = dir.join("ground-truth.jsonl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut broker, url) =
        start_demo_broker(&["--ground-truth", truth_path.to_str().unwrap()]).unwrap();
    let mix = Mix::default();
    rt.block_on(load::drive(&url, 100, 16, &mix, 1)).unwrap();
    let (mut probe, metrics_url) = attach_brokerprobe(broker.pid(), &[]).unwrap();
    let prometheus = rt
        .block_on(Prometheus::start(
            scrape_target(&metrics_url),
            &dir.join("prometheus"),
        ))
        .unwrap();

    let sent = rt
        .block_on(load::drive(&url, REQUESTS, CONCURRENCY, &mix, 2))
        .unwrap();
    rt.block_on(wait_for_requests(&metrics_url, sent.len()))
        .unwrap();
    // Prometheus has scraped everything once it counts every request.
    rt.block_on(prometheus.wait_for("sum(brokerprobe_requests_total)", sent.len() as f64))
        .unwrap();

    // What PromQL says, before anything stops.
    let value = |promql: &str| {
        rt.block_on(prometheus.value(promql))
            .unwrap()
            .unwrap_or(0.0)
    };
    let by = |promql: &str, label: &str| -> HashMap<String, f64> {
        rt.block_on(prometheus.query(promql))
            .unwrap()
            .into_iter()
            .map(|(labels, value)| (labels[label].clone(), value))
            .collect()
    };
    let counted = Counted {
        errors: value("sum(brokerprobe_errors_total)"),
        fallbacks: value("sum(brokerprobe_fallbacks_total)"),
        input_tokens: value(r#"sum(gen_ai_client_token_usage_sum{gen_ai_token_type="input"})"#),
        output_tokens: value(r#"sum(gen_ai_client_token_usage_sum{gen_ai_token_type="output"})"#),
        first_tokens: value("sum(gen_ai_server_time_to_first_token_seconds_count)"),
        stage_counts: by(
            "sum by (stage) (brokerprobe_stage_duration_seconds_count)",
            "stage",
        ),
    };
    let quantiles: Vec<(f64, HashMap<String, f64>)> = [0.5, 0.95, 0.99]
        .into_iter()
        .map(|q| {
            let promql = format!(
                "histogram_quantile({q}, sum by (le, stage) \
                 (brokerprobe_stage_duration_seconds_bucket))"
            );
            (q, by(&promql, "stage"))
        })
        .collect();
    probe.interrupt().unwrap();
    broker.signal("TERM").unwrap();
    assert!(broker.wait_exit(Duration::from_secs(30)).unwrap().success());

    let truth = Truth::of(&read_jsonl(&truth_path), &sent);
    assert_eq!(counted.errors, truth.errors as f64, "errors_total");
    assert_eq!(counted.fallbacks, truth.fallbacks as f64, "fallbacks_total");
    assert_eq!(
        counted.input_tokens, truth.input_tokens as f64,
        "input tokens"
    );
    assert_eq!(
        counted.output_tokens, truth.output_tokens as f64,
        "output tokens"
    );
    assert_eq!(
        counted.first_tokens, truth.streamed as f64,
        "time to first token"
    );
    assert!(
        truth.errors > 0 && truth.fallbacks > 0 && truth.streamed > 0,
        "the mix exercised errors, fallbacks and streams"
    );
    let mut compared = 0;
    for (stage, durations) in &truth.stages {
        assert_eq!(
            counted.stage_counts.get(stage).copied(),
            Some(durations.len() as f64),
            "{stage} count"
        );
        for (q, by_stage) in &quantiles {
            let promql = by_stage[stage];
            let exact = nearest_rank(durations, *q);
            let (a, b) = (bucket(promql), bucket(exact));
            assert!(
                a.abs_diff(b) <= 1,
                "{stage} p{}: PromQL {promql} s (bucket {a}) vs ground truth {exact} s \
                 (bucket {b})",
                q * 100.0
            );
            compared += 1;
        }
    }
    println!(
        "prometheus: {} requests, {} errors, {} fallbacks, {} + {} tokens counted as sent; \
         {compared} stage quantiles (p50/p95/p99 of {} stages) within one bucket of the \
         ground truth",
        sent.len(),
        truth.errors,
        truth.fallbacks,
        truth.input_tokens,
        truth.output_tokens,
        truth.stages.len()
    );
}

/// What PromQL counted.
struct Counted {
    errors: f64,
    fallbacks: f64,
    input_tokens: f64,
    output_tokens: f64,
    first_tokens: f64,
    stage_counts: HashMap<String, f64>,
}

/// The broker's own record of the requests sent while attached.
struct Truth {
    errors: usize,
    fallbacks: usize,
    input_tokens: u64,
    output_tokens: u64,
    /// Requests that forwarded at least one stream chunk.
    streamed: usize,
    /// Stage name → durations in seconds.
    stages: HashMap<String, Vec<f64>>,
}

impl Truth {
    fn of(lines: &[Json], sent: &[Outcome]) -> Self {
        let by_id: HashMap<u64, &Json> = lines
            .iter()
            .map(|l| (l["request_id"].as_u64().unwrap(), l))
            .collect();
        let mut truth = Truth {
            errors: 0,
            fallbacks: 0,
            input_tokens: 0,
            output_tokens: 0,
            streamed: 0,
            stages: HashMap::new(),
        };
        for outcome in sent {
            let r = by_id[&outcome.request_id];
            let failed = r["status"].as_u64().unwrap() >= 400 || !r["error_type"].is_null();
            truth.errors += usize::from(failed);
            truth.fallbacks += usize::from(!r["fallback"].is_null());
            truth.input_tokens += r["input_tokens"].as_u64().unwrap();
            truth.output_tokens += r["output_tokens"].as_u64().unwrap();
            truth.streamed += usize::from(r["chunks"].as_u64().unwrap() > 0);
            for stage in r["stages"].as_array().unwrap() {
                let ns = stage["end_ns"].as_u64().unwrap() - stage["begin_ns"].as_u64().unwrap();
                truth
                    .stages
                    .entry(stage["stage"].as_str().unwrap().to_owned())
                    .or_default()
                    .push(ns as f64 / 1e9);
            }
        }
        for durations in truth.stages.values_mut() {
            durations.sort_by(f64::total_cmp);
        }
        truth
    }
}

/// The q-quantile of sorted values by nearest rank: the value histogram_quantile's
/// bucket holds.
fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Index of the latency bucket `seconds` falls in (the last one past every bound).
fn bucket(seconds: f64) -> usize {
    LATENCY_BUCKETS
        .iter()
        .position(|bound| seconds <= *bound)
        .unwrap_or(LATENCY_BUCKETS.len())
}

/// Requests with a model name of their own each, made to be hostile (quotes, newlines,
/// label syntax, cut multi-byte characters): a real Prometheus ingests the exposition
/// and counts every request, the `model` label keeps at most its bound of values, and
/// brokerprobe's memory stops growing.
#[test]
fn hostile_model_names_keep_series_and_memory_bounded() {
    const WARM: usize = 10_000;
    const TOTAL: usize = 100_000;
    const MAX_LABEL_VALUES: usize = 100;
    /// RSS growth allowed from the first WARM requests to all TOTAL. Measured: a one-time
    /// step of about 4 MiB as buffers size up (+4.1 MiB after 100k names, +4.3 MiB after
    /// 250k), then flat.
    const RSS_GROWTH_BOUND_KB: u64 = 6 * 1024;
    require_root();
    let dir = scratch_dir("prometheus-hostile");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (broker, url) = start_demo_broker(&[]).unwrap();
    let (mut probe, metrics_url) = attach_brokerprobe(
        broker.pid(),
        &["--max-label-values", &MAX_LABEL_VALUES.to_string()],
    )
    .unwrap();
    let prometheus = rt
        .block_on(Prometheus::start(
            scrape_target(&metrics_url),
            &dir.join("prometheus"),
        ))
        .unwrap();
    let mix = Mix {
        streaming: 0.0,
        tools: 0.0,
        fallback: 0.0,
        unknown_model: 1.0,
        hostile_model_names: true,
        traceparent: 0.0,
        models: vec!["gpt-fast".into()],
    };
    let drive = |requests, seed| {
        let sent = rt
            .block_on(load::drive(&url, requests, 64, &mix, seed))
            .unwrap();
        assert!(
            sent.iter().all(|o| o.status == 404),
            "unknown models are 404"
        );
    };
    drive(WARM, 1);
    rt.block_on(wait_for_completed(&metrics_url, WARM));
    // Warm also means scraped: encoding the full exposition once sizes its buffers.
    rt.block_on(prometheus.wait_for("sum(brokerprobe_requests_total)", WARM as f64))
        .unwrap();
    let rss_warm = rss_kb(probe.pid());
    drive(TOTAL - WARM, 2);
    let stats = rt.block_on(wait_for_completed(&metrics_url, TOTAL));
    let rss_all = rss_kb(probe.pid());
    let text = rt
        .block_on(async { reqwest::get(&metrics_url).await?.text().await })
        .unwrap();
    rt.block_on(prometheus.wait_for("sum(brokerprobe_requests_total)", TOTAL as f64))
        .unwrap();
    let value = |promql: &str| rt.block_on(prometheus.value(promql)).unwrap();
    let models = value("count(count by (model) (brokerprobe_requests_total))");
    let folded = value(r#"sum(brokerprobe_label_values_folded_total{label="model"})"#);
    let series = value("count({__name__=~\".+\", job=\"brokerprobe\"})");
    probe.interrupt().unwrap();
    drop(broker);

    promtool_check(&text).unwrap();
    assert!(
        text.contains(r#"model="other""#),
        "past the bound, models are `other`"
    );
    assert_eq!(models, Some((MAX_LABEL_VALUES + 1) as f64), "model values");
    assert_eq!(folded, Some((TOTAL - MAX_LABEL_VALUES) as f64));
    let stat_models = stats["models"].as_array().unwrap().len();
    assert_eq!(stat_models, MAX_LABEL_VALUES + 1, "models in /stats");
    let growth = rss_all.saturating_sub(rss_warm);
    println!(
        "prometheus: {TOTAL} hostile model names: Prometheus ingested {} series, {} model \
         values (bound {MAX_LABEL_VALUES} + other); brokerprobe RSS {rss_warm} KiB after \
         {WARM}, {rss_all} KiB after {TOTAL} (+{growth} KiB, bound {RSS_GROWTH_BOUND_KB} \
         KiB)",
        series.unwrap_or(0.0),
        models.unwrap_or(0.0),
    );
    assert!(growth <= RSS_GROWTH_BOUND_KB, "RSS grew {growth} KiB");
}

/// HOST:PORT of a /metrics URL.
fn scrape_target(metrics_url: &str) -> &str {
    metrics_url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
}

/// Issue 9: the alert rules shipped in deploy/ pass `promtool check rules`, and every
/// PromQL expression of the shipped Grafana dashboard evaluates on a real Prometheus
/// scraping brokerprobe, and returns data: a misspelt metric or label would not.
#[test]
fn shipped_dashboard_and_alert_rules_evaluate() {
    require_root();
    let deploy = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy"));
    let rules = deploy.join("prometheus/brokerprobe-rules.yml");
    let check = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let dashboard: Json = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("grafana/brokerprobe-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "{exprs:?}");

    let dir = scratch_dir("dashboard");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (broker, url) = start_demo_broker(&[]).unwrap();
    let (probe, metrics_url) = attach_brokerprobe(broker.pid(), &[]).unwrap();
    let prometheus = rt
        .block_on(Prometheus::start(
            scrape_target(&metrics_url),
            &dir.join("prometheus"),
        ))
        .unwrap();
    let sent = rt
        .block_on(load::drive(&url, 600, 16, &Mix::default(), 3))
        .unwrap();
    rt.block_on(wait_for_requests(&metrics_url, sent.len()))
        .unwrap();
    rt.block_on(prometheus.wait_for("sum(brokerprobe_requests_total)", sent.len() as f64))
        .unwrap();
    // rate() needs two samples of a series in its window: a few more scrapes.
    std::thread::sleep(e2e::prometheus::SCRAPE_INTERVAL * 3);
    for expr in &exprs {
        // Grafana's variables, as Grafana would fill them in.
        let promql = expr
            .replace("$__rate_interval", "1m")
            .replace("$replica", ".*");
        let samples = rt
            .block_on(prometheus.query(&promql))
            .unwrap_or_else(|e| panic!("dashboard expression does not evaluate: {e:#}"));
        assert!(!samples.is_empty(), "no data for {promql}");
    }
    println!(
        "dashboard: {} expressions evaluated, each with data; rules: {}",
        exprs.len(),
        String::from_utf8_lossy(&check.stdout).trim()
    );
    drop((probe, broker));
    let _ = std::fs::remove_dir_all(dir);
}

/// Every `"expr"` string in a Grafana dashboard.
fn collect_exprs(value: &Json, out: &mut Vec<String>) {
    match value {
        Json::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Json::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(value, out),
                }
            }
        }
        Json::Array(items) => items.iter().for_each(|item| collect_exprs(item, out)),
        _ => {}
    }
}
