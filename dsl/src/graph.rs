//! Stage 3 of 3: the compiled step graph, and the checks that need it.
//!
//! Nodes are steps (node index `i` is step `i` of the definition), edges run from a dependency
//! to its dependent. From the graph come the topological order, the layers of steps that may run
//! in parallel, the compensation order (reverse dependencies) and each step's ancestors, which
//! decide whether a `${steps.X…}` reference is safe and whether the pivot rule holds.

use std::collections::{BTreeSet, HashMap, VecDeque};

use petgraph::Direction;
use petgraph::algo::{is_cyclic_directed, tarjan_scc};
use petgraph::graph::{DiGraph, NodeIndex};
use sha2::{Digest, Sha256};

use crate::diagnostic::{Code, Diagnostic, did_you_mean};
use crate::model::{FailurePolicy, SagaDef, StepDef, StepKind};
use crate::template::Reference;
use crate::validate::{RefSite, StepSite, dep_path};
use crate::yaml::SpanIndex;

/// A validated saga compiled into its step graph. Cheap to query; built once per definition.
#[derive(Debug, Clone)]
pub struct SagaGraph {
    def: SagaDef,
    graph: DiGraph<usize, ()>,
    topo: Vec<usize>,
    layers: Vec<Vec<usize>>,
    layer_of: Vec<usize>,
    ancestors: Vec<BTreeSet<usize>>,
    by_id: HashMap<String, usize>,
    hash: String,
}

impl SagaGraph {
    pub fn def(&self) -> &SagaDef {
        &self.def
    }

    pub fn name(&self) -> &str {
        &self.def.name
    }

    pub fn steps(&self) -> &[StepDef] {
        &self.def.steps
    }

    pub fn step(&self, index: usize) -> &StepDef {
        &self.def.steps[index]
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// The steps `index` depends on directly.
    pub fn dependencies(&self, index: usize) -> Vec<usize> {
        self.neighbors(index, Direction::Incoming)
    }

    /// The steps that depend on `index` directly.
    pub fn dependents(&self, index: usize) -> Vec<usize> {
        self.neighbors(index, Direction::Outgoing)
    }

    fn neighbors(&self, index: usize, dir: Direction) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(index), dir)
            .map(|n| self.graph[n])
            .collect();
        v.sort_unstable();
        v
    }

    /// Every step after all of its dependencies (ties broken by declaration order).
    pub fn topological_order(&self) -> &[usize] {
        &self.topo
    }

    /// Layer `k` holds the steps whose longest dependency chain has length `k`: the steps of one
    /// layer never depend on each other, so they may run in parallel.
    pub fn layers(&self) -> &[Vec<usize>] {
        &self.layers
    }

    pub fn layer_of(&self, index: usize) -> usize {
        self.layer_of[index]
    }

    /// Compensation runs in reverse: a step is undone only after everything that depends on it.
    pub fn compensation_order(&self) -> Vec<usize> {
        self.topo.iter().rev().copied().collect()
    }

    /// True when `ancestor` must finish before `step` can start (directly or transitively).
    pub fn is_ancestor(&self, ancestor: usize, step: usize) -> bool {
        self.ancestors[step].contains(&ancestor)
    }

    pub fn ancestors(&self, step: usize) -> &BTreeSet<usize> {
        &self.ancestors[step]
    }

    /// `sha256:…` of the canonical definition: the version a running saga is pinned to.
    pub fn content_hash(&self) -> &str {
        &self.hash
    }

    /// The underlying petgraph graph (node weight = step index).
    pub fn petgraph(&self) -> &DiGraph<usize, ()> {
        &self.graph
    }
}

