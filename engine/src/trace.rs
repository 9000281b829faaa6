//! Trace context across the broker: one saga is one trace, from `POST /sagas` to its final
//! state, through the outbox, RabbitMQ (bundles too) and the workers.
//!
//! The context travels as a W3C `traceparent` string (`00-<trace id>-<span id>-<flags>`):
//! * a saga's is captured when it starts (the `start` span, a child of the caller's context)
//!   and kept in its state, so every later command of it — written in an engine transaction
//!   and published later by the relay, maybe by another engine after a crash — carries it;
//! * each [`CommandMsg`](crate::wire::CommandMsg) carries its `dispatch` span's context, each
//!   [`ReplyMsg`](crate::wire::ReplyMsg) its `reply` span's, as the first field of the JSON
//!   payload (so every part of a bundle carries its own, and the AMQP transport lifts it into
//!   the `traceparent` header without parsing the payload, see [`traceparent_in`]).
//!
//! Spans are only made when [`enabled`] (an OpenTelemetry layer is installed, see
//! `sagaflow`'s `telemetry` module): otherwise the hot path pays one relaxed atomic load per
//! message, and a context that came with a saga is passed on unchanged. A missing or malformed
//! `traceparent` is ignored (the span gets a new root or its contextual parent), never fatal.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The tracing target of sagaflow's trace spans (what an OpenTelemetry layer filters on).
pub const TARGET: &str = "sagaflow::trace";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns span making on (an OpenTelemetry layer is installed) or off.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether sagaflow makes its trace spans.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Parses a W3C `traceparent`; None if it is missing a part, not lowercase hex of the right
/// lengths, version `ff`, or an all-zero id.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2) || version == "ff" || !hex(trace_id, 32) || !hex(span_id, 16) {
        return None;
    }
    if !hex(flags, 2) || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

/// The `traceparent` of a span context; None if it is not valid.
pub fn format(sc: &SpanContext) -> Option<String> {
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The `traceparent` of a tracing span (None without an OpenTelemetry layer).
pub fn context_of(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    format(span.context().span().span_context())
}

/// Makes `span` a child of `traceparent` when it is a valid one; otherwise leaves its
/// contextual parent (or a new root). Call before the span is entered.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    if let Some(sc) = traceparent.and_then(parse) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

/// A context that came in, passed on unchanged when no spans are made (a malformed one is
/// dropped here, so it is not carried on).
pub fn pass_on(traceparent: Option<&str>) -> Option<String> {
    traceparent
        .filter(|t| parse(t).is_some())
        .map(str::to_owned)
}

/// The `traceparent` a JSON payload of a command or reply starts with, if any: the field comes
/// first in both, so this is a prefix check, not a parse.
pub fn traceparent_in(payload: &[u8]) -> Option<&str> {
    const PREFIX: &[u8] = br#"{"traceparent":""#;
    let rest = payload.strip_prefix(PREFIX)?;
    let end = rest.iter().take(64).position(|&b| b == b'"')?;
    let tp = std::str::from_utf8(&rest[..end]).ok()?;
    parse(tp).is_some().then_some(tp)
}

/// The `start` span of a new saga: a child of `traceparent` if valid, else of the current span
/// (the HTTP request's), else a new root. Returns the context the saga keeps.
pub fn start(traceparent: Option<&str>, saga_id: &str, saga: &str, key: &str) -> Option<String> {
    if !enabled() {
        return pass_on(traceparent);
    }
    let span = tracing::info_span!(target: TARGET, "start", saga_id, saga, key);
    set_parent(&span, traceparent);
    context_of(&span).or_else(|| pass_on(traceparent))
}

/// The `dispatch` span of a command written to the outbox, a child of the saga's context;
/// returns the context the command carries.
pub fn dispatch(saga_trace: Option<&str>, cmd: &crate::wire::CommandMsg) -> Option<String> {
    if !enabled() {
        return saga_trace.map(str::to_owned);
    }
    let span = tracing::info_span!(
        target: TARGET,
        "dispatch",
        saga_id = %cmd.saga_id,
        saga = %cmd.saga,
        key = %cmd.key,
        step = cmd.step,
        step_id = %cmd.step_id,
        op = %cmd.op,
        operation = %cmd.operation,
        attempt = cmd.attempt,
        service = %cmd.service,
    );
    set_parent(&span, saga_trace);
    context_of(&span).or_else(|| saga_trace.map(str::to_owned))
}

/// The `worker` span of a command a worker runs, a child of the command's context (its
/// `dispatch` span); held while the command's batch runs. Disabled when spans are off.
pub fn worker(cmd: &crate::wire::CommandMsg, worker_service: &str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "worker",
        saga_id = %cmd.saga_id,
        saga = %cmd.saga,
        key = %cmd.key,
        step = cmd.step,
        step_id = %cmd.step_id,
        op = %cmd.op,
        operation = %cmd.operation,
        attempt = cmd.attempt,
        service = worker_service,
    );
    set_parent(&span, cmd.traceparent.as_deref());
    span
}

