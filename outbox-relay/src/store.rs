//! The relay's SQL over the `outbox` table.
//!
//! Every function takes the connection it must run on: the publishing loop
//! runs fetches and marks on the same connection that holds its partition
//! leases, so a mark can only succeed while the leases are still held.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A pending outbox row, as the relay publishes it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PendingRow {
    pub id: i64,
    pub message_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub traceparent: Option<String>,
    pub attempts: i32,
}

/// A row that failed to publish, and why.
#[derive(Debug, Clone)]
pub struct Failure {
    pub id: i64,
    pub error: String,
    /// Whether trying again cannot help (the row can never be published as
    /// it is): such a row goes to quarantine at once.
    pub permanent: bool,
}

/// Number of partitions aggregates hash into.
pub async fn partition_count(conn: &mut PgConnection) -> sqlx::Result<i32> {
    sqlx::query_scalar("SELECT outbox_partition_count()")
        .fetch_one(conn)
        .await
}

/// `WITH blocked AS (…)`: the aggregates held back from a row on, because
/// that row is quarantined or waiting for a retry. Shared by the fetch and
/// the stall check, so both agree on which rows are ready. The blocked
/// aggregates are gathered once per statement, not looked up per row:
/// statistics taken while the outbox was empty (as it usually is) would
/// otherwise lead the planner to scan every pending row for each one.
macro_rules! blocked_cte {
    () => {
        "WITH blocked AS MATERIALIZED ( \
             SELECT aggregate_type, aggregate_id, min(id) AS from_id \
             FROM outbox \
             WHERE published_at IS NULL \
               AND (quarantined_at IS NOT NULL OR next_attempt_at IS NOT NULL) \
               AND (quarantined_at IS NOT NULL OR next_attempt_at > now()) \
             GROUP BY aggregate_type, aggregate_id)"
    };
}

/// The condition that row `o` is not held back (see `blocked_cte`).
macro_rules! not_blocked {
    () => {
        "NOT EXISTS ( \
             SELECT 1 FROM blocked b \
             WHERE b.aggregate_type = o.aggregate_type \
               AND b.aggregate_id = o.aggregate_id \
               AND b.from_id <= o.id)"
    };
}

/// The oldest pending rows of the given partitions, in publication order,
/// leaving out `in_flight` (rows being published, not yet marked).
///
/// A row is left out while an earlier row of its aggregate is quarantined
/// or waiting for a retry, so an aggregate's events never overtake each
/// other. (Later rows of aggregates with rows in flight are left out by the
/// caller.)
pub async fn fetch_pending(
    conn: &mut PgConnection,
    partitions: &[i32],
    limit: i64,
    in_flight: &[i64],
) -> sqlx::Result<Vec<PendingRow>> {
    sqlx::query_as(concat!(
        blocked_cte!(),
        " SELECT o.id, o.message_id, o.aggregate_type, o.aggregate_id, o.event_type, o.payload, \
                o.content_type, o.occurred_at, o.correlation_id, o.causation_id, o.traceparent, \
                o.attempts \
         FROM outbox o \
         WHERE o.published_at IS NULL \
           AND o.partition = ANY($1) \
           AND o.id <> ALL($3) \
           AND ",
        not_blocked!(),
        " ORDER BY o.id \
         LIMIT $2"
    ))
    .bind(partitions)
    .bind(limit)
    .bind(in_flight)
    // Planned with its values each time: the in-flight ids are then a
    // constant PostgreSQL hashes, not a parameter it scans for every row.
    .persistent(false)
    .fetch_all(conn)
    .await
}

/// Arms this session as an idle relay waiting for rows of `partitions`:
/// from now on, writers to those partitions send `NOTIFY outbox`. Returns
/// the transactions in progress once the arming was visible; a writer that
/// checked before then is one of them (see [`all_finished`]).
pub async fn arm(conn: &mut PgConnection, partitions: &[i32]) -> sqlx::Result<Vec<i64>> {
    forget_dead_listeners(&mut *conn).await?;
    sqlx::query(
        "INSERT INTO outbox_listener (pid, partitions) VALUES (pg_backend_pid(), $1) \
         ON CONFLICT (pid) DO UPDATE SET partitions = $1, armed_at = now()",
    )
    .bind(partitions)
    .execute(&mut *conn)
    .await?;
    sqlx::query_scalar(
        "SELECT coalesce(array_agg(x::text::bigint), '{}') \
         FROM pg_snapshot_xip(pg_current_snapshot()) AS x",
    )
    .fetch_one(conn)
    .await
}

/// Disarms this session: writers stop notifying it.
pub async fn disarm(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM outbox_listener WHERE pid = pg_backend_pid()")
        .execute(conn)
        .await?;
    Ok(())
}

/// Forgets listeners whose sessions are gone (a relay that died armed would
/// otherwise make writers notify for nothing).
pub async fn forget_dead_listeners(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query(
        "DELETE FROM outbox_listener \
         WHERE pid NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)",
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Whether every one of the transactions `xids` has committed or aborted.
pub async fn all_finished(conn: &mut PgConnection, xids: &[i64]) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM unnest($1::bigint[]) AS x \
                            WHERE pg_xact_status(x::text::xid8) = 'in progress')",
    )
    .bind(xids)
    .fetch_one(conn)
    .await
}

