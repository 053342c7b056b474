//! Per-request assembly: marker events → one [`Request`] timeline per broker request.
//!
//! Requests are keyed by (process, request id) — never by thread, since async brokers move
//! a request between worker threads. Nothing is dropped silently: every event that cannot
//! be placed is counted in [`AssemblyStats`].

use foldhash::{HashMap, HashSet};

use probe_common::marker::Stage;

use crate::{
    attribution::{AttributionStats, Attributor, RequestKey, UpstreamStages},
    connections::{Attribution, Exchange, Progress},
    decode::{Event, StageId, What},
};

/// A finished broker request.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub pid: u32,
    pub request_id: u64,
    pub model: String,
    pub provider: Option<String>,
    pub traceparent: Option<String>,
    pub status: u16,
    pub error_type: Option<String>,
    pub begin_ns: u64,
    pub end_ns: u64,
    /// Closed stages in begin order.
    pub stages: Vec<StageSpan>,
    pub fallbacks: Vec<Fallback>,
    /// Every "first upstream byte" the broker saw (one per upstream call).
    pub first_byte_ns: Vec<u64>,
    /// Stream chunks the broker forwarded (chunk markers), and when the first and the last
    /// were.
    pub chunks: u32,
    pub first_chunk_ns: Option<u64>,
    pub last_chunk_ns: Option<u64>,
    /// Totals over `token_usage`.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Every token-usage marker (one per upstream answer), in order.
    pub token_usage: Vec<TokenUsage>,
    /// Stages begun but still open at request end (not in `stages`).
    pub unclosed_stages: u32,
    /// Upstream exchanges attributed to this request, in the order they started.
    pub upstream_calls: Vec<UpstreamCall>,
}

/// Tokens one upstream answer billed, and when the broker said so.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input: u64,
    pub output: u64,
    pub ts_ns: u64,
}

/// The broker switched from one model to another (after `from` failed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fallback {
    pub from: String,
    pub to: String,
    pub ts_ns: u64,
}

/// The broker's and the network's view of one upstream call (docs/sockets.md).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpstreamCall {
    /// The [`Exchange`] id; the exchange itself is reported when it ends.
    pub exchange_id: u64,
    pub attribution: Option<Attribution>,
    /// Begin of the upstream stage the exchange started in.
    pub stage_begin_ns: u64,
    /// First request byte written.
    pub sent_ns: u64,
    /// First response byte arrived.
    pub first_response_ns: Option<u64>,
    /// The broker's first-byte marker for this call.
    pub broker_first_byte_ns: Option<u64>,
    /// From the response's status line, when it was plaintext HTTP/1.x.
    pub status: Option<u16>,
}

impl UpstreamCall {
    /// What the broker waited: upstream stage begin → its first-byte marker.
    pub fn broker_wait_ns(&self) -> Option<u64> {
        Some(
            self.broker_first_byte_ns?
                .saturating_sub(self.stage_begin_ns),
        )
    }

    /// What the network took: first request byte out → first response byte arrived.
    pub fn network_ttfb_ns(&self) -> Option<u64> {
        Some(self.first_response_ns?.saturating_sub(self.sent_ns))
    }

    /// The broker's wait beyond the network's: time spent in the broker and its executor
    /// before the request went out and after the response came in.
    pub fn lag_ns(&self) -> Option<u64> {
        Some(
            self.broker_wait_ns()?
                .saturating_sub(self.network_ttfb_ns()?),
        )
    }
}

impl Request {
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.begin_ns)
    }

    /// It failed: an error type at request end, or a status of 400 or more.
    pub fn failed(&self) -> bool {
        self.error_type.is_some() || self.status >= 400
    }

    /// It failed on the broker's side: a 5xx, or an error type with a success status
    /// (a stream that broke after its 200 head). Client errors (4xx) are not.
    pub fn server_failed(&self) -> bool {
        self.status >= 500 || (self.error_type.is_some() && self.status < 400)
    }

    /// The model the broker asked for at `ns`: the request's, unless a fallback came before.
    pub fn model_at(&self, ns: u64) -> &str {
        self.fallbacks
            .iter()
            .rfind(|f| f.ts_ns <= ns)
            .map_or(&self.model, |f| &f.to)
    }

    /// Why the upstream call of `stage` failed, as far as anyone can tell: its response
    /// status said so, or the broker fell back to another model right after it.
    pub fn call_error(&self, stage: &StageSpan) -> Option<String> {
        let status = self
            .upstream_calls
            .iter()
            .find(|c| c.stage_begin_ns == stage.begin_ns)
            .and_then(|c| c.status);
        if let Some(status) = status {
            return (status >= 400).then(|| status.to_string());
        }
        let next_call = self
            .stages
            .iter()
            .filter(|s| s.is_upstream_call() && s.begin_ns > stage.begin_ns)
            .map(|s| s.begin_ns)
            .min()
            .unwrap_or(u64::MAX);
        self.fallbacks
            .iter()
            .any(|f| (stage.end_ns..next_call).contains(&f.ts_ns))
            .then(|| "fallback".to_owned())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct StageSpan {
    pub id: StageId,
    pub begin_ns: u64,
    pub end_ns: u64,
}

impl StageSpan {
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.begin_ns)
    }

    /// `upstream.chat` or `upstream.chat_stream`.
    pub fn is_upstream_call(&self) -> bool {
        matches!(
            self.id,
            StageId::Known(Stage::UpstreamChat | Stage::UpstreamChatStream)
        )
    }
}

