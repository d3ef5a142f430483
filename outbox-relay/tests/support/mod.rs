//! Shared set-up for the relay tests: a migrated database, a test exchange
//! with a queue bound to every event, relays in-process or as processes, and
//! a consumer that records what arrives.

#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use outbox_relay::{Relay, RelaySettings};
use shop_outbox::{Aggregate, EventContext};
use shop_tests::{TestBroker, TestDatabase, eventually};
use tokio_util::sync::CancellationToken;

/// Event type used by the synthetic events of these tests.
pub const EVENT_TYPE: &str = "test.v1.Counted";

/// A database with the outbox, and a queue bound to a test exchange.
pub struct Setup {
    pub db: TestDatabase,
    pub broker: TestBroker,
    pub exchange: String,
    pub queue: String,
}

impl Setup {
    pub async fn new() -> Result<Self> {
        Self::on_broker(TestBroker::new().await).await
    }

    /// Like [`Setup::new`], with its names on `broker` (for example a
    /// private node the test may stop).
    pub async fn on_broker(broker: TestBroker) -> Result<Self> {
        let db = TestDatabase::create(&shop_outbox::MIGRATOR).await?;
        let exchange = broker.name("events");
        let queue = broker.name("all");
        let conn = broker.connect().await?;
        let channel = conn.create_channel().await?;
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        conn.close(200, "OK".into()).await?;
        Ok(Self {
            db,
            broker,
            exchange,
            queue,
        })
    }

    /// Relay settings for this test: fast timings, ephemeral health port.
    pub fn settings(&self) -> RelaySettings {
        let mut settings = RelaySettings::new(&self.db.url, &self.broker.url);
        settings.exchange = self.exchange.clone();
        settings.source = "relay-test".into();
        settings.health_addr = "127.0.0.1:0".parse().unwrap();
        settings.metrics_addr = "127.0.0.1:0".parse().unwrap();
        settings.poll_interval = Duration::from_millis(500);
        settings.rebalance_interval = Duration::from_millis(300);
        settings.retry_backoff = Duration::from_millis(50);
        settings.max_retry_backoff = Duration::from_millis(200);
        settings.confirm_timeout = Duration::from_secs(5);
        settings
    }

    /// Writes `per_aggregate` events for each of `aggregates` aggregates,
    /// interleaved, `per_transaction` rows per transaction. The payload of
    /// event `n` of aggregate `a` is `"a:n"`.
    pub async fn insert_events(
        &self,
        aggregates: usize,
        per_aggregate: usize,
        per_transaction: usize,
    ) -> Result<()> {
        let mut tx = self.db.pool.begin().await?;
        let mut in_tx = 0;
        for n in 0..per_aggregate {
            for a in 0..aggregates {
                insert_event(&mut tx, &format!("agg-{a}"), n, Vec::new()).await?;
                in_tx += 1;
                if in_tx == per_transaction {
                    tx.commit().await?;
                    tx = self.db.pool.begin().await?;
                    in_tx = 0;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Rows not yet marked published.
    pub async fn unpublished(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&self.db.pool)
                .await?,
        )
    }

    /// Starts a consumer of the test queue.
    pub fn consume(&self) -> Collector {
        Collector::start(self.broker.url.clone(), self.queue.clone())
    }

    /// Starts the relay binary with these settings.
    pub fn spawn_relay_process(&self, settings: &RelaySettings) -> RelayProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .env("DATABASE_URL", &settings.database_url)
            .env("AMQP_URL", &settings.broker.amqp_url)
            .env("OUTBOX_RELAY_EXCHANGE", &settings.exchange)
            .env("OUTBOX_RELAY_SOURCE", &settings.source)
            .env("OUTBOX_RELAY_BATCH_SIZE", settings.batch_size.to_string())
            .env("OUTBOX_RELAY_REBALANCE_INTERVAL", "300ms")
            .env(
                "OUTBOX_RELAY_LEASE_TIMEOUT",
                humantime::format_duration(settings.lease_timeout).to_string(),
            )
            .env("OUTBOX_RELAY_HEALTH_ADDR", "127.0.0.1:0")
            .env(
                "OUTBOX_RELAY_METRICS_ADDR",
                settings.metrics_addr.to_string(),
            )
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("failed to start outbox-relay");
        RelayProcess(Some(child))
    }
}

/// A relay child process; killed when dropped, so a failing test leaves no
/// relay behind.
pub struct RelayProcess(Option<Child>);

impl RelayProcess {
    /// Kills the process with SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.0.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.0.as_ref().expect("relay process already stopped").id();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let pid = self.0.as_ref().expect("relay process already stopped").id();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let mut child = self.0.take().expect("relay process already stopped");
        Ok(tokio::task::spawn_blocking(move || child.wait()).await??)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Writes one synthetic event (payload `"aggregate:n"` plus `padding`).
pub async fn insert_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    aggregate_id: &str,
    n: usize,
    padding: Vec<u8>,
) -> Result<uuid::Uuid> {
    let mut payload = format!("{aggregate_id}:{n}").into_bytes();
    payload.extend(padding);
    let record = shop_outbox::enqueue_raw(
        tx,
        Aggregate::new("counter", aggregate_id),
        EVENT_TYPE,
        &payload,
        "text/plain",
        &EventContext::new_flow(uuid::Uuid::now_v7()),
    )
    .await?;
    Ok(record.message_id)
}

/// A relay running in this process.
pub struct RunningRelay {
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<Result<()>>,
    pub health_addr: std::net::SocketAddr,
}

impl RunningRelay {
    pub async fn start(settings: RelaySettings) -> Result<Self> {
        let relay = Relay::build(settings).await?;
        let health_addr = relay.health_addr();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(relay.run_until_stopped(shutdown.clone()));
        Ok(Self {
            shutdown,
            handle,
            health_addr,
        })
    }

