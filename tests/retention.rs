//! Retention on SQLite and on the real PostgreSQL: the history and timer rows of sagas
//! finished cleanly longer ago than `keep` are purged in small batches (sent outbox rows are
//! gone already); a running saga, a Failed one and a recently finished one keep theirs; a purged
//! saga's status still answers; barrier rows go by age. And the purge loops run next to live traffic.

mod support;

use std::time::Duration;

use sagaflow_engine::retention::{self, PurgeReport, Retention};
use sagaflow_engine::status;
use sagaflow_engine::store::Store;
use sagaflow_workers::barrier;
use serde_json::json;
use support::{Setup, System, assert_invariants, wait_all_final};
use tokio::sync::watch;

const LIMIT: Duration = Duration::from_secs(90);
const DAY_MS: i64 = 24 * 3600 * 1000;
const KEEP: Duration = Duration::from_secs(24 * 3600);

/// A saga whose step nobody serves, with a long timeout: it stays Running.
const GHOST: &str = r#"
name: ghost-flow
version: 1
description: a step no worker serves
sequence_key: ${input.order_id}
input:
  order_id: string
steps:
  - id: ghost
    service: ghost
    action: haunt
    compensation: unhaunt
    timeout: 1h
"#;

async fn count(store: &Store, sql: &'static str, saga_id: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(saga_id)
        .fetch_one(store.pool())
        .await
        .expect("count")
}

/// A saga's rows: (history, outbox (unsent: a sent row leaves it), timers, barrier).
async fn rows_of(store: &Store, id: &str) -> [i64; 4] {
    let like = format!("{id}/%");
    [
        count(
            store,
            "SELECT COUNT(*) FROM saga_history WHERE saga_id = $1",
            id,
        )
        .await,
        count(
            store,
            "SELECT COUNT(*) FROM outbox WHERE message_id LIKE $1",
            &like,
        )
        .await,
        count(store, "SELECT COUNT(*) FROM timers WHERE saga_id = $1", id).await,
        count(store, "SELECT COUNT(*) FROM barrier WHERE saga_id = $1", id).await,
    ]
}

async fn exec(store: &Store, sql: &'static str, a: i64, id: &str) {
    sqlx::query(sql)
        .bind(a)
        .bind(id)
        .execute(store.pool())
        .await
        .expect("update");
}

/// Moves a saga's finish (and its barrier rows) `days` into the past.
async fn age(store: &Store, id: &str, days: i64) {
    let ms = days * DAY_MS;
    exec(
        store,
        "UPDATE sagas SET finished_at = finished_at - $1, updated_at = updated_at - $1 WHERE id = $2",
        ms,
        id,
    )
    .await;
    exec(
        store,
        "UPDATE barrier SET created_at = created_at - $1 WHERE saga_id = $2",
        ms,
        id,
    )
    .await;
}

async fn start_orders(sys: &System, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for o in sys.orders(prefix, n).await {
        ids.push(
            sys.engine
                .start(&sys.order, o, None)
                .await
                .expect("start")
                .id,
        );
    }
    ids
}