/// What assembly could not place, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AssemblyStats {
    pub completed: u64,
    /// Ends of requests not being tracked (begun before the attach, or already dropped as
    /// expired or over the open-request bound): not reported.
    pub partial: u64,
    /// Events of requests not being tracked: begun before the attach, or already dropped
    /// as expired or over the open-request bound.
    pub orphan_events: u64,
    /// Requests whose end never came: not within the timeout, or not before their
    /// process exited.
    pub expired: u64,
    /// Requests that ran while the ring buffer was full: some of their events may be
    /// missing, so they are not reported as if whole.
    pub incomplete: u64,
    /// Requests not tracked because `max_open` were already open.
    pub overflow: u64,
    /// A second begin for an open request id: the first is abandoned.
    pub duplicate_begins: u64,
    /// Stage ends with no open begin of the same stage.
    pub unmatched_stage_ends: u64,
    /// Stages still open at request end.
    pub unclosed_stages: u64,
    /// Stage begins, first bytes and fallbacks past one request's bounds (not kept).
    pub over_request_bounds: u64,
    /// Events after the window closed (detaching had begun): ignored.
    pub after_window: u64,
    /// Upstream exchanges related to requests, and those that could not be.
    pub attribution: AttributionStats,
}

/// Bounds on what one request keeps, so a broker that never ends a stage loop cannot grow
/// memory without limit; generous next to real brokers (tens of stages per request).
const MAX_STAGES_PER_REQUEST: usize = 512;
const MAX_REPEATS_PER_REQUEST: usize = 64;

fn push_bounded<T>(list: &mut Vec<T>, item: T, stats: &mut AssemblyStats) {
    if list.len() < MAX_REPEATS_PER_REQUEST {
        list.push(item);
    } else {
        stats.over_request_bounds += 1;
    }
}

struct OpenStage {
    id: StageId,
    begin_ns: u64,
    end_ns: Option<u64>,
    /// The upstream exchange attributed to this stage instance.
    exchange: Option<u64>,
}

impl OpenStage {
    fn is_upstream_call(&self) -> bool {
        matches!(
            self.id,
            StageId::Known(Stage::UpstreamChat | Stage::UpstreamChatStream)
        )
    }

    /// An upstream stage that can take an exchange started at `start_ns`.
    fn can_take(&self, start_ns: u64) -> bool {
        self.is_upstream_call()
            && self.exchange.is_none()
            && self.begin_ns <= start_ns
            && self.end_ns.is_none_or(|end| end >= start_ns)
    }

    /// Open, upstream, without an exchange: waiting for one now.
    fn is_waiting(&self) -> bool {
        self.is_upstream_call() && self.exchange.is_none() && self.end_ns.is_none()
    }
}

struct OpenRequest {
    request: Request,
    stages: Vec<OpenStage>,
    /// Ring-buffer losses before its begin: more at its end, and it may miss events.
    losses_at_begin: u64,
}

/// The requests being assembled, and which of them wait for an upstream exchange.
#[derive(Default)]
struct OpenRequests {
    requests: HashMap<RequestKey, OpenRequest>,
    /// Requests with an open upstream stage that has no exchange yet.
    waiting: HashSet<RequestKey>,
}

impl OpenRequests {
    /// Keeps `waiting` right after request `key`'s stages changed.
    fn refresh(&mut self, key: RequestKey) {
        let waits = self
            .requests
            .get(&key)
            .is_some_and(|open| open.stages.iter().any(OpenStage::is_waiting));
        if waits {
            self.waiting.insert(key);
        } else {
            self.waiting.remove(&key);
        }
    }

