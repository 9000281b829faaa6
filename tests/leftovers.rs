//! What a killed test process leaves behind is removed by the next run: a test database
//! carries its creator's process id, and one whose process is gone is dropped, while one whose
//! process is alive is left alone.

mod support;

#[tokio::test]
async fn databases_of_dead_test_processes_are_swept_and_live_ones_kept() {
    let Some(_mine) = support::fresh_db(support::Backend::Postgres, "leftovers").await else {
        return;
    };
    let url = std::env::var("SAGAFLOW_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let mut admin = support::connect_patiently(&url).await.expect("admin");
    // A process id nobody has: the highest below the kernel's limit that is not running.
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let dead = (1..max)
        .rev()
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid");
    let suffix = format!("{:08x}", fastrand::u32(..));
    let orphan = format!("sagaflow_t{dead}_killed_test_{suffix}");
    let alive = format!("sagaflow_t{}_running_test_{suffix}", std::process::id());
    for name in [&orphan, &alive] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create");
    }
    let dropped = support::sweep_leftovers(&mut admin).await;
    let exists = |name: String| {
        let url = url.clone();
        async move {
            let mut c = support::connect_patiently(&url).await.expect("admin");
            let n: i64 = sqlx::Row::get(
                &sqlx::query("SELECT COUNT(*) AS n FROM pg_database WHERE datname = $1")
                    .bind(name)
                    .fetch_one(&mut c)
                    .await
                    .expect("count"),
                "n",
            );
            n == 1
        }
    };
    let orphan_left = exists(orphan.clone()).await;
    let alive_left = exists(alive.clone()).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {alive} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .expect("drop");
    assert!(dropped.contains(&orphan), "{dropped:?}");
    assert!(!orphan_left, "the dead process's database is gone");
    assert!(alive_left, "a live process's database is kept");
    assert!(!dropped.contains(&alive));
}
