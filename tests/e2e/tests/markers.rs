//! Foundation end to end: the demo broker, warmed up, then profiled by brokerprobe attached
//! by PID under mixed load; every request is compared with the broker's own clock. The
//! same run is made on the demo broker built with USDT probes instead of markers
//! (`--features usdt`), profiled through its probe map: the same fidelity bounds hold.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    time::{Duration, Instant},
};

use e2e::{
    harness::{
        attach_brokerprobe, counter_sum, demo_broker_symbol_map, demo_broker_usdt_map,
        ground_truth, marker_entry_bytes, marker_semaphore, read_jsonl, require_root, scratch_dir,
        start_demo_broker, start_demo_broker_variant, usdt_semaphores, wait_for_requests,
    },
    load::{self, Mix, Outcome, Target, check_statuses},
    prometheus::promtool_check,
};
use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;

/// The marker entry instruction (docs/markers.md).
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// Requests sent while attached, and how many at once.
const ATTACHED_REQUESTS: usize = 2_400;
const CONCURRENCY: usize = 32;
/// Requests at once in the symbol-map test.
const SYMBOL_CONCURRENCY: usize = 8;
/// The fidelity bound: kernel-timed vs broker-timed stage durations at p99. It holds for
/// trapped probes too (USDT sites, function entries) because a hit whose thread was
/// preempted before its probe ran is timed at the preemption (probe-ebpf trap_time.rs):
/// without that, 1-2% of their boundaries here came 40-150 µs late, and p99 measured
/// 13-83 µs; with it, 6-48 µs (markers: within 7 µs).
const MAX_P99_DIFF_NS: u64 = 50_000;

/// How the broker marks its requests' timelines.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Instrumented {
    Markers,
    /// USDT probes of the `usdt` crate, each behind its semaphore.
    Usdt,
}

impl Instrumented {
    /// Checks the broker's gates: all `expected` (0 closed, 1 open), and the marker
    /// entries probed exactly while open.
    fn check_gates(self, pid: u32, expected: u16, when: &str) {
        match self {
            Instrumented::Markers => {
                let entries = marker_entry_bytes(pid).unwrap();
                let probed = entries.iter().filter(|e| **e != NOP5).count();
                let want = if expected == 0 { 0 } else { entries.len() };
                assert_eq!(probed, want, "{when}: marker entries {entries:x?}");
                assert_eq!(
                    marker_semaphore(pid).unwrap(),
                    expected,
                    "{when}: semaphore"
                );
            }
            Instrumented::Usdt => {
                let semaphores = usdt_semaphores(pid).unwrap();
                assert!(semaphores.len() >= 11, "{when}: {semaphores:?}");
                assert!(
                    semaphores.iter().all(|s| *s == expected),
                    "{when}: USDT semaphores {semaphores:?}, expected all {expected}"
                );
            }
        }
    }
}

#[test]
fn attached_by_pid_matches_ground_truth_and_detaches_cleanly() {
    profile_against_ground_truth(Instrumented::Markers);
}

/// Issue 8: a broker instrumented with the `usdt` crate, gated probes, mapped by a
/// probe map: the Foundation's fidelity bounds, and its semaphores back to 0 after.
#[test]
fn usdt_broker_matches_ground_truth_and_detaches_cleanly() {
    profile_against_ground_truth(Instrumented::Usdt);
}

