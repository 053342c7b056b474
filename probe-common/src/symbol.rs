//! Symbol-mapped stages (docs/modes/symbols.md): a broker without markers or USDT probes
//! has functions; a stage whose work is one synchronous call is timed from that
//! function's entry to its return, on the calling thread.

use crate::event::EventHeader;

/// One call of a mapped function, written at its return.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StageSampleEvent {
    /// `header.kind` is 0; `header.ts_ns` is the return.
    pub header: EventHeader,
    /// The function's entry (CLOCK_MONOTONIC).
    pub begin_ns: u64,
    /// Index of the stage in brokerprobe's symbol map (the uprobe's attach cookie).
    pub stage: u32,
    pub _reserved: u32,
}

impl StageSampleEvent {
    pub const ZERO: StageSampleEvent = StageSampleEvent {
        header: EventHeader::ZERO,
        begin_ns: 0,
        stage: 0,
        _reserved: 0,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_size_has_no_padding() {
        assert_eq!(size_of::<StageSampleEvent>(), size_of::<EventHeader>() + 16);
    }
}
