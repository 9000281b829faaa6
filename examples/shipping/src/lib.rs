//! The shipping service: the handlers of `shipping.yaml`'s steps, and its table. A handler writes
//! its effect on the connection the SDK gives it, inside the transaction that also writes the
//! barrier row of (saga, step, operation): a command that comes twice has its effect once, and a
//! compensation is called only when its action's effect was committed.
use std::sync::Arc;

use async_trait::async_trait;
use sagaflow_engine::{store::Migrations, transport::Transport};
use sagaflow_workers::runtime::Worker;
use sagaflow_workers::sdk::{SagaStep, StepContext, StepError, param_i64, param_str};
use serde_json::{Value, json};
use sqlx::{AnyConnection as Conn, AnyPool};

pub const SAGA: &str = include_str!("../shipping.yaml");

/// This service's table, applied after `sagaflow_workers::BARRIER_MIGRATIONS`.
pub const MIGRATIONS: Migrations = &[(
    "shipping_0001_shipments",
    include_str!("../migrations/sqlite/0001_shipments.sql"),
    include_str!("../migrations/postgres/0001_shipments.sql"),
)];

/// The `shipping` worker: each step under its action's name, behind the barrier.
pub fn worker(pool: AnyPool, transport: Arc<dyn Transport>) -> Worker {
    let worker = Worker::new("shipping", pool, transport);
    worker.saga_step("reserve", Reserve).saga_step("book", Book)
}

/// `reserve` the order's parcels; compensation `release`.
#[derive(Debug)]
pub struct Reserve;
/// `book` the carrier, which refuses PO boxes (`unserviceable`); compensation `cancel`.
#[derive(Debug)]
pub struct Book;

type Reply = Result<Value, StepError>;

/// The effect: this (saga, step)'s row, which its compensation finds again by the same key.
async fn record(c: &mut Conn, ctx: &StepContext, p: &Value, detail: &str, state: &str) -> Reply {
    let insert = "INSERT INTO shipments (saga_id, step, order_id, detail, state) \
                  VALUES ($1, $2, $3, $4, $5)";
    sqlx::query(insert)
        .bind(&ctx.saga_id)
        .bind(&ctx.step)
        .bind(param_str(p, "order_id")?)
        .bind(detail)
        .bind(state)
        .execute(c)
        .await?;
    Ok(json!({ "state": state, "detail": detail }))
}

async fn undo(c: &mut Conn, ctx: &StepContext, state: &str) -> Reply {
    sqlx::query("UPDATE shipments SET state = $1 WHERE saga_id = $2 AND step = $3")
        .bind(state)
        .bind(&ctx.saga_id)
        .bind(&ctx.step)
        .execute(c)
        .await?;
    Ok(json!({ "state": state }))
}

#[async_trait]
impl SagaStep for Reserve {
    async fn action(&self, c: &mut Conn, ctx: &StepContext, p: &Value) -> Reply {
        let parcels = param_i64(p, "parcels")?;
        record(c, ctx, p, &parcels.to_string(), "reserved").await
    }
    async fn compensate(&self, c: &mut Conn, ctx: &StepContext, _: &Value) -> Reply {
        undo(c, ctx, "released").await
    }
}

#[async_trait]
impl SagaStep for Book {
    async fn action(&self, c: &mut Conn, ctx: &StepContext, p: &Value) -> Reply {
        let address = param_str(p, "address")?;
        if address.to_lowercase().contains("po box") {
            let why = format!("the carrier does not deliver to {address}");
            return Err(StepError::business("unserviceable", why)); // the saga compensates
        }
        let tracking = format!("TRK-{}", ctx.saga_id);
        record(c, ctx, p, &tracking, "booked").await?;
        Ok(json!({ "tracking": tracking }))
    }
    async fn compensate(&self, c: &mut Conn, ctx: &StepContext, _: &Value) -> Reply {
        undo(c, ctx, "cancelled").await
    }
}
