//! What every ring buffer record starts with. All probe families share one ring buffer, so
//! records come out in the order the kernel reserved them: a marker hit that happened
//! before a socket write is always read before it, which socket-to-request attribution
//! relies on.

/// Which probe family wrote a record. The discriminant is the wire value.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Marker = 1,
    Socket = 2,
    /// A stage timed at a mapped function's entry and return (symbol mode).
    Symbol = 3,
}

impl Source {
    pub fn from_wire(value: u32) -> Option<Self> {
        match value {
            1 => Some(Source::Marker),
            2 => Some(Source::Socket),
            3 => Some(Source::Symbol),
            _ => None,
        }
    }
}

/// The first bytes of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventHeader {
    /// A [`Source`] wire value.
    pub source: u32,
    /// The family's own kind (`MarkerKind`, `SocketKind`) wire value.
    pub kind: u32,
    /// Process (tgid) the event belongs to.
    pub pid: u32,
    /// Thread that caused it; 0 when it happened outside the process (softirq).
    pub tid: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC.
    pub ts_ns: u64,
    /// Records any probe failed to write (ring buffer full) before this one was written.
    /// Two records of one request with different values may have lost one of its records
    /// in between: user space then reports the request as incomplete, not as whole.
    pub losses: u64,
}

impl EventHeader {
    pub const ZERO: EventHeader = EventHeader {
        source: 0,
        kind: 0,
        pid: 0,
        tid: 0,
        ts_ns: 0,
        losses: 0,
    };
}

/// Kernel-side counters, one per-CPU slot each (index = discriminant).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Marker hits (and USDT or symbol-mapped stage events) dropped because the ring
    /// buffer was full.
    MarkerEventsLost = 0,
    /// Socket events dropped because the ring buffer was full.
    SocketEventsLost = 1,
    /// Socket reads/writes of the traced process seen outside a read/write-family
    /// syscall (io_uring, sendfile, splice): their file descriptor is unknown.
    SocketIoWithoutSyscall = 2,
}

impl Counter {
    pub const COUNT: u32 = 3;
}
