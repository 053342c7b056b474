//! Unattached marker cost: ns per call of markers vs an empty non-inlined function,
//! interleaved A/B in one process, medians of several rounds. Run by `cargo xtask bench`.
//! Prints one markdown table row per case: `| case | median ns/call | ratio to baseline |`.

use std::{hint::black_box, time::Instant};

use probe_markers::{RequestId, Stage};

const CALLS: u64 = 20_000_000;
const ROUNDS: usize = 7;

#[inline(never)]
fn empty_call(id: u64) {
    black_box(id);
}

/// Generic, so each case is inlined into its own loop: only the call under test remains.
fn ns_per_call(case: impl Fn(RequestId)) -> f64 {
    let start = Instant::now();
    for i in 0..CALLS {
        case(black_box(RequestId::from_raw(i)));
    }
    start.elapsed().as_nanos() as f64 / CALLS as f64
}

fn main() {
    let model = black_box("gpt-4o-mini");
    let names = [
        "empty non-inlined function (baseline)",
        "chunk(id)",
        "stage_begin(id, Route)",
        "request_begin(id, model, None)",
    ];
    let mut samples = vec![Vec::new(); names.len()];
    for _ in 0..ROUNDS {
        samples[0].push(ns_per_call(|id| empty_call(id.get())));
        samples[1].push(ns_per_call(probe_markers::chunk));
        samples[2].push(ns_per_call(|id| {
            probe_markers::stage_begin(id, Stage::Route)
        }));
        samples[3].push(ns_per_call(|id| {
            probe_markers::request_begin(id, model, None)
        }));
    }
    let medians: Vec<f64> = samples
        .iter_mut()
        .map(|s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect();
    for (name, median) in names.iter().zip(&medians) {
        println!("| {name} | {median:.2} | {:.2} |", median / medians[0]);
    }
}
