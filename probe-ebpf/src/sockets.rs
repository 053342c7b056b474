//! Tracepoints on the traced processes' TCP sockets (docs/sockets.md).
//!
//! `sock:sock_send_length`/`sock:sock_recv_length` see every socket read and write with
//! its byte count, but not the file descriptor; the read/write-family syscall around them
//! does, and its arguments are still in the thread's saved registers. No program runs at
//! the read/write syscalls' entries: one there would run on every read and write of
//! every process.
//! `tcp:tcp_sendmsg_locked` marks when a write began, before its bytes left. Connects are
//! timed by the TCP state changes (SYN_SENT in `connect()`, ESTABLISHED in softirq when
//! the SYN-ACK arrives), and arrivals by `sock:sk_data_ready` (softirq, when received
//! bytes are queued), so a response's first byte is timed when it came, not when the
//! broker got round to reading it.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user, generated::bpf_probe_read_user as read_raw},
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, LruHashMap},
    programs::{BtfTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
use probe_common::{
    event::{Counter, EventHeader, Source},
    maps::{MAX_CONNECTING, MAX_SOCKET_ADDRESSES, MAX_SOCKETS, MAX_TRACED_THREADS},
    socket::{
        DIRECTION_RECV, DIRECTION_SEND, PREFIX_CAP, Skipped, SocketEvent, SocketKind, SocketState,
        WireEndpoint,
    },
};

use crate::events::{
    EVENTS, armed, count, count_loss, current_syscall, current_task, put, submit_flags, traced,
    write_header, zero_words,
};
use probe_common::socket::socket_key;

/// How a syscall passes its buffer: which memory to read a prefix from.
#[derive(Clone, Copy)]
enum Shape {
    /// (fd, buffer, ...)
    Plain,
    /// (fd, iovec array, ...)
    Iovec,
    /// (fd, msghdr, ...)
    Msghdr,
}

/// x86-64 syscall numbers.
mod nr {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const CONNECT: u64 = 42;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
    pub const SENDMSG: u64 = 46;
    pub const RECVMSG: u64 = 47;
}

/// The read/write-family syscalls whose socket I/O is followed, by direction, and how
/// each passes its buffer. Socket I/O in any other (io_uring, sendfile, sendmmsg) is
/// counted, not followed.
#[inline(always)]
fn io_shape(syscall: u64, direction: u32) -> Option<Shape> {
    match (direction, syscall) {
        (DIRECTION_SEND, nr::WRITE | nr::SENDTO) | (DIRECTION_RECV, nr::READ | nr::RECVFROM) => {
            Some(Shape::Plain)
        }
        (DIRECTION_SEND, nr::WRITEV) | (DIRECTION_RECV, nr::READV) => Some(Shape::Iovec),
        (DIRECTION_SEND, nr::SENDMSG) | (DIRECTION_RECV, nr::RECVMSG) => Some(Shape::Msghdr),
        _ => None,
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Connecting {
    tgid: u32,
    fd: i32,
}

/// Kernel socket address → the connect in progress on it.
#[map]
static CONNECTING: LruHashMap<u64, Connecting> = LruHashMap::with_max_entries(MAX_CONNECTING, 0);

/// Followed socket fds ([`socket_key`]) → their [`SocketState`]. User space adds the
/// sockets it finds open at attach time.
#[map]
static SOCKETS: LruHashMap<u64, SocketState> = LruHashMap::with_max_entries(MAX_SOCKETS, 0);

/// Kernel socket address → its [`socket_key`], for events that know only the socket.
#[map]
static SOCKET_ADDRESSES: LruHashMap<u64, u64> =
    LruHashMap::with_max_entries(MAX_SOCKET_ADDRESSES, 0);

/// `BPF_NOEXIST`: insert only if absent (a concurrent insert must not be overwritten).
const BPF_NOEXIST: u64 = 1;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const MSG_PEEK: i32 = 2;
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;

/// Tracepoint field offsets (from /sys/kernel/tracing/events/*/format, stable ABI).
const SYSCALL_ARG0: usize = 16;
const SYSCALL_RET: usize = 16;

/// A field of the tracepoint's record, loaded straight from it: the verifier lets a
/// tracepoint program load its record at constant offsets aligned to the load's size,
/// where `read_at` calls a helper per field. Volatile, so that LLVM keeps each load as
/// written rather than merging loads into a copy through a pointer off the context, which
/// the verifier refuses.
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: offsets come from the tracepoint's format (a stable ABI) and are aligned
    // for T; the record is that long, and the verifier checks the load.
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

/// When a thread's write began sending.
#[repr(C)]
#[derive(Clone, Copy)]
struct SendStart {
    /// The writing thread; 0 once its `sock_send_length` took the time.
    tid: u32,
    _pad: u32,
    ns: u64,
}

/// Slot `tid % MAX_TRACED_THREADS`: the write a traced thread began sending and whose
/// `sock_send_length` has not run yet. An array, not a hash: no hashing in a program that
/// runs on every TCP write of every process. Two traced threads that share a slot and
/// write at the same moment can disturb each other's start: one write may then be timed
/// from a later point of itself, or from the other write's start.
#[map]
static SEND_STARTS: Array<SendStart> = Array::with_max_entries(MAX_TRACED_THREADS, 0);

#[inline(always)]
fn send_start_slot(tid: u32) -> Option<&'static mut SendStart> {
    let slot = SEND_STARTS.get_ptr_mut(tid % MAX_TRACED_THREADS)?;
    // SAFETY: a map value lives as long as the map. Only the thread named in it, inside
    // a write, uses a slot, but for threads that share one: see SEND_STARTS.
    Some(unsafe { &mut *slot })
}

/// A thread of a traced process began sending on a TCP socket (`tcp:tcp_sendmsg_locked`,
/// once per segment it fills): remember when, for its `sock_send_length`, which runs only
/// once the bytes have left and may already have been answered (on loopback). Only inside
/// a followed write syscall, whose `sock_send_length` takes the time: TCP data sent by
/// anything else (kTLS flushing at close, say) would leave it for the thread's next write.
/// A BTF tracepoint: it reads none of the tracepoint's fields, so the kernel calls it
/// straight from the hook, without first writing the classic tracepoint's record.
#[btf_tracepoint(function = "tcp_sendmsg_locked")]
pub fn send_begin(_ctx: BtfTracePointContext) -> i32 {
    let (tgid, tid) = current_task();
    if !traced(tgid) {
        return 0;
    }
    let Some(slot) = send_start_slot(tid) else {
        return 0;
    };
    // Later segments of the same write keep its start (and skip the register read).
    if slot.tid == tid {
        return 0;
    }
    let in_write =
        current_syscall().is_some_and(|syscall| io_shape(syscall.nr, DIRECTION_SEND).is_some());
    if in_write {
        slot.tid = tid;
        // SAFETY: reading the clock has no preconditions.
        slot.ns = unsafe { bpf_ktime_get_ns() };
    }
    0
}

/// When the current thread's write began sending, if `send_begin` saw it; taken, so
/// that the next write is not timed from it.
#[inline(always)]
fn take_send_start(tid: u32) -> Option<u64> {
    let slot = send_start_slot(tid)?;
    if slot.tid != tid {
        return None;
    }
    slot.tid = 0;
    Some(slot.ns)
}

#[tracepoint]
pub fn sock_send(ctx: TracePointContext) -> u32 {
    on_data(&ctx, DIRECTION_SEND)
}

#[tracepoint]
pub fn sock_recv(ctx: TracePointContext) -> u32 {
    on_data(&ctx, DIRECTION_RECV)
}

/// sock:sock_{send,recv}_length fields.
const SOCK_SK: usize = 8;
const SOCK_FAMILY: usize = 16;
const SOCK_PROTOCOL: usize = 18;
const SOCK_RET: usize = 20;
const SOCK_FLAGS: usize = 24;

/// The state of followed socket `key`, added if new.
#[inline(always)]
fn socket_state(key: u64) -> Option<*mut SocketState> {
    if let Some(state) = SOCKETS.get_ptr_mut(&key) {
        return Some(state);
    }
    let _ = SOCKETS.insert(&key, &SocketState::NEW, BPF_NOEXIST);
    SOCKETS.get_ptr_mut(&key)
}

#[inline(always)]
fn on_data(ctx: &TracePointContext, direction: u32) -> u32 {
    let (tgid, tid) = current_task();
    if !traced(tgid) {
        return 0;
    }
    // Taken from any write, failed or on a socket not followed (SMC over TCP, say), so
    // that the thread's next write is not timed from it.
    let send_start_ns = if direction == DIRECTION_SEND {
        take_send_start(tid)
    } else {
        None
    };
    let family = field::<u16>(ctx, SOCK_FAMILY);
    let protocol = field::<u16>(ctx, SOCK_PROTOCOL);
    let bytes = field::<i32>(ctx, SOCK_RET);
    let flags = field::<i32>(ctx, SOCK_FLAGS);
    if (family != AF_INET && family != AF_INET6) || protocol != IPPROTO_TCP {
        return 0;
    }
    if bytes <= 0 || (direction == DIRECTION_RECV && flags & MSG_PEEK != 0) {
        return 0;
    }
    let syscall = current_syscall();
    let shape = syscall.and_then(|syscall| io_shape(syscall.nr, direction));
    let (Some(syscall), Some(shape)) = (syscall, shape) else {
        if armed() && count(Counter::SocketIoWithoutSyscall) == 0 {
            warn!(
                ctx,
                "socket I/O outside read/write syscalls (io_uring, sendfile?): not followed (counted)"
            );
        }
        return 0;
    };
    let fd = syscall.arg0 as i32;
    let key = socket_key(tgid, fd);
    let Some(state) = socket_state(key) else {
        return 0;
    };
    // SAFETY: a map value stays valid while this program runs. sk_ready (softirq, any
    // CPU) may store to the arrival times meanwhile; aligned 8-byte stores do not tear,
    // and an arrival stored between our load and reset below is lost to `ready_ns` but
    // kept in `last_ready_ns`.
    let state = unsafe { &mut *state };
    let sk = field::<u64>(ctx, SOCK_SK);
    if sk != 0 {
        follow_address(state, sk, key);
    }
    let new_message = state.direction != direction;
    // Tallied reads and writes so far continue this message; a new one is numbered now,
    // recorded or not, so that user space never places tallies in a message it missed.
    let continued_message = state.skipped.message;
    if new_message {
        state.skipped.message = continued_message + 1;
    }
    let captured = if new_message { 0 } else { state.captured };
    state.direction = direction;
    // The first PREFIX_CAP bytes of each message are copied, over as many reads or
    // writes as they take (hyper's server first reads 24 bytes, for instance).
    let capture = captured < PREFIX_CAP as u32;
    if capture {
        state.captured = (captured + bytes as u32).min(PREFIX_CAP as u32);
    }
    // SAFETY: reading the clock has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // Without tcp:tcp_sendmsg_locked (Linux < 6.11), a write is timed once it is done.
    let ts_ns = send_start_ns.unwrap_or(now);
    let (ready_ns, last_ready_ns) = if direction == DIRECTION_RECV {
        // Bytes left from an earlier arrival (the previous read took only part) came no
        // later than the latest arrival.
        let first = match state.ready_ns {
            0 => state.last_ready_ns,
            first => first,
        };
        state.ready_ns = 0;
        (first, state.last_ready_ns)
    } else {
        // Bytes ready before a new request began cannot answer it. Without the write's
        // start, an answer may have come before this tracepoint (on loopback): keep it.
        let stale = send_start_ns.is_some_and(|start| state.ready_ns < start);
        if new_message && state.ready_ns != 0 && stale {
            state.ready_ns = 0;
        }
        (0, 0)
    };
    // Past its copied start, a message's reads and writes are tallied, not sent: a
    // stream is a record per message, not per chunk. The next record carries the totals.
    if !new_message && !capture {
        let skipped = &mut state.skipped;
        skipped.calls += 1;
        skipped.bytes += bytes as u64;
        skipped.last_ns = ts_ns;
        skipped.last_ready_ns = last_ready_ns;
        return 0;
    }
    if !armed() {
        return 0;
    }
    let kind = if direction == DIRECTION_SEND {
        SocketKind::Send
    } else {
        SocketKind::Recv
    };
    let Some(mut entry) = EVENTS.reserve::<SocketEvent>(0) else {
        count_lost(ctx);
        return 0;
    };
    // SAFETY: the reservation is sized and aligned for a SocketEvent; every field user
    // space reads is written before submit.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    fill(event, kind, (tgid, tid), fd, ts_ns);
    put(&mut event.ready_ns, ready_ns);
    put(&mut event.last_ready_ns, last_ready_ns);
    put_skipped(event, &state.skipped, continued_message);
    put(&mut event.message, state.skipped.message);
    event.bytes = bytes as u32;
    if capture {
        event.prefix_len = read_prefix(event, shape, syscall.arg1, bytes as u32);
    }
    entry.submit(submit_flags());
    0
}

/// sock:sk_data_ready fields.
const READY_SKADDR: usize = 8;
const READY_PROTOCOL: usize = 18;

/// Keeps `SOCKET_ADDRESSES` pointing at this socket: the address may be new (first data
/// event, or the fd now names another socket) or its entry evicted by the LRU.
#[inline(always)]
fn follow_address(state: &mut SocketState, sk: u64, key: u64) {
    if state.sk != sk {
        if state.sk != 0 {
            forget_address(state.sk, key);
        }
        state.sk = sk;
    }
    // SAFETY: copied out at once.
    if (unsafe { SOCKET_ADDRESSES.get(&sk) }).copied() != Some(key) {
        let _ = SOCKET_ADDRESSES.insert(&sk, &key, 0);
    }
}

/// Removes the address's entry if it still names this socket (a reused address may
/// already name another one).
#[inline(always)]
fn forget_address(sk: u64, key: u64) {
    // SAFETY: copied out at once.
    if (unsafe { SOCKET_ADDRESSES.get(&sk) }).copied() == Some(key) {
        let _ = SOCKET_ADDRESSES.remove(&sk);
    }
}

/// Received bytes were queued on a socket (softirq, any process): remember when, as the
/// latest arrival and, the first time since the socket's last read, as the first.
/// A classic tracepoint, unlike `send_begin`: its record's protocol field turns away the
/// arrivals of every other protocol (UDP, Unix sockets) before any lookup.
#[tracepoint]
pub fn sk_ready(ctx: TracePointContext) -> u32 {
    if field::<u16>(&ctx, READY_PROTOCOL) != IPPROTO_TCP {
        return 0;
    }
    let sk = field::<u64>(&ctx, READY_SKADDR);
    // SAFETY: copied out at once.
    let Some(key) = (unsafe { SOCKET_ADDRESSES.get(&sk) }).copied() else {
        return 0;
    };
    let Some(state) = SOCKETS.get_ptr_mut(&key) else {
        return 0;
    };
    // SAFETY: a map value stays valid while this program runs; see on_data for the
    // process side's concurrent use.
    let state = unsafe { &mut *state };
    // A stale address (the fd was closed and reused) names another socket: skip it.
    if state.sk != sk {
        return 0;
    }
    // SAFETY: reading the clock has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    state.last_ready_ns = now;
    if state.ready_ns == 0 {
        state.ready_ns = now;
    }
    0
}

/// A socket record's 8-byte words after its header and before its prefix bytes.
const SOCKET_BODY_WORDS: (usize, usize) = {
    let header = core::mem::size_of::<EventHeader>();
    let fixed = core::mem::offset_of!(SocketEvent, prefix);
    assert!(header % 8 == 0 && fixed % 8 == 0);
    (header / 8, fixed / 8)
};

/// The header (who, when), every other field zero (see [`put`]) and the fd; the caller
/// writes the rest.
#[inline(always)]
fn fill(event: &mut SocketEvent, kind: SocketKind, task: (u32, u32), fd: i32, ts_ns: u64) {
    zero_words::<_, { SOCKET_BODY_WORDS.0 }, { SOCKET_BODY_WORDS.1 }>(event);
    write_header(&mut event.header, Source::Socket, kind as u32, task, ts_ns);
    put(&mut event.fd, fd);
}

/// The tallies, as of `message`; field by field: a struct copy may become a `memcpy`
/// call (events.rs).
#[inline(always)]
fn put_skipped(event: &mut SocketEvent, skipped: &Skipped, message: u64) {
    put(&mut event.skipped.calls, skipped.calls);
    put(&mut event.skipped.bytes, skipped.bytes);
    put(&mut event.skipped.last_ns, skipped.last_ns);
    put(&mut event.skipped.last_ready_ns, skipped.last_ready_ns);
    put(&mut event.skipped.message, message);
}

/// Copies the first bytes moved by the syscall; returns how many (0 if unreadable).
#[inline(always)]
fn read_prefix(event: &mut SocketEvent, shape: Shape, buffer: u64, moved: u32) -> u32 {
    let (start, available) = match shape {
        Shape::Plain => (buffer, moved as u64),
        Shape::Iovec => match first_iovec(buffer) {
            Some(iov) => iov,
            None => return 0,
        },
        Shape::Msghdr => {
            // struct msghdr: msg_name, msg_namelen (+pad), msg_iov at 16.
            // SAFETY: a user pointer read by the helper, which cannot fault.
            match unsafe { bpf_probe_read_user((buffer + 16) as *const u64) } {
                Ok(iov) => match first_iovec(iov) {
                    Some(iov) => iov,
                    None => return 0,
                },
                Err(_) => return 0,
            }
        }
    };
    let mut len = available.min(moved as u64) as u32;
    if len > PREFIX_CAP as u32 {
        len = PREFIX_CAP as u32;
    }
    // SAFETY: at most PREFIX_CAP bytes into the event's own buffer; a bad user pointer
    // makes the helper fail, it cannot fault.
    let rc = unsafe {
        read_raw(
            event.prefix.as_mut_ptr().cast(),
            len,
            start as *const core::ffi::c_void,
        )
    };
    if rc == 0 { len } else { 0 }
}

/// (base, len) of the first `struct iovec` at `iov`.
#[inline(always)]
fn first_iovec(iov: u64) -> Option<(u64, u64)> {
    // SAFETY: a user pointer read by the helper, which cannot fault.
    unsafe { bpf_probe_read_user(iov as *const [u64; 2]) }
        .ok()
        .map(|[base, len]| (base, len))
}

#[inline(always)]
fn count_lost(ctx: &TracePointContext) {
    if count_loss(Counter::SocketEventsLost) == 0 {
        warn!(
            ctx,
            "ring buffer full: socket events are being dropped (counted)"
        );
    }
}

/// Emits an event without data; returns 0 (the tracepoint return value).
#[inline(always)]
fn emit(
    ctx: &TracePointContext,
    kind: SocketKind,
    tgid: u32,
    tid: u32,
    fd: i32,
    endpoints: Option<(WireEndpoint, WireEndpoint)>,
    skipped: &Skipped,
) -> u32 {
    if !armed() {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<SocketEvent>(0) else {
        count_lost(ctx);
        return 0;
    };
    // SAFETY: as in on_data.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    // SAFETY: reading the clock has no preconditions.
    fill(event, kind, (tgid, tid), fd, unsafe { bpf_ktime_get_ns() });
    if let Some((local, remote)) = endpoints {
        event.local = local;
        event.remote = remote;
    }
    put_skipped(event, skipped, skipped.message);
    entry.submit(submit_flags());
    0
}

/// `accept` and `accept4` exits: the returned fd is an inbound connection.
#[tracepoint]
pub fn accept_exit(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_task();
    if !traced(tgid) {
        return 0;
    }
    let fd = field::<i64>(&ctx, SYSCALL_RET);
    if fd < 0 {
        return 0;
    }
    let key = socket_key(tgid, fd as i32);
    let _ = SOCKETS.insert(&key, &SocketState::NEW, 0);
    emit(
        &ctx,
        SocketKind::Accept,
        tgid,
        tid,
        fd as i32,
        None,
        &Skipped::NONE,
    )
}

/// sock:inet_sock_set_state fields.
const STATE_SKADDR: usize = 8;
const STATE_OLD: usize = 16;
const STATE_NEW: usize = 20;
const STATE_SPORT: usize = 24;
const STATE_DPORT: usize = 26;
const STATE_FAMILY: usize = 28;
const STATE_PROTOCOL: usize = 30;
const STATE_SADDR: usize = 32;
const STATE_DADDR: usize = 36;
const STATE_SADDR_V6: usize = 40;
const STATE_DADDR_V6: usize = 56;

#[tracepoint]
pub fn tcp_state(ctx: TracePointContext) -> u32 {
    if field::<u16>(&ctx, STATE_PROTOCOL) != IPPROTO_TCP {
        return 0;
    }
    let sk = field::<u64>(&ctx, STATE_SKADDR);
    let old = field::<i32>(&ctx, STATE_OLD);
    let new = field::<i32>(&ctx, STATE_NEW);
    if new == TCP_SYN_SENT {
        // Inside connect(), on the connecting thread.
        let (tgid, tid) = current_task();
        if !traced(tgid) {
            return 0;
        }
        let Some(syscall) = current_syscall().filter(|syscall| syscall.nr == nr::CONNECT) else {
            return 0;
        };
        let fd = syscall.arg0 as i32;
        let _ = CONNECTING.insert(&sk, &Connecting { tgid, fd }, 0);
        let key = socket_key(tgid, fd);
        let state = SocketState {
            sk,
            ..SocketState::NEW
        };
        let _ = SOCKETS.insert(&key, &state, 0);
        let _ = SOCKET_ADDRESSES.insert(&sk, &key, 0);
        let endpoints = Some(endpoints(&ctx));
        return emit(
            &ctx,
            SocketKind::ConnectStart,
            tgid,
            tid,
            fd,
            endpoints,
            &Skipped::NONE,
        );
    }
    if old == TCP_SYN_SENT {
        // Usually in softirq: the process comes from the map, not the current task.
        // SAFETY: copied out at once.
        let Some(connecting) = (unsafe { CONNECTING.get(&sk) }).copied() else {
            return 0;
        };
        let _ = CONNECTING.remove(&sk);
        let kind = if new == TCP_ESTABLISHED {
            SocketKind::ConnectDone
        } else {
            SocketKind::ConnectFailed
        };
        let endpoints = Some(endpoints(&ctx));
        return emit(
            &ctx,
            kind,
            connecting.tgid,
            0,
            connecting.fd,
            endpoints,
            &Skipped::NONE,
        );
    }
    0
}

/// (local, remote) of an inet_sock_set_state record.
#[inline(always)]
fn endpoints(ctx: &TracePointContext) -> (WireEndpoint, WireEndpoint) {
    let family = field::<u16>(ctx, STATE_FAMILY);
    // Addresses are byte arrays in the record, loaded as aligned words (a load must be
    // aligned to its size) and kept in memory order.
    let (local, remote) = if family == AF_INET6 {
        (
            field::<[u64; 2]>(ctx, STATE_SADDR_V6),
            field::<[u64; 2]>(ctx, STATE_DADDR_V6),
        )
    } else {
        (
            [v4_word(field::<u32>(ctx, STATE_SADDR)), 0],
            [v4_word(field::<u32>(ctx, STATE_DADDR)), 0],
        )
    };
    let endpoint = |port, words| WireEndpoint {
        family,
        port: field::<u16>(ctx, port),
        addr: address_bytes(words),
    };
    (endpoint(STATE_SPORT, local), endpoint(STATE_DPORT, remote))
}

/// An IPv4 address's 4 bytes followed by 4 zero bytes, in memory order.
#[inline(always)]
fn v4_word(address: u32) -> u64 {
    let [a, b, c, d] = address.to_ne_bytes();
    u64::from_ne_bytes([a, b, c, d, 0, 0, 0, 0])
}

#[inline(always)]
fn address_bytes(words: [u64; 2]) -> [u8; 16] {
    // SAFETY: same size, and every bit pattern is valid for both types.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) }
}

#[tracepoint]
pub fn close_enter(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_task();
    if !traced(tgid) {
        return 0;
    }
    let fd = field::<u64>(&ctx, SYSCALL_ARG0);
    let key = socket_key(tgid, fd as i32);
    // SAFETY: copied out at once.
    let Some(state) = (unsafe { SOCKETS.get(&key) }).copied() else {
        return 0;
    };
    let _ = SOCKETS.remove(&key);
    if state.sk != 0 {
        forget_address(state.sk, key);
    }
    // The tallies of the message it ends.
    emit(
        &ctx,
        SocketKind::Close,
        tgid,
        tid,
        fd as i32,
        None,
        &state.skipped,
    )
}
