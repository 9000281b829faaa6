//! The read side: what `sagaflow status` and `sagaflow list` show, as typed values that
//! serialize to the JSON tools read.
//!
//! Reads only, through the store's [`SagaQueries`], from the tables the driver writes: `sagas`
//! (whose `state` column is the machine's whole state, the authority for steps),
//! `saga_definitions` (the definition each saga is pinned to, compiled here again to name and
//! draw its steps) and `saga_history` (the timeline). A definition that no longer compiles does
//! not hide a saga from an operator: its steps are then named from the stored source read as
//! plain YAML ([`sagaflow_dsl::yaml::step_ids`]) and the detail says what went wrong.

use std::collections::BTreeMap;
use std::sync::Arc;

use sagaflow_dsl::{SagaGraph, StepKind, compile};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::engine::EngineError;
use crate::machine::{Millis, Paused, SagaState, SagaStatus, StepStatus};
use crate::store::{SagaFilter, SagaQueries, Store, step_status_name};
pub use crate::store::{SagaSummary, TimelineRow};

/// At most this many timeline rows are loaded per saga (the newest); a step retried without
/// limit can write thousands.
pub const TIMELINE_LIMIT: usize = 1000;

/// One saga with its steps and timeline (what `GET /sagas/{id}` answers).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct SagaDetail {
    pub id: String,
    pub name: String,
    pub version: u32,
    pub definition_hash: String,
    /// `state` (queued, running, compensating, completed, compensated or failed) and,
    /// depending on it, `reason` and `compensating`.
    #[serde(flatten)]
    pub status: SagaStatus,
    /// Set while an operator has the saga paused: who, why, since when, what it holds back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<Paused>,
    pub sequence_key: String,
    /// Sagas of its order waiting for the sequence key this saga holds, next first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<String>,
    pub idempotency_key: Option<String>,
    #[serde(with = "crate::time::rfc3339")]
    #[cfg_attr(feature = "http", schema(value_type = String, format = DateTime))]
    pub created_at: Millis,
    #[serde(with = "crate::time::rfc3339")]
    #[cfg_attr(feature = "http", schema(value_type = String, format = DateTime))]
    pub updated_at: Millis,
    /// When it became final (`null` while it is not).
    #[serde(with = "crate::time::rfc3339_opt")]
    #[cfg_attr(feature = "http", schema(value_type = Option<String>, format = DateTime))]
    pub finished_at: Option<Millis>,
    /// The input it was started with.
    #[cfg_attr(feature = "http", schema(value_type = Object))]
    pub input: Value,
    /// Outputs of the steps that succeeded, by step id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[cfg_attr(feature = "http", schema(value_type = BTreeMap<String, Value>))]
    pub outputs: BTreeMap<String, Value>,
    pub steps: Vec<StepDetail>,
    pub timeline: Vec<TimelineRow>,
    /// Older timeline rows not loaded (at most the newest 1000 are).
    pub timeline_omitted: u64,
    /// Set when the stored definition no longer compiles to the same hash: steps are then
    /// named from the projection, and the saga cannot be drawn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub definition_problem: Option<String>,
    /// The compiled definition the saga is pinned to, for drawing it.
    #[serde(skip)]
    pub graph: Option<Arc<SagaGraph>>,
}

/// One step of a saga.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct StepDetail {
    pub index: usize,
    pub id: String,
    /// Null only when the definition no longer compiles.
    pub service: Option<String>,
    /// `saga` or `tcc` (null only when the definition no longer compiles).
    #[serde(default, deserialize_with = "step_kind")]
    #[cfg_attr(feature = "http", schema(value_type = Option<String>))]
    pub kind: Option<StaticStr>,
    /// For people: `succeeded`, `try: running`, `compensate: stuck`, …
    pub status: String,
    /// For tools: the machine's step state (`state`, and `op`, `attempt`, `error`, … as it has).
    #[serde(flatten)]
    pub state: StepStatus,
    /// Attempts of every operation on the step together.
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// Which sagas to list: newest first, `limit` at a time, continuing from a page's `next`.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// One of [`SagaStatus::NAMES`].
    pub state: Option<String>,
    pub sequence_key: Option<String>,
    /// The definition's name.
    pub saga: Option<String>,
    /// Created at or after this time (ms since the epoch).
    pub created_from: Option<i64>,
    /// Created before this time (ms since the epoch).
    pub created_before: Option<i64>,
    pub limit: u32,
    /// A previous page's [`Page::next`].
    pub after: Option<String>,
}

/// One page of `sagaflow list` (what `GET /sagas` answers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "http", schema(as = SagaPage))]
pub struct Page {
    pub sagas: Vec<SagaSummary>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<String>,
}

/// Spelled through an alias so that serde does not take `kind` for a string borrowed from the
/// input (which would tie [`SagaDetail`]'s `Deserialize` to `'static` input).
type StaticStr = &'static str;

