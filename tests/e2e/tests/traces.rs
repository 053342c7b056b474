//! Traces end to end: brokerprobe attached to the demo broker exports one trace per request
//! to a real OTLP receiver (otlp-embedded, behind OTLP/HTTP and OTLP/gRPC), read back
//! through Jaeger's query API and compared with the broker's own ground truth.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use e2e::{
    harness::{
        attach_brokerprobe, attach_brokerprobe_env, counter_sum, ground_truth, require_root,
        rss_kb, scratch_dir, start_demo_broker, wait_for_requests,
    },
    load::{self, Mix, Outcome},
    trace_store::{TraceStore, tag},
};
use prometheus_parse::Scrape;
use serde_json::Value as Json;

/// Span durations against the broker's own clock, at p99 (µs).
const MAX_P99_DIFF_US: u64 = 50;

/// Gzipped, as some collectors want it (OTEL_EXPORTER_OTLP_COMPRESSION).
#[test]
fn traces_match_the_ground_truth_over_http_protobuf() {
    require_root();
    check_traces(
        "http/protobuf",
        &[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")],
    );
}

#[test]
fn traces_match_the_ground_truth_over_grpc() {
    require_root();
    check_traces("grpc", &[]);
}

fn check_traces(protocol: &str, env: &[(&str, &str)]) {
    let dir = scratch_dir(&format!("traces-{}", protocol.replace('/', "-")));
    let truth_path = dir.join("ground-truth.jsonl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = TraceStore::start(None).unwrap();
    let (mut broker, url) =
        start_demo_broker(&["--ground-truth", truth_path.to_str().unwrap()]).unwrap();
    let mix = Mix::default();
    rt.block_on(load::drive(&url, 100, 16, &mix, 1)).unwrap();
    let mut args = store.endpoint_args(protocol);
    args.extend(["--trace-sampler", "always_on", "--exchange-idle", "300ms"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut probe, metrics_url) = attach_brokerprobe_env(broker.pid(), &args, env).unwrap();
    let sent = rt.block_on(load::drive(&url, 600, 16, &mix, 2)).unwrap();
    rt.block_on(wait_for_requests(&metrics_url, sent.len()))
        .unwrap();
    // Ctrl-C flushes what is queued.
    probe.interrupt().unwrap();
    broker.signal("TERM").unwrap();
    assert!(broker.wait_exit(Duration::from_secs(30)).unwrap().success());
    let truth = ground_truth(&truth_path);

    let traces = rt.block_on(collect_traces(&store, &sent)).unwrap();
    let mut diffs_us = Vec::new();
    let mut spans = 0;
    for outcome in &sent {
        let trace = traces
            .get(&outcome.request_id)
            .unwrap_or_else(|| panic!("no trace for request {}", outcome.request_id));
        let truth = &truth[&outcome.request_id];
        spans += trace["spans"].as_array().unwrap().len();
        diffs_us.extend(check_trace(trace, truth, outcome));
    }
    diffs_us.sort_unstable();
    let p99 = diffs_us[(diffs_us.len() - 1) * 99 / 100];
    let continued = sent.iter().filter(|o| o.traceparent.is_some()).count();
    println!(
        "traces ({protocol}): {} requests, {} traces, {spans} spans; {continued} continue the \
         caller's trace; |span - broker| duration: p50 {} µs, p99 {p99} µs, max {} µs",
        sent.len(),
        traces.len(),
        diffs_us[diffs_us.len() / 2],
        diffs_us[diffs_us.len() - 1],
    );
    assert_eq!(traces.len(), sent.len(), "one trace per request");
    assert!(continued > 50, "too few traceparents");
    assert!(p99 <= MAX_P99_DIFF_US, "span durations differ too much");
}

/// Each request's trace, by the request id its root carries: complete traces from the
/// listing, the ones continuing a caller's trace by their id.
async fn collect_traces(
    store: &TraceStore,
    sent: &[Outcome],
) -> anyhow::Result<HashMap<u64, Json>> {
    let mut by_request = HashMap::new();
    let mut take = |trace: Json| {
        let root = trace["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["operationName"] == "POST /v1/chat/completions")
            .cloned()
            .expect("a root span");
        let id = tag(&root, "brokerprobe.request_id")
            .unwrap()
            .as_u64()
            .unwrap();
        assert!(
            by_request.insert(id, trace).is_none(),
            "two traces for request {id}"
        );
    };
    for trace in store.traces("demo-broker").await? {
        take(trace);
    }
    for outcome in sent {
        if let Some(traceparent) = &outcome.traceparent {
            let trace_id = traceparent.split('-').nth(1).unwrap();
            if let Some(trace) = store.trace(trace_id).await? {
                take(trace);
            }
        }
    }
    Ok(by_request)
}

/// One trace against the request's ground truth; returns |span - broker| durations (µs).
fn check_trace(trace: &Json, truth: &Json, outcome: &Outcome) -> Vec<u64> {
    let id = outcome.request_id;
    let spans = trace["spans"].as_array().unwrap();
    let ids: HashSet<&str> = spans
        .iter()
        .map(|s| s["spanID"].as_str().unwrap())
        .collect();
    let parent = |span: &Json| -> Option<String> {
        span["references"]
            .as_array()
            .and_then(|r| r.first())
            .map(|r| r["spanID"].as_str().unwrap().to_owned())
    };
    let (roots, children): (Vec<&Json>, Vec<&Json>) = spans
        .iter()
        .partition(|s| parent(s).is_none_or(|p| !ids.contains(p.as_str())));
    assert_eq!(roots.len(), 1, "request {id}: one root: {trace}");
    let root = roots[0];
    assert_eq!(root["operationName"], "POST /v1/chat/completions");
    // The caller's trace continues: same trace id, the root's parent is the caller's span.
    match &outcome.traceparent {
        Some(traceparent) => {
            let parts: Vec<&str> = traceparent.split('-').collect();
            assert_eq!(root["traceID"], parts[1], "request {id}");
            assert_eq!(parent(root).as_deref(), Some(parts[2]), "request {id}");
        }
        None => assert_eq!(parent(root), None, "request {id}"),
    }
    let status = truth["status"].as_u64().unwrap();
    assert_eq!(
        tag(root, "http.response.status_code").and_then(Json::as_u64),
        Some(status)
    );
    let failed = status >= 400 || !truth["error_type"].is_null();
    assert_eq!(tag(root, "error.type").is_some(), failed, "request {id}");

    // Stage spans, in time order, against the broker's stages.
    let mut children: Vec<&Json> = children;
    children.sort_by_key(|s| {
        (
            s["startTime"].as_u64().unwrap(),
            std::cmp::Reverse(s["duration"].as_u64().unwrap()),
        )
    });
    let mut stages: Vec<&Json> = truth["stages"].as_array().unwrap().iter().collect();
    stages.sort_by_key(|s| {
        (
            s["begin_ns"].as_u64().unwrap(),
            std::cmp::Reverse(s["end_ns"].as_u64().unwrap()),
        )
    });
    let names: Vec<&str> = children
        .iter()
        .map(|s| s["operationName"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = stages
        .iter()
        .map(
            |s| match (s["stage"].as_str().unwrap(), s["name"].as_str()) {
                ("upstream.chat" | "upstream.chat_stream", _) => "chat ".to_owned(),
                ("tool.execute", Some(tool)) => format!("execute_tool {tool}"),
                (stage, _) => stage.to_owned(),
            },
        )
        .collect();
    assert_eq!(
        names.len(),
        expected.len(),
        "request {id}: {names:?} vs {expected:?}"
    );
    let mut diffs = vec![];
    for ((span, stage), want) in children.iter().zip(&stages).zip(&expected) {
        let name = span["operationName"].as_str().unwrap();
        assert!(
            name.starts_with(want.as_str()),
            "request {id}: {name} vs {want}"
        );
        if want == "chat " {
            check_upstream_span(span, truth, id);
        }
        let truth_ns = stage["end_ns"].as_u64().unwrap() - stage["begin_ns"].as_u64().unwrap();
        diffs.push(
            span["duration"]
                .as_u64()
                .unwrap()
                .abs_diff(truth_ns / 1_000),
        );
    }
    let request_ns = truth["end_ns"].as_u64().unwrap() - truth["begin_ns"].as_u64().unwrap();
    diffs.push(
        root["duration"]
            .as_u64()
            .unwrap()
            .abs_diff(request_ns / 1_000),
    );
    diffs
}

/// A CLIENT span `chat {model}`: GenAI attributes and what the sockets measured.
fn check_upstream_span(span: &Json, truth: &Json, id: u64) {
    let model = tag(span, "gen_ai.request.model")
        .and_then(Json::as_str)
        .unwrap();
    assert_eq!(
        span["operationName"],
        format!("chat {model}"),
        "request {id}"
    );
    assert_eq!(
        tag(span, "gen_ai.operation.name"),
        Some(&Json::from("chat"))
    );
    assert_eq!(
        tag(span, "gen_ai.provider.name"),
        Some(&truth["provider"]),
        "request {id}"
    );
    for key in [
        "server.address",
        "server.port",
        "brokerprobe.upstream.network_ttfb",
        "brokerprobe.upstream.request_bytes",
        "brokerprobe.upstream.response_bytes",
    ] {
        assert!(
            tag(span, key).is_some(),
            "request {id}: {key} missing on {span}"
        );
    }
}

/// Ratio sampling at 0.1 keeps about a tenth of the requests, and every failed one
/// (configured through the OTEL_* variables).
#[test]
fn ratio_sampling_keeps_a_tenth_and_every_error() {
    require_root();
    const REQUESTS: usize = 5_000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = TraceStore::start(None).unwrap();
    let (broker, url) = start_demo_broker(&[]).unwrap();
    // Configured the OpenTelemetry way: the general endpoint gets /v1/traces added.
    let endpoint = format!("http://{}", store.http);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_TRACES_SAMPLER", "traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
        ("OTEL_SERVICE_NAME", "sampled-broker"),
    ];
    let args = ["--trace-keep-slower-than", "0s", "--exchange-idle", "300ms"];
    let (mut probe, metrics_url) = attach_brokerprobe_env(broker.pid(), &args, &env).unwrap();
    let mix = Mix {
        streaming: 0.3,
        tools: 0.0,
        fallback: 0.0,
        unknown_model: 0.05,
        hostile_model_names: false,
        traceparent: 0.0,
        models: vec!["gpt-fast".into()],
    };
    let sent = rt
        .block_on(load::drive(&url, REQUESTS, 64, &mix, 3))
        .unwrap();
    rt.block_on(wait_for_requests(&metrics_url, sent.len()))
        .unwrap();
    probe.interrupt().unwrap();
    drop(broker);
    let traces = rt.block_on(store.traces("sampled-broker")).unwrap();
    let kept: HashSet<u64> = traces
        .iter()
        .filter_map(|t| {
            t["spans"]
                .as_array()?
                .iter()
                .find_map(|s| tag(s, "brokerprobe.request_id")?.as_u64())
        })
        .collect();
    let (failed, ok): (Vec<&Outcome>, Vec<&Outcome>) = sent.iter().partition(|o| o.status >= 400);
    let kept_ok = ok.iter().filter(|o| kept.contains(&o.request_id)).count();
    let share = kept_ok as f64 / ok.len() as f64;
    println!(
        "traces (ratio 0.1): {} of {} successful requests kept ({:.1}%), {} failed ones all \
         kept: {}",
        kept_ok,
        ok.len(),
        share * 100.0,
        failed.len(),
        failed.iter().all(|o| kept.contains(&o.request_id))
    );
    assert!(!failed.is_empty());
    assert!(
        failed.iter().all(|o| kept.contains(&o.request_id)),
        "a failed request was sampled out"
    );
    assert!((0.08..=0.12).contains(&share), "kept {share}");
}

/// The OTLP receiver goes away mid-run: metrics keep flowing, the lost spans are counted,
/// memory stays bounded; when it comes back, export resumes.
#[test]
fn a_receiver_outage_costs_traces_only() {
    require_root();
    /// brokerprobe's RSS may grow this much while the receiver is down (the trace queue
    /// holds up to --trace-queue traces).
    const RSS_GROWTH_BOUND_KB: u64 = 16 * 1024;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = TraceStore::start(None).unwrap();
    let http = store.http.clone();
    let (broker, url) = start_demo_broker(&[]).unwrap();
    let mut args = store.endpoint_args("http/protobuf");
    args.extend(["--exchange-idle", "300ms", "--otlp-timeout", "1s"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut probe, metrics_url) = attach_brokerprobe(broker.pid(), &args).unwrap();
    let mix = Mix {
        traceparent: 0.0,
        ..Mix::default()
    };
    let mut sent = 0;
    let mut drive = |requests: usize, seed| {
        sent += rt
            .block_on(load::drive(&url, requests, 32, &mix, seed))
            .unwrap()
            .len();
        rt.block_on(wait_for_requests(&metrics_url, sent)).unwrap();
    };
    let traces = |store: &TraceStore| rt.block_on(store.traces("demo-broker")).unwrap().len();
    let failed_exports = || -> (f64, f64) {
        let text = rt
            .block_on(async { reqwest::get(&metrics_url).await?.text().await })
            .unwrap();
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        let failed = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "brokerprobe_trace_spans_dropped_total")
            .filter(|s| s.labels.get("reason") == Some("otlp_export_failed"))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) => v,
                _ => 0.0,
            })
            .sum();
        (counter_sum(&scrape, "brokerprobe_requests_total"), failed)
    };

    drive(300, 1);
    // The last traces wait for their sockets (--exchange-idle + 1 s at most).
    let before = eventually(|| Some(traces(&store)).filter(|n| *n >= 300)).unwrap_or(0);
    let rss_before = rss_kb(probe.pid());
    drop(store); // killed
    drive(2_000, 2);
    // Metrics keep flowing, and the lost spans show there (health figures are refreshed
    // every second).
    let (requests, lost) =
        eventually(|| Some(failed_exports()).filter(|(_, lost)| *lost > 0.0)).unwrap_or_default();
    let rss_during = rss_kb(probe.pid());

    let store = TraceStore::start(Some(&http)).unwrap();
    drive(300, 3);
    let after = eventually(|| Some(traces(&store)).filter(|n| *n >= 300)).unwrap_or(0);
    probe.interrupt().unwrap();
    drop(broker);
    let growth = rss_during.saturating_sub(rss_before);
    println!(
        "traces (receiver down): {before} traces before, {lost} spans lost (counted) while \
         down, {after} traces after it came back; RSS {rss_before} KiB before, {rss_during} KiB \
         while down (+{growth} KiB, bound {RSS_GROWTH_BOUND_KB} KiB)"
    );
    assert_eq!(
        requests, 2_300.0,
        "requests counted while the receiver was down"
    );
    assert!(before >= 300, "{before} traces before the outage");
    assert!(
        lost > 0.0,
        "no spans counted as lost while the receiver was down"
    );
    assert!(after >= 300, "export did not resume: {after} traces after");
    assert!(growth <= RSS_GROWTH_BOUND_KB, "RSS grew {growth} KiB");
}

/// `--trace-ui`: traces kept in brokerprobe's memory, served with Jaeger's query API.
#[test]
fn the_embedded_trace_ui_serves_the_jaeger_api() {
    require_root();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (broker, url) = start_demo_broker(&[]).unwrap();
    let args = ["--trace-ui", "127.0.0.1:0", "--exchange-idle", "300ms"];
    let (mut probe, metrics_url) = attach_brokerprobe(broker.pid(), &args).unwrap();
    let ui = probe
        .stdout
        .iter()
        .find_map(|l| l.split("the trace UI on ").nth(1))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches('/')
                .to_owned()
        })
        .unwrap_or_else(|| panic!("no trace UI address: {:?}", probe.stdout));
    let mix = Mix {
        traceparent: 0.0,
        ..Mix::default()
    };
    let sent = rt.block_on(load::drive(&url, 100, 8, &mix, 4)).unwrap();
    rt.block_on(wait_for_requests(&metrics_url, sent.len()))
        .unwrap();
    // The last traces wait for their sockets (--exchange-idle + 1 s at most).
    let count = || -> usize {
        let traces: Json = rt
            .block_on(async {
                reqwest::get(format!("{ui}/api/traces?service=demo-broker&limit=1000"))
                    .await?
                    .json()
                    .await
            })
            .unwrap();
        traces["data"].as_array().map_or(0, Vec::len)
    };
    let count = eventually(|| Some(count()).filter(|n| *n >= sent.len())).unwrap_or_else(count);
    let page = rt
        .block_on(async { reqwest::get(format!("{ui}/")).await?.text().await })
        .unwrap();
    probe.interrupt().unwrap();
    drop(broker);
    println!(
        "traces (embedded UI): {count} traces of {} requests",
        sent.len()
    );
    assert_eq!(count, sent.len());
    assert!(
        page.to_lowercase().contains("<html"),
        "no UI page: {page:.200}"
    );
}

/// Polls `check` for up to 10 s; its first answer.
fn eventually<T>(mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
