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

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::RelaySettings;
use crate::lease::{LEASE_APPLICATION_NAME, Leases};
use crate::publisher::Publisher;
use crate::{store, sweeper};

/// NOTIFY channel of the outbox trigger.
const NOTIFY_CHANNEL: &str = "outbox";
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
        let health_shutdown = CancellationToken::new();
        let health_server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(health_listener),
                    health_shutdown.clone().cancelled_owned(),
                ),
        );

        let db_options = PgConnectOptions::from_str(&worker.settings.database_url)?;
        let sweeper_pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_lazy_with(db_options.clone().application_name("outbox-relay-sweeper"));
        let sweeper = tokio::spawn(sweeper::run(
            sweeper_pool,
            worker.settings.sweep_interval,
            worker.settings.retention,
            worker.settings.sweep_batch,
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

        let session_options = db_options.application_name(LEASE_APPLICATION_NAME);
        let mut backoff = RECONNECT_BACKOFF.0;
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            match worker
                .session(&session_options, &reporter, &wake, &shutdown)
                .await
            {
                Ok(()) => break,
                Err(error) => {
                    reporter
                        .set_service_status("", ServingStatus::NotServing)
                        .await;
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

        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
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
        reporter: &HealthReporter,
        wake: &Notify,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let settings = &self.settings;
        let mut conn = options
            .connect()
            .await
            .context("failed to connect to PostgreSQL")?;
        // Marks need not wait for the WAL flush: a mark lost in a database
        // crash only means the row is published again, which at-least-once
        // delivery allows. This takes an fsync off every batch.
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut conn)
            .await
            .context("failed to configure the lease connection")?;
        let partition_count = store::partition_count(&mut conn)
            .await
            .context("failed to read the outbox partition count; is the outbox migrated?")?;
        let publisher = Publisher::connect(
            &settings.amqp_url,
            &settings.exchange,
            &settings.source,
            settings.max_payload_bytes,
            settings.confirm_timeout,
        )
        .await
        .context("failed to connect to RabbitMQ")?;
        tracing::info!(exchange = %settings.exchange, "relay connected");
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;

        let mut leases = Leases::new(partition_count);
        match self
            .publish_loop(&mut conn, &publisher, &mut leases, wake, shutdown)
            .await
        {
            Ok(()) => {
                leases.release_all(&mut conn).await?;
                publisher.close().await;
                let _ = conn.close().await;
                Ok(())
            }
            Err(error) => {
                leases.forget();
                Err(error)
            }
        }
    }

    async fn publish_loop(
        &self,
        conn: &mut PgConnection,
        publisher: &Publisher,
        leases: &mut Leases,
        wake: &Notify,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let settings = &self.settings;
        let mut next_rebalance = Instant::now();
        while !shutdown.is_cancelled() {
            if Instant::now() >= next_rebalance {
                leases
                    .rebalance(conn)
                    .await
                    .context("failed to rebalance partitions")?;
                next_rebalance = Instant::now() + settings.rebalance_interval;
            }

            let owned = leases.owned();
            let mut more = false;
            if !owned.is_empty() {
                let rows = store::fetch_pending(conn, &owned, settings.batch_size)
                    .await
                    .context("failed to fetch pending rows")?;
                if !rows.is_empty() {
                    let outcome = publisher
                        .publish_batch(&rows)
                        .await
                        .context("failed to publish")?;
                    store::mark_published(conn, &outcome.published)
                        .await
                        .context("failed to mark rows published")?;
                    if !outcome.failed.is_empty() {
                        self.record_failures(conn, &outcome.failed).await?;
                    }
                    more =
                        rows.len() as i64 == settings.batch_size && !outcome.published.is_empty();
                }
            }
            if more {
                continue;
            }
            let wait_until = (Instant::now() + settings.poll_interval).min(next_rebalance);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = wake.notified() => {}
                _ = tokio::time::sleep_until(wait_until) => {}
            }
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