    fn remove(&mut self, key: RequestKey) -> Option<OpenRequest> {
        self.waiting.remove(&key);
        self.requests.remove(&key)
    }
}

impl UpstreamStages for OpenRequests {
    fn free_stage(&self, key: RequestKey, start_ns: u64) -> Option<usize> {
        let open = self.requests.get(&key)?;
        // The latest begun: stages of one request run one after another.
        open.stages.iter().rposition(|s| s.can_take(start_ns))
    }

    fn waiting(&self, pid: u32) -> Vec<(RequestKey, u64)> {
        self.waiting
            .iter()
            .filter(|key| key.0 == pid)
            .filter_map(|key| {
                let stage = self
                    .requests
                    .get(key)?
                    .stages
                    .iter()
                    .rfind(|s| s.is_waiting())?;
                Some((*key, stage.begin_ns))
            })
            .collect()
    }

    fn take(&mut self, key: RequestKey, stage: usize, mut call: UpstreamCall) {
        let Some(open) = self.requests.get_mut(&key) else {
            return;
        };
        let Some(stage) = open.stages.get_mut(stage) else {
            return;
        };
        stage.exchange = Some(call.exchange_id);
        call.stage_begin_ns = stage.begin_ns;
        // One call per stage instance, and stages are bounded: so are calls.
        open.request.upstream_calls.push(call);
        self.refresh(key);
    }

    fn responded(&mut self, key: RequestKey, exchange: u64, ts_ns: u64, status: Option<u16>) {
        let call = self.requests.get_mut(&key).and_then(|open| {
            open.request
                .upstream_calls
                .iter_mut()
                .find(|c| c.exchange_id == exchange)
        });
        if let Some(call) = call {
            call.first_response_ns = Some(ts_ns);
            call.status = status;
        }
    }
}

pub struct Assembler {
    requests: OpenRequests,
    max_open: usize,
    stats: AssemblyStats,
    /// Only requests begun inside this window are tracked, and no event after its end is
    /// used: attaching and detaching probes one by one takes time, and a request that
    /// straddles either would be seen with some of its markers missing.
    window_start_ns: u64,
    window_end_ns: u64,
    /// Which request each upstream exchange served.
    attributor: Attributor,
}

impl Assembler {
    /// `max_open` bounds memory whatever the broker does (e.g. never ending requests).
    pub fn new(max_open: usize) -> Self {
        Self {
            requests: OpenRequests::default(),
            max_open,
            stats: AssemblyStats::default(),
            window_start_ns: 0,
            window_end_ns: u64::MAX,
            attributor: Attributor::default(),
        }
    }

    /// Every probe is in place from `ns` on: requests begun earlier are not tracked.
    pub fn open_window(&mut self, ns: u64) {
        self.window_start_ns = ns;
    }

    /// Probes start going away at `ns`: later events are ignored (and counted).
    pub fn close_window(&mut self, ns: u64) {
        self.window_end_ns = ns;
    }

    pub fn stats(&self) -> AssemblyStats {
        AssemblyStats {
            attribution: self.attributor.stats(),
            ..self.stats
        }
    }

    pub fn in_flight(&self) -> usize {
        self.requests.requests.len()
    }

