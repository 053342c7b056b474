//! The tables printed live and on exit: per stage, and per upstream and inbound as seen
//! on the sockets; count, p50, p95, p99, max.

use std::{collections::HashMap, fmt::Write as _};

use hdrhistogram::Histogram;

use super::{
    ExchangeSink, RequestSink,
    labels::{LabelCap, OTHER},
};
use crate::{assembly::Request, connections::Exchange, procnet::Role};

/// The row holding whole-request durations, above the stage rows.
const REQUEST_ROW: &str = "(request)";

pub struct Summary {
    stages: Table,
    sockets: Table,
    /// Stage and upstream names are broker-defined: bounded like metric labels.
    stage_names: LabelCap,
    upstream_names: LabelCap,
}

impl Summary {
    pub fn new(max_names: usize) -> Self {
        Self {
            stages: Table::default(),
            sockets: Table::default(),
            stage_names: LabelCap::new(max_names),
            upstream_names: LabelCap::new(max_names),
        }
    }

    /// The tables as text: stages, then (if any were seen) upstream calls and inbound
    /// requests.
    pub fn render(&self) -> String {
        let mut out = self.stages.render("stage");
        if !self.sockets.rows.is_empty() {
            out.push('\n');
            out.push_str(&self.sockets.render("socket view"));
        }
        out
    }
}

/// Rows in order of first appearance.
#[derive(Default)]
struct Table {
    rows: Vec<(String, Histogram<u64>)>,
    /// Row name → index in `rows`.
    index: HashMap<String, usize>,
}

impl Table {
    fn row(&mut self, name: &str) -> &mut Histogram<u64> {
        let index = match self.index.get(name) {
            Some(index) => *index,
            None => {
                // 3 significant figures, auto-resizing: sized by the largest value seen.
                let histogram = Histogram::new(3).expect("3 significant figures is valid");
                self.rows.push((name.to_owned(), histogram));
                self.index.insert(name.to_owned(), self.rows.len() - 1);
                self.rows.len() - 1
            }
        };
        &mut self.rows[index].1
    }

    fn render(&self, title: &str) -> String {
        let mut out = format!(
            "{:<32} {:>8} {:>10} {:>10} {:>10} {:>10}\n",
            title, "count", "p50", "p95", "p99", "max"
        );
        for (name, h) in &self.rows {
            let q = |q: f64| format_ns(h.value_at_quantile(q));
            let _ = writeln!(
                out,
                "{name:<32} {:>8} {:>10} {:>10} {:>10} {:>10}",
                h.len(),
                q(0.5),
                q(0.95),
                q(0.99),
                format_ns(h.max())
            );
        }
        out
    }
}

impl RequestSink for Summary {
    fn record(&mut self, request: &Request) {
        self.stages.observe(REQUEST_ROW, request.duration_ns());
        for stage in &request.stages {
            let name = self.stage_names.admit(stage.id.name()).unwrap_or(OTHER);
            self.stages.observe(name, stage.duration_ns());
        }
        for call in &request.upstream_calls {
            if let Some(lag) = call.lag_ns() {
                self.sockets.observe("upstream lag (broker - network)", lag);
            }
        }
    }
}

impl ExchangeSink for Summary {
    fn record_exchange(&mut self, exchange: &Exchange) {
        let name = match exchange.role {
            Role::Upstream => self
                .upstream_names
                .admit(&exchange.peer_name)
                .unwrap_or(OTHER),
            Role::Inbound => "inbound",
        };
        if let Some(ttfb) = exchange.ttfb_ns() {
            self.sockets.observe(&format!("{name} ttfb"), ttfb);
        }
        if let Some(duration) = exchange.duration_ns() {
            self.sockets.observe(&format!("{name} total"), duration);
        }
        if let Some(connect) = exchange.connect_ns {
            self.sockets.observe(&format!("{name} connect"), connect);
        }
    }
}

impl Table {
    fn observe(&mut self, row: &str, ns: u64) {
        let histogram = self.row(row);
        // `record` grows the histogram to fit; it can only refuse values near u64::MAX.
        if histogram.record(ns.max(1)).is_err() {
            histogram.saturating_record(ns);
        }
    }
}

/// Nanoseconds in the unit that keeps 3 significant digits readable.
pub fn format_ns(ns: u64) -> String {
    let ns = ns as f64;
    match ns {
        n if n < 1e3 => format!("{n:.0}ns"),
        n if n < 1e6 => format!("{:.1}µs", n / 1e3),
        n if n < 1e9 => format!("{:.2}ms", n / 1e6),
        n => format!("{:.2}s", n / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use probe_common::marker::Stage;

    use super::*;
    use crate::{assembly::StageSpan, decode::StageId};

    #[test]
    fn table_has_request_row_then_stages_with_quantiles() {
        let mut summary = Summary::new(100);
        for i in 1..=100u64 {
            summary.record(&Request {
                begin_ns: 0,
                end_ns: i * 1_000_000,
                stages: vec![StageSpan {
                    id: StageId::Known(Stage::Route),
                    begin_ns: 0,
                    end_ns: i * 1_000,
                }],
                ..Request::default()
            });
        }
        let table = summary.render();
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].starts_with("(request)") && lines[1].contains(" 100 "),
            "{table}"
        );
        assert!(lines[2].starts_with("route"), "{table}");
        // p50 of 1..=100 µs is 50 µs, max 100 µs.
        assert!(
            lines[2].contains("50.0µs") && lines[2].contains("100.0µs"),
            "{table}"
        );
    }

    #[test]
    fn durations_format_in_readable_units() {
        assert_eq!(format_ns(850), "850ns");
        assert_eq!(format_ns(12_345), "12.3µs");
        assert_eq!(format_ns(4_560_000), "4.56ms");
        assert_eq!(format_ns(1_230_000_000), "1.23s");
    }
}
