//! Property tests: random valid DAGs compile into a correct order; random cyclic graphs are
//! rejected as cycles; and no input whatsoever panics the compiler.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use proptest::prelude::*;
use sagaflow_dsl::{Code, compile, compile_bytes};

/// A random DAG as a list of steps in declaration order; `deps[k]` names earlier steps in a
/// hidden "creation" order, then the declaration order is shuffled, so dependencies point both
/// forwards and backwards in the file.
#[derive(Debug, Clone)]
struct Dag {
    /// Declaration position → creation index.
    order: Vec<usize>,
    /// Creation index → creation indices it depends on (all smaller: acyclic by construction).
    deps: Vec<BTreeSet<usize>>,
    tcc: Vec<bool>,
}

fn dag() -> impl Strategy<Value = Dag> {
    (1usize..24).prop_flat_map(|n| {
        let deps = (0..n)
            .map(|i| proptest::collection::btree_set(0..i.max(1), 0..=i.min(4)))
            .collect::<Vec<_>>();
        (
            Just(n),
            deps,
            proptest::collection::vec(any::<bool>(), n),
            Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
        )
            .prop_map(|(n, deps, tcc, order)| Dag {
                order,
                // Step 0 may have drawn a dependency on "0" from 0..1: drop self-references.
                deps: deps
                    .into_iter()
                    .enumerate()
                    .map(|(i, d)| d.into_iter().filter(|&x| x < i).collect())
                    .collect(),
                tcc: tcc.into_iter().take(n).collect(),
            })
    })
}

fn yaml(dag: &Dag, extra_edge: Option<(usize, usize)>) -> String {
    let mut s = String::from(
        "name: generated\nversion: 1\nsequence_key: ${input.order_id}\ninput:\n  order_id: string\nsteps:\n",
    );
    for &c in &dag.order {
        let _ = writeln!(s, "  - id: s{c}\n    service: svc{}", c % 4);
        if dag.tcc[c] {
            s.push_str("    try: reserve\n    confirm: commit\n    cancel: release\n");
        } else {
            s.push_str("    action: apply\n    compensation: undo\n");
        }
        let mut deps: Vec<usize> = dag.deps[c].iter().copied().collect();
        if let Some((from, to)) = extra_edge
            && from == c
        {
            deps.push(to);
        }
        if !deps.is_empty() {
            let list: Vec<String> = deps.iter().map(|d| format!("s{d}")).collect();
            let _ = writeln!(s, "    depends_on: [{}]", list.join(", "));
        }
        let _ = writeln!(s, "    params: {{ order: \"${{input.order_id}}\" }}");
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_dags_compile_in_dependency_order(dag in dag()) {
        let compiled = compile(&yaml(&dag, None));
        let errors: Vec<_> = compiled.errors().collect();
        prop_assert!(errors.is_empty(), "{errors:#?}");
        let g = compiled.graph.expect("valid");
        let creation = |i: usize| -> usize { g.step(i).id.as_str()[1..].parse().expect("s<number>") };
        let topo = g.topological_order();
        prop_assert_eq!(topo.len(), dag.order.len());
        let position = |c: usize| topo.iter().position(|&i| creation(i) == c).expect("placed");
        for (c, deps) in dag.deps.iter().enumerate() {
            for &d in deps {
                prop_assert!(position(d) < position(c), "s{} placed after s{}", d, c);
            }
        }
        // Layers: a step is strictly deeper than each dependency; a layer never holds a step
        // and one of its ancestors (so a layer's steps really may run in parallel).
        for i in 0..topo.len() {
            for d in g.dependencies(i) {
                prop_assert!(g.layer_of(d) < g.layer_of(i));
            }
        }
        for layer in g.layers() {
            for &a in layer {
                for &b in layer {
                    prop_assert!(!g.is_ancestor(a, b));
                }
            }
        }
        // Compensation order is the exact reverse of the topological order.
        let mut rev = g.compensation_order();
        rev.reverse();
        prop_assert_eq!(rev.as_slice(), topo);
        // The content hash depends on content only.
        let again = compile(&yaml(&dag, None)).graph.expect("valid");
        prop_assert_eq!(again.content_hash(), g.content_hash());
    }

    #[test]
    fn a_back_edge_is_always_reported_as_a_cycle(dag in dag(), pick in any::<proptest::sample::Index>()) {
        // Add an edge from an ancestor-or-self to one of its descendants' dependencies' roots:
        // pick an existing edge c → d and add d → c.
        let edges: Vec<(usize, usize)> = dag
            .deps
            .iter()
            .enumerate()
            .flat_map(|(c, ds)| ds.iter().map(move |&d| (c, d)))
            .collect();
        prop_assume!(!edges.is_empty());
        let (c, d) = edges[pick.index(edges.len())];
        let compiled = compile(&yaml(&dag, Some((d, c))));
        prop_assert!(compiled.graph.is_none());
        prop_assert!(compiled.errors().any(|e| e.code == Code::Cycle), "{:#?}", compiled.diagnostics);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let compiled = compile_bytes(&bytes);
        prop_assert!(compiled.graph.is_none() || compiled.errors().next().is_none());
    }

    #[test]
    fn arbitrary_text_never_panics(text in "[a-z_:\\-\\[\\]{}$.,'\" \n\t#|>&*!0-9]{0,400}") {
        let compiled = compile(&text);
        // Every diagnostic must render: spans lie inside the text.
        let report = sagaflow_dsl::Report { file: "x.yaml", source: &text, diagnostics: &compiled.diagnostics };
        let _ = report.render();
    }

    /// Mutations of a real saga reach much deeper than random text: delete, duplicate or splice
    /// lines and bytes of order.yaml, and the compiler must still answer without panicking.
    #[test]
    fn mutated_order_saga_never_panics(
        ops in proptest::collection::vec((0u8..4, any::<proptest::sample::Index>(), any::<proptest::sample::Index>(), any::<u8>()), 1..6)
    ) {
        let original = include_str!("../../sagas/order.yaml");
        let mut lines: Vec<String> = original.lines().map(str::to_owned).collect();
        for (op, a, b, byte) in ops {
            if lines.is_empty() { break; }
            let i = a.index(lines.len());
            let j = b.index(lines.len());
            match op {
                0 => { lines.remove(i); }
                1 => { let l = lines[i].clone(); lines.insert(j, l); }
                2 => { lines.swap(i, j); }
                _ => {
                    let mut bytes = lines[i].clone().into_bytes();
                    let k = b.index(bytes.len().max(1)).min(bytes.len());
                    bytes.insert(k, byte);
                    lines[i] = String::from_utf8_lossy(&bytes).into_owned();
                }
            }
        }
        let text = lines.join("\n");
        let compiled = compile(&text);
        let report = sagaflow_dsl::Report { file: "x.yaml", source: &text, diagnostics: &compiled.diagnostics };
        let _ = report.render();
    }
}

#[test]
fn pathological_inputs_are_refused_cleanly() {
    // Deep nesting, alias bombs and huge files must produce errors, not stack overflows.
    let deep = format!("name: {}", "[".repeat(100_000));
    assert!(compile(&deep).graph.is_none());
    let bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n";
    assert!(compile(bomb).graph.is_none());
    let huge = "#".repeat(sagaflow_dsl::MAX_SOURCE_BYTES + 1);
    let c = compile(&huge);
    assert_eq!(c.diagnostics[0].code, Code::TooLarge);
}
