//! The relay process: start-up, the publishing loop, reconnection and
//! graceful shutdown.
//!
//! One publishing loop runs per instance. Each pass it rebalances partition
//! leases when due, fetches the oldest pending rows of its partitions,
//! publishes them with confirms, and marks the confirmed ones published, all
//! on the connection that holds the leases. It sleeps until a NOTIFY from the
//! outbox trigger, the poll interval, or the next rebalance, whichever comes
//! first. Any database or broker error ends the session: the leases go with
//! the connection, unmarked rows stay pending, and a new session starts after
//! a backoff. Rows confirmed but not yet marked are published again, which is
//! the "at least once" in the guarantee.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::config::RelaySettings;
use crate::health::Health;
use crate::lease::{LEASE_APPLICATION_NAME, Leases};
use crate::publisher::{BatchOutcome, PublishError, Publisher};
use crate::{store, sweeper};

/// NOTIFY channel of the outbox trigger.
const NOTIFY_CHANNEL: &str = "outbox";

/// Health name that is SERVING for as long as the health endpoint answers.
pub const LIVENESS: &str = "liveness";
/// Shortest and longest wait before reconnecting after a failure.
const RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(10));

/// A relay instance, built and ready to run.
#[derive(Debug)]
pub struct Relay {
    settings: RelaySettings,
    health_listener: TcpListener,
    health_addr: SocketAddr,
}

impl Relay {
    /// Validates the settings and binds the health endpoint.
    pub async fn build(settings: RelaySettings) -> anyhow::Result<Self> {
        settings.validate()?;
        PgConnectOptions::from_str(&settings.database_url)
            .context("--database-url is not a valid PostgreSQL URL")?;
        let health_listener = TcpListener::bind(settings.health_addr)
            .await
            .with_context(|| {
                format!(
                    "failed to bind the health endpoint to {}",
                    settings.health_addr
                )
            })?;
        let health_addr = health_listener.local_addr()?;
        Ok(Self {
            settings,
            health_listener,
            health_addr,
        })
    }

    /// Address the gRPC health service listens on.
    pub fn health_addr(&self) -> SocketAddr {
        self.health_addr
    }

    /// Runs until `shutdown` is cancelled, then finishes the batch in
    /// flight, waits for its confirms, marks it and releases the leases.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Relay {
            settings,
            health_listener,
            ..
        } = self;
        let worker = Worker { settings };
        let (reporter, health_service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        // SERVING for as long as the health endpoint answers: for liveness
        // probes, which should not restart a relay over an outage.
        reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        let health = Arc::new(Health::new(reporter));
        let health_shutdown = CancellationToken::new();
        let health_server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service)
                .serve_with_incoming_shutdown(
                    health_incoming(health_listener),
                    health_shutdown.clone().cancelled_owned(),
                ),
        );

        let db_options = PgConnectOptions::from_str(&worker.settings.database_url)?;
        let sweeper_pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_lazy_with(db_options.clone().application_name("outbox-relay-sweeper"));
        let sweeper = tokio::spawn(sweeper::run(
            sweeper_pool,
            worker.settings.clone(),
            health.clone(),
            shutdown.clone(),
        ));

        let wake = Arc::new(Notify::new());
        let listener = worker.settings.listen.then(|| {
            tokio::spawn(listen(
                db_options.clone().application_name("outbox-relay-listener"),
                wake.clone(),
                shutdown.clone(),
            ))
        });

        let session_options = lease_options(db_options, worker.settings.lease_timeout);
        let mut backoff = RECONNECT_BACKOFF.0;
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            match worker
                .session(&session_options, &health, &wake, &shutdown)
                .await
            {
                Ok(()) => break,
                Err(error) => {
                    health.set_connected(false).await;
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff = RECONNECT_BACKOFF.0;
                    }
                    tracing::warn!(error = format!("{error:#}"), retry_in = ?backoff, "relay session ended");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RECONNECT_BACKOFF.1);
                }
            }
        }

        health.set_connected(false).await;
        let _ = sweeper.await;
        if let Some(listener) = listener {
            let _ = listener.await;
        }
        health_shutdown.cancel();
        health_server
            .await
            .context("health server task failed")?
            .context("health server failed")?;
        tracing::info!("relay stopped");
        Ok(())
    }
}