    /// What the relay's health service answers for the whole server.
    pub async fn health(&self) -> Result<tonic_health::pb::health_check_response::ServingStatus> {
        self.health_of("").await
    }

    /// The status of health name `service`.
    pub async fn health_of(
        &self,
        service: &str,
    ) -> Result<tonic_health::pb::health_check_response::ServingStatus> {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.health_addr))?
                .connect()
                .await?;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        Ok(client
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?
            .into_inner()
            .status())
    }

    /// Graceful stop.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.handle.await?
    }
}

/// One delivery as the consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub payload: String,
    pub properties: BasicProperties,
}

impl Received {
    pub fn aggregate_and_seq(&self) -> (String, usize) {
        let (aggregate, n) = self
            .payload
            .rsplit_once(':')
            .expect("payload is aggregate:n");
        let n: String = n.chars().take_while(char::is_ascii_digit).collect();
        (aggregate.to_owned(), n.parse().expect("sequence number"))
    }

    pub fn message_id(&self) -> String {
        self.properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default()
    }

    pub fn header(&self, key: &str) -> Option<String> {
        let headers = self.properties.headers().as_ref()?;
        match headers.inner().get(key)? {
            AMQPValue::LongString(value) => Some(value.to_string()),
            other => Some(format!("{other:?}")),
        }
    }
}

/// Consumes a queue in the background, acknowledging and recording every
/// delivery; reconnects when the broker goes away.
pub struct Collector {
    received: Arc<Mutex<Vec<Received>>>,
    stop: CancellationToken,
}

impl Collector {
    fn start(url: String, queue: String) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (sink, token) = (received.clone(), stop.clone());
        tokio::spawn(async move {
            while !token.is_cancelled() {
                let _ = consume_until_error(&url, &queue, &sink, &token).await;
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
        Self { received, stop }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until every one of `expected` distinct messages has arrived.
    pub async fn wait_for_distinct(&self, expected: usize, timeout: Duration) -> Result<()> {
        eventually(timeout, "every event to arrive", || async {
            let distinct: HashSet<String> =
                self.received().iter().map(Received::message_id).collect();
            Ok((distinct.len() >= expected).then_some(()))
        })
        .await
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn consume_until_error(
    url: &str,
    queue: &str,
    sink: &Mutex<Vec<Received>>,
    stop: &CancellationToken,
) -> Result<()> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(500, lapin::options::BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // The consumer stream does not always end when the connection drops;
    // watch the connection too, so a restart never leaves this one stuck.
    let mut watchdog = tokio::time::interval(Duration::from_millis(500));
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = watchdog.tick() => {
                anyhow::ensure!(conn.status().connected() && channel.status().connected(), "connection lost");
                continue;
            }
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => anyhow::bail!("consumer cancelled"),
            },
        };
        sink.lock().unwrap().push(Received {
            payload: String::from_utf8_lossy(&delivery.data).into_owned(),
            properties: delivery.properties.clone(),
        });
        delivery.ack(BasicAckOptions::default()).await?;
    }
}

/// Checks that every aggregate's events `0..per_aggregate` arrived and that,
/// counting each message at its first arrival, they arrived in order.
pub fn assert_complete_and_in_order(
    received: &[Received],
    aggregates: usize,
    per_aggregate: usize,
) {
    let mut seen: HashSet<String> = HashSet::new();
    let mut next: HashMap<String, usize> = HashMap::new();
    for message in received {
        if !seen.insert(message.message_id()) {
            continue;
        }
        let (aggregate, n) = message.aggregate_and_seq();
        let expected = next.entry(aggregate.clone()).or_insert(0);
        assert_eq!(
            n, *expected,
            "{aggregate}: event {n} arrived when {expected} was due"
        );
        *expected += 1;
    }
    assert_eq!(
        next.len(),
        aggregates,
        "events of some aggregates never arrived"
    );
    for (aggregate, count) in next {
        assert_eq!(count, per_aggregate, "{aggregate} is missing events");
    }
}
