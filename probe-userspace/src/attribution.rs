//! Which broker request an upstream exchange served (docs/sockets.md, "Attribution").
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
//! broken by work stealing; so an exchange's write start, connect and response read each
//! cast a vote ([`Evidence`]), and the [`Attributor`] gives the exchange to the
//! request with the most votes that still has a free upstream stage — once the votes are
//! in: when that request ends, or a moment after the exchange itself ends.

use foldhash::{HashMap, HashSet};

use crate::{
    assembly::UpstreamCall,
    connections::{Attribution, Exchange},
};

/// A broker request: (process, request id).
pub type RequestKey = (u32, u64);

/// Farther apart than this, two events on one thread are not taken as cause and effect.
const ADJACENT_NS: u64 = 10_000_000;

/// An exchange that ended unattributed waits this long past its last response byte for
/// its read's vote (cast by the next marker hit on the reading thread).
const HOLD_NS: u64 = 100_000_000;

/// What attribution needs of the open requests (implemented by assembly).
pub trait UpstreamStages {
    /// The stage of request `key` that can take an exchange started at `start_ns`: an
    /// upstream stage begun by then, not ended before, and without an exchange.
    fn free_stage(&self, key: RequestKey, start_ns: u64) -> Option<usize>;
    /// Requests of process `pid` with an open upstream stage without an exchange, with
    /// that stage's begin.
    fn waiting(&self, pid: u32) -> Vec<(RequestKey, u64)>;
    /// Gives `call` to stage `stage` of request `key`.
    fn take(&mut self, key: RequestKey, stage: usize, call: UpstreamCall);
    /// The attributed call `exchange` of request `key` got its first response byte.
    fn responded(&mut self, key: RequestKey, exchange: u64, ts_ns: u64, status: Option<u16>);
}

/// Upstream exchanges attributed, by method, and what could not be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttributionStats {
    pub adjacent: u64,
    pub only_candidate: u64,
    /// No adjacency evidence for a request that could take it, and not a sole candidate.
    pub unattributed: u64,
}

/// An upstream exchange that started and is not attributed yet.
struct Unattributed {
    pid: u32,
    start_ns: u64,
    first_response_ns: Option<u64>,
    status: Option<u16>,
    /// The one request that could take it when it started, if there was exactly one and
    /// no other exchange had started in that request's upstream stage.
    only_candidate: Option<u64>,
}

/// Where an exchange goes: request, index of the stage in it, and why.
struct Choice {
    key: RequestKey,
    stage: usize,
    how: Attribution,
}

#[derive(Default)]
pub struct Attributor {
    evidence: Evidence,
    unattributed: HashMap<u64, Unattributed>,
    /// Request → exchanges whose only candidate it was.
    only_candidate_of: HashMap<RequestKey, Vec<u64>>,
    /// Exchanges that ended before they were attributed, until their votes are in.
    held: HashMap<u64, Exchange>,
    /// Attributed exchanges, until they end.
    owners: HashMap<u64, (RequestKey, Attribution)>,
    /// Ended exchanges ready for the exporters.
    done: Vec<Exchange>,
    stats: AttributionStats,
}

impl Attributor {
    pub fn stats(&self) -> AttributionStats {
        self.stats
    }

    /// A marker hit of request `request_id` on thread `tid`.
    pub fn on_marker(&mut self, pid: u32, tid: u32, request_id: u64, ts_ns: u64) {
        self.evidence.on_marker(pid, tid, request_id, ts_ns);
    }

    /// Thread `tid` begins connecting upstream connection `fd`.
    pub fn on_connect(&mut self, pid: u32, tid: u32, fd: i32, ts_ns: u64) {
        self.evidence.on_connect(pid, tid, fd, ts_ns);
    }

    /// Thread `tid` read bytes: a response of `exchange` (None: anything else).
    pub fn on_read(&mut self, exchange: Option<u64>, pid: u32, tid: u32, ts_ns: u64) {
        self.evidence.on_read(exchange, pid, tid, ts_ns);
    }