/// Options of the lease connection. PostgreSQL ends the session, and with
/// it the partition locks, after `lease_timeout` of silence: a relay that
/// is frozen (SIGSTOP, a paused VM) or cut off by the network loses its
/// partitions to the others within that time. The server's TCP keepalives
/// also find a vanished peer within about the same time.
fn lease_options(options: PgConnectOptions, lease_timeout: Duration) -> PgConnectOptions {
    let millis = lease_timeout.as_millis().to_string();
    let keepalive = (lease_timeout.as_secs() / 3).max(1).to_string();
    options.application_name(LEASE_APPLICATION_NAME).options([
        // Marks need not wait for the WAL flush: a mark lost in a database
        // crash only means the row is published again, which at-least-once
        // delivery allows. This takes an fsync off every batch.
        ("synchronous_commit", "off"),
        ("idle_session_timeout", millis.as_str()),
        ("idle_in_transaction_session_timeout", millis.as_str()),
        ("tcp_keepalives_idle", keepalive.as_str()),
        ("tcp_keepalives_interval", keepalive.as_str()),
        ("tcp_keepalives_count", "2"),
    ])
}

/// Runs one statement (or a few) on the lease connection with a deadline
/// of `limit`. Past it the session is given up: the connection may be cut
/// off, and PostgreSQL frees an unresponsive session's partitions anyway.
async fn within<T>(
    limit: Duration,
    future: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| anyhow::anyhow!("the lease connection did not answer within {limit:?}"))?
}

/// The accepted connections of the health endpoint: `TCP_NODELAY` on, so
/// probes are answered at once rather than after the client's delayed ACK,
/// and TCP keepalive on.
pub fn health_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}

/// The publishing side of a relay instance.
#[derive(Debug)]
struct Worker {
    settings: RelaySettings,
}

impl Worker {
    /// One connected session: returns `Ok` on shutdown, `Err` when the
    /// database or the broker failed.
    async fn session(
        &self,
        options: &PgConnectOptions,
        health: &Health,
        wake: &Notify,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let settings = &self.settings;
        let limit = settings.lease_timeout;
        // The broker first: the lease connection must not sit idle (and be
        // ended by the server) while a slow broker answers.
        let connect = Publisher::connect(
            &settings.broker,
            &settings.exchange,
            &settings.source,
            settings.max_payload_bytes,
            settings.confirm_timeout,
        );
        let publisher = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            publisher = connect => publisher?,
        };
        let mut conn = within(limit, async {
            options
                .connect()
                .await
                .context("failed to connect to PostgreSQL")
        })
        .await?;
        let partition_count = within(limit, async {
            store::partition_count(&mut conn)
                .await
                .context("failed to read the outbox partition count; is the outbox migrated?")
        })
        .await?;
        tracing::info!(exchange = %settings.exchange, "relay connected");
        health.set_connected(true).await;

