//! Socket events → exchanges: one request and its response on one TCP connection
//! (docs/sockets.md).
//!
//! A connection's role says which direction carries requests: an upstream connection's
//! requests are the broker's writes, an inbound connection's are its reads. An exchange
//! starts with the first request byte, its response with the first byte the other way,
//! and it ends when the next request starts on the same connection (keep-alive), when the
//! connection closes, or when it has been quiet for the idle timeout. Nothing is guessed
//! silently: bytes that fit no exchange are counted in [`ConnectionStats`].

use std::{collections::HashMap, net::SocketAddr};

use foldhash::HashMapExt as _;

use probe_common::socket::{PREFIX_CAP, Skipped};

use crate::{
    decode::{Arrival, SocketIo, SocketWhat},
    http,
    procnet::{OpenSocket, Role},
};

/// One request/response exchange on one connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Exchange {
    /// Unique within one run.
    pub id: u64,
    pub pid: u32,
    pub fd: i32,
    pub role: Role,
    /// Upstream: the configured name of the peer, else `ip:port`. Inbound: `inbound`.
    pub peer_name: String,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    /// Upstream, first exchange of a connection opened while attached: handshake time.
    pub connect_ns: Option<u64>,
    /// Inbound, first exchange of a connection accepted while attached: accept → first
    /// request byte read (time the connection waited for the broker).
    pub accept_wait_ns: Option<u64>,
    /// First request byte (written upstream, read inbound).
    pub start_ns: u64,
    /// First response byte: upstream, when it arrived (queued on the broker's socket);
    /// inbound, when the broker wrote it.
    pub first_response_ns: Option<u64>,
    /// Upstream: when the broker read the first response byte (`first_response_ns` plus
    /// however long the bytes waited for the broker).
    pub first_read_ns: Option<u64>,
    /// Upstream: the first response byte's arrival was stamped by the kernel (else
    /// `first_response_ns` is the read time, and there is no read delay).
    pub arrival_timed: bool,
    /// Last response byte, timed like the first.
    pub last_response_ns: Option<u64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Syscalls that moved response bytes: for a stream read as it arrives, its chunks.
    pub response_chunks: u32,
    /// From the request line, when it was plaintext HTTP/1.x.
    pub method: Option<&'static str>,
    pub path: Option<String>,
    /// From the status line, when it was plaintext HTTP/1.x.
    pub status: Option<u16>,
    pub end: ExchangeEnd,
    /// Thread that sent the first request byte.
    pub start_tid: u32,
    /// The broker request this upstream exchange served (set by assembly, markers mode).
    pub request_id: Option<u64>,
    pub attribution: Option<Attribution>,
    /// Socket-only relation: the inbound exchange that was the only one awaiting its
    /// response when this upstream request was sent.
    pub inbound_exchange: Option<u64>,
}

impl Exchange {
    /// Network time to first byte: first request byte out → first response byte in.
    pub fn ttfb_ns(&self) -> Option<u64> {
        Some(self.first_response_ns?.saturating_sub(self.start_ns))
    }

    /// Upstream: how long the first response bytes waited on the socket for the broker.
    pub fn read_delay_ns(&self) -> Option<u64> {
        if !self.arrival_timed {
            return None;
        }
        Some(self.first_read_ns?.saturating_sub(self.first_response_ns?))
    }

    /// First request byte → last response byte.
    pub fn duration_ns(&self) -> Option<u64> {
        Some(self.last_response_ns?.saturating_sub(self.start_ns))
    }
}

/// Why an exchange is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeEnd {
    /// The next request started on the same connection.
    NextRequest,
    Closed,
    /// Quiet for the idle timeout after response bytes.
    Idle,
    /// Still open when brokerprobe detached.
    Detached,
}

impl ExchangeEnd {
    pub fn name(self) -> &'static str {
        match self {
            ExchangeEnd::NextRequest => "next_request",
            ExchangeEnd::Closed => "closed",
            ExchangeEnd::Idle => "idle",
            ExchangeEnd::Detached => "detached",
        }
    }
}

/// How an upstream exchange was related to a broker request (docs/sockets.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribution {
    /// The request with the most thread-adjacency votes (crate::attribution).
    Adjacent,
    /// No adjacency evidence, but only one request was in an upstream stage without an
    /// exchange when this one started.
    OnlyCandidate,
}

impl Attribution {
    pub fn name(self) -> &'static str {
        match self {
            Attribution::Adjacent => "adjacent",
            Attribution::OnlyCandidate => "only_candidate",
        }
    }
}

/// What the tracker tells assembly, in event order.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// Thread `tid` began connecting upstream connection `fd`. Attribution's evidence.
    Connecting {
        pid: u32,
        tid: u32,
        fd: i32,
        ts_ns: u64,
    },
    /// An upstream request's first byte went out.
    Started {
        id: u64,
        pid: u32,
        tid: u32,
        fd: i32,
        ts_ns: u64,
    },
    /// An upstream response's first byte came in (`ts_ns`: when it arrived), with its
    /// status if the status line came whole in that first read.
    Responded {
        id: u64,
        ts_ns: u64,
        status: Option<u16>,
    },
    /// Thread `tid` read bytes: a response of upstream exchange `exchange`, or (None)
    /// anything else. Attribution's evidence.
    Read {
        exchange: Option<u64>,
        pid: u32,
        tid: u32,
        ts_ns: u64,
    },
    /// An upstream exchange ended without a response (not reported).
    Unanswered { id: u64 },
    /// An exchange (either role) is over.
    Finished(Box<Exchange>),
}