    /// Feeds one event; returns the request it completed, if any.
    pub fn on_event(&mut self, event: Event) -> Option<Request> {
        let key = (event.pid, event.request_id);
        if event.ts_ns > self.window_end_ns {
            self.stats.after_window += 1;
            return None;
        }
        self.attributor
            .on_marker(event.pid, event.tid, event.request_id, event.ts_ns);
        let open_requests = &mut self.requests.requests;
        if let What::RequestBegin { model, traceparent } = event.what {
            if event.ts_ns < self.window_start_ns {
                return None; // its end will count as untracked
            }
            if open_requests.len() >= self.max_open && !open_requests.contains_key(&key) {
                self.stats.overflow += 1;
                return None;
            }
            let request = Request {
                pid: event.pid,
                request_id: event.request_id,
                model,
                traceparent,
                begin_ns: event.ts_ns,
                ..Request::default()
            };
            let open = OpenRequest {
                request,
                stages: Vec::new(),
                losses_at_begin: event.losses,
            };
            if open_requests.insert(key, open).is_some() {
                self.stats.duplicate_begins += 1;
                self.requests.refresh(key);
            }
            return None;
        }
        let Some(open) = open_requests.get_mut(&key) else {
            match event.what {
                What::RequestEnd { .. } => self.stats.partial += 1,
                _ => self.stats.orphan_events += 1,
            }
            return None;
        };
        let request = &mut open.request;
        match event.what {
            What::RequestBegin { .. } => unreachable!("handled above"),
            What::RequestEnd {
                status,
                error_type,
                tallied_chunks,
            } => {
                request.status = status;
                request.error_type = error_type;
                if let Some(tallied) = tallied_chunks {
                    request.chunks = request.chunks.saturating_add(tallied.count);
                    request.last_chunk_ns = Some(tallied.last_ns);
                }
                request.end_ns = event.ts_ns;
                // Its upstream exchanges have all been read by now: decide them while
                // the request can still take them.
                self.attributor.on_request_end(key, &mut self.requests);
                let open = self.requests.remove(key)?;
                if event.losses != open.losses_at_begin {
                    self.stats.incomplete += 1;
                    return None;
                }
                return Some(self.close(open));
            }
            What::StageBegin(id) => {
                if open.stages.len() < MAX_STAGES_PER_REQUEST {
                    let stage = OpenStage {
                        id,
                        begin_ns: event.ts_ns,
                        end_ns: None,
                        exchange: None,
                    };
                    open.stages.push(stage);
                    self.requests.refresh(key);
                } else {
                    self.stats.over_request_bounds += 1;
                }
            }
            What::StageEnd(id) => {
                // The innermost open instance of the same stage: handles repeated and nested
                // stages (e.g. one keypool.acquire per upstream turn).
                match open
                    .stages
                    .iter_mut()
                    .rev()
                    .find(|s| s.end_ns.is_none() && s.id == id)
                {
                    Some(stage) => {
                        stage.end_ns = Some(event.ts_ns);
                        self.requests.refresh(key);
                    }
                    None => self.stats.unmatched_stage_ends += 1,
                }
            }
            What::Provider(name) => request.provider = Some(name),
            What::FirstByte => {
                push_bounded(&mut request.first_byte_ns, event.ts_ns, &mut self.stats)
            }
            // Saturating: chunk and token counts come from the broker and its upstream.
            What::Chunk => {
                request.chunks = request.chunks.saturating_add(1);
                request.first_chunk_ns.get_or_insert(event.ts_ns);
                request.last_chunk_ns = Some(event.ts_ns);
            }
            What::TokenUsage { input, output } => {
                request.input_tokens = request.input_tokens.saturating_add(input);
                request.output_tokens = request.output_tokens.saturating_add(output);
                let usage = TokenUsage {
                    input,
                    output,
                    ts_ns: event.ts_ns,
                };
                push_bounded(&mut request.token_usage, usage, &mut self.stats);
            }
            What::Fallback { from, to } => {
                let fallback = Fallback {
                    from,
                    to,
                    ts_ns: event.ts_ns,
                };
                push_bounded(&mut request.fallbacks, fallback, &mut self.stats)
            }
        }
        None
    }

    fn close(&mut self, open: OpenRequest) -> Request {
        let OpenRequest {
            mut request,
            stages,
            ..
        } = open;
        for stage in stages {
            match stage.end_ns {
                Some(end_ns) => request.stages.push(StageSpan {
                    id: stage.id,
                    begin_ns: stage.begin_ns,
                    end_ns,
                }),
                None => request.unclosed_stages += 1,
            }
        }
        self.stats.unclosed_stages += u64::from(request.unclosed_stages);
        self.stats.completed += 1;
        // Attributed strongest-evidence first; reported in the order they were sent.
        request.upstream_calls.sort_by_key(|call| call.sent_ns);
        for call in &mut request.upstream_calls {
            call.broker_first_byte_ns = request
                .first_byte_ns
                .iter()
                .copied()
                .find(|ts| *ts >= call.sent_ns);
        }
        request
    }

    /// Feeds what the connection tracker saw. Ended exchanges come out of
    /// [`Assembler::take_exchanges`], with the request each served when it is known.
    pub fn on_progress(&mut self, progress: Progress) {
        let attributor = &mut self.attributor;
        match progress {
            Progress::Connecting {
                pid,
                tid,
                fd,
                ts_ns,
            } => attributor.on_connect(pid, tid, fd, ts_ns),
            Progress::Started {
                id,
                pid,
                tid,
                fd,
                ts_ns,
            } => attributor.on_start(id, (pid, tid, fd), ts_ns, &self.requests),
            Progress::Responded { id, ts_ns, status } => {
                attributor.on_response(id, ts_ns, status, &mut self.requests)
            }
            Progress::Read {
                exchange,
                pid,
                tid,
                ts_ns,
            } => attributor.on_read(exchange, pid, tid, ts_ns),
            Progress::Unanswered { id } => attributor.on_unanswered(id),
            Progress::Finished(exchange) => attributor.on_finished(*exchange),
        }
    }

