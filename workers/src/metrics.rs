//! A worker process's counters as Prometheus metrics (`sagaflow worker --metrics ADDR` serves
//! them at `GET /metrics`), each labelled with the service:
//!
//! | metric | type | what |
//! |---|---|---|
//! | `sagaflow_worker_commands_total{service}` | counter | commands handled (their reply published) |
//! | `sagaflow_worker_duplicates_total{service}` | counter | commands answered from the barrier: a duplicate or redelivery, no effect applied again |
//! | `sagaflow_worker_dead_letters_total{service}` | counter | commands set aside in the dead-letter queue because they can never be handled |
//! | `sagaflow_worker_undecodable_total{service}` | counter | of those, commands that were not even a command |
//! | `sagaflow_worker_commits_total{service}` | counter | database transactions committed |
//!
//! Read from [`Stats`] at scrape time: nothing on the hot path changes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering;

use crate::runtime::Stats;

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

/// The OpenMetrics text of `stats`, for `service`.
pub fn encode(service: &str, stats: &Stats) -> String {
    let mut registry = Registry::default();
    let labels = ServiceLabels {
        service: service.to_owned(),
    };
    let counters = [
        (
            "sagaflow_worker_commands",
            "Commands handled (their reply published)",
            &stats.handled,
        ),
        (
            "sagaflow_worker_duplicates",
            "Commands answered from the barrier without applying their effect again",
            &stats.duplicates,
        ),
        (
            "sagaflow_worker_dead_letters",
            "Commands set aside in the dead-letter queue because they can never be handled",
            &stats.dead_lettered,
        ),
        (
            "sagaflow_worker_undecodable",
            "Dead-lettered commands that were not even a command",
            &stats.undecodable,
        ),
        (
            "sagaflow_worker_commits",
            "Database transactions committed",
            &stats.commits,
        ),
    ];
    for (name, help, value) in counters {
        let family = Family::<ServiceLabels, Counter>::default();
        family
            .get_or_create(&labels)
            .inc_by(value.load(Ordering::Relaxed));
        registry.register(name, help, family);
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_carry_the_service_and_the_values() {
        let stats = Stats::default();
        stats.handled.store(7, Ordering::Relaxed);
        stats.dead_lettered.store(2, Ordering::Relaxed);
        let text = encode("payment", &stats);
        assert!(
            text.contains("sagaflow_worker_commands_total{service=\"payment\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("sagaflow_worker_dead_letters_total{service=\"payment\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("sagaflow_worker_duplicates_total{service=\"payment\"} 0\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