/// Socket events and bytes that fit no exchange, and other counts, since attach.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ConnectionStats {
    /// Connections open at attach time, learned from /proc.
    pub learned_at_attach: u64,
    /// Sockets first seen by their I/O, learned from /proc then.
    pub learned_later: u64,
    /// Sockets whose role could not be learned (closed before /proc was read): their I/O
    /// is not followed.
    pub unresolved: u64,
    pub connects: u64,
    pub connect_failures: u64,
    pub exchanges: u64,
    /// Exchanges whose request got no response before close or detach: not reported.
    pub unanswered: u64,
    /// Response bytes with no request seen: a response already under way at attach, or
    /// one resumed after the idle timeout ended its exchange.
    pub stray_response_bytes: u64,
    /// Socket events (and reads and writes tallied in the kernel) before every probe was
    /// attached, or after detaching began.
    pub outside_window: u64,
    /// Socket events (and tallied reads and writes) of sockets not followed (role
    /// unknown).
    pub unfollowed_events: u64,
    /// Upstream response reads whose arrival time the kernel did not see (timed by the
    /// read instead).
    pub arrivals_unknown: u64,
    /// Times the kernel's tallies of a socket's reads and writes could not be placed: the
    /// first record of their message was lost (ring buffer full), or the socket's map
    /// entry was evicted and started over. What they held since the last look is not
    /// counted.
    pub tallies_lost: u64,
}

/// Names upstream peers: configured names, else `ip:port`.
#[derive(Clone, Debug, Default)]
pub struct UpstreamNames(HashMap<SocketAddr, String>);

impl UpstreamNames {
    pub fn new(names: impl IntoIterator<Item = (SocketAddr, String)>) -> Self {
        Self(names.into_iter().collect())
    }

    pub fn name(&self, peer: Option<SocketAddr>) -> String {
        match peer {
            Some(addr) => self
                .0
                .get(&addr)
                .cloned()
                .unwrap_or_else(|| addr.to_string()),
            None => "unknown".to_owned(),
        }
    }
}

/// Looks up a socket the tracker first sees by its I/O: (pid, fd) → what /proc says.
pub type Resolver = Box<dyn FnMut(u32, i32) -> Option<OpenSocket>>;

/// Reads the kernel's current tallies of a socket's reads and writes past its messages'
/// copied starts: (pid, fd) → totals, None if the kernel no longer follows it.
pub type TallyReader = Box<dyn FnMut(u32, i32) -> Option<Skipped>>;

struct Connection {
    /// None: the role is unknown, the socket's I/O is not followed.
    role: Option<Role>,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    connect_start_ns: Option<u64>,
    /// Handed to the connection's first exchange.
    pending_connect_ns: Option<u64>,
    pending_accept_ns: Option<u64>,
    exchange: Option<Exchange>,
    /// The current request's and response's first bytes, gathered over several reads or
    /// writes until their first line is complete.
    request_head: Head,
    response_head: Head,
    /// The kernel's tallies as of the last look ([`catch_up`]).
    tallied: Skipped,
    /// The last data record's message (kernel-numbered) and direction: tallies of that
    /// message continue it.
    last_record: Option<(u64, Direction)>,
    /// A newer message the kernel's tallies showed at the last idle check.
    map_ahead: Option<u64>,
}

impl Connection {
    fn new(role: Option<Role>) -> Self {
        Self {
            role,
            local: None,
            remote: None,
            connect_start_ns: None,
            pending_connect_ns: None,
            pending_accept_ns: None,
            exchange: None,
            request_head: Head::default(),
            response_head: Head::default(),
            tallied: Skipped::NONE,
            last_record: None,
            map_ahead: None,
        }
    }
}

/// The first bytes of a message, kept until its first line is complete.
#[derive(Default)]
struct Head(Vec<u8>);

impl Head {
    /// Adds bytes; returns the first line's bytes once it is complete (or the head full).
    fn push(&mut self, prefix: &[u8]) -> Option<&[u8]> {
        let room = PREFIX_CAP.saturating_sub(self.0.len());
        self.0.extend_from_slice(&prefix[..prefix.len().min(room)]);
        let complete = self.0.len() >= PREFIX_CAP || self.0.contains(&b'\n');
        (complete && !prefix.is_empty()).then_some(&self.0[..])
    }
}

pub struct Connections {
    connections: foldhash::HashMap<(u32, i32), Connection>,
    names: UpstreamNames,
    resolve: Resolver,
    read_tallies: TallyReader,
    idle_ns: u64,
    next_id: u64,
    stats: ConnectionStats,
    window_start_ns: u64,
    window_end_ns: u64,
}

impl Connections {
    /// `idle_ns`: an exchange whose response has been quiet this long is over.
    pub fn new(
        names: UpstreamNames,
        idle_ns: u64,
        resolve: Resolver,
        read_tallies: TallyReader,
    ) -> Self {
        Self {
            connections: foldhash::HashMap::new(),
            names,
            resolve,
            read_tallies,
            idle_ns,
            next_id: 1,
            stats: ConnectionStats::default(),
            window_start_ns: 0,
            window_end_ns: u64::MAX,
        }
    }

    pub fn stats(&self) -> ConnectionStats {
        self.stats
    }