        let publisher = Arc::new(publisher);
        let mut leases = Leases::new(partition_count);
        match self
            .publish_loop(&mut conn, &publisher, &mut leases, health, wake, shutdown)
            .await
        {
            Ok(()) => {
                within(limit, async { Ok(leases.release_all(&mut conn).await?) }).await?;
                health.set_owned(Vec::new());
                publisher.close().await;
                let _ = conn.close().await;
                Ok(())
            }
            Err(error) => {
                leases.forget();
                health.set_owned(Vec::new());
                Err(error)
            }
        }
    }

    async fn publish_loop(
        &self,
        conn: &mut PgConnection,
        publisher: &Arc<Publisher>,
        leases: &mut Leases,
        health: &Health,
        wake: &Notify,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let settings = &self.settings;
        let limit = settings.lease_timeout;
        // Statements that move rows may legitimately take longer than the
        // lease timeout (a batch of large payloads); while one runs, the
        // server does not count the session as idle.
        let data_limit = settings.lease_timeout.max(settings.confirm_timeout);
        let depth = usize::from(settings.pipeline_depth);
        let mut pipeline = Pipeline::default();
        let mut idle = Idle::new(settings.listen);
        within(limit, async {
            store::forget_dead_listeners(conn)
                .await
                .context("failed to clean up the listeners of dead relays")
        })
        .await?;
        let mut next_rebalance = Instant::now();
        // The lease connection is touched at least this often, so that
        // PostgreSQL's idle_session_timeout only ends sessions of relays
        // that stopped (frozen, cut off), never of one waiting for confirms.
        let beat = limit / 3;
        let mut next_beat = Instant::now() + beat;
        // Whether rows may be waiting: set by a full batch, a finished
        // batch (its aggregates may have more), a notification or a poll.
        let mut fetch = true;
        loop {
            let stopping = shutdown.is_cancelled();
            if stopping && pipeline.is_empty() {
                break;
            }
            if Instant::now() >= next_beat {
                within(limit, async {
                    sqlx::query("SELECT 1")
                        .execute(&mut *conn)
                        .await
                        .context("the lease connection failed")
                })
                .await?;
                next_beat = Instant::now() + beat;
            }
            // Leases change only with nothing in flight, so a partition is
            // never given away while its rows are being published.
            let rebalance_due = Instant::now() >= next_rebalance;
            if rebalance_due && pipeline.is_empty() && !stopping {
                within(limit, async {
                    leases
                        .rebalance(conn)
                        .await
                        .context("failed to rebalance partitions")?;
                    if idle.armed {
                        idle.arm(conn, &leases.owned()).await?;
                    }
                    Ok(())
                })
                .await?;
                health.set_owned(leases.owned());
                next_rebalance = Instant::now() + settings.rebalance_interval;
                fetch = true;
            }

            // Fill the pipeline.
            let owned = leases.owned();
            let mut found = None;
            while fetch
                && !stopping
                && Instant::now() < next_rebalance
                && pipeline.len() < depth
                && !owned.is_empty()
            {
                let in_flight = pipeline.in_flight_ids();
                let mut rows = within(data_limit, async {
                    store::fetch_pending(conn, &owned, settings.batch_size, &in_flight)
                        .await
                        .context("failed to fetch pending rows")
                })
                .await?;
                let fetched = rows.len();
                let full = fetched as i64 == settings.batch_size;
                if fetched > 0 {
                    found = Some(true);
                } else {
                    found.get_or_insert(false);
                }
                // Aggregates with rows in flight wait for them: their later
                // rows go in a later batch.
                pipeline.leave_out_busy(&mut rows);
                if rows.is_empty() {
                    // Nothing new until a batch finishes (or a
                    // notification or the poll says otherwise).
                    fetch = false;
                    break;
                }
                fetch = full;
                pipeline.start(publisher, rows);
            }
            within(limit, idle.after_fill(conn, found)).await?;

            // Wait for a batch to finish, a notification or a timer.
            let deadline = if pipeline.is_empty() {
                idle.deadline(settings.poll_interval).min(next_rebalance)
            } else if Instant::now() < next_rebalance {
                next_rebalance
            } else {
                // A rebalance waits for the batches in flight.
                Instant::now() + settings.confirm_timeout
            }
            .min(next_beat);
            tokio::select! {
                _ = shutdown.cancelled(), if !stopping => {}
                finished = pipeline.next_finished(), if !pipeline.is_empty() => {
                    let mut outcomes = vec![finished?];
                    let mut failed = None;
                    while let Some(more) = pipeline.try_next_finished() {
                        match more {
                            Ok(outcome) => outcomes.push(outcome),
                            Err(error) => {
                                failed = Some(error);
                                break;
                            }
                        }
                    }
                    // Batches the broker confirmed are marked even when
                    // another one failed, so they are not published again.
                    within(data_limit, self.settle(conn, health, outcomes)).await?;
                    if let Some(error) = failed {
                        return Err(error);
                    }
                    fetch = true;
                }
                _ = wake.notified() => fetch = true,
                _ = tokio::time::sleep_until(deadline) => {
                    if pipeline.is_empty()
                        && within(limit, idle.on_timer(conn, &owned, settings.poll_interval)).await?
                    {
                        fetch = true;
                    }
                }
            }
        }
        if idle.armed {
            within(limit, async {
                store::disarm(conn).await.context("failed to disarm")
            })
            .await?;
        }
        Ok(())
    }

    /// Marks the confirmed rows of finished batches, in one statement, and
    /// records their failures.
    async fn settle(
        &self,
        conn: &mut PgConnection,
        health: &Health,
        outcomes: Vec<BatchOutcome>,
    ) -> anyhow::Result<()> {
        let published: Vec<i64> = outcomes
            .iter()
            .flat_map(|outcome| outcome.published.iter().copied())
            .collect();
        store::mark_published(conn, &published)
            .await
            .context("failed to mark rows published")?;
        if !published.is_empty() {
            health.progressed();
        }
        let failed: Vec<store::Failure> = outcomes
            .into_iter()
            .flat_map(|outcome| outcome.failed)
            .collect();
        if !failed.is_empty() {
            self.record_failures(conn, &failed).await?;
        }
        Ok(())
    }

    async fn record_failures(
        &self,
        conn: &mut PgConnection,
        failures: &[store::Failure],
    ) -> anyhow::Result<()> {
        let settings = &self.settings;
        for failure in failures {
            tracing::warn!(row = failure.id, error = %failure.error, "failed to publish outbox row");
        }
        metrics::counter!(crate::metrics::PUBLISH_FAILURES).increment(failures.len() as u64);
        let quarantined = store::record_failures(
            conn,
            failures,
            settings.max_attempts,
            settings.retry_backoff,
            settings.max_retry_backoff,
        )
        .await
        .context("failed to record failed rows")?;
        for row in quarantined {
            tracing::error!(row, "outbox row quarantined after too many failed attempts");
        }
        Ok(())
    }
}

