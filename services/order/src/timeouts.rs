//! Sagas that never finish: an order still PENDING after the saga timeout
//! (an event stuck in a dead-letter queue, a service down for good) is
//! cancelled, which compensates like any cancellation: inventory releases
//! what it reserved, payment refunds what it charged, the customer is told.
//!
//! Any number of replicas may run this: each takes the overdue orders'
//! rows with `FOR NO KEY UPDATE SKIP LOCKED` and cancels only orders still
//! pending under that lock.

use std::time::Duration;

use shop_outbox::EventContext;
use shop_proto::events::v1::CancelReason;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Overdue orders cancelled per transaction.
const BATCH: i64 = 50;

/// Cancels overdue orders every so often until `shutdown`.
pub async fn run(pool: PgPool, timeout: Duration, shutdown: CancellationToken) {
    let every = (timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        // Dropped mid-transaction on shutdown: it rolls back.
        let scanned = tokio::select! {
            () = shutdown.cancelled() => return,
            scanned = cancel_overdue(&pool, timeout, &shutdown) => scanned,
        };
        match scanned {
            Ok(0) => {}
            Ok(cancelled) => {
                tracing::warn!(
                    cancelled,
                    ?timeout,
                    "cancelled orders whose saga did not finish in time"
                );
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "failed to cancel overdue orders"
                );
            }
        }
    }
}

/// Cancels every order placed more than `timeout` ago and still pending.
/// Returns how many it cancelled.
pub async fn cancel_overdue(
    pool: &PgPool,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<usize> {
    let detail = format!(
        "the checkout did not finish within {}",
        humantime::format_duration(timeout)
    );
    let mut cancelled = 0;
    while !shutdown.is_cancelled() {
        let mut tx = pool.begin().await?;
        let overdue: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM orders \
             WHERE status = 'PENDING' AND placed_at < now() - $1 * interval '1 second' \
             ORDER BY placed_at LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED",
        )
        .bind(timeout.as_secs_f64())
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        for &id in &overdue {
            let done = crate::events::cancel(
                &mut tx,
                id,
                CancelReason::TimedOut,
                &detail,
                &EventContext::new_flow(id),
            )
            .await
            .map_err(|error| match error {
                shop_subscriber::HandlerError::Transient(error)
                | shop_subscriber::HandlerError::Permanent(error) => error,
            })?;
            if done {
                cancelled += 1;
            }
        }
        tx.commit().await?;
        if (overdue.len() as i64) < BATCH {
            break;
        }
    }
    Ok(cancelled)
}
