//! The subscriber: consumes a work queue and applies each message once.
//!
//! Deliveries are spread over `concurrency` lanes by aggregate, so events of
//! one aggregate are handled one after another, in arrival order, while
//! different aggregates proceed in parallel. For each delivery a lane:
//!
//! 1. reads the metadata and finds the handler for the event type (neither
//!    found: dead-letter at once);
//! 2. begins a transaction, takes the transaction-scoped advisory lock of
//!    the message's aggregate and records the message id in the inbox; if it
//!    was there already, the message is a duplicate: acknowledge, do nothing;
//! 3. runs the handler in that transaction and commits;
//! 4. acknowledges only after the commit. A transient failure is re-published
//!    to a delay queue (confirmed) and then acknowledged; a permanent one, or
//!    the last attempt, goes to the dead-letter queue the same way.
//!
//! The aggregate lock carries the lanes' one-at-a-time guarantee across
//! processes: with several replicas on one queue, two events of an order
//! are never applied concurrently, and the second sees what the first
//! committed. Replicas can still apply them in either order, so handlers
//! must accept any order (see the services' handlers).
//!
//! If the database is unreachable, the lane waits and tries the same
//! delivery again without spending an attempt. If the broker connection
//! breaks, unacknowledged deliveries return to the queue and are redelivered,
//! and the inbox turns any already committed ones into no-ops.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::handler::{EventHandler, HandlerError, HandlerTx, Metadata};
use crate::inbox;
use crate::settings::SubscriberSettings;
use crate::topology::{Topology, retry_delay};

/// Header carrying the attempt number of a retried message.
pub const ATTEMPT_HEADER: &str = "x-attempt";
/// Header on a dead-lettered message: why it failed.
pub const REASON_HEADER: &str = "x-dead-letter-reason";
/// Header on a dead-lettered message: attempts made.
pub const ATTEMPTS_HEADER: &str = "x-attempts";
/// Header on a dead-lettered message: the queue it failed in.
pub const ORIGINAL_QUEUE_HEADER: &str = "x-original-queue";
/// Header on a retried or dead-lettered message: its routing key on the
/// events exchange (a message back from a retry queue arrives under the
/// work queue's name).
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-original-routing-key";

/// Longest wait for the broker to confirm or accept an acknowledgement.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait for the broker to answer a cancel or a close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait between tries while the database is unreachable.
const MAX_DATABASE_BACKOFF: Duration = Duration::from_secs(10);

trait Dispatch: Send + Sync {
    fn dispatch<'a>(
        &'a self,
        tx: &'a mut HandlerTx,
        payload: &'a [u8],
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

struct Typed<E, H> {
    handler: H,
    _event: PhantomData<fn() -> E>,
}

impl<E, H> Dispatch for Typed<E, H>
where
    E: prost::Message + Default + 'static,
    H: EventHandler<E>,
{
    fn dispatch<'a>(
        &'a self,
        tx: &'a mut HandlerTx,
        payload: &'a [u8],
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let event = E::decode(payload).map_err(|error| {
                HandlerError::permanent(format!(
                    "cannot decode the payload as {}: {error}",
                    metadata.event_type
                ))
            })?;
            self.handler.handle(tx, event, metadata).await
        })
    }
}

/// Collects the handlers of one subscriber.
pub struct SubscriberBuilder {
    consumer: String,
    queue: String,
    settings: SubscriberSettings,
    handlers: HashMap<String, Arc<dyn Dispatch>>,
    retired: Vec<String>,
}

