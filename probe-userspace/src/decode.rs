//! Ring buffer bytes → typed events of either probe family. Strings from the broker are
//! untrusted (they may come straight from clients): decoded lossily and stripped of control
//! characters. Socket prefixes stay bytes: only [`crate::http`] looks into them.

use std::{
    fmt,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use probe_common::{
    event::{EventHeader, Source},
    marker::{MarkerEvent, MarkerKind, Stage},
    socket::{Skipped, SocketEvent, SocketKind, WireEndpoint},
    symbol::StageSampleEvent,
};

/// One ring buffer record.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Marker(Event),
    Socket(SocketIo),
    StageSample(StageSample),
}

/// One call of a symbol-mapped stage function (docs/modes/symbols.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageSample {
    pub pid: u32,
    pub tid: u32,
    /// Index of the stage in the symbol map.
    pub stage: u32,
    /// Entry and return, CLOCK_MONOTONIC nanoseconds.
    pub begin_ns: u64,
    pub end_ns: u64,
}

/// One socket event of the traced process.
#[derive(Clone, Debug, PartialEq)]
pub struct SocketIo {
    /// CLOCK_MONOTONIC nanoseconds, taken in the kernel.
    pub ts_ns: u64,
    pub pid: u32,
    /// 0 when the event happened outside the process (handshake completion in softirq).
    pub tid: u32,
    pub fd: i32,
    pub what: SocketWhat,
    /// Send, Recv, Close: the kernel's tallies of the socket's reads and writes past its
    /// messages' copied starts, before this event (none for the other kinds).
    pub skipped: Skipped,
    /// Send, Recv: the socket's message this read or write belongs to (kernel-numbered).
    pub message: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SocketWhat {
    Accept,
    ConnectStart {
        remote: Option<SocketAddr>,
    },
    ConnectDone {
        local: Option<SocketAddr>,
        remote: Option<SocketAddr>,
    },
    ConnectFailed,
    /// `prefix`: the first bytes, when this write starts a message (else empty).
    Send {
        bytes: u32,
        prefix: Vec<u8>,
    },
    /// `arrived`: when these bytes had arrived (queued by the kernel), if the kernel saw
    /// bytes arrive on this socket.
    Recv {
        bytes: u32,
        prefix: Vec<u8>,
        arrived: Option<Arrival>,
    },
    Close,
}

/// When the bytes of one read had arrived on the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// The first of them.
    pub first_ns: u64,
    /// The latest arrival before the read.
    pub last_ns: u64,
}

/// One decoded marker hit.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds, taken in the kernel at the hit.
    pub ts_ns: u64,
    pub pid: u32,
    /// The thread that hit the marker: requests do not follow threads, but the socket
    /// I/O a request causes is usually done by the same thread right after.
    pub tid: u32,
    pub request_id: u64,
    /// Ring-buffer losses before this event ([`EventHeader::losses`]).
    pub losses: u64,
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
        /// Chunks after the first that the kernel counted instead of sending.
        tallied_chunks: Option<TalliedChunks>,
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

/// A stream's chunks after its first, counted in the kernel (docs/markers.md, "Chunks").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TalliedChunks {
    pub count: u32,
    /// When the last of them came.
    pub last_ns: u64,
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
    Size {
        source: &'static str,
        got: usize,
        want: usize,
    },
    Source(u32),
    Kind(u32),
    Stage(u32),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Size { source, got, want } => write!(
                f,
                "{source} record of {got} bytes, expected {want}: eBPF object and brokerprobe \
                 disagree"
            ),
            DecodeError::Source(s) => write!(f, "record from unknown probe family {s}"),
            DecodeError::Kind(k) => write!(f, "unknown event kind {k}"),
            DecodeError::Stage(s) => write!(f, "unknown stage {s} (newer probe-markers?)"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    let header: EventHeader = read_pod(bytes, "record", size_of::<EventHeader>(), false)?;
    match Source::from_wire(header.source) {
        Some(Source::Marker) => {
            decode_marker(read_pod(bytes, "marker", size_of::<MarkerEvent>(), true)?)
                .map(Record::Marker)
        }
        Some(Source::Socket) => {
            decode_socket(read_pod(bytes, "socket", size_of::<SocketEvent>(), true)?)
                .map(Record::Socket)
        }
        Some(Source::Symbol) => {
            let raw: StageSampleEvent =
                read_pod(bytes, "stage sample", size_of::<StageSampleEvent>(), true)?;
            Ok(Record::StageSample(StageSample {
                pid: raw.header.pid,
                tid: raw.header.tid,
                stage: raw.stage,
                begin_ns: raw.begin_ns,
                end_ns: raw.header.ts_ns.max(raw.begin_ns),
            }))
        }
        None => Err(DecodeError::Source(header.source)),
    }
}

