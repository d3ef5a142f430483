//! Relay benchmark: prints the relay's drain throughput against raw
//! confirmed publishing with lapin measured in the same run, commit→consumer
//! latency under steady load (with NOTIFY and with polling only; four writers,
//! one event per transaction), and the
//! relay's peak memory.
//!
//! `cargo bench -p outbox-relay --bench relay` with `DATABASE_URL` and
//! `AMQP_URL` set (or Docker for testcontainers). `BENCH_EVENTS` changes the
//! number of events drained (default 100000), `BENCH_RATE` the rate of the
//! latency runs (default 1000 events/s), and `BENCH_BASELINE_RELAY` names
//! an earlier build's `outbox-relay` binary to measure side by side.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};
use shop_tests::{TestBroker, TestDatabase};

const PAYLOAD_BYTES: usize = 256;
const AGGREGATES: i64 = 1000;
const BATCH: usize = 500;

#[tokio::main]
async fn main() -> Result<()> {
    let events: i64 = env_or("BENCH_EVENTS", 100_000);
    let rate: f64 = env_or("BENCH_RATE", 1000.0);
    let broker = TestBroker::new().await;
    let exchange = broker.name("events");
    let queue = broker.name("sink");
    declare(&broker, &exchange, &queue).await?;

    // The relay of this build, and optionally an earlier build's binary to
    // compare with in the same run (that build's writers notify on every
    // commit, so its database gets that trigger back).
    let mut relays = vec![Build {
        name: "this build".to_owned(),
        binary: env!("CARGO_BIN_EXE_outbox-relay").to_owned(),
        notify_every_commit: false,
    }];
    if let Ok(binary) = std::env::var("BENCH_BASELINE_RELAY") {
        relays.push(Build {
            name: "baseline".to_owned(),
            binary,
            notify_every_commit: true,
        });
    }

    println!(
        "relay benchmark: {events} events of {PAYLOAD_BYTES} bytes over {AGGREGATES} aggregates"
    );

    // Baseline: raw confirmed publishing, pipelined in windows of one batch.
    let raw = raw_publish(&broker, &exchange, events as usize).await?;
    purge(&broker, &queue).await?;
    let raw_rate = events as f64 / raw.as_secs_f64();
    println!("raw lapin confirmed publish (window {BATCH}): {raw_rate:>8.0} msg/s ({raw:.2?})");

    let mut drains = Vec::new();
    for build in &relays {
        let db = TestDatabase::create(&shop_outbox::MIGRATOR).await?;
        if build.notify_every_commit {
            notify_every_commit(&db).await?;
        }
        // The relay draining the same number of pending rows.
        insert_pending(&db, events).await?;
        let started = Instant::now();
        let relay = spawn_relay(&build.binary, &db, &broker, &exchange, true);
        wait_drained(&db).await?;
        let drain = started.elapsed();
        let peak_rss_kib = peak_rss_kib(relay.0.id());
        drop(relay);
        purge(&broker, &queue).await?;
        let relay_rate = events as f64 / drain.as_secs_f64();
        drains.push(relay_rate);
        println!("== {} ({})", build.name, build.binary);
        println!(
            "outbox-relay drain:          {relay_rate:>8.0} msg/s ({drain:.2?}, includes start-up)"
        );
        println!(
            "drain ratio relay/raw:       {:>8.2}  (goal >= 0.80)",
            relay_rate / raw_rate
        );
        if let Some(kib) = peak_rss_kib {
            println!(
                "relay peak RSS during drain: {:>8.1} MiB",
                kib as f64 / 1024.0
            );
        }

        for listen in [true, false] {
            let relay = spawn_relay(&build.binary, &db, &broker, &exchange, listen);
            wait_drained(&db).await?;
            let (p50, p99, achieved) =
                latency(&db, &broker, &queue, rate, Duration::from_secs(10)).await?;
            drop(relay);
            purge(&broker, &queue).await?;
            println!(
                "commit→consumer latency, {} at {achieved:.0} events/s: p50 {:.1} ms, p99 {:.1} ms{}",
                if listen {
                    "NOTIFY + poll 1s"
                } else {
                    "poll 1s only    "
                },
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                if listen { "  (goal p99 <= 15 ms)" } else { "" }
            );
        }
    }
    if let [this, baseline] = drains[..] {
        println!("drain, this build / baseline: {:.2}", this / baseline);
    }
    Ok(())
}

