//! Socket events: TCP connects, accepts, reads, writes and closes of the traced process,
//! from tracepoints (docs/sockets.md).

use crate::event::EventHeader;

/// Bytes copied from the start of each message (a request or a response: the data between
/// two changes of direction), over as many reads or writes as they take: enough for an
/// HTTP/1.1 request or status line.
pub const PREFIX_CAP: usize = 128;

/// What happened on the socket. The discriminant is the wire value.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketKind {
    /// `accept`/`accept4` returned this fd: an inbound connection.
    Accept = 1,
    /// `connect` sent the SYN: an upstream connection; `remote` is set.
    ConnectStart = 2,
    /// The handshake completed (SYN_SENT → ESTABLISHED); `local` and `remote` are set.
    ConnectDone = 3,
    /// The handshake failed (SYN_SENT → CLOSE).
    ConnectFailed = 4,
    /// Bytes written (`bytes`), any write-family syscall; timestamped when it began
    /// sending (Linux ≥ 6.11; before, when it was done).
    Send = 5,
    /// Bytes read (`bytes` > 0), any read-family syscall; timestamped once they are read.
    Recv = 6,
    /// `close` on a socket fd brokerprobe follows.
    Close = 7,
}

impl SocketKind {
    pub const ALL: [SocketKind; 7] = [
        SocketKind::Accept,
        SocketKind::ConnectStart,
        SocketKind::ConnectDone,
        SocketKind::ConnectFailed,
        SocketKind::Send,
        SocketKind::Recv,
        SocketKind::Close,
    ];

    pub fn from_wire(value: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| *kind as u32 == value)
    }
}

/// Key of the kernel's map of followed sockets: (process, fd) in one u64.
pub const fn socket_key(tgid: u32, fd: i32) -> u64 {
    ((tgid as u64) << 32) | fd as u32 as u64
}

/// Direction of the last data event on a socket, as the kernel tracks it to know when a
/// request or response starts.
pub const DIRECTION_NONE: u32 = 0;
pub const DIRECTION_SEND: u32 = 1;
pub const DIRECTION_RECV: u32 = 2;

/// A socket's reads and writes that continued a message past its copied start
/// ([`PREFIX_CAP`]): the kernel tallies them instead of sending a record each (a stream
/// is then a record per message, not per chunk). Totals since the socket was first
/// followed: they only grow, so user space takes what is new since it last looked, from
/// the next record or from the `SOCKETS` map, and never counts a read twice. They belong
/// to `message`: user space places them only if it took that message's first record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    pub calls: u64,
    pub bytes: u64,
    /// The latest one: when it moved its bytes (timed as a record would be) and, for a
    /// read, when its last bytes had arrived (0 if unknown, or a write).
    pub last_ns: u64,
    pub last_ready_ns: u64,
    /// The socket's current message, as the kernel numbers them (from 1; 0 before the
    /// first): the one these reads and writes continue.
    pub message: u64,
}

impl Skipped {
    pub const NONE: Skipped = Skipped {
        calls: 0,
        bytes: 0,
        last_ns: 0,
        last_ready_ns: 0,
        message: 0,
    };
}

/// What the kernel keeps per followed socket (value of the `SOCKETS` map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketState {
    /// `DIRECTION_*` of the last data event.
    pub direction: u32,
    /// Bytes of the current message's start copied so far (up to [`PREFIX_CAP`]).
    pub captured: u32,
    /// The kernel socket (`struct sock *`), once a data event or the connect named it:
    /// softirq events know only this, so they check it before touching the state.
    pub sk: u64,
    /// When received bytes first became ready on the socket since the process last read
    /// from it (`sock:sk_data_ready`, softirq); 0 if none since.
    pub ready_ns: u64,
    /// When received bytes last became ready; 0 if never seen.
    pub last_ready_ns: u64,
    pub skipped: Skipped,
}

impl SocketState {
    pub const NEW: SocketState = SocketState {
        direction: DIRECTION_NONE,
        captured: 0,
        sk: 0,
        ready_ns: 0,
        last_ready_ns: 0,
        skipped: Skipped::NONE,
    };
}

// SAFETY: repr(C) plain old data without padding; any bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SocketState {}

/// An IPv4 or IPv6 endpoint as the kernel's tracepoints give it: address bytes in network
/// order (IPv4 in the first 4 bytes), port in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireEndpoint {
    /// `AF_INET` (2) or `AF_INET6` (10); 0 when unknown.
    pub family: u16,
    pub port: u16,
    pub addr: [u8; 16],
}

impl WireEndpoint {
    pub const ZERO: WireEndpoint = WireEndpoint {
        family: 0,
        port: 0,
        addr: [0; 16],
    };
}

/// One socket event, as written by the kernel into the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SocketEvent {
    pub header: EventHeader,
    /// Recv: when the bytes read had become ready on the socket (the kernel queued them
    /// and woke readers), CLOCK_MONOTONIC; 0 if the kernel never saw bytes arrive on it.
    /// Unlike `header.ts_ns` (when the process read them) this excludes the process's own
    /// delay. `ready_ns` is the first arrival since the previous read (else the latest
    /// before it: leftovers of an earlier arrival), `last_ready_ns` the latest before this
    /// read.
    pub ready_ns: u64,
    pub last_ready_ns: u64,
    pub fd: i32,
    /// Send/Recv: bytes moved by this syscall.
    pub bytes: u32,
    pub local: WireEndpoint,
    pub remote: WireEndpoint,
    /// Bytes in `prefix`: the first bytes this syscall moved, while the message's first
    /// [`PREFIX_CAP`] bytes are being copied (else 0, as when reading the buffer failed).
    pub prefix_len: u32,
    pub _reserved: u32,
    /// Send/Recv/Close: the socket's tallies before this event.
    pub skipped: Skipped,
    /// Send/Recv: the message (numbered as in [`Skipped`]) this read or write belongs to.
    pub message: u64,
    pub prefix: [u8; PREFIX_CAP],
}

impl SocketEvent {
    pub const ZERO: SocketEvent = SocketEvent {
        header: EventHeader::ZERO,
        ready_ns: 0,
        last_ready_ns: 0,
        fd: 0,
        bytes: 0,
        local: WireEndpoint::ZERO,
        remote: WireEndpoint::ZERO,
        prefix_len: 0,
        _reserved: 0,
        skipped: Skipped::NONE,
        message: 0,
        prefix: [0; PREFIX_CAP],
    };

    pub fn prefix(&self) -> &[u8] {
        &self.prefix[..(self.prefix_len as usize).min(PREFIX_CAP)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip() {
        for kind in SocketKind::ALL {
            assert_eq!(SocketKind::from_wire(kind as u32), Some(kind));
        }
        assert_eq!(SocketKind::from_wire(0), None);
        assert_eq!(
            core::mem::size_of::<SocketEvent>(),
            280,
            "wire size changed: update docs/maps.md"
        );
    }
}
