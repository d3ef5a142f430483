//! The relay against real PostgreSQL and RabbitMQ: delivery, order, crashes,
//! several instances, polling without NOTIFY, quarantine and shutdown.

mod support;

use std::time::Duration;

use anyhow::Result;
use support::{RunningRelay, Setup, assert_complete_and_in_order, insert_event};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn committed_events_arrive_with_their_metadata_and_rolled_back_ones_never_do() -> Result<()> {
    let setup = Setup::new().await?;
    let collector = setup.consume();
    let relay = RunningRelay::start(setup.settings()).await?;

    let mut tx = setup.db.pool.begin().await?;
    insert_event(&mut tx, "rolled-back", 0, Vec::new()).await?;
    tx.rollback().await?;

    let correlation_id = uuid::Uuid::now_v7();
    let causation_id = uuid::Uuid::now_v7();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut tx = setup.db.pool.begin().await?;
    let record = shop_outbox::enqueue(
        &mut tx,
        shop_outbox::Aggregate::new("order", "order-1"),
        &shop_proto::events::v1::OrderCancelled {
            order_id: "order-1".into(),
            detail: "test".into(),
            ..Default::default()
        },
        &shop_outbox::EventContext::caused_by(causation_id, Some(correlation_id))
            .with_traceparent(Some(traceparent.into())),
    )
    .await?;
    tx.commit().await?;

    collector.wait_for_distinct(1, TIMEOUT).await?;
    relay.stop().await?;

    let received = collector.received();
    assert_eq!(received.len(), 1, "only the committed event is published");
    let message = &received[0];
    let properties = &message.properties;
    let event_type = "shop.events.v1.OrderCancelled";
    assert_eq!(message.message_id(), record.message_id.to_string());
    assert_eq!(properties.kind().as_ref().unwrap().as_str(), event_type);
    assert_eq!(
        properties.content_type().as_ref().unwrap().as_str(),
        shop_outbox::PROTOBUF_CONTENT_TYPE
    );
    assert_eq!(properties.app_id().as_ref().unwrap().as_str(), "relay-test");
    assert_eq!(
        properties.correlation_id().as_ref().unwrap().as_str(),
        correlation_id.to_string()
    );
    assert_eq!(*properties.delivery_mode(), Some(2), "persistent delivery");
    assert_eq!(
        *properties.timestamp(),
        Some(record.occurred_at.timestamp() as u64)
    );
    assert_eq!(message.header("aggregate_type").as_deref(), Some("order"));
    assert_eq!(message.header("aggregate_id").as_deref(), Some("order-1"));
    assert_eq!(message.header("traceparent").as_deref(), Some(traceparent));
    assert_eq!(
        message.header("causation_id"),
        Some(causation_id.to_string())
    );
    // CloudEvents in the AMQP binding's binary mode.
    assert_eq!(
        message.header("cloudEvents_specversion").as_deref(),
        Some("1.0")
    );
    assert_eq!(
        message.header("cloudEvents_id"),
        Some(record.message_id.to_string())
    );
    assert_eq!(
        message.header("cloudEvents_source").as_deref(),
        Some("relay-test")
    );
    assert_eq!(
        message.header("cloudEvents_type").as_deref(),
        Some(event_type)
    );
    assert_eq!(
        message.header("cloudEvents_subject").as_deref(),
        Some("order-1")
    );
    // For one release, the names earlier subscribers read, too.
    assert_eq!(message.header("ce-id"), Some(record.message_id.to_string()));
    assert_eq!(message.header("ce-source").as_deref(), Some("relay-test"));
    assert!(
        message
            .header("cloudEvents_time")
            .unwrap()
            .starts_with(&record.occurred_at.format("%Y-%m-%dT%H:%M").to_string())
    );
    let decoded: shop_proto::events::v1::OrderCancelled =
        prost::Message::decode(message.payload.as_bytes())?;
    assert_eq!(decoded.order_id, "order-1");
    assert_eq!(setup.unpublished().await?, 0);
    Ok(())
}