    /// Upstream exchange `id` starts: its first request byte written by `tid` on `fd`.
    pub fn on_start(
        &mut self,
        id: u64,
        (pid, tid, fd): (u32, u32, i32),
        ts_ns: u64,
        stages: &impl UpstreamStages,
    ) {
        self.evidence.on_start(id, pid, tid, fd, ts_ns);
        let only_candidate = match stages.waiting(pid).as_slice() {
            // Not if an exchange already started in that stage: it may be the one.
            [(key, begin_ns)] if !self.started_since(pid, *begin_ns) => Some(*key),
            _ => None,
        };
        if let Some(key) = only_candidate {
            self.only_candidate_of.entry(key).or_default().push(id);
        }
        let exchange = Unattributed {
            pid,
            start_ns: ts_ns,
            first_response_ns: None,
            status: None,
            only_candidate: only_candidate.map(|key| key.1),
        };
        self.unattributed.insert(id, exchange);
    }

    fn started_since(&self, pid: u32, ns: u64) -> bool {
        self.unattributed
            .values()
            .any(|e| e.pid == pid && e.start_ns >= ns)
    }

    /// Exchange `id` got its first response byte (arrived at `ts_ns`).
    pub fn on_response(
        &mut self,
        id: u64,
        ts_ns: u64,
        status: Option<u16>,
        stages: &mut impl UpstreamStages,
    ) {
        if let Some(exchange) = self.unattributed.get_mut(&id) {
            exchange.first_response_ns = Some(ts_ns);
            exchange.status = status;
        } else if let Some((key, _)) = self.owners.get(&id) {
            stages.responded(*key, id, ts_ns, status);
        }
    }

    /// Exchange `id` ended without a response: it is not reported.
    pub fn on_unanswered(&mut self, id: u64) {
        self.forget(id);
        self.owners.remove(&id);
    }

    /// An exchange ended: reported now if attributed (or never to attribute), else held
    /// until its votes are in.
    pub fn on_finished(&mut self, exchange: Exchange) {
        if self.unattributed.contains_key(&exchange.id) {
            self.held.insert(exchange.id, exchange);
        } else {
            self.release(exchange);
        }
    }

    /// Request `key` is ending: its upstream reads are all in, so the exchanges best
    /// attributed to it go to it now, strongest evidence first (a stage takes one).
    pub fn on_request_end(&mut self, key: RequestKey, stages: &mut impl UpstreamStages) {
        let mut candidates = self.evidence.voting_for(key);
        candidates.extend(self.only_candidate_of.remove(&key).unwrap_or_default());
        // (votes for this request, start, id) of those whose best request it is.
        let mut mine: Vec<(u32, u64, u64)> = candidates
            .into_iter()
            .filter(|id| self.decide(*id, stages).is_some_and(|c| c.key == key))
            .filter_map(|id| {
                let start_ns = self.unattributed.get(&id)?.start_ns;
                Some((self.evidence.votes_for(id, key.1), start_ns, id))
            })
            .collect();
        mine.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        mine.dedup_by_key(|(_, _, id)| *id);
        for (_, _, id) in mine {
            if let Some(choice) = self.decide(id, stages).filter(|c| c.key == key) {
                self.assign(id, choice, stages);
            }
        }
        self.evidence.forget_request(key);
    }

    /// Decides the held exchanges whose last response byte is `HOLD_NS` old, or all of
    /// them (at detach).
    pub fn release_held(&mut self, now_ns: Option<u64>, stages: &mut impl UpstreamStages) {
        let due: Vec<u64> = self
            .held
            .values()
            .filter(|e| {
                let last = e.last_response_ns.unwrap_or(e.start_ns);
                now_ns.is_none_or(|now| now.saturating_sub(last) >= HOLD_NS)
            })
            .map(|e| e.id)
            .collect();
        for id in due {
            match self.decide(id, stages) {
                Some(choice) => self.assign(id, choice, stages),
                None => {
                    self.stats.unattributed += 1;
                    self.forget(id);
                }
            }
            if let Some(exchange) = self.held.remove(&id) {
                self.release(exchange);
            }
        }
    }

    /// Ended exchanges ready for the exporters, in the order they became ready.
    pub fn take_done(&mut self) -> Vec<Exchange> {
        std::mem::take(&mut self.done)
    }

