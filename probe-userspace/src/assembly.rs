//! Per-request assembly: marker events → one [`Request`] timeline per broker request.
//!
//! Requests are keyed by (process, request id) — never by thread, since async brokers move
//! a request between worker threads. Nothing is dropped silently: every event that cannot
//! be placed is counted in [`AssemblyStats`].

use std::collections::HashMap;

use crate::decode::{Event, StageId, What};

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
    pub fallbacks: Vec<(String, String)>,
    /// Every "first upstream byte" the broker saw (one per upstream call).
    pub first_byte_ns: Vec<u64>,
    pub chunks: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Stages begun but still open at request end (not in `stages`).
    pub unclosed_stages: u32,
}

impl Request {
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.begin_ns)
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
    /// Requests whose end never came within the timeout.
    pub expired: u64,
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
}

struct OpenRequest {
    request: Request,
    stages: Vec<OpenStage>,
}

pub struct Assembler {
    open: HashMap<(u32, u64), OpenRequest>,
    max_open: usize,
    stats: AssemblyStats,
    /// Only requests begun inside this window are tracked, and no event after its end is
    /// used: attaching and detaching probes one by one takes time, and a request that
    /// straddles either would be seen with some of its markers missing.
    window_start_ns: u64,
    window_end_ns: u64,
}

impl Assembler {
    /// `max_open` bounds memory whatever the broker does (e.g. never ending requests).
    pub fn new(max_open: usize) -> Self {
        Self {
            open: HashMap::new(),
            max_open,
            stats: AssemblyStats::default(),
            window_start_ns: 0,
            window_end_ns: u64::MAX,
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
        self.stats
    }

    pub fn in_flight(&self) -> usize {
        self.open.len()
    }

    /// Feeds one event; returns the request it completed, if any.
    pub fn on_event(&mut self, event: Event) -> Option<Request> {
        let key = (event.pid, event.request_id);
        if event.ts_ns > self.window_end_ns {
            self.stats.after_window += 1;
            return None;
        }
        if let What::RequestBegin { model, traceparent } = event.what {
            if event.ts_ns < self.window_start_ns {
                return None; // its end will count as untracked
            }
            if self.open.len() >= self.max_open && !self.open.contains_key(&key) {
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
            if self
                .open
                .insert(
                    key,
                    OpenRequest {
                        request,
                        stages: Vec::new(),
                    },
                )
                .is_some()
            {
                self.stats.duplicate_begins += 1;
            }
            return None;
        }
        let Some(open) = self.open.get_mut(&key) else {
            match event.what {
                What::RequestEnd { .. } => self.stats.partial += 1,
                _ => self.stats.orphan_events += 1,
            }
            return None;
        };
        let request = &mut open.request;
        match event.what {
            What::RequestBegin { .. } => unreachable!("handled above"),
            What::RequestEnd { status, error_type } => {
                request.status = status;
                request.error_type = error_type;
                request.end_ns = event.ts_ns;
                let open = self.open.remove(&key)?;
                return Some(self.close(open));
            }
            What::StageBegin(id) => {
                if open.stages.len() < MAX_STAGES_PER_REQUEST {
                    let stage = OpenStage {
                        id,
                        begin_ns: event.ts_ns,
                        end_ns: None,
                    };
                    open.stages.push(stage);
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
                    Some(stage) => stage.end_ns = Some(event.ts_ns),
                    None => self.stats.unmatched_stage_ends += 1,
                }
            }
            What::Provider(name) => request.provider = Some(name),
            What::FirstByte => {
                push_bounded(&mut request.first_byte_ns, event.ts_ns, &mut self.stats)
            }
            // Saturating: chunk and token counts come from the broker and its upstream.
            What::Chunk => request.chunks = request.chunks.saturating_add(1),
            What::TokenUsage { input, output } => {
                request.input_tokens = request.input_tokens.saturating_add(input);
                request.output_tokens = request.output_tokens.saturating_add(output);
            }
            What::Fallback { from, to } => {
                push_bounded(&mut request.fallbacks, (from, to), &mut self.stats)
            }
        }
        None
    }

    fn close(&mut self, open: OpenRequest) -> Request {
        let OpenRequest {
            mut request,
            stages,
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
        request
    }

    /// Forgets requests open since before `now_ns - timeout_ns`; returns how many.
    pub fn expire(&mut self, now_ns: u64, timeout_ns: u64) -> usize {
        let before = self.open.len();
        self.open
            .retain(|_, open| now_ns.saturating_sub(open.request.begin_ns) < timeout_ns);
        let expired = before - self.open.len();
        self.stats.expired += expired as u64;
        expired
    }
}

#[cfg(test)]
mod tests {
    use probe_common::marker::Stage;

    use super::*;

    fn ev(ts_ns: u64, request_id: u64, what: What) -> Event {
        Event {
            ts_ns,
            pid: 1,
            request_id,
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
}