/// [`StepDetail::kind`] read back from JSON (the HTTP API's clients).
fn step_kind<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'static str>, D::Error> {
    match Option::<String>::deserialize(d)?.as_deref() {
        None => Ok(None),
        Some("saga") => Ok(Some("saga")),
        Some("tcc") => Ok(Some("tcc")),
        Some(other) => Err(serde::de::Error::invalid_value(
            serde::de::Unexpected::Str(other),
            &"`saga` or `tcc`",
        )),
    }
}

/// The saga with this id, or `None`.
pub async fn saga(store: &Store, id: &str) -> Result<Option<SagaDetail>, EngineError> {
    let Some(record) = store.saga_record(id).await? else {
        return Ok(None);
    };
    let state = &record.state;
    let hash = record.definition_hash;
    let graph_of_source = record
        .definition_source
        .as_deref()
        .map(|s| graph_of(s, &hash));
    let (graph, definition_problem) = match graph_of_source {
        Some(Ok(g)) => (Some(Arc::new(g)), None),
        Some(Err(problem)) => (None, Some(problem)),
        None => (None, Some(format!("definition {hash} is not stored"))),
    };

    let steps = match &graph {
        Some(g) => steps_from_graph(g, state),
        None => {
            let mut names = record
                .definition_source
                .as_deref()
                .map(sagaflow_dsl::yaml::step_ids)
                .unwrap_or_default();
            names.resize(state.steps.len(), None);
            steps_from_names(names, state)
        }
    };

    let timeline = store.timeline(id, TIMELINE_LIMIT).await?;
    let waiting = store.waiting_behind(id).await?;
    Ok(Some(SagaDetail {
        id: record.id,
        name: record.name,
        version: record
            .definition_version
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0),
        definition_hash: hash,
        status: state.status.clone(),
        paused: state.paused.clone(),
        sequence_key: record.sequence_key,
        waiting,
        idempotency_key: record.idempotency_key,
        created_at: record.created_at,
        updated_at: record.updated_at,
        finished_at: record.finished_at,
        input: state.input.clone(),
        outputs: state.outputs.clone(),
        steps,
        timeline_omitted: timeline.total.saturating_sub(timeline.rows.len() as u64),
        timeline: timeline.rows,
        definition_problem,
        graph,
    }))
}

/// Compiles a stored definition and checks it is still the one the saga was pinned to (the
/// step indexes in the saga's state refer to it).
fn graph_of(source: &str, hash: &str) -> Result<SagaGraph, String> {
    let graph = compile(source).graph.ok_or_else(|| {
        format!("definition {hash} no longer validates with this version of sagaflow")
    })?;
    if graph.content_hash() != hash {
        return Err(format!(
            "definition {hash} now compiles to {}",
            graph.content_hash()
        ));
    }
    Ok(graph)
}

fn steps_from_graph(graph: &SagaGraph, state: &SagaState) -> Vec<StepDetail> {
    let mut steps = steps_from_names(
        graph.steps().iter().map(|s| Some(s.id.0.clone())).collect(),
        state,
    );
    for (detail, def) in steps.iter_mut().zip(graph.steps()) {
        detail.service = Some(def.service.clone());
        detail.kind = Some(match def.kind {
            StepKind::Saga { .. } => "saga",
            StepKind::Tcc { .. } => "tcc",
        });
    }
    steps
}

fn steps_from_names(names: Vec<Option<String>>, state: &SagaState) -> Vec<StepDetail> {
    state
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| StepDetail {
            index: i,
            id: names
                .get(i)
                .cloned()
                .flatten()
                .unwrap_or_else(|| format!("#{i}")),
            service: None,
            kind: None,
            status: step_status_name(s),
            state: s.clone(),
            attempts: state.attempts.get(i).copied().unwrap_or(0),
            last_error: state.last_errors.get(i).cloned().flatten(),
        })
        .collect()
}

/// What a drawing shows on a step (`held`: the saga's pause holds it back): `● succeeded (1 attempt)`,
/// `✗ failed: [injected] … (3 attempts)`, `… try running (attempt 2)`.
pub fn step_note(step: &StepDetail, held: bool) -> String {
    let attempts = match step.attempts {
        1 => "1 attempt".to_owned(),
        n => format!("{n} attempts"),
    };
    let mut notes: Vec<String> = Vec::new();
    let head = match &step.state {
        StepStatus::Pending => "· pending".to_owned(),
        StepStatus::Active {
            op,
            attempt,
            waiting,
        } => {
            notes.push(format!("attempt {attempt}"));
            if *waiting && held {
                format!("… {op} held by the pause")
            } else if *waiting {
                format!("… {op} waiting to retry")
            } else {
                format!("… {op} running")
            }
        }
        StepStatus::Succeeded => "● succeeded".to_owned(),
        StepStatus::Confirmed => "● confirmed".to_owned(),
        StepStatus::Failed { error, business } => {
            let effect = if *business {
                ""
            } else {
                " (may have taken effect)"
            };
            format!("✗ failed{effect}: {}", one_line(error))
        }
        StepStatus::Skipped => "○ skipped".to_owned(),
        StepStatus::Compensated => "↺ compensated".to_owned(),
        StepStatus::Stuck { op, error, .. } => format!("✗ {op} stuck: {}", one_line(error)),
    };
    if step.attempts > 0 && !matches!(step.state, StepStatus::Active { .. }) {
        notes.push(attempts);
    }
    // The last error, unless the state already says it.
    if let Some(e) = &step.last_error
        && !matches!(
            step.state,
            StepStatus::Failed { .. } | StepStatus::Stuck { .. }
        )
    {
        notes.push(format!("last error: {}", one_line(e)));
    }
    if notes.is_empty() {
        head
    } else {
        format!("{head} ({})", notes.join("; "))
    }
}