impl std::fmt::Debug for SubscriberBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriberBuilder")
            .field("consumer", &self.consumer)
            .field("queue", &self.queue)
            .field("event_types", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SubscriberBuilder {
    /// Handles events of type `E` (bound by its full protobuf name) with
    /// `handler`. One handler per event type.
    pub fn on<E, H>(mut self, handler: H) -> Self
    where
        E: prost::Message + prost::Name + Default + 'static,
        H: EventHandler<E>,
    {
        let previous = self.handlers.insert(
            E::full_name(),
            Arc::new(Typed {
                handler,
                _event: PhantomData,
            }),
        );
        assert!(previous.is_none(), "two handlers for {}", E::full_name());
        self
    }

    /// For events of type `E` that an earlier version routed to this queue
    /// and that now go to another one: removes the binding, and handles
    /// with `handler` the ones still queued here (the handler must be
    /// idempotent, as the new queue's may apply them too), so an upgrade
    /// strands none of them.
    pub fn retire<E, H>(mut self, handler: H) -> Self
    where
        E: prost::Message + prost::Name + Default + 'static,
        H: EventHandler<E>,
    {
        self = self.on::<E, H>(handler);
        self.retired.push(E::full_name());
        self
    }

    /// Finishes the subscriber; it applies messages through `pool`.
    pub fn build(self, pool: PgPool) -> Subscriber {
        let mut routing_keys: Vec<String> = self
            .handlers
            .keys()
            .filter(|key| !self.retired.contains(key))
            .cloned()
            .collect();
        routing_keys.sort();
        let mut retired_keys = self.retired;
        retired_keys.sort();
        let topology = Topology {
            consumer: self.consumer.clone(),
            exchange: self.settings.exchange.clone(),
            queue: format!("{}{}", self.settings.queue_prefix, self.queue),
            routing_keys,
            retired_keys,
            kind: self.settings.queue_kind,
            max_attempts: self.settings.max_attempts,
        };
        Subscriber {
            inner: Arc::new(Inner {
                consumer: self.consumer,
                settings: self.settings,
                topology,
                handlers: self.handlers,
                pool,
                consuming: tokio::sync::watch::Sender::new(false),
            }),
        }
    }
}

/// A running-ready subscriber; see the module documentation.
#[derive(Debug, Clone)]
pub struct Subscriber {
    inner: Arc<Inner>,
}

struct Inner {
    consumer: String,
    settings: SubscriberSettings,
    topology: Topology,
    handlers: HashMap<String, Arc<dyn Dispatch>>,
    pool: PgPool,
    /// Whether a session is consuming from the broker now.
    consuming: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("consumer", &self.consumer)
            .field("topology", &self.topology)
            .finish_non_exhaustive()
    }
}

/// What became of one delivery.
enum Outcome {
    Handled,
    Duplicate,
    Retry(String),
    DeadLetter(String),
    /// Not the message's fault: the database is out of reach, or a lock
    /// was not had in time (the lock timeout, a deadlock). The same
    /// delivery is tried again after a pause, without spending an attempt.
    DatabaseUnavailable(anyhow::Error),
}

impl Subscriber {
    /// Starts a subscriber named `consumer` (the inbox key, also the AMQP
    /// connection name) on work queue `queue`.
    pub fn builder(
        consumer: impl Into<String>,
        queue: impl Into<String>,
        settings: SubscriberSettings,
    ) -> SubscriberBuilder {
        SubscriberBuilder {
            consumer: consumer.into(),
            queue: queue.into(),
            settings,
            handlers: HashMap::new(),
            retired: Vec::new(),
        }
    }

    /// Whether the subscriber is consuming from the broker: false before it
    /// runs, while it reconnects after a broker failure, and once stopped.
    pub fn consuming(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.consuming.subscribe()
    }

