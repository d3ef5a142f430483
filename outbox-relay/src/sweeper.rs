//! Deletes published rows after the retention period, refreshes the
//! backlog gauges and tells the health whether the outbox is moving.
//!
//! Deletes go in small batches with `SKIP LOCKED`, so the sweeper never holds
//! long locks and several instances can sweep at once; frequent small deletes
//! plus the table's aggressive autovacuum settings keep it from bloating.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::RelaySettings;
use crate::health::{self, Health};
use crate::store;

/// Sweeps every `sweep_interval` until `shutdown`; watches the backlog
/// more often (at least every fifth of the stall timeout).
pub async fn run(
    pool: PgPool,
    settings: RelaySettings,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let interval = settings.sweep_interval;
    let watch = interval
        .min(Duration::from_secs(5))
        .min(settings.stall_timeout / 5)
        .max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval(watch);
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        watch_backlog(&pool, &health, settings.stall_timeout).await;
        if last_sweep.elapsed() >= interval {
            last_sweep = tokio::time::Instant::now();
            sweep(&pool, settings.retention, settings.sweep_batch, &shutdown).await;
        }
    }
}

async fn watch_backlog(pool: &PgPool, health: &Health, stall_timeout: Duration) {
    match store::oldest_ready_wait(pool, &health.owned()).await {
        Ok(waited) => {
            health
                .observe_backlog(health::seconds(waited), stall_timeout)
                .await;
        }
        Err(error) => tracing::warn!(%error, "failed to check the outbox for stalls"),
    }
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
