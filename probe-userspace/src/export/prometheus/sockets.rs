//! What the sockets tell (docs/sockets.md): upstream calls per upstream, inbound requests
//! per method, path and status.

use prometheus::{HistogramVec, IntCounterVec};

use super::{Label, Labels, Register, SIZE_BUCKETS, UNKNOWN, seconds};
use crate::{connections::Exchange, procnet::Role};

pub(super) struct SocketMetrics {
    upstream_ttfb: HistogramVec,
    upstream_duration: HistogramVec,
    upstream_connect: HistogramVec,
    upstream_read_delay: HistogramVec,
    upstream_request_size: HistogramVec,
    upstream_response_size: HistogramVec,
    upstream_exchanges: IntCounterVec,
    upstream_request_bytes: IntCounterVec,
    upstream_response_bytes: IntCounterVec,
    upstream_chunks: IntCounterVec,
    inbound_duration: HistogramVec,
    inbound_accept_wait: HistogramVec,
    inbound_exchanges: IntCounterVec,
    inbound_request_bytes: IntCounterVec,
    inbound_response_bytes: IntCounterVec,
}

impl SocketMetrics {
    pub(super) fn register(r: &Register) -> prometheus::Result<Self> {
        let upstream = ["upstream"];
        Ok(Self {
            upstream_ttfb: r.seconds(
                "brokerprobe_upstream_ttfb_seconds",
                "Network time to first byte of an upstream call: first request byte written to \
                 first response byte arrived on the broker's socket.",
                &upstream,
            )?,
            upstream_duration: r.seconds(
                "brokerprobe_upstream_duration_seconds",
                "Upstream call, first request byte written to last response byte arrived.",
                &upstream,
            )?,
            upstream_connect: r.seconds(
                "brokerprobe_upstream_connect_seconds",
                "TCP handshake of a new upstream connection (SYN sent to established).",
                &upstream,
            )?,
            upstream_read_delay: r.seconds(
                "brokerprobe_upstream_read_delay_seconds",
                "How long an upstream response's first bytes waited on the broker's socket \
                 before the broker read them.",
                &upstream,
            )?,
            upstream_request_size: r.histogram(
                "brokerprobe_upstream_request_size_bytes",
                "Bytes of one upstream request (TCP payload, headers included).",
                &upstream,
                SIZE_BUCKETS,
            )?,
            upstream_response_size: r.histogram(
                "brokerprobe_upstream_response_size_bytes",
                "Bytes of one upstream response (TCP payload, headers included).",
                &upstream,
                SIZE_BUCKETS,
            )?,
            upstream_exchanges: r.counter(
                "brokerprobe_upstream_exchanges_total",
                "Upstream calls (request/response exchanges) seen on the sockets.",
                &["upstream", "status"],
            )?,
            upstream_request_bytes: r.counter(
                "brokerprobe_upstream_request_bytes_total",
                "Bytes the broker wrote to upstreams (TCP payload, headers included).",
                &upstream,
            )?,
            upstream_response_bytes: r.counter(
                "brokerprobe_upstream_response_bytes_total",
                "Bytes the broker read from upstreams (TCP payload, headers included).",
                &upstream,
            )?,
            upstream_chunks: r.counter(
                "brokerprobe_upstream_response_chunks_total",
                "Reads that carried upstream response bytes (stream chunks as they arrived).",
                &upstream,
            )?,
            inbound_duration: r.seconds(
                "brokerprobe_inbound_duration_seconds",
                "Inbound request on the broker's socket: first request byte read to last \
                 response byte written.",
                &["method", "path", "status"],
            )?,
            inbound_accept_wait: r.seconds(
                "brokerprobe_inbound_accept_wait_seconds",
                "New inbound connection: accept to first request byte read.",
                &[],
            )?,
            inbound_exchanges: r.counter(
                "brokerprobe_inbound_exchanges_total",
                "Inbound requests (request/response exchanges) seen on the sockets.",
                &["method", "path", "status"],
            )?,
            inbound_request_bytes: r.counter(
                "brokerprobe_inbound_request_bytes_total",
                "Bytes the broker read from clients.",
                &[],
            )?,
            inbound_response_bytes: r.counter(
                "brokerprobe_inbound_response_bytes_total",
                "Bytes the broker wrote to clients.",
                &[],
            )?,
        })
    }

    pub(super) fn record(&self, exchange: &Exchange, replica: &str, labels: &mut Labels) {
        let status = exchange
            .status
            .map_or_else(|| UNKNOWN.to_owned(), |s| s.to_string());
        let observe = |histogram: &HistogramVec, labels: &[&str], ns: Option<u64>| {
            if let Some(ns) = ns {
                histogram.with_label_values(labels).observe(seconds(ns));
            }
        };
        match exchange.role {
            Role::Upstream => {
                let upstream = [replica, labels.admit(Label::Upstream, &exchange.peer_name)];
                observe(&self.upstream_ttfb, &upstream, exchange.ttfb_ns());
                observe(&self.upstream_duration, &upstream, exchange.duration_ns());
                observe(&self.upstream_connect, &upstream, exchange.connect_ns);
                observe(
                    &self.upstream_read_delay,
                    &upstream,
                    exchange.read_delay_ns(),
                );
                self.upstream_request_size
                    .with_label_values(&upstream)
                    .observe(exchange.request_bytes as f64);
                self.upstream_response_size
                    .with_label_values(&upstream)
                    .observe(exchange.response_bytes as f64);
                self.upstream_exchanges
                    .with_label_values(&[replica, upstream[1], &status])
                    .inc();
                self.upstream_request_bytes
                    .with_label_values(&upstream)
                    .inc_by(exchange.request_bytes);
                self.upstream_response_bytes
                    .with_label_values(&upstream)
                    .inc_by(exchange.response_bytes);
                self.upstream_chunks
                    .with_label_values(&upstream)
                    .inc_by(u64::from(exchange.response_chunks));
            }
            Role::Inbound => {
                let path = labels.admit(Label::Path, exchange.path.as_deref().unwrap_or(""));
                let by_request = [replica, exchange.method.unwrap_or(UNKNOWN), path, &status];
                observe(&self.inbound_duration, &by_request, exchange.duration_ns());
                observe(
                    &self.inbound_accept_wait,
                    &[replica],
                    exchange.accept_wait_ns,
                );
                self.inbound_exchanges.with_label_values(&by_request).inc();
                self.inbound_request_bytes
                    .with_label_values(&[replica])
                    .inc_by(exchange.request_bytes);
                self.inbound_response_bytes
                    .with_label_values(&[replica])
                    .inc_by(exchange.response_bytes);
            }
        }
    }
}