    /// The queues and bindings this subscriber declares.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Declares the topology without consuming, so events published before
    /// the first run are kept for this subscriber.
    pub async fn declare(&self) -> anyhow::Result<()> {
        self.inner.settings.broker.validate()?;
        let conn = self
            .inner
            .settings
            .broker
            .connect(&self.inner.consumer)
            .await?;
        // A broker that accepted the connection but does not answer fails
        // the start instead of holding it forever.
        let declared =
            tokio::time::timeout(BROKER_TIMEOUT, self.inner.topology.declare(&conn)).await;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "OK".into())).await;
        match declared {
            Ok(declared) => declared.context("failed to declare the subscriber's queues"),
            Err(_) => Err(anyhow::anyhow!(
                "the broker did not answer the subscriber's declarations within {BROKER_TIMEOUT:?}"
            )),
        }
    }

    /// Consumes until `shutdown`, reconnecting with backoff after broker
    /// failures. On shutdown, stops consuming, finishes the deliveries
    /// already received, and returns.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // Tasks live in join sets so that dropping this future (a crash or an
        // abort) stops them too, and with them the broker connection.
        let mut pruner = tokio::task::JoinSet::new();
        pruner.spawn(prune_inbox(self.inner.clone(), shutdown.clone()));
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            match self.session(&shutdown).await {
                Ok(()) => break,
                Err(error) => {
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff = Duration::from_millis(100);
                    }
                    tracing::warn!(
                        consumer = %self.inner.consumer,
                        error = format!("{error:#}"),
                        retry_in = ?backoff,
                        "subscriber session ended"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        while pruner.join_next().await.is_some() {}
        Ok(())
    }

    async fn session(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let inner = &self.inner;
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            conn = inner.settings.broker.connect(&inner.consumer) => conn?,
        };
        // A broker that accepted the connection but does not answer (still
        // starting, its queues not yet recovered) must not hold the
        // subscriber forever: past the timeout the session starts over.
        let setup = async {
            inner
                .topology
                .declare(&conn)
                .await
                .context("failed to declare the subscriber's queues")?;
            let channel = conn.create_channel().await?;
            let publisher = conn.create_channel().await?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            channel
                .basic_qos(inner.settings.prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    inner.topology.queue.as_str().into(),
                    inner.consumer.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .context("failed to consume")?;
            anyhow::Ok((channel, publisher, consumer))
        };
        let set_up = tokio::select! {
            _ = shutdown.cancelled() => Err(None),
            set_up = tokio::time::timeout(BROKER_TIMEOUT, setup) => match set_up {
                Ok(Ok(set_up)) => Ok(set_up),
                Ok(Err(error)) => Err(Some(error)),
                Err(_) => Err(Some(anyhow::anyhow!(
                    "the broker did not answer the subscriber's set-up within {BROKER_TIMEOUT:?}"
                ))),
            },
        };
        let (channel, publisher, mut consumer) = match set_up {
            Ok(set_up) => set_up,
            Err(error) => {
                // The connection is not left open behind a failed set-up;
                // a broker that does not answer gets a bounded wait.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "OK".into())).await;
                return error.map_or(Ok(()), Err);
            }
        };
        tracing::info!(consumer = %inner.consumer, queue = %inner.topology.queue, "subscriber consuming");
        inner.consuming.send_replace(true);
        // Whatever ends this session, the subscriber is no longer consuming.
        let _not_consuming = NotConsuming(&inner.consuming);

        let lane_count = inner.settings.concurrency.max(1) as usize;
        let mut lanes = Vec::with_capacity(lane_count);
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..lane_count {
            let (tx, rx) = mpsc::channel::<Delivery>(inner.settings.prefetch.max(1) as usize);
            lanes.push(tx);
            workers.spawn(run_lane(
                inner.clone(),
                publisher.clone(),
                rx,
                shutdown.clone(),
            ));
        }

        // The consumer stream does not always end when the connection
        // drops, so the connection's state is watched as well.
        let mut watchdog = tokio::time::interval(Duration::from_secs(1));
        let result = loop {
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = watchdog.tick() => {
                    if conn.status().connected() && channel.status().connected() {
                        continue;
                    }
                    break Err(anyhow::anyhow!("the connection to the broker was lost"));
                }
                next = consumer.next() => next,
            };
            match delivery {
                Some(Ok(delivery)) => {
                    let lane = lane_of(&delivery, lane_count);
                    if lanes[lane].send(delivery).await.is_err() {
                        break Err(anyhow::anyhow!("a subscriber lane stopped"));
                    }
                }
                Some(Err(error)) => break Err(anyhow::Error::new(error).context("consumer failed")),
                None => break Err(anyhow::anyhow!("the broker cancelled the consumer")),
            }
        };

        if result.is_ok() {
            // Shutdown: stop the flow first, then let the lanes finish what
            // they hold and acknowledge it.
            // A broker that stopped answering gets a bounded wait; the
            // lanes then finish as they would have anyway.
            let _ = tokio::time::timeout(
                CLOSE_TIMEOUT,
                channel.basic_cancel(
                    inner.consumer.as_str().into(),
                    BasicCancelOptions::default(),
                ),
            )
            .await;
            drop(lanes);
            while workers.join_next().await.is_some() {}
        } else {
            // The connection is gone: nothing the lanes hold can be
            // acknowledged any more. Stop them; open transactions roll back
            // and the broker redelivers their messages.
            workers.abort_all();
            while workers.join_next().await.is_some() {}
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "OK".into())).await;
        result
    }
}

/// Clears the consuming flag when a session ends, however it ends.
struct NotConsuming<'a>(&'a tokio::sync::watch::Sender<bool>);

impl Drop for NotConsuming<'_> {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
}

/// Picks the lane of a delivery: by aggregate, so one aggregate's events are
/// handled in order; by message id when the producer named no aggregate.
fn lane_of(delivery: &Delivery, lanes: usize) -> usize {
    let key = header_str(&delivery.properties, "aggregate_id")
        .or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
        })
        .unwrap_or_default();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % lanes as u64) as usize
}

