//! Shared set-up for the subscriber tests: a database with the inbox and an
//! `applied` table, a test exchange, and a handler whose behaviour each test
//! chooses.

#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation};
use prost::Message;
use shop_proto::events::v1::OrderPlaced;
use shop_subscriber::{
    EventHandler, HandlerError, HandlerTx, Metadata, Subscriber, SubscriberSettings,
};
use shop_tests::{TestBroker, TestDatabase};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub const CONSUMER: &str = "test-consumer";

/// How the test handler behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Records the event.
    Apply,
    /// Records the event, then hangs on the first call (a crash before
    /// commit when the test kills the subscriber).
    HangAfterWriteOnce,
    /// Records the event, then panics on the first call.
    PanicAfterWriteOnce,
    /// Fails transiently, always, for orders whose id contains "fail";
    /// applies the others.
    AlwaysFail,
    /// Fails transiently until the order is in `known_orders`.
    NeedsKnownOrder,
    /// Records the event, signals `wrote`, and finishes only once `release`
    /// is notified.
    WaitForRelease,
    /// Adds one to the `counters` row of each line's product, in line
    /// order (not sorted, so concurrent transactions can deadlock), then
    /// records the event.
    CountLines,
}

/// The test handler: writes one `applied` row per call, in the transaction.
#[derive(Clone)]
pub struct Recorder {
    pub mode: Arc<Mutex<Mode>>,
    pub calls: Arc<AtomicU32>,
    /// The attempt number of each failed call in `AlwaysFail` mode, in order.
    pub failed_attempts: Arc<Mutex<Vec<u32>>>,
    pub wrote: Arc<Notify>,
    pub release: Arc<Notify>,
}

impl Recorder {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode: Arc::new(Mutex::new(mode)),
            calls: Arc::new(AtomicU32::new(0)),
            failed_attempts: Arc::new(Mutex::new(Vec::new())),
            wrote: Arc::new(Notify::new()),
            release: Arc::new(Notify::new()),
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

impl EventHandler<OrderPlaced> for Recorder {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: OrderPlaced,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let mode = *self.mode.lock().unwrap();
        if mode == Mode::AlwaysFail && event.order_id.contains("fail") {
            self.failed_attempts.lock().unwrap().push(meta.attempt);
            return Err(HandlerError::transient("downstream unavailable"));
        }
        if mode == Mode::NeedsKnownOrder {
            let known: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM known_orders WHERE order_id = $1)",
            )
            .bind(&event.order_id)
            .fetch_one(&mut **tx)
            .await?;
            if !known {
                return Err(HandlerError::transient(format!(
                    "order {} not known yet",
                    event.order_id
                )));
            }
        }
        if mode == Mode::CountLines {
            for line in &event.lines {
                sqlx::query("UPDATE counters SET n = n + 1 WHERE key = $1")
                    .bind(&line.product_id)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        sqlx::query(
            "INSERT INTO applied (message_id, order_id, attempt, redelivered) VALUES ($1, $2, $3, $4)",
        )
        .bind(meta.message_id)
        .bind(&event.order_id)
        .bind(meta.attempt as i32)
        .bind(meta.redelivered)
        .execute(&mut **tx)
        .await?;
        if call == 1 && mode == Mode::HangAfterWriteOnce {
            self.wrote.notify_one();
            std::future::pending::<()>().await;
        }
        if mode == Mode::WaitForRelease {
            self.wrote.notify_one();
            self.release.notified().await;
        }
        if call == 1 && mode == Mode::PanicAfterWriteOnce {
            panic!("handler crashed after its write");
        }
        Ok(())
    }
}

pub struct Setup {
    pub db: TestDatabase,
    pub broker: TestBroker,
    pub settings: SubscriberSettings,
    pub queue: String,
}

impl Setup {
    pub async fn new() -> Result<Self> {
        Self::on_broker(TestBroker::new().await).await
    }

