//! Stage 2: raw → validated. Checks everything that does not need the dependency graph and
//! collects every problem with its location; what needs the graph (cycles, ancestry of
//! references, the pivot rule) is `graph.rs`'s job.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde_json::Value;

use crate::diagnostic::{Code, Diagnostic, did_you_mean};
use crate::model::{
    Compensation, DEFAULT_TIMEOUT, FailurePolicy, InputField, InputType, ParamExpr, RetryPolicy,
    SagaDef, StepDef, StepId, StepKind,
};
use crate::raw::{RawDuration, RawRetry, RawSaga, RawStep};
use crate::template::{Reference, Template};
use crate::yaml::SpanIndex;

/// A reference found in a step's params, with where it was written (for graph-phase checks).
#[derive(Debug, Clone)]
pub struct RefSite {
    pub step: usize,
    pub path: String,
    pub reference: Reference,
}

/// The validated saga (when its shape allowed building one) and what graph checks need.
#[derive(Debug)]
pub struct Validated {
    pub saga: Option<SagaDef>,
    pub ref_sites: Vec<RefSite>,
    /// `true` when a step was dropped or is incomplete: graph checks would only add noise.
    pub steps_incomplete: bool,
    /// Per kept step (same order as `saga.steps`): where it was written.
    pub sites: Vec<StepSite>,
}

/// Where a validated step came from in the file.
#[derive(Debug, Clone)]
pub struct StepSite {
    /// Its index in the YAML `steps` list (`steps[raw_index]`).
    pub raw_index: usize,
    /// Each dependency's position in the YAML `depends_on` list.
    pub dep_positions: BTreeMap<String, usize>,
}

/// Stands in for an operation whose own error was reported (see `step_kind`).
fn placeholder() -> String {
    "<invalid>".to_owned()
}

pub fn validate(raw: RawSaga, spans: &SpanIndex, out: &mut Vec<Diagnostic>) -> Validated {
    let mut v = Validator {
        spans,
        out,
        ref_sites: Vec::new(),
        declared_inputs: raw
            .input
            .as_ref()
            .map(|i| i.keys().cloned().collect())
            .unwrap_or_default(),
    };
    v.saga(raw)
}

struct Validator<'a> {
    spans: &'a SpanIndex,
    out: &'a mut Vec<Diagnostic>,
    ref_sites: Vec<RefSite>,
    /// Every input name written in the file, valid or not: a reference to an input whose
    /// declaration has its own error is not reported a second time as undeclared.
    declared_inputs: BTreeSet<String>,
}