    /// Every probe is in place from `ns` on.
    pub fn open_window(&mut self, ns: u64) {
        self.window_start_ns = ns;
    }

    /// Probes start going away at `ns`.
    pub fn close_window(&mut self, ns: u64) {
        self.window_end_ns = ns;
    }

    /// A connection that was open before the attach. Its first exchange starts with its
    /// next request byte; response bytes before that are counted as stray.
    pub fn learn(&mut self, pid: u32, socket: OpenSocket) {
        self.stats.learned_at_attach += 1;
        self.connections
            .insert((pid, socket.fd), Self::known(socket));
    }

    fn known(socket: OpenSocket) -> Connection {
        Connection {
            local: Some(socket.local),
            remote: Some(socket.remote),
            ..Connection::new(Some(socket.role))
        }
    }

    pub fn on_io(&mut self, io: SocketIo, out: &mut Vec<Progress>) {
        if io.ts_ns < self.window_start_ns || io.ts_ns > self.window_end_ns {
            self.stats.outside_window += 1;
            return;
        }
        let key = (io.pid, io.fd);
        match io.what {
            SocketWhat::Accept => {
                self.close(key, None, out);
                let mut connection = Connection::new(Some(Role::Inbound));
                connection.pending_accept_ns = Some(io.ts_ns);
                self.connections.insert(key, connection);
            }
            SocketWhat::ConnectStart { remote } => {
                self.close(key, None, out);
                let mut connection = Connection::new(Some(Role::Upstream));
                connection.remote = remote;
                connection.connect_start_ns = Some(io.ts_ns);
                self.connections.insert(key, connection);
                out.push(Progress::Connecting {
                    pid: io.pid,
                    tid: io.tid,
                    fd: io.fd,
                    ts_ns: io.ts_ns,
                });
            }
            SocketWhat::ConnectDone { local, remote } => {
                if let Some(connection) = self.connections.get_mut(&key) {
                    self.stats.connects += 1;
                    connection.local = local;
                    connection.remote = remote.or(connection.remote);
                    connection.pending_connect_ns = connection
                        .connect_start_ns
                        .take()
                        .map(|start| io.ts_ns.saturating_sub(start));
                }
            }
            SocketWhat::ConnectFailed => {
                self.stats.connect_failures += 1;
            }
            SocketWhat::Close => self.close(key, Some(&io.skipped), out),
            SocketWhat::Send { bytes, ref prefix } => {
                let data = Data {
                    direction: Direction::Send,
                    bytes,
                    prefix,
                };
                self.on_data(&io, &data, out)
            }
            SocketWhat::Recv {
                bytes,
                ref prefix,
                arrived,
            } => {
                let data = Data {
                    direction: Direction::Recv(arrived),
                    bytes,
                    prefix,
                };
                self.on_data(&io, &data, out)
            }
        }
    }

    /// Ends the connection at `key` (closed, with the kernel's last tallies; or its fd
    /// reused without a close seen).
    fn close(&mut self, key: (u32, i32), tallies: Option<&Skipped>, out: &mut Vec<Progress>) {
        if let Some(mut connection) = self.connections.remove(&key) {
            if let Some(tallies) = tallies {
                catch_up(&mut self.stats, &mut connection, tallies, Look::Record);
            }
            end_exchange(&mut self.stats, &mut connection, ExchangeEnd::Closed, out);
        }
    }

    fn on_data(&mut self, io: &SocketIo, data: &Data, out: &mut Vec<Progress>) {
        let key = (io.pid, io.fd);
        // Out of the map while it changes, so the other connections stay readable.
        let mut connection = match self.connections.remove(&key) {
            Some(connection) => connection,
            None => match (self.resolve)(io.pid, io.fd) {
                Some(socket) => {
                    self.stats.learned_later += 1;
                    Self::known(socket)
                }
                None => {
                    self.stats.unresolved += 1;
                    Connection::new(None)
                }
            },
        };
        catch_up(&mut self.stats, &mut connection, &io.skipped, Look::Record);
        connection.last_record = Some((io.message, data.direction));
        match connection.role {
            Some(role) => {
                if carries_request(role, data.direction) {
                    self.on_request_bytes(&mut connection, role, io, data, out);
                } else {
                    self.on_response_bytes(&mut connection, role, io, data, out);
                }
            }
            None => self.stats.unfollowed_events += 1,
        }
        if let Direction::Recv(_) = data.direction {
            let exchange = match (connection.role, &connection.exchange) {
                (Some(Role::Upstream), Some(exchange)) => Some(exchange.id),
                _ => None,
            };
            out.push(Progress::Read {
                exchange,
                pid: io.pid,
                tid: io.tid,
                ts_ns: io.ts_ns,
            });
        }
        self.connections.insert(key, connection);
    }