async fn run_lane(
    inner: Arc<Inner>,
    publisher: Channel,
    mut deliveries: mpsc::Receiver<Delivery>,
    shutdown: CancellationToken,
) {
    let batch_size = usize::from(inner.settings.batch_size.max(1));
    while let Some(first) = deliveries.recv().await {
        // Whatever else has already arrived joins the batch; a lane never
        // waits to fill one.
        let mut batch = vec![first];
        while batch.len() < batch_size {
            match deliveries.try_recv() {
                Ok(delivery) => batch.push(delivery),
                Err(_) => break,
            }
        }
        if batch.len() == 1 {
            if !inner.apply_one(&publisher, &batch[0], &shutdown).await {
                return;
            }
        } else if !inner.apply_batch(&publisher, &batch, &shutdown).await {
            return;
        }
    }
}

/// How a run of deliveries, applied in one transaction, ended.
enum Run {
    /// Every delivery committed and acknowledged.
    Done,
    /// The first `committed` deliveries were committed and acknowledged;
    /// the next one waited too long for a row lock held by another
    /// transaction, and was rolled back alone.
    Contended { committed: usize },
    /// The first `committed` deliveries were committed and acknowledged;
    /// the next one failed (or the rest could not be committed) and must
    /// be applied on its own, with retries or dead-lettering.
    Failed { committed: usize },
    /// The broker connection broke after a commit: nothing more can be
    /// acknowledged in this session.
    Stopped,
}

/// Why one delivery of a run was rolled back.
enum RunFailure {
    /// It waited for a row lock longer than [`BATCH_LOCK_TIMEOUT`] (or was
    /// chosen as a deadlock victim).
    Contended,
    /// Anything else: the handler failed or panicked, or the database did.
    Other,
}

/// Longest time a delivery applied in a batch waits for a row lock. Batches
/// hold the rows of several aggregates until they commit and lock them in
/// delivery order, so two lanes or replicas can wait on each other; past
/// this the batch commits what it has, which releases its locks, and goes
/// on from the delivery that waited.
const BATCH_LOCK_TIMEOUT: &str = "20ms";

/// SQLSTATEs of a lock wait that timed out and of a deadlock victim. (A
/// statement cancelled at its `statement_timeout` is not among them: it
/// may be slow for reasons of its own, and is retried as a failed
/// attempt, so it ends in the dead-letter queue rather than stalling the
/// lane for good.)
const LOCK_NOT_AVAILABLE: &str = "55P03";
const DEADLOCK_DETECTED: &str = "40P01";

/// Commits a batch's transaction. The commit itself may wait for a lock
/// (a transaction that sent NOTIFY takes PostgreSQL's notification queue
/// lock at commit), so the lock timeout is lifted first, the batch's
/// and the connection's: a commit that failed would throw the whole batch
/// away. (The statement timeout still bounds it.)
async fn commit_without_lock_timeout(mut tx: HandlerTx) -> sqlx::Result<()> {
    sqlx::query("SET LOCAL lock_timeout = 0")
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Whether a database error means the database cannot be reached now, as
/// opposed to a fault in the statement or its data: no connection from the
/// pool in time, a broken connection, or the server refusing connections
/// (SQLSTATE class 08, 53300 too many connections, 57P01–57P03 shutting
/// down or starting up).
pub fn database_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        // Not a healthy PostgreSQL at the other end, e.g. a proxy in front
        // of a database that is down closing the connection before the TLS
        // negotiation is answered.
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || code == "53300" || code.starts_with("57P0")
        }),
        _ => false,
    }
}

/// Whether an error is a lock wait that timed out or a deadlock.
fn is_contention(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .is_some_and(is_contention_sqlx)
    })
}

fn is_contention_sqlx(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|error| error.code())
        .is_some_and(|code| code == LOCK_NOT_AVAILABLE || code == DEADLOCK_DETECTED)
}