    /// Like [`Setup::new`], with its names on `broker` (for example a
    /// private node the test may stop).
    pub async fn on_broker(broker: TestBroker) -> Result<Self> {
        let migrator =
            shop_outbox::migrator([&shop_outbox::MIGRATOR, &shop_subscriber::inbox::MIGRATOR]);
        let db = TestDatabase::create(&migrator).await?;
        sqlx::query(
            "CREATE TABLE applied (seq bigserial, message_id uuid NOT NULL, \
             order_id text NOT NULL, attempt int NOT NULL, redelivered bool NOT NULL)",
        )
        .execute(&db.pool)
        .await?;
        sqlx::query("CREATE TABLE known_orders (order_id text PRIMARY KEY)")
            .execute(&db.pool)
            .await?;
        sqlx::query("CREATE TABLE counters (key text PRIMARY KEY, n bigint NOT NULL DEFAULT 0)")
            .execute(&db.pool)
            .await?;
        let mut settings = SubscriberSettings::new(&broker.url);
        settings.exchange = broker.name("events");
        settings.max_attempts = 3;
        settings.retry_backoff = Duration::from_millis(50);
        settings.max_retry_backoff = Duration::from_millis(200);
        let queue = broker.name("work");
        Ok(Self {
            db,
            broker,
            settings,
            queue,
        })
    }

    pub fn subscriber(&self, recorder: &Recorder) -> Subscriber {
        let subscriber = Subscriber::builder(CONSUMER, &self.queue, self.settings.clone())
            .on::<OrderPlaced, _>(recorder.clone())
            .build(self.db.pool.clone());
        for queue in subscriber.topology().queues() {
            self.broker.track(&queue);
        }
        subscriber
    }

    /// Starts a subscriber and waits until its queues exist.
    pub async fn start(&self, recorder: &Recorder) -> Result<Running> {
        let subscriber = self.subscriber(recorder);
        subscriber.declare().await?;
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(subscriber.run_until_stopped(shutdown.clone()));
        Ok(Running { shutdown, handle })
    }

    /// Publishes an OrderPlaced for `order_id` with `message_id` to the
    /// events exchange, confirmed.
    pub async fn publish(&self, message_id: uuid::Uuid, order_id: &str) -> Result<()> {
        let payload = OrderPlaced {
            order_id: order_id.into(),
            ..Default::default()
        }
        .encode_to_vec();
        self.publish_raw(
            &self.settings.exchange,
            "shop.events.v1.OrderPlaced",
            message_id,
            order_id,
            "shop.events.v1.OrderPlaced",
            &payload,
        )
        .await
    }

    /// Publishes OrderPlaced events for `order_ids` on one channel,
    /// pipelined, and waits for every confirm.
    pub async fn publish_many(&self, order_ids: &[String]) -> Result<()> {
        let events: Vec<(uuid::Uuid, String, String)> = order_ids
            .iter()
            .map(|id| (uuid::Uuid::now_v7(), id.clone(), id.clone()))
            .collect();
        self.publish_events(&events).await
    }

    /// Publishes OrderPlaced events given as (message id, aggregate id,
    /// order id) on one channel, in order, pipelined, and waits for every
    /// confirm.
    pub async fn publish_events(&self, events: &[(uuid::Uuid, String, String)]) -> Result<()> {
        let events: Vec<(uuid::Uuid, String, OrderPlaced)> = events
            .iter()
            .map(|(message_id, aggregate_id, order_id)| {
                let event = OrderPlaced {
                    order_id: order_id.clone(),
                    ..Default::default()
                };
                (*message_id, aggregate_id.clone(), event)
            })
            .collect();
        self.publish_orders(&events).await
    }