/// Builds the graph and runs the graph checks. Returns the graph only when the checks found no
/// error (warnings are fine).
pub(crate) fn build(
    def: SagaDef,
    sites: &[StepSite],
    ref_sites: &[RefSite],
    complete: bool,
    spans: &SpanIndex,
    out: &mut Vec<Diagnostic>,
) -> Option<SagaGraph> {
    let n = def.steps.len();
    let by_id: HashMap<String, usize> = def
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.0.clone(), i))
        .collect();
    let mut graph = DiGraph::<usize, ()>::with_capacity(n, n);
    for i in 0..n {
        graph.add_node(i);
    }
    for (i, step) in def.steps.iter().enumerate() {
        for dep in &step.depends_on {
            if let Some(&d) = by_id.get(dep.as_str()) {
                graph.add_edge(NodeIndex::new(d), NodeIndex::new(i), ());
            }
        }
    }
    let errors_before = out.iter().filter(|d| d.is_error()).count();
    report_cycles(&def, &graph, sites, spans, out);
    // With a cycle there is no order, and ancestry would be meaningless.
    if is_cyclic_directed(&graph) {
        return None;
    }
    // petgraph's toposort is valid but arbitrary among independent steps; ours is stable and
    // readable: repeatedly take the first declared step whose dependencies are all placed.
    let topo = stable_topo(&def, &by_id);
    let mut layer_of = vec![0usize; n];
    let mut ancestors = vec![BTreeSet::new(); n];
    for &i in &topo {
        for dep in &def.steps[i].depends_on {
            let d = by_id[dep.as_str()];
            layer_of[i] = layer_of[i].max(layer_of[d] + 1);
            let inherited: Vec<usize> = ancestors[d].iter().copied().collect();
            ancestors[i].extend(inherited);
            ancestors[i].insert(d);
        }
    }
    let depth = layer_of.iter().max().map_or(0, |m| m + 1);
    let mut layers = vec![Vec::new(); depth];
    for &i in &topo {
        layers[layer_of[i]].push(i);
    }
    for layer in &mut layers {
        layer.sort_unstable();
    }

    if complete {
        let checks = Checks {
            def: &def,
            by_id: &by_id,
            ancestors: &ancestors,
            sites,
            spans,
        };
        checks.references(ref_sites, out);
        checks.pivots(out);
        checks.warnings(&graph, out);
    }
    if out.iter().filter(|d| d.is_error()).count() > errors_before {
        return None;
    }
    let hash = content_hash(&def);
    Some(SagaGraph {
        def,
        graph,
        topo,
        layers,
        layer_of,
        ancestors,
        by_id,
        hash,
    })
}

fn stable_topo(def: &SagaDef, by_id: &HashMap<String, usize>) -> Vec<usize> {
    let n = def.steps.len();
    let mut placed = vec![false; n];
    let mut order = Vec::with_capacity(n);
    while order.len() < n {
        let next = (0..n).find(|&i| {
            !placed[i]
                && def.steps[i]
                    .depends_on
                    .iter()
                    .all(|d| placed[by_id[d.as_str()]])
        });
        match next {
            Some(i) => {
                placed[i] = true;
                order.push(i);
            }
            None => break, // unreachable for an acyclic graph
        }
    }
    order
}

fn content_hash(def: &SagaDef) -> String {
    // serde_json writes struct fields in declaration order and BTreeMaps sorted: canonical.
    let bytes = serde_json::to_vec(def).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn report_cycles(
    def: &SagaDef,
    graph: &DiGraph<usize, ()>,
    sites: &[StepSite],
    spans: &SpanIndex,
    out: &mut Vec<Diagnostic>,
) {
    let mut sccs = tarjan_scc(graph);
    // Report in file order, whatever order tarjan finds them in.
    for scc in &mut sccs {
        scc.sort_unstable();
    }
    sccs.sort_unstable();
    for scc in sccs {
        let start = scc[0];
        let self_loop = graph.contains_edge(start, start);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let members: BTreeSet<usize> = scc.iter().map(|n| n.index()).collect();
        let cycle = find_cycle(def, start.index(), &members);
        let id = |i: usize| def.steps[i].id.as_str();
        let entry = |from: usize, to: usize| {
            let pos = sites[from].dep_positions.get(id(to)).copied().unwrap_or(0);
            spans.value(&dep_path(spans, sites[from].raw_index, pos))
        };
        let names: Vec<&str> = cycle.iter().map(|&i| id(i)).collect();
        let mut d = Diagnostic::error(
            Code::Cycle,
            entry(cycle[0], cycle[1 % cycle.len()]),
            if cycle.len() == 1 {
                format!("step `{}` depends on itself", names[0])
            } else {
                format!("dependency cycle: {} → {}", names.join(" → "), names[0])
            },
        )
        .with_label(format!(
            "`{}` depends on `{}`",
            names[0],
            names[1 % names.len()]
        ))
        .with_hint(
            "steps in a cycle wait for each other forever; remove one of these dependencies",
        );
        for k in 1..cycle.len() {
            let (from, to) = (cycle[k], cycle[(k + 1) % cycle.len()]);
            d = d.with_note(
                entry(from, to),
                format!("`{}` depends on `{}`", id(from), id(to)),
            );
        }
        out.push(d);
    }
}

/// A shortest "depends on" cycle through `start` inside one strongly connected component:
/// `[a, b, c]` means a depends on b, b on c, c on a.
fn find_cycle(def: &SagaDef, start: usize, members: &BTreeSet<usize>) -> Vec<usize> {
    let index: HashMap<&str, usize> = members
        .iter()
        .map(|&i| (def.steps[i].id.as_str(), i))
        .collect();
    let deps = |i: usize| -> Vec<usize> {
        def.steps[i]
            .depends_on
            .iter()
            .filter_map(|d| index.get(d.as_str()).copied())
            .collect()
    };
    if deps(start).contains(&start) {
        return vec![start];
    }
    let mut parent: HashMap<usize, usize> = HashMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(cur) = queue.pop_front() {
        for next in deps(cur) {
            if next == start {
                let mut path = vec![cur];
                let mut p = cur;
                while let Some(&q) = parent.get(&p) {
                    path.push(q);
                    p = q;
                }
                path.reverse();
                return path;
            }
            if next != start && !parent.contains_key(&next) {
                parent.insert(next, cur);
                queue.push_back(next);
            }
        }
    }
    vec![start] // unreachable inside a strongly connected component
}

struct Checks<'a> {
    def: &'a SagaDef,
    by_id: &'a HashMap<String, usize>,
    ancestors: &'a [BTreeSet<usize>],
    sites: &'a [StepSite],
    spans: &'a SpanIndex,
}

