//! Which requests become traces. A head sampler (the OTel SDK's, as configured by
//! `--trace-sampler` / OTEL_TRACES_SAMPLER) decides by trace id and the caller's sampled
//! flag; on top, a tail rule keeps every failed or slow request, which brokerprobe can
//! judge because it sees each request whole before exporting it.

use std::{collections::HashMap, time::Duration};

use opentelemetry::{
    Context,
    propagation::TextMapPropagator as _,
    trace::{SpanKind, TraceContextExt as _},
};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{IdGenerator, Sampler, SamplingDecision, ShouldSample as _},
};

use super::spans::{ROOT_NAME, TraceStart};
use crate::assembly::Request;

pub struct Sampling {
    pub head: Sampler,
    /// Keep every request that failed (status ≥ 400 or an error type).
    pub keep_errors: bool,
    /// Keep every request at least this slow.
    pub keep_slower_than: Option<Duration>,
    /// Keep every request with an instance of the stage (by name) at least this slow.
    pub keep_stages_slower_than: Vec<(String, Duration)>,
}

/// Why a request is exported, or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The head sampler chose it.
    Head,
    /// The head sampler did not, the tail rule did (it failed or was slow).
    Tail,
    Dropped,
}

impl Sampling {
    /// Where the request's trace hangs, and whether it is exported.
    pub fn decide(&self, request: &Request, ids: &dyn IdGenerator) -> (TraceStart, Verdict) {
        let parent = request
            .traceparent
            .as_deref()
            .map(caller_context)
            .filter(|cx| cx.span().span_context().is_valid());
        let start = TraceStart {
            trace_id: parent.as_ref().map_or_else(
                || ids.new_trace_id(),
                |cx| cx.span().span_context().trace_id(),
            ),
            remote_parent: parent.as_ref().map(|cx| cx.span().span_context().clone()),
        };
        let head = self.head.should_sample(
            parent.as_ref(),
            start.trace_id,
            ROOT_NAME,
            &SpanKind::Server,
            &[],
            &[],
        );
        let verdict = if head.decision == SamplingDecision::RecordAndSample {
            Verdict::Head
        } else if self.tail_keeps(request) {
            Verdict::Tail
        } else {
            Verdict::Dropped
        };
        (start, verdict)
    }

    fn tail_keeps(&self, request: &Request) -> bool {
        let failed = request.failed();
        let slow = self
            .keep_slower_than
            .is_some_and(|bound| request.duration_ns() >= bound.as_nanos() as u64);
        let slow_stage = request.stages.iter().any(|stage| {
            self.keep_stages_slower_than.iter().any(|(name, bound)| {
                stage.id.name() == name && stage.duration_ns() >= bound.as_nanos() as u64
            })
        });
        (self.keep_errors && failed) || slow || slow_stage
    }
}

/// The caller's context from a W3C `traceparent` (invalid ones yield an invalid span).
fn caller_context(traceparent: &str) -> Context {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::trace::RandomIdGenerator;
    use probe_common::marker::Stage;

    use super::*;
    use crate::{assembly::StageSpan, decode::StageId};

    const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn request(status: u16, traceparent: Option<&str>) -> Request {
        Request {
            status,
            traceparent: traceparent.map(str::to_owned),
            end_ns: 1_000_000,
            ..Request::default()
        }
    }

    fn sampling(head: Sampler) -> Sampling {
        Sampling {
            head,
            keep_errors: true,
            keep_slower_than: Some(Duration::from_secs(1)),
            keep_stages_slower_than: vec![("keypool.acquire".into(), Duration::from_millis(10))],
        }
    }

    #[test]
    fn a_caller_traceparent_is_continued() {
        let ids = RandomIdGenerator::default();
        let (start, verdict) =
            sampling(Sampler::AlwaysOn).decide(&request(200, Some(CALLER)), &ids);
        assert_eq!(
            start.trace_id,
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        let parent = start.remote_parent.unwrap();
        assert_eq!(
            parent.span_id(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert!(parent.is_remote());
        assert_eq!(verdict, Verdict::Head);
        // Garbage is a new trace, not an error.
        let (start, _) = sampling(Sampler::AlwaysOn).decide(&request(200, Some("00-xyz")), &ids);
        assert!(start.remote_parent.is_none());
    }

    #[test]
    fn parent_based_follows_the_callers_flag_and_the_tail_keeps_errors_and_slow_ones() {
        let ids = RandomIdGenerator::default();
        let not_sampled = CALLER.replace("-01", "-00");
        let parent_based = sampling(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)));
        let decide = |r: &Request| parent_based.decide(r, &ids).1;
        assert_eq!(decide(&request(200, Some(CALLER))), Verdict::Head);
        assert_eq!(decide(&request(200, Some(&not_sampled))), Verdict::Dropped);
        assert_eq!(decide(&request(502, Some(&not_sampled))), Verdict::Tail);
        let slow = Request {
            end_ns: 2_000_000_000,
            ..request(200, Some(&not_sampled))
        };
        assert_eq!(decide(&slow), Verdict::Tail);
        // A request quick as a whole, with one slow stage named in the tail rule.
        let stage = |stage, end_ns| StageSpan {
            id: StageId::Known(stage),
            begin_ns: 0,
            end_ns,
        };
        let waited = |waited_ns| Request {
            stages: vec![
                stage(Stage::Route, 50_000_000),
                stage(Stage::KeypoolAcquire, waited_ns),
            ],
            ..request(200, Some(&not_sampled))
        };
        assert_eq!(decide(&waited(20_000_000)), Verdict::Tail);
        assert_eq!(decide(&waited(5_000_000)), Verdict::Dropped);
    }

    #[test]
    fn ratio_keeps_about_its_share() {
        let ids = RandomIdGenerator::default();
        let ratio = sampling(Sampler::TraceIdRatioBased(0.1));
        let kept = (0..20_000)
            .filter(|_| ratio.decide(&request(200, None), &ids).1 == Verdict::Head)
            .count();
        assert!((1_600..=2_400).contains(&kept), "{kept} of 20000");
    }
}
