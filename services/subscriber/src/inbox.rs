//! The inbox table: which messages a consumer has applied.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// The inbox table's migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/inbox");

/// Records that `consumer` applies `message_id` in the current transaction.
/// Returns `false` if it was applied before (the caller must not apply it
/// again). Waits for a concurrent, uncommitted attempt at the same message.
pub async fn record(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: Uuid,
    event_type: &str,
) -> sqlx::Result<bool> {
    let result = sqlx::query(
        "INSERT INTO inbox (consumer, message_id, event_type) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(message_id)
    .bind(event_type)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Deletes up to `batch` of `consumer`'s entries older than `retention`.
pub async fn prune(
    pool: &PgPool,
    consumer: &str,
    retention: Duration,
    batch: i64,
) -> sqlx::Result<u64> {
    let result = sqlx::query(
        "DELETE FROM inbox WHERE ctid IN ( \
             SELECT ctid FROM inbox \
             WHERE consumer = $1 AND received_at < now() - $2 * interval '1 second' \
             LIMIT $3)",
    )
    .bind(consumer)
    .bind(retention.as_secs_f64())
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}