    /// Ended exchanges ready to report, in the order they became ready.
    pub fn take_exchanges(&mut self) -> Vec<Exchange> {
        self.attributor.take_done()
    }

    /// Forgets requests open since before `now_ns - timeout_ns` (returns how many), and
    /// decides the exchanges whose votes are in by now.
    pub fn expire(&mut self, now_ns: u64, timeout_ns: u64) -> usize {
        let open = &mut self.requests;
        let stale: Vec<RequestKey> = open
            .requests
            .iter()
            .filter(|(_, o)| now_ns.saturating_sub(o.request.begin_ns) >= timeout_ns)
            .map(|(key, _)| *key)
            .collect();
        for key in &stale {
            open.remove(*key);
        }
        self.stats.expired += stale.len() as u64;
        self.attributor
            .release_held(Some(now_ns), &mut self.requests);
        self.attributor.forget_quiet(now_ns, timeout_ns);
        stale.len()
    }

    /// Process `pid` exited: its open requests will never end. Dropped and counted as
    /// expired; returns how many.
    pub fn end_process(&mut self, pid: u32) -> usize {
        let open = &mut self.requests;
        let orphaned: Vec<RequestKey> = open
            .requests
            .keys()
            .filter(|(request_pid, _)| *request_pid == pid)
            .copied()
            .collect();
        for key in &orphaned {
            open.remove(*key);
        }
        self.stats.expired += orphaned.len() as u64;
        orphaned.len()
    }

    /// Detaching: decides every exchange still held.
    pub fn finish(&mut self) {
        self.attributor.release_held(None, &mut self.requests);
    }
}

#[cfg(test)]
mod tests {
    use probe_common::marker::Stage;

    use super::*;
    use crate::decode::TalliedChunks;

    fn ev(ts_ns: u64, request_id: u64, what: What) -> Event {
        Event {
            ts_ns,
            pid: 1,
            tid: 1,
            request_id,
            losses: 0,
            what,
        }
    }

    fn begin(ts: u64, id: u64) -> Event {
        ev(
            ts,
            id,
            What::RequestBegin {
                model: "m".into(),
                traceparent: None,
            },
        )
    }

    fn end(ts: u64, id: u64) -> Event {
        ev(
            ts,
            id,
            What::RequestEnd {
                status: 200,
                error_type: None,
                tallied_chunks: None,
            },
        )
    }

    fn stage(ts: u64, id: u64, begin: bool, stage: StageId) -> Event {
        ev(
            ts,
            id,
            if begin {
                What::StageBegin(stage)
            } else {
                What::StageEnd(stage)
            },
        )
    }

    const ROUTE: StageId = StageId::Known(Stage::Route);
    const KEYPOOL: StageId = StageId::Known(Stage::KeypoolAcquire);

    #[test]
    fn interleaved_requests_assemble_apart() {
        let mut asm = Assembler::new(10);
        let events = [
            begin(10, 1),
            begin(11, 2),
            stage(12, 2, true, ROUTE),
            stage(13, 1, true, ROUTE),
            stage(15, 1, false, ROUTE),
            stage(20, 2, false, ROUTE),
            ev(
                21,
                1,
                What::TokenUsage {
                    input: 3,
                    output: 4,
                },
            ),
            ev(
                22,
                1,
                What::TokenUsage {
                    input: 1,
                    output: 1,
                },
            ),
        ];
        for e in events {
            assert!(asm.on_event(e).is_none());
        }
        let one = asm.on_event(end(30, 1)).unwrap();
        assert_eq!(
            (
                one.begin_ns,
                one.end_ns,
                one.input_tokens,
                one.output_tokens
            ),
            (10, 30, 4, 5)
        );
        assert_eq!(
            one.stages,
            vec![StageSpan {
                id: ROUTE,
                begin_ns: 13,
                end_ns: 15
            }]
        );
        let two = asm.on_event(end(31, 2)).unwrap();
        assert_eq!(two.stages[0].duration_ns(), 8);
        assert_eq!(asm.in_flight(), 0);
    }

