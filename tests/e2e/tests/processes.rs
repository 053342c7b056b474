//! Several processes of one broker: replicas profiled at once (`--pid A,B`), and a broker
//! restarted under `--follow`.

use std::{
    collections::HashSet,
    process::Command,
    time::{Duration, Instant},
};

use e2e::{
    harness::{
        Proc, attach_brokerprobe, bin, chunk_tallies_of, read_jsonl, require_root, scratch_dir,
        start_demo_broker, start_listening, stats, wait_for_requests,
    },
    load::{self, Mix, check_statuses},
    trace_store::TraceStore,
};
use prometheus_parse::{Scrape, Value};

fn mix() -> Mix {
    Mix {
        traceparent: 0.0,
        ..Mix::default()
    }
}

/// `brokerprobe_requests_total` summed per `replica`.
fn requests_by_replica(metrics: &str) -> Vec<(String, f64)> {
    let scrape = Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let mut by_replica: Vec<(String, f64)> = Vec::new();
    for sample in scrape
        .samples
        .iter()
        .filter(|s| s.metric == "brokerprobe_requests_total")
    {
        let replica = sample.labels.get("replica").unwrap().to_owned();
        let Value::Counter(count) = sample.value else {
            panic!("not a counter")
        };
        match by_replica.iter_mut().find(|(r, _)| *r == replica) {
            Some((_, total)) => *total += count,
            None => by_replica.push((replica, count)),
        }
    }
    by_replica.sort_by(|a, b| a.0.cmp(&b.0));
    by_replica
}

/// Two replicas at once: each reported under its own `replica` label and in its own
/// /stats line, their sum is the whole; one exiting leaves the other profiled, and the
/// run ends with the last.
/// brokerprobe attached to two demo brokers as replicas, once it follows both.
fn attach_to_both(first: &Proc, second: &Proc) -> (Proc, String) {
    let pids = format!("{},{}", first.pid(), second.pid());
    let (mut probe, metrics_url) = attach_brokerprobe(first.pid(), &["--pid", &pids]).unwrap();
    probe
        .wait_for_line(
            &format!("to PID {} (demo-broker", second.pid()),
            Duration::from_secs(30),
        )
        .unwrap();
    (probe, metrics_url)
}

#[test]
fn replicas_are_reported_apart_and_together() {
    require_root();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut first, first_url) = start_demo_broker(&[]).unwrap();
    let (mut second, second_url) = start_demo_broker(&[]).unwrap();
    let (mut probe, metrics_url) = attach_to_both(&first, &second);
    let to_first = rt
        .block_on(load::drive(&first_url, 100, 8, &mix(), 1))
        .unwrap();
    let to_second = rt
        .block_on(load::drive(&second_url, 150, 8, &mix(), 2))
        .unwrap();
    check_statuses(&to_first);
    check_statuses(&to_second);
    let metrics = rt.block_on(wait_for_requests(&metrics_url, 250)).unwrap();
    let stats = rt.block_on(stats(&metrics_url)).unwrap();
    let by_replica = requests_by_replica(&metrics);
    let per_process: Vec<(String, u64)> = stats["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["process"].as_str().unwrap().to_owned(),
                p["requests"].as_u64().unwrap(),
            )
        })
        .collect();
    println!("replicas: /metrics {by_replica:?}; /stats {per_process:?}");
    assert_eq!(
        by_replica,
        [("0".to_owned(), 100.0), ("1".to_owned(), 150.0)],
        "per replica"
    );
    assert_eq!(stats["requests"]["completed"], 250, "together");
    assert_eq!(
        per_process,
        [
            (format!("PID {}", first.pid()), 100),
            (format!("PID {}", second.pid()), 150)
        ]
    );
    assert!(metrics.contains(&format!(
        "brokerprobe_target_info{{mode=\"markers+sockets\",name=\"demo-broker\",pid=\"{}\",replica=\"1\"}} 1",
        second.pid()
    )));

    // One replica goes: the other is still profiled.
    first.signal("KILL").unwrap();
    first.wait_exit(Duration::from_secs(10)).unwrap();
    probe
        .wait_for_line(
            &format!("PID {} exited", first.pid()),
            Duration::from_secs(5),
        )
        .unwrap();
    let more = rt
        .block_on(load::drive(&second_url, 50, 8, &mix(), 3))
        .unwrap();
    check_statuses(&more);
    let metrics = rt.block_on(wait_for_requests(&metrics_url, 300)).unwrap();
    assert_eq!(
        requests_by_replica(&metrics),
        [("0".to_owned(), 100.0), ("1".to_owned(), 200.0)]
    );
    // The last one goes: brokerprobe writes out and ends.
    second.signal("TERM").unwrap();
    second.wait_exit(Duration::from_secs(30)).unwrap();
    let status = probe.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "brokerprobe exited {status}");
    assert!(
        probe
            .stdout
            .iter()
            .any(|l| l.contains("every process profiled has exited")),
        "{:#?}",
        probe.stdout
    );
    assert!(
        probe
            .stdout
            .iter()
            .any(|l| l.starts_with(&format!("(request, PID {})", first.pid()))),
        "no per-process rows in the final table: {:#?}",
        probe.stdout
    );
}