    fn on_request_bytes(
        &mut self,
        connection: &mut Connection,
        role: Role,
        io: &SocketIo,
        data: &Data,
        out: &mut Vec<Progress>,
    ) {
        let Data { bytes, prefix, .. } = *data;
        let responded = connection
            .exchange
            .as_ref()
            .is_some_and(|e| e.first_response_ns.is_some());
        if responded {
            end_exchange(&mut self.stats, connection, ExchangeEnd::NextRequest, out);
        }
        if let Some(exchange) = &mut connection.exchange {
            exchange.request_bytes += u64::from(bytes);
            if exchange.method.is_none() {
                if let Some(head) = connection.request_head.push(prefix) {
                    set_request_line(exchange, head);
                }
            }
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut exchange = start_exchange(id, io, role, connection, &self.names, bytes);
        connection.request_head = Head::default();
        if let Some(head) = connection.request_head.push(prefix) {
            set_request_line(&mut exchange, head);
        }
        if role == Role::Upstream {
            exchange.inbound_exchange = self.only_inbound_awaiting(io.pid);
            out.push(Progress::Started {
                id,
                pid: io.pid,
                tid: io.tid,
                fd: io.fd,
                ts_ns: io.ts_ns,
            });
        }
        connection.exchange = Some(exchange);
    }

    fn on_response_bytes(
        &mut self,
        connection: &mut Connection,
        role: Role,
        io: &SocketIo,
        data: &Data,
        out: &mut Vec<Progress>,
    ) {
        let Data { bytes, prefix, .. } = *data;
        let arrived = match data.direction {
            Direction::Recv(arrived) => arrived,
            Direction::Send => None,
        };
        let Some(exchange) = &mut connection.exchange else {
            self.stats.stray_response_bytes += u64::from(bytes);
            return;
        };
        // Upstream responses are timed when they arrived; the broker's own delay in
        // reading them is its lag, not the network's. Without an arrival time (the
        // kernel saw none on this socket), the read time stands in, and is counted.
        let arrived = match (role, arrived) {
            (Role::Upstream, Some(arrived)) => Some(arrived),
            (Role::Upstream, None) => {
                self.stats.arrivals_unknown += 1;
                None
            }
            (Role::Inbound, _) => None,
        };
        let first = exchange.first_response_ns.is_none();
        if first {
            exchange.first_response_ns = Some(arrived.map_or(io.ts_ns, |a| a.first_ns));
            exchange.arrival_timed = arrived.is_some();
            connection.response_head = Head::default();
        }
        if exchange.status.is_none() {
            if let Some(head) = connection.response_head.push(prefix) {
                exchange.status = http::status_line(head);
            }
        }
        if first && role == Role::Upstream {
            exchange.first_read_ns = Some(io.ts_ns);
            out.push(Progress::Responded {
                id: exchange.id,
                ts_ns: exchange.first_response_ns.unwrap_or(io.ts_ns),
                status: exchange.status,
            });
        }
        exchange.last_response_ns = Some(arrived.map_or(io.ts_ns, |a| a.last_ns));
        exchange.response_bytes += u64::from(bytes);
        exchange.response_chunks = exchange.response_chunks.saturating_add(1);
    }

    /// The id of the pid's only inbound exchange whose request is in and whose response
    /// has not started, if exactly one is.
    fn only_inbound_awaiting(&self, pid: u32) -> Option<u64> {
        let mut awaiting = self
            .connections
            .iter()
            .filter(|((p, _), c)| *p == pid && c.role == Some(Role::Inbound))
            .filter_map(|(_, c)| c.exchange.as_ref())
            .filter(|e| e.first_response_ns.is_none());
        let only = awaiting.next()?;
        awaiting.next().is_none().then_some(only.id)
    }

    /// Ends exchanges whose response has been quiet for the idle timeout. Call it with
    /// the ring buffer drained: the kernel's tallies are read as they are now.
    pub fn expire_idle(&mut self, now_ns: u64, out: &mut Vec<Progress>) {
        let Self {
            connections,
            read_tallies,
            stats,
            idle_ns,
            ..
        } = self;
        let quiet = |connection: &Connection| {
            connection
                .exchange
                .as_ref()
                .and_then(|e| e.last_response_ns)
                .is_some_and(|last| now_ns.saturating_sub(last) >= *idle_ns)
        };
        for (&(pid, fd), connection) in connections.iter_mut() {
            if !quiet(connection) {
                continue;
            }
            // A stream's later reads and writes are only tallied: it may have gone on.
            if let Some(tallies) = read_tallies(pid, fd) {
                if !continues_last_record(connection, &tallies)
                    && connection.map_ahead != Some(tallies.message)
                {
                    // A newer message began just now: its first record, on its way, ends
                    // this exchange with its tallies. Still so at the next look, that
                    // record was lost, and the exchange ends without them.
                    connection.map_ahead = Some(tallies.message);
                    continue;
                }
                catch_up(stats, connection, &tallies, Look::Map);
            }
            if quiet(connection) {
                end_exchange(stats, connection, ExchangeEnd::Idle, out);
            }
        }
    }

    /// Ends every exchange still open (at detach), with what the kernel tallied of it.
    pub fn finish_all(&mut self, out: &mut Vec<Progress>) {
        let Self {
            connections,
            read_tallies,
            stats,
            ..
        } = self;
        for (&(pid, fd), connection) in connections.iter_mut() {
            if connection.exchange.is_some() {
                if let Some(tallies) = read_tallies(pid, fd) {
                    catch_up(stats, connection, &tallies, Look::Map);
                }
            }
            end_exchange(stats, connection, ExchangeEnd::Detached, out);
        }
    }
}

/// Whether bytes moving this way on a connection of this role are (part of) a request.
fn carries_request(role: Role, direction: Direction) -> bool {
    matches!(
        (role, direction),
        (Role::Upstream, Direction::Send) | (Role::Inbound, Direction::Recv(_))
    )
}

/// Whether the tallies continue the message of the connection's last data record.
fn continues_last_record(connection: &Connection, tallies: &Skipped) -> bool {
    connection
        .last_record
        .is_some_and(|(message, _)| message == tallies.message)
}

/// Where the kernel's tallies were read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Look {
    /// In a record, in event order.
    Record,
    /// In the `SOCKETS` map: current, possibly ahead of records still in the ring buffer.
    Map,
}