/// Starts a saga that stays Running, and waits until its command was sent.
async fn start_ghost(sys: &System, order: &str) -> String {
    let ghost = sys.engine.register(GHOST).await.expect("ghost saga");
    let id = sys
        .engine
        .start(&ghost, json!({ "order_id": order }), None)
        .await
        .expect("start ghost")
        .id;
    for _ in 0..400 {
        let dispatched = count(
            &sys.store,
            "SELECT COUNT(*) FROM saga_history WHERE saga_id = $1 AND kind = 'dispatch'",
            &id,
        )
        .await;
        if dispatched > 0 && rows_of(&sys.store, &id).await[1] == 0 {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the ghost saga's command was never sent");
}

on_both_backends!(
    finished_old_sagas_are_purged_in_batches,
    |url: String| async move {
        let sys = System::start(&url, Setup::default()).await;
        let store = sys.store.clone();
        let ids = start_orders(&sys, "ret", 6).await;
        wait_all_final(&store, LIMIT).await;
        let running = start_ghost(&sys, "ghost-ret").await;
        sys.stop().await;

        // Five old ones (one of them Failed: an operator's), one recent, one running for long.
        let (old, recent) = (&ids[..5], &ids[5]);
        let failed = &old[4];
        let purgeable = &old[..4];
        for id in old {
            age(&store, id, 30).await;
        }
        age(&store, &running, 30).await;
        sqlx::query("UPDATE sagas SET status = 'failed' WHERE id = $1")
            .bind(failed.as_str())
            .execute(store.pool())
            .await
            .expect("fail it");
        // A leftover timer of a purgeable saga, and an unsent command (the relay's, not ours).
        sqlx::query("INSERT INTO timers (id, saga_id, due_at, event) VALUES ($1, $2, 0, '{}')")
            .bind(format!("{}/leftover", purgeable[0]))
            .bind(purgeable[0].as_str())
            .execute(store.pool())
            .await
            .expect("timer");
        sqlx::query(
            "INSERT INTO outbox (message_id, destination, routing_key, payload, created_at) \
             VALUES ($1, 'payment', $2, '{}', 0)",
        )
        .bind(format!("{}/0/action/9", purgeable[1]))
        .bind(purgeable[1].as_str())
        .execute(store.pool())
        .await
        .expect("unsent");

        let mut before = Vec::new();
        for id in ids.iter().chain([&running]) {
            before.push((id.clone(), rows_of(&store, id).await));
        }
        let expected: [i64; 4] = purgeable.iter().fold([0; 4], |mut acc, id| {
            let rows = &before.iter().find(|(i, _)| i == id).expect("known").1;
            for (a, r) in acc.iter_mut().zip(rows) {
                *a += r;
            }
            acc
        });
        assert!(expected[0] > 8 && expected[2] >= 1);
        assert_eq!(expected[1], 1, "one unsent command");

        // Small batches: several of them, none deleting more than `batch` rows from a table.
        let batch = 4;
        let mut reports = Vec::new();
        let timeline_rows = || async {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM saga_timeline")
                .fetch_one(store.pool())
                .await
                .expect("count")
        };
        loop {
            let rows_before = timeline_rows().await;
            let r = retention::purge_once(&store, KEEP, batch)
                .await
                .expect("purge");
            if r.is_empty() {
                break;
            }
            // The history is counted in lines; a batch deletes at most `batch` rows (a row holds
            // the lines one engine batch wrote for one saga).
            assert!(rows_before - timeline_rows().await <= batch as i64, "{r:?}");
            assert!(r.timers <= batch as u64, "{r:?}");
            reports.push(r);
            assert!(reports.len() < 100, "purge does not end: {reports:?}");
        }
        assert!(reports.len() >= 3, "several batches: {reports:?}");
        let total = reports
            .iter()
            .fold(PurgeReport::default(), |t, r| PurgeReport {
                sagas: t.sagas + r.sagas,
                history: t.history + r.history,
                timers: t.timers + r.timers,
            });
        assert_eq!(
            total,
            PurgeReport {
                sagas: purgeable.len() as u64,
                history: expected[0] as u64,
                timers: expected[2] as u64,
            }
        );

        for (id, rows) in &before {
            let now = rows_of(&store, id).await;
            if purgeable.contains(id) {
                // Gone but the unsent command and the barrier (the workers purge that).
                assert_eq!(now, [0, rows[1], 0, rows[3]], "saga {id}");
                let detail = status::saga(&store, id)
                    .await
                    .expect("status")
                    .expect("the saga is still there");
                assert_eq!(detail.status.name(), "completed");
                assert_eq!(detail.steps.len(), 4);
                assert!(detail.timeline.is_empty());
            } else {
                assert_eq!(
                    &now, rows,
                    "saga {id} (running, failed or recent) is untouched"
                );
            }
        }
        // Nothing more to do, and a purged saga is not looked at again.
        assert!(
            retention::purge_once(&store, KEEP, batch)
                .await
                .expect("purge")
                .is_empty()
        );

        // The barrier, by age alone: the five old sagas' rows (the Failed one's too).
        let old_rows: i64 = {
            let mut n = 0;
            for id in old {
                n += rows_of(&store, id).await[3];
            }
            n
        };
        assert_eq!(old_rows, 5 * 5, "charge, freeze, grant, add, use");
        let mut purged = Vec::new();
        loop {
            let n = barrier::purge(store.pool(), KEEP, 7)
                .await
                .expect("barrier");
            assert!(n <= 7);
            if n == 0 {
                break;
            }
            purged.push(n);
        }
        assert_eq!(purged, [7, 7, 7, 4]);
        for id in old {
            assert_eq!(rows_of(&store, id).await[3], 0);
        }
        assert_eq!(rows_of(&store, recent).await[3], 5, "recent rows stay");
    }
);

// The loops, next to live traffic: old sagas are purged while new ones run to completion.
on_both_backends!(
    retention_loops_run_beside_live_traffic,
    |url: String| async move {
        let sys = System::start(&url, Setup::default()).await;
        let store = sys.store.clone();
        let old = start_orders(&sys, "loop-old", 8).await;
        wait_all_final(&store, LIMIT).await;
        for id in &old {
            age(&store, id, 10).await;
        }
        let cfg = Retention {
            keep: KEEP,
            batch: 3,
            pause: Duration::from_millis(5),
        };
        let (stop, stopped) = watch::channel(false);
        let engine_purge = tokio::spawn(retention::run(store.clone(), cfg, stopped.clone()));
        let barrier_purge =
            tokio::spawn(barrier::retention_loop(store.pool().clone(), cfg, stopped));
        let live = start_orders(&sys, "loop-live", 12).await;
        wait_all_final(&store, LIMIT).await;
        let mut done = false;
        for _ in 0..600 {
            let mut left = 0;
            for id in &old {
                let r = rows_of(&store, id).await;
                left += r.iter().sum::<i64>();
            }
            if left == 0 {
                done = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(done, "the loops purged the old sagas");
        let _ = stop.send(true);
        tokio::time::timeout(Duration::from_secs(10), async {
            engine_purge.await.expect("engine purge task");
            barrier_purge.await.expect("barrier purge task");
        })
        .await
        .expect("the loops stop on shutdown, even while idle");
        for id in &live {
            let r = rows_of(&store, id).await;
            assert!(r[0] > 0 && r[3] == 5, "live saga {id}: {r:?}");
            let detail = status::saga(&store, id)
                .await
                .expect("status")
                .expect("saga");
            assert_eq!(detail.status.name(), "completed");
        }
        assert_eq!(assert_invariants(&store).await, 20);
        sys.stop().await;
    }
);
