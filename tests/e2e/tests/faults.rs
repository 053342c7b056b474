//! Faults: brokerprobe failing, stalling or losing its broker never costs the broker a
//! request, and nothing it loses goes uncounted.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use e2e::{
    harness::{
        Proc, attach_brokerprobe, bin, chunk_tallies_of, counter_sum, demo_broker_usdt_map,
        ground_truth, health_figure, loaded_bpf_programs, marker_entry_bytes, marker_semaphore,
        read_jsonl, require_root, scratch_dir, start_demo_broker, start_demo_broker_variant,
        start_listening, usdt_semaphores, wait_for_counter, wait_for_requests,
    },
    load::{self, Mix, check_statuses},
};
use probe_common::maps::MAX_TALLIED_STREAMS;
use prometheus_parse::Scrape;
use serde_json::Value as Json;

/// The marker entry instruction (docs/markers.md).
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// brokerprobe killed outright under load (no chance to clean up): no request fails, the
/// kernel switches the markers off, restores their NOPs and unloads every program.
#[test]
fn killed_under_load_costs_the_broker_nothing() {
    require_root();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mix = Mix::default();
    let (broker, url) = start_demo_broker(&[]).unwrap();
    let programs_before = loaded_bpf_programs();
    let (mut probe, _) = attach_brokerprobe(broker.pid(), &[]).unwrap();
    assert_eq!(marker_semaphore(broker.pid()).unwrap(), 1);
    assert!(loaded_bpf_programs().len() > programs_before.len());

    let load = {
        let url = url.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let outcomes = rt
                .block_on(load::drive(&url, 4_000, 16, &Mix::default(), 1))
                .unwrap();
            (outcomes, Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(400));
    probe.signal("KILL").unwrap();
    let killed_at = Instant::now();
    probe.wait_exit(Duration::from_secs(10)).unwrap();
    let (outcomes, load_ended) = load.join().unwrap();
    assert!(
        load_ended > killed_at,
        "the load ended before the kill: nothing was tested"
    );
    check_statuses(&outcomes);

    // The kernel drops the uprobes as it closes the dead process's files: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while marker_semaphore(broker.pid()).unwrap() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<u32> = loaded_bpf_programs()
        .difference(&programs_before)
        .copied()
        .collect();
    let entries = marker_entry_bytes(broker.pid()).unwrap();
    println!(
        "kill -9 under load: {} requests, all answered as expected; {:.1} s of load after the \
         kill; eBPF programs left: {left:?}",
        outcomes.len(),
        load_ended.duration_since(killed_at).as_secs_f64()
    );
    assert_eq!(
        marker_semaphore(broker.pid()).unwrap(),
        0,
        "markers left on"
    );
    assert!(
        entries.iter().all(|e| *e == NOP5),
        "a uprobe left behind: {entries:x?}"
    );
    assert!(left.is_empty(), "eBPF programs left loaded: {left:?}");
    check_statuses(&rt.block_on(load::drive(&url, 200, 8, &mix, 2)).unwrap());
}

/// The same for a USDT broker (docs/modes/usdt.md): killed, brokerprobe leaves every
/// probe's semaphore at 0 (the kernel held them) and no program loaded.
#[test]
fn killed_while_on_usdt_probes_closes_their_gates() {
    require_root();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (broker, url) = start_demo_broker_variant("usdt", &[]).unwrap();
    let programs_before = loaded_bpf_programs();
    let map = demo_broker_usdt_map();
    let (mut probe, _) =
        attach_brokerprobe(broker.pid(), &["--usdt-map", map.to_str().unwrap()]).unwrap();
    let raised = usdt_semaphores(broker.pid()).unwrap();
    assert!(raised.iter().all(|s| *s == 1), "attached: {raised:?}");
    check_statuses(
        &rt.block_on(load::drive(&url, 300, 8, &Mix::default(), 1))
            .unwrap(),
    );
    probe.signal("KILL").unwrap();
    probe.wait_exit(Duration::from_secs(10)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut semaphores = usdt_semaphores(broker.pid()).unwrap();
    while semaphores.iter().any(|s| *s != 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        semaphores = usdt_semaphores(broker.pid()).unwrap();
    }
    let left: Vec<u32> = loaded_bpf_programs()
        .difference(&programs_before)
        .copied()
        .collect();
    println!("kill -9 on USDT probes: semaphores after {semaphores:?}; programs left {left:?}");
    assert!(
        semaphores.iter().all(|s| *s == 0),
        "gates left open: {semaphores:?}"
    );
    assert!(left.is_empty(), "eBPF programs left loaded: {left:?}");
    check_statuses(
        &rt.block_on(load::drive(&url, 200, 8, &Mix::default(), 2))
            .unwrap(),
    );
}

/// The broker crashes while attached: brokerprobe says so at once, writes out what it
/// has, and exits 0.
#[test]
fn broker_crash_is_reported_and_flushed() {
    require_root();
    let dir = scratch_dir("broker-crash");
    let observed = dir.join("requests.jsonl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut broker, url) = start_demo_broker(&[]).unwrap();
    let pid = broker.pid();
    let (mut probe, metrics_url) =
        attach_brokerprobe(pid, &["--requests-out", observed.to_str().unwrap()]).unwrap();
    let sent = rt
        .block_on(load::drive(&url, 300, 8, &Mix::default(), 1))
        .unwrap();
    rt.block_on(wait_for_requests(&metrics_url, sent.len()))
        .unwrap();

    broker.signal("KILL").unwrap();
    broker.wait_exit(Duration::from_secs(10)).unwrap();
    let crashed_at = Instant::now();
    let line = probe
        .wait_for_line(&format!("PID {pid} exited"), Duration::from_secs(5))
        .unwrap();
    let noticed = crashed_at.elapsed();
    let status = probe.wait_exit(Duration::from_secs(30)).unwrap();
    let written = read_jsonl(&observed).len();
    println!(
        "broker crash: brokerprobe said {line:?} {} ms after, exited {status}, {written} of {} \
         requests written out",
        noticed.as_millis(),
        sent.len()
    );
    assert!(status.success(), "brokerprobe exited {status}");
    assert!(
        noticed < Duration::from_millis(500),
        "noticed the exit after {noticed:?}"
    );
    assert_eq!(written, sent.len(), "requests not written out");
    assert!(
        probe.stdout.iter().any(|l| l.starts_with("route")),
        "no final table: {:#?}",
        probe.stdout
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// brokerprobe stalls (SIGSTOP) under load until the ring buffer overflows: the loss is
/// counted, requests that ran while records were lost (long streams across the stall) are
/// counted as incomplete instead of being reported with chunks or stages missing, and
/// those whose end never came expire.
#[test]
fn ring_overflow_reports_only_whole_requests() {
    require_root();
    /// Longer than the long streams, so only requests whose end was lost expire.
    const TIMEOUT: Duration = Duration::from_secs(5);
    const LONG_STREAMS: usize = 8;
    let dir = scratch_dir("overflow");
    let truth_path = dir.join("ground-truth.jsonl");
    let observed_path = dir.join("requests.jsonl");
    // gpt-fast answers at once in 5 chunks; claude-slow streams 30 chunks over 3 s, across
    // the stall below.
    let upstream_config = dir.join("upstream.json");
    std::fs::write(
        &upstream_config,
        r#"{"default": {"ttfb_ms": 0, "chunks": 5, "chunk_interval_ms": 0},
            "models": {"claude-slow": {"ttfb_ms": 0, "chunks": 30, "chunk_interval_ms": 100}}}"#,
    )
    .unwrap();
    let (_upstream, upstream_addr) = start_listening(
        "fake-upstream",
        Command::new(bin("fake-upstream")).args([
            "--config",
            upstream_config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ]),
    )
    .unwrap();
    let (mut broker, broker_addr) = start_listening(
        "demo-broker",
        Command::new(bin("demo-broker")).args([
            "--upstream",
            &format!("http://{upstream_addr}"),
            "--listen",
            "127.0.0.1:0",
            "--ground-truth",
            truth_path.to_str().unwrap(),
        ]),
    )
    .unwrap();
    let (mut probe, metrics_url) = attach_brokerprobe(
        broker.pid(),
        &[
            "--requests-out",
            observed_path.to_str().unwrap(),
            "--request-timeout",
            &format!("{}s", TIMEOUT.as_secs()),
        ],
    )
    .unwrap();
    let drive = |requests: usize, model: &str, seed: u64| {
        let url = format!("http://{broker_addr}");
        let mix = Mix {
            streaming: 1.0,
            tools: 0.0,
            fallback: 0.0,
            unknown_model: 0.0,
            models: vec![model.to_owned()],
            ..Mix::default()
        };
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(load::drive(&url, requests, 32, &mix, seed))
                .unwrap()
        })
    };
    let long = drive(LONG_STREAMS, "claude-slow", 1);
    let load = drive(20_000, "gpt-fast", 2);
    std::thread::sleep(Duration::from_millis(300));
    probe.signal("STOP").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    probe.signal("CONT").unwrap();
    let mut sent = load.join().unwrap();
    sent.extend(long.join().unwrap());
    check_statuses(&sent);
    // Requests whose end was lost expire after TIMEOUT (checked every second): then none
    // is left open.
    std::thread::sleep(TIMEOUT + Duration::from_secs(1));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics = rt
        .block_on(wait_for_counter(
            &metrics_url,
            "brokerprobe_requests_expired_total",
            1,
        ))
        .unwrap();
    let scrape = Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let lost_metric = counter_sum(&scrape, "brokerprobe_events_lost_total");
    let incomplete_metric = counter_sum(&scrape, "brokerprobe_requests_incomplete_total");
    probe.interrupt().unwrap();
    broker.signal("TERM").unwrap();
    broker.wait_exit(Duration::from_secs(30)).unwrap();

    let lost = health_figure(&probe.stdout, "(lost: ") + health_figure(&probe.stdout, "marker, ");
    let complete = health_figure(&probe.stdout, "requests ");
    let incomplete = health_figure(&probe.stdout, "expired, ");
    let expired = health_figure(&probe.stdout, "still open, ");
    let untracked = health_figure(&probe.stdout, "complete, ");
    let still_open = health_figure(&probe.stdout, "ended untracked, ");
    println!(
        "ring overflow: {} requests sent; {lost} records lost; {complete} reported whole, \
         {incomplete} incomplete, {expired} expired, {untracked} ended untracked, {still_open} \
         still open",
        sent.len()
    );
    assert!(
        lost > 0,
        "the ring buffer never overflowed: nothing was tested"
    );
    assert!(lost_metric > 0.0 && incomplete_metric > 0.0);
    assert!(
        incomplete >= LONG_STREAMS as u64,
        "streams across the stall not counted as incomplete"
    );
    assert!(expired > 0, "no request expired");
    assert_eq!(still_open, 0, "requests neither ended nor expired");
    assert!(complete > 0, "nothing reported after the overflow");

    // Every request reported is whole: the stages the broker itself recorded, no fewer.
    let truth = ground_truth(&truth_path);
    let observed = read_jsonl(&observed_path);
    assert_eq!(observed.len() as u64, complete);
    let stage_names = |r: &Json| -> Vec<String> {
        let mut names: Vec<String> = r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    for seen in &observed {
        let id = seen["request_id"].as_u64().unwrap();
        let true_request = &truth[&id];
        assert_eq!(
            stage_names(seen),
            stage_names(true_request),
            "request {id} reported without all its stages"
        );
        assert_eq!(
            seen["chunks"], true_request["chunks"],
            "request {id} chunks"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Past any consumer's limit (brokerprobe stopped while a marker is hit as fast as one
/// core can), every hit is either received or counted as lost: exactly.
#[test]
fn a_marker_storm_is_received_or_counted_exactly() {
    require_root();
    let mut generator = Proc::spawn(
        "marker_load",
        Command::new(bin("examples/marker_load")).args(["storm", "8000000", "3"]),
    )
    .unwrap();
    generator
        .wait_for_line("ready", Duration::from_secs(10))
        .unwrap();
    let (mut probe, _) = attach_brokerprobe(generator.pid(), &["--no-sockets"]).unwrap();
    generator.write_line("go").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    probe.signal("STOP").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    probe.signal("CONT").unwrap();
    let done = generator
        .wait_for_line("hits ", Duration::from_secs(60))
        .unwrap();
    let hits: u64 = done.split_whitespace().nth(1).unwrap().parse().unwrap();
    // What the ring buffer still holds is read within the poll interval.
    std::thread::sleep(Duration::from_millis(500));
    probe.interrupt().unwrap();
    let received = health_figure(&probe.stdout, "events ");
    let lost = health_figure(&probe.stdout, "(lost: ");
    println!("marker storm: {hits} hits = {received} received + {lost} lost (counted)");
    assert!(lost > 0, "nothing was lost: the overflow was not tested");
    assert_eq!(received + lost, hits, "hits neither received nor counted");
}

/// More streams open at once than the kernel has room to tally (`CHUNK_TALLIES`,
/// docs/maps.md): those past it go one record per chunk, and every chunk of every stream
/// is counted; the tallies go with their requests' ends.
#[test]
fn streams_past_the_tally_map_lose_no_chunk() {
    require_root();
    const STREAMS: usize = MAX_TALLIED_STREAMS as usize + 2_000;
    const CHUNKS: u64 = 3;
    let dir = scratch_dir("tally-overflow");
    let requests_out = dir.join("requests.jsonl");
    let mut generator = Proc::spawn(
        "marker_load",
        Command::new(bin("examples/marker_load")).args([
            "streams",
            &STREAMS.to_string(),
            &CHUNKS.to_string(),
        ]),
    )
    .unwrap();
    generator
        .wait_for_line("ready", Duration::from_secs(10))
        .unwrap();
    let (mut probe, _) = attach_brokerprobe(
        generator.pid(),
        &[
            "--no-sockets",
            "--requests-out",
            requests_out.to_str().unwrap(),
        ],
    )
    .unwrap();
    generator.write_line("go").unwrap();
    generator
        .wait_for_line("chunked", Duration::from_secs(60))
        .unwrap();
    let tallied = chunk_tallies_of(probe.pid(), generator.pid()).unwrap();
    generator.write_line("end").unwrap();
    generator
        .wait_for_line("ended", Duration::from_secs(60))
        .unwrap();
    let left = chunk_tallies_of(probe.pid(), generator.pid()).unwrap();
    // What the ring buffer still holds is read within the poll interval.
    std::thread::sleep(Duration::from_millis(500));
    probe.interrupt().unwrap();
    let lost = health_figure(&probe.stdout, "(lost: ");
    let requests = read_jsonl(&requests_out);
    let miscounted: Vec<&Json> = requests.iter().filter(|r| r["chunks"] != CHUNKS).collect();
    println!(
        "{STREAMS} streams of {CHUNKS} chunks: {tallied} tallied in the kernel, {} reported, \
         {} with another chunk count, {lost} events lost, {left} tallies left",
        requests.len(),
        miscounted.len()
    );
    assert_eq!(
        tallied, MAX_TALLIED_STREAMS as usize,
        "the map was not filled"
    );
    assert_eq!(lost, 0, "events lost: the fallback was not what was tested");
    assert_eq!(requests.len(), STREAMS, "requests reported");
    assert!(
        miscounted.is_empty(),
        "chunks miscounted, e.g. {:?}",
        miscounted.first()
    );
    assert_eq!(left, 0, "tallies left after every request ended");
    let _ = std::fs::remove_dir_all(dir);
}

/// The OTLP receiver accepts and never answers, and scrapers connect and stall (never
/// finish a request, or never read the answer): brokerprobe's memory stays bounded, every
/// request is still counted, the lost spans are counted, and /metrics answers again once
/// the stalled scrapers are gone.
#[test]
fn stalled_receiver_and_scrapers_keep_memory_bounded() {
    require_root();
    /// brokerprobe's RSS may grow this much while everything downstream stalls (the trace
    /// queue holds up to --trace-queue traces; /metrics serves 16 connections at once).
    const RSS_GROWTH_BOUND_KB: u64 = 16 * 1024;
    const REQUESTS: usize = 3_000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Accepts every connection and holds it, silent.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming() {
            held.push(stream);
        }
    });
    let (broker, url) = start_demo_broker(&[]).unwrap();
    let endpoint = format!("http://{silent_addr}/v1/traces");
    let (mut probe, metrics_url) = attach_brokerprobe(
        broker.pid(),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-timeout",
            "1s",
            "--exchange-idle",
            "300ms",
        ],
    )
    .unwrap();
    let metrics_addr: std::net::SocketAddr = metrics_url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .parse()
        .unwrap();
    rt.block_on(load::drive(&url, 200, 16, &Mix::default(), 1))
        .unwrap();
    let rss_before = e2e::harness::rss_kb(probe.pid());

    // 300 scrapers that never send a whole request, 100 that ask and never read.
    let mut stalled = Vec::new();
    for i in 0..400 {
        let connect =
            std::net::TcpStream::connect_timeout(&metrics_addr, Duration::from_millis(100));
        let Ok(mut stream) = connect else {
            continue; // the listen backlog is full: that is the bound working
        };
        if i >= 300 {
            use std::io::Write as _;
            let ask = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(50);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = stream.write_all(ask.as_bytes());
        }
        stalled.push(stream);
    }
    let sent = rt
        .block_on(load::drive(&url, REQUESTS, 16, &Mix::default(), 2))
        .unwrap();
    check_statuses(&sent);
    std::thread::sleep(Duration::from_secs(3));
    let rss_during = e2e::harness::rss_kb(probe.pid());
    let held = stalled.len();
    drop(stalled);

    // Served again once they are gone (the stalled ones are let go within 10 s).
    let metrics = rt
        .block_on(wait_for_requests(&metrics_url, REQUESTS + 200))
        .unwrap();
    let scrape = Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let requests = counter_sum(&scrape, "brokerprobe_requests_total");
    let spans_dropped = counter_sum(&scrape, "brokerprobe_trace_spans_dropped_total");
    probe.interrupt().unwrap();
    drop(broker);
    let growth = rss_during.saturating_sub(rss_before);
    println!(
        "stalled downstream: {held} stalled scraper connections, OTLP receiver silent; RSS \
         {rss_before} KiB before, {rss_during} KiB after {REQUESTS} requests (+{growth} KiB, \
         bound {RSS_GROWTH_BOUND_KB} KiB); {requests} requests counted, {spans_dropped} spans \
         dropped (counted)"
    );
    assert_eq!(requests, (REQUESTS + 200) as f64);
    assert!(
        spans_dropped > 0.0,
        "spans sent to a silent receiver not counted"
    );
    assert!(growth <= RSS_GROWTH_BOUND_KB, "RSS grew {growth} KiB");
}
