//! End-to-end helpers for brokerprobe: a deterministic load generator for the demo broker,
//! and a harness that runs the real binaries.

pub mod harness;
pub mod load;
