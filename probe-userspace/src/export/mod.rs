//! Exporters: each receives finished requests and probe health figures, and never reaches
//! back into attach or assembly.

pub mod jsonl;
pub mod labels;
pub mod prometheus;
pub mod summary;

use crate::assembly::{AssemblyStats, Request};

/// Receives every finished request, in completion order.
pub trait RequestSink {
    fn record(&mut self, request: &Request);
}

/// The probe's own health, as totals since attach.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProbeHealth {
    pub attached_markers: u32,
    pub events: u64,
    /// Dropped in the kernel because the ring buffer was full.
    pub events_lost: u64,
    pub decode_errors: u64,
    pub in_flight: usize,
    pub assembly: AssemblyStats,
}