#[tokio::test]
async fn relay_killed_mid_batch_loses_nothing() -> Result<()> {
    let setup = Setup::new().await?;
    let (aggregates, per_aggregate) = (50, 100);
    setup.insert_events(aggregates, per_aggregate, 500).await?;
    let collector = setup.consume();

    let mut settings = setup.settings();
    settings.batch_size = 200;
    let mut first = setup.spawn_relay_process(&settings);
    // Kill it while it is publishing: some events are out, most are not.
    shop_tests::eventually(TIMEOUT, "the first events", || async {
        Ok((!collector.received().is_empty()).then_some(()))
    })
    .await?;
    first.kill()?;
    let total = aggregates * per_aggregate;
    assert!(
        setup.unpublished().await? > 0,
        "the relay finished before it could be killed; the test proves nothing"
    );

    let second = setup.spawn_relay_process(&settings);
    let outcome = collector.wait_for_distinct(total, TIMEOUT).await;
    drop(second);
    outcome?;
    assert_complete_and_in_order(&collector.received(), aggregates, per_aggregate);
    Ok(())
}

#[tokio::test]
async fn three_relays_share_the_outbox_and_keep_every_aggregate_in_order() -> Result<()> {
    let setup = Setup::new().await?;
    let (aggregates, per_aggregate) = (100, 100);
    setup.insert_events(aggregates, per_aggregate, 1000).await?;
    let collector = setup.consume();

    let mut settings = setup.settings();
    settings.batch_size = 100;
    let mut relays = Vec::new();
    for _ in 0..3 {
        relays.push(RunningRelay::start(settings.clone()).await?);
    }

    // Every instance takes a share of the partitions.
    shop_tests::eventually(TIMEOUT, "every relay to hold partitions", || async {
        let holders: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT l.pid) FROM pg_locks l \
             JOIN pg_database d ON d.oid = l.database \
             WHERE l.locktype = 'advisory' AND d.datname = current_database()",
        )
        .fetch_one(&setup.db.pool)
        .await?;
        Ok((holders == 3).then_some(()))
    })
    .await?;

    // One instance dies without a goodbye; the others take its share over.
    let crashed = relays.remove(0);
    crashed.handle.abort();
    let _ = crashed.handle.await;

    collector
        .wait_for_distinct(aggregates * per_aggregate, TIMEOUT)
        .await?;
    for relay in relays {
        relay.stop().await?;
    }
    assert_complete_and_in_order(&collector.received(), aggregates, per_aggregate);
    assert_eq!(setup.unpublished().await?, 0);
    Ok(())
}

#[tokio::test]
async fn polling_alone_delivers_when_notifications_are_off() -> Result<()> {
    let setup = Setup::new().await?;
    let collector = setup.consume();
    let mut settings = setup.settings();
    settings.listen = false;
    settings.poll_interval = Duration::from_millis(200);
    let relay = RunningRelay::start(settings).await?;

    setup.insert_events(5, 4, 3).await?;
    collector.wait_for_distinct(20, TIMEOUT).await?;
    relay.stop().await?;
    assert_complete_and_in_order(&collector.received(), 5, 4);
    Ok(())
}

