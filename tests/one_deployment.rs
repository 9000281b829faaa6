//! One database, one deployment: the first engine or worker on a database binds it to its queue
//! prefix, and a process of another prefix is refused at start — before it touches the broker
//! or the outbox. (Two engines of different prefixes on one database took each other's outbox
//! rows: commands went to queues with no consumer.)

mod support;

use std::process::Command;

use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store, StoreError};
use support::{Backend, fresh_db};

on_both_backends!(
    a_database_keeps_the_prefix_it_was_first_bound_to,
    |url: String| async move {
        let store = Store::connect(&url, 2).await.expect("connect");
        store.migrate(&[ENGINE_MIGRATIONS]).await.expect("migrate");
        assert_eq!(store.bound_prefix().await.expect("read"), None);
        store.bind_prefix("shop").await.expect("first binding");
        store
            .bind_prefix("shop")
            .await
            .expect("the same prefix again");
        match store.bind_prefix("shop-staging").await {
            Err(StoreError::BadUrl(why)) => {
                assert!(
                    why.contains("prefix `shop`") && why.contains("--prefix `shop-staging`"),
                    "{why}"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(
            store.bound_prefix().await.expect("read").as_deref(),
            Some("shop")
        );
    }
);

/// `sagaflow ARGS` with the database in the environment; (exit code, stderr).
async fn sagaflow(args: &[&str], url: &str) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sagaflow"));
    cmd.args(args).env("SAGAFLOW_DATABASE_URL", url);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run sagaflow"))
        .await
        .expect("join");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_or_worker_of_another_prefix_is_refused_at_start() {
    let Some(db) = fresh_db(Backend::Postgres, "one_deployment").await else {
        return;
    };
    // The deployment that came first.
    let store = Store::connect(&db.url, 2).await.expect("connect");
    store.migrate(&[ENGINE_MIGRATIONS]).await.expect("migrate");
    store.bind_prefix("first-deployment").await.expect("bind");

    for args in [
        vec!["engine", "--prefix", "second", "--http", "127.0.0.1:0"],
        vec!["worker", "payment", "--prefix", "second"],
    ] {
        let (code, err) = sagaflow(&args, &db.url).await;
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains(
                "this database belongs to the deployment with queue prefix `first-deployment`"
            ) && err.contains("--prefix `second`"),
            "{args:?}: {err}"
        );
        // Refused before the broker: no connection, no queue of `second` was declared.
        assert!(!err.contains("RabbitMQ"), "{args:?}: {err}");
    }
    // A bench beside it on the same database is refused too, before it seeds or launches.
    let (code, err) = sagaflow(
        &["bench", "--orders", "10", "--database-url", &db.url],
        &db.url,
    )
    .await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("pass --external"), "{err}");
    assert_eq!(
        store.bound_prefix().await.expect("read").as_deref(),
        Some("first-deployment")
    );
}