    /// Forgets threads, connects and votes quiet for `idle_ns`.
    pub fn forget_quiet(&mut self, now_ns: u64, idle_ns: u64) {
        self.evidence.forget_quiet(now_ns, idle_ns);
        let unattributed = &self.unattributed;
        self.only_candidate_of.retain(|_, ids| {
            ids.retain(|id| unattributed.contains_key(id));
            !ids.is_empty()
        });
    }

    /// Where exchange `id` belongs as things stand: the request with the most adjacency
    /// votes that can still take it; without any, its sole candidate, if that still can.
    fn decide(&self, id: u64, stages: &impl UpstreamStages) -> Option<Choice> {
        let exchange = self.unattributed.get(&id)?;
        let pid = exchange.pid;
        for vote in self.evidence.ranked(id) {
            let key = (pid, vote.request_id);
            if let Some(stage) = stages.free_stage(key, exchange.start_ns) {
                return Some(Choice {
                    key,
                    stage,
                    how: Attribution::Adjacent,
                });
            }
        }
        let key = (pid, exchange.only_candidate?);
        let stage = stages.free_stage(key, exchange.start_ns)?;
        Some(Choice {
            key,
            stage,
            how: Attribution::OnlyCandidate,
        })
    }

    fn assign(&mut self, id: u64, choice: Choice, stages: &mut impl UpstreamStages) {
        let Some(exchange) = self.unattributed.remove(&id) else {
            return;
        };
        self.evidence.close(id);
        let call = UpstreamCall {
            exchange_id: id,
            attribution: Some(choice.how),
            sent_ns: exchange.start_ns,
            first_response_ns: exchange.first_response_ns,
            status: exchange.status,
            ..UpstreamCall::default()
        };
        stages.take(choice.key, choice.stage, call);
        self.owners.insert(id, (choice.key, choice.how));
        match choice.how {
            Attribution::Adjacent => self.stats.adjacent += 1,
            Attribution::OnlyCandidate => self.stats.only_candidate += 1,
        }
        if let Some(exchange) = self.held.remove(&id) {
            self.release(exchange);
        }
    }

    /// Reports an ended exchange, naming its request if it has one.
    fn release(&mut self, mut exchange: Exchange) {
        if let Some(((_, request_id), how)) = self.owners.remove(&exchange.id) {
            exchange.request_id = Some(request_id);
            exchange.attribution = Some(how);
        }
        self.done.push(exchange);
    }

    fn forget(&mut self, id: u64) {
        self.unattributed.remove(&id);
        self.evidence.close(id);
    }
}

/// What happened last on one thread that a later event may explain.
#[derive(Default)]
struct ThreadTrail {
    /// The latest marker hit: (request id, time). A write start or connect consumes it.
    marker: Option<(u64, u64)>,
    /// The latest read: (the upstream exchange it read a response of, if any; time). The
    /// next marker hit consumes it; any later read replaces it.
    read: Option<(Option<u64>, u64)>,
}

/// A request voted for, and by how many adjacencies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Vote {
    request_id: u64,
    count: u32,
    /// When the latest of them was cast: breaks ties toward the freshest evidence.
    last_ns: u64,
}

/// Votes cast so far, per upstream exchange not yet attributed.
#[derive(Default)]
struct Evidence {
    threads: HashMap<(u32, u32), ThreadTrail>,
    /// Connections being opened: (pid, fd) → the request adjacent to the connect, and
    /// when, until their first exchange starts.
    connects: HashMap<(u32, i32), (u64, u64)>,
    /// Exchange → (its process, its votes).
    votes: HashMap<u64, (u32, Vec<Vote>)>,
    /// Request → exchanges that voted for it (some may be decided since).
    by_request: HashMap<RequestKey, Vec<u64>>,
    /// Exchanges whose response reads have voted: the first read's next marker is the
    /// request's own (its first byte), while after a stream's later reads it may be any
    /// request's, as the kernel counts a stream's later chunk markers instead of sending
    /// them (docs/markers.md, "Chunks").
    read_voted: HashSet<u64>,
}

impl Evidence {
    fn on_marker(&mut self, pid: u32, tid: u32, request_id: u64, ts_ns: u64) {
        let trail = self.threads.entry((pid, tid)).or_default();
        trail.marker = Some((request_id, ts_ns));
        // The first marker after any of an open exchange's reads uses up its read vote,
        // cast or not (too far apart), whichever thread read.
        if let Some((Some(exchange), read_ns)) = trail.read.take() {
            if self.votes.contains_key(&exchange)
                && self.read_voted.insert(exchange)
                && ts_ns.saturating_sub(read_ns) <= ADJACENT_NS
            {
                self.vote(exchange, request_id, ts_ns);
            }
        }
    }

