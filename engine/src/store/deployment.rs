//! One database, one deployment. The queue prefix of the first engine or worker that starts on
//! a database is recorded in it; a process started on that database with another `--prefix` is
//! refused. Without this, two engines of different prefixes on one database took each other's
//! outbox rows and sent commands to queues nobody consumed, and a `sagaflow bench` beside a
//! running deployment disturbed it.
//!
//! The same table keeps the mark of a set of databases that belong together (`pair_mark`):
//! `sagaflow dev`'s engine file and its services' files.
//!
//! The table (`sagaflow_deployment`) comes from the engine's migration 0006 and the workers'
//! 0106: a workers' database may be a database of its own. Migrate first.

use sqlx::Row;

use super::{Store, StoreError};

impl Store {
    /// Binds this database to the deployment whose queues are named `prefix`, or checks that
    /// it is bound to it already; [`StoreError::BadUrl`] names both prefixes otherwise.
    pub async fn bind_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sagaflow_deployment (key, value) VALUES ('amqp_prefix', $1) \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(prefix)
        .execute(&self.pool)
        .await?;
        let bound: String =
            sqlx::query("SELECT value FROM sagaflow_deployment WHERE key = 'amqp_prefix'")
                .fetch_one(&self.pool)
                .await?
                .try_get("value")?;
        if bound == prefix {
            return Ok(());
        }
        Err(StoreError::BadUrl(format!(
            "this database belongs to the deployment with queue prefix `{bound}`, and this process was started with --prefix `{prefix}`: one database serves one deployment (two would take each other's outbox rows). Start it with --prefix {bound}, or give the other deployment a database of its own"
        )))
    }

    /// The prefix this database is bound to, if any.
    pub async fn bound_prefix(&self) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT value FROM sagaflow_deployment WHERE key = 'amqp_prefix'")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("value")).transpose()?)
    }

    /// The mark of the set of databases this one belongs to, if it has one (`sagaflow dev`
    /// writes one random mark into its engine's file, and it with the service's name after it
    /// into each service's file, so that it can tell a set from files of different runs or a
    /// file taken for another service's).
    pub async fn pair_mark(&self) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT value FROM sagaflow_deployment WHERE key = 'pair'")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("value")).transpose()?)
    }

    /// Records `mark` as this database's pair mark, replacing any other.
    pub async fn set_pair_mark(&self, mark: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sagaflow_deployment (key, value) VALUES ('pair', $1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(mark)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