fn profile_against_ground_truth(instrumented: Instrumented) {
    require_root();
    let dir = scratch_dir("markers");
    let truth_path = dir.join("ground-truth.jsonl");
    let observed_path = dir.join("brokerprobe.jsonl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mix = Mix::default();

    let broker_args = ["--ground-truth", truth_path.to_str().unwrap()];
    let (mut broker, url) = match instrumented {
        Instrumented::Markers => start_demo_broker(&broker_args),
        Instrumented::Usdt => start_demo_broker_variant("usdt", &broker_args),
    }
    .unwrap();
    // Warm: keep-alive pools and key pools in use before brokerprobe exists.
    let warm = rt.block_on(load::drive(&url, 200, 16, &mix, 1)).unwrap();
    check_statuses(&warm);

    // Nobody attached: the broker does not even call its markers (or fire its probes).
    instrumented.check_gates(broker.pid(), 0, "before attach");
    let usdt_map = demo_broker_usdt_map();
    let mut probe_args = vec!["--requests-out", observed_path.to_str().unwrap()];
    if instrumented == Instrumented::Usdt {
        probe_args.extend(["--usdt-map", usdt_map.to_str().unwrap()]);
    }
    let (mut probe, metrics_url) = attach_brokerprobe(broker.pid(), &probe_args).unwrap();
    instrumented.check_gates(broker.pid(), 1, "attached");
    let started = Instant::now();
    let attached = rt
        .block_on(load::drive(&url, ATTACHED_REQUESTS, CONCURRENCY, &mix, 2))
        .unwrap();
    let load_time = started.elapsed();
    check_statuses(&attached);
    check_mix_coverage(&attached);

    let metrics = rt
        .block_on(wait_for_requests(&metrics_url, attached.len()))
        .unwrap();
    promtool_check(&metrics).unwrap();

    probe.interrupt().unwrap();
    assert!(
        probe
            .stdout
            .iter()
            .any(|l| l.starts_with("keypool.acquire")),
        "no final table: {:#?}",
        probe.stdout
    );
    // Everything sent while attached was placed: nothing lost, undecodable or untracked.
    let health = probe
        .stdout
        .iter()
        .find(|l| l.starts_with("events "))
        .expect("health line");
    for clean in [
        "lost: 0 marker, 0 socket; undecodable 0, 0 of untracked requests",
        "0 ended untracked, 0 still open, 0 expired, 0 incomplete (records lost while they ran), 0 \
         over the open-request bound, 0 duplicate",
        "stages 0 unclosed, 0 unmatched, 0 over",
    ] {
        assert!(health.contains(clean), "{clean:?} not in: {health}");
    }

    // Detached: every marker entry is restored (every gate closed), and the broker
    // serves on without errors.
    instrumented.check_gates(broker.pid(), 0, "detached");
    let after = rt
        .block_on(load::drive(&url, 300, CONCURRENCY, &mix, 3))
        .unwrap();
    check_statuses(&after);

    broker.signal("TERM").unwrap();
    assert!(broker.wait_exit(Duration::from_secs(30)).unwrap().success());

    let truth = ground_truth(&truth_path);
    let observed = read_jsonl(&observed_path);
    assert_eq!(
        truth.len(),
        warm.len() + attached.len() + after.len(),
        "ground truth is missing requests"
    );

    // Every request sent while attached observed exactly once, and nothing else.
    let sent: HashSet<u64> = attached.iter().map(|o| o.request_id).collect();
    let mut seen = HashSet::new();
    for request in &observed {
        let id = request["request_id"].as_u64().unwrap();
        assert!(seen.insert(id), "request {id} reported twice");
        assert!(
            sent.contains(&id),
            "request {id} reported but not sent while attached"
        );
    }
    assert_eq!(
        seen.len(),
        sent.len(),
        "requests sent while attached but not reported"
    );

    let report = compare(&observed, &truth);
    // The traceparent the client sent arrives through request_begin's second string.
    let sent_traceparent: HashMap<u64, &Option<String>> = attached
        .iter()
        .map(|o| (o.request_id, &o.traceparent))
        .collect();
    for request in &observed {
        let id = request["request_id"].as_u64().unwrap();
        assert_eq!(
            request["traceparent"].as_str(),
            sent_traceparent[&id].as_deref(),
            "request {id}"
        );
    }
    assert!(
        attached.iter().filter(|o| o.traceparent.is_some()).count() > 100,
        "too few traceparents"
    );
    println!(
        "{} requests at concurrency {CONCURRENCY} in {load_time:.1?}; {} stage instances; \
         |kernel - broker| stage duration: p50 {} ns, p95 {} ns, p99 {} ns, max {} ns; \
         timestamp offset p50 {} ns, p99 {} ns",
        observed.len(),
        report.stage_diffs.len(),
        quantile(&report.stage_diffs, 0.5),
        quantile(&report.stage_diffs, 0.95),
        quantile(&report.stage_diffs, 0.99),
        quantile(&report.stage_diffs, 1.0),
        quantile(&report.offsets, 0.5),
        quantile(&report.offsets, 0.99),
    );
    assert!(
        quantile(&report.stage_diffs, 0.99) <= MAX_P99_DIFF_NS,
        "stage durations differ too much at p99"
    );
    assert!(
        quantile(&report.offsets, 0.99) <= MAX_P99_DIFF_NS,
        "stage timestamps differ too much at p99"
    );
    // The key pool must really have made requests wait, or keypool.acquire was not tested.
    let waits = &report.keypool_waits_ns;
    let waited = waits.iter().filter(|ns| **ns > 1_000_000).count();
    println!(
        "keypool.acquire waits over 1 ms: {waited} of {}",
        waits.len()
    );
    assert!(
        !waits.is_empty() && waited * 100 >= waits.len(),
        "no key-pool contention under load"
    );

    // /metrics counts equal what was sent.
    let scrape = Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert_eq!(
        counter_sum(&scrape, "brokerprobe_requests_total"),
        attached.len() as f64
    );
    for (stage, count) in &report.stage_counts {
        assert_eq!(
            histogram_count(&scrape, "brokerprobe_stage_duration_seconds", stage),
            *count as f64,
            "{stage}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The per-request comparison of brokerprobe's view with the ground truth.
struct Comparison {
    /// |observed - true| stage duration, ns, one per stage instance.
    stage_diffs: Vec<u64>,
    /// |observed - true| stage begin and end timestamps (same clock), ns.
    offsets: Vec<u64>,
    stage_counts: HashMap<String, usize>,
    /// True keypool.acquire durations, ns.
    keypool_waits_ns: Vec<u64>,
}

fn compare(observed: &[Json], truth: &HashMap<u64, Json>) -> Comparison {
    let mut result = Comparison {
        stage_diffs: Vec::new(),
        offsets: Vec::new(),
        stage_counts: HashMap::new(),
        keypool_waits_ns: Vec::new(),
    };
    for seen in observed {
        let id = seen["request_id"].as_u64().unwrap();
        let truth = &truth[&id];
        for field in [
            "model",
            "provider",
            "status",
            "error_type",
            "chunks",
            "input_tokens",
            "output_tokens",
        ] {
            assert_eq!(seen[field], truth[field], "request {id}: {field} differs");
        }
        let true_fallback = match &truth["fallback"] {
            Json::Null => vec![],
            f => vec![Json::Array(vec![f["from"].clone(), f["to"].clone()])],
        };
        assert_eq!(
            seen["fallbacks"].as_array().unwrap(),
            &true_fallback,
            "request {id}: fallback"
        );
        assert_eq!(seen["unclosed_stages"], 0, "request {id}");

        let seen_stages = seen["stages"].as_array().unwrap();
        let true_stages = truth["stages"].as_array().unwrap();
        let names = |stages: &[Json]| -> Vec<(String, Json)> {
            stages
                .iter()
                .map(|s| (s["stage"].as_str().unwrap().to_owned(), s["name"].clone()))
                .collect()
        };
        assert_eq!(
            names(seen_stages),
            names(true_stages),
            "request {id}: stages differ"
        );
        let ns = |j: &Json, f: &str| j[f].as_u64().unwrap();
        for (s, t) in seen_stages.iter().zip(true_stages) {
            let seen_duration = ns(s, "end_ns") - ns(s, "begin_ns");
            let true_duration = ns(t, "end_ns") - ns(t, "begin_ns");
            result
                .stage_diffs
                .push(seen_duration.abs_diff(true_duration));
            if t["stage"] == "keypool.acquire" {
                result.keypool_waits_ns.push(true_duration);
            }
            result
                .offsets
                .push(ns(s, "begin_ns").abs_diff(ns(t, "begin_ns")));
            result
                .offsets
                .push(ns(s, "end_ns").abs_diff(ns(t, "end_ns")));
            *result
                .stage_counts
                .entry(s["stage"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        // The first chunk is an event, later ones are counted in the kernel with the last
        // one's time (docs/markers.md, "Chunks"): both times as the broker saw them.
        for field in ["first_chunk_ns", "last_chunk_ns"] {
            assert_eq!(
                seen[field].is_null(),
                truth[field].is_null(),
                "request {id}: {field}"
            );
            if !truth[field].is_null() {
                result
                    .offsets
                    .push(ns(seen, field).abs_diff(ns(truth, field)));
            }
        }
        let seen_request = ns(seen, "end_ns") - ns(seen, "begin_ns");
        let true_request = ns(truth, "end_ns") - ns(truth, "begin_ns");
        result.stage_diffs.push(seen_request.abs_diff(true_request));
    }
    result
}

/// The load must exercise every path the issue names.
fn check_mix_coverage(outcomes: &[Outcome]) {
    let count = |f: &dyn Fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    assert!(
        count(&|o| o.kind.streaming) > 100,
        "too few streaming requests"
    );
    assert!(
        count(&|o| !o.kind.streaming) > 100,
        "too few non-streaming requests"
    );
    assert!(
        count(&|o| o.kind.tools && o.kind.streaming) > 20,
        "too few streaming tool requests"
    );
    assert!(
        count(&|o| o.kind.tools && !o.kind.streaming) > 20,
        "too few tool requests"
    );
    assert!(
        count(&|o| o.kind.target == Target::Fallback) > 20,
        "too few fallbacks"
    );
}

/// The real Prometheus linter must accept the exposition as it is.
/// Observations of histogram `metric` with label `stage` (its +Inf bucket), summed.
fn histogram_count(scrape: &Scrape, metric: &str, stage: &str) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && s.labels.get("stage") == Some(stage))
        .map(|s| match &s.value {
            Value::Histogram(buckets) => {
                buckets
                    .iter()
                    .find(|b| b.less_than.is_infinite())
                    .unwrap()
                    .count
            }
            other => panic!("{metric} is not a histogram: {other:?}"),
        })
        .sum()
}

fn quantile(values: &[u64], q: f64) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index]
}

/// Attaching and detaching take time (probes go in and out one by one): requests that
/// straddle either must not be reported with stages missing.
#[test]
fn attach_and_detach_under_load_report_only_whole_requests() {
    require_root();
    let dir = scratch_dir("under-load");
    let truth_path = dir.join("ground-truth.jsonl");
    let observed_path = dir.join("brokerprobe.jsonl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut broker, url) =
        start_demo_broker(&["--ground-truth", truth_path.to_str().unwrap()]).unwrap();

    let load = rt.spawn({
        let url = url.clone();
        async move { load::drive(&url, 4_000, CONCURRENCY, &Mix::default(), 7).await }
    });
    std::thread::sleep(Duration::from_millis(700));
    let (mut probe, _) = attach_brokerprobe(
        broker.pid(),
        &["--requests-out", observed_path.to_str().unwrap()],
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    probe.interrupt().unwrap();
    let sent = rt.block_on(load).unwrap().unwrap();
    check_statuses(&sent);
    broker.signal("TERM").unwrap();
    assert!(broker.wait_exit(Duration::from_secs(30)).unwrap().success());

    let health = probe
        .stdout
        .iter()
        .find(|l| l.starts_with("events "))
        .expect("health line");
    assert!(
        health.contains("stages 0 unclosed, 0 unmatched"),
        "{health}"
    );
    let truth = ground_truth(&truth_path);
    let observed = read_jsonl(&observed_path);
    assert!(
        observed.len() > 200,
        "only {} requests observed",
        observed.len()
    );
    // The load ran across both edges, or the edges were not tested.
    let first_begin = observed
        .iter()
        .map(|r| r["begin_ns"].as_u64().unwrap())
        .min()
        .unwrap();
    let last_end = observed
        .iter()
        .map(|r| r["end_ns"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        truth
            .values()
            .any(|r| r["end_ns"].as_u64().unwrap() < first_begin),
        "no load before attach"
    );
    assert!(
        truth
            .values()
            .any(|r| r["begin_ns"].as_u64().unwrap() > last_end),
        "no load after detach"
    );
    let report = compare(&observed, &truth);
    println!(
        "under load: {} of {} requests reported whole; stage duration |diff| p99 {} ns",
        observed.len(),
        sent.len(),
        quantile(&report.stage_diffs, 0.99)
    );
    assert!(quantile(&report.stage_diffs, 0.99) <= MAX_P99_DIFF_NS);
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 8: the demo broker built without markers (its USDT build; nothing attaches to
/// its probes here), profiled through a symbol map: every call of its synchronous stages'
/// functions is timed once, inside the broker's own clock around it, and within the
/// Foundation's bound of it at p99.
#[test]
fn symbol_mapped_stages_match_ground_truth() {
    require_root();
    let dir = scratch_dir("symbols");
    let truth_path = dir.join("ground-truth.jsonl");
    let samples_path = dir.join("stages.jsonl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mix = Mix::default();
    let (mut broker, url) =
        start_demo_broker_variant("usdt", &["--ground-truth", truth_path.to_str().unwrap()])
            .unwrap();
    check_statuses(&rt.block_on(load::drive(&url, 200, 16, &mix, 1)).unwrap());

    let map = demo_broker_symbol_map();
    let (mut probe, _) = attach_brokerprobe(
        broker.pid(),
        &[
            "--symbol-map",
            map.to_str().unwrap(),
            "--stages-out",
            samples_path.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(
        probe
            .stdout
            .iter()
            .any(|l| l.contains("attached entry and return probes to 2 functions")),
        "{:#?}",
        probe.stdout
    );
    let attached = rt
        .block_on(load::drive(
            &url,
            ATTACHED_REQUESTS,
            SYMBOL_CONCURRENCY,
            &mix,
            2,
        ))
        .unwrap();
    check_statuses(&attached);
    // Events are drained every 10 ms; the last calls returned before their responses.
    std::thread::sleep(Duration::from_millis(300));
    probe.interrupt().unwrap();
    broker.signal("TERM").unwrap();
    assert!(broker.wait_exit(Duration::from_secs(30)).unwrap().success());

    let sent: HashSet<u64> = attached.iter().map(|o| o.request_id).collect();
    let truth = read_jsonl(&truth_path);
    let samples = read_jsonl(&samples_path);
    let span = |v: &Json| {
        (
            v["begin_ns"].as_u64().unwrap(),
            v["end_ns"].as_u64().unwrap(),
        )
    };
    for stage in ["route", "response.serialize"] {
        // The broker's clock around each call, sorted by begin.
        let mut true_spans: Vec<(u64, u64)> = truth
            .iter()
            .filter(|r| sent.contains(&r["request_id"].as_u64().unwrap()))
            .flat_map(|r| r["stages"].as_array().unwrap().iter())
            .filter(|s| s["stage"] == stage)
            .map(span)
            .collect();
        true_spans.sort_unstable();
        let mut observed: Vec<(u64, u64)> = samples
            .iter()
            .filter(|s| s["stage"] == stage)
            .map(span)
            .collect();
        assert_eq!(
            observed.len(),
            true_spans.len(),
            "{stage}: every call timed once, and no other"
        );
        // Each timed call lies inside the broker's span of it. Calls by entry: the spans
        // begun by then stay candidates for all later calls, so the one that ends
        // soonest and still contains the call is the right pick.
        observed.sort_unstable();
        let mut begun = true_spans.iter().enumerate().peekable();
        let mut open = BTreeSet::new();
        let mut diffs = Vec::new();
        for (begin, end) in &observed {
            while let Some((i, (_, e))) = begun.next_if(|(_, (b, _))| b <= begin) {
                open.insert((*e, i));
            }
            let &(e, i) = open
                .range((*end, 0)..)
                .next()
                .unwrap_or_else(|| panic!("{stage}: call {begin}..{end} inside no broker span"));
            open.remove(&(e, i));
            diffs.push((e - true_spans[i].0) - (end - begin));
        }
        diffs.sort_unstable();
        println!(
            "symbol-mapped {stage}: {} calls; broker-timed minus kernel-timed duration: p50 {} ns, \
             p95 {} ns, p99 {} ns, max {} ns",
            diffs.len(),
            quantile(&diffs, 0.5),
            quantile(&diffs, 0.95),
            quantile(&diffs, 0.99),
            quantile(&diffs, 1.0)
        );
        assert!(
            quantile(&diffs, 0.99) <= MAX_P99_DIFF_NS,
            "{stage}: durations differ too much"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