/// Takes what is new in the kernel's tallies of the connection since the last look:
/// reads and writes that continued the message of the connection's last data record.
fn catch_up(
    stats: &mut ConnectionStats,
    connection: &mut Connection,
    tallies: &Skipped,
    look: Look,
) {
    let same_message = continues_last_record(connection, tallies);
    if look == Look::Map && !same_message {
        // A newer message's records are still on their way: they will carry these.
        return;
    }
    let seen = std::mem::replace(&mut connection.tallied, *tallies);
    let calls = tallies.calls.wrapping_sub(seen.calls);
    if calls == 0 {
        return;
    }
    let Some((_, direction)) = connection.last_record else {
        // Tallied before the connection's first record was taken: before the window.
        stats.outside_window += calls;
        return;
    };
    if !same_message || tallies.calls < seen.calls || tallies.bytes < seen.bytes {
        // Their message's first record was lost (ring buffer full), or the socket's map
        // entry was evicted and started over.
        stats.tallies_lost += 1;
        return;
    }
    let bytes = tallies.bytes - seen.bytes;
    let Some(role) = connection.role else {
        stats.unfollowed_events += calls;
        return;
    };
    let request = carries_request(role, direction);
    let Some(exchange) = &mut connection.exchange else {
        if !request {
            stats.stray_response_bytes += bytes;
        }
        return;
    };
    if request {
        exchange.request_bytes += bytes;
        return;
    }
    // Timed as their records would have been (on_response_bytes).
    let arrived = match direction {
        Direction::Recv(_) if tallies.last_ready_ns != 0 => Some(tallies.last_ready_ns),
        _ => None,
    };
    if role == Role::Upstream && arrived.is_none() {
        stats.arrivals_unknown += calls;
    }
    exchange.last_response_ns = Some(arrived.unwrap_or(tallies.last_ns));
    exchange.response_bytes += bytes;
    let calls = u32::try_from(calls).unwrap_or(u32::MAX);
    exchange.response_chunks = exchange.response_chunks.saturating_add(calls);
}

/// Reports the connection's exchange, if it got a response (else counts it).
fn end_exchange(
    stats: &mut ConnectionStats,
    connection: &mut Connection,
    end: ExchangeEnd,
    out: &mut Vec<Progress>,
) {
    let Some(mut exchange) = connection.exchange.take() else {
        return;
    };
    if exchange.first_response_ns.is_none() {
        stats.unanswered += 1;
        if exchange.role == Role::Upstream {
            out.push(Progress::Unanswered { id: exchange.id });
        }
        return;
    }
    exchange.end = end;
    stats.exchanges += 1;
    out.push(Progress::Finished(Box::new(exchange)));
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Send,
    /// With when the bytes read had arrived, if the kernel saw it.
    Recv(Option<Arrival>),
}

/// Bytes moved by one read or write.
struct Data<'a> {
    direction: Direction,
    bytes: u32,
    /// The first bytes, while a message's start is being copied.
    prefix: &'a [u8],
}

fn start_exchange(
    id: u64,
    io: &SocketIo,
    role: Role,
    connection: &mut Connection,
    names: &UpstreamNames,
    bytes: u32,
) -> Exchange {
    Exchange {
        id,
        pid: io.pid,
        fd: io.fd,
        role,
        peer_name: match role {
            Role::Upstream => names.name(connection.remote),
            Role::Inbound => Role::Inbound.name().to_owned(),
        },
        local: connection.local,
        remote: connection.remote,
        connect_ns: connection.pending_connect_ns.take(),
        accept_wait_ns: connection
            .pending_accept_ns
            .take()
            .map(|accepted| io.ts_ns.saturating_sub(accepted)),
        start_ns: io.ts_ns,
        first_response_ns: None,
        first_read_ns: None,
        arrival_timed: false,
        last_response_ns: None,
        request_bytes: u64::from(bytes),
        response_bytes: 0,
        response_chunks: 0,
        method: None,
        path: None,
        status: None,
        end: ExchangeEnd::Detached,
        start_tid: io.tid,
        request_id: None,
        attribution: None,
        inbound_exchange: None,
    }
}

