//! Ring buffer bytes → typed marker events. Strings from the broker are untrusted (they
//! may come straight from clients): decoded lossily and stripped of control characters.

use std::{fmt, mem::size_of};

use probe_common::marker::{MarkerEvent, MarkerKind, Stage};

/// One decoded marker hit.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds, taken in the kernel at the hit.
    pub ts_ns: u64,
    pub pid: u32,
    pub request_id: u64,
    pub what: What,
}

#[derive(Clone, Debug, PartialEq)]
pub enum What {
    RequestBegin {
        model: String,
        traceparent: Option<String>,
    },
    RequestEnd {
        status: u16,
        error_type: Option<String>,
    },
    StageBegin(StageId),
    StageEnd(StageId),
    Provider(String),
    FirstByte,
    Chunk,
    TokenUsage {
        input: u64,
        output: u64,
    },
    Fallback {
        from: String,
        to: String,
    },
}

/// A stage instance's identity: the well-known stage, or a broker-defined name; tool
/// executions carry the tool name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StageId {
    Known(Stage),
    Custom(String),
    Tool(String),
}

impl StageId {
    /// The name used in metrics, spans and reports.
    pub fn name(&self) -> &str {
        match self {
            StageId::Known(stage) => stage.name(),
            StageId::Custom(name) => name,
            StageId::Tool(_) => Stage::ToolExecute.name(),
        }
    }

