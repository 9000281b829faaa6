//! The shipping service: its saga, its table and its steps' handlers. Each writes its effect on
//! the connection the SDK gives it, in the transaction of the step's barrier row: a command that
//! comes twice has its effect once, a compensation runs only after its action's effect committed.
use async_trait::async_trait;
use sagaflow_workers::sdk::{SagaStep, StepContext, StepError, param_i64, param_str};
use sagaflow_workers::service::Service;
use serde_json::{Value, json};
use sqlx::AnyConnection as Conn;

/// What `src/main.rs` runs (`sagaflow_workers::service` says how the environment sets it up).
pub const SERVICE: Service = Service {
    name: "shipping",
    sagas: &[include_str!("../shipping.yaml")],
    migrations: &[(
        "shipping_0001_shipments",
        include_str!("../migrations/sqlite/0001_shipments.sql"),
        include_str!("../migrations/postgres/0001_shipments.sql"),
    )],
    handlers: |w| w.saga_step("reserve", Reserve).saga_step("book", Book), // by action name
};

struct Reserve; // `reserve` the order's parcels; compensation `release`
struct Book; // `book` the carrier, which refuses PO boxes; compensation `cancel`

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
        record(c, ctx, p, &param_i64(p, "parcels")?.to_string(), "reserved").await
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
