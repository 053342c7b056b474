//! The end-of-run report (issue 9): `--report json` written on SIGUSR1 and at exit, and
//! /stats, validated against docs/report.schema.json; its slowest requests checked
//! against the demo broker's own clock, and their trace ids against the traces a real
//! OTLP store holds. Markdown and table reports read as a person would.

use std::{path::Path, time::Duration};

use e2e::{
    harness::{
        attach_brokerprobe, ground_truth, require_root, scratch_dir, start_demo_broker, stats,
        wait_for_requests,
    },
    load::{self, Mix},
    trace_store::{TraceStore, tag},
};
use serde_json::Value as Json;

const REQUESTS: usize = 300;
const SLOWEST: usize = 5;
/// A reported duration against the broker's own clock (markers are within a few µs).
const DURATION_TOLERANCE_NS: u64 = 50_000;

fn schema() -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/report.schema.json");
    let schema: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).expect("docs/report.schema.json is a valid schema")
}

fn assert_valid(schema: &jsonschema::Validator, document: &Json, what: &str) {
    let errors: Vec<String> = schema
        .iter_errors(document)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{what} breaks the schema: {errors:#?}");
}

/// Reads the report file until it is a whole JSON document with `completed` requests.
fn report_with(path: &Path, completed: usize) -> Json {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Ok(report) = serde_json::from_str::<Json>(&text)
            && report["requests"]["completed"] == completed
        {
            return report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no report with {completed} requests in {}: {text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn json_report_follows_its_schema_and_names_the_slowest_requests() {
    require_root();
    let dir = scratch_dir("report-json");
    let truth_path = dir.join("ground-truth.jsonl");
    let report_path = dir.join("report.json");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = TraceStore::start(None).unwrap();
    let (mut broker, url) =
        start_demo_broker(&["--ground-truth", truth_path.to_str().unwrap()]).unwrap();
    let mut args = store.endpoint_args("http/protobuf");
    let slowest = SLOWEST.to_string();
    args.extend(
        [
            "--trace-sampler",
            "always_on",
            "--report",
            "json",
            "--report-out",
            report_path.to_str().unwrap(),
            "--report-slowest",
            &slowest,
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut probe, metrics_url) = attach_brokerprobe(broker.pid(), &args).unwrap();
    let sent = rt
        .block_on(load::drive(&url, REQUESTS, 16, &Mix::default(), 7))
        .unwrap();
    rt.block_on(wait_for_requests(&metrics_url, sent.len()))
        .unwrap();
    let schema = schema();

    // While attached, on SIGUSR1, and the same figures as /stats.
    probe.signal("USR1").unwrap();
    let live = report_with(&report_path, REQUESTS);
    assert_valid(&schema, &live, "the SIGUSR1 report");
    let stats = rt.block_on(stats(&metrics_url)).unwrap();
    assert_valid(&schema, &stats, "/stats");
    for field in ["requests", "stages", "models", "slowest_requests"] {
        assert_eq!(live[field], stats[field], "{field}: report vs /stats");
    }

    // Gone, so that what is there after exit was written at exit.
    std::fs::remove_file(&report_path).unwrap();
    probe.interrupt().unwrap();
    let report = report_with(&report_path, REQUESTS);
    assert_valid(&schema, &report, "the exit report");
    broker.signal("TERM").unwrap();
    assert!(broker.wait_exit(Duration::from_secs(30)).unwrap().success());

    // The slowest, by the broker's own clock, are the ones reported, slowest first.
    let truth = ground_truth(&truth_path);
    let ns = |json: &Json, field: &str| json[field].as_u64().unwrap();
    let true_ns = |id: u64| ns(&truth[&id], "end_ns") - ns(&truth[&id], "begin_ns");
    let mut true_durations: Vec<u64> = truth.keys().map(|id| true_ns(*id)).collect();
    true_durations.sort_unstable_by(|a, b| b.cmp(a));
    let reported = report["slowest_requests"].as_array().unwrap();
    assert_eq!(reported.len(), SLOWEST, "{report:#}");
    let seconds_ns = |v: &Json| (v.as_f64().unwrap() * 1e9).round() as u64;
    let durations: Vec<u64> = reported
        .iter()
        .map(|r| seconds_ns(&r["duration_seconds"]))
        .collect();
    assert!(durations.is_sorted_by(|a, b| a >= b), "{durations:?}");
    for request in reported {
        let id = ns(request, "request_id");
        let duration = seconds_ns(&request["duration_seconds"]);
        assert!(
            duration.abs_diff(true_ns(id)) <= DURATION_TOLERANCE_NS,
            "request {id}: reported {duration} ns, the broker's clock {} ns",
            true_ns(id)
        );
        let stages: Vec<&str> = request["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap())
            .collect();
        assert_eq!(
            stages.len(),
            truth[&id]["stages"].as_array().unwrap().len(),
            "request {id}: {request}"
        );
        for stage in request["stages"].as_array().unwrap() {
            let end = seconds_ns(&stage["start_seconds"]) + seconds_ns(&stage["duration_seconds"]);
            assert!(end <= duration + 1, "stage past its request: {request}");
        }
    }
    let fastest_reported = *durations.last().unwrap();
    assert!(
        fastest_reported + DURATION_TOLERANCE_NS >= true_durations[SLOWEST - 1],
        "reported {durations:?}, the broker's slowest {:?}",
        &true_durations[..SLOWEST]
    );
    let max = seconds_ns(&report["request_duration"]["max_seconds"]);
    assert!(
        max.abs_diff(durations[0]) <= durations[0] / 500,
        "max {max} ns, slowest {} ns",
        durations[0]
    );

    // Each trace id opens the request's trace.
    for request in reported {
        let trace_id = request["trace_id"]
            .as_str()
            .expect("always_on keeps every trace");
        let trace = rt
            .block_on(store.trace(trace_id))
            .unwrap()
            .unwrap_or_else(|| panic!("trace {trace_id} not in the store"));
        let root = trace["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["operationName"] == "POST /v1/chat/completions")
            .expect("a root span");
        assert_eq!(
            tag(root, "brokerprobe.request_id").and_then(Json::as_u64),
            request["request_id"].as_u64()
        );
        let root_us = root["duration"].as_u64().unwrap();
        let reported_us = seconds_ns(&request["duration_seconds"]) / 1_000;
        assert!(
            root_us.abs_diff(reported_us) <= 1,
            "{root_us} vs {reported_us} µs"
        );
    }
    println!(
        "report: {REQUESTS} requests; slowest {:?} ms, each within {} µs of the broker's \
         clock and opening its trace",
        durations.iter().map(|d| d / 1_000_000).collect::<Vec<_>>(),
        DURATION_TOLERANCE_NS / 1_000
    );
}

#[test]
fn markdown_and_table_reports_read_as_tables() {
    require_root();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_broker, url) = start_demo_broker(&[]).unwrap();
    let mix = Mix {
        hostile_model_names: true,
        ..Mix::default()
    };
    for format in ["markdown", "table"] {
        let (mut probe, metrics_url) =
            attach_brokerprobe(_broker.pid(), &["--report", format]).unwrap();
        let sent = rt.block_on(load::drive(&url, 60, 8, &mix, 3)).unwrap();
        rt.block_on(wait_for_requests(&metrics_url, sent.len()))
            .unwrap();
        probe.interrupt().unwrap();
        let out = probe.stdout.join("\n");
        match format {
            "markdown" => {
                for heading in ["# brokerprobe report", "## Latency", "## Slowest requests"] {
                    assert!(out.lines().any(|l| l == heading), "no {heading:?}:\n{out}");
                }
                // Every row of every table has as many cells as its header.
                let mut columns = None;
                for line in out.lines() {
                    if !line.starts_with('|') {
                        columns = None;
                        continue;
                    }
                    let cells = line.replace(r"\|", "").matches('|').count();
                    assert_eq!(*columns.get_or_insert(cells), cells, "{line}\n{out}");
                }
                assert!(out.contains("| upstream.chat |"), "{out}");
            }
            _ => {
                let header = out
                    .lines()
                    .position(|l| l.starts_with("slow ") && l.ends_with("trace id"))
                    .unwrap_or_else(|| panic!("no slowest table:\n{out}"));
                let first = &out.lines().nth(header + 1).unwrap();
                assert!(first.starts_with("1 "), "{first}");
                assert!(
                    out.contains("(not traced)"),
                    "no traces were asked for: {out}"
                );
                // Its waterfall: stage lines with a bar.
                let waterfall = out.lines().nth(header + 2).unwrap();
                assert!(
                    waterfall.starts_with("     +") && waterfall.ends_with('#'),
                    "{waterfall}"
                );
                let table = out.lines().skip(header).take_while(|l| !l.is_empty());
                assert!(table.clone().count() > SLOWEST, "{out}");
                for line in table {
                    assert!(line.chars().count() <= 80, "wider than 80 columns: {line}");
                }
            }
        }
    }
}