#[tokio::test]
async fn poison_row_is_quarantined_while_other_aggregates_flow_and_replays_in_order() -> Result<()>
{
    let setup = Setup::new().await?;
    let collector = setup.consume();
    let mut settings = setup.settings();
    settings.max_payload_bytes = 1024;
    settings.max_attempts = 3;

    // agg-0's second event is too large; agg-0's later events wait behind it.
    let mut tx = setup.db.pool.begin().await?;
    insert_event(&mut tx, "agg-0", 0, Vec::new()).await?;
    let poison = insert_event(&mut tx, "agg-0", 1, vec![b'x'; 4096]).await?;
    insert_event(&mut tx, "agg-0", 2, Vec::new()).await?;
    for n in 0..3 {
        insert_event(&mut tx, "agg-1", n, Vec::new()).await?;
    }
    tx.commit().await?;

    let relay = RunningRelay::start(settings.clone()).await?;
    shop_tests::eventually(TIMEOUT, "the poison row's quarantine", || async {
        let rows = outbox_relay::store::list_quarantined(&setup.db.pool).await?;
        Ok((rows.len() == 1).then_some(rows))
    })
    .await
    .map(|rows| {
        assert_eq!(rows[0].message_id, poison);
        assert_eq!(rows[0].attempts, 3);
        assert!(
            rows[0]
                .last_error
                .as_deref()
                .unwrap()
                .contains("exceeds the limit")
        );
    })?;
    collector.wait_for_distinct(4, TIMEOUT).await?;
    relay.stop().await?;
    let payloads: Vec<String> = collector
        .received()
        .iter()
        .map(|m| m.payload.clone())
        .collect();
    assert_eq!(payloads, vec!["agg-0:0", "agg-1:0", "agg-1:1", "agg-1:2"]);

    // The operator lists it with the CLI, raises the limit and replays it.
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["quarantine", "list", "--database-url", &setup.db.url])
        .output()?;
    assert!(listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&poison.to_string()));
    let replayed = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args([
            "quarantine",
            "replay",
            "--all",
            "--database-url",
            &setup.db.url,
        ])
        .output()?;
    assert!(replayed.status.success());
    assert!(String::from_utf8_lossy(&replayed.stdout).starts_with("1 row(s)"));

    settings.max_payload_bytes = 8192;
    let relay = RunningRelay::start(settings).await?;
    collector.wait_for_distinct(6, TIMEOUT).await?;
    relay.stop().await?;
    assert_complete_and_in_order(&collector.received(), 2, 3);
    Ok(())
}

#[tokio::test]
async fn a_row_too_long_for_amqp_is_quarantined_at_once_and_the_relay_goes_on() -> Result<()> {
    let setup = Setup::new().await?;
    let collector = setup.consume();

    // enqueue refuses such an event and writes nothing...
    let long_type = format!("shop.events.v1.{}", "X".repeat(300));
    let mut tx = setup.db.pool.begin().await?;
    let refused = shop_outbox::enqueue_raw(
        &mut tx,
        shop_outbox::Aggregate::new("counter", "agg-0"),
        &long_type,
        b"agg-0:1",
        "text/plain",
        &shop_outbox::EventContext::default(),
    )
    .await;
    assert!(matches!(
        refused,
        Err(shop_outbox::OutboxError::TooLong {
            field: "event_type",
            ..
        })
    ));
    tx.rollback().await?;
    assert_eq!(setup.unpublished().await?, 0);

    // ...but another writer may put one in the table.
    let mut tx = setup.db.pool.begin().await?;
    insert_event(&mut tx, "agg-0", 0, Vec::new()).await?;
    let poison = insert_event(&mut tx, "agg-0", 1, Vec::new()).await?;
    insert_event(&mut tx, "agg-0", 2, Vec::new()).await?;
    for n in 0..3 {
        insert_event(&mut tx, "agg-1", n, Vec::new()).await?;
    }
    sqlx::query("UPDATE outbox SET content_type = $2 WHERE message_id = $1")
        .bind(poison)
        .bind("text/".to_owned() + &"x".repeat(300))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;

    let mut settings = setup.settings();
    settings.stall_timeout = Duration::from_millis(500);
    let relay = RunningRelay::start(settings).await?;
    let rows = shop_tests::eventually(TIMEOUT, "the row's quarantine", || async {
        let rows = outbox_relay::store::list_quarantined(&setup.db.pool).await?;
        Ok((rows.len() == 1).then_some(rows))
    })
    .await?;
    assert_eq!(rows[0].message_id, poison);
    assert_eq!(rows[0].attempts, 1, "quarantined without retrying");
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("content_type is 305 bytes")
    );
    collector.wait_for_distinct(4, TIMEOUT).await?;
    // Still running and serving: a later event goes out too.
    let mut tx = setup.db.pool.begin().await?;
    insert_event(&mut tx, "agg-1", 3, Vec::new()).await?;
    tx.commit().await?;
    collector.wait_for_distinct(5, TIMEOUT).await?;
    // agg-0:2 waits behind the quarantined row for good; that is no stall
    // of the relay, however long past the stall timeout it has waited.
    sqlx::query(
        "UPDATE outbox SET occurred_at = now() - interval '1 hour' \
         WHERE published_at IS NULL AND quarantined_at IS NULL",
    )
    .execute(&setup.db.pool)
    .await?;
    let partitions: i32 = sqlx::query_scalar("SELECT outbox_partition_count()")
        .fetch_one(&setup.db.pool)
        .await?;
    let every_partition: Vec<i32> = (0..partitions).collect();
    let waited = outbox_relay::store::oldest_ready_wait(&setup.db.pool, &every_partition).await?;
    assert_eq!(waited, 0.0, "a held-back row counted as ready");
    assert_eq!(relay.health().await?, ServingStatus::Serving);
    relay.stop().await?;
    let payloads: Vec<String> = collector
        .received()
        .iter()
        .map(|m| m.payload.clone())
        .collect();
    assert_eq!(
        payloads,
        vec!["agg-0:0", "agg-1:0", "agg-1:1", "agg-1:2", "agg-1:3"],
        "agg-0's later event waits behind the quarantined one"
    );
    Ok(())
}