/// A batch the broker has confirmed (or failed row by row), with the
/// aggregates it held.
type Published = (Vec<(String, String)>, Vec<i64>, BatchOutcome);

/// Batches published and awaiting their confirms, and the aggregates they
/// hold (no two batches in flight share an aggregate).
#[derive(Debug, Default)]
struct Pipeline {
    tasks: JoinSet<Result<Published, PublishError>>,
    busy: HashSet<(String, String)>,
    in_flight: HashSet<i64>,
}

impl Pipeline {
    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The ids of the rows being published.
    fn in_flight_ids(&self) -> Vec<i64> {
        self.in_flight.iter().copied().collect()
    }

    /// Drops the rows of aggregates that have rows in flight.
    fn leave_out_busy(&self, rows: &mut Vec<store::PendingRow>) {
        if self.busy.is_empty() {
            return;
        }
        rows.retain(|row| {
            !self
                .busy
                .contains(&(row.aggregate_type.clone(), row.aggregate_id.clone()))
        });
    }

    /// Publishes `rows` in the background.
    fn start(&mut self, publisher: &Arc<Publisher>, rows: Vec<store::PendingRow>) {
        let aggregates: Vec<(String, String)> = rows
            .iter()
            .map(|row| (row.aggregate_type.clone(), row.aggregate_id.clone()))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        self.busy.extend(aggregates.iter().cloned());
        let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
        self.in_flight.extend(&ids);
        let publisher = publisher.clone();
        self.tasks.spawn(async move {
            let outcome = publisher.publish_batch(&rows).await?;
            Ok((aggregates, ids, outcome))
        });
    }

    /// Waits for the next batch to be confirmed. Cancel-safe.
    async fn next_finished(&mut self) -> anyhow::Result<BatchOutcome> {
        match self.tasks.join_next().await {
            Some(finished) => self.finish(finished),
            None => std::future::pending().await,
        }
    }

    /// A batch already confirmed, if any.
    fn try_next_finished(&mut self) -> Option<anyhow::Result<BatchOutcome>> {
        self.tasks
            .try_join_next()
            .map(|finished| self.finish(finished))
    }

    fn finish(
        &mut self,
        finished: Result<Result<Published, PublishError>, tokio::task::JoinError>,
    ) -> anyhow::Result<BatchOutcome> {
        let (aggregates, ids, outcome) = finished
            .context("a publishing task failed")?
            .context("failed to publish")?;
        for aggregate in &aggregates {
            self.busy.remove(aggregate);
        }
        for id in &ids {
            self.in_flight.remove(id);
        }
        Ok(outcome)
    }
}

