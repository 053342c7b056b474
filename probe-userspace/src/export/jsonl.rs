//! `--requests-out FILE`: every finished request as one JSON line, for offline analysis and
//! for the end-to-end tests that compare brokerprobe with the broker's own clock.

use std::{
    fs::File,
    io::{self, BufWriter, Write as _},
    path::Path,
};

use serde::Serialize;

use super::RequestSink;
use crate::assembly::Request;

pub struct JsonLines {
    out: BufWriter<File>,
    error: Option<io::Error>,
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
    input_tokens: u64,
    output_tokens: u64,
    unclosed_stages: u32,
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
        })
    }

    /// Flushes; reports the first write error since creation, if any.
    pub fn finish(&mut self) -> io::Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.out.flush()
    }
}

impl RequestSink for JsonLines {
    fn record(&mut self, r: &Request) {
        if self.error.is_some() {
            return;
        }
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
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect(),
            first_byte_ns: &r.first_byte_ns,
            chunks: r.chunks,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            unclosed_stages: r.unclosed_stages,
        };
        let written = serde_json::to_writer(&mut self.out, &line)
            .map_err(io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"));
        if let Err(e) = written {
            // Said now, so a full disk is noticed while attached; repeated by finish().
            log::error!("--requests-out: writing failed, later requests are not written: {e}");
            self.error = Some(e);
        }
    }
}
