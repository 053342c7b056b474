//! Sizes of every eBPF map, in one place. docs/maps.md explains each choice.

/// The ring buffer all probe families write (power of two, page multiple). At 200–280
/// bytes an event this holds 30–40k events: several seconds of a busy broker if userspace
/// stalls.
pub const EVENTS_BYTES: u32 = 8 << 20;

/// Records pending in the ring buffer before a probe wakes user space. Below it, records
/// wait for user space's periodic poll (every [`EVENTS_POLL_MS`]): a wake-up costs the traced
/// thread an interrupt and user space a context switch, per record. At 1 MiB (4–5k events) a
/// burst still leaves seven eighths of the buffer while user space wakes.
pub const EVENTS_WAKEUP_BYTES: u32 = EVENTS_BYTES / 8;

/// How often user space drains the ring buffer when no probe woke it.
pub const EVENTS_POLL_MS: u64 = 10;

/// Words of the traced-process bitmap: one bit for each PID Linux can hand out
/// (`PID_MAX_LIMIT`, 4 Mi on 64-bit), 512 KiB.
pub const TRACED_PROCESS_WORDS: u32 = (1 << 22) / 64;

/// Threads of traced processes with a trapped probe hit pending at once (LRU: a thread
/// that exits meanwhile is forgotten in time), and slots for threads' writes in progress.
pub const MAX_TRACED_THREADS: u32 = 16384;

/// Socket fds of traced processes followed at once (LRU).
pub const MAX_SOCKETS: u32 = 65536;

/// Outbound TCP handshakes in progress at once (LRU).
pub const MAX_CONNECTING: u32 = 4096;

/// Kernel sockets (`struct sock *`) of followed fds, so softirq events can find them (LRU).
pub const MAX_SOCKET_ADDRESSES: u32 = MAX_SOCKETS;

/// Streaming requests whose later chunks are counted in the kernel at once (a hash, not an
/// LRU: past it, chunks go to user space one record each, as before, and none is lost).
pub const MAX_TALLIED_STREAMS: u32 = 16384;

/// USDT probe sites (process, address) followed at once, over all processes.
pub const MAX_USDT_SITES: u32 = 4096;

/// Calls of symbol-mapped stage functions entered and not yet returned, by (thread,
/// stage), over all processes (LRU: a thread that dies inside one is forgotten in time).
pub const MAX_SYMBOL_CALLS: u32 = 16384;
