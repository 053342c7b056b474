//! Sockets end to end: brokerprobe's socket view of upstream calls against the fake
//! upstream's own ledger of what crossed its sockets (a separate process, the other end of
//! each TCP connection), for the demo broker with markers, the demo broker without them,
//! and a Python broker.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use e2e::{
    harness::{
        Proc, attach_brokerprobe, bin, read_jsonl, require_root, scratch_dir, start_listening,
        wait_for_counter,
    },
    load::{self, Mix, Outcome, Pace, Target},
};
use fake_upstream::monotonic_ns;
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::Value as Json;

/// The fake upstream's script: first byte after 200 ms, then 5 chunks 50 ms apart.
const TTFB_MS: u64 = 200;
const CHUNKS: u32 = 5;
const CHUNK_INTERVAL_MS: u64 = 50;
/// Bounds on network TTFB minus the upstream's own time from reading the request to
/// writing its first byte, at p50 and p95: loopback delivery and the upstream's wake-up,
/// which on 2 loaded cores reaches a few milliseconds at p95. A wrong request start (an
/// earlier exchange's, the connect) would be hundreds of milliseconds off.
const TTFB_EXCESS_BOUNDS_NS: [(f64, u64); 2] = [(0.5, 1_000_000), (0.95, 5_000_000)];
/// Requests sent while attached, at most `CONCURRENCY` at once, after a warm-up at
/// `WARM_CONCURRENCY`: fewer upstream connections than the load needs, so the load opens
/// new ones while attached and reuses the warm ones.
const WARM_CONCURRENCY: usize = 24;
const CONCURRENCY: usize = 64;
const REQUESTS: usize = 640;
/// Requests started per second at most: more than CONCURRENCY requests of ~400 ms each
/// need, so the concurrency cap is what holds the load back.
const START_RATE: f64 = 200.0;
/// Then requests one at a time: each upstream call happens while exactly one inbound
/// request waits, so even without markers brokerprobe relates the two.
const SEQUENTIAL: usize = 16;
const TOTAL: usize = REQUESTS + SEQUENTIAL;
/// Share of upstream exchanges that must be attributed to the right broker request.
const MIN_ATTRIBUTION: f64 = 0.99;

#[derive(Clone, Copy, PartialEq)]
enum Broker {
    /// The demo broker, markers on, brokerprobe in its default (auto) mode.
    DemoWithMarkers,
    /// The demo broker with markers off, brokerprobe told `--mode sockets`.
    DemoWithoutMarkers,
    /// tests/py-broker, attached in auto mode (it has no markers).
    Python,
}

#[test]
fn upstream_calls_match_the_upstream_ledger_with_markers() {
    require_root();
    let run = profile(Broker::DemoWithMarkers);
    check_attribution(&run.matched, "demo broker, markers");
    check_lag(&run);
}

/// Attribution where it is hardest: the demo's fast models (first byte after 5 ms, chunks
/// 2 ms apart, so 64 requests' socket I/O interleaves densely), tool loops and fallbacks
/// (several upstream calls per request), plain and streamed answers.
#[test]
fn attribution_under_mixed_load() {
    require_root();
    let dir = scratch_dir("sockets-mixed");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_fake, upstream_url) = start_fake_upstream(&["--demo-models"]);
    let (broker, broker_addr) = start_broker(Broker::DemoWithMarkers, &upstream_url);
    let url = format!("http://{broker_addr}");
    let mix = Mix::default();
    rt.block_on(load::drive(
        &url,
        2 * WARM_CONCURRENCY,
        WARM_CONCURRENCY,
        &mix,
        1,
    ))
    .unwrap();
    let exchanges_path = dir.join("exchanges.jsonl");
    let args = [
        "--exchanges-out",
        exchanges_path.to_str().unwrap(),
        "--exchange-idle",
        "300ms",
    ];
    let (mut probe, metrics_url) = attach_brokerprobe(broker.pid(), &args).unwrap();
    let attached_ns = monotonic_ns();
    let sent = rt
        .block_on(load::drive(&url, REQUESTS, CONCURRENCY, &mix, 2))
        .unwrap();
    let kinds = |f: fn(&Outcome) -> bool| sent.iter().filter(|o| f(o)).count();
    let ledger = chat_calls_since(&rt.block_on(chat_calls(&upstream_url)), attached_ns);
    rt.block_on(wait_for_counter(
        &metrics_url,
        "brokerprobe_upstream_exchanges_total",
        ledger.len(),
    ))
    .unwrap();
    probe.interrupt().unwrap();
    let exchanges = read_jsonl(&exchanges_path);
    let upstream = upstream_exchanges(&exchanges);
    let matched = match_to_ledger(&upstream, &ledger);
    assert_eq!(matched.len(), ledger.len(), "upstream calls not observed");
    assert_eq!(upstream.len(), ledger.len(), "calls the upstream never saw");
    println!(
        "sockets (mixed): {} requests ({} streamed, {} with tools, {} falling back) made {} \
         upstream calls",
        sent.len(),
        kinds(|o| o.kind.streaming),
        kinds(|o| o.kind.tools),
        kinds(|o| o.kind.target == Target::Fallback),
        ledger.len()
    );
    check_attribution(&matched, "mixed");
}