    #[test]
    fn chunks_tallied_in_the_kernel_join_the_first_one_sent() {
        let mut asm = Assembler::new(10);
        asm.on_event(begin(10, 1));
        asm.on_event(ev(20, 1, What::Chunk));
        let tallied = ev(
            50,
            1,
            What::RequestEnd {
                status: 200,
                error_type: None,
                tallied_chunks: Some(TalliedChunks {
                    count: 4,
                    last_ns: 40,
                }),
            },
        );
        let one = asm.on_event(tallied).unwrap();
        assert_eq!(
            (one.chunks, one.first_chunk_ns, one.last_chunk_ns),
            (5, Some(20), Some(40))
        );
        // A single chunk: nothing tallied, the first is also the last.
        asm.on_event(begin(60, 2));
        asm.on_event(ev(70, 2, What::Chunk));
        let two = asm.on_event(end(80, 2)).unwrap();
        assert_eq!(
            (two.chunks, two.first_chunk_ns, two.last_chunk_ns),
            (1, Some(70), Some(70))
        );
    }

    #[test]
    fn repeated_stage_instances_pair_in_order() {
        let mut asm = Assembler::new(10);
        for e in [
            begin(0, 1),
            stage(1, 1, true, KEYPOOL),
            stage(2, 1, false, KEYPOOL),
            stage(5, 1, true, KEYPOOL),
            stage(9, 1, false, KEYPOOL),
        ] {
            asm.on_event(e);
        }
        let req = asm.on_event(end(10, 1)).unwrap();
        let durations: Vec<u64> = req.stages.iter().map(StageSpan::duration_ns).collect();
        assert_eq!(durations, vec![1, 4]);
    }

    #[test]
    fn requests_begun_before_attach_are_counted_not_reported() {
        let mut asm = Assembler::new(10);
        assert!(asm.on_event(stage(1, 9, false, ROUTE)).is_none());
        assert!(asm.on_event(end(2, 9)).is_none());
        let stats = asm.stats();
        assert_eq!(
            (stats.orphan_events, stats.partial, stats.completed),
            (1, 1, 0)
        );
    }

    /// A record lost while a request ran may have been one of its own: it is counted as
    /// incomplete, never reported with a stage missing.
    #[test]
    fn requests_spanning_a_loss_are_counted_not_reported() {
        let mut asm = Assembler::new(10);
        let with_losses = |mut event: Event, losses| {
            event.losses = losses;
            event
        };
        asm.on_event(with_losses(begin(0, 1), 3));
        asm.on_event(with_losses(begin(1, 2), 3));
        asm.on_event(with_losses(stage(2, 1, true, ROUTE), 3));
        // The ring buffer overflowed here: request 1's stage end may be what was lost.
        assert!(asm.on_event(with_losses(end(5, 1), 4)).is_none());
        asm.on_event(with_losses(begin(6, 3), 4));
        assert!(asm.on_event(with_losses(end(7, 2), 4)).is_none());
        assert!(asm.on_event(with_losses(end(8, 3), 4)).is_some());
        let stats = asm.stats();
        assert_eq!((stats.incomplete, stats.completed), (2, 1));
        assert_eq!(asm.in_flight(), 0);
    }

    #[test]
    fn unclosed_and_unmatched_stages_are_counted() {
        let mut asm = Assembler::new(10);
        asm.on_event(begin(0, 1));
        asm.on_event(stage(1, 1, true, ROUTE));
        asm.on_event(stage(2, 1, false, KEYPOOL));
        let req = asm.on_event(end(3, 1)).unwrap();
        assert!(req.stages.is_empty());
        assert_eq!(req.unclosed_stages, 1);
        let stats = asm.stats();
        assert_eq!((stats.unclosed_stages, stats.unmatched_stage_ends), (1, 1));
    }

    #[test]
    fn one_request_cannot_grow_without_bound() {
        let mut asm = Assembler::new(10);
        asm.on_event(begin(0, 1));
        for i in 0..(MAX_STAGES_PER_REQUEST as u64 + 10) {
            asm.on_event(stage(i, 1, true, ROUTE));
            asm.on_event(stage(i, 1, false, ROUTE));
        }
        for _ in 0..(MAX_REPEATS_PER_REQUEST + 5) {
            asm.on_event(ev(1, 1, What::FirstByte));
        }
        asm.on_event(ev(
            1,
            1,
            What::TokenUsage {
                input: u64::MAX,
                output: 1,
            },
        ));
        asm.on_event(ev(
            1,
            1,
            What::TokenUsage {
                input: 5,
                output: 1,
            },
        ));
        let req = asm.on_event(end(2, 1)).unwrap();
        assert_eq!(req.stages.len(), MAX_STAGES_PER_REQUEST);
        assert_eq!(req.first_byte_ns.len(), MAX_REPEATS_PER_REQUEST);
        assert_eq!((req.input_tokens, req.output_tokens), (u64::MAX, 2));
        let stats = asm.stats();
        assert_eq!(stats.over_request_bounds, 10 + 5);
        // The ends of the stages not kept find no begin: counted too.
        assert_eq!(stats.unmatched_stage_ends, 10);
    }

