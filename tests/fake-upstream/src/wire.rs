//! The fake's own record of what crossed its sockets: the ground truth end-to-end tests
//! compare brokerprobe's socket measurements (taken at the broker, the other end of
//! each TCP connection) against.
//!
//! Every accepted connection is wrapped in a [`CountingStream`] that tallies wire bytes
//! (request and response heads included, chunked framing included) and write calls per
//! *exchange*: an exchange starts with the first read after a write (or the
//! connection's first read), which fits HTTP/1.1 without pipelining.
//!
//! A write is booked just after its syscall returns, so a client that has just read a
//! response can ask a moment before its last write is booked; ask again if it matters.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Finished exchanges kept; beyond this the oldest are dropped (and counted), so a
/// long-running fake cannot grow without bound.
const MAX_FINISHED: usize = 1_000_000;

/// One request/response exchange on one connection, as `GET /fake/exchanges` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Exchange {
    /// The request's `x-request-id` header (which the broker sends), if any.
    pub request_id: Option<String>,
    /// The request's path; empty if no request reached the router (e.g. a malformed one).
    pub path: String,
    /// The connection's peer: the broker's address.
    pub peer_ip: IpAddr,
    /// The connection's peer port: the broker's local port.
    pub peer_port: u16,
    /// CLOCK_MONOTONIC (the clock of `bpf_ktime_get_ns`) when the request was handled:
    /// when the chat handler started (its body parsed), for other routes when the
    /// request was dispatched. 0 if no request reached the router.
    pub received_ns: u64,
    /// When the read that got the first request bytes returned.
    pub first_read_ns: u64,
    /// Around the write syscall that sent the first response bytes: the bytes reached
    /// the peer's socket in between (on loopback, within the syscall). 0 if none.
    pub first_write_began_ns: u64,
    pub first_write_ended_ns: u64,
    /// The same for the last response bytes.
    pub last_write_began_ns: u64,
    pub last_write_ended_ns: u64,
    /// Request bytes read from the socket, head included.
    pub request_bytes: u64,
    /// Response bytes written to the socket, head and chunked framing included.
    pub response_bytes: u64,
    /// Write calls that wrote something; a vectored write counts once.
    pub writes: u64,
}

impl Exchange {
    fn new(peer: SocketAddr) -> Self {
        Self {
            request_id: None,
            path: String::new(),
            peer_ip: peer.ip(),
            peer_port: peer.port(),
            received_ns: 0,
            first_read_ns: 0,
            first_write_began_ns: 0,
            first_write_ended_ns: 0,
            last_write_began_ns: 0,
            last_write_ended_ns: 0,
            request_bytes: 0,
            response_bytes: 0,
            writes: 0,
        }
    }
}

/// Wire totals over all connections.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WireTotals {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub writes: u64,
}

/// Exchanges of all connections, open and closed.
#[derive(Default)]
pub(crate) struct WireLedger {
    // One lock for everything, so a snapshot sees each exchange exactly once even while
    // a connection closes; the fake's traffic is far too low for it to contend.
    book: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    finished: VecDeque<Exchange>,
    dropped: u64,
    /// By connection id, so snapshots list open connections in the order they opened.
    open: BTreeMap<u64, OpenConn>,
    next_conn: u64,
    totals: WireTotals,
}

struct OpenConn {
    peer: SocketAddr,
    current: Option<Exchange>,
    /// The last IO was a write, so the next read starts a new exchange.
    wrote_last: bool,
}

impl Book {
    fn finish(&mut self, exchange: Exchange) {
        if self.finished.len() == MAX_FINISHED {
            self.finished.pop_front();
            self.dropped += 1;
        }
        self.finished.push_back(exchange);
    }
}

impl WireLedger {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Finished exchanges in the order they finished (a connection's next request or
    /// its closing finishes one), then the current exchange of each open
    /// connection as it stands now.
    pub(crate) fn exchanges(&self) -> Vec<Exchange> {
        let book = self.book();
        let open = book.open.values().filter_map(|c| c.current.clone());
        book.finished.iter().cloned().chain(open).collect()
    }

    pub(crate) fn totals(&self) -> WireTotals {
        self.book().totals
    }

    /// Finished exchanges dropped because of [`MAX_FINISHED`].
    pub(crate) fn dropped(&self) -> u64 {
        self.book().dropped
    }
}

/// One connection's handle into the [`WireLedger`]; request handlers reach it through a
/// request extension to label the exchange they answer.
pub(crate) struct ConnLedger {
    id: u64,
    wire: Arc<WireLedger>,
}

impl ConnLedger {
    pub(crate) fn open(wire: &Arc<WireLedger>, peer: SocketAddr) -> Self {
        let mut book = wire.book();
        let id = book.next_conn;
        book.next_conn += 1;
        let conn = OpenConn {
            peer,
            current: None,
            wrote_last: false,
        };
        book.open.insert(id, conn);
        Self {
            id,
            wire: wire.clone(),
        }
    }

    /// Runs `f` on this connection's current exchange, if the connection is still open.
    fn with_current(&self, f: impl FnOnce(&mut Exchange)) {
        if let Some(conn) = self.wire.book().open.get_mut(&self.id) {
            f(conn.current.get_or_insert_with(|| Exchange::new(conn.peer)));
        }
    }