#[test]
fn socket_only_mode_demo_broker_without_markers() {
    require_root();
    profile(Broker::DemoWithoutMarkers);
}

#[test]
fn socket_only_mode_python_broker() {
    require_root();
    let run = profile(Broker::Python);
    assert!(
        run.probe_stdout
            .iter()
            .any(|l| l.contains("socket-only mode")),
        "no notice that socket-only mode was chosen: {:#?}",
        run.probe_stdout
    );
}

/// Socket I/O outside the read/write-family syscalls brokerprobe follows (here `sendfile`,
/// right after a `send` on the same socket) is counted, and never taken for the last such
/// syscall's I/O: each exchange's request is the `send`'s bytes alone.
#[test]
fn io_outside_followed_syscalls_is_counted_not_misattributed() {
    const ROUNDS: usize = 20;
    const BODY: usize = 4096;
    const HEAD: &[u8] = b"POST /upload HTTP/1.1\r\nContent-Length: 4096\r\n\r\n";
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    require_root();
    let dir = scratch_dir("sockets-sendfile");
    let exchanges_path = dir.join("exchanges.jsonl");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut peer, _) = listener.accept().unwrap();
        let mut message = vec![0; HEAD.len() + BODY];
        for _ in 0..ROUNDS {
            peer.read_exact(&mut message).unwrap();
            assert_eq!(&message[..HEAD.len()], HEAD);
            peer.write_all(ANSWER).unwrap();
        }
    });
    let script = format!(
        "import os, socket, sys, tempfile\n\
         body = tempfile.TemporaryFile(); body.write(b'x' * {BODY}); body.flush()\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         print('connected', flush=True); sys.stdin.readline()\n\
         for _ in range({ROUNDS}):\n\
         \x20   s.send(b{head:?})\n\
         \x20   assert os.sendfile(s.fileno(), body.fileno(), 0, {BODY}) == {BODY}\n\
         \x20   got = b''\n\
         \x20   while len(got) < {answer}: got += s.recv(1024)\n\
         print('done', flush=True); sys.stdin.readline()\n",
        head = String::from_utf8_lossy(HEAD),
        answer = ANSWER.len(),
    );
    let mut followed =
        FollowedClient::start("sendfile client", &script, "connected", &exchanges_path);
    followed
        .client
        .wait_for_line("done", Duration::from_secs(30))
        .unwrap();
    server.join().unwrap();
    let text = followed.wait_for_counter("brokerprobe_socket_io_unfollowed_total", ROUNDS);
    let metrics = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert_eq!(
        e2e::harness::counter_sum(&metrics, "brokerprobe_socket_io_unfollowed_total"),
        ROUNDS as f64,
        "one sendfile per round counted"
    );
    let exchanges = followed.finish();
    let upstream = upstream_exchanges(&exchanges);
    assert_eq!(upstream.len(), ROUNDS, "{exchanges:#?}");
    for exchange in upstream {
        assert_eq!(exchange["request_bytes"], HEAD.len(), "{exchange}");
        assert_eq!(exchange["response_bytes"], ANSWER.len(), "{exchange}");
        assert_eq!(exchange["path"], "/upload", "{exchange}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A connection over IPv6, made after attach: its connect is seen in the kernel
/// (`connect_ns`) and its endpoints come from the kernel's record of the connect,
/// 16-byte addresses included.
#[test]
fn an_ipv6_connection_is_followed_with_its_addresses() {
    const ROUNDS: usize = 5;
    const HEAD: &[u8] = b"GET /v6 HTTP/1.1\r\nHost: x\r\n\r\n";
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    require_root();
    let dir = scratch_dir("sockets-ipv6");
    let exchanges_path = dir.join("exchanges.jsonl");
    let listener = std::net::TcpListener::bind("[::1]:0")
        .expect("IPv6 loopback ([::1]) is needed for this test");
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut peer, _) = listener.accept().unwrap();
        let mut head = vec![0; HEAD.len()];
        for _ in 0..ROUNDS {
            peer.read_exact(&mut head).unwrap();
            peer.write_all(ANSWER).unwrap();
        }
    });
    let script = format!(
        "import socket, sys\n\
         print('ready', flush=True); sys.stdin.readline()\n\
         s = socket.create_connection(('::1', {port}))\n\
         for _ in range({ROUNDS}):\n\
         \x20   s.sendall(b{head:?})\n\
         \x20   got = b''\n\
         \x20   while len(got) < {answer}: got += s.recv(1024)\n\
         print('port', s.getsockname()[1], flush=True)\n\
         s.close(); sys.stdin.readline()\n",
        head = String::from_utf8_lossy(HEAD),
        answer = ANSWER.len(),
    );
    let mut followed = FollowedClient::start("IPv6 client", &script, "ready", &exchanges_path);
    let local_port = followed
        .client
        .wait_for_line("port ", Duration::from_secs(30))
        .unwrap()
        .trim()
        .trim_start_matches("port ")
        .parse::<u16>()
        .expect("the client prints its local port");
    server.join().unwrap();
    followed.wait_for_counter("brokerprobe_upstream_exchanges_total", ROUNDS);
    let exchanges = followed.finish();
    let upstream = upstream_exchanges(&exchanges);
    assert_eq!(upstream.len(), ROUNDS, "{exchanges:#?}");
    // The connect's time goes with the connection's first exchange (the file is in the
    // order exchanges were written out, not begun).
    let first = upstream
        .iter()
        .min_by_key(|e| e["start_ns"].as_u64().unwrap())
        .unwrap();
    assert!(first["connect_ns"].as_u64().is_some(), "{first:#}");
    for exchange in upstream {
        assert_eq!(exchange["remote"], format!("[::1]:{port}"), "{exchange}");
        assert_eq!(
            exchange["local"],
            format!("[::1]:{local_port}"),
            "{exchange}"
        );
        assert_eq!(exchange["request_bytes"], HEAD.len(), "{exchange}");
        assert_eq!(exchange["response_bytes"], ANSWER.len(), "{exchange}");
        assert_eq!(exchange["path"], "/v6", "{exchange}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Without the kernel's BTF (hidden by a bind mount in a private mount namespace) the
/// write-start tracepoint, a BTF tracepoint, cannot be attached: brokerprobe says that
/// this is why, not the kernel's version, and follows the sockets all the same (writes
/// timed when they are done).
#[test]
fn without_kernel_btf_sockets_are_followed_and_the_cause_is_said() {
    const ROUNDS: usize = 5;
    const HEAD: &[u8] = b"GET /no-btf HTTP/1.1\r\nHost: x\r\n\r\n";
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    require_root();
    let dir = scratch_dir("sockets-no-btf");
    let exchanges_path = dir.join("exchanges.jsonl");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut peer, _) = listener.accept().unwrap();
        let mut head = vec![0; HEAD.len()];
        for _ in 0..ROUNDS {
            peer.read_exact(&mut head).unwrap();
            peer.write_all(ANSWER).unwrap();
        }
    });
    let script = format!(
        "import socket, sys\n\
         print('ready', flush=True); sys.stdin.readline()\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         for _ in range({ROUNDS}):\n\
         \x20   s.sendall(b{head:?})\n\
         \x20   got = b''\n\
         \x20   while len(got) < {answer}: got += s.recv(1024)\n\
         print('done', flush=True); sys.stdin.readline()\n",
        head = String::from_utf8_lossy(HEAD),
        answer = ANSWER.len(),
    );
    let attach_without_btf = |pid: u32, args: &[&str]| {
        // Warnings go to stderr: merged into the stdout the harness reads.
        let command = format!(
            "mount --bind /dev/null /sys/kernel/btf/vmlinux && exec {probe} attach --pid {pid} \
             --metrics-addr 127.0.0.1:0 {args} 2>&1",
            probe = bin("brokerprobe").display(),
            args = args.join(" "),
        );
        let mut probe = Proc::spawn(
            "brokerprobe without BTF",
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(command),
        )
        .unwrap();
        let line = probe
            .wait_for_line("brokerprobe: attached", Duration::from_secs(60))
            .unwrap();
        let metrics_url = line.rsplit(' ').next().unwrap().to_owned();
        (probe, metrics_url)
    };
    let mut followed = FollowedClient::start_with(
        "client",
        &script,
        "ready",
        &exchanges_path,
        attach_without_btf,
    );
    let warning = followed
        .probe
        .stdout
        .iter()
        .find(|line| line.contains("tcp:tcp_sendmsg_locked"))
        .unwrap_or_else(|| {
            panic!(
                "no word of the write-start tracepoint: {:?}",
                followed.probe.stdout
            )
        });
    assert!(
        warning.contains("needs the kernel's BTF") && !warning.contains("Linux 6.11"),
        "the cause is the missing BTF, not the kernel's version: {warning}"
    );
    followed
        .client
        .wait_for_line("done", Duration::from_secs(30))
        .unwrap();
    server.join().unwrap();
    followed.wait_for_counter("brokerprobe_upstream_exchanges_total", ROUNDS);
    let exchanges = followed.finish();
    let upstream = upstream_exchanges(&exchanges);
    assert_eq!(upstream.len(), ROUNDS, "{exchanges:#?}");
    for exchange in upstream {
        assert_eq!(exchange["request_bytes"], HEAD.len(), "{exchange}");
        assert_eq!(exchange["response_bytes"], ANSWER.len(), "{exchange}");
        assert_eq!(exchange["path"], "/no-btf", "{exchange}");
        assert!(exchange["ttfb_ns"].as_u64().is_some(), "{exchange}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A Python client of a server in this test, followed by brokerprobe in socket-only
/// mode: spawned, attached to once it prints its ready line, then told to go (its script
/// reads a line from stdin for each).
struct FollowedClient {
    client: Proc,
    probe: Proc,
    metrics_url: String,
    exchanges_out: PathBuf,
}

impl FollowedClient {
    fn start(name: &str, script: &str, ready: &str, exchanges_out: &Path) -> Self {
        Self::start_with(name, script, ready, exchanges_out, |pid, args| {
            attach_brokerprobe(pid, args).unwrap()
        })
    }

    /// [`FollowedClient::start`], with brokerprobe started by `attach` (given the
    /// client's PID and brokerprobe's arguments after `--pid`).
    fn start_with(
        name: &str,
        script: &str,
        ready: &str,
        exchanges_out: &Path,
        attach: impl FnOnce(u32, &[&str]) -> (Proc, String),
    ) -> Self {
        let mut client = Proc::spawn(name, Command::new("python3").args(["-c", script])).unwrap();
        client
            .wait_for_line(ready, Duration::from_secs(30))
            .unwrap();
        let args = [
            "--mode",
            "sockets",
            "--exchanges-out",
            exchanges_out.to_str().unwrap(),
        ];
        let (probe, metrics_url) = attach(client.pid(), &args);
        client.write_line("go").unwrap();
        Self {
            client,
            probe,
            metrics_url,
            exchanges_out: exchanges_out.to_owned(),
        }
    }

    /// The metrics page once `counter` reached `expected` (or timed out).
    fn wait_for_counter(&self, counter: &str, expected: usize) -> String {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(wait_for_counter(&self.metrics_url, counter, expected))
            .unwrap()
    }

    /// Stops brokerprobe (it must exit cleanly), lets the client go, and returns the
    /// exchanges brokerprobe wrote.
    fn finish(mut self) -> Vec<Json> {
        self.probe.interrupt().unwrap();
        assert!(
            self.probe
                .wait_exit(Duration::from_secs(30))
                .unwrap()
                .success()
        );
        self.client.write_line("exit").unwrap();
        read_jsonl(&self.exchanges_out)
    }
}

/// One brokerprobe exchange matched to the upstream's record of it.
struct Matched {
    observed: Json,
    ledger: Json,
}

struct Run {
    matched: Vec<Matched>,
    requests: Vec<Json>,
    probe_stdout: Vec<String>,
}

/// Starts the fake upstream and `broker`, warms the broker's upstream pool, attaches
/// brokerprobe, sends the load, and checks what holds for every mode; returns the rest.
fn profile(broker: Broker) -> Run {
    let name = match broker {
        Broker::DemoWithMarkers => "demo-markers",
        Broker::DemoWithoutMarkers => "demo-no-markers",
        Broker::Python => "python",
    };
    let dir = scratch_dir(&format!("sockets-{name}"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_fake, upstream_url) = start_fake_upstream(&[
        "--ttfb-ms",
        &TTFB_MS.to_string(),
        "--chunks",
        &CHUNKS.to_string(),
        "--chunk-interval-ms",
        &CHUNK_INTERVAL_MS.to_string(),
    ]);
    let (broker_proc, broker_addr) = start_broker(broker, &upstream_url);
    let url = format!("http://{broker_addr}");
    let mix = Mix::streaming_only();

    let warm = rt
        .block_on(load::drive(
            &url,
            2 * WARM_CONCURRENCY,
            WARM_CONCURRENCY,
            &mix,
            1,
        ))
        .unwrap();
    check_ok(&warm);

    let exchanges_path = dir.join("exchanges.jsonl");
    let requests_path = dir.join("requests.jsonl");
    let mut args = vec![
        "--exchanges-out",
        exchanges_path.to_str().unwrap(),
        "--requests-out",
        requests_path.to_str().unwrap(),
        "--exchange-idle",
        "300ms",
    ];
    let upstream_name = format!("fake={}", upstream_url.trim_start_matches("http://"));
    args.extend(["--upstream", &upstream_name]);
    if broker == Broker::DemoWithoutMarkers {
        args.extend(["--mode", "sockets"]);
    }
    let (mut probe, metrics_url) = attach_brokerprobe(broker_proc.pid(), &args).unwrap();
    let attached_ns = monotonic_ns();

    // Started a few milliseconds apart, as clients do, not all in the same instant: 64
    // identical streams started at once stay in lockstep, and the upstream then owes 64
    // answers in the same instant and sends the last of them a millisecond or two late.
    let pace = Pace {
        total: Some(REQUESTS),
        concurrency: CONCURRENCY,
        rate: Some(START_RATE),
    };
    let sent = rt
        .block_on(load::drive_paced(
            &url,
            pace,
            &mix,
            2,
            std::future::pending(),
        ))
        .unwrap();
    check_ok(&sent);
    let sequential_from_ns = monotonic_ns();
    let sent = rt
        .block_on(load::drive(&url, SEQUENTIAL, 1, &mix, 3))
        .unwrap();
    check_ok(&sent);
    // Until every exchange has ended (next request, close, or the idle timeout) and been
    // exported.
    let mut text = String::new();
    for role in ["upstream", "inbound"] {
        let counter = format!("brokerprobe_{role}_exchanges_total");
        text = rt
            .block_on(wait_for_counter(&metrics_url, &counter, TOTAL))
            .unwrap();
    }
    let metrics = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    probe.interrupt().unwrap();
    let health = probe
        .stdout
        .iter()
        .find(|l| l.starts_with("sockets: "))
        .cloned()
        .unwrap_or_else(|| panic!("no sockets health line: {:#?}", probe.stdout));
    println!("sockets ({name}): {health}");
    assert!(
        [
            ", 0 unresolved",
            "; 0 I/O outside",
            "; 0 response reads without arrival time",
            "; 0 socket tallies lost",
        ]
        .iter()
        .all(|clean| health.contains(clean)),
        "{health}"
    );

    // Every chat call the upstream saw, and those of them made while attached.
    let all_calls = rt.block_on(chat_calls(&upstream_url));
    let ledger = chat_calls_since(&all_calls, attached_ns);
    assert_eq!(
        ledger.len(),
        TOTAL,
        "the upstream saw other calls than ours"
    );
    let exchanges = read_jsonl(&exchanges_path);
    let upstream = upstream_exchanges(&exchanges);
    // Both ends named, the upstream's as the broker dialled it (from the kernel's record
    // of the connect, for connections made while attached).
    let upstream_addr = upstream_url.trim_start_matches("http://");
    for e in &upstream {
        assert_eq!(e["remote"], upstream_addr, "{e}");
        let local = e["local"].as_str().unwrap_or_default();
        assert!(local.starts_with("127.0.0.1:"), "{e}");
    }
    let matched = match_to_ledger(&upstream, &ledger);
    if matched.len() != upstream.len() {
        let ids: std::collections::HashSet<u64> = matched
            .iter()
            .map(|m| m.observed["id"].as_u64().unwrap())
            .collect();
        for e in upstream
            .iter()
            .filter(|e| !ids.contains(&e["id"].as_u64().unwrap()))
        {
            let port: Option<u64> = e["local"]
                .as_str()
                .and_then(|local| local.rsplit(':').next()?.parse().ok());
            let same_port: Vec<&Json> = ledger
                .iter()
                .filter(|r| r["peer_port"].as_u64() == port)
                .collect();
            eprintln!("unmatched: {e}\n  upstream records on its port: {same_port:?}");
        }
    }
    assert_eq!(
        matched.len(),
        TOTAL,
        "{} upstream exchanges observed, {} of the upstream's {} calls matched",
        upstream.len(),
        matched.len(),
        ledger.len()
    );
    assert_eq!(
        upstream.len(),
        TOTAL,
        "exchanges observed that the upstream never saw"
    );

    let in_flight = max_in_flight(&ledger);
    assert!(
        in_flight + 4 >= CONCURRENCY,
        "the upstream saw at most {in_flight} calls at once"
    );
    println!("sockets ({name}): up to {in_flight} upstream calls at once");
    check_bytes_and_chunks(&matched);
    let (new, reused) = check_connect(&matched, &all_calls, attached_ns);
    check_ttfb(&matched, name);
    check_inbound(&exchanges, TOTAL);
    check_inbound_relation(&exchanges, sequential_from_ns, name);
    check_metrics(&metrics, &matched, new);
    println!(
        "sockets ({name}): {} upstream exchanges matched the upstream's ledger byte for \
         byte; {new} on new connections (with connect time), {reused} reused",
        matched.len()
    );
    drop(broker_proc);
    Run {
        matched,
        requests: read_jsonl(&requests_path),
        probe_stdout: probe.stdout.clone(),
    }
}

fn start_broker(broker: Broker, upstream_url: &str) -> (Proc, String) {
    let mut command = match broker {
        Broker::DemoWithMarkers | Broker::DemoWithoutMarkers => {
            let mut command = Command::new(bin("demo-broker"));
            command.args(["--listen", "127.0.0.1:0", "--upstream", upstream_url]);
            // Enough keys that the pool never holds requests back: the load is about
            // the upstream here.
            command.args(["--keys", "16", "--per-key-concurrency", "16"]);
            if broker == Broker::DemoWithoutMarkers {
                command.arg("--no-markers");
            }
            command
        }
        Broker::Python => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../py-broker/broker.py");
            let mut command = Command::new("python3");
            command.arg(script).args([
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                upstream_url,
                "--pool-size",
                &CONCURRENCY.to_string(),
            ]);
            command
        }
    };
    start_listening("broker", &mut command).unwrap()
}

fn check_ok(outcomes: &[Outcome]) {
    for outcome in outcomes {
        assert_eq!(outcome.status, 200, "{outcome:?}");
        // The content chunks, and the final one with the finish reason.
        assert_eq!(outcome.chunks, CHUNKS + 1, "{outcome:?}");
    }
}

/// The most calls the upstream had under way at once (first read to last write).
fn max_in_flight(ledger: &[Json]) -> usize {
    let mut edges: Vec<(u64, i32)> = ledger
        .iter()
        .flat_map(|r| {
            let ns = |field: &str| r[field].as_u64().unwrap();
            [(ns("first_read_ns"), 1), (ns("last_write_ended_ns"), -1)]
        })
        .collect();
    edges.sort_unstable();
    let (mut now, mut most) = (0, 0);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    most as usize
}

fn upstream_exchanges(exchanges: &[Json]) -> Vec<&Json> {
    exchanges
        .iter()
        .filter(|e| e["role"] == "upstream")
        .collect()
}

/// Pairs each observed upstream exchange with the upstream's record of the same call:
/// same connection (the broker's local port is the upstream's peer port), received
/// between the first request byte written and the first response byte read.
fn match_to_ledger(upstream: &[&Json], ledger: &[Json]) -> Vec<Matched> {
    let mut by_port: HashMap<u16, Vec<&Json>> = HashMap::new();
    for record in ledger {
        let port = record["peer_port"].as_u64().unwrap() as u16;
        by_port.entry(port).or_default().push(record);
    }
    let mut matched = Vec::new();
    for observed in upstream {
        let local: std::net::SocketAddr = observed["local"]
            .as_str()
            .unwrap_or_else(|| panic!("upstream exchange without local address: {observed}"))
            .parse()
            .unwrap();
        let start = observed["start_ns"].as_u64().unwrap();
        let first_response = observed["first_response_ns"].as_u64().unwrap();
        let found: Vec<&&Json> = by_port
            .get(&local.port())
            .map(|records| {
                records
                    .iter()
                    .filter(|r| {
                        (start..=first_response).contains(&r["received_ns"].as_u64().unwrap())
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert!(found.len() <= 1, "{observed} matches {found:?}");
        if let Some(ledger) = found.first() {
            matched.push(Matched {
                observed: (*observed).clone(),
                ledger: (**ledger).clone(),
            });
        }
    }
    matched
}

fn check_bytes_and_chunks(matched: &[Matched]) {
    for m in matched {
        let (o, l) = (&m.observed, &m.ledger);
        assert_eq!(
            o["request_bytes"], l["request_bytes"],
            "request bytes: {o} vs {l}"
        );
        assert_eq!(
            o["response_bytes"], l["response_bytes"],
            "response bytes: {o} vs {l}"
        );
        assert_eq!(
            o["response_chunks"], l["writes"],
            "chunks vs upstream writes: {o} vs {l}"
        );
        assert_eq!(o["response_chunks"], CHUNKS, "chunks: {o}");
        assert_eq!(o["status"], 200, "{o}");
        assert_eq!(o["path"], "/v1/chat/completions", "{o}");
        assert_eq!(o["peer"], "fake", "{o}");
    }
}

/// The first call on a connection opened while attached carries a connect time; calls on
/// connections opened before, and later calls on new ones, do not. Returns (new, reused).
fn check_connect(matched: &[Matched], ledger: &[Json], attached_ns: u64) -> (usize, usize) {
    let mut first_on_port: HashMap<u64, u64> = HashMap::new();
    for record in ledger {
        let port = record["peer_port"].as_u64().unwrap();
        let at = record["received_ns"].as_u64().unwrap();
        let first = first_on_port.entry(port).or_insert(at);
        *first = (*first).min(at);
    }
    let (mut new, mut reused) = (0, 0);
    for m in matched {
        let port = m.ledger["peer_port"].as_u64().unwrap();
        let first = first_on_port[&port];
        let opens_connection =
            first > attached_ns && first == m.ledger["received_ns"].as_u64().unwrap();
        let connect = m.observed["connect_ns"].as_u64();
        if opens_connection {
            let connect = connect
                .unwrap_or_else(|| panic!("new connection without connect time: {}", m.observed));
            assert!(connect > 0 && connect < 100_000_000, "{}", m.observed);
            new += 1;
        } else {
            assert_eq!(
                connect, None,
                "reused connection with connect time: {}",
                m.observed
            );
            reused += 1;
        }
    }
    assert!(new > 0, "the load opened no new upstream connection");
    assert!(reused > 0, "the load reused no upstream connection");
    (new, reused)
}

/// Arrivals are timed exactly: on loopback the upstream's bytes reach the broker's
/// socket during the upstream's write syscall, so each exchange's first and last response
/// arrival lies within the upstream's own record of that write; the request went out
/// before the upstream read it. Then network TTFB is the upstream's own time to its first
/// byte plus delivery: compared with that, not with the script, which a host hiccup on
/// this shared VM can make even a real-time upstream miss by milliseconds.
fn check_ttfb(matched: &[Matched], name: &str) {
    let ns = |json: &Json, field: &str| {
        json[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} missing: {json}"))
    };
    for m in matched {
        let (o, l) = (&m.observed, &m.ledger);
        for (arrival, write) in [
            ("first_response_ns", "first_write"),
            ("last_response_ns", "last_write"),
        ] {
            let window = ns(l, &format!("{write}_began_ns"))..=ns(l, &format!("{write}_ended_ns"));
            assert!(
                window.contains(&ns(o, arrival)),
                "{arrival} outside the upstream's {write} {window:?}: {o} vs {l}"
            );
        }
        assert!(ns(o, "start_ns") <= ns(l, "first_read_ns"), "{o} vs {l}");
    }
    let sorted = |of: &dyn Fn(&Matched) -> u64| {
        let mut values: Vec<u64> = matched.iter().map(of).collect();
        values.sort_unstable();
        values
    };
    let ttfb = sorted(&|m| ns(&m.observed, "ttfb_ns"));
    let read_late = sorted(&|m| ns(&m.ledger, "first_read_ns") - ns(&m.observed, "start_ns"));
    let own_of =
        |m: &Matched| ns(&m.ledger, "first_write_began_ns") - ns(&m.ledger, "first_read_ns");
    let own = sorted(&own_of);
    // Never negative: the checks above put the request before the upstream's read and
    // the first byte's arrival after its write began.
    let beyond_upstream = sorted(&|m| ns(&m.observed, "ttfb_ns") - own_of(m));
    let at = |sorted: &[u64], q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    let ms = |ns: u64| ns as f64 / 1e6;
    let figures = format!(
        "sockets ({name}): network TTFB p50 {:.3} ms, p95 {:.3} ms (upstream scripted {TTFB_MS} \
         ms; it read the request p50 {:.3} ms, p95 {:.3} ms after it was sent, and took \
         p50 {:.3} ms, p95 {:.3} ms from there to its first write; TTFB beyond that p50 {:.3} \
         ms, p95 {:.3} ms)",
        ms(at(&ttfb, 0.5)),
        ms(at(&ttfb, 0.95)),
        ms(at(&read_late, 0.5)),
        ms(at(&read_late, 0.95)),
        ms(at(&own, 0.5)),
        ms(at(&own, 0.95)),
        ms(at(&beyond_upstream, 0.5)),
        ms(at(&beyond_upstream, 0.95)),
    );
    println!("{figures}");
    for (q, bound) in TTFB_EXCESS_BOUNDS_NS {
        let excess = at(&beyond_upstream, q);
        assert!(
            excess <= bound,
            "network TTFB exceeds the upstream's own time to first byte by {excess} ns at \
             p{}, more than {bound} ns: {figures}",
            q * 100.0
        );
    }
}

/// Every load request is an inbound exchange, with its HTTP request and status lines.
fn check_inbound(exchanges: &[Json], requests: usize) {
    let inbound: Vec<&Json> = exchanges
        .iter()
        .filter(|e| e["role"] == "inbound")
        .collect();
    assert_eq!(inbound.len(), requests, "inbound exchanges");
    for e in inbound {
        assert_eq!(e["method"], "POST", "{e}");
        assert_eq!(e["path"], "/v1/chat/completions", "{e}");
        assert_eq!(e["status"], 200, "{e}");
        let duration = e["duration_ns"].as_u64().unwrap();
        let ttfb = e["ttfb_ns"].as_u64().unwrap();
        assert!(ttfb >= TTFB_MS * 1_000_000 && duration > ttfb, "{e}");
    }
}

/// An upstream exchange related to an inbound one (socket-only relation) happened within
/// it; every call of the sequential phase is related.
fn check_inbound_relation(exchanges: &[Json], sequential_from_ns: u64, name: &str) {
    let ns = |e: &Json, field: &str| e[field].as_u64().unwrap();
    let inbound: HashMap<u64, &Json> = exchanges
        .iter()
        .filter(|e| e["role"] == "inbound")
        .map(|e| (ns(e, "id"), e))
        .collect();
    let upstream = upstream_exchanges(exchanges);
    let mut related = 0;
    for u in &upstream {
        let Some(id) = u["inbound_exchange"].as_u64() else {
            assert!(
                ns(u, "start_ns") < sequential_from_ns,
                "sent while one request waited, yet not related: {u}"
            );
            continue;
        };
        let i = inbound[&id];
        assert!(
            ns(i, "start_ns") <= ns(u, "start_ns")
                && ns(u, "first_response_ns") <= ns(i, "last_response_ns"),
            "{u} related to {i}, which does not contain it"
        );
        related += 1;
    }
    assert!(related >= SEQUENTIAL, "{related} related");
    println!(
        "sockets ({name}): {related} of {} upstream exchanges related to the one inbound \
         request awaiting its answer ({SEQUENTIAL} sent one at a time)",
        upstream.len()
    );
}

/// Prometheus says what the exchanges say.
fn check_metrics(metrics: &Scrape, matched: &[Matched], new_connections: usize) {
    let sum = |field: &str| -> f64 {
        matched
            .iter()
            .map(|m| m.observed[field].as_u64().unwrap() as f64)
            .sum()
    };
    let fake = |s: &&Sample| s.labels.get("upstream") == Some("fake");
    let value = |metric: &str| -> f64 {
        metrics
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(fake)
            .map(|s| match &s.value {
                Value::Counter(v) => *v,
                Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
                other => panic!("{metric}: {other:?}"),
            })
            .sum()
    };
    let n = matched.len() as f64;
    assert_eq!(value("brokerprobe_upstream_ttfb_seconds"), n);
    assert_eq!(value("brokerprobe_upstream_duration_seconds"), n);
    assert_eq!(
        value("brokerprobe_upstream_connect_seconds"),
        new_connections as f64
    );
    assert_eq!(value("brokerprobe_upstream_exchanges_total"), n);
    assert_eq!(
        value("brokerprobe_upstream_request_bytes_total"),
        sum("request_bytes")
    );
    assert_eq!(
        value("brokerprobe_upstream_response_bytes_total"),
        sum("response_bytes")
    );
    assert_eq!(
        value("brokerprobe_upstream_response_chunks_total"),
        sum("response_chunks")
    );
}

/// At least [`MIN_ATTRIBUTION`] of the exchanges are attributed to the request the
/// upstream saw them carry (`x-request-id`); the rest are either not attributed
/// (counted) or attributed wrongly, and the wrong ones are shown.
fn check_attribution(matched: &[Matched], name: &str) {
    // (right, wrong) by method.
    let mut methods: HashMap<String, (usize, usize)> = HashMap::new();
    for m in matched {
        let truth: u64 = m.ledger["request_id"].as_str().unwrap().parse().unwrap();
        let method = m.observed["attribution"].as_str().unwrap_or("none");
        let slot = methods.entry(method.to_owned()).or_default();
        if m.observed["request_id"].as_u64() == Some(truth) {
            slot.0 += 1;
        } else {
            slot.1 += 1;
            if slot.1 <= 3 {
                let what = if method == "none" {
                    "not attributed"
                } else {
                    "attributed wrongly"
                };
                println!("sockets ({name}): {what}: {} vs {}", m.observed, m.ledger);
            }
        }
    }
    let right: usize = methods.values().map(|(right, _)| right).sum();
    let share = right as f64 / matched.len() as f64;
    println!(
        "sockets ({name}): {:.2}% of {} upstream exchanges attributed to the right request; \
         (right, wrong) by method {methods:?}",
        share * 100.0,
        matched.len()
    );
    assert!(
        share >= MIN_ATTRIBUTION,
        "{right} of {} attributed right",
        matched.len()
    );
}

/// Each request reports its upstream call: network TTFB equal to the exchange's, broker
/// wait at least as long, the lag their difference.
fn check_lag(run: &Run) {
    let ttfb_by_exchange: HashMap<u64, u64> = run
        .matched
        .iter()
        .map(|m| {
            (
                m.observed["id"].as_u64().unwrap(),
                m.observed["ttfb_ns"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut lags = Vec::new();
    for request in &run.requests {
        // One call each, or none where attribution left it out (check_attribution
        // bounds how often).
        let calls = request["upstream_calls"].as_array().unwrap();
        assert!(calls.len() <= 1, "{request}");
        let Some(call) = calls.first() else {
            continue;
        };
        let ttfb = call["network_ttfb_ns"].as_u64().unwrap();
        let exchange = call["exchange_id"].as_u64().unwrap();
        assert_eq!(ttfb_by_exchange.get(&exchange), Some(&ttfb), "{request}");
        let wait = call["broker_wait_ns"].as_u64().unwrap();
        assert!(wait >= ttfb, "{request}");
        assert_eq!(call["lag_ns"].as_u64().unwrap(), wait - ttfb);
        lags.push(wait - ttfb);
    }
    assert_eq!(run.requests.len(), run.matched.len());
    lags.sort_unstable();
    println!(
        "sockets (demo broker, markers): broker-seen wait minus network TTFB: p50 {:.1} µs, \
         p99 {:.1} µs",
        lags[lags.len() / 2] as f64 / 1e3,
        lags[lags.len() * 99 / 100] as f64 / 1e3
    );
}

/// The fake upstream as a process of its own, with the `script` arguments; returns it and
/// its URL.
fn start_fake_upstream(script: &[&str]) -> (Proc, String) {
    let mut command = Command::new(bin("fake-upstream"));
    // A provider runs on machines of its own; sharing this one with the broker under
    // load, the fake would answer up to milliseconds late otherwise.
    command.args(["--listen", "127.0.0.1:0", "--realtime", "10"]);
    let (fake, addr) = start_listening("fake-upstream", command.args(script)).unwrap();
    (fake, format!("http://{addr}"))
}

/// Every chat call in the fake upstream's ledger.
async fn chat_calls(upstream_url: &str) -> Vec<Json> {
    let all = fetch_json(&format!("{upstream_url}/fake/exchanges")).await;
    all.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["path"] == "/v1/chat/completions")
        .cloned()
        .collect()
}

/// Those of `calls` the upstream received after `since_ns`.
fn chat_calls_since(calls: &[Json], since_ns: u64) -> Vec<Json> {
    calls
        .iter()
        .filter(|e| e["received_ns"].as_u64().unwrap() > since_ns)
        .cloned()
        .collect()
}

async fn fetch_json(url: &str) -> Json {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}
