//! What the benchmark watches while it drives the checkout, and the
//! statistics it prints.
//!
//! - [`Probe`] reads the order database's status counts and the depth of
//!   each service's work queue; a [`Sampler`] takes one such sample a
//!   second for trends.
//! - [`Confirmations`] listens on the order database's `order_status`
//!   channel, on which the order service announces every status change at
//!   its commit, and notes when each order's change arrived.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Orders by status in the order database.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counts {
    /// Orders still waiting for their saga.
    pub(crate) pending: i64,
    /// Orders confirmed.
    pub(crate) confirmed: i64,
    /// Orders cancelled.
    pub(crate) cancelled: i64,
}

/// One look at the backlog.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// Seconds since the sampler started.
    pub(crate) at: f64,
    /// Orders by status.
    pub(crate) counts: Counts,
    /// Ready messages in each work queue, in the order the [`Probe`] was
    /// given them.
    pub(crate) depths: Vec<u32>,
}

/// Reads the order database and the work queues' depths.
#[derive(Debug)]
pub(crate) struct Probe {
    pool: PgPool,
    queues: Vec<String>,
    channel: lapin::Channel,
    _connection: lapin::Connection,
}

impl Probe {
    /// A probe of `pool` (the order database) and of `queues`.
    pub(crate) async fn connect(
        pool: PgPool,
        broker: &shop_tests::TestBroker,
        queues: Vec<String>,
    ) -> Result<Self> {
        let connection = broker
            .connect()
            .await
            .context("failed to connect to RabbitMQ")?;
        let channel = connection
            .create_channel()
            .await
            .context("failed to open a channel")?;
        Ok(Self {
            pool,
            queues,
            channel,
            _connection: connection,
        })
    }

    /// Orders by status, now.
    pub(crate) async fn counts(&self) -> Result<Counts> {
        let (pending, confirmed, cancelled) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'PENDING'), \
                    count(*) FILTER (WHERE status = 'CONFIRMED'), \
                    count(*) FILTER (WHERE status = 'CANCELLED') \
             FROM orders",
        )
        .fetch_one(&self.pool)
        .await
        .context("failed to count orders")?;
        Ok(Counts {
            pending,
            confirmed,
            cancelled,
        })
    }

    /// Ready messages in each work queue (a passive declare's message
    /// count; messages delivered and not yet acknowledged are not in it).
    pub(crate) async fn depths(&self) -> Result<Vec<u32>> {
        let mut depths = Vec::with_capacity(self.queues.len());
        for queue in &self.queues {
            let declared = self
                .channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("failed to read the depth of {queue}"))?;
            depths.push(declared.message_count());
        }
        Ok(depths)
    }

    /// Polls until no order is pending; returns how long that took, or
    /// `None` after `timeout`.
    pub(crate) async fn wait_drained(&self, timeout: Duration) -> Result<Option<Duration>> {
        let started = Instant::now();
        loop {
            // Drained: no order pending and no message waiting in any work
            // queue (the last steps of a saga, such as OrderConfirmed for
            // inventory, follow the order's confirmation).
            if self.counts().await?.pending == 0
                && self.depths().await?.iter().all(|depth| *depth == 0)
            {
                return Ok(Some(started.elapsed()));
            }
            if started.elapsed() > timeout {
                return Ok(None);
            }
            // Each check counts the orders: often enough, not so often
            // that the count itself loads the database under test.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Samples a [`Probe`] once a second until finished.
#[derive(Debug)]
pub(crate) struct Sampler {
    stop: CancellationToken,
    task: JoinHandle<Result<Vec<Sample>>>,
}

impl Sampler {
    /// Takes the first sample now, then one a second.
    pub(crate) fn start(probe: Arc<Probe>) -> Self {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut samples = Vec::new();
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return Ok(samples),
                    _ = ticks.tick() => {}
                }
                let at = started.elapsed().as_secs_f64();
                let counts = probe.counts().await?;
                let depths = probe.depths().await?;
                samples.push(Sample { at, counts, depths });
            }
        });
        Self { stop, task }
    }

    /// Stops sampling and returns the samples.
    pub(crate) async fn finish(self) -> Result<Vec<Sample>> {
        self.stop.cancel();
        self.task.await.context("the sampler panicked")?
    }
}

/// First and last value of a per-second series and its least-squares slope.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Trend {
    /// The first sample's value.
    pub(crate) first: f64,
    /// The last sample's value.
    pub(crate) last: f64,
    /// Change per second, fitted over every sample.
    pub(crate) slope: f64,
}

/// The trend of `value` over `samples`.
pub(crate) fn trend(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> Trend {
    let points: Vec<(f64, f64)> = samples.iter().map(|s| (s.at, value(s))).collect();
    Trend {
        first: points.first().map_or(0.0, |p| p.1),
        last: points.last().map_or(0.0, |p| p.1),
        slope: slope(&points),
    }
}

/// Least-squares slope of `points`; 0 with fewer than two distinct x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut covariance, mut variance) = (0.0, 0.0);
    for (x, y) in points {
        covariance += (x - mean_x) * (y - mean_y);
        variance += (x - mean_x) * (x - mean_x);
    }
    if variance == 0.0 {
        0.0
    } else {
        covariance / variance
    }
}

/// The `q` quantile (0..=1) of ascending `sorted` values, by nearest rank;
/// `NaN` when empty.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts `values` and returns their p50 and p99.
pub(crate) fn p50_p99(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    (percentile(&values, 0.50), percentile(&values, 0.99))
}

/// When each order's first status change after PENDING was committed, as
/// seen by a listener on the order database's `order_status` channel.
///
/// The order service runs `pg_notify('order_status', <order id>)` in the
/// transaction that changes an order's status, so PostgreSQL delivers it at
/// that transaction's commit. An order leaves PENDING once (to CONFIRMED or
/// CANCELLED), so its first notification is its verdict.
#[derive(Debug)]
pub(crate) struct Confirmations {
    seen: Arc<Mutex<HashMap<Uuid, Instant>>>,
    errors: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Confirmations {
    /// Starts listening; returns once the listener is registered, so no
    /// later commit is missed.
    pub(crate) async fn start(pool: &PgPool) -> Result<Self> {
        let mut listener = PgListener::connect_with(pool)
            .await
            .context("failed to connect the status listener")?;
        listener
            .listen("order_status")
            .await
            .context("failed to listen on order_status")?;
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let errors = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let seen = seen.clone();
            let errors = errors.clone();
            async move {
                loop {
                    match listener.recv().await {
                        Ok(notification) => {
                            let at = Instant::now();
                            if let Ok(id) = Uuid::parse_str(notification.payload()) {
                                seen.lock().expect("seen lock").entry(id).or_insert(at);
                            }
                        }
                        // The listener reconnects on the next call; what
                        // was sent meanwhile is lost, and counted here.
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        });
        Ok(Self { seen, errors, task })
    }

    /// When `id`'s status change arrived, if it has.
    pub(crate) fn get(&self, id: &Uuid) -> Option<Instant> {
        self.seen.lock().expect("seen lock").get(id).copied()
    }

    /// How often the listener lost its connection (notifications may have
    /// been missed then).
    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

impl Drop for Confirmations {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.50), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 1.0), 100.0);
        assert_eq!(percentile(&values, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn slope_fits_a_line() {
        let points: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 3.0 * x as f64 + 2.0)).collect();
        assert!((slope(&points) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 7.0)]), 0.0);
    }
}
