//! The live view (issue 9): `brokerprobe top` in an 80x24 tmux pane attached to the demo
//! broker under load, driven with send-keys and read with capture-pane; what it shows is
//! checked against /stats, which reads the same figures.

use std::{
    net::TcpListener,
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use e2e::{
    harness::{bin, require_root, scratch_dir, start_demo_broker, stats, wait_for_completed},
    load::{self, Mix},
};
use serde_json::Value as Json;

/// A tmux server of the test's own, so no one's sessions are touched.
struct Pane {
    socket: String,
}

impl Pane {
    fn start(command: &str) -> Self {
        let pane = Self {
            socket: format!("brokerprobe-test-{}", std::process::id()),
        };
        let started = pane.tmux(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "80",
            "-y",
            "24",
            command,
        ]);
        assert!(started.status.success(), "tmux new-session: {started:?}");
        pane
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux is missing: `cargo xtask setup` installs it")
    }

    fn screen(&self) -> String {
        let out = self.tmux(&["capture-pane", "-p", "-t", "top"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        assert!(
            self.tmux(&["send-keys", "-t", "top", keys])
                .status
                .success()
        );
    }

    /// Waits (10 s at most) for the screen to satisfy `check`; returns it.
    fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "no {what} on screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn alive(&self) -> bool {
        self.tmux(&["has-session", "-t", "top"]).status.success()
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        self.tmux(&["kill-server"]);
    }
}

/// "3.1µs", "41.29ms", "1.23s", "850ns" → (seconds, the unit of its last digit).
fn seconds(shown: &str) -> (f64, f64) {
    let unit = shown.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
    let number = &shown[..shown.len() - unit.len()];
    let scale = match unit {
        "ns" => 1e-9,
        "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        _ => panic!("no unit in {shown:?}"),
    };
    let decimals = number.split_once('.').map_or(0, |(_, d)| d.len());
    let last_digit = scale * 10f64.powi(-(decimals as i32));
    (number.parse::<f64>().unwrap() * scale, last_digit)
}

/// The figure shown is `exact`, rounded to the digits shown.
fn same_figure(shown: &str, exact: f64) -> bool {
    let (value, last_digit) = seconds(shown);
    (value - exact).abs() <= last_digit * 0.501
}

/// Every stage row of /stats is on screen, with its count and quantiles.
fn check_stages(screen: &str, stats: &Json) {
    let rows: Vec<(&str, &Json)> = std::iter::once(("(request)", &stats["request_duration"]))
        .chain(
            stats["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["stage"].as_str().unwrap(), &s["duration"])),
        )
        .collect();
    assert!(rows.len() > 5, "the load exercised few stages: {stats}");
    for (stage, duration) in rows {
        let line = screen
            .lines()
            .find(|l| l.split_whitespace().next() == Some(stage))
            .unwrap_or_else(|| panic!("stage {stage} not on screen:\n{screen}"));
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells[1],
            duration["count"].to_string(),
            "{stage} count: {line}"
        );
        for (cell, quantile) in
            cells[2..5]
                .iter()
                .zip(["p50_seconds", "p95_seconds", "p99_seconds"])
        {
            let exact = duration[quantile].as_f64().unwrap();
            assert!(
                same_figure(cell, exact),
                "{stage} {quantile}: {cell} vs {exact}: {line}"
            );
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn top_shows_the_stages_of_stats_and_answers_its_keys() {
    require_root();
    let dir = scratch_dir("tui");
    let report: &Path = &dir.join("report.json");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (broker, url) = start_demo_broker(&[]).unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let metrics_url = format!("http://{metrics_addr}/metrics");
    let pane = Pane::start(&format!(
        "{} top --pid {} --metrics-addr {metrics_addr} --report json --report-out {}",
        bin("brokerprobe").display(),
        broker.pid(),
        report.display()
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while rt.block_on(stats(&metrics_url)).is_err() {
        assert!(
            pane.alive() && Instant::now() < deadline,
            "brokerprobe top never served /stats:\n{}",
            pane.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pane.wait_for("live view", |s| s.contains("stages since attach"));

    let mix = Mix::default();
    let first = 200;
    rt.block_on(load::drive(&url, first, 8, &mix, 5)).unwrap();
    let stats = rt.block_on(wait_for_completed(&metrics_url, first));
    let screen = pane.wait_for("all requests", |s| s.contains(&format!("· {first} done")));
    check_stages(&screen, &stats);
    for model in stats["models"].as_array().unwrap() {
        let name = model["model"].as_str().unwrap();
        let line = screen
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("model {name} not on screen:\n{screen}"));
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[1], model["requests"].to_string(), "{line}");
        assert_eq!(cells[2], model["errors"].to_string(), "{line}");
    }
    println!("tui: after {first} requests:\n{screen}");

    // g: by upstream, its exchanges as /stats counts them.
    pane.keys("g");
    let upstream = &stats["upstreams"][0];
    let name = upstream["upstream"].as_str().unwrap();
    let screen = pane.wait_for("upstream grouping", |s| s.contains("by upstream"));
    let line = screen
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("upstream {name} not on screen:\n{screen}"));
    assert_eq!(
        line.split_whitespace().nth(1),
        Some(&*upstream["exchanges"].to_string())
    );
    assert!(screen.contains("broker-seen wait p50"), "{screen}");

    // 1: the slowest request's waterfall, as /stats lists it.
    pane.keys("1");
    let slowest = &stats["slowest_requests"][0];
    let screen = pane.wait_for("waterfall", |s| {
        s.contains("waterfall of slowest request 1")
    });
    let top = screen
        .lines()
        .find(|l| l.starts_with("1 "))
        .unwrap_or_else(|| panic!("no slowest line:\n{screen}"));
    let shown = top.split_whitespace().nth(1).unwrap();
    assert!(
        same_figure(shown, slowest["duration_seconds"].as_f64().unwrap()),
        "{top} vs {slowest}"
    );
    for stage in slowest["stages"].as_array().unwrap().iter().take(5) {
        let name = stage["stage"].as_str().unwrap();
        let bar = screen
            .lines()
            .any(|l| l.starts_with(&format!("  {name} ")) && l.ends_with('█'));
        assert!(bar, "no waterfall line for {name}:\n{screen}");
    }

    // f: frozen, the figures stay while requests go on; f again: they move.
    pane.keys("f");
    pane.wait_for("frozen", |s| s.contains("FROZEN"));
    let more = 50;
    rt.block_on(load::drive(&url, more, 8, &mix, 6)).unwrap();
    rt.block_on(wait_for_completed(&metrics_url, first + more));
    std::thread::sleep(Duration::from_millis(2_500));
    assert!(
        pane.screen().contains(&format!("· {first} done")),
        "{}",
        pane.screen()
    );
    pane.keys("f");
    let screen = pane.wait_for("resumed", |s| {
        s.contains(&format!("· {} done", first + more))
    });
    assert!(!screen.contains("FROZEN"));

    // q: detaches and writes the report.
    pane.keys("q");
    let deadline = Instant::now() + Duration::from_secs(30);
    while pane.alive() {
        assert!(
            Instant::now() < deadline,
            "still running after q:\n{}",
            pane.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let written: Json = serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    assert_eq!(written["requests"]["completed"], first + more);
}