    fn on_connect(&mut self, pid: u32, tid: u32, fd: i32, ts_ns: u64) {
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

    fn on_start(&mut self, exchange: u64, pid: u32, tid: u32, fd: i32, ts_ns: u64) {
        self.votes.insert(exchange, (pid, Vec::new()));
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

    fn on_read(&mut self, exchange: Option<u64>, pid: u32, tid: u32, ts_ns: u64) {
        let exchange =
            exchange.filter(|id| self.votes.contains_key(id) && !self.read_voted.contains(id));
        let trail = self.threads.entry((pid, tid)).or_default();
        trail.read = Some((exchange, ts_ns));
    }

    fn vote(&mut self, exchange: u64, request_id: u64, ts_ns: u64) {
        // Only exchanges still open for attribution collect votes.
        let Some((pid, votes)) = self.votes.get_mut(&exchange) else {
            return;
        };
        if let Some(vote) = votes.iter_mut().find(|v| v.request_id == request_id) {
            vote.count += 1;
            vote.last_ns = ts_ns;
            return;
        }
        // At most three: the start's, the connect's and the response's read's.
        votes.push(Vote {
            request_id,
            count: 1,
            last_ns: ts_ns,
        });
        self.by_request
            .entry((*pid, request_id))
            .or_default()
            .push(exchange);
    }

    /// The exchange's votes, strongest first (most votes, then the freshest).
    fn ranked(&self, exchange: u64) -> Vec<Vote> {
        let mut votes = self
            .votes
            .get(&exchange)
            .map(|(_, votes)| votes.clone())
            .unwrap_or_default();
        votes.sort_unstable_by(|a, b| b.count.cmp(&a.count).then(b.last_ns.cmp(&a.last_ns)));
        votes
    }

    fn votes_for(&self, exchange: u64, request_id: u64) -> u32 {
        self.votes
            .get(&exchange)
            .and_then(|(_, votes)| votes.iter().find(|v| v.request_id == request_id))
            .map_or(0, |v| v.count)
    }

    /// Exchanges that voted for request `key` and still collect votes.
    fn voting_for(&self, key: RequestKey) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .by_request
            .get(&key)
            .into_iter()
            .flatten()
            .copied()
            .filter(|id| self.votes.contains_key(id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn forget_request(&mut self, key: RequestKey) {
        self.by_request.remove(&key);
    }

    /// The exchange is attributed, or never will be: forget its votes.
    fn close(&mut self, exchange: u64) {
        self.votes.remove(&exchange);
        self.read_voted.remove(&exchange);
    }

    /// Forgets threads and connects quiet for `idle_ns` (threads come and go with the
    /// broker), and the votes for requests that will never end here.
    fn forget_quiet(&mut self, now_ns: u64, idle_ns: u64) {
        self.threads.retain(|_, trail| {
            let last = trail
                .marker
                .map(|(_, ts)| ts)
                .max(trail.read.map(|(_, ts)| ts))
                .unwrap_or(0);
            now_ns.saturating_sub(last) < idle_ns
        });
        self.connects
            .retain(|_, (_, connect_ns)| now_ns.saturating_sub(*connect_ns) < idle_ns);
        let votes = &self.votes;
        self.by_request.retain(|_, ids| {
            ids.retain(|id| votes.contains_key(id));
            !ids.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PID: u32 = 1;

    fn votes(e: &Evidence, exchange: u64) -> Vec<(u64, u32)> {
        e.ranked(exchange)
            .iter()
            .map(|v| (v.request_id, v.count))
            .collect()
    }

    #[test]
    fn write_after_a_marker_and_marker_after_a_read_vote() {
        let mut e = Evidence::default();
        e.on_marker(PID, 10, 7, 100); // request 7 begins its upstream stage on thread 10
        e.on_start(1, PID, 10, 3, 110); // exchange 1 written by thread 10
        e.on_read(Some(1), PID, 11, 500); // its response read on thread 11
        e.on_marker(PID, 11, 7, 510); // request 7 wakes there
        assert_eq!(votes(&e, 1), [(7, 2)]);
        assert_eq!(e.voting_for((PID, 7)), [1]);
    }

    #[test]
    fn a_responses_reads_vote_once() {
        let mut e = Evidence::default();
        e.on_start(1, PID, 10, 3, 110);
        // The head comes in two reads before the request's first-byte marker: one vote.
        e.on_read(Some(1), PID, 11, 500);
        e.on_read(Some(1), PID, 11, 505);
        e.on_marker(PID, 11, 7, 510);
        // A later read of the stream, then another request's marker on that thread.
        e.on_read(Some(1), PID, 11, 600);
        e.on_marker(PID, 11, 8, 610);
        assert_eq!(votes(&e, 1), [(7, 1)]);
        // Reads on two threads before either's next marker: the first marker votes.
        e.on_start(2, PID, 10, 4, 700);
        e.on_read(Some(2), PID, 11, 800);
        e.on_read(Some(2), PID, 12, 805);
        e.on_marker(PID, 12, 7, 806);
        e.on_marker(PID, 11, 8, 810);
        assert_eq!(votes(&e, 2), [(7, 1)]);
        // A read whose next marker came too late still uses the vote up.
        e.on_start(3, PID, 10, 5, 900);
        e.on_read(Some(3), PID, 11, 1_000);
        e.on_marker(PID, 11, 9, 1_000 + ADJACENT_NS + 1);
        e.on_read(Some(3), PID, 11, 2 * ADJACENT_NS);
        e.on_marker(PID, 11, 8, 2 * ADJACENT_NS + 1);
        assert!(e.ranked(3).is_empty());
        // A closed exchange's late read leaves nothing behind.
        e.on_read(Some(3), PID, 13, 3 * ADJACENT_NS);
        e.close(3);
        e.on_marker(PID, 13, 8, 3 * ADJACENT_NS + 1);
        assert!(!e.read_voted.contains(&3));
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
        assert_eq!(votes(&e, 1), [(7, 1)], "only the start vote");
        // Too far apart to be cause and effect.
        e.on_read(Some(2), PID, 10, 300);
        e.on_marker(PID, 10, 9, 300 + ADJACENT_NS + 1);
        assert!(e.ranked(2).is_empty());
    }

    #[test]
    fn ranking_prefers_more_then_fresher_votes_and_closed_exchanges_take_none() {
        let mut e = Evidence::default();
        e.on_marker(PID, 10, 8, 0);
        e.on_connect(PID, 10, 3, 1); // request 8's task connects fd 3
        e.on_marker(PID, 10, 9, 5);
        e.on_start(1, PID, 10, 3, 6); // written after request 9's marker
        e.on_read(Some(1), PID, 11, 20);
        e.on_marker(PID, 11, 9, 21);
        assert_eq!(votes(&e, 1), [(9, 2), (8, 1)]);
        // One vote each: the fresher first.
        e.on_marker(PID, 10, 7, 30);
        e.on_start(2, PID, 10, 4, 31);
        e.on_read(Some(2), PID, 11, 40);
        e.on_marker(PID, 11, 8, 41);
        assert_eq!(votes(&e, 2), [(8, 1), (7, 1)]);
        e.close(1);
        e.close(2);
        e.on_read(Some(1), PID, 11, 60);
        e.on_marker(PID, 11, 7, 61);
        assert!(e.votes.is_empty() && e.read_voted.is_empty());
        e.forget_quiet(61, 1_000);
        assert!(
            e.by_request.is_empty(),
            "no index left for closed exchanges"
        );
    }

    #[test]
    fn a_connect_votes_for_its_connections_first_exchange() {
        let mut e = Evidence::default();
        e.on_marker(PID, 10, 7, 100);
        e.on_connect(PID, 10, 5, 105); // request 7's task connects fd 5
        e.on_marker(PID, 10, 8, 110);
        e.on_start(1, PID, 11, 5, 200); // written by another thread, after no marker
        assert_eq!(votes(&e, 1), [(7, 1)]);
        e.on_start(2, PID, 11, 5, 300); // the connection's next exchange: no connect vote
        assert!(e.ranked(2).is_empty());
    }
}
