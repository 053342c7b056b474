//! Marker events: one per hit of a `brokerprobe_v1_*` marker function in the broker,
//! but for a stream's chunks after the first, which the request's end carries as a count.
//!
//! The marker ABI (symbols, argument registers, strings) is specified in docs/markers.md;
//! [`MarkerKind`] and [`Stage`] numbers here are that ABI's, and probe-markers' own copy
//! is checked against them by a test in this crate.

use crate::event::EventHeader;

/// The marker ABI version this build understands; symbol names carry it
/// (`brokerprobe_v1_request_begin`).
pub const MARKER_ABI_VERSION: u32 = 1;

/// Prefix of every marker symbol of [`MARKER_ABI_VERSION`].
pub const MARKER_SYMBOL_PREFIX: &str = "brokerprobe_v1_";

/// The marker gate: a `u16` the broker's markers test before calling (probe-markers), raised
/// by the kernel while brokerprobe holds a uprobe with it as reference counter.
pub const SEMAPHORE_SYMBOL: &str = "brokerprobe_v1_semaphore";

/// An instruction that never runs (it follows a `ret`), where that uprobe sits.
pub const SEMAPHORE_ANCHOR_SYMBOL: &str = "brokerprobe_v1_semaphore_anchor";

/// Bytes of each string argument copied by the kernel; longer strings are truncated and
/// the broker-given length is kept so user space can tell.
pub const TEXT_CAP: usize = 64;

/// Which marker fired. The discriminant is the wire value.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MarkerKind {
    RequestBegin = 1,
    RequestEnd = 2,
    StageBegin = 3,
    StageEnd = 4,
    Provider = 5,
    FirstByte = 6,
    Chunk = 7,
    TokenUsage = 8,
    Fallback = 9,
}

impl MarkerKind {
    pub const ALL: [MarkerKind; 9] = [
        MarkerKind::RequestBegin,
        MarkerKind::RequestEnd,
        MarkerKind::StageBegin,
        MarkerKind::StageEnd,
        MarkerKind::Provider,
        MarkerKind::FirstByte,
        MarkerKind::Chunk,
        MarkerKind::TokenUsage,
        MarkerKind::Fallback,
    ];

    pub fn from_wire(value: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| *kind as u32 == value)
    }

    /// Symbol suffix after [`MARKER_SYMBOL_PREFIX`].
    pub const fn symbol_suffix(self) -> &'static str {
        match self {
            MarkerKind::RequestBegin => "request_begin",
            MarkerKind::RequestEnd => "request_end",
            MarkerKind::StageBegin => "stage_begin",
            MarkerKind::StageEnd => "stage_end",
            MarkerKind::Provider => "provider",
            MarkerKind::FirstByte => "first_byte",
            MarkerKind::Chunk => "chunk",
            MarkerKind::TokenUsage => "token_usage",
            MarkerKind::Fallback => "fallback",
        }
    }

    /// Request begin and end delimit a request: without both nothing can be assembled.
    pub const fn is_required(self) -> bool {
        matches!(self, MarkerKind::RequestBegin | MarkerKind::RequestEnd)
    }
}

/// Well-known broker stages. [`Stage::Custom`] carries its name as the marker's text.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    Custom = 0,
    Route = 1,
    KeypoolAcquire = 2,
    UpstreamChat = 3,
    UpstreamChatStream = 4,
    ResponseSerialize = 5,
    ToolLoop = 6,
    ToolExecute = 7,
    StreamingToolLoop = 8,
    StreamingToolTurn = 9,
}

impl Stage {
    pub const ALL: [Stage; 10] = [
        Stage::Custom,
        Stage::Route,
        Stage::KeypoolAcquire,
        Stage::UpstreamChat,
        Stage::UpstreamChatStream,
        Stage::ResponseSerialize,
        Stage::ToolLoop,
        Stage::ToolExecute,
        Stage::StreamingToolLoop,
        Stage::StreamingToolTurn,
    ];

    pub fn from_wire(value: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|stage| *stage as u32 == value)
    }

    /// The stage's name in metrics, spans and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Stage::Custom => "custom",
            Stage::Route => "route",
            Stage::KeypoolAcquire => "keypool.acquire",
            Stage::UpstreamChat => "upstream.chat",
            Stage::UpstreamChatStream => "upstream.chat_stream",
            Stage::ResponseSerialize => "response.serialize",
            Stage::ToolLoop => "tool_loop",
            Stage::ToolExecute => "tool.execute",
            Stage::StreamingToolLoop => "streaming_tool_loop",
            Stage::StreamingToolTurn => "streaming_tool_turn",
        }
    }
}