/// The fill colour of a step's state in a drawing.
pub fn step_fill(state: &StepStatus) -> &'static str {
    match state {
        StepStatus::Pending | StepStatus::Skipped => "#eeeeee",
        StepStatus::Active { .. } => "#fff3b0",
        StepStatus::Succeeded | StepStatus::Confirmed => "#c8f2c2",
        StepStatus::Compensated => "#cfe3ff",
        StepStatus::Failed { .. } => "#ffd6cc",
        StepStatus::Stuck { .. } => "#ff9f8f",
    }
}

/// How a saga's graph is drawn: plain text, Graphviz dot, Mermaid or SVG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "http", schema(rename_all = "lowercase"))]
pub enum DrawFormat {
    Text,
    Dot,
    Mermaid,
    /// SVG, for a web page (the console inlines it).
    Svg,
}

impl DrawFormat {
    pub fn parse(s: &str) -> Option<DrawFormat> {
        Some(match s {
            "text" => DrawFormat::Text,
            "dot" => DrawFormat::Dot,
            "mermaid" => DrawFormat::Mermaid,
            "svg" => DrawFormat::Svg,
            _ => return None,
        })
    }
}

/// The saga's step graph with each step's state drawn on it, or why it cannot be drawn (its
/// stored definition no longer compiles to the one it was pinned to).
pub fn draw(d: &SagaDetail, format: DrawFormat) -> Result<String, String> {
    let Some(graph) = &d.graph else {
        return Err(d
            .definition_problem
            .clone()
            .unwrap_or_else(|| "the saga's definition is not at hand".to_owned()));
    };
    let held: &[usize] = d.paused.as_ref().map_or(&[], |p| &p.held);
    let note = |i: usize| {
        d.steps
            .get(i)
            .map(|s| step_note(s, held.contains(&s.index)))
    };
    let overlay = |i: usize| {
        d.steps.get(i).map(|s| sagaflow_dsl::render::Overlay {
            note: step_note(s, held.contains(&s.index)),
            fill: step_fill(&s.state),
        })
    };
    Ok(match format {
        DrawFormat::Text => sagaflow_dsl::render::text(graph, &note),
        DrawFormat::Dot => sagaflow_dsl::render::dot_with(graph, &overlay),
        DrawFormat::Mermaid => sagaflow_dsl::render::mermaid_with(graph, &overlay),
        DrawFormat::Svg => sagaflow_dsl::render::svg_with(graph, &overlay),
    })
}

/// Errors from services may span lines; a drawing's line may not.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One page of sagas, newest first.
pub async fn list(store: &Store, query: &ListQuery) -> Result<Page, EngineError> {
    let after = match &query.after {
        Some(c) => Some(parse_cursor(c).ok_or_else(|| {
            EngineError::Refused(format!(
                "`{c}` is not a list cursor (pass a page's `next` value)"
            ))
        })?),
        None => None,
    };
    let filter = SagaFilter {
        status: query.state.clone(),
        sequence_key: query.sequence_key.clone(),
        name: query.saga.clone(),
        created_from: query.created_from,
        created_before: query.created_before,
        after,
    };
    let limit = query.limit.max(1) as usize;
    // One more than asked: whether it exists says if there is a next page.
    let mut sagas = store.list_sagas(&filter, limit + 1).await?;
    let more = sagas.len() > limit;
    sagas.truncate(limit);
    let next = match sagas.last() {
        Some(last) if more => Some(format!("{}.{}", last.created_at, last.id)),
        _ => None,
    };
    Ok(Page { sagas, next })
}

/// `created_at.id` of the last saga of a page.
fn parse_cursor(cursor: &str) -> Option<(i64, String)> {
    let (created, id) = cursor.split_once('.')?;
    let created = created.parse().ok()?;
    (!id.is_empty()).then(|| (created, id.to_owned()))
}

/// The newest timeline row of this kind for a saga: e.g. `ignored`, where the machine says why
/// it refused an operator's abort or retry.
pub async fn last_history(
    store: &Store,
    saga_id: &str,
    kind: &str,
) -> Result<Option<TimelineRow>, EngineError> {
    Ok(store.last_history(saga_id, kind).await?)
}