impl Inner {
    /// Applies one delivery in its own transaction and settles it, waiting
    /// out database outages. Returns false if the lane must stop.
    async fn apply_one(
        &self,
        publisher: &Channel,
        delivery: &Delivery,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            let outcome = self.apply(delivery).await;
            if let Outcome::DatabaseUnavailable(error) = &outcome {
                tracing::warn!(consumer = %self.consumer, error = format!("{error:#}"), retry_in = ?backoff, "database unavailable or contended");
                tokio::select! {
                    // Leave the delivery unacknowledged: it returns to the
                    // queue when the channel closes.
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_DATABASE_BACKOFF);
                continue;
            }
            if let Err(error) = self.settle(publisher, delivery, outcome, started).await {
                // Unacknowledged; the broker redelivers it after reconnecting.
                tracing::warn!(consumer = %self.consumer, error = format!("{error:#}"), "failed to settle a delivery");
            }
            return true;
        }
    }

    /// Applies a lane's batch: as many deliveries per transaction as go
    /// through (see [`Inner::apply_run`]); a delivery that fails is applied
    /// on its own, so it is retried or dead-lettered alone. Returns false if
    /// the lane must stop.
    async fn apply_batch(
        &self,
        publisher: &Channel,
        batch: &[Delivery],
        shutdown: &CancellationToken,
    ) -> bool {
        let mut prepared = Vec::with_capacity(batch.len());
        for delivery in batch {
            let Ok(metadata) = metadata(delivery) else {
                break;
            };
            let Some(handler) = self.handlers.get(&metadata.event_type) else {
                break;
            };
            prepared.push((delivery, metadata, handler.clone()));
        }
        let mut next = 0;
        // Deliveries that cannot be prepared (no metadata, no handler) are
        // dead-lettered one at a time, after the ones before them.
        while next < prepared.len() {
            let alone = match self.apply_run(publisher, &prepared[next..]).await {
                Run::Done => {
                    next = prepared.len();
                    false
                }
                Run::Contended { committed } => {
                    next += committed;
                    // A delivery that cannot get its locks even at the head
                    // of a run waits for them in a transaction of its own.
                    committed == 0
                }
                Run::Failed { committed } => {
                    next += committed;
                    true
                }
                Run::Stopped => return false,
            };
            if alone {
                if !self.apply_one(publisher, prepared[next].0, shutdown).await {
                    return false;
                }
                next += 1;
            }
        }
        for delivery in &batch[next..] {
            if !self.apply_one(publisher, delivery, shutdown).await {
                return false;
            }
        }
        true
    }

    /// Applies deliveries in one transaction: for each, in order, a
    /// savepoint, the inbox row and the handler; then one commit and the
    /// acknowledgements. The first delivery that fails is rolled back to its
    /// savepoint and the ones before it are committed without it.
    async fn apply_run(
        &self,
        publisher: &Channel,
        run: &[(&Delivery, Metadata, Arc<dyn Dispatch>)],
    ) -> Run {
        let started = Instant::now();
        let Ok(mut tx) = self.pool.begin().await else {
            return Run::Failed { committed: 0 };
        };
        let limited = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET LOCAL lock_timeout = '{BATCH_LOCK_TIMEOUT}'"
        )))
        .execute(&mut *tx)
        .await;
        if limited.is_err() {
            return Run::Failed { committed: 0 };
        }
        let mut outcomes = Vec::with_capacity(run.len());
        let mut stopped = None;
        for (delivery, metadata, handler) in run {
            if sqlx::query("SAVEPOINT delivery")
                .execute(&mut *tx)
                .await
                .is_err()
            {
                let _ = tx.rollback().await;
                return Run::Failed { committed: 0 };
            }
            match self.run_handler(&mut tx, delivery, metadata, handler).await {
                Ok(outcome) => outcomes.push(outcome),
                Err(failure) => {
                    let undone = sqlx::query("ROLLBACK TO SAVEPOINT delivery")
                        .execute(&mut *tx)
                        .await;
                    if undone.is_err() {
                        let _ = tx.rollback().await;
                        return Run::Failed { committed: 0 };
                    }
                    stopped = Some(failure);
                    break;
                }
            }
        }
        if outcomes.is_empty() {
            // Rolled back now, not when the connection goes back to the
            // pool: the locks it holds would stall the next run.
            let _ = tx.rollback().await;
        } else if let Err(error) = commit_without_lock_timeout(tx).await {
            tracing::debug!(consumer = %self.consumer, %error, "batch commit failed; applying its messages one at a time");
            return Run::Failed { committed: 0 };
        }
        let committed = outcomes.len();
        tracing::debug!(consumer = %self.consumer, committed, of = run.len(), elapsed = ?started.elapsed(), "run committed");
        if committed > 1 {
            metrics::histogram!(crate::metrics::BATCH_SIZE, "consumer" => self.consumer.clone())
                .record(committed as f64);
        }
        for ((delivery, _, _), outcome) in run.iter().zip(outcomes) {
            if let Err(error) = self.settle(publisher, delivery, outcome, started).await {
                // Committed but unacknowledged: redelivered after a
                // reconnect and then recognised by the inbox.
                tracing::warn!(consumer = %self.consumer, error = format!("{error:#}"), "failed to acknowledge a committed batch");
                return Run::Stopped;
            }
        }
        match stopped {
            None => Run::Done,
            Some(RunFailure::Contended) => Run::Contended { committed },
            Some(RunFailure::Other) => Run::Failed { committed },
        }
    }

    /// Records one message in the inbox and runs its handler inside `tx`.
    async fn run_handler(
        &self,
        tx: &mut HandlerTx,
        delivery: &Delivery,
        metadata: &Metadata,
        handler: &Arc<dyn Dispatch>,
    ) -> Result<Outcome, RunFailure> {
        let span = self.span(metadata);
        async {
            let aggregate = inbox::serial_key(metadata.aggregate_id.as_deref(), metadata.message_id);
            match inbox::record(tx, &self.consumer, &aggregate, metadata).await
            {
                Ok(true) => {}
                Ok(false) => return Ok(Outcome::Duplicate),
                Err(error) if is_contention_sqlx(&error) => return Err(RunFailure::Contended),
                Err(_) => return Err(RunFailure::Other),
            }
            let started = Instant::now();
            let result = AssertUnwindSafe(handler.dispatch(tx, &delivery.data, metadata))
                .catch_unwind()
                .await;
            metrics::histogram!(crate::metrics::HANDLER_SECONDS, "consumer" => self.consumer.clone(), "event_type" => metadata.event_type.clone())
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(Ok(())) => Ok(Outcome::Handled),
                Ok(Err(HandlerError::Transient(error) | HandlerError::Permanent(error)))
                    if is_contention(&error) =>
                {
                    Err(RunFailure::Contended)
                }
                _ => Err(RunFailure::Other),
            }
        }
        .instrument(span)
        .await
    }

    /// The span of one message's handling, continuing the producer's trace.
    fn span(&self, metadata: &Metadata) -> tracing::Span {
        let span = tracing::info_span!(
            "handle_event",
            consumer = %self.consumer,
            event_type = %metadata.event_type,
            message_id = %metadata.message_id,
            attempt = metadata.attempt,
        );
        shop_outbox::trace::continue_trace(&span, metadata.traceparent.as_deref());
        span
    }

    async fn apply(&self, delivery: &Delivery) -> Outcome {
        let metadata = match metadata(delivery) {
            Ok(metadata) => metadata,
            Err(reason) => return Outcome::DeadLetter(reason),
        };
        let Some(handler) = self.handlers.get(&metadata.event_type) else {
            return Outcome::DeadLetter(format!(
                "no handler for event type {}",
                metadata.event_type
            ));
        };
        let span = self.span(&metadata);
        async {
            let mut tx = match self.pool.begin().await {
                Ok(tx) => tx,
                Err(error) => return Outcome::DatabaseUnavailable(error.into()),
            };
            let aggregate = inbox::serial_key(metadata.aggregate_id.as_deref(), metadata.message_id);
            match inbox::record(&mut tx, &self.consumer, &aggregate, &metadata).await {
                Ok(true) => {}
                Ok(false) => return Outcome::Duplicate,
                // An outage, or a deadlock with another replica: try the
                // same delivery again without spending an attempt.
                Err(error) if database_unavailable(&error) || is_contention_sqlx(&error) => {
                    return Outcome::DatabaseUnavailable(error.into());
                }
                // Something about the message itself (say, a header
                // PostgreSQL refuses): an ordinary failed attempt.
                Err(error) => return Outcome::Retry(format!("failed to record the message: {error}")),
            }
            let started = Instant::now();
            let result = AssertUnwindSafe(handler.dispatch(&mut tx, &delivery.data, &metadata))
                .catch_unwind()
                .await;
            metrics::histogram!(crate::metrics::HANDLER_SECONDS, "consumer" => self.consumer.clone(), "event_type" => metadata.event_type.clone())
                .record(started.elapsed().as_secs_f64());
            let failed = match result {
                Ok(Ok(())) => {
                    return match tx.commit().await {
                        Ok(()) => Outcome::Handled,
                        // Refused by the server (a lock for NOTIFY not had
                        // in time, a deadlock): rolled back, so the same
                        // delivery again.
                        Err(error) if is_contention_sqlx(&error) => {
                            Outcome::DatabaseUnavailable(error.into())
                        }
                        Err(error) => Outcome::Retry(format!("commit failed: {error}")),
                    };
                }
                // A lock not had in time inside the handler: the same
                // delivery again, as for the inbox insert above.
                Ok(Err(HandlerError::Transient(error))) if is_contention(&error) =>
                {
                    Outcome::DatabaseUnavailable(error)
                }
                Ok(Err(HandlerError::Transient(error))) => Outcome::Retry(format!("{error:#}")),
                Ok(Err(HandlerError::Permanent(error))) => Outcome::DeadLetter(format!("{error:#}")),
                Err(_) => Outcome::Retry("the handler panicked".to_owned()),
            };
            // Release the handler's locks at once rather than when the
            // connection is next used.
            let _ = tx.rollback().await;
            failed
        }
        .instrument(span)
        .await
    }

    /// Acknowledges a delivery after doing what its outcome requires.
    async fn settle(
        &self,
        publisher: &Channel,
        delivery: &Delivery,
        outcome: Outcome,
        started: Instant,
    ) -> anyhow::Result<()> {
        let attempt = attempt_of(&delivery.properties);
        let label = match outcome {
            Outcome::Handled => "handled",
            Outcome::Duplicate => "duplicate",
            Outcome::Retry(reason) if attempt < self.settings.max_attempts => {
                let delay = retry_delay(
                    attempt,
                    self.settings.retry_backoff,
                    self.settings.max_retry_backoff,
                );
                tracing::warn!(consumer = %self.consumer, attempt, ?delay, %reason, "handler failed; will retry");
                let mut headers = headers_of(&delivery.properties);
                headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(attempt + 1));
                keep_original_routing_key(&mut headers, delivery);
                let properties = delivery
                    .properties
                    .clone()
                    .with_headers(headers)
                    .with_expiration(delay.as_millis().to_string().as_str().into());
                publish_confirmed(
                    publisher,
                    &self.topology.retry_queue(attempt),
                    &delivery.data,
                    properties,
                )
                .await?;
                "retried"
            }
            Outcome::Retry(reason) | Outcome::DeadLetter(reason) => {
                tracing::error!(consumer = %self.consumer, attempt, %reason, "message dead-lettered");
                let mut headers = headers_of(&delivery.properties);
                let mut put = |key: &str, value: AMQPValue| {
                    headers.insert(ShortString::from(key), value);
                };
                put(
                    REASON_HEADER,
                    AMQPValue::LongString(LongString::from(reason)),
                );
                put(ATTEMPTS_HEADER, AMQPValue::LongUInt(attempt));
                put(
                    ORIGINAL_QUEUE_HEADER,
                    AMQPValue::LongString(LongString::from(self.topology.queue.as_str())),
                );
                keep_original_routing_key(&mut headers, delivery);
                let properties = delivery.properties.clone().with_headers(headers);
                publish_confirmed(
                    publisher,
                    &self.topology.dead_letter_queue(),
                    &delivery.data,
                    properties,
                )
                .await?;
                "dead_lettered"
            }
            Outcome::DatabaseUnavailable(_) => unreachable!("handled by the lane"),
        };
        tokio::time::timeout(BROKER_TIMEOUT, delivery.ack(BasicAckOptions::default()))
            .await
            .context("acknowledgement timed out")?
            .context("failed to acknowledge")?;
        metrics::counter!(crate::metrics::MESSAGES, "consumer" => self.consumer.clone(), "outcome" => label).increment(1);
        tracing::debug!(consumer = %self.consumer, outcome = label, elapsed = ?started.elapsed(), "delivery settled");
        Ok(())
    }
}