#[tokio::test]
async fn database_connections_lost_mid_stream_lose_nothing() -> Result<()> {
    let setup = Setup::new().await?;
    let (aggregates, per_aggregate) = (20, 100);
    setup.insert_events(aggregates, per_aggregate, 200).await?;
    let collector = setup.consume();
    let mut settings = setup.settings();
    settings.batch_size = 50;
    let relay = RunningRelay::start(settings).await?;

    shop_tests::eventually(TIMEOUT, "the first events", || async {
        Ok((!collector.received().is_empty()).then_some(()))
    })
    .await?;
    let killed = setup.db.terminate_connections().await?;
    assert!(killed > 0, "the relay had no connection to lose");

    collector
        .wait_for_distinct(aggregates * per_aggregate, TIMEOUT)
        .await?;
    relay.stop().await?;
    assert_complete_and_in_order(&collector.received(), aggregates, per_aggregate);
    Ok(())
}

#[tokio::test]
async fn health_reports_serving_and_sigterm_stops_cleanly_releasing_leases() -> Result<()> {
    let setup = Setup::new().await?;
    let collector = setup.consume();
    let relay = RunningRelay::start(setup.settings()).await?;
    let addr = relay.health_addr;
    let status = shop_tests::eventually(TIMEOUT, "the relay to serve", || async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let mut client = HealthClient::new(channel);
        let status = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner()
            .status();
        Ok((status == ServingStatus::Serving).then_some(status))
    })
    .await?;
    assert_eq!(status, ServingStatus::Serving);
    relay.stop().await?;

    // The same through the binary and a real SIGTERM.
    let mut child = setup.spawn_relay_process(&setup.settings());
    setup.insert_events(3, 3, 9).await?;
    collector.wait_for_distinct(9, TIMEOUT).await?;
    let exit = child.terminate().await?;
    assert!(exit.success(), "relay exited with {exit}");
    let leases: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
         WHERE l.locktype = 'advisory' AND d.datname = current_database()",
    )
    .fetch_one(&setup.db.pool)
    .await?;
    assert_eq!(leases, 0, "a stopped relay holds no partitions");
    assert_eq!(setup.unpublished().await?, 0);
    Ok(())
}