/// The `reply` span of a worker's reply, a child of its `worker` span; returns the context
/// the reply carries (None when spans are off).
pub fn reply(worker: &tracing::Span, reply: &crate::wire::ReplyMsg, key: &str) -> Option<String> {
    if !enabled() || worker.is_disabled() {
        return None;
    }
    let span = tracing::info_span!(
        target: TARGET,
        parent: worker,
        "reply",
        saga_id = %reply.saga_id,
        key,
        step = reply.step,
        op = %reply.op,
        attempt = reply.attempt,
        outcome = outcome_kind(&reply.outcome),
    );
    context_of(&span)
}

fn outcome_kind(outcome: &crate::machine::Outcome) -> &'static str {
    match outcome {
        crate::machine::Outcome::Ok { .. } => "ok",
        crate::machine::Outcome::Retryable { .. } => "retryable",
        crate::machine::Outcome::Business { .. } => "business",
    }
}

/// The `apply` span of a reply the engine applies, a child of the reply's context; held
/// while its batch is applied. Disabled when spans are off.
pub fn apply(reply: &crate::wire::ReplyMsg, key: &str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "apply",
        saga_id = %reply.saga_id,
        key,
        step = reply.step,
        op = %reply.op,
        attempt = reply.attempt,
        outcome = outcome_kind(&reply.outcome),
    );
    set_parent(&span, reply.traceparent.as_deref());
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_good_traceparent_round_trips() {
        let sc = parse(TP).expect("valid");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(format(&sc).as_deref(), Some(TP));
        // A later version may add fields after the flags.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_some());
    }

    #[test]
    fn bad_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "0é-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?} accepted");
            assert_eq!(pass_on(Some(bad)), None, "{bad:?} passed on");
        }
        assert_eq!(pass_on(None), None);
        assert_eq!(pass_on(Some(TP)).as_deref(), Some(TP));
    }

    #[test]
    fn the_header_is_lifted_from_the_payload_prefix_only() {
        let with = format!(r#"{{"traceparent":"{TP}","saga_id":"s"}}"#);
        assert_eq!(traceparent_in(with.as_bytes()), Some(TP));
        assert_eq!(traceparent_in(br#"{"saga_id":"s"}"#), None);
        assert_eq!(traceparent_in(br#"{"traceparent":"nonsense","a":1}"#), None);
        assert_eq!(traceparent_in(br#"{"traceparent":"00-unterminated"#), None);
        assert_eq!(traceparent_in(b"SFB1\0\0\0\x01"), None);
    }

    #[test]
    fn without_spans_a_context_is_passed_on_unchanged() {
        // No OpenTelemetry layer in unit tests: spans are off.
        assert!(!enabled());
        assert_eq!(start(Some(TP), "s", "order", "k").as_deref(), Some(TP));
        assert_eq!(start(Some("junk"), "s", "order", "k"), None);
        assert_eq!(start(None, "s", "order", "k"), None);
        let span = tracing::info_span!("x");
        set_parent(&span, Some("junk"));
        assert_eq!(context_of(&span), None);
    }
}