/// Marker for the plain-old-data wire structs of probe_common, valid for any bit pattern.
trait Pod: Copy {}
impl Pod for EventHeader {}
impl Pod for MarkerEvent {}
impl Pod for SocketEvent {}
impl Pod for StageSampleEvent {}

/// Reads a `T` from the start of `bytes`; `exact`: the record must be exactly that size.
fn read_pod<T: Pod>(
    bytes: &[u8],
    source: &'static str,
    want: usize,
    exact: bool,
) -> Result<T, DecodeError> {
    if bytes.len() < want || (exact && bytes.len() != want) {
        return Err(DecodeError::Size {
            source,
            got: bytes.len(),
            want,
        });
    }
    // SAFETY: at least size_of::<T>() bytes are there, T is plain old data valid for any
    // bits, and read_unaligned makes no alignment assumption about the record.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

fn decode_socket(raw: SocketEvent) -> Result<SocketIo, DecodeError> {
    let kind = SocketKind::from_wire(raw.header.kind).ok_or(DecodeError::Kind(raw.header.kind))?;
    let what = match kind {
        SocketKind::Accept => SocketWhat::Accept,
        SocketKind::ConnectStart => SocketWhat::ConnectStart {
            remote: endpoint(&raw.remote),
        },
        SocketKind::ConnectDone => SocketWhat::ConnectDone {
            local: endpoint(&raw.local),
            remote: endpoint(&raw.remote),
        },
        SocketKind::ConnectFailed => SocketWhat::ConnectFailed,
        SocketKind::Send => SocketWhat::Send {
            bytes: raw.bytes,
            prefix: raw.prefix().to_vec(),
        },
        SocketKind::Recv => SocketWhat::Recv {
            bytes: raw.bytes,
            prefix: raw.prefix().to_vec(),
            arrived: (raw.ready_ns != 0).then_some(Arrival {
                first_ns: raw.ready_ns,
                last_ns: raw.last_ready_ns.max(raw.ready_ns),
            }),
        },
        SocketKind::Close => SocketWhat::Close,
    };
    Ok(SocketIo {
        ts_ns: raw.header.ts_ns,
        pid: raw.header.pid,
        tid: raw.header.tid,
        fd: raw.fd,
        what,
        skipped: raw.skipped,
        message: raw.message,
    })
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) are shown as IPv4.
fn endpoint(wire: &WireEndpoint) -> Option<SocketAddr> {
    let ip = match wire.family {
        2 => IpAddr::V4(Ipv4Addr::new(
            wire.addr[0],
            wire.addr[1],
            wire.addr[2],
            wire.addr[3],
        )),
        10 => Ipv6Addr::from(wire.addr).to_canonical(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, wire.port))
}

fn decode_marker(raw: MarkerEvent) -> Result<Event, DecodeError> {
    let kind = MarkerKind::from_wire(raw.header.kind).ok_or(DecodeError::Kind(raw.header.kind))?;
    let text = |slot| sanitize(&raw, slot);
    let some_text = |slot: usize| Some(text(slot)).filter(|t| !t.is_empty());
    let stage = || -> Result<StageId, DecodeError> {
        let wire = raw.values[0] as u32;
        match Stage::from_wire(wire).ok_or(DecodeError::Stage(wire))? {
            // A stage named at run time (USDT probes may pass it) may be a known one.
            Stage::Custom => {
                let name = text(0);
                Ok(
                    match Stage::ALL.into_iter().find(|s| {
                        !matches!(s, Stage::Custom | Stage::ToolExecute) && s.name() == name
                    }) {
                        Some(known) => StageId::Known(known),
                        None => StageId::Custom(name),
                    },
                )
            }
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
            tallied_chunks: (raw.tallied > 0).then_some(TalliedChunks {
                count: raw.tallied,
                last_ns: raw.values[1],
            }),
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
        ts_ns: raw.header.ts_ns,
        pid: raw.header.pid,
        tid: raw.header.tid,
        request_id: raw.request_id,
        losses: raw.header.losses,
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
    use probe_common::{marker::TEXT_CAP, socket::PREFIX_CAP};

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

    fn header(source: Source, kind: u32) -> EventHeader {
        EventHeader {
            source: source as u32,
            kind,
            pid: 42,
            tid: 43,
            ts_ns: 100,
            losses: 0,
        }
    }

    fn event(kind: MarkerKind) -> MarkerEvent {
        MarkerEvent {
            header: header(Source::Marker, kind as u32),
            request_id: 7,
            ..MarkerEvent::ZERO
        }
    }

    /// Decodes a record that must be a marker event.
    fn marker(raw: &MarkerEvent) -> Event {
        match decode(&bytes_of(raw)) {
            Ok(Record::Marker(event)) => event,
            other => panic!("not a marker event: {other:?}"),
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
        let decoded = marker(&raw);
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
    fn request_end_with_chunks_tallied_in_the_kernel() {
        let mut raw = event(MarkerKind::RequestEnd);
        raw.values = [200, 7_000];
        assert_eq!(
            marker(&raw).what,
            What::RequestEnd {
                status: 200,
                error_type: None,
                tallied_chunks: None
            }
        );
        raw.tallied = 39;
        let What::RequestEnd { tallied_chunks, .. } = marker(&raw).what else {
            panic!()
        };
        assert_eq!(
            tallied_chunks,
            Some(TalliedChunks {
                count: 39,
                last_ns: 7_000
            })
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
        let What::Provider(name) = marker(&raw).what else {
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
        assert_eq!(marker(&raw).what, What::Provider("<unreadable>".into()));
    }

    #[test]
    fn stages_known_custom_and_tool() {
        let mut raw = event(MarkerKind::StageBegin);
        raw.values[0] = Stage::KeypoolAcquire as u64;
        assert_eq!(
            marker(&raw).what,
            What::StageBegin(StageId::Known(Stage::KeypoolAcquire))
        );
        let mut raw = with_text(event(MarkerKind::StageEnd), 0, b"cache.lookup", 12);
        raw.values[0] = Stage::Custom as u64;
        assert_eq!(
            marker(&raw).what,
            What::StageEnd(StageId::Custom("cache.lookup".into()))
        );
        let mut raw = with_text(event(MarkerKind::StageBegin), 0, b"get_time", 8);
        raw.values[0] = Stage::ToolExecute as u64;
        let What::StageBegin(id) = marker(&raw).what else {
            panic!()
        };
        assert_eq!((id.name(), id.tool()), ("tool.execute", Some("get_time")));
        // A stage named at run time (a USDT probe's argument) that is a known stage is it;
        // tool.execute needs its tool, so by name it stays a custom stage.
        let mut raw = with_text(event(MarkerKind::StageBegin), 0, b"upstream.chat", 13);
        raw.values[0] = Stage::Custom as u64;
        assert_eq!(
            marker(&raw).what,
            What::StageBegin(StageId::Known(Stage::UpstreamChat))
        );
        let mut raw = with_text(event(MarkerKind::StageBegin), 0, b"tool.execute", 12);
        raw.values[0] = Stage::Custom as u64;
        assert_eq!(
            marker(&raw).what,
            What::StageBegin(StageId::Custom("tool.execute".into()))
        );
    }

    #[test]
    fn malformed_records_are_errors() {
        assert!(matches!(
            decode(&[0; 3]),
            Err(DecodeError::Size { got: 3, .. })
        ));
        assert_eq!(
            decode(&bytes_of(&event_kind(99))),
            Err(DecodeError::Kind(99))
        );
        let mut unknown_source = event(MarkerKind::Chunk);
        unknown_source.header.source = 9;
        assert_eq!(
            decode(&bytes_of(&unknown_source)),
            Err(DecodeError::Source(9))
        );
        // A marker-sized record that claims to be a socket event is refused by size.
        let mut mislabelled = event(MarkerKind::Chunk);
        mislabelled.header.source = Source::Socket as u32;
        assert!(matches!(
            decode(&bytes_of(&mislabelled)),
            Err(DecodeError::Size {
                source: "socket",
                ..
            })
        ));
        let mut raw = event(MarkerKind::StageBegin);
        raw.values[0] = 1234;
        assert_eq!(decode(&bytes_of(&raw)), Err(DecodeError::Stage(1234)));
    }

    fn event_kind(kind: u32) -> MarkerEvent {
        MarkerEvent {
            header: header(Source::Marker, kind),
            ..MarkerEvent::ZERO
        }
    }

    #[test]
    fn socket_events_with_endpoints_and_prefix() {
        let mut raw = SocketEvent {
            header: header(Source::Socket, SocketKind::ConnectDone as u32),
            fd: 9,
            ..SocketEvent::ZERO
        };
        raw.local = WireEndpoint {
            family: 2,
            port: 40000,
            addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&[10, 0, 0, 2]);
        raw.remote = WireEndpoint {
            family: 10,
            port: 443,
            addr: mapped,
        };
        let Ok(Record::Socket(io)) = decode(&socket_bytes(&raw)) else {
            panic!()
        };
        assert_eq!((io.pid, io.tid, io.fd), (42, 43, 9));
        assert_eq!(
            io.what,
            SocketWhat::ConnectDone {
                local: Some("127.0.0.1:40000".parse().unwrap()),
                remote: Some("10.0.0.2:443".parse().unwrap()),
            }
        );

        let mut raw = SocketEvent {
            header: header(Source::Socket, SocketKind::Recv as u32),
            bytes: 1000,
            prefix_len: 1000, // never trusted past the buffer
            ready_ns: 90,
            last_ready_ns: 95,
            ..SocketEvent::ZERO
        };
        raw.prefix[..4].copy_from_slice(b"HTTP");
        let what = |raw: &SocketEvent| match decode(&socket_bytes(raw)) {
            Ok(Record::Socket(io)) => io.what,
            other => panic!("{other:?}"),
        };
        let SocketWhat::Recv {
            bytes,
            prefix,
            arrived,
        } = what(&raw)
        else {
            panic!()
        };
        assert_eq!(
            (bytes, prefix.len(), &prefix[..4]),
            (1000, PREFIX_CAP, &b"HTTP"[..])
        );
        let expected = Arrival {
            first_ns: 90,
            last_ns: 95,
        };
        assert_eq!(arrived, Some(expected));
        // The kernel never saw bytes arrive on this socket.
        raw.ready_ns = 0;
        assert!(matches!(what(&raw), SocketWhat::Recv { arrived: None, .. }));
    }

    fn socket_bytes(event: &SocketEvent) -> Vec<u8> {
        // SAFETY: SocketEvent is repr(C) plain old data; its padding-free layout is
        // checked by probe-common's size test.
        unsafe {
            std::slice::from_raw_parts(
                (event as *const SocketEvent).cast::<u8>(),
                size_of::<SocketEvent>(),
            )
        }
        .to_vec()
    }
}