fn set_request_line(exchange: &mut Exchange, head: &[u8]) {
    if let Some((method, path)) = http::request_line(head) {
        exchange.method = Some(method);
        exchange.path = Some(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PID: u32 = 7;

    fn io(ts_ns: u64, fd: i32, what: SocketWhat) -> SocketIo {
        SocketIo {
            ts_ns,
            pid: PID,
            tid: 70,
            fd,
            what,
            skipped: Skipped::NONE,
            message: 0,
        }
    }

    fn send(ts: u64, fd: i32, bytes: u32, prefix: &[u8]) -> SocketIo {
        io(
            ts,
            fd,
            SocketWhat::Send {
                bytes,
                prefix: prefix.to_vec(),
            },
        )
    }

    /// How long before its read each received byte arrived, in these tests.
    const WAITED: u64 = 5;

    fn recv(ts: u64, fd: i32, bytes: u32, prefix: &[u8]) -> SocketIo {
        io(
            ts,
            fd,
            SocketWhat::Recv {
                bytes,
                prefix: prefix.to_vec(),
                arrived: Some(Arrival {
                    first_ns: ts - WAITED,
                    last_ns: ts - WAITED,
                }),
            },
        )
    }

    fn tracker() -> Connections {
        let names = UpstreamNames::new([("10.0.0.5:443".parse().unwrap(), "openai".into())]);
        Connections::new(names, 1_000, Box::new(|_, _| None), Box::new(|_, _| None))
    }

    fn finished(out: &[Progress]) -> Vec<&Exchange> {
        out.iter()
            .filter_map(|p| match p {
                Progress::Finished(e) => Some(&**e),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn keep_alive_upstream_exchanges_with_connect_ttfb_chunks_and_bytes() {
        let mut c = tracker();
        let mut out = Vec::new();
        let remote = Some("10.0.0.5:443".parse().unwrap());
        c.on_io(io(10, 5, SocketWhat::ConnectStart { remote }), &mut out);
        let local = Some("10.0.0.1:40000".parse().unwrap());
        c.on_io(
            io(30, 5, SocketWhat::ConnectDone { local, remote }),
            &mut out,
        );
        // The request line arrives in two writes; the status line in two reads.
        c.on_io(send(100, 5, 4, b"POST"), &mut out);
        c.on_io(
            send(101, 5, 96, b" /v1/chat/completions?key=x HTTP/1.1\r\n"),
            &mut out,
        );
        c.on_io(recv(300, 5, 10, b"HTTP/1.1 2"), &mut out);
        c.on_io(recv(350, 5, 20, b"00 OK\r\n"), &mut out);
        c.on_io(recv(400, 5, 30, b""), &mut out);
        // Keep-alive: the next request ends the first exchange.
        c.on_io(
            send(500, 5, 50, b"POST /v1/chat/completions HTTP/1.1\r\n"),
            &mut out,
        );
        c.on_io(recv(600, 5, 5, b"HTTP/1.1 500 Oops\r\n"), &mut out);
        c.on_io(io(700, 5, SocketWhat::Close), &mut out);

        let done = finished(&out);
        assert_eq!(done.len(), 2);
        let first = done[0];
        assert_eq!(first.peer_name, "openai");
        assert_eq!(first.connect_ns, Some(20));
        // Timed by arrival, not by read.
        assert_eq!(
            (first.ttfb_ns(), first.duration_ns()),
            (Some(200 - WAITED), Some(300 - WAITED))
        );
        assert_eq!(first.read_delay_ns(), Some(WAITED));
        assert_eq!((first.request_bytes, first.response_bytes), (100, 60));
        assert_eq!(first.response_chunks, 3);
        assert_eq!(first.method, Some("POST"));
        assert_eq!(first.path.as_deref(), Some("/v1/chat/completions"));
        assert_eq!(
            (first.status, first.end),
            (Some(200), ExchangeEnd::NextRequest)
        );
        let second = done[1];
        assert_eq!(
            second.connect_ns, None,
            "a reused connection has no connect time"
        );
        assert_eq!(
            (second.status, second.end),
            (Some(500), ExchangeEnd::Closed)
        );
        let started = out
            .iter()
            .filter(|p| matches!(p, Progress::Started { .. }))
            .count();
        assert_eq!(started, 2);
    }

    /// `io` as the kernel numbers it: of the socket's message `message`, carrying the
    /// tallies so far (`calls`, `bytes`, the latest at `last_ns`) of message `continued`.
    fn numbered(
        mut io: SocketIo,
        message: u64,
        continued: u64,
        (calls, bytes, last_ns): (u64, u64, u64),
    ) -> SocketIo {
        io.message = message;
        io.skipped = Skipped {
            calls,
            bytes,
            last_ns,
            last_ready_ns: last_ns.saturating_sub(WAITED),
            message: continued,
        };
        io
    }

    /// A tracker whose kernel tallies are read from `kernel`.
    fn tracker_reading(kernel: &std::rc::Rc<std::cell::Cell<Skipped>>) -> Connections {
        let kernel = kernel.clone();
        Connections::new(
            UpstreamNames::default(),
            1_000,
            Box::new(|_, _| None),
            Box::new(move |_, _| Some(kernel.get())),
        )
    }

    #[test]
    fn tallied_reads_reach_their_exchange_at_the_next_request_and_at_close() {
        let mut c = tracker();
        let mut out = Vec::new();
        let remote = Some("10.0.0.5:443".parse().unwrap());
        let none = (0, 0, 0);
        c.on_io(io(10, 5, SocketWhat::ConnectStart { remote }), &mut out);
        let request = || send(100, 5, 150, b"POST /v1/chat HTTP/1.1\r\n");
        c.on_io(numbered(request(), 1, 0, none), &mut out);
        let response = |ts| recv(ts, 5, 200, b"HTTP/1.1 200 OK\r\n");
        c.on_io(numbered(response(300), 2, 1, none), &mut out);
        // Three more reads of the stream were tallied in the kernel, the last at 450;
        // the next request's record carries them.
        let mut next = numbered(request(), 3, 2, (3, 90, 450));
        next.ts_ns = 500;
        c.on_io(next, &mut out);
        c.on_io(numbered(response(600), 4, 3, (3, 90, 450)), &mut out);
        // Two more reads, then the close, which carries them.
        let close = io(900, 5, SocketWhat::Close);
        c.on_io(numbered(close, 4, 4, (5, 130, 800)), &mut out);

        let done = finished(&out);
        assert_eq!(done.len(), 2);
        let (first, second) = (done[0], done[1]);
        assert_eq!((first.response_bytes, first.response_chunks), (290, 4));
        assert_eq!(first.duration_ns(), Some(450 - WAITED - 100));
        assert_eq!(first.request_bytes, 150);
        assert_eq!((second.response_bytes, second.response_chunks), (240, 3));
        assert_eq!(second.duration_ns(), Some(800 - WAITED - 500));
        assert_eq!(second.end, ExchangeEnd::Closed);
        assert_eq!(c.stats().tallies_lost, 0);
    }

    #[test]
    fn a_quiet_looking_stream_is_read_from_the_kernel_before_it_is_ended() {
        let kernel = std::rc::Rc::new(std::cell::Cell::new(Skipped::NONE));
        let mut c = tracker_reading(&kernel);
        let mut out = Vec::new();
        let none = (0, 0, 0);
        c.on_io(io(10, 9, SocketWhat::Accept), &mut out);
        let request = recv(15, 9, 200, b"POST /v1/chat HTTP/1.1\r\n");
        c.on_io(numbered(request, 1, 0, none), &mut out);
        let response = send(20, 9, 300, b"HTTP/1.1 200 OK\r\n");
        c.on_io(numbered(response, 2, 1, none), &mut out);
        // The broker went on writing the stream: two writes tallied, the last at 900.
        kernel.set(Skipped {
            calls: 2,
            bytes: 64,
            last_ns: 900,
            last_ready_ns: 0,
            message: 2,
        });
        c.expire_idle(1_050, &mut out);
        assert!(finished(&out).is_empty(), "still streaming at 900");
        c.expire_idle(1_950, &mut out);
        let done = finished(&out);
        assert_eq!(done.len(), 1);
        let e = done[0];
        assert_eq!(e.end, ExchangeEnd::Idle);
        assert_eq!((e.response_bytes, e.response_chunks), (364, 3));
        assert_eq!(e.duration_ns(), Some(900 - 15));
        // The close carries the same tallies: nothing is counted twice.
        let close = io(2_500, 9, SocketWhat::Close);
        c.on_io(numbered(close, 2, 2, (2, 64, 900)), &mut out);
        assert_eq!(c.stats().stray_response_bytes, 0);
        assert_eq!(c.stats().tallies_lost, 0);
        assert_eq!(finished(&out).len(), 1);
    }

    #[test]
    fn tallies_of_a_message_whose_records_are_still_coming_are_left_to_them() {
        let kernel = std::rc::Rc::new(std::cell::Cell::new(Skipped::NONE));
        let mut c = tracker_reading(&kernel);
        let mut out = Vec::new();
        let none = (0, 0, 0);
        c.on_io(io(10, 9, SocketWhat::Accept), &mut out);
        let request = recv(15, 9, 200, b"POST /v1/chat HTTP/1.1\r\n");
        c.on_io(numbered(request, 1, 0, none), &mut out);
        let response = send(20, 9, 300, b"HTTP/1.1 200 OK\r\n");
        c.on_io(numbered(response, 2, 1, none), &mut out);
        // Two writes of the response were tallied, then the client's next request (message
        // 3) began and went on past its first bytes; its record is still in the ring.
        kernel.set(Skipped {
            calls: 3,
            bytes: 1_064,
            last_ns: 950,
            last_ready_ns: 940,
            message: 3,
        });
        c.finish_all(&mut out);
        let done = finished(&out);
        assert_eq!(done.len(), 1);
        assert_eq!(
            (done[0].response_bytes, done[0].response_chunks),
            (300, 1),
            "another message's tallies were taken as this response's"
        );
        assert_eq!(c.stats().tallies_lost, 0);
    }

    /// An inbound exchange: request read (message 1), response's first write at 20
    /// (message 2); then the kernel's tallies show message 3, the client's next request,
    /// begun: 2 more response writes (64 bytes, the last at 900), then 1 read past the new
    /// request's first bytes.
    fn answered_then_next_request_begun(
        kernel: &std::rc::Rc<std::cell::Cell<Skipped>>,
    ) -> Connections {
        let mut c = tracker_reading(kernel);
        let mut out = Vec::new();
        c.on_io(io(10, 9, SocketWhat::Accept), &mut out);
        let request = recv(15, 9, 200, b"POST /v1/chat HTTP/1.1\r\n");
        c.on_io(numbered(request, 1, 0, (0, 0, 0)), &mut out);
        let response = send(20, 9, 300, b"HTTP/1.1 200 OK\r\n");
        c.on_io(numbered(response, 2, 1, (0, 0, 0)), &mut out);
        kernel.set(Skipped {
            calls: 3,
            bytes: 1_064,
            last_ns: 960,
            last_ready_ns: 955,
            message: 3,
        });
        c
    }

    #[test]
    fn a_newer_message_in_the_kernel_leaves_the_idle_end_to_its_record() {
        let kernel = std::rc::Rc::new(std::cell::Cell::new(Skipped::NONE));
        let mut c = answered_then_next_request_begun(&kernel);
        let mut out = Vec::new();
        c.expire_idle(1_500, &mut out);
        assert!(finished(&out).is_empty(), "its next record was on its way");
        let next = recv(950, 9, 200, b"POST /v1/chat HTTP/1.1\r\n");
        c.on_io(numbered(next, 3, 2, (2, 64, 900)), &mut out);
        let done = finished(&out);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].end, ExchangeEnd::NextRequest);
        assert_eq!((done[0].response_bytes, done[0].response_chunks), (364, 3));
        assert_eq!(c.stats().tallies_lost, 0);
    }

    #[test]
    fn a_newer_message_whose_record_never_comes_ends_at_the_next_look() {
        let kernel = std::rc::Rc::new(std::cell::Cell::new(Skipped::NONE));
        let mut c = answered_then_next_request_begun(&kernel);
        let mut out = Vec::new();
        c.expire_idle(1_500, &mut out);
        assert!(finished(&out).is_empty());
        c.expire_idle(2_500, &mut out);
        let done = finished(&out);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].end, ExchangeEnd::Idle);
        assert_eq!((done[0].response_bytes, done[0].response_chunks), (300, 1));
    }

    #[test]
    fn tallies_that_cannot_be_placed_are_counted() {
        let mut c = tracker();
        let mut out = Vec::new();
        c.on_io(io(10, 9, SocketWhat::Accept), &mut out);
        // Tallied before the connection's first record in the window.
        let request = recv(15, 9, 200, b"GET / HTTP/1.1\r\n");
        c.on_io(numbered(request, 1, 0, (4, 400, 12)), &mut out);
        assert_eq!(c.stats().outside_window, 4);
        // The first record of message 2 was lost; message 3's carries its tallies.
        let next = recv(40, 9, 200, b"GET / HTTP/1.1\r\n");
        c.on_io(numbered(next, 3, 2, (6, 500, 30)), &mut out);
        assert_eq!(c.stats().tallies_lost, 1);
    }

    #[test]
    fn inbound_roles_reverse_and_idle_ends_exchanges() {
        let mut c = tracker();
        let mut out = Vec::new();
        c.on_io(io(10, 9, SocketWhat::Accept), &mut out);
        c.on_io(recv(15, 9, 200, b"GET /health HTTP/1.1\r\n"), &mut out);
        c.on_io(send(20, 9, 40, b"HTTP/1.1 200 OK\r\n"), &mut out);
        c.expire_idle(500, &mut out);
        assert!(finished(&out).is_empty(), "not idle yet");
        c.expire_idle(2_000, &mut out);
        let done = finished(&out);
        assert_eq!(done.len(), 1);
        let e = done[0];
        assert_eq!((e.role, e.end), (Role::Inbound, ExchangeEnd::Idle));
        assert_eq!(e.accept_wait_ns, Some(5));
        assert_eq!((e.method, e.status), (Some("GET"), Some(200)));
        assert!(
            !out.iter().any(|p| matches!(p, Progress::Started { .. })),
            "only upstream exchanges go to attribution"
        );
    }

    #[test]
    fn warm_socket_mid_response_and_unknown_sockets_are_counted_not_guessed() {
        let mut c = tracker();
        let mut out = Vec::new();
        c.learn(
            PID,
            OpenSocket {
                fd: 4,
                local: "10.0.0.1:40001".parse().unwrap(),
                remote: "10.0.0.5:443".parse().unwrap(),
                role: Role::Upstream,
            },
        );
        c.on_io(recv(10, 4, 77, b""), &mut out); // a response under way at attach
        c.on_io(recv(11, 8, 5, b""), &mut out); // a socket /proc does not know
        c.on_io(send(20, 4, 10, b""), &mut out);
        c.on_io(io(30, 4, SocketWhat::Close), &mut out);
        let stats = c.stats();
        assert_eq!(stats.stray_response_bytes, 77);
        assert_eq!(stats.arrivals_unknown, 0);
        assert_eq!((stats.unresolved, stats.unfollowed_events), (1, 1));
        assert_eq!(
            stats.unanswered, 1,
            "a request without response is not reported"
        );
        assert!(finished(&out).is_empty());
        assert_eq!(
            out.last(),
            Some(&Progress::Unanswered { id: 1 }),
            "assembly learns it will not end"
        );
    }

    #[test]
    fn a_response_without_arrival_time_is_timed_by_its_read_and_counted() {
        let mut c = tracker();
        let mut out = Vec::new();
        let remote = Some("10.0.0.5:443".parse().unwrap());
        c.on_io(io(10, 5, SocketWhat::ConnectStart { remote }), &mut out);
        c.on_io(send(100, 5, 10, b"GET / HTTP/1.1\r\n"), &mut out);
        let unknown = SocketWhat::Recv {
            bytes: 20,
            prefix: b"HTTP/1.1 200 OK\r\n".to_vec(),
            arrived: None,
        };
        c.on_io(io(300, 5, unknown), &mut out);
        c.on_io(io(400, 5, SocketWhat::Close), &mut out);
        let done = finished(&out);
        assert_eq!(
            (done[0].ttfb_ns(), done[0].read_delay_ns()),
            (Some(200), None)
        );
        assert_eq!(c.stats().arrivals_unknown, 1);
        let reads: Vec<&Progress> = out
            .iter()
            .filter(|p| matches!(p, Progress::Read { .. }))
            .collect();
        assert_eq!(
            reads,
            [&Progress::Read {
                exchange: Some(done[0].id),
                pid: PID,
                tid: 70,
                ts_ns: 300
            }],
            "every read is evidence for attribution"
        );
    }
}