impl Checks<'_> {
    fn step_path(&self, i: usize) -> String {
        format!("steps[{}]", self.sites[i].raw_index)
    }

    fn references(&self, ref_sites: &[RefSite], out: &mut Vec<Diagnostic>) {
        let by_raw: HashMap<usize, usize> = self
            .sites
            .iter()
            .enumerate()
            .map(|(i, s)| (s.raw_index, i))
            .collect();
        for site in ref_sites {
            let Some(&from) = by_raw.get(&site.step) else {
                continue;
            };
            let Reference::StepOutput { step: target, path } = &site.reference else {
                continue;
            };
            let span = self.spans.value(&site.path);
            let me = self.def.steps[from].id.as_str();
            let Some(&t) = self.by_id.get(target.as_str()) else {
                let hint = match did_you_mean(target, self.by_id.keys().map(String::as_str)) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None => {
                        let mut ids: Vec<&str> = self.by_id.keys().map(String::as_str).collect();
                        ids.sort_unstable();
                        format!("the steps of this saga are: {}", ids.join(", "))
                    }
                };
                out.push(
                    Diagnostic::error(
                        Code::UnknownReference,
                        span,
                        format!(
                            "`{}` refers to step `{target}`, which does not exist",
                            site.reference
                        ),
                    )
                    .with_label("unknown step")
                    .with_hint(hint),
                );
                continue;
            };
            if t == from {
                out.push(
                    Diagnostic::error(
                        Code::ReferenceNotAncestor,
                        span,
                        format!("step `{me}` refers to its own output"),
                    )
                    .with_label("not available yet")
                    .with_hint("a step's output exists only after it ran; take the value from the input or an earlier step"),
                );
                continue;
            }
            if self.ancestors[t].contains(&from) {
                out.push(
                    Diagnostic::error(
                        Code::ReferenceNotAncestor,
                        span,
                        format!(
                            "step `{me}` reads `{}`, but `{target}` runs after `{me}` (it depends on it)",
                            site.reference
                        ),
                    )
                    .with_label(format!("`{target}` has not run yet"))
                    .with_hint(format!("a step can only read the outputs of steps it depends on; pass the value from the input or from a step before `{me}`")),
                );
                continue;
            }
            if !self.ancestors[from].contains(&t) {
                out.push(
                    Diagnostic::error(
                        Code::ReferenceNotAncestor,
                        span,
                        format!(
                            "step `{me}` reads `{}`, but `{target}` is not guaranteed to have run before `{me}`",
                            site.reference
                        ),
                    )
                    .with_label(format!("`{target}` may not have run yet"))
                    .with_hint(format!("add `{target}` to the `depends_on` of `{me}` (directly or through a step that depends on it)")),
                );
                continue;
            }
            if let (Some(outputs), Some(field)) = (&self.def.steps[t].outputs, path.first())
                && !outputs.contains(field)
            {
                let hint = match did_you_mean(field, outputs.iter().map(String::as_str)) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None => format!(
                        "`{target}` declares the outputs: {}",
                        outputs.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                };
                out.push(
                    Diagnostic::error(
                        Code::UndeclaredOutput,
                        span,
                        format!("step `{target}` has no output field `{field}`"),
                    )
                    .with_label("undeclared output")
                    .with_hint(hint),
                );
            }
        }
    }

    /// An irreversible step is a pivot: once it succeeded nothing may force the saga to undo it.
    /// So every step that may run after it (any step that is not one of its ancestors) must not
    /// be able to demand compensation: it must be `on_failure: retry` or `continue`.
    fn pivots(&self, out: &mut Vec<Diagnostic>) {
        for (p, pivot) in self.def.steps.iter().enumerate() {
            if pivot.is_reversible() {
                continue;
            }
            let pivot_span = self
                .spans
                .value(&format!("{}.compensation", self.step_path(p)));
            for (s, step) in self.def.steps.iter().enumerate() {
                if s == p
                    || self.ancestors[p].contains(&s)
                    || step.on_failure != FailurePolicy::Compensate
                {
                    continue;
                }
                let when = if self.ancestors[s].contains(&p) {
                    "runs after"
                } else {
                    "may run in parallel with"
                };
                let kind = match step.kind {
                    StepKind::Tcc { .. } => "its `try` may fail",
                    StepKind::Saga { .. } => "it may fail",
                };
                let path = self.step_path(s);
                let at = if self.spans.get(&format!("{path}.on_failure")).is_some() {
                    format!("{path}.on_failure")
                } else {
                    format!("{path}.id")
                };
                out.push(
                    Diagnostic::error(
                        Code::PivotViolation,
                        self.spans.key(&at),
                        format!(
                            "step `{}` {when} the irreversible step `{}`, and {kind} in a way that would need `{}` undone",
                            step.id, pivot.id, pivot.id
                        ),
                    )
                    .with_label("may demand compensation after the pivot")
                    .with_note(pivot_span, format!("`{}` cannot be undone", pivot.id))
                    .with_hint(if self.ancestors[s].contains(&p) {
                        format!(
                            "make `{}` retriable-to-success with `on_failure: retry`, or optional with `on_failure: continue`",
                            step.id
                        )
                    } else {
                        format!(
                            "make `{}` retriable-to-success with `on_failure: retry`, optional with `on_failure: continue`, or make `{}` depend on it so it finishes before the pivot",
                            step.id, pivot.id
                        )
                    }),
                );
            }
        }
    }

    fn warnings(&self, graph: &DiGraph<usize, ()>, out: &mut Vec<Diagnostic>) {
        for (i, step) in self.def.steps.iter().enumerate() {
            let path = self.step_path(i);
            let dependents: Vec<String> = graph
                .neighbors_directed(NodeIndex::new(i), Direction::Outgoing)
                .map(|n| format!("`{}`", self.def.steps[graph[n]].id))
                .collect();
            if step.on_failure == FailurePolicy::Continue && !dependents.is_empty() {
                out.push(
                    Diagnostic::warning(
                        Code::OptionalDependency,
                        self.spans.value(&format!("{path}.on_failure")),
                        format!(
                            "step `{}` is optional (`on_failure: continue`) but {} {} on it: if it fails, {} skipped",
                            step.id,
                            dependents.join(", "),
                            if dependents.len() == 1 { "depends" } else { "depend" },
                            if dependents.len() == 1 { "that step is" } else { "they are" }
                        ),
                    )
                    .with_label("optional step with dependents")
                    .with_hint("make it required, or remove the dependency if the dependents do not need it"),
                );
            }
            for dep in &step.depends_on {
                let d = self.by_id[dep.as_str()];
                let via = step
                    .depends_on
                    .iter()
                    .map(|o| self.by_id[o.as_str()])
                    .find(|&o| o != d && self.ancestors[o].contains(&d));
                if let Some(via) = via {
                    let pos = self.sites[i]
                        .dep_positions
                        .get(dep.as_str())
                        .copied()
                        .unwrap_or(0);
                    out.push(
                        Diagnostic::warning(
                            Code::RedundantDependency,
                            self.spans
                                .value(&dep_path(self.spans, self.sites[i].raw_index, pos)),
                            format!(
                                "`{}` already depends on `{dep}` through `{}`",
                                step.id, self.def.steps[via].id
                            ),
                        )
                        .with_label("implied already")
                        .with_hint("the entry is harmless; remove it to keep the graph readable"),
                    );
                }
            }
        }
        let param_refs = self
            .def
            .steps
            .iter()
            .flat_map(|s| s.params.values())
            .flat_map(|p| p.references());
        let used: BTreeSet<&str> = self
            .def
            .sequence_key
            .references()
            .chain(param_refs)
            .filter_map(|r| match r {
                Reference::Input { name } => Some(name.as_str()),
                Reference::StepOutput { .. } => None,
            })
            .collect();
        for name in self.def.input.keys() {
            if !used.contains(name.as_str()) {
                out.push(
                    Diagnostic::warning(
                        Code::UnusedInput,
                        self.spans.key(&format!("input.{name}")),
                        format!("input `{name}` is declared but no step uses it"),
                    )
                    .with_label("unused")
                    .with_hint(format!(
                        "pass it to a step with `${{input.{name}}}`, or remove it"
                    )),
                );
            }
        }
    }
}
