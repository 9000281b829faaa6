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
//! A caller's W3C `tracestate` (vendors' entries) travels beside it, as W3C Trace Context
//! asks: kept in the saga's state next to its context, carried by each command and reply as
//! their second field when there is one (the AMQP transport sets the `tracestate` header from
//! it, see [`tracestate_in`]), and given back to OpenTelemetry with the parent context, so the
//! spans' own contexts carry it on. sagaflow adds no entry of its own. Without one nothing
//! changes: the field is left out of the JSON.
//!
//! Spans are only made when [`enabled`] (an OpenTelemetry layer is installed, see
//! `sagaflow`'s `telemetry` module): otherwise the hot path pays one relaxed atomic load per
//! message, and a context that came with a saga is passed on unchanged. A missing or malformed
//! `traceparent` is ignored (the span gets a new root or its contextual parent), never fatal.

use std::borrow::Cow;
use std::str::FromStr as _;
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

/// The longest `tracestate` carried (W3C asks vendors to pass on at least 512 characters); a
/// longer one is dropped whole.
pub const MAX_TRACESTATE: usize = 512;

/// Parses a W3C `tracestate`; None if it is empty, longer than [`MAX_TRACESTATE`], not
/// printable ASCII, or not a list of `key=value` members with valid keys and values (a list of
/// more than 32 members keeps the first 32).
pub fn parse_state(tracestate: &str) -> Option<TraceState> {
    let tracestate = tracestate.trim_matches([' ', '\t']);
    if tracestate.is_empty()
        || tracestate.len() > MAX_TRACESTATE
        || !tracestate
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) || b == b'\t')
    {
        return None;
    }
    let state = TraceState::from_str(tracestate).ok()?;
    (state != TraceState::NONE).then_some(state)
}

/// The `tracestate` of a span context; None if it has no entries.
pub fn format_state(sc: &SpanContext) -> Option<String> {
    let header = sc.trace_state().header();
    (!header.is_empty()).then_some(header)
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
    carried_of(span).traceparent
}

/// What a span's context carries on: its `traceparent` and its `tracestate` (the one its
/// parent came with). Empty without an OpenTelemetry layer.
pub fn carried_of(span: &tracing::Span) -> Carried {
    if span.is_disabled() {
        return Carried::default();
    }
    let context = span.context();
    let otel = context.span();
    let sc = otel.span_context();
    let traceparent = format(sc);
    let tracestate = traceparent.as_ref().and_then(|_| format_state(sc));
    Carried {
        traceparent,
        tracestate,
    }
}

/// A W3C trace context as sagaflow carries it: a `traceparent` and, beside it, the
/// `tracestate` it came with (never one without the other's context: a `tracestate` without a
/// valid `traceparent` means nothing and is dropped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carried {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// Makes `span` a child of `traceparent` (with `tracestate`, if it is a valid one) when that
/// is a valid context; otherwise leaves its contextual parent (or a new root). Call before the
/// span is entered.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    if let Some(sc) = traceparent.and_then(parse) {
        let sc = match tracestate.and_then(parse_state) {
            Some(state) => {
                SpanContext::new(sc.trace_id(), sc.span_id(), sc.trace_flags(), true, state)
            }
            None => sc,
        };
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

/// A context and its `tracestate` that came in, passed on when no spans are made: the
/// `traceparent` as [`pass_on`], the `tracestate` only beside a valid one and only if it is
/// valid itself ([`parse_state`]; passed on in its normal form, without optional blanks).
pub fn pass_on_carried(traceparent: Option<&str>, tracestate: Option<&str>) -> Carried {
    let traceparent = pass_on(traceparent);
    let tracestate = traceparent
        .as_ref()
        .and(tracestate)
        .and_then(parse_state)
        .map(|s| s.header());
    Carried {
        traceparent,
        tracestate,
    }
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

/// The `tracestate` a JSON payload of a command or reply carries, if any: its second field,
/// right after the `traceparent` [`traceparent_in`] finds, so this too is a prefix check. The
/// text as it was sent (a JSON escape, for a `"` or `\` the W3C grammar allows, is undone);
/// None if it is not printable ASCII of at most [`MAX_TRACESTATE`] bytes with a `key=value`.
pub fn tracestate_in(payload: &[u8]) -> Option<Cow<'_, str>> {
    const FIELD: &[u8] = br#"","tracestate":""#;
    let tp = traceparent_in(payload)?;
    let rest = payload.get(br#"{"traceparent":""#.len() + tp.len()..)?;
    let rest = rest.strip_prefix(FIELD)?;
    // Escaped, a `tracestate` is at most twice as long as its limit.
    let mut end = None;
    let mut escaped = false;
    let mut i = 0;
    while i < rest.len().min(2 * MAX_TRACESTATE + 1) {
        match rest[i] {
            b'\\' => {
                escaped = true;
                i += 1;
            }
            b'"' => {
                end = Some(i);
                break;
            }
            _ => {}
        }
        i += 1;
    }
    let text = &rest[..end?];
    let state = if escaped {
        let quoted = [b"\"", text, b"\""].concat();
        Cow::Owned(serde_json::from_slice::<String>(&quoted).ok()?)
    } else {
        Cow::Borrowed(std::str::from_utf8(text).ok()?)
    };
    // Checked for shape only (it was checked whole when the saga started): no allocation on
    // the relay's path beyond an escape's.
    let plausible = !state.is_empty()
        && state.len() <= MAX_TRACESTATE
        && state.contains('=')
        && state
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) || b == b'\t');
    plausible.then_some(state)
}