/// `CHUNK_TALLIES` key: a request's chunks, by process and request id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TallyKey {
    pub tgid: u32,
    pub _pad: u32,
    pub request_id: u64,
}

/// `CHUNK_TALLIES` value: chunks of one stream after its first one sent, and when the last
/// came.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ChunkTally {
    pub count: u64,
    pub last_ns: u64,
}

#[cfg(feature = "user")]
// SAFETY: plain old data of integers, no padding.
unsafe impl aya::Pod for TallyKey {}

#[cfg(feature = "user")]
// SAFETY: plain old data of integers, no padding.
unsafe impl aya::Pod for ChunkTally {}

/// One marker hit, as written by the kernel into the ring buffer.
///
/// Field use by kind (`values`, `text`):
/// - RequestBegin: -, [model, traceparent]
/// - RequestEnd: [status, when the last tallied chunk came], [error type, -]; `tallied`:
///   chunks after the first that the kernel counted instead of sending one by one
/// - StageBegin / StageEnd: [stage, -], [custom stage or tool name, -]
/// - Provider: -, [provider, -]
/// - TokenUsage: [input tokens, output tokens], -
/// - Fallback: -, [from model, to model]
/// - FirstByte, Chunk: -, -
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MarkerEvent {
    /// `header.kind` is a [`MarkerKind`] wire value; `header.tid` is the thread of the hit,
    /// which requests do not follow (tasks move between threads).
    pub header: EventHeader,
    pub request_id: u64,
    pub values: [u64; 2],
    /// Length the broker passed for each string; above [`TEXT_CAP`] the copy is truncated.
    pub text_len: [u32; 2],
    /// Bit `slot` set if reading that string from the broker's memory failed (bad pointer).
    pub read_failed: u32,
    pub tallied: u32,
    pub text: [[u8; TEXT_CAP]; 2],
}

impl MarkerEvent {
    pub const ZERO: MarkerEvent = MarkerEvent {
        header: EventHeader::ZERO,
        request_id: 0,
        values: [0; 2],
        text_len: [0; 2],
        read_failed: 0,
        tallied: 0,
        text: [[0; TEXT_CAP]; 2],
    };

    /// The copied bytes of string `slot` (possibly truncated, never past [`TEXT_CAP`]).
    pub fn text(&self, slot: usize) -> &[u8] {
        let len = (self.text_len[slot] as usize).min(TEXT_CAP);
        &self.text[slot][..len]
    }

    pub fn is_truncated(&self, slot: usize) -> bool {
        self.text_len[slot] as usize > TEXT_CAP
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// probe-markers keeps its own copy of the stage table (it has no dependencies);
    /// both must say what docs/markers.md says.
    #[test]
    fn probe_markers_stage_table_matches() {
        use probe_markers::Stage as M;
        // Exhaustive: a stage added to probe-markers alone fails to compile here.
        let ours = |stage: M| match stage {
            M::Route => Stage::Route,
            M::KeypoolAcquire => Stage::KeypoolAcquire,
            M::UpstreamChat => Stage::UpstreamChat,
            M::UpstreamChatStream => Stage::UpstreamChatStream,
            M::ResponseSerialize => Stage::ResponseSerialize,
            M::ToolLoop => Stage::ToolLoop,
            M::ToolExecute => Stage::ToolExecute,
            M::StreamingToolLoop => Stage::StreamingToolLoop,
            M::StreamingToolTurn => Stage::StreamingToolTurn,
        };
        let theirs = [
            M::Route,
            M::KeypoolAcquire,
            M::UpstreamChat,
            M::UpstreamChatStream,
            M::ResponseSerialize,
            M::ToolLoop,
            M::ToolExecute,
            M::StreamingToolLoop,
            M::StreamingToolTurn,
        ];
        assert_eq!(
            theirs.len() + 1,
            Stage::ALL.len(),
            "a stage missing on one side"
        );
        for stage in theirs {
            assert_eq!(ours(stage) as u32, stage as u32, "{stage:?} wire value");
            assert_eq!(ours(stage).name(), stage.name());
        }
    }

    #[test]
    fn wire_values_round_trip() {
        for kind in MarkerKind::ALL {
            assert_eq!(MarkerKind::from_wire(kind as u32), Some(kind));
        }
        assert_eq!(MarkerKind::from_wire(0), None);
        assert_eq!(
            core::mem::size_of::<MarkerEvent>(),
            200,
            "wire size changed: update docs/maps.md"
        );
    }
}