impl Validator<'_> {
    fn error(&mut self, code: Code, path: &str, message: impl Into<String>) -> &mut Diagnostic {
        let span = self.spans.value(path);
        self.out.push(Diagnostic::error(code, span, message));
        self.out.last_mut().expect("just pushed")
    }

    fn error_at_key(
        &mut self,
        code: Code,
        path: &str,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        let span = self.spans.key(path);
        self.out.push(Diagnostic::error(code, span, message));
        self.out.last_mut().expect("just pushed")
    }

    fn warning_at_key(
        &mut self,
        code: Code,
        path: &str,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        let span = self.spans.key(path);
        self.out.push(Diagnostic::warning(code, span, message));
        self.out.last_mut().expect("just pushed")
    }

    fn missing(&mut self, parent: &str, field: &str, what: &str, hint: &str) {
        let message = if parent.is_empty() {
            format!("the saga has no `{field}`")
        } else {
            format!("{what} has no `{field}`")
        };
        let d = Diagnostic::error(Code::MissingField, self.spans.key(parent), message)
            .with_label(format!("`{field}` missing here"))
            .with_hint(hint);
        self.out.push(d);
    }

    fn saga(&mut self, raw: RawSaga) -> Validated {
        let name = match raw.name {
            Some(n) => self.name(&n, "name", "saga name"),
            None => {
                self.missing(
                    "",
                    "name",
                    "",
                    "add `name: order-paid` (letters, digits, `-`, `_`)",
                );
                None
            }
        };
        let version = self.version(raw.version);
        let input = self.inputs(raw.input.unwrap_or_default());
        let defaults = raw.defaults.unwrap_or_default();
        let default_retry = self.retry(
            defaults.retry.as_ref(),
            None,
            RetryPolicy::DEFAULT_STEP,
            "defaults.retry",
        );
        let default_comp_retry = self.retry(
            defaults.compensation_retry.as_ref(),
            None,
            RetryPolicy::DEFAULT_COMPENSATION,
            "defaults.compensation_retry",
        );
        let default_timeout = match &defaults.timeout {
            Some(t) => self
                .duration(t, "defaults.timeout", false)
                .unwrap_or(DEFAULT_TIMEOUT),
            None => DEFAULT_TIMEOUT,
        };
        let sequence_key = self.sequence_key(raw.sequence_key.as_deref(), &input);
        let deadline = raw
            .deadline
            .as_ref()
            .and_then(|d| self.duration(d, "deadline", false));

        let raw_steps = match raw.steps {
            Some(s) if !s.is_empty() => s,
            Some(_) => {
                self.error(Code::EmptySaga, "steps", "the saga has no steps")
                    .with_label_mut("empty list")
                    .with_hint_mut("a saga needs at least one step; see `sagas/order.yaml`");
                Vec::new()
            }
            None => {
                self.missing("", "steps", "", "add `steps:` with at least one step");
                Vec::new()
            }
        };
        let step_count = raw_steps.len();
        let raw_ids: Vec<Option<String>> = raw_steps.iter().map(|s| s.id.clone()).collect();
        let ctx = StepDefaults {
            retry: default_retry,
            compensation_retry: default_comp_retry,
            timeout: default_timeout,
        };
        let mut steps = Vec::new();
        let mut first_seen: HashMap<String, usize> = HashMap::new();
        for (i, raw_step) in raw_steps.into_iter().enumerate() {
            if let Some(step) = self.step(i, raw_step, &ctx, &input) {
                if let Some(&first) = first_seen.get(step.id.as_str()) {
                    let first_span = self.spans.value(&format!("steps[{first}].id"));
                    self.error(
                        Code::DuplicateStep,
                        &format!("steps[{i}].id"),
                        format!("step id `{}` is used twice", step.id),
                    )
                    .with_note_mut(first_span, "first used here")
                    .with_label_mut("duplicate id")
                    .with_hint_mut("step ids must be unique within a saga; rename one of them");
                    continue;
                }
                first_seen.insert(step.id.0.clone(), steps.len());
                steps.push((i, step));
            }
        }
        let steps_incomplete = steps.len() != step_count;
        // Dependencies can only be checked once every id is known.
        let ids: BTreeSet<String> = steps.iter().map(|(_, s)| s.id.0.clone()).collect();
        // A dependency on a step that exists but has its own error is not "unknown".
        let written_ids: BTreeSet<String> = raw_ids.into_iter().flatten().collect();
        let mut unknown_deps = Vec::new();
        for (i, step) in &steps {
            let mut seen = BTreeSet::new();
            for (j, dep) in step.depends_on.iter().enumerate() {
                let path = self.dep_path(*i, j);
                if !written_ids.contains(dep.as_str()) {
                    let hint = match did_you_mean(dep.as_str(), ids.iter().map(String::as_str)) {
                        Some(c) => format!("did you mean `{c}`?"),
                        None => format!("the steps of this saga are: {}", join_ids(&ids)),
                    };
                    unknown_deps.push((path, dep.clone(), step.id.clone(), hint));
                } else if !seen.insert(dep.as_str()) {
                    self.warning_at_key(
                        Code::RedundantDependency,
                        &path,
                        format!(
                            "`{dep}` is listed twice in the dependencies of `{}`",
                            step.id
                        ),
                    )
                    .with_label_mut("listed again");
                }
            }
        }
        for (path, dep, step, hint) in &unknown_deps {
            self.error(
                Code::UnknownStep,
                path,
                format!("step `{step}` depends on `{dep}`, which is not a step of this saga"),
            )
            .with_label_mut("unknown step")
            .with_hint_mut(hint.clone());
        }
        // Drop unknown dependencies (reported above) so the graph can still be checked.
        let mut sites = Vec::new();
        let steps: Vec<StepDef> = steps
            .into_iter()
            .map(|(raw_index, mut s)| {
                let mut dep_positions = BTreeMap::new();
                for (j, d) in s.depends_on.iter().enumerate() {
                    dep_positions.entry(d.0.clone()).or_insert(j);
                }
                sites.push(StepSite {
                    raw_index,
                    dep_positions,
                });
                let mut seen = BTreeSet::new();
                s.depends_on
                    .retain(|d| ids.contains(d.as_str()) && seen.insert(d.clone()));
                s
            })
            .collect();

        let saga = match (name, version, sequence_key) {
            (Some(name), Some(version), Some(sequence_key)) => Some(SagaDef {
                name,
                version,
                description: raw.description,
                sequence_key,
                deadline,
                input,
                steps,
            }),
            _ => None,
        };
        Validated {
            saga,
            ref_sites: std::mem::take(&mut self.ref_sites),
            steps_incomplete,
            sites,
        }
    }

    fn dep_path(&self, step: usize, j: usize) -> String {
        dep_path(self.spans, step, j)
    }

    fn name(&mut self, value: &str, path: &str, what: &str) -> Option<String> {
        let ok = !value.is_empty()
            && value.len() <= 128
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if ok {
            Some(value.to_owned())
        } else if value.is_empty() {
            self.error(Code::InvalidName, path, format!("{what} is empty"))
                .with_label_mut("empty")
                .with_hint_mut("use 1 to 128 ASCII letters, digits, `-` or `_`");
            None
        } else {
            self.error(
                Code::InvalidName,
                path,
                format!("{what} `{value}` is not a valid name"),
            )
            .with_label_mut("invalid name")
            .with_hint_mut("use 1 to 128 ASCII letters, digits, `-` or `_` (it appears in queue names and references)");
            None
        }
    }

    fn version(&mut self, raw: Option<Value>) -> Option<u32> {
        let Some(v) = raw else {
            self.missing(
                "",
                "version",
                "",
                "add `version: 1`; raise it when the saga changes meaning",
            );
            return None;
        };
        match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n >= 1 => Some(n),
            _ => {
                self.error(Code::InvalidVersion, "version", format!("version {} is not a positive integer", plain(&v)))
                    .with_label_mut("not a positive integer")
                    .with_hint_mut("write `version: 1` (then 2, 3, …); running sagas stay pinned to the content hash they started with");
                None
            }
        }
    }

    fn inputs(
        &mut self,
        raw: BTreeMap<String, crate::raw::RawInput>,
    ) -> BTreeMap<String, InputField> {
        let mut out = BTreeMap::new();
        for (name, field) in raw {
            let path = format!("input.{name}");
            if self.name(&name, &path, "input field").is_none() {
                continue;
            }
            let Some(type_name) = field.r#type else {
                self.missing(
                    &path,
                    "type",
                    &format!("input field `{name}`"),
                    "add `type: string` (or integer, decimal, money, boolean)",
                );
                continue;
            };
            let Some(r#type) = InputType::parse(&type_name) else {
                let hint = match did_you_mean(&type_name, InputType::NAMES.iter().copied()) {
                    _ if matches!(type_name.as_str(), "float" | "double" | "number" | "f64") => {
                        "use `decimal` (or `money` for amounts): binary floats lose cents"
                            .to_owned()
                    }
                    Some(c) => format!("did you mean `{c}`?"),
                    None => format!("the types are: {}", InputType::NAMES.join(", ")),
                };
                let type_path = if self.spans.get(&format!("{path}.type")).is_some() {
                    format!("{path}.type")
                } else {
                    path.clone()
                };
                self.error(
                    Code::InvalidInputType,
                    &type_path,
                    format!("input field `{name}` has unknown type `{type_name}`"),
                )
                .with_label_mut("unknown type")
                .with_hint_mut(hint);
                continue;
            };
            out.insert(
                name,
                InputField {
                    r#type,
                    required: field.required.unwrap_or(true),
                    description: field.description,
                },
            );
        }
        out
    }

    fn sequence_key(
        &mut self,
        raw: Option<&str>,
        input: &BTreeMap<String, InputField>,
    ) -> Option<Template> {
        let Some(text) = raw else {
            self.missing("", "sequence_key", "", "add `sequence_key: ${input.order_id}`: sagas with the same key run one after another");
            return None;
        };
        let template = self.template(text, "sequence_key")?;
        if text.trim().is_empty() {
            self.error(
                Code::InvalidSequenceKey,
                "sequence_key",
                "the sequence key is empty",
            )
            .with_label_mut("empty")
            .with_hint_mut("key it by the order: `sequence_key: ${input.order_id}`");
            return None;
        }
        let mut ok = true;
        for r in template.references() {
            match r {
                Reference::Input { name } => match input.get(name) {
                    None => {
                        ok = false;
                        if !self.declared_inputs.contains(name) {
                            self.undeclared_input(name, "sequence_key", input);
                        }
                    }
                    Some(f) if !f.required => {
                        ok = false;
                        self.error(Code::InvalidSequenceKey, "sequence_key", format!("the sequence key uses `{name}`, which is an optional input"))
                            .with_label_mut("optional input")
                            .with_hint_mut(format!("a saga started without `{name}` would have no key; make it `required: true`"));
                    }
                    Some(_) => {}
                },
                Reference::StepOutput { .. } => {
                    ok = false;
                    self.error(
                        Code::InvalidSequenceKey,
                        "sequence_key",
                        "the sequence key refers to a step's output",
                    )
                    .with_label_mut("not known at start")
                    .with_hint_mut(
                        "the key decides when the saga may start, so it can only use the input",
                    );
                }
            }
        }
        ok.then_some(template)
    }

    fn undeclared_input(&mut self, name: &str, path: &str, input: &BTreeMap<String, InputField>) {
        let hint = match did_you_mean(name, input.keys().map(String::as_str)) {
            Some(c) => format!("did you mean `{c}`?"),
            None if input.is_empty() => format!("declare it under `input:`, e.g. `{name}: string`"),
            None => format!(
                "declare it under `input:`; declared inputs are: {}",
                input.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        };
        self.error(
            Code::UndeclaredInput,
            path,
            format!("`${{input.{name}}}` refers to an input that is not declared"),
        )
        .with_label_mut("undeclared input")
        .with_hint_mut(hint);
    }

    fn template(&mut self, text: &str, path: &str) -> Option<Template> {
        match Template::parse(text) {
            Ok(t) => Some(t),
            Err(e) => {
                let mut span = self.spans.value(path);
                // Point inside the string when it sits on one line (quotes shift it by one).
                // Both lengths in bytes: the source span's and the value's.
                let src_len = span.len;
                let quoted = src_len == text.len() + 2;
                if src_len >= text.len() {
                    let shift = e.column + usize::from(quoted);
                    span.column += shift;
                    span.offset += text
                        .chars()
                        .take(e.column)
                        .map(char::len_utf8)
                        .sum::<usize>()
                        + usize::from(quoted);
                    span.len = 2;
                }
                self.out.push(
                    Diagnostic::error(Code::InvalidTemplate, span, e.message)
                        .with_label("cannot read this reference")
                        .with_hint(e.hint),
                );
                None
            }
        }
    }

    fn duration(&mut self, raw: &RawDuration, path: &str, allow_zero: bool) -> Option<Duration> {
        let result = match raw {
            RawDuration::Number(n) => Err(format!("`{n}` has no unit")),
            RawDuration::Text(t) if t.trim_start().starts_with('-') => {
                Err(format!("`{t}`: durations cannot be negative"))
            }
            RawDuration::Text(t) => humantime::parse_duration(t.trim())
                .map_err(|e| format!("`{t}` is not a duration ({e})")),
        };
        match result {
            Ok(d) if d.is_zero() && !allow_zero => {
                self.error(
                    Code::InvalidDuration,
                    path,
                    "a zero duration is not allowed here",
                )
                .with_label_mut("zero")
                .with_hint_mut("give it a positive length such as `5s`");
                None
            }
            Ok(d) => Some(d),
            Err(message) => {
                self.error(Code::InvalidDuration, path, message)
                    .with_label_mut("not a duration")
                    .with_hint_mut("write a number with a unit: `500ms`, `5s`, `2m`, `1h 30m`");
                None
            }
        }
    }

    /// Field-wise: the step's own setting, else the saga default, else the built-in default.
    fn retry(
        &mut self,
        raw: Option<&RawRetry>,
        base: Option<&RetryPolicy>,
        builtin: RetryPolicy,
        path: &str,
    ) -> RetryPolicy {
        let mut p = *base.unwrap_or(&builtin);
        let Some(raw) = raw else { return p };
        if let Some(n) = raw.max_attempts {
            match u32::try_from(n) {
                Ok(n) if n >= 1 => p.max_attempts = n,
                _ => {
                    let why = if n < 1 {
                        "must be at least 1"
                    } else {
                        "is too large (the limit is 4294967295)"
                    };
                    self.error(
                        Code::InvalidRetry,
                        &format!("{path}.max_attempts"),
                        format!("`max_attempts: {n}` {why}"),
                    )
                    .with_label_mut("must be ≥ 1")
                    .with_hint_mut(
                        "it counts the first attempt too: `max_attempts: 1` means no retry",
                    );
                }
            }
        }
        if let Some(d) = &raw.initial_backoff
            && let Some(d) = self.duration(d, &format!("{path}.initial_backoff"), true)
        {
            p.initial_backoff = d;
        }
        if let Some(d) = &raw.max_backoff
            && let Some(d) = self.duration(d, &format!("{path}.max_backoff"), true)
        {
            p.max_backoff = d;
        }
        if let Some(m) = raw.multiplier {
            if m.is_finite() && m >= 1.0 {
                p.multiplier = m;
            } else {
                self.error(
                    Code::InvalidRetry,
                    &format!("{path}.multiplier"),
                    format!("`multiplier: {m}` must be a finite number of at least 1.0"),
                )
                .with_label_mut("must be ≥ 1.0")
                .with_hint_mut(
                    "each wait is the previous one times the multiplier; 2.0 doubles it",
                );
            }
        }
        if let Some(j) = raw.jitter {
            if (0.0..=1.0).contains(&j) {
                p.jitter = j;
            } else {
                self.error(
                    Code::InvalidRetry,
                    &format!("{path}.jitter"),
                    format!("`jitter: {j}` must be between 0.0 and 1.0"),
                )
                .with_label_mut("out of range")
                .with_hint_mut("jitter is the fraction of each wait that is randomised, e.g. 0.2");
            }
        }
        if p.max_backoff < p.initial_backoff {
            let at = if raw.max_backoff.is_some() {
                format!("{path}.max_backoff")
            } else {
                format!("{path}.initial_backoff")
            };
            self.error(
                Code::InvalidRetry,
                &at,
                format!(
                    "max_backoff ({}) is shorter than initial_backoff ({})",
                    humantime::format_duration(p.max_backoff),
                    humantime::format_duration(p.initial_backoff)
                ),
            )
            .with_label_mut("cap below the first wait")
            .with_hint_mut("raise `max_backoff` or lower `initial_backoff`");
        }
        p
    }

    fn step(
        &mut self,
        i: usize,
        raw: RawStep,
        ctx: &StepDefaults,
        input: &BTreeMap<String, InputField>,
    ) -> Option<StepDef> {
        let path = format!("steps[{i}]");
        let what = format!("step {}", self.spans.step_name(&path));
        let id = match &raw.id {
            Some(id) => self.name(id, &format!("{path}.id"), "step id"),
            None => {
                self.missing(
                    &path,
                    "id",
                    &what,
                    "give every step an `id:`; other steps and references use it",
                );
                None
            }
        };
        let service = match &raw.service {
            Some(s) => self.name(s, &format!("{path}.service"), "service"),
            None => {
                self.missing(
                    &path,
                    "service",
                    &what,
                    "name the worker that runs it, e.g. `service: payment`",
                );
                None
            }
        };
        let kind = self.step_kind(&path, &what, &raw);
        let on_failure = match raw.on_failure.as_deref() {
            None => FailurePolicy::Compensate,
            Some(s) => match FailurePolicy::parse(s) {
                Some(p) => p,
                None => {
                    let hint = match did_you_mean(s, FailurePolicy::NAMES.iter().copied()) {
                        Some(c) => format!("did you mean `{c}`?"),
                        None => "use `compensate` (default: undo the saga), `continue` (optional step) or `retry` (retry until it succeeds)".into(),
                    };
                    self.error(
                        Code::InvalidFailurePolicy,
                        &format!("{path}.on_failure"),
                        format!("`on_failure: {s}` is not a failure policy"),
                    )
                    .with_label_mut("unknown policy")
                    .with_hint_mut(hint);
                    FailurePolicy::Compensate
                }
            },
        };
        let retry = self.retry(
            raw.retry.as_ref(),
            Some(&ctx.retry),
            RetryPolicy::DEFAULT_STEP,
            &format!("{path}.retry"),
        );
        if on_failure == FailurePolicy::Retry
            && raw.retry.as_ref().is_some_and(|r| r.max_attempts.is_some())
        {
            self.warning_at_key(Code::IgnoredSetting, &format!("{path}.retry.max_attempts"), format!("`max_attempts` has no effect: {what} has `on_failure: retry` and retries until it succeeds"))
                .with_label_mut("ignored")
                .with_hint_mut("remove `max_attempts`, or use `on_failure: compensate` to give up after it");
        }
        let compensation_retry = self.retry(
            raw.compensation_retry.as_ref(),
            Some(&ctx.compensation_retry),
            RetryPolicy::DEFAULT_COMPENSATION,
            &format!("{path}.compensation_retry"),
        );
        let timeout = match &raw.timeout {
            Some(t) => self
                .duration(t, &format!("{path}.timeout"), false)
                .unwrap_or(ctx.timeout),
            None => ctx.timeout,
        };
        let outputs = match raw.outputs {
            None => None,
            Some(list) => {
                let mut set = BTreeSet::new();
                for (j, o) in list.iter().enumerate() {
                    if let Some(o) = self.name(o, &format!("{path}.outputs[{j}]"), "output field") {
                        set.insert(o);
                    }
                }
                Some(set)
            }
        };
        let mut params = BTreeMap::new();
        for (key, value) in raw.params.unwrap_or_default() {
            let p = format!("{path}.params.{key}");
            if let Some(expr) = self.param(i, &p, value, input) {
                params.insert(key, expr);
            }
        }
        let depends_on = raw.depends_on.map(|d| d.items).unwrap_or_default();
        Some(StepDef {
            id: StepId(id?),
            service: service?,
            description: raw.description,
            kind: kind?,
            depends_on: depends_on.into_iter().map(StepId).collect(),
            params,
            outputs,
            retry,
            compensation_retry,
            timeout,
            on_failure,
        })
    }

    fn step_kind(&mut self, path: &str, what: &str, raw: &RawStep) -> Option<StepKind> {
        let op = |v: &mut Self, field: &str, value: &Option<String>| -> Option<String> {
            let value = value.as_ref()?;
            v.name(
                value,
                &format!("{path}.{field}"),
                &format!("`{field}` operation"),
            )
        };
        match (&raw.action, &raw.r#try) {
            (Some(_), Some(_)) => {
                self.error_at_key(Code::StepKind, &format!("{path}.try"), format!("{what} has both `action` (saga step) and `try` (TCC step)"))
                    .with_label_mut("second kind")
                    .with_hint_mut("a step is either a saga step (`action` + `compensation`) or a TCC step (`try` + `confirm` + `cancel`)");
                None
            }
            (None, None) => {
                self.error_at_key(Code::StepKind, path, format!("{what} has neither `action` nor `try`"))
                    .with_label_mut("what does this step do?")
                    .with_hint_mut("add `action:` and `compensation:` for a saga step, or `try:`, `confirm:` and `cancel:` for a TCC step");
                None
            }
            (Some(_), None) => {
                for field in ["confirm", "cancel"] {
                    let present = if field == "confirm" {
                        raw.confirm.is_some()
                    } else {
                        raw.cancel.is_some()
                    };
                    if present {
                        self.error_at_key(Code::StepKind, &format!("{path}.{field}"), format!("`{field}` belongs to TCC steps, but {what} is a saga step (it has `action`)"))
                            .with_label_mut("TCC field on a saga step")
                            .with_hint_mut("use `compensation:` to undo an action, or turn the step into TCC with `try:`");
                    }
                }
                let action = op(self, "action", &raw.action);
                // `None`, `NONE`: YAML users write it every way; an operation cannot be called that.
                let compensation = match raw.compensation.as_deref().map(|c| {
                    if c.eq_ignore_ascii_case("none") {
                        "none"
                    } else {
                        c
                    }
                }) {
                    None => {
                        self.error_at_key(Code::MissingCompensation, &format!("{path}.action"), format!("{what} has an action but no compensation"))
                            .with_label_mut("how is this undone?")
                            .with_hint_mut("add `compensation: <operation>`; if it truly cannot be undone, write `compensation: none` with an `irreversible_reason:`");
                        None
                    }
                    Some("none") => match &raw.irreversible_reason {
                        Some(r) if !r.trim().is_empty() => {
                            Some(Compensation::None { reason: r.clone() })
                        }
                        _ => {
                            self.error(Code::MissingReason, &format!("{path}.compensation"), format!("{what} is declared irreversible without a reason"))
                                .with_label_mut("why can it not be undone?")
                                .with_hint_mut("add `irreversible_reason: \"…\"`; an irreversible step is a pivot: everything that may run after it must be `on_failure: retry` or `continue`");
                            None
                        }
                    },
                    Some(_) => {
                        if raw.irreversible_reason.is_some() {
                            self.warning_at_key(Code::IgnoredSetting, &format!("{path}.irreversible_reason"), format!("{what} has a compensation, so `irreversible_reason` has no effect"))
                                .with_label_mut("ignored")
                                .with_hint_mut("remove it, or write `compensation: none` if the step cannot be undone");
                        }
                        op(self, "compensation", &raw.compensation).map(Compensation::Operation)
                    }
                };
                // An operation with its own error (reported above) is replaced by a placeholder,
                // so that the step stays in the graph and its cycles, pivots and data flow are
                // checked too: every error of the file at once. The placeholder never leaves the
                // compiler, since a definition with errors does not compile.
                Some(StepKind::Saga {
                    action: action.unwrap_or_else(placeholder),
                    compensation: compensation
                        .unwrap_or_else(|| Compensation::Operation(placeholder())),
                })
            }
            (None, Some(_)) => {
                if raw.compensation.is_some() {
                    self.error_at_key(Code::StepKind, &format!("{path}.compensation"), format!("`compensation` belongs to saga steps, but {what} is a TCC step (it has `try`)"))
                        .with_label_mut("saga field on a TCC step")
                        .with_hint_mut("a TCC step is undone by its `cancel`");
                }
                for (field, value) in [("confirm", &raw.confirm), ("cancel", &raw.cancel)] {
                    if value.is_none() {
                        let verb = if field == "confirm" {
                            "make the reservation final"
                        } else {
                            "release the reservation"
                        };
                        self.error_at_key(
                            Code::IncompleteTcc,
                            &format!("{path}.try"),
                            format!("TCC {what} has no `{field}`"),
                        )
                        .with_label_mut(format!("`{field}` missing"))
                        .with_hint_mut(format!("add `{field}: <operation>` to {verb}"));
                    }
                }
                // As for saga steps: placeholders for what was reported missing or invalid.
                Some(StepKind::Tcc {
                    r#try: op(self, "try", &raw.r#try).unwrap_or_else(placeholder),
                    confirm: op(self, "confirm", &raw.confirm).unwrap_or_else(placeholder),
                    cancel: op(self, "cancel", &raw.cancel).unwrap_or_else(placeholder),
                })
            }
        }
    }

    /// Strings become templates (checked for undeclared inputs now, for step references in the
    /// graph phase); lists and maps recurse (as deep as serde_yaml's recursion limit allows).
    fn param(
        &mut self,
        step: usize,
        path: &str,
        value: Value,
        input: &BTreeMap<String, InputField>,
    ) -> Option<ParamExpr> {
        Some(match value {
            Value::String(s) => {
                let t = self.template(&s, path)?;
                if t.is_literal() {
                    ParamExpr::Literal(Value::String(s))
                } else {
                    for r in t.references() {
                        match r {
                            Reference::Input { name } if !self.declared_inputs.contains(name) => {
                                self.undeclared_input(name, path, input)
                            }
                            Reference::Input { .. } => {}
                            Reference::StepOutput { .. } => self.ref_sites.push(RefSite {
                                step,
                                path: path.to_owned(),
                                reference: r.clone(),
                            }),
                        }
                    }
                    ParamExpr::Template(t)
                }
            }
            Value::Array(items) => ParamExpr::List(
                items
                    .into_iter()
                    .enumerate()
                    .filter_map(|(j, v)| self.param(step, &format!("{path}[{j}]"), v, input))
                    .collect(),
            ),
            Value::Object(map) => ParamExpr::Map(
                map.into_iter()
                    .filter_map(|(k, v)| {
                        let p = format!("{path}.{k}");
                        self.param(step, &p, v, input).map(|e| (k, e))
                    })
                    .collect(),
            ),
            other => ParamExpr::Literal(other),
        })
    }
}

