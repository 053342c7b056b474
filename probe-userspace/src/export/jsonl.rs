//! `--requests-out FILE`, `--exchanges-out FILE` and `--stages-out FILE`: every finished
//! request (or socket exchange, or symbol-mapped stage call) as one JSON line, for offline analysis and for the end-to-end tests that
//! compare brokerprobe with the broker's and the upstream's own records. Times are
//! CLOCK_MONOTONIC nanoseconds.

use std::{
    fs::File,
    io::{self, BufWriter, Write as _},
    path::Path,
};

use serde::Serialize;

use super::{ExchangeSink, RequestSink};
use crate::{
    assembly::{Request, UpstreamCall},
    connections::Exchange,
    decode::StageSample,
};

pub struct JsonLines {
    out: BufWriter<File>,
    error: Option<io::Error>,
    /// Lines not written because an earlier write failed.
    dropped: u64,
}

#[derive(Serialize)]
struct Line<'a> {
    pid: u32,
    request_id: u64,
    model: &'a str,
    provider: Option<&'a str>,
    traceparent: Option<&'a str>,
    status: u16,
    error_type: Option<&'a str>,
    begin_ns: u64,
    end_ns: u64,
    stages: Vec<StageLine<'a>>,
    fallbacks: Vec<(&'a str, &'a str)>,
    first_byte_ns: &'a [u64],
    chunks: u32,
    first_chunk_ns: Option<u64>,
    last_chunk_ns: Option<u64>,
    input_tokens: u64,
    output_tokens: u64,
    unclosed_stages: u32,
    upstream_calls: Vec<CallLine>,
}

#[derive(Serialize)]
struct CallLine {
    exchange_id: u64,
    attribution: Option<&'static str>,
    stage_begin_ns: u64,
    sent_ns: u64,
    first_response_ns: Option<u64>,
    broker_first_byte_ns: Option<u64>,
    status: Option<u16>,
    network_ttfb_ns: Option<u64>,
    broker_wait_ns: Option<u64>,
    lag_ns: Option<u64>,
}

impl CallLine {
    fn of(call: &UpstreamCall) -> Self {
        Self {
            exchange_id: call.exchange_id,
            attribution: call.attribution.map(|a| a.name()),
            stage_begin_ns: call.stage_begin_ns,
            sent_ns: call.sent_ns,
            first_response_ns: call.first_response_ns,
            broker_first_byte_ns: call.broker_first_byte_ns,
            status: call.status,
            network_ttfb_ns: call.network_ttfb_ns(),
            broker_wait_ns: call.broker_wait_ns(),
            lag_ns: call.lag_ns(),
        }
    }
}

#[derive(Serialize)]
struct ExchangeLine<'a> {
    id: u64,
    pid: u32,
    fd: i32,
    role: &'static str,
    peer: &'a str,
    local: Option<String>,
    remote: Option<String>,
    connect_ns: Option<u64>,
    accept_wait_ns: Option<u64>,
    start_ns: u64,
    first_response_ns: Option<u64>,
    first_read_ns: Option<u64>,
    arrival_timed: bool,
    last_response_ns: Option<u64>,
    ttfb_ns: Option<u64>,
    read_delay_ns: Option<u64>,
    duration_ns: Option<u64>,
    request_bytes: u64,
    response_bytes: u64,
    response_chunks: u32,
    method: Option<&'static str>,
    path: Option<&'a str>,
    status: Option<u16>,
    end: &'static str,
    start_tid: u32,
    request_id: Option<u64>,
    attribution: Option<&'static str>,
    inbound_exchange: Option<u64>,
}

#[derive(Serialize)]
struct StageLine<'a> {
    stage: &'a str,
    /// Tool name for tool.execute.
    name: Option<&'a str>,
    begin_ns: u64,
    end_ns: u64,
}

impl JsonLines {
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self {
            out: BufWriter::new(File::create(path)?),
            error: None,
            dropped: 0,
        })
    }

    /// Lines not written because an earlier write failed.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Flushes; reports the first write error since creation, if any.
    pub fn finish(&mut self) -> io::Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.out.flush()
    }

    /// One call of a symbol-mapped stage function, named `stage`.
    pub fn record_stage_sample(&mut self, sample: &StageSample, stage: &str) {
        #[derive(Serialize)]
        struct SampleLine<'a> {
            pid: u32,
            tid: u32,
            stage: &'a str,
            begin_ns: u64,
            end_ns: u64,
        }
        self.write_line(&SampleLine {
            pid: sample.pid,
            tid: sample.tid,
            stage,
            begin_ns: sample.begin_ns,
            end_ns: sample.end_ns,
        });
    }

    fn write_line(&mut self, line: &impl Serialize) {
        if self.error.is_some() {
            self.dropped += 1;
            return;
        }
        let written = serde_json::to_writer(&mut self.out, line)
            .map_err(io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"));
        if let Err(e) = written {
            // Said now, so a full disk is noticed while attached; repeated by finish().
            log::error!("writing JSON lines failed, later lines are not written: {e}");
            self.error = Some(e);
            self.dropped += 1;
        }
    }
}

impl ExchangeSink for JsonLines {
    fn record_exchange(&mut self, e: &Exchange) {
        let line = ExchangeLine {
            id: e.id,
            pid: e.pid,
            fd: e.fd,
            role: e.role.name(),
            peer: &e.peer_name,
            local: e.local.map(|a| a.to_string()),
            remote: e.remote.map(|a| a.to_string()),
            connect_ns: e.connect_ns,
            accept_wait_ns: e.accept_wait_ns,
            start_ns: e.start_ns,
            first_response_ns: e.first_response_ns,
            first_read_ns: e.first_read_ns,
            arrival_timed: e.arrival_timed,
            last_response_ns: e.last_response_ns,
            ttfb_ns: e.ttfb_ns(),
            read_delay_ns: e.read_delay_ns(),
            duration_ns: e.duration_ns(),
            request_bytes: e.request_bytes,
            response_bytes: e.response_bytes,
            response_chunks: e.response_chunks,
            method: e.method,
            path: e.path.as_deref(),
            status: e.status,
            end: e.end.name(),
            start_tid: e.start_tid,
            request_id: e.request_id,
            attribution: e.attribution.map(|a| a.name()),
            inbound_exchange: e.inbound_exchange,
        };
        self.write_line(&line);
    }
}

impl RequestSink for JsonLines {
    fn record(&mut self, r: &Request) {
        let line = Line {
            pid: r.pid,
            request_id: r.request_id,
            model: &r.model,
            provider: r.provider.as_deref(),
            traceparent: r.traceparent.as_deref(),
            status: r.status,
            error_type: r.error_type.as_deref(),
            begin_ns: r.begin_ns,
            end_ns: r.end_ns,
            stages: r
                .stages
                .iter()
                .map(|s| StageLine {
                    stage: s.id.name(),
                    name: s.id.tool(),
                    begin_ns: s.begin_ns,
                    end_ns: s.end_ns,
                })
                .collect(),
            fallbacks: r
                .fallbacks
                .iter()
                .map(|f| (f.from.as_str(), f.to.as_str()))
                .collect(),
            first_byte_ns: &r.first_byte_ns,
            chunks: r.chunks,
            first_chunk_ns: r.first_chunk_ns,
            last_chunk_ns: r.last_chunk_ns,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            unclosed_stages: r.unclosed_stages,
            upstream_calls: r.upstream_calls.iter().map(CallLine::of).collect(),
        };
        self.write_line(&line);
    }
}