/// A broker killed mid-stream never ends its streams: their chunk tallies would stay in the
/// kernel's map (docs/maps.md) until it filled. brokerprobe removes them when it lets the
/// process go (a second replica keeps brokerprobe running meanwhile).
#[test]
fn a_process_gone_mid_stream_leaves_no_chunk_tallies() {
    require_root();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Streams of 400 chunks 10 ms apart: still open seconds later, when the broker goes.
    let (_upstream, upstream) = start_listening(
        "fake-upstream",
        Command::new(bin("fake-upstream")).args(["--chunks", "400", "--chunk-interval-ms", "10"]),
    )
    .unwrap();
    let (mut first, first_addr) = start_listening(
        "demo-broker",
        Command::new(bin("demo-broker"))
            .args(["--listen", "127.0.0.1:0"])
            .args(["--upstream", &format!("http://{upstream}")]),
    )
    .unwrap();
    let (second, _) = start_demo_broker(&[]).unwrap();
    let (mut probe, _) = attach_to_both(&first, &second);

    const STREAMS: usize = 4;
    let streams = Mix::streaming_only();
    let url = format!("http://{first_addr}");
    // Cut short by the kill: their outcome is not the point.
    let _in_flight =
        rt.spawn(async move { load::drive(&url, STREAMS, STREAMS, &streams, 4).await });
    let open = tallies_once(&probe, &first, |n| n == STREAMS, Duration::from_secs(20));
    assert_eq!(
        open, STREAMS,
        "tallies of the streams in flight, before the kill"
    );

    first.signal("KILL").unwrap();
    first.wait_exit(Duration::from_secs(10)).unwrap();
    probe
        .wait_for_line(
            &format!("PID {} exited", first.pid()),
            Duration::from_secs(5),
        )
        .unwrap();
    let left = tallies_once(&probe, &first, |n| n == 0, Duration::from_secs(5));
    println!("chunk tallies of the killed broker: {open} open before, {left} after");
    assert_eq!(left, 0, "tallies left behind by the killed broker");
}