    /// Publishes OrderPlaced events given as (message id, aggregate id,
    /// event) on one channel, in order, pipelined, and waits for every
    /// confirm.
    pub async fn publish_orders(&self, events: &[(uuid::Uuid, String, OrderPlaced)]) -> Result<()> {
        let conn = self.broker.connect().await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        for chunk in events.chunks(500) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for (message_id, aggregate_id, event) in chunk {
                let payload = event.encode_to_vec();
                let mut headers = FieldTable::default();
                headers.insert(
                    "aggregate_id".into(),
                    AMQPValue::LongString(LongString::from(aggregate_id.as_str())),
                );
                let properties = BasicProperties::default()
                    .with_message_id(message_id.to_string().as_str().into())
                    .with_type("shop.events.v1.OrderPlaced".into())
                    .with_delivery_mode(2)
                    .with_headers(headers);
                confirms.push(
                    channel
                        .basic_publish(
                            self.settings.exchange.as_str().into(),
                            "shop.events.v1.OrderPlaced".into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..Default::default()
                            },
                            &payload,
                            properties,
                        )
                        .await?,
                );
            }
            for confirm in confirms {
                anyhow::ensure!(
                    confirm.await? == Confirmation::Ack(None),
                    "publish not confirmed"
                );
            }
        }
        conn.close(200, "OK".into()).await?;
        Ok(())
    }

    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        message_id: uuid::Uuid,
        aggregate_id: &str,
        event_type: &str,
        payload: &[u8],
    ) -> Result<()> {
        self.publish_with_headers(
            exchange,
            routing_key,
            message_id,
            aggregate_id,
            event_type,
            payload,
            &[],
        )
        .await
    }

    /// Like [`Setup::publish_raw`], with more headers.
    #[allow(clippy::too_many_arguments)]
    pub async fn publish_with_headers(
        &self,
        exchange: &str,
        routing_key: &str,
        message_id: uuid::Uuid,
        aggregate_id: &str,
        event_type: &str,
        payload: &[u8],
        extra: &[(&str, &str)],
    ) -> Result<()> {
        let conn = self.broker.connect().await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut headers = FieldTable::default();
        headers.insert(
            "aggregate_id".into(),
            AMQPValue::LongString(LongString::from(aggregate_id)),
        );
        for (key, value) in extra {
            headers.insert(
                (*key).into(),
                AMQPValue::LongString(LongString::from(*value)),
            );
        }
        let properties = BasicProperties::default()
            .with_message_id(message_id.to_string().as_str().into())
            .with_type(event_type.into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let confirmation = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                properties,
            )
            .await?
            .await?;
        anyhow::ensure!(
            confirmation == Confirmation::Ack(None),
            "publish not confirmed: {confirmation:?}"
        );
        conn.close(200, "OK".into()).await?;
        Ok(())
    }

    /// Messages ready in the work queue.
    pub async fn ready_messages(&self) -> Result<u32> {
        self.messages_in(&self.queue)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the work queue {} is missing", self.queue))
    }

    /// Messages ready in `queue`, or `None` if it does not exist (asked on
    /// a channel of its own, which the broker closes when it does not).
    pub async fn messages_in(&self, queue: &str) -> Result<Option<u32>> {
        let conn = self.broker.connect().await?;
        let channel = conn.create_channel().await?;
        let found = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = conn.close(200, "OK".into()).await;
        Ok(found.ok().map(|state| state.message_count()))
    }

    /// Rows in `applied` for `order_id`: (attempt, redelivered).
    pub async fn applied(&self, order_id: &str) -> Result<Vec<(i32, bool)>> {
        Ok(
            sqlx::query_as("SELECT attempt, redelivered FROM applied WHERE order_id = $1")
                .bind(order_id)
                .fetch_all(&self.db.pool)
                .await?,
        )
    }

    pub async fn wait_applied(&self, order_id: &str) -> Result<Vec<(i32, bool)>> {
        shop_tests::eventually(Duration::from_secs(30), order_id, || async {
            let rows = self.applied(order_id).await?;
            Ok((!rows.is_empty()).then_some(rows))
        })
        .await
    }
}

pub struct Running {
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.handle.await?
    }

    /// Kills the subscriber without shutdown: its transaction and its broker
    /// connection are dropped mid-flight, as in a process crash.
    pub async fn crash(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}
