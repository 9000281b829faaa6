//! An order service that starts the `order-paid` saga (sagas/order.yaml) from its own database
//! transaction, with `sagaflow-client`.
//!
//! For each order it opens a transaction, inserts the order row, calls `start_saga` with the
//! order id as the idempotency key, and commits. A `Relay` runs alongside and publishes the
//! committed start requests to RabbitMQ, where a sagaflow engine on the same broker (same
//! `--prefix` and `--partitions`) starts one saga per order.
//!
//! ```sh
//! cargo run -p sagaflow-client --example order_service -- \
//!     --database-url postgres://postgres@127.0.0.1:5432/orders \
//!     --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f --orders 10 --fail-commit
//! ```
//!
//! With `--fail-commit` every second order's transaction fails after `start_saga` (it is rolled
//! back): neither its order row nor its start request exists afterwards, and nothing is
//! published for it — the summary shows it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use sagaflow_client::{Relay, install, start_saga};
use sagaflow_engine::transport::Transport;
use sagaflow_engine::transport::amqp::{AmqpConfig, AmqpTransport};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::watch;

#[derive(Debug, Parser)]
#[command(about = "A sample order service starting `order-paid` sagas from its own transactions")]
struct Args {
    /// The order service's own PostgreSQL database.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// The RabbitMQ broker the sagaflow engine consumes.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Prefix of the broker's exchanges and queues (the engine's).
    #[arg(long, default_value = "sagaflow")]
    prefix: String,
    /// Partitions per queue (must match the engine's).
    #[arg(long, default_value_t = 8)]
    partitions: u16,
    /// Orders to create.
    #[arg(long, default_value_t = 10)]
    orders: usize,
    /// Make every second order's transaction fail after `start_saga`: it is rolled back, and
    /// starts nothing.
    #[arg(long)]
    fail_commit: bool,
}

const ORDERS_TABLE: &str = "\
CREATE TABLE IF NOT EXISTS orders (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    amount      NUMERIC(12, 2) NOT NULL,
    coupon_id   TEXT NOT NULL,
    points      INTEGER NOT NULL,
    campaign_id TEXT NOT NULL,
    status      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
)";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SAGAFLOW_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();

    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&args.database_url)
        .await
        .context("connecting to the order database")?;
    {
        let mut conn = pool.acquire().await?;
        sqlx::raw_sql(ORDERS_TABLE).execute(&mut *conn).await?;
        install(&mut conn).await?;
    }

    let mut config = AmqpConfig::new(&args.amqp_url);
    config.prefix = args.prefix.clone();
    config.partitions = args.partitions;
    let transport = AmqpTransport::connect(config)
        .await
        .context("connecting to RabbitMQ")?;

    let relay = Relay::new(pool.clone(), transport.clone() as Arc<dyn Transport>)
        .with_poll_interval(Duration::from_millis(100));
    let (stop, stopped) = watch::channel(false);
    let relay_task = {
        let relay = relay.clone();
        tokio::spawn(async move { relay.run(stopped).await })
    };

    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut committed = BTreeSet::new();
    let mut rolled_back = BTreeSet::new();
    for i in 0..args.orders {
        let order_id = format!("o-{run}-{i}");
        let cents = 100 + (i as u64 * 7919) % 40_000;
        let amount = format!("{}.{:02}", cents / 100, cents % 100);
        let input = json!({
            "order_id": order_id,
            "user_id": format!("u-{i}"),
            "amount": amount,
            "coupon_id": format!("c-{i}"),
            "points": cents / 100,
            "campaign_id": if i % 2 == 0 { "spring" } else { "summer" },
        });

        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO orders (id, user_id, amount, coupon_id, points, campaign_id, status) \
             VALUES ($1, $2, $3::numeric, $4, $5, $6, 'paid')",
        )
        .bind(&order_id)
        .bind(format!("u-{i}"))
        .bind(&amount)
        .bind(format!("c-{i}"))
        .bind((cents / 100) as i32)
        .bind(if i % 2 == 0 { "spring" } else { "summer" })
        .execute(&mut *tx)
        .await?;
        start_saga(&mut tx, "order-paid", &input, &order_id).await?;
        if args.fail_commit && i % 2 == 1 {
            // Whatever made the transaction fail, the start request goes with it.
            tx.rollback().await?;
            println!("{order_id}: transaction failed, rolled back");
            rolled_back.insert(order_id);
        } else {
            tx.commit().await?;
            println!("{order_id}: paid, saga order-paid requested");
            committed.insert(order_id);
        }
    }

    // Wait for the relay to have every committed start confirmed by the broker.
    let began = Instant::now();
    while relay.pending().await? > 0 {
        if began.elapsed() > Duration::from_secs(30) {
            bail!("start requests still unconfirmed after 30s: is RabbitMQ reachable?");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(true);
    let _ = relay_task.await;
    transport.close().await;

    // What exists now, from the database: committed orders with a sent start request each,
    // rolled-back orders without either.
    let mut sent = 0;
    let mut leaked = 0;
    for id in &committed {
        let row: Option<(bool,)> = sqlx::query_as(
            "SELECT sent_at IS NOT NULL FROM sagaflow_start_outbox WHERE idempotency_key = $1",
        )
        .bind(id)
        .fetch_optional(&pool)
        .await?;
        if row == Some((true,)) {
            sent += 1;
        }
    }
    for id in &rolled_back {
        let (orders, starts): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM orders WHERE id = $1), \
                    (SELECT COUNT(*) FROM sagaflow_start_outbox WHERE idempotency_key = $1)",
        )
        .bind(id)
        .fetch_one(&pool)
        .await?;
        leaked += orders + starts;
    }
    println!(
        "orders committed: {} (start requests confirmed by the broker: {sent}); rolled back: {} (rows left behind: {leaked})",
        committed.len(),
        rolled_back.len()
    );
    if sent != committed.len() || leaked != 0 {
        bail!("the outbox does not match the committed orders");
    }
    Ok(())
}