async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> anyhow::Result<()> {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            payload,
            properties,
        )
        .await?;
    let confirmation = tokio::time::timeout(BROKER_TIMEOUT, confirm)
        .await
        .map_err(|_| anyhow::anyhow!("the broker did not confirm within {BROKER_TIMEOUT:?}"))??;
    anyhow::ensure!(
        confirmation == Confirmation::Ack(None),
        "the broker did not accept the message for {queue}"
    );
    Ok(())
}

/// Records the delivery's routing key as the original one, unless an
/// earlier retry already did (the delivery then came back from a retry
/// queue under the work queue's name).
fn keep_original_routing_key(headers: &mut FieldTable, delivery: &Delivery) {
    let key = ShortString::from(ORIGINAL_ROUTING_KEY_HEADER);
    if !headers.inner().contains_key(&key) {
        headers.insert(
            key,
            AMQPValue::LongString(LongString::from(delivery.routing_key.as_str())),
        );
    }
}

/// Reads the metadata of a delivery; the error is a dead-letter reason.
fn metadata(delivery: &Delivery) -> Result<Metadata, String> {
    let properties = &delivery.properties;
    let message_id = properties
        .message_id()
        .as_ref()
        .and_then(|id| Uuid::parse_str(id.as_str()).ok())
        .ok_or("the message has no valid message_id")?;
    let event_type = properties
        .kind()
        .as_ref()
        .map(|kind| kind.to_string())
        .or_else(|| header_str(properties, ORIGINAL_ROUTING_KEY_HEADER))
        .unwrap_or_else(|| delivery.routing_key.to_string());
    Ok(Metadata {
        message_id,
        event_type,
        aggregate_type: header_str(properties, "aggregate_type"),
        aggregate_id: header_str(properties, "aggregate_id"),
        occurred_at: cloud_event_time(properties),
        correlation_id: properties
            .correlation_id()
            .as_ref()
            .and_then(|id| Uuid::parse_str(id.as_str()).ok()),
        traceparent: header_str(properties, "traceparent"),
        source: cloud_event_attribute(properties, "source")
            .or_else(|| properties.app_id().as_ref().map(|app| app.to_string())),
        attempt: attempt_of(properties),
        redelivered: delivery.redelivered,
    })
}