/// A relay binary to measure.
struct Build {
    name: String,
    binary: String,
    notify_every_commit: bool,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Puts back the trigger of builds before relays armed themselves: every
/// commit that writes the outbox notifies.
async fn notify_every_commit(db: &TestDatabase) -> Result<()> {
    sqlx::query(
        "CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_notify('outbox', ''); RETURN NULL; END $$",
    )
    .execute(&db.pool)
    .await?;
    Ok(())
}

async fn declare(broker: &TestBroker, exchange: &str, queue: &str) -> Result<()> {
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    let conn = broker.connect().await?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            exchange.into(),
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
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            // Quorum, like the subscribers' work queues.
            quorum,
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    conn.close(200, "OK".into()).await?;
    Ok(())
}

async fn purge(broker: &TestBroker, queue: &str) -> Result<()> {
    let conn = broker.connect().await?;
    let channel = conn.create_channel().await?;
    channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await?;
    conn.close(200, "OK".into()).await?;
    Ok(())
}

/// Publishes like the relay does (same size, properties and headers), with
/// nothing else to do.
async fn raw_publish(broker: &TestBroker, exchange: &str, events: usize) -> Result<Duration> {
    let conn = broker.connect().await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let payload = vec![7u8; PAYLOAD_BYTES];
    let started = Instant::now();
    let mut sent = 0;
    while sent < events {
        let window = BATCH.min(events - sent);
        let mut confirms = Vec::with_capacity(window);
        for i in 0..window {
            let mut headers = FieldTable::default();
            for key in [
                "aggregate_type",
                "aggregate_id",
                "cloudEvents_specversion",
                "cloudEvents_id",
                "cloudEvents_source",
                "cloudEvents_type",
                "cloudEvents_time",
                "cloudEvents_subject",
            ] {
                headers.insert(
                    key.into(),
                    AMQPValue::LongString(LongString::from(format!("{key}-{i}"))),
                );
            }
            let properties = BasicProperties::default()
                .with_message_id(uuid::Uuid::now_v7().to_string().as_str().into())
                .with_type("bench.v1.Event".into())
                .with_content_type("application/x-protobuf".into())
                .with_app_id("bench".into())
                .with_delivery_mode(2)
                .with_headers(headers);
            confirms.push(
                channel
                    .basic_publish(
                        exchange.into(),
                        "bench.v1.Event".into(),
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
                confirm.await? == lapin::Confirmation::Ack(None),
                "raw publish not acked"
            );
        }
        sent += window;
    }
    let elapsed = started.elapsed();
    conn.close(200, "OK".into()).await?;
    Ok(elapsed)
}

async fn insert_pending(db: &TestDatabase, events: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload, \
                             content_type, occurred_at) \
         SELECT gen_random_uuid(), 'bench', 'agg-' || (n % $2), 'bench.v1.Event', \
                decode(repeat('07', $3), 'hex'), 'application/x-protobuf', now() \
         FROM generate_series(1, $1) AS n",
    )
    .bind(events)
    .bind(AGGREGATES)
    .bind(PAYLOAD_BYTES as i32)
    .execute(&db.pool)
    .await?;
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// A relay process, stopped with SIGTERM when dropped.
struct RelayChild(Child);

impl Drop for RelayChild {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn spawn_relay(
    binary: &str,
    db: &TestDatabase,
    broker: &TestBroker,
    exchange: &str,
    listen: bool,
) -> RelayChild {
    let child = Command::new(binary)
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", &broker.url)
        .env("OUTBOX_RELAY_EXCHANGE", exchange)
        .env("OUTBOX_RELAY_LISTEN", listen.to_string())
        .env("OUTBOX_RELAY_HEALTH_ADDR", "127.0.0.1:0")
        .env("OUTBOX_RELAY_METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("failed to start outbox-relay");
    RelayChild(child)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn wait_drained(db: &TestDatabase) -> Result<()> {
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&db.pool)
                .await?;
        if pending == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes one event per transaction at `rate` for `duration` and measures
/// the time from just before each commit to its arrival at a consumer.
async fn latency(
    db: &TestDatabase,
    broker: &TestBroker,
    queue: &str,
    rate: f64,
    duration: Duration,
) -> Result<(Duration, Duration, f64)> {
    let epoch = Instant::now();
    let conn = broker.connect().await?;
    let channel = conn.create_channel().await?;
    channel.basic_qos(1000, Default::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let total = (rate * duration.as_secs_f64()) as usize;
    let consume = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total);
        while latencies.len() < total {
            let Some(Ok(delivery)) = consumer.next().await else {
                break;
            };
            let sent_us = u64::from_be_bytes(delivery.data[..8].try_into().unwrap());
            latencies.push(
                epoch
                    .elapsed()
                    .saturating_sub(Duration::from_micros(sent_us)),
            );
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        latencies
    });

    // Several writers, each one event per transaction, share the rate.
    const WRITERS: usize = 4;
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let pool = db.pool.clone();
        let interval = Duration::from_secs_f64(WRITERS as f64 / rate);
        let count = total / WRITERS + usize::from(writer < total % WRITERS);
        writers.spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for i in 0..count {
                ticker.tick().await;
                let mut tx = pool.begin().await?;
                let mut payload = (epoch.elapsed().as_micros() as u64).to_be_bytes().to_vec();
                payload.resize(PAYLOAD_BYTES, 0);
                let aggregate = format!("agg-{}", (i * WRITERS + writer) % AGGREGATES as usize);
                shop_outbox::enqueue_raw(
                    &mut tx,
                    shop_outbox::Aggregate::new("bench", &aggregate),
                    "bench.v1.Event",
                    &payload,
                    "application/octet-stream",
                    &shop_outbox::EventContext::default(),
                )
                .await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = writers.join_next().await {
        result??;
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    let mut latencies = tokio::time::timeout(Duration::from_secs(60), consume).await??;
    conn.close(200, "OK".into()).await?;
    anyhow::ensure!(
        latencies.len() == total,
        "lost events during the latency run"
    );
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Ok((at(0.50), at(0.99), achieved))
}