/// Marks rows the broker confirmed.
pub async fn mark_published(conn: &mut PgConnection, ids: &[i64]) -> sqlx::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE outbox SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records failed attempts: each row waits `backoff * 2^(attempts-1)` (at
/// most `max_backoff`) before its next try, and is quarantined once it has
/// failed `max_attempts` times, or at once if the failure is permanent.
/// Returns the ids quarantined by this call.
pub async fn record_failures(
    conn: &mut PgConnection,
    failures: &[Failure],
    max_attempts: i32,
    backoff: Duration,
    max_backoff: Duration,
) -> sqlx::Result<Vec<i64>> {
    if failures.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = failures.iter().map(|f| f.id).collect();
    let errors: Vec<String> = failures.iter().map(|f| f.error.clone()).collect();
    let permanent: Vec<bool> = failures.iter().map(|f| f.permanent).collect();
    sqlx::query_scalar(
        "UPDATE outbox o SET \
             attempts = o.attempts + 1, \
             last_error = f.error, \
             next_attempt_at = now() + least( \
                 $3 * power(2, o.attempts) * interval '1 second', \
                 $4 * interval '1 second'), \
             quarantined_at = CASE WHEN f.permanent OR o.attempts + 1 >= $5 THEN now() END \
         FROM unnest($1::bigint[], $2::text[], $6::bool[]) AS f(id, error, permanent) \
         WHERE o.id = f.id AND o.published_at IS NULL \
         RETURNING CASE WHEN o.quarantined_at IS NOT NULL THEN o.id END",
    )
    .bind(&ids)
    .bind(&errors)
    .bind(backoff.as_secs_f64())
    .bind(max_backoff.as_secs_f64())
    .bind(max_attempts)
    .bind(&permanent)
    .fetch_all(conn)
    .await
    .map(|rows: Vec<Option<i64>>| rows.into_iter().flatten().collect())
}

/// Deletes up to `batch` rows published before the retention window.
/// Returns how many were deleted.
pub async fn sweep_published(pool: &PgPool, retention: Duration, batch: i64) -> sqlx::Result<u64> {
    let result = sqlx::query(
        "DELETE FROM outbox WHERE id IN ( \
             SELECT id FROM outbox \
             WHERE published_at < now() - $1 * interval '1 second' \
             ORDER BY id LIMIT $2 \
             FOR UPDATE SKIP LOCKED)",
    )
    .bind(retention.as_secs_f64())
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

/// Backlog figures for the gauges.
#[derive(Debug, Clone, Copy, Default, sqlx::FromRow)]
pub struct Backlog {
    /// Rows waiting to be published (not quarantined).
    pub pending: i64,
    /// Age in seconds of the oldest of them, 0 when there are none.
    pub oldest_pending_age_seconds: f64,
    /// Rows in quarantine.
    pub quarantined: i64,
}

/// Counts the backlog.
pub async fn backlog(pool: &PgPool) -> sqlx::Result<Backlog> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE quarantined_at IS NULL) AS pending, \
                coalesce(extract(epoch FROM now() - min(occurred_at) \
                    FILTER (WHERE quarantined_at IS NULL))::float8, 0) AS oldest_pending_age_seconds, \
                count(*) FILTER (WHERE quarantined_at IS NOT NULL) AS quarantined \
         FROM outbox WHERE published_at IS NULL",
    )
    .fetch_one(pool)
    .await
}

/// How long, in seconds, the longest-waiting row that a relay holding
/// `owned` should be publishing now has waited (0 when none): rows a fetch
/// would return (not quarantined, not waiting for a retry, not behind such
/// a row of their aggregate) in the partitions in `owned` or held by no
/// relay at all. Rows in partitions other live relays hold are theirs.
pub async fn oldest_ready_wait(pool: &PgPool, owned: &[i32]) -> sqlx::Result<f64> {
    sqlx::query_scalar(concat!(
        blocked_cte!(),
        ", held AS MATERIALIZED ( \
             SELECT l.objid::int AS partition FROM pg_locks l \
             JOIN pg_database d ON d.oid = l.database \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
               AND l.classid = $2::int::oid AND d.datname = current_database()) \
         SELECT coalesce(extract(epoch FROM now() \
                    - min(coalesce(o.next_attempt_at, o.occurred_at)))::float8, 0) \
         FROM outbox o \
         WHERE o.published_at IS NULL AND o.quarantined_at IS NULL \
           AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now()) \
           AND (o.partition = ANY($1) OR o.partition NOT IN (SELECT partition FROM held)) \
           AND ",
        not_blocked!()
    ))
    .bind(owned)
    .bind(crate::lease::LOCK_CLASS)
    .fetch_one(pool)
    .await
}

/// A quarantined row, for operators.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QuarantinedRow {
    pub message_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub quarantined_at: DateTime<Utc>,
}

/// Every quarantined row, oldest first.
pub async fn list_quarantined(pool: &PgPool) -> sqlx::Result<Vec<QuarantinedRow>> {
    sqlx::query_as(
        "SELECT message_id, aggregate_type, aggregate_id, event_type, attempts, last_error, \
                quarantined_at \
         FROM outbox WHERE quarantined_at IS NOT NULL AND published_at IS NULL ORDER BY id",
    )
    .fetch_all(pool)
    .await
}

/// Returns quarantined rows to the pending queue with a fresh attempt count.
/// With `message_ids` empty, replays all of them. Returns how many.
pub async fn replay_quarantined(pool: &PgPool, message_ids: &[Uuid]) -> sqlx::Result<u64> {
    let result = sqlx::query(
        "UPDATE outbox SET quarantined_at = NULL, next_attempt_at = NULL, attempts = 0 \
         WHERE quarantined_at IS NOT NULL AND published_at IS NULL \
           AND (cardinality($1::uuid[]) = 0 OR message_id = ANY($1))",
    )
    .bind(message_ids)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}