/// A CloudEvents attribute of a message: under the AMQP binding's names
/// (`cloudEvents_time`, or `cloudEvents:time`, which the binding also
/// allows), or under the HTTP binding's (`ce-time`) that relays before the
/// AMQP binding wrote, so messages published before an upgrade are still
/// understood.
pub fn cloud_event_attribute(properties: &BasicProperties, name: &str) -> Option<String> {
    ["cloudEvents_", "cloudEvents:", "ce-"]
        .into_iter()
        .find_map(|prefix| header_str(properties, &format!("{prefix}{name}")))
}

/// The CloudEvents `time` of a message: an RFC 3339 string, or a native
/// AMQP timestamp (whole seconds), as the binding allows either.
fn cloud_event_time(properties: &BasicProperties) -> Option<chrono::DateTime<chrono::Utc>> {
    if let Some(text) = cloud_event_attribute(properties, "time") {
        return chrono::DateTime::parse_from_rfc3339(&text)
            .ok()
            .map(|time| time.with_timezone(&chrono::Utc));
    }
    let headers = properties.headers().as_ref()?;
    ["cloudEvents_time", "cloudEvents:time"]
        .into_iter()
        .find_map(|key| match headers.inner().get(key) {
            Some(AMQPValue::Timestamp(seconds)) => {
                chrono::DateTime::from_timestamp(i64::try_from(*seconds).ok()?, 0)
            }
            _ => None,
        })
}