    #[test]
    fn only_requests_inside_the_attach_window_are_reported() {
        let mut asm = Assembler::new(10);
        asm.open_window(10);
        asm.on_event(begin(5, 1)); // while probes were still being attached
        asm.on_event(begin(12, 2));
        asm.on_event(begin(14, 3));
        asm.close_window(20);
        assert!(asm.on_event(end(15, 1)).is_none());
        assert!(asm.on_event(end(18, 2)).is_some());
        assert!(asm.on_event(end(25, 3)).is_none()); // while probes were going away
        let stats = asm.stats();
        assert_eq!(
            (stats.partial, stats.completed, stats.after_window),
            (1, 1, 1)
        );
        assert_eq!(asm.in_flight(), 1);
    }

    #[test]
    fn memory_is_bounded_and_stale_requests_expire() {
        let mut asm = Assembler::new(2);
        for id in 0..5 {
            asm.on_event(begin(id * 10, id));
        }
        assert_eq!((asm.in_flight(), asm.stats().overflow), (2, 3));
        assert_eq!(asm.expire(100, 95), 1);
        assert_eq!((asm.in_flight(), asm.stats().expired), (1, 1));
    }

    fn on_thread(mut event: Event, tid: u32) -> Event {
        event.tid = tid;
        event
    }

    const UPSTREAM: StageId = StageId::Known(Stage::UpstreamChat);

    fn exchange(id: u64, start_ns: u64) -> Exchange {
        Exchange {
            id,
            pid: 1,
            fd: 3,
            role: crate::procnet::Role::Upstream,
            peer_name: "p".into(),
            local: None,
            remote: None,
            connect_ns: None,
            accept_wait_ns: None,
            start_ns,
            first_response_ns: Some(start_ns + 1),
            first_read_ns: Some(start_ns + 1),
            arrival_timed: true,
            last_response_ns: Some(start_ns + 2),
            request_bytes: 1,
            response_bytes: 1,
            response_chunks: 1,
            method: None,
            path: None,
            status: None,
            end: crate::connections::ExchangeEnd::Closed,
            start_tid: 2,
            request_id: None,
            attribution: None,
            inbound_exchange: None,
        }
    }

    fn started(id: u64, tid: u32, ts_ns: u64) -> Progress {
        Progress::Started {
            id,
            pid: 1,
            tid,
            fd: id as i32,
            ts_ns,
        }
    }

    fn read(exchange: u64, tid: u32, ts_ns: u64) -> Progress {
        Progress::Read {
            exchange: Some(exchange),
            pid: 1,
            tid,
            ts_ns,
        }
    }

    /// Work stealing breaks one adjacency: exchange 100 is written on the thread where
    /// request 2 began last, but its response read wakes request 1. One vote each: the
    /// fresher (the read's) wins, and the request reports network TTFB, broker wait and
    /// their difference.
    #[test]
    fn upstream_exchanges_go_to_the_request_most_adjacent_to_their_io() {
        let mut asm = Assembler::new(10);
        for event in [
            on_thread(begin(0, 1), 1),
            on_thread(begin(1, 2), 1),
            on_thread(stage(10, 1, true, UPSTREAM), 1),
            on_thread(stage(11, 2, true, UPSTREAM), 1),
        ] {
            assert!(asm.on_event(event).is_none());
        }
        asm.on_progress(started(100, 1, 20)); // votes for request 2 (wrongly)
        asm.on_progress(started(200, 2, 21)); // no marker on thread 2: no vote
        asm.on_progress(Progress::Responded {
            id: 100,
            ts_ns: 45,
            status: Some(200),
        });
        asm.on_progress(read(100, 2, 50));
        asm.on_event(on_thread(ev(51, 1, What::FirstByte), 2));
        asm.on_progress(read(100, 2, 55));
        asm.on_event(on_thread(ev(56, 1, What::Chunk), 2));
        asm.on_progress(read(200, 1, 60));
        asm.on_event(on_thread(ev(61, 2, What::FirstByte), 1));
        asm.on_event(on_thread(stage(80, 1, false, UPSTREAM), 2));
        let one = asm
            .on_event(on_thread(end(90, 1), 2))
            .expect("request 1 ends");
        assert_eq!(one.upstream_calls.len(), 1);
        let call = &one.upstream_calls[0];
        assert_eq!(
            (call.exchange_id, call.attribution),
            (100, Some(Attribution::Adjacent))
        );
        assert_eq!(call.network_ttfb_ns(), Some(25));
        assert_eq!(call.broker_wait_ns(), Some(41));
        assert_eq!(call.lag_ns(), Some(16));

        let two = asm
            .on_event(on_thread(end(95, 2), 1))
            .expect("request 2 ends");
        assert_eq!(two.upstream_calls[0].exchange_id, 200);
        // The exchanges, when they end, name their requests.
        for id in [100, 200] {
            asm.on_progress(Progress::Finished(Box::new(exchange(id, 20))));
        }
        let reported: Vec<(u64, Option<u64>)> = asm
            .take_exchanges()
            .iter()
            .map(|e| (e.id, e.request_id))
            .collect();
        assert_eq!(reported, [(100, Some(1)), (200, Some(2))]);
        assert_eq!(asm.stats().attribution.adjacent, 2);
    }

