//! Which broker request an upstream exchange served: evidence from thread adjacency
//! (docs/sockets.md, "Attribution").
//!
//! A socket write or read is done by some task on some worker thread, and the marker hits
//! of the request that caused it, or that it wakes, sit next to it on the same thread:
//! - the task that writes a request upstream runs right after the request's task began
//!   its upstream stage (an async runtime runs the task just woken next, on the same
//!   worker: tokio's LIFO slot), so the last marker hit on the writing thread before the
//!   write names the request;
//! - a response read wakes the request's task, which runs next on the reading thread, so
//!   the next marker hit on that thread after the read names the request;
//! - a new connection's `connect()` is called by the request's own task (HTTP clients
//!   poll the connect inside the request's future), so the last marker hit on the
//!   connecting thread names the request of the connection's first exchange.
//!
//! Threads alone are not enough (tasks move between workers), and one adjacency can be
//! broken by work stealing; so every write start and response read of an exchange casts a
//! vote, and the request with the most votes wins. Assembly decides with these votes
//! once they are all in; nothing here decides.

use std::collections::HashMap;

/// Farther apart than this, two events on one thread are not taken as cause and effect.
const ADJACENT_NS: u64 = 10_000_000;

/// Distinct requests voted for, kept per exchange; more are counted as lost votes.
const MAX_CANDIDATES: usize = 8;

/// What happened last on one thread that a later event may explain.
#[derive(Default)]
struct ThreadTrail {
    /// The latest marker hit: (request id, time). A write start consumes it.
    marker: Option<(u64, u64)>,
    /// The latest read, if it read an upstream response: (exchange id, time). The next
    /// marker hit consumes it; any later read replaces it.
    read: Option<(Option<u64>, u64)>,
}

/// A request voted for, and by how many adjacencies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vote {
    pub request_id: u64,
    pub count: u32,
    /// When the latest of them was cast: breaks ties toward the freshest evidence.
    pub last_ns: u64,
}

/// Votes cast so far, per upstream exchange not yet attributed.
#[derive(Default)]
pub struct Evidence {
    threads: HashMap<(u32, u32), ThreadTrail>,
    /// Connections being opened: (pid, fd) → the request adjacent to the connect, and
    /// when, until their first exchange starts.
    connects: HashMap<(u32, i32), (u64, u64)>,
    votes: HashMap<u64, Vec<Vote>>,
    /// Votes not kept because an exchange already had [`MAX_CANDIDATES`] requests.
    pub lost_votes: u64,
}

impl Evidence {
    /// A marker hit of request `request_id` on thread `tid`.
    pub fn on_marker(&mut self, pid: u32, tid: u32, request_id: u64, ts_ns: u64) {
        let trail = self.threads.entry((pid, tid)).or_default();
        trail.marker = Some((request_id, ts_ns));
        if let Some((Some(exchange), read_ns)) = trail.read.take() {
            if ts_ns.saturating_sub(read_ns) <= ADJACENT_NS {
                self.vote(exchange, request_id, ts_ns);
            }
        }
    }

    /// Thread `tid` begins connecting upstream connection `fd`.
    pub fn on_connect(&mut self, pid: u32, tid: u32, fd: i32, ts_ns: u64) {
        let trail = self.threads.entry((pid, tid)).or_default();
        match trail.marker.take() {
            Some((request_id, marker_ns)) if ts_ns.saturating_sub(marker_ns) <= ADJACENT_NS => {
                self.connects.insert((pid, fd), (request_id, ts_ns));
            }
            _ => {
                self.connects.remove(&(pid, fd));
            }
        }
    }

    /// Upstream exchange `exchange` starts: its first request byte written by `tid` on
    /// connection `fd`.
    pub fn on_start(&mut self, exchange: u64, pid: u32, tid: u32, fd: i32, ts_ns: u64) {
        self.votes.entry(exchange).or_default();
        if let Some((request_id, connect_ns)) = self.connects.remove(&(pid, fd)) {
            self.vote(exchange, request_id, connect_ns);
        }
        let trail = self.threads.entry((pid, tid)).or_default();
        if let Some((request_id, marker_ns)) = trail.marker.take() {
            if ts_ns.saturating_sub(marker_ns) <= ADJACENT_NS {
                self.vote(exchange, request_id, ts_ns);
            }
        }
    }

    /// Thread `tid` read bytes: a response of `exchange` (None: anything else).
    pub fn on_read(&mut self, exchange: Option<u64>, pid: u32, tid: u32, ts_ns: u64) {
        let exchange = exchange.filter(|id| self.votes.contains_key(id));
        let trail = self.threads.entry((pid, tid)).or_default();
        trail.read = Some((exchange, ts_ns));
    }