/// When writers must wake this relay.
///
/// A relay that keeps finding rows does not need notifications, and every
/// notifying commit takes a database-wide lock, so a busy relay is disarmed:
/// writers do not notify it and it fetches again as soon as a batch is out.
/// Once it finds nothing, it looks again after 1, 2, 4 and 8 ms; still
/// nothing, it arms itself (see [`store::arm`]) and sleeps until a
/// notification or the poll interval. Right after arming it fetches once
/// more, and once again when the transactions that were in progress at
/// arming have ended, so a commit that raced the arming is not left for the
/// poll.
#[derive(Debug)]
struct Idle {
    listen: bool,
    armed: bool,
    /// Empty fetches in a row while disarmed.
    lingered: u32,
    /// Fetches in a row that found rows.
    busy_streak: u32,
    /// Transactions in progress when the relay armed, not yet seen ended.
    racing: Vec<i64>,
    racing_since: Instant,
    racing_check: Duration,
}

/// Empty fetches a disarmed relay makes (after 1, 2, 4, 8 ms) before arming.
const LINGER_STEPS: u32 = 4;

impl Idle {
    fn new(listen: bool) -> Self {
        Self {
            listen,
            armed: false,
            lingered: 0,
            busy_streak: 0,
            racing: Vec::new(),
            racing_since: Instant::now(),
            racing_check: Duration::from_millis(1),
        }
    }

    async fn arm(&mut self, conn: &mut PgConnection, partitions: &[i32]) -> anyhow::Result<()> {
        self.racing = store::arm(conn, partitions)
            .await
            .context("failed to arm for notifications")?;
        self.racing_since = Instant::now();
        self.racing_check = Duration::from_millis(1);
        self.armed = true;
        Ok(())
    }

    /// Updates the state after filling the pipeline; `found` says whether
    /// the fetches found rows (`None`: there was no fetch).
    async fn after_fill(
        &mut self,
        conn: &mut PgConnection,
        found: Option<bool>,
    ) -> anyhow::Result<()> {
        let Some(found) = found else {
            return Ok(());
        };
        if !self.listen {
            return Ok(());
        }
        if found {
            self.lingered = 0;
            self.busy_streak += 1;
            if self.armed && self.busy_streak >= 2 {
                store::disarm(conn).await.context("failed to disarm")?;
                self.armed = false;
                self.racing.clear();
            }
        } else {
            self.busy_streak = 0;
        }
        Ok(())
    }

    /// When an idle relay should look again without a notification.
    fn deadline(&self, poll_interval: Duration) -> Instant {
        let now = Instant::now();
        if !self.listen {
            return now + poll_interval;
        }
        if !self.armed {
            return now + Duration::from_millis(1 << self.lingered.min(LINGER_STEPS));
        }
        if !self.racing.is_empty() {
            return now + self.racing_check.min(poll_interval);
        }
        now + poll_interval
    }

    /// The idle timer fired; returns whether to fetch again. A disarmed
    /// relay that lingered long enough arms here.
    async fn on_timer(
        &mut self,
        conn: &mut PgConnection,
        partitions: &[i32],
        poll_interval: Duration,
    ) -> anyhow::Result<bool> {
        if !self.listen || self.busy_streak > 0 {
            return Ok(true);
        }
        if !self.armed {
            self.lingered += 1;
            if self.lingered >= LINGER_STEPS {
                self.arm(conn, partitions).await?;
            }
            return Ok(true);
        }
        if !self.racing.is_empty() {
            // A transaction that stays open longer than the poll interval
            // is left to the poll.
            if self.racing_since.elapsed() >= poll_interval
                || store::all_finished(conn, &self.racing)
                    .await
                    .context("failed to check transactions")?
            {
                self.racing.clear();
            } else {
                self.racing_check = (self.racing_check * 2).min(Duration::from_millis(100));
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Forwards outbox notifications to `wake` until `shutdown`, reconnecting
/// after failures. Notifications lost while disconnected only cost latency:
/// the publishing loop also polls, and every reconnect wakes it once.
async fn listen(options: PgConnectOptions, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut backoff = RECONNECT_BACKOFF.0;
    while !shutdown.is_cancelled() {
        let result: anyhow::Result<()> = async {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .max_lifetime(None)
                .idle_timeout(None)
                .connect_lazy_with(options.clone());
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            wake.notify_one();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    received = listener.try_recv() => {
                        // `None` means the connection dropped; the next
                        // `try_recv` reconnects and re-subscribes.
                        received?;
                        wake.notify_one();
                    }
                }
            }
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, retry_in = ?backoff, "outbox listener failed");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RECONNECT_BACKOFF.1);
        } else {
            return;
        }
    }
}