/// The `start` span of a new saga: a child of `traceparent` (with its `tracestate`) if valid,
/// else of the current span (the HTTP request's), else a new root. Returns the context the
/// saga keeps.
pub fn start(
    traceparent: Option<&str>,
    tracestate: Option<&str>,
    saga_id: &str,
    saga: &str,
    key: &str,
) -> Carried {
    if !enabled() {
        return pass_on_carried(traceparent, tracestate);
    }
    let span = tracing::info_span!(target: TARGET, "start", saga_id, saga, key);
    set_parent(&span, traceparent, tracestate);
    let carried = carried_of(&span);
    if carried.traceparent.is_some() {
        carried
    } else {
        pass_on_carried(traceparent, tracestate)
    }
}

/// The `dispatch` span of a command written to the outbox, a child of the saga's context
/// (`traceparent` and `tracestate` as the saga keeps them); returns the context the command
/// carries.
pub fn dispatch(
    traceparent: Option<&str>,
    tracestate: Option<&str>,
    cmd: &crate::wire::CommandMsg,
) -> Carried {
    let kept = || Carried {
        traceparent: traceparent.map(str::to_owned),
        tracestate: tracestate.map(str::to_owned),
    };
    if !enabled() {
        return kept();
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
    set_parent(&span, traceparent, tracestate);
    let carried = carried_of(&span);
    if carried.traceparent.is_some() {
        carried
    } else {
        kept()
    }
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
    set_parent(&span, cmd.traceparent.as_deref(), cmd.tracestate.as_deref());
    span
}

/// The `reply` span of a worker's reply, a child of its `worker` span; returns the context
/// the reply carries (none when spans are off).
pub fn reply(worker: &tracing::Span, reply: &crate::wire::ReplyMsg, key: &str) -> Carried {
    if !enabled() || worker.is_disabled() {
        return Carried::default();
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
    carried_of(&span)
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
    set_parent(
        &span,
        reply.traceparent.as_deref(),
        reply.tracestate.as_deref(),
    );
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
        let carried = |tp: &str, ts: Option<&str>| Carried {
            traceparent: Some(tp.to_owned()),
            tracestate: ts.map(str::to_owned),
        };
        assert_eq!(start(Some(TP), None, "s", "order", "k"), carried(TP, None));
        assert_eq!(
            start(Some("junk"), None, "s", "order", "k"),
            Carried::default()
        );
        assert_eq!(start(None, None, "s", "order", "k"), Carried::default());
        let span = tracing::info_span!("x");
        set_parent(&span, Some("junk"), Some("a=1"));
        assert_eq!(context_of(&span), None);
        // A tracestate beside its context, in its normal form; never without a context.
        assert_eq!(
            start(
                Some(TP),
                Some(" congo=t61rcWkgMzE ,rojo=00f067aa0ba902b7"),
                "s",
                "o",
                "k"
            ),
            carried(TP, Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"))
        );
        assert_eq!(
            start(Some("junk"), Some("a=1"), "s", "o", "k"),
            Carried::default()
        );
        assert_eq!(
            start(Some(TP), Some("no equals"), "s", "o", "k"),
            carried(TP, None)
        );
        let cmd: crate::wire::CommandMsg = serde_json::from_str(
            r#"{"saga_id":"s","saga":"o","key":"k","step":0,"step_id":"p","service":"payment",
            "op":"action","operation":"charge","forward":"charge","attempt":1,"params":{}}"#,
        )
        .unwrap();
        assert_eq!(
            dispatch(Some(TP), Some("a=1"), &cmd),
            carried(TP, Some("a=1"))
        );
    }

    #[test]
    fn tracestates_are_checked() {
        for good in [
            "a=1",
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
            "k@v=x\"y\\z",
            "a=1, b=2",
        ] {
            assert!(parse_state(good).is_some(), "{good:?} refused");
        }
        let long = format!("a={}", "x".repeat(MAX_TRACESTATE));
        for bad in [
            "",
            " ",
            "novalue",
            "A=1",
            "a=1,b",
            "a=é",
            "a=\u{7f}",
            long.as_str(),
        ] {
            assert!(parse_state(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_tracestate_header_is_lifted_from_the_field_after_the_traceparent() {
        let with = format!(r#"{{"traceparent":"{TP}","tracestate":"a=1,b=2","saga_id":"s"}}"#);
        assert_eq!(tracestate_in(with.as_bytes()).as_deref(), Some("a=1,b=2"));
        // JSON escapes are undone: `"` and `\` are allowed in a tracestate value.
        let state = "k=x\"y\\z";
        let json = serde_json::to_string(state).unwrap();
        let escaped = format!(r#"{{"traceparent":"{TP}","tracestate":{json},"s":1}}"#);
        assert_eq!(tracestate_in(escaped.as_bytes()).as_deref(), Some(state));
        let without = format!(r#"{{"traceparent":"{TP}","saga_id":"s"}}"#);
        assert_eq!(tracestate_in(without.as_bytes()), None);
        assert_eq!(
            tracestate_in(br#"{"tracestate":"a=1","saga_id":"s"}"#),
            None
        );
        let bad = format!(r#"{{"traceparent":"{TP}","tracestate":"nonsense","s":1}}"#);
        assert_eq!(tracestate_in(bad.as_bytes()), None);
        let open = format!(r#"{{"traceparent":"{TP}","tracestate":"a=1"#);
        assert_eq!(tracestate_in(open.as_bytes()), None);
    }
}
