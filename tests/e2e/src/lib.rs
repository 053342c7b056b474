//! End-to-end helpers for brokerprobe: a deterministic load generator for the demo broker,
//! a harness that runs the real binaries, and a real Prometheus to scrape them.

pub mod harness;
pub mod load;
pub mod prometheus;
pub mod trace_store;