    fn vote(&mut self, exchange: u64, request_id: u64, ts_ns: u64) {
        // Only exchanges still open for attribution collect votes.
        let Some(votes) = self.votes.get_mut(&exchange) else {
            return;
        };
        if let Some(vote) = votes.iter_mut().find(|v| v.request_id == request_id) {
            vote.count += 1;
            vote.last_ns = ts_ns;
        } else if votes.len() < MAX_CANDIDATES {
            votes.push(Vote {
                request_id,
                count: 1,
                last_ns: ts_ns,
            });
        } else {
            self.lost_votes += 1;
        }
    }

    /// The exchange's votes, strongest first (most votes, then the freshest).
    pub fn ranked(&self, exchange: u64) -> Vec<Vote> {
        let mut votes = self.votes.get(&exchange).cloned().unwrap_or_default();
        votes.sort_by(|a, b| b.count.cmp(&a.count).then(b.last_ns.cmp(&a.last_ns)));
        votes
    }

    /// Votes of the exchange for one request.
    pub fn votes_for(&self, exchange: u64, request_id: u64) -> u32 {
        self.votes
            .get(&exchange)
            .and_then(|votes| votes.iter().find(|v| v.request_id == request_id))
            .map_or(0, |v| v.count)
    }

    /// The exchange is attributed, or never will be: forget its votes.
    pub fn close(&mut self, exchange: u64) {
        self.votes.remove(&exchange);
    }

    /// Forgets threads quiet for `idle_ns` (threads come and go with the broker), and
    /// connects that long without an exchange.
    pub fn forget_quiet_threads(&mut self, now_ns: u64, idle_ns: u64) {
        self.connects
            .retain(|_, (_, connect_ns)| now_ns.saturating_sub(*connect_ns) < idle_ns);
        self.threads.retain(|_, trail| {
            let last = trail
                .marker
                .map(|(_, ts)| ts)
                .max(trail.read.map(|(_, ts)| ts))
                .unwrap_or(0);
            now_ns.saturating_sub(last) < idle_ns
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PID: u32 = 1;

    #[test]
    fn write_after_a_marker_and_marker_after_a_read_vote() {
        let mut e = Evidence::default();
        e.on_marker(PID, 10, 7, 100); // request 7 begins its upstream stage on thread 10
        e.on_start(1, PID, 10, 3, 110); // exchange 1 written by thread 10
        e.on_read(Some(1), PID, 11, 500); // its response read on thread 11
        e.on_marker(PID, 11, 7, 510); // request 7 wakes there
        assert_eq!(
            e.ranked(1),
            [Vote {
                request_id: 7,
                count: 2,
                last_ns: 510
            }]
        );
    }

    #[test]
    fn only_the_adjacent_event_votes() {
        let mut e = Evidence::default();
        e.on_marker(PID, 10, 7, 100);
        e.on_start(1, PID, 10, 3, 110);
        // The marker was consumed by exchange 1: exchange 2 on the same thread gets none.
        e.on_start(2, PID, 10, 4, 120);
        assert!(e.ranked(2).is_empty());
        // A read of something else in between: the marker explains that one, not ours.
        e.on_read(Some(1), PID, 10, 200);
        e.on_read(None, PID, 10, 201);
        e.on_marker(PID, 10, 8, 210);
        assert_eq!(e.ranked(1)[0].count, 1, "only the start vote");
        // Too far apart to be cause and effect.
        e.on_read(Some(2), PID, 10, 300);
        e.on_marker(PID, 10, 9, 300 + ADJACENT_NS + 1);
        assert!(e.ranked(2).is_empty());
    }

    #[test]
    fn ranking_prefers_more_then_fresher_votes_and_closed_exchanges_take_none() {
        let mut e = Evidence::default();
        e.on_start(1, PID, 10, 3, 0);
        for (request, ts) in [(7, 10), (8, 20), (8, 30), (9, 40), (9, 50)] {
            e.on_read(Some(1), PID, 11, ts);
            e.on_marker(PID, 11, request, ts + 1);
        }
        let ranked: Vec<(u64, u32)> = e
            .ranked(1)
            .iter()
            .map(|v| (v.request_id, v.count))
            .collect();
        assert_eq!(ranked, [(9, 2), (8, 2), (7, 1)]);
        e.close(1);
        e.on_read(Some(1), PID, 11, 60);
        e.on_marker(PID, 11, 7, 61);
        assert!(e.ranked(1).is_empty());
        assert!(e.votes.is_empty());
    }

    #[test]
    fn a_connect_votes_for_its_connections_first_exchange() {
        let mut e = Evidence::default();
        e.on_marker(PID, 10, 7, 100);
        e.on_connect(PID, 10, 5, 105); // request 7's task connects fd 5
        e.on_marker(PID, 10, 8, 110);
        e.on_start(1, PID, 11, 5, 200); // written by another thread, after no marker
        assert_eq!(e.votes_for(1, 7), 1);
        assert_eq!(e.votes_for(1, 8), 0);
        e.on_start(2, PID, 11, 5, 300); // the connection's next exchange: no connect vote
        assert!(e.ranked(2).is_empty());
    }
}
