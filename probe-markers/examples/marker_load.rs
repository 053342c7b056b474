//! Marker hits on demand, for `cargo xtask bench` and the end-to-end tests to attach
//! probes to:
//! - `marker_load hits N`: prints `ready`, waits for a line on stdin (probes are attached
//!   meanwhile), then times N calls of `first_byte` (a marker: 5-byte NOP entry) and N
//!   calls of `plain_function` (an ordinary function entry), interleaved over 5 rounds, and
//!   prints `first_byte NS` and `plain_function NS`: the median ns per call.
//! - `marker_load storm RATE SECONDS`: prints `ready`, waits for a line, then calls
//!   `first_byte` RATE times per second (paced in 1 ms steps) for SECONDS, prints
//!   `hits N seconds S`, and waits for another line (or the end of stdin) to exit.
//! - `marker_load streams N K`: prints `ready`, waits for a line, then begins N requests
//!   (ids 1..=N), hits `chunk` K times for each (K rounds over all N: every stream open at
//!   once), prints `chunked`, waits for a line, ends them all (status 200), prints `ended`
//!   and waits for another line (or the end of stdin) to exit. Past the kernel's room for
//!   chunk tallies, streams go one record per chunk: the e2e tests check none is lost.
//!
//! `first_byte`, not `chunk`: each of its hits is one event, where the kernel counts a
//! request's chunks after the first instead of sending them (docs/markers.md, "Chunks").

use std::{
    hint::black_box,
    io::BufRead as _,
    time::{Duration, Instant},
};

use probe_markers::{RequestId, Stage};

/// An ordinary function entry (push/mov prologue, no NOP): a uprobe on it traps.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn plain_function(id: u64) -> u64 {
    black_box(id).wrapping_mul(3)
}

fn main() {
    // Every marker once, so the linker keeps them all and brokerprobe finds them.
    let id = RequestId::from_raw(u64::MAX);
    probe_markers::request_begin(id, "warm", None);
    probe_markers::provider(id, "warm");
    drop(probe_markers::stage(id, Stage::Route));
    probe_markers::first_byte(id);
    probe_markers::chunk(id);
    probe_markers::token_usage(id, 1, 1);
    probe_markers::fallback(id, "a", "b");
    probe_markers::request_end(id, 200, None);

    let args: Vec<String> = std::env::args().skip(1).collect();
    const USAGE: &str = "usage: marker_load hits N | storm RATE SECONDS | streams N K";
    let number = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{USAGE}"))
    };
    println!("ready");
    wait_for_line();
    match args.first().map(String::as_str) {
        Some("hits") => hits(number(1)),
        Some("storm") => storm(number(1), number(2)),
        Some("streams") => streams(number(1), number(2)),
        _ => panic!("{USAGE}"),
    }
}

/// Waits for a line on stdin, or its end.
fn wait_for_line() {
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

fn hits(calls: u64) {
    let time = |case: &dyn Fn(u64)| {
        let start = Instant::now();
        for i in 0..calls {
            case(black_box(i));
        }
        start.elapsed().as_nanos() as f64 / calls as f64
    };
    let (mut marker, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        marker.push(time(&|i| probe_markers::first_byte(RequestId::from_raw(i))));
        plain.push(time(&|i| {
            black_box(plain_function(i));
        }));
    }
    for (name, mut samples) in [("first_byte", marker), ("plain_function", plain)] {
        samples.sort_by(f64::total_cmp);
        println!("{name} {:.1}", samples[samples.len() / 2]);
    }
}

fn storm(rate: u64, seconds: u64) {
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let per_ms = rate.div_ceil(1000);
    let mut hits = 0u64;
    let mut step = start;
    while step < end {
        for _ in 0..per_ms {
            probe_markers::first_byte(RequestId::from_raw(black_box(hits)));
            hits += 1;
        }
        step += Duration::from_millis(1);
        while Instant::now() < step {
            std::hint::spin_loop();
        }
    }
    println!("hits {hits} seconds {:.3}", start.elapsed().as_secs_f64());
    // Alive until told (or stdin closes): brokerprobe ends its run when its target
    // exits, and the bench still reads its figures.
    wait_for_line();
}

fn streams(count: u64, chunks: u64) {
    // Pauses keep the records pending well below the ring buffer's size, even for a
    // brokerprobe slow to drain on a busy machine: the test is about the map, not the ring.
    let paced = |i: u64| {
        if i % 1000 == 999 {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let ids = || (1..=count).map(RequestId::from_raw);
    for (i, id) in ids().enumerate() {
        probe_markers::request_begin(id, "stream", None);
        paced(i as u64);
    }
    for _ in 0..chunks {
        std::thread::sleep(Duration::from_millis(100));
        for (i, id) in ids().enumerate() {
            probe_markers::chunk(id);
            paced(i as u64);
        }
    }
    println!("chunked");
    wait_for_line();
    for (i, id) in ids().enumerate() {
        probe_markers::request_end(id, 200, None);
        paced(i as u64);
    }
    println!("ended");
    wait_for_line();
}