#[tokio::test]
async fn the_relay_binary_serves_its_metrics_for_prometheus() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let setup = Setup::new().await?;
    let collector = setup.consume();
    let mut settings = setup.settings();
    settings.metrics_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?
    };
    let _relay = setup.spawn_relay_process(&settings);
    setup.insert_events(2, 3, 6).await?;
    collector.wait_for_distinct(6, TIMEOUT).await?;

    let scrape = || async {
        let mut stream = tokio::net::TcpStream::connect(settings.metrics_addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n")
            .await?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await?;
        anyhow::Ok(body)
    };
    // The counters move as events are published; the gauges appear at the
    // relay's next backlog measurement.
    let expected = [
        "outbox_relay_published_total{event_type=\"test.v1.Counted\"} 6",
        "outbox_relay_pending_rows",
        "outbox_relay_oldest_pending_age_seconds",
        "outbox_relay_quarantined_rows",
        "outbox_relay_partitions_owned 32",
        "outbox_relay_commit_to_confirm_seconds_bucket",
    ];
    let found = shop_tests::eventually(TIMEOUT, "every relay metric", || async {
        let body = scrape().await.unwrap_or_default();
        Ok(expected
            .iter()
            .all(|metric| body.contains(metric))
            .then_some(()))
    })
    .await;
    if let Err(error) = found {
        let body = scrape().await?;
        let missing: Vec<_> = expected.iter().filter(|m| !body.contains(*m)).collect();
        anyhow::bail!("{error}: {missing:?} missing from:\n{body}");
    }
    Ok(())
}

/// Settings under which only a notification can wake an idle relay: its
/// poll and rebalance timers are an hour away.
fn settings_without_polling(setup: &Setup) -> outbox_relay::RelaySettings {
    let mut settings = setup.settings();
    settings.poll_interval = Duration::from_secs(3600);
    settings.rebalance_interval = Duration::from_secs(3600);
    settings
}

#[tokio::test]
async fn an_idle_relay_is_woken_by_every_commit_whenever_it_lands() -> Result<()> {
    let setup = Setup::new().await?;
    let collector = setup.consume();
    let relay = RunningRelay::start(settings_without_polling(&setup)).await?;

    // Each event alone, committed either right after the previous one
    // arrived (the relay is still busy or lingering, not armed) or once the
    // relay has armed itself again. Were any commit left unannounced, it
    // would wait an hour for the poll.
    let events = 60;
    for n in 0..events {
        if n % 2 == 1 {
            shop_tests::eventually(TIMEOUT, "the relay to arm itself", || async {
                let armed: bool =
                    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox_listener)")
                        .fetch_one(&setup.db.pool)
                        .await?;
                Ok(armed.then_some(()))
            })
            .await?;
        }
        let mut tx = setup.db.pool.begin().await?;
        insert_event(&mut tx, "agg-0", n, Vec::new()).await?;
        tx.commit().await?;
        collector
            .wait_for_distinct(n + 1, Duration::from_secs(30))
            .await?;
    }
    relay.stop().await?;
    assert_complete_and_in_order(&collector.received(), 1, events);
    Ok(())
}