    /// Labels the current exchange with the request the server dispatches.
    pub(crate) fn dispatched(&self, path: &str, request_id: Option<String>) {
        let now = monotonic_ns();
        self.with_current(|exchange| {
            exchange.path = path.to_owned();
            exchange.request_id = request_id;
            exchange.received_ns = now;
        });
    }

    /// Re-stamps `received_ns` when a handler starts after reading the request body.
    /// Returns how long ago the request's first bytes were read (the scripted delays
    /// count from then, the closest a provider gets to the request's arrival).
    pub(crate) fn handler_started(&self) -> Duration {
        let now = monotonic_ns();
        let mut first_read_ns = now;
        self.with_current(|exchange| {
            exchange.received_ns = now;
            first_read_ns = exchange.first_read_ns;
        });
        Duration::from_nanos(now.saturating_sub(first_read_ns))
    }

    /// `at`: when the read returned.
    fn read(&self, bytes: usize, at: u64) {
        let mut book = self.wire.book();
        book.totals.bytes_read += bytes as u64;
        let Some(conn) = book.open.get_mut(&self.id) else {
            return;
        };
        let done = if conn.wrote_last {
            conn.wrote_last = false;
            conn.current.take()
        } else {
            None
        };
        let exchange = conn.current.get_or_insert_with(|| Exchange::new(conn.peer));
        if exchange.first_read_ns == 0 {
            exchange.first_read_ns = at;
        }
        exchange.request_bytes += bytes as u64;
        if let Some(done) = done {
            book.finish(done);
        }
    }

    /// `began`, `ended`: around the write syscall.
    fn wrote(&self, bytes: usize, began: u64, ended: u64) {
        let mut book = self.wire.book();
        book.totals.bytes_written += bytes as u64;
        book.totals.writes += 1;
        let Some(conn) = book.open.get_mut(&self.id) else {
            return;
        };
        conn.wrote_last = true;
        let exchange = conn.current.get_or_insert_with(|| Exchange::new(conn.peer));
        if exchange.first_write_began_ns == 0 {
            (exchange.first_write_began_ns, exchange.first_write_ended_ns) = (began, ended);
        }
        (exchange.last_write_began_ns, exchange.last_write_ended_ns) = (began, ended);
        exchange.response_bytes += bytes as u64;
        exchange.writes += 1;
    }

    fn close(&self) {
        let mut book = self.wire.book();
        if let Some(current) = book.open.remove(&self.id).and_then(|c| c.current) {
            book.finish(current);
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock eBPF's `bpf_ktime_get_ns` reads, so the
/// fake's timestamps compare directly with brokerprobe's.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A TCP stream that books every read and write into its connection's ledger and
/// finishes the connection's last exchange when dropped (the connection closed).
pub(crate) struct CountingStream {
    tcp: TcpStream,
    conn: Arc<ConnLedger>,
}

impl CountingStream {
    pub(crate) fn new(tcp: TcpStream, conn: Arc<ConnLedger>) -> Self {
        Self { tcp, conn }
    }

    /// Books a write that `began` before its syscall.
    fn count_write(&self, poll: &Poll<io::Result<usize>>, began: u64) {
        match poll {
            Poll::Ready(Ok(n)) if *n > 0 => self.conn.wrote(*n, began, monotonic_ns()),
            _ => {}
        }
    }
}

impl Drop for CountingStream {
    fn drop(&mut self) {
        self.conn.close();
    }
}

impl AsyncRead for CountingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.tcp).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            this.conn.read(read, monotonic_ns());
        }
        poll
    }
}

impl AsyncWrite for CountingStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let began = monotonic_ns();
        let poll = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.count_write(&poll, began);
        poll
    }

    // Delegated so hyper keeps queueing head and body chunks into one writev, as it does
    // on a bare TcpStream: that decides how many writes hit the wire.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let began = monotonic_ns();
        let poll = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.count_write(&poll, began);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_after_writes_start_a_new_exchange() {
        let wire = Arc::new(WireLedger::default());
        let peer: SocketAddr = "10.0.0.1:4242".parse().unwrap();
        let conn = ConnLedger::open(&wire, peer);
        conn.read(10, 1);
        conn.dispatched("/a", Some("one".into()));
        conn.read(5, 2);
        conn.wrote(100, 3, 4);
        conn.wrote(20, 5, 6);
        conn.read(7, 7);
        conn.dispatched("/b", None);
        let open = wire.exchanges();
        conn.close();
        conn.wrote(1, 8, 9); // after close: counted in the totals only
        let finished = wire.exchanges();
        assert_eq!(open, finished);

        let mut first = Exchange::new(peer);
        first.request_id = Some("one".into());
        first.path = "/a".into();
        (first.request_bytes, first.response_bytes, first.writes) = (15, 120, 2);
        first.first_read_ns = 1;
        (first.first_write_began_ns, first.first_write_ended_ns) = (3, 4);
        (first.last_write_began_ns, first.last_write_ended_ns) = (5, 6);
        let mut second = Exchange::new(peer);
        second.path = "/b".into();
        second.request_bytes = 7;
        second.first_read_ns = 7;
        let received: Vec<u64> = finished.iter().map(|e| e.received_ns).collect();
        assert!(received.iter().all(|&ns| ns > 0), "{received:?}");
        (first.received_ns, second.received_ns) = (received[0], received[1]);
        assert_eq!(finished, [first, second]);

        let totals = wire.totals();
        assert_eq!(
            (totals.bytes_read, totals.bytes_written, totals.writes),
            (22, 121, 3)
        );
    }
}