    /// A connection closed right after its response: the exchange ends before the read's
    /// vote is cast, so it is held, and goes to its request when that ends.
    #[test]
    fn an_exchange_ending_before_its_votes_are_in_is_held() {
        let mut asm = Assembler::new(10);
        asm.on_event(on_thread(begin(0, 1), 1));
        asm.on_event(on_thread(stage(10, 1, true, UPSTREAM), 1));
        asm.on_event(on_thread(begin(11, 2), 1));
        asm.on_event(on_thread(stage(12, 2, true, UPSTREAM), 1));
        asm.on_progress(started(100, 2, 20)); // no marker on thread 2: no vote
        asm.on_progress(read(100, 2, 50));
        asm.on_progress(Progress::Finished(Box::new(exchange(100, 20))));
        assert!(asm.take_exchanges().is_empty(), "held for its votes");
        asm.on_event(on_thread(stage(51, 2, false, UPSTREAM), 2)); // request 2 wakes
        let two = asm.on_event(on_thread(end(52, 2), 2)).unwrap();
        assert_eq!(two.upstream_calls[0].exchange_id, 100);
        let reported = asm.take_exchanges();
        assert_eq!(reported[0].request_id, Some(2));
    }

    /// An exchange with no evidence does not take a stage whose own exchange may have
    /// started already.
    #[test]
    fn a_sole_candidate_is_not_one_if_its_stage_already_has_an_exchange_under_way() {
        let mut asm = Assembler::new(10);
        asm.on_event(begin(0, 1));
        asm.on_event(stage(10, 1, true, UPSTREAM));
        asm.on_progress(started(100, 9, 20)); // request 1's own, no vote
        asm.on_progress(started(200, 9, 30)); // a stray, no vote
        asm.on_progress(read(100, 9, 40));
        asm.on_event(on_thread(ev(41, 1, What::FirstByte), 9));
        let one = asm.on_event(end(90, 1)).unwrap();
        assert_eq!(one.upstream_calls[0].exchange_id, 100);
        asm.on_progress(Progress::Finished(Box::new(exchange(200, 30))));
        asm.finish();
        let stray = asm.take_exchanges();
        assert_eq!((stray[0].id, stray[0].request_id), (200, None));
    }

    /// Without adjacency evidence an exchange goes to the only request that could take
    /// it when it started; with several, or none, it is counted, not guessed.
    #[test]
    fn without_evidence_only_a_single_candidate_is_taken() {
        let mut asm = Assembler::new(10);
        asm.on_event(begin(0, 1));
        asm.on_event(stage(10, 1, true, UPSTREAM));
        asm.on_progress(started(100, 9, 20)); // thread 9 hit no marker
        let one = asm.on_event(on_thread(end(90, 1), 5)).unwrap();
        assert_eq!(
            one.upstream_calls[0].attribution,
            Some(Attribution::OnlyCandidate)
        );

        asm.on_event(begin(100, 2));
        asm.on_event(begin(101, 3));
        asm.on_event(stage(110, 2, true, UPSTREAM));
        asm.on_event(stage(111, 3, true, UPSTREAM));
        asm.on_progress(started(200, 9, 120)); // two candidates
        asm.on_progress(started(300, 9, 121));
        assert!(asm.on_event(end(130, 2)).unwrap().upstream_calls.is_empty());
        for id in [200, 300] {
            asm.on_progress(Progress::Finished(Box::new(exchange(id, 120))));
        }
        asm.finish();
        let reported = asm.take_exchanges();
        assert!(
            reported.iter().all(|e| e.request_id.is_none()),
            "{reported:?}"
        );
        let stats = asm.stats().attribution;
        assert_eq!((stats.only_candidate, stats.unattributed), (1, 2));
    }
}