#[tokio::test]
async fn writers_do_not_notify_a_relay_that_is_busy_publishing() -> Result<()> {
    let setup = Setup::new().await?;
    let collector = setup.consume();
    let relay = RunningRelay::start(setup.settings()).await?;
    // Let the relay settle into waiting for notifications.
    let mut tx = setup.db.pool.begin().await?;
    insert_event(&mut tx, "warm-up", 0, Vec::new()).await?;
    tx.commit().await?;
    collector.wait_for_distinct(1, TIMEOUT).await?;

    let mut listener = sqlx::postgres::PgListener::connect(&setup.db.url).await?;
    listener.listen("outbox").await?;
    let (writers, per_writer) = (4, 300);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let pool = setup.db.pool.clone();
        tasks.spawn(async move {
            for n in 0..per_writer {
                let mut tx = pool.begin().await?;
                insert_event(&mut tx, &format!("agg-{w}"), n, Vec::new()).await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(written) = tasks.join_next().await {
        written??;
    }
    collector
        .wait_for_distinct(1 + writers * per_writer, TIMEOUT)
        .await?;
    let mut notifications = 0;
    while let Ok(Ok(Some(_))) =
        tokio::time::timeout(Duration::from_millis(200), listener.try_recv()).await
    {
        notifications += 1;
    }
    relay.stop().await?;

    let commits = writers * per_writer;
    assert!(
        notifications * 4 < commits,
        "{notifications} notifications for {commits} commits: writers kept notifying a busy relay"
    );
    let received: Vec<_> = collector
        .received()
        .into_iter()
        .filter(|m| m.aggregate_and_seq().0 != "warm-up")
        .collect();
    assert_complete_and_in_order(&received, writers, per_writer);
    Ok(())
}

/// Holders of the relay's partition locks on the test database.
async fn lease_holders(setup: &Setup) -> Result<Vec<(i32, i64)>> {
    Ok(sqlx::query_as(
        "SELECT l.pid, count(*) FROM pg_locks l \
         JOIN pg_database d ON d.oid = l.database \
         WHERE l.locktype = 'advisory' AND l.classid = x'6f757462'::int::oid \
           AND d.datname = current_database() \
         GROUP BY l.pid",
    )
    .fetch_all(&setup.db.pool)
    .await?)
}

#[tokio::test]
async fn a_frozen_relay_loses_its_partitions_within_the_lease_timeout_and_nothing_waits_for_it()
-> Result<()> {
    let setup = Setup::new().await?;
    let collector = setup.consume();
    let mut settings = setup.settings();
    settings.lease_timeout = Duration::from_secs(2);
    let partitions: i64 = sqlx::query_scalar("SELECT outbox_partition_count()::bigint")
        .fetch_one(&setup.db.pool)
        .await?;

    // The first relay takes every partition, then freezes (as under SIGSTOP
    // or a paused VM): its sessions stay open, but it says nothing.
    let mut frozen = setup.spawn_relay_process(&settings);
    shop_tests::eventually(
        TIMEOUT,
        "the first relay to hold every partition",
        || async {
            let holders = lease_holders(&setup).await?;
            Ok((holders.len() == 1 && holders[0].1 == partitions).then_some(()))
        },
    )
    .await?;
    frozen.signal("STOP")?;

    let relay = RunningRelay::start(settings).await?;
    setup.insert_events(10, 10, 25).await?;
    collector.wait_for_distinct(100, TIMEOUT).await?;
    assert_complete_and_in_order(&collector.received(), 10, 10);
    let status = shop_tests::eventually(TIMEOUT, "the live relay to serve", || async {
        let status = relay.health().await?;
        Ok((status == ServingStatus::Serving).then_some(status))
    })
    .await?;
    assert_eq!(status, ServingStatus::Serving);

    // Woken up, the first relay finds its session gone, reconnects, and
    // still shuts down cleanly.
    frozen.signal("CONT")?;
    let exit = frozen.terminate().await?;
    assert!(exit.success(), "the thawed relay exited with {exit}");
    relay.stop().await?;
    assert_eq!(setup.unpublished().await?, 0);
    Ok(())
}

#[tokio::test]
async fn health_reports_not_serving_while_the_outbox_stalls_and_serving_once_it_moves() -> Result<()>
{
    let setup = Setup::new().await?;
    let collector = setup.consume();
    // Another session holds every partition, as a relay the server has not
    // yet given up on would.
    let mut holder = setup.db.connect().await?;
    sqlx::query(
        "SELECT pg_advisory_lock(x'6f757462'::int, p) \
         FROM generate_series(0, outbox_partition_count() - 1) AS p",
    )
    .execute(&mut holder)
    .await?;
    let mut tx = setup.db.pool.begin().await?;
    for n in 0..5 {
        insert_event(&mut tx, "agg-0", n, Vec::new()).await?;
    }
    tx.commit().await?;

    let mut settings = setup.settings();
    settings.stall_timeout = Duration::from_secs(1);
    let relay = RunningRelay::start(settings).await?;
    shop_tests::eventually(TIMEOUT, "health to report the stall", || async {
        let status = relay.health().await?;
        Ok((status == ServingStatus::NotServing).then_some(()))
    })
    .await?;
    assert_eq!(
        relay.health_of(outbox_relay::relay::LIVENESS).await?,
        ServingStatus::Serving,
        "alive while stalled"
    );
    assert!(collector.received().is_empty());

    drop(holder);
    collector.wait_for_distinct(5, TIMEOUT).await?;
    shop_tests::eventually(TIMEOUT, "health to recover", || async {
        let status = relay.health().await?;
        Ok((status == ServingStatus::Serving).then_some(()))
    })
    .await?;
    relay.stop().await?;
    Ok(())
}
