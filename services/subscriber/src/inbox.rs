//! The inbox table: which messages a consumer has applied.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::handler::Metadata;

/// The inbox table's migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/inbox");

/// Records that `consumer` applies the message `metadata` describes in the
/// current transaction, after taking the transaction-scoped lock of the
/// message's aggregate (`aggregate`, see [`serial_key`]), with what a
/// timeline of its flow shows (correlation id, producer, time). Returns
/// `false` if it was applied before (the caller must not apply it again).
///
/// The lock is what keeps one aggregate's events one at a time when several
/// replicas consume the same queue: a second replica handling another event
/// of the aggregate waits here until the first commits, and its statements
/// then see what the first one wrote. The insert likewise waits for a
/// concurrent, uncommitted attempt at the same message.
pub async fn record(
    conn: &mut PgConnection,
    consumer: &str,
    aggregate: &str,
    metadata: &Metadata,
) -> sqlx::Result<bool> {
    // One round trip: the lock is taken in a subquery the insert reads from.
    // Single-bigint advisory keys never collide with the relay's two-key
    // lease locks.
    let result = sqlx::query(
        "INSERT INTO inbox (consumer, message_id, event_type, correlation_id, source, occurred_at) \
         SELECT $1, $2, $3, $5, $6, $7 \
         FROM (SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $4, 0))) AS serialised \
         ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(metadata.message_id)
    .bind(&metadata.event_type)
    .bind(aggregate)
    .bind(metadata.correlation_id)
    .bind(&metadata.source)
    .bind(metadata.occurred_at)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// The key a message is serialised on: its aggregate id, or its message id
/// when the producer named no aggregate (then only its duplicates wait).
pub fn serial_key(aggregate_id: Option<&str>, message_id: Uuid) -> String {
    match aggregate_id {
        Some(id) => id.to_owned(),
        None => message_id.to_string(),
    }
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