/// The path of the `j`th `depends_on` entry of `steps[step]` (the value itself when written as a
/// single string).
pub fn dep_path(spans: &SpanIndex, step: usize, j: usize) -> String {
    let list = format!("steps[{step}].depends_on");
    let item = format!("{list}[{j}]");
    if spans.get(&item).is_some() {
        item
    } else {
        list
    }
}

struct StepDefaults {
    retry: RetryPolicy,
    compensation_retry: RetryPolicy,
    timeout: Duration,
}

/// A JSON value as a person wrote it: strings without their quotes.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => format!("`{s}`"),
        other => format!("`{other}`"),
    }
}

fn join_ids(ids: &BTreeSet<String>) -> String {
    ids.iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builder-style setters on `&mut Diagnostic`, so a diagnostic can be pushed then decorated.
trait DecorateMut {
    fn with_label_mut(&mut self, label: impl Into<String>) -> &mut Self;
    fn with_hint_mut(&mut self, hint: impl Into<String>) -> &mut Self;
    fn with_note_mut(
        &mut self,
        span: crate::diagnostic::Span,
        message: impl Into<String>,
    ) -> &mut Self;
}

impl DecorateMut for Diagnostic {
    fn with_label_mut(&mut self, label: impl Into<String>) -> &mut Self {
        self.label = label.into();
        self
    }
    fn with_hint_mut(&mut self, hint: impl Into<String>) -> &mut Self {
        self.hint = Some(hint.into());
        self
    }
    fn with_note_mut(
        &mut self,
        span: crate::diagnostic::Span,
        message: impl Into<String>,
    ) -> &mut Self {
        self.notes.push(crate::diagnostic::Note {
            span,
            message: message.into(),
        });
        self
    }
}