fn headers_of(properties: &BasicProperties) -> FieldTable {
    properties.headers().clone().unwrap_or_default()
}

/// A string header of a message.
pub fn header_str(properties: &BasicProperties, key: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(value) => Some(value.to_string()),
        AMQPValue::ShortString(value) => Some(value.to_string()),
        _ => None,
    }
}

/// The attempt number a message carries (1 when it has none).
pub fn attempt_of(properties: &BasicProperties) -> u32 {
    let value = properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(ATTEMPT_HEADER).cloned());
    match value {
        Some(AMQPValue::LongUInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => n.max(1) as u32,
        Some(AMQPValue::LongLongInt(n)) => n.max(1) as u32,
        Some(AMQPValue::ShortUInt(n)) => n.into(),
        Some(AMQPValue::ShortShortUInt(n)) => n.into(),
        _ => 1,
    }
    .max(1)
}

async fn prune_inbox(inner: Arc<Inner>, shutdown: CancellationToken) {
    let every = (inner.settings.inbox_retention / 10)
        .clamp(Duration::from_secs(1), Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        loop {
            match inbox::prune(
                &inner.pool,
                &inner.consumer,
                inner.settings.inbox_retention,
                1000,
            )
            .await
            {
                Ok(1000) => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "failed to prune the inbox");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_headers(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (key, value) in headers {
            table.insert((*key).into(), value.clone());
        }
        BasicProperties::default().with_headers(table)
    }

    #[test]
    fn cloud_events_time_and_source_are_read_in_every_form_the_bindings_allow() {
        let text = |value: &str| AMQPValue::LongString(LongString::from(value));
        let expected = chrono::DateTime::parse_from_rfc3339("2026-11-29T10:00:00Z")
            .unwrap()
            .to_utc();
        for properties in [
            with_headers(&[("cloudEvents_time", text("2026-11-29T10:00:00Z"))]),
            with_headers(&[("cloudEvents:time", text("2026-11-29T10:00:00Z"))]),
            with_headers(&[("ce-time", text("2026-11-29T10:00:00Z"))]),
            with_headers(&[(
                "cloudEvents_time",
                AMQPValue::Timestamp(expected.timestamp() as u64),
            )]),
        ] {
            assert_eq!(
                cloud_event_time(&properties),
                Some(expected),
                "{properties:?}"
            );
        }
        // The AMQP binding's name wins over the older one.
        let both = with_headers(&[
            ("cloudEvents_source", text("new")),
            ("ce-source", text("old")),
        ]);
        assert_eq!(
            cloud_event_attribute(&both, "source").as_deref(),
            Some("new")
        );
        assert_eq!(cloud_event_time(&with_headers(&[])), None);
    }
}