/// `broker`'s open chunk tallies in `probe`'s map, read until `settled` says yes or
/// `timeout` passes: the last count read.
fn tallies_once(
    probe: &Proc,
    broker: &Proc,
    settled: fn(usize) -> bool,
    timeout: Duration,
) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let tallies = chunk_tallies_of(probe.pid(), broker.pid()).unwrap();
        if settled(tallies) || Instant::now() > deadline {
            return tallies;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `--follow PATH`: the broker restarts with a new PID; brokerprobe attaches to it within
/// a second, its series continue (same `replica`), and no request is reported twice.
#[test]
fn a_restarted_broker_is_followed() {
    require_root();
    /// Restart to attached, at most.
    const REATTACH_BOUND: Duration = Duration::from_secs(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = scratch_dir("follow");
    // A copy of its own, so no other demo broker on this machine matches the path.
    let exe = dir.join("demo-broker-followed");
    std::fs::copy(bin("demo-broker"), &exe).unwrap();
    let requests_path = dir.join("requests.jsonl");
    let store = TraceStore::start(None).unwrap();
    let start_broker = || -> (Proc, String) {
        let (broker, addr) = start_listening(
            "demo-broker",
            Command::new(&exe).args(["--fake", "--listen", "127.0.0.1:0"]),
        )
        .unwrap();
        (broker, format!("http://{addr}"))
    };

    let (mut broker, url) = start_broker();
    let mut args = vec![
        "--follow".to_owned(),
        exe.to_str().unwrap().to_owned(),
        "--requests-out".to_owned(),
        requests_path.to_str().unwrap().to_owned(),
        "--service-name".to_owned(),
        "followed".to_owned(),
        "--exchange-idle".to_owned(),
        "300ms".to_owned(),
    ];
    args.extend(store.endpoint_args("http/protobuf"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut probe = Proc::spawn(
        "brokerprobe",
        Command::new(bin("brokerprobe"))
            .args(["attach", "--metrics-addr", "127.0.0.1:0"])
            .args(&args),
    )
    .unwrap();
    let line = probe
        .wait_for_line(
            &format!("to PID {} (", broker.pid()),
            Duration::from_secs(60),
        )
        .unwrap();
    let metrics_url = line.rsplit(' ').next().unwrap().to_owned();
    let before = rt.block_on(load::drive(&url, 200, 8, &mix(), 1)).unwrap();
    check_statuses(&before);
    rt.block_on(wait_for_requests(&metrics_url, 200)).unwrap();

    let old_pid = broker.pid();
    broker.signal("TERM").unwrap();
    broker.wait_exit(Duration::from_secs(30)).unwrap();
    probe
        .wait_for_line(&format!("PID {old_pid} exited"), Duration::from_secs(5))
        .unwrap();
    let restarted = Instant::now();
    let (broker, url) = start_broker();
    probe
        .wait_for_line(
            &format!("to PID {} (", broker.pid()),
            Duration::from_secs(10),
        )
        .unwrap();
    let reattach = restarted.elapsed();
    let after = rt.block_on(load::drive(&url, 200, 8, &mix(), 2)).unwrap();
    check_statuses(&after);
    let metrics = rt.block_on(wait_for_requests(&metrics_url, 400)).unwrap();
    // Every trace exported (they wait for their sockets: --exchange-idle + 1 s at most).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut traces = Vec::new();
    while Instant::now() < deadline {
        traces = rt.block_on(store.traces("followed")).unwrap();
        if traces.len() >= 400 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    probe.interrupt().unwrap();
    drop(broker);

    let requests = read_jsonl(&requests_path);
    let distinct: HashSet<(u64, u64)> = requests
        .iter()
        .map(|r| {
            (
                r["pid"].as_u64().unwrap(),
                r["request_id"].as_u64().unwrap(),
            )
        })
        .collect();
    let span_ids: Vec<&str> = traces
        .iter()
        .flat_map(|t| t["spans"].as_array().unwrap())
        .map(|s| s["spanID"].as_str().unwrap())
        .collect();
    let distinct_spans: HashSet<&&str> = span_ids.iter().collect();
    println!(
        "follow: restarted broker attached {} ms after it started; {} requests written \
         ({} distinct), {} traces, {} spans ({} distinct); /metrics {:?}",
        reattach.as_millis(),
        requests.len(),
        distinct.len(),
        traces.len(),
        span_ids.len(),
        distinct_spans.len(),
        requests_by_replica(&metrics)
    );
    assert!(reattach <= REATTACH_BOUND, "re-attached after {reattach:?}");
    assert_eq!(
        requests_by_replica(&metrics),
        [("0".to_owned(), 400.0)],
        "series did not continue"
    );
    assert_eq!((requests.len(), distinct.len()), (400, 400));
    assert_eq!(traces.len(), 400, "one trace per request");
    assert_eq!(span_ids.len(), distinct_spans.len(), "duplicate spans");
    let _ = std::fs::remove_dir_all(dir);
}

/// The broker's binary replaced on disk after it started (a deploy in progress): the
/// markers are found in, and the uprobes placed on, the file the process runs.
#[test]
fn a_broker_whose_binary_was_replaced_is_profiled() {
    require_root();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = scratch_dir("replaced");
    let exe = dir.join("demo-broker");
    std::fs::copy(bin("demo-broker"), &exe).unwrap();
    let (broker, addr) = start_listening(
        "demo-broker",
        Command::new(&exe).args(["--fake", "--listen", "127.0.0.1:0"]),
    )
    .unwrap();
    // The new release: another file at the same path.
    std::fs::remove_file(&exe).unwrap();
    std::fs::copy(bin("fake-upstream"), &exe).unwrap();
    let (mut probe, metrics_url) = attach_brokerprobe(broker.pid(), &[]).unwrap();
    let sent = rt
        .block_on(load::drive(&format!("http://{addr}"), 100, 8, &mix(), 1))
        .unwrap();
    check_statuses(&sent);
    let metrics = rt.block_on(wait_for_requests(&metrics_url, 100)).unwrap();
    probe.interrupt().unwrap();
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
    let attached = probe
        .stdout
        .iter()
        .find(|l| l.starts_with("brokerprobe: attached"))
        .unwrap();
    println!("replaced binary: {attached}");
    assert!(attached.contains("(deleted)"), "{attached}");
    assert_eq!(requests_by_replica(&metrics), [("0".to_owned(), 100.0)]);
}
