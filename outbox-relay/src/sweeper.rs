//! Deletes published rows after the retention period and refreshes the
//! backlog gauges.
//!
//! Deletes go in small batches with `SKIP LOCKED`, so the sweeper never holds
//! long locks and several instances can sweep at once; frequent small deletes
//! plus the table's aggressive autovacuum settings keep it from bloating.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::store;

/// Sweeps every `interval` until `shutdown`.
pub async fn run(
    pool: PgPool,
    interval: Duration,
    retention: Duration,
    batch: i64,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval.min(Duration::from_secs(5)));
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        refresh_gauges(&pool).await;
        if last_sweep.elapsed() >= interval {
            last_sweep = tokio::time::Instant::now();
            sweep(&pool, retention, batch, &shutdown).await;
        }
    }
}

async fn refresh_gauges(pool: &PgPool) {
    match store::backlog(pool).await {
        Ok(backlog) => {
            metrics::gauge!(crate::metrics::PENDING_ROWS).set(backlog.pending as f64);
            metrics::gauge!(crate::metrics::OLDEST_PENDING_AGE)
                .set(backlog.oldest_pending_age_seconds);
            metrics::gauge!(crate::metrics::QUARANTINED_ROWS).set(backlog.quarantined as f64);
        }
        Err(error) => tracing::warn!(%error, "failed to count the outbox backlog"),
    }
}

async fn sweep(pool: &PgPool, retention: Duration, batch: i64, shutdown: &CancellationToken) {
    let mut total = 0;
    while !shutdown.is_cancelled() {
        match store::sweep_published(pool, retention, batch).await {
            Ok(deleted) => {
                total += deleted;
                metrics::counter!(crate::metrics::SWEPT).increment(deleted);
                if deleted < batch as u64 {
                    break;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "failed to sweep published outbox rows");
                break;
            }
        }
    }
    if total > 0 {
        tracing::debug!(deleted = total, "swept published outbox rows");
    }
}