    pub fn tool(&self) -> Option<&str> {
        match self {
            StageId::Tool(tool) => Some(tool),
            _ => None,
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum DecodeError {
    Size(usize),
    Kind(u32),
    Stage(u32),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Size(n) => write!(
                f,
                "event of {n} bytes, expected {}: eBPF object and brokerprobe disagree",
                size_of::<MarkerEvent>()
            ),
            DecodeError::Kind(k) => write!(f, "unknown marker kind {k}"),
            DecodeError::Stage(s) => write!(f, "unknown stage {s} (newer probe-markers?)"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() != size_of::<MarkerEvent>() {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: the length matches, MarkerEvent is plain old data valid for any bits, and
    // read_unaligned makes no alignment assumption about the ring buffer record.
    let raw = unsafe { bytes.as_ptr().cast::<MarkerEvent>().read_unaligned() };
    let kind = MarkerKind::from_wire(raw.kind).ok_or(DecodeError::Kind(raw.kind))?;
    let text = |slot| sanitize(&raw, slot);
    let some_text = |slot: usize| Some(text(slot)).filter(|t| !t.is_empty());
    let stage = || -> Result<StageId, DecodeError> {
        let wire = raw.values[0] as u32;
        match Stage::from_wire(wire).ok_or(DecodeError::Stage(wire))? {
            Stage::Custom => Ok(StageId::Custom(text(0))),
            Stage::ToolExecute => Ok(StageId::Tool(text(0))),
            known => Ok(StageId::Known(known)),
        }
    };
    let what = match kind {
        MarkerKind::RequestBegin => What::RequestBegin {
            model: text(0),
            traceparent: some_text(1),
        },
        MarkerKind::RequestEnd => What::RequestEnd {
            status: u16::try_from(raw.values[0]).unwrap_or(0),
            error_type: some_text(0),
        },
        MarkerKind::StageBegin => What::StageBegin(stage()?),
        MarkerKind::StageEnd => What::StageEnd(stage()?),
        MarkerKind::Provider => What::Provider(text(0)),
        MarkerKind::FirstByte => What::FirstByte,
        MarkerKind::Chunk => What::Chunk,
        MarkerKind::TokenUsage => What::TokenUsage {
            input: raw.values[0],
            output: raw.values[1],
        },
        MarkerKind::Fallback => What::Fallback {
            from: text(0),
            to: text(1),
        },
    };
    Ok(Event {
        ts_ns: raw.ts_ns,
        pid: raw.pid,
        request_id: raw.request_id,
        what,
    })
}

/// Untrusted bytes → printable text: invalid UTF-8 replaced, control characters dropped,
/// a cut-off string marked with a trailing `…`.
fn sanitize(raw: &MarkerEvent, slot: usize) -> String {
    if raw.read_failed & (1 << slot) != 0 {
        return "<unreadable>".to_owned();
    }
    let mut text: String = String::from_utf8_lossy(raw.text(slot))
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    if raw.is_truncated(slot) {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_common::marker::TEXT_CAP;

    fn bytes_of(event: &MarkerEvent) -> Vec<u8> {
        // SAFETY: MarkerEvent is repr(C) plain old data without padding.
        unsafe {
            std::slice::from_raw_parts(
                (event as *const MarkerEvent).cast::<u8>(),
                size_of::<MarkerEvent>(),
            )
        }
        .to_vec()
    }

    fn event(kind: MarkerKind) -> MarkerEvent {
        MarkerEvent {
            kind: kind as u32,
            request_id: 7,
            ts_ns: 100,
            pid: 42,
            ..MarkerEvent::ZERO
        }
    }

    fn with_text(mut raw: MarkerEvent, slot: usize, text: &[u8], broker_len: u32) -> MarkerEvent {
        raw.text[slot][..text.len()].copy_from_slice(text);
        raw.text_len[slot] = broker_len;
        raw
    }

    #[test]
    fn request_begin_with_model_and_traceparent() {
        let tp = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let raw = with_text(event(MarkerKind::RequestBegin), 0, b"gpt-4o", 6);
        let raw = with_text(raw, 1, tp, tp.len() as u32);
        let decoded = decode(&bytes_of(&raw)).unwrap();
        assert_eq!(decoded.request_id, 7);
        assert_eq!(decoded.pid, 42);
        assert_eq!(
            decoded.what,
            What::RequestBegin {
                model: "gpt-4o".into(),
                traceparent: Some(String::from_utf8(tp.to_vec()).unwrap())
            }
        );
    }

    #[test]
    fn hostile_text_is_sanitized_and_truncation_marked() {
        let raw = with_text(
            event(MarkerKind::Provider),
            0,
            b"op\xffen\n{x=\"1\"}",
            1 << 20,
        );
        let What::Provider(name) = decode(&bytes_of(&raw)).unwrap().what else {
            panic!()
        };
        // The copy holds TEXT_CAP bytes at most; the broker's length says it was cut.
        assert!(name.starts_with("op\u{fffd}en{x=\"1\"}"), "{name:?}");
        assert!(name.ends_with('…'));
        assert!(name.len() <= TEXT_CAP * 3 + 3);
    }

    #[test]
    fn unreadable_string_is_flagged_not_garbage() {
        let mut raw = event(MarkerKind::Provider);
        raw.read_failed = 1;
        assert_eq!(
            decode(&bytes_of(&raw)).unwrap().what,
            What::Provider("<unreadable>".into())
        );
    }

    #[test]
    fn stages_known_custom_and_tool() {
        let mut raw = event(MarkerKind::StageBegin);
        raw.values[0] = Stage::KeypoolAcquire as u64;
        assert_eq!(
            decode(&bytes_of(&raw)).unwrap().what,
            What::StageBegin(StageId::Known(Stage::KeypoolAcquire))
        );
        let mut raw = with_text(event(MarkerKind::StageEnd), 0, b"cache.lookup", 12);
        raw.values[0] = Stage::Custom as u64;
        assert_eq!(
            decode(&bytes_of(&raw)).unwrap().what,
            What::StageEnd(StageId::Custom("cache.lookup".into()))
        );
        let mut raw = with_text(event(MarkerKind::StageBegin), 0, b"get_time", 8);
        raw.values[0] = Stage::ToolExecute as u64;
        let What::StageBegin(id) = decode(&bytes_of(&raw)).unwrap().what else {
            panic!()
        };
        assert_eq!((id.name(), id.tool()), ("tool.execute", Some("get_time")));
    }

    #[test]
    fn malformed_records_are_errors() {
        assert_eq!(decode(&[0; 3]), Err(DecodeError::Size(3)));
        assert_eq!(
            decode(&bytes_of(&event_kind(99))),
            Err(DecodeError::Kind(99))
        );
        let mut raw = event(MarkerKind::StageBegin);
        raw.values[0] = 1234;
        assert_eq!(decode(&bytes_of(&raw)), Err(DecodeError::Stage(1234)));
    }

    fn event_kind(kind: u32) -> MarkerEvent {
        MarkerEvent {
            kind,
            ..MarkerEvent::ZERO
        }
    }
}
