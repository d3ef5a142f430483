//! The subscriber runtime against real PostgreSQL and RabbitMQ: exactly-once
//! effects, crashes before commit, poison messages, retries and the DLQ.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use support::{Mode, Recorder, Setup};
use uuid::Uuid;

#[tokio::test]
async fn the_same_message_delivered_twice_changes_state_once() -> Result<()> {
    let setup = Setup::new().await?;
    let recorder = Recorder::new(Mode::Apply);
    let running = setup.start(&recorder).await?;

    let id = Uuid::now_v7();
    setup.publish(id, "order-1").await?;
    setup.publish(id, "order-1").await?;
    // Same aggregate, so the same lane: once this one is applied, both
    // copies before it have been settled.
    setup.publish(Uuid::now_v7(), "order-1").await?;
    shop_tests::eventually(
        Duration::from_secs(30),
        "three deliveries settled",
        || async {
            let rows = setup.applied("order-1").await?;
            Ok((rows.len() >= 2).then_some(()))
        },
    )
    .await?;
    running.stop().await?;

    assert_eq!(
        setup.applied("order-1").await?.len(),
        2,
        "the duplicate was applied again"
    );
    assert_eq!(
        recorder.calls.load(Ordering::SeqCst),
        2,
        "the handler ran for the duplicate"
    );
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE consumer = $1")
        .bind(support::CONSUMER)
        .fetch_one(&setup.db.pool)
        .await?;
    assert_eq!(inbox, 2);
    Ok(())
}

#[tokio::test]
async fn a_subscriber_crashing_after_its_write_before_commit_gets_the_message_again_and_applies_it_once()
-> Result<()> {
    let setup = Setup::new().await?;
    let recorder = Recorder::new(Mode::HangAfterWriteOnce);
    let running = setup.start(&recorder).await?;
    setup.publish(Uuid::now_v7(), "order-2").await?;

    // The handler has written but not committed: crash the subscriber.
    tokio::time::timeout(Duration::from_secs(30), recorder.wrote.notified()).await?;
    running.crash().await;
    assert!(
        setup.applied("order-2").await?.is_empty(),
        "an uncommitted write became visible"
    );

    let running = setup.start(&recorder).await?;
    let rows = setup.wait_applied("order-2").await?;
    running.stop().await?;
    assert_eq!(
        rows,
        vec![(1, true)],
        "applied once, on the broker's redelivery"
    );
    assert_eq!(setup.applied("order-2").await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_handler_panicking_after_its_write_is_retried_and_applied_once() -> Result<()> {
    let setup = Setup::new().await?;
    let recorder = Recorder::new(Mode::PanicAfterWriteOnce);
    let running = setup.start(&recorder).await?;
    setup.publish(Uuid::now_v7(), "order-3").await?;
    let rows = setup.wait_applied("order-3").await?;
    running.stop().await?;
    assert_eq!(
        rows,
        vec![(2, false)],
        "applied once, on the second attempt"
    );
    Ok(())
}

#[tokio::test]
async fn poison_messages_go_to_the_dlq_while_the_next_messages_are_handled() -> Result<()> {
    let setup = Setup::new().await?;
    let recorder = Recorder::new(Mode::Apply);
    let running = setup.start(&recorder).await?;

    let undecodable = Uuid::now_v7();
    setup
        .publish_raw(
            &setup.settings.exchange,
            "shop.events.v1.OrderPlaced",
            undecodable,
            "order-4",
            "shop.events.v1.OrderPlaced",
            &[0xff, 0xff, 0xff],
        )
        .await?;
    let unknown = Uuid::now_v7();
    setup
        .publish_raw(
            "",
            &setup.queue,
            unknown,
            "order-4",
            "shop.events.v1.Unheard",
            b"",
        )
        .await?;
    for n in 0..3 {
        setup
            .publish(Uuid::now_v7(), &format!("order-4-{n}"))
            .await?;
    }
    for n in 0..3 {
        setup.wait_applied(&format!("order-4-{n}")).await?;
    }

    let conn = setup.broker.connect().await?;
    let letters = shop_tests::eventually(Duration::from_secs(30), "two dead letters", || async {
        let letters = shop_subscriber::dlq::list(&conn, &setup.queue).await?;
        Ok((letters.len() == 2).then_some(letters))
    })
    .await?;
    running.stop().await?;
    let reason_of = |id: Uuid| {
        letters
            .iter()
            .find(|l| l.message_id.as_deref() == Some(&id.to_string()))
            .and_then(|l| l.reason.clone())
            .unwrap_or_default()
    };
    assert!(
        reason_of(undecodable).contains("cannot decode"),
        "{letters:?}"
    );
    assert!(reason_of(unknown).contains("no handler"), "{letters:?}");
    assert!(
        letters.iter().all(|l| l.attempts == Some(1)),
        "dead-lettered at once: {letters:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_message_that_keeps_failing_is_retried_with_backoff_then_dead_lettered_and_can_be_replayed()
-> Result<()> {
    let setup = Setup::new().await?;
    let recorder = Recorder::new(Mode::AlwaysFail);
    let running = setup.start(&recorder).await?;
    let id = Uuid::now_v7();
    setup.publish(id, "order-5-fail").await?;
    // A later message of another aggregate is not held up by the failing one.
    setup.publish(Uuid::now_v7(), "order-5-next").await?;
    setup.wait_applied("order-5-next").await?;

    let conn = setup.broker.connect().await?;
    let letters = shop_tests::eventually(Duration::from_secs(30), "the dead letter", || async {
        let letters = shop_subscriber::dlq::list(&conn, &setup.queue).await?;
        Ok((letters.len() == 1).then_some(letters))
    })
    .await?;
    assert_eq!(
        letters[0].message_id.as_deref(),
        Some(id.to_string().as_str())
    );
    assert_eq!(letters[0].attempts, Some(3));
    assert_eq!(
        letters[0].original_routing_key.as_deref(),
        Some("shop.events.v1.OrderPlaced"),
        "the routing key it was published with, not the queue it came back by"
    );
    assert!(
        letters[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("downstream unavailable")
    );
    assert!(setup.applied("order-5-fail").await?.is_empty());
    // Three attempts, numbered 1 to 3 in order. One attempt may have been
    // tried twice: a message that arrived in a batch with another one
    // failed there first, was rolled back, and was then tried on its own;
    // and a retry queue dead-letters back at least once, not exactly once.
    let attempts = recorder.failed_attempts.lock().unwrap().clone();
    let mut numbers = attempts.clone();
    numbers.dedup();
    assert!(
        attempts.is_sorted() && numbers == [1, 2, 3],
        "three attempts: {attempts:?}"
    );

    // Once the cause is fixed, the operator replays it.
    recorder.set_mode(Mode::Apply);
    let replayed = shop_subscriber::dlq::replay(&conn, &setup.queue, &[id.to_string()]).await?;
    assert_eq!(replayed, 1);
    let rows = setup.wait_applied("order-5-fail").await?;
    running.stop().await?;
    assert_eq!(rows, vec![(1, false)]);
    assert!(
        shop_subscriber::dlq::list(&conn, &setup.queue)
            .await?
            .is_empty()
    );
    Ok(())
}

#[tokio::test]
async fn a_message_arriving_before_what_it_depends_on_is_retried_until_it_applies() -> Result<()> {
    let mut setup = Setup::new().await?;
    setup.settings.max_attempts = 10;
    let recorder = Recorder::new(Mode::NeedsKnownOrder);
    let running = setup.start(&recorder).await?;
    setup.publish(Uuid::now_v7(), "order-6").await?;

    shop_tests::eventually(Duration::from_secs(30), "a retry", || async {
        Ok((recorder.calls.load(Ordering::SeqCst) >= 2).then_some(()))
    })
    .await?;
    sqlx::query("INSERT INTO known_orders VALUES ('order-6')")
        .execute(&setup.db.pool)
        .await?;
    let rows = setup.wait_applied("order-6").await?;
    running.stop().await?;
    assert_eq!(rows.len(), 1);
    assert!(rows[0].0 >= 2, "applied on a retry, attempt {}", rows[0].0);
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_handler_in_flight_and_acknowledges_it() -> Result<()> {
    let setup = Setup::new().await?;
    let recorder = Recorder::new(Mode::WaitForRelease);
    let running = setup.start(&recorder).await?;
    setup.publish(Uuid::now_v7(), "order-7").await?;
    tokio::time::timeout(Duration::from_secs(30), recorder.wrote.notified()).await?;

    // Shutdown begins while the handler is still working.
    running.shutdown.cancel();
    recorder.release.notify_one();
    running.handle.await??;

    assert_eq!(
        setup.applied("order-7").await?.len(),
        1,
        "the handler's work was committed"
    );
    assert_eq!(
        setup.ready_messages().await?,
        0,
        "and the message acknowledged, not returned"
    );
    Ok(())
}

#[tokio::test]
async fn a_retired_event_type_stops_being_routed_and_what_was_queued_is_still_applied() -> Result<()>
{
    let setup = Setup::new().await?;
    let recorder = Recorder::new(Mode::Apply);
    // An earlier version of the service consumed OrderPlaced on this queue.
    setup.subscriber(&recorder).declare().await?;
    let queued = Uuid::now_v7();
    setup.publish(queued, "order-queued").await?;

    // This version moved it elsewhere.
    let subscriber = shop_subscriber::Subscriber::builder(
        support::CONSUMER,
        &setup.queue,
        setup.settings.clone(),
    )
    .retire::<shop_proto::events::v1::OrderPlaced, _>(recorder.clone())
    .build(setup.db.pool.clone());
    subscriber.declare().await?;
    let after = setup.publish(Uuid::now_v7(), "order-after").await;
    assert!(
        after.is_err(),
        "the retired binding still routes OrderPlaced to the queue"
    );

    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(subscriber.run_until_stopped(shutdown.clone()));
    let rows = setup.wait_applied("order-queued").await?;
    shutdown.cancel();
    running.await??;
    assert_eq!(rows.len(), 1, "the queued event was not applied once");
    Ok(())
}

#[tokio::test]
async fn a_replay_moves_exactly_the_dead_letters_present_when_it_starts_even_if_they_fail_again()
-> Result<()> {
    let mut setup = Setup::new().await?;
    // One attempt: a failure goes straight back to the dead-letter queue.
    setup.settings.max_attempts = 1;
    let recorder = Recorder::new(Mode::AlwaysFail);
    let running = setup.start(&recorder).await?;
    const LETTERS: usize = 200;
    let orders: Vec<String> = (0..LETTERS).map(|n| format!("order-fail-{n}")).collect();
    setup.publish_many(&orders).await?;

    let conn = setup.broker.connect().await?;
    let dead = async |expected: usize| {
        shop_tests::eventually(Duration::from_secs(60), "the dead letters", || async {
            let letters = shop_subscriber::dlq::list(&conn, &setup.queue).await?;
            Ok((letters.len() == expected).then_some(()))
        })
        .await
    };
    dead(LETTERS).await?;
    // Listing handed them back; wait until the broker shows them all ready.
    let channel = conn.create_channel().await?;
    shop_tests::eventually(
        Duration::from_secs(30),
        "the letters to be ready",
        || async {
            let dlq = channel
                .queue_declare(
                    format!("{}.dlq", setup.queue).as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await?;
            Ok((dlq.message_count() as usize == LETTERS).then_some(()))
        },
    )
    .await?;
    let before = recorder.calls.load(Ordering::SeqCst);

    // The consumer still fails every message, so each replayed one comes
    // back to the dead-letter queue while the replay runs.
    let replayed = tokio::time::timeout(
        Duration::from_secs(60),
        shop_subscriber::dlq::replay(&conn, &setup.queue, &[]),
    )
    .await
    .expect("the replay never ended")?;
    assert_eq!(replayed, LETTERS, "each dead letter was replayed once");
    assert!(
        recorder.calls.load(Ordering::SeqCst) > before,
        "replayed to the consumer"
    );
    // They fail again and are all back, once each.
    dead(LETTERS).await?;
    let ids: std::collections::HashSet<Option<String>> =
        shop_subscriber::dlq::list(&conn, &setup.queue)
            .await?
            .into_iter()
            .map(|letter| letter.message_id)
            .collect();
    assert_eq!(ids.len(), LETTERS);
    running.stop().await?;
    Ok(())
}

#[tokio::test]
async fn cloud_events_attributes_are_read_under_the_amqp_binding_and_the_older_http_names()
-> Result<()> {
    use prost::Message as _;
    let setup = Setup::new().await?;
    let recorder = Recorder::new(Mode::Apply);
    let running = setup.start(&recorder).await?;
    let payload = |order_id: &str| {
        shop_proto::events::v1::OrderPlaced {
            order_id: order_id.into(),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let (current, older) = (Uuid::now_v7(), Uuid::now_v7());
    // As relays publish now: the AMQP binding's names.
    setup
        .publish_with_headers(
            &setup.settings.exchange,
            "shop.events.v1.OrderPlaced",
            current,
            "order-1",
            "shop.events.v1.OrderPlaced",
            &payload("order-1"),
            &[
                ("cloudEvents_source", "order-service"),
                ("cloudEvents_time", "2026-11-29T10:00:00.000001Z"),
            ],
        )
        .await?;
    // As relays before the AMQP binding did: the HTTP binding's names.
    setup
        .publish_with_headers(
            &setup.settings.exchange,
            "shop.events.v1.OrderPlaced",
            older,
            "order-2",
            "shop.events.v1.OrderPlaced",
            &payload("order-2"),
            &[
                ("ce-source", "old-relay"),
                ("ce-time", "2026-11-28T09:00:00Z"),
            ],
        )
        .await?;
    let rows: Vec<(Uuid, Option<String>, Option<chrono::DateTime<chrono::Utc>>)> =
        shop_tests::eventually(Duration::from_secs(30), "both applied", || async {
            let rows: Vec<(Uuid, Option<String>, Option<chrono::DateTime<chrono::Utc>>)> =
                sqlx::query_as(
                    "SELECT message_id, source, occurred_at FROM inbox ORDER BY occurred_at",
                )
                .fetch_all(&setup.db.pool)
                .await?;
            Ok((rows.len() == 2).then_some(rows))
        })
        .await?;
    running.stop().await?;
    let time = |text: &str| chrono::DateTime::parse_from_rfc3339(text).map(|t| t.to_utc());
    assert_eq!(
        rows,
        [
            (
                older,
                Some("old-relay".to_owned()),
                Some(time("2026-11-28T09:00:00Z")?)
            ),
            (
                current,
                Some("order-service".to_owned()),
                Some(time("2026-11-29T10:00:00.000001Z")?)
            ),
        ]
    );
    Ok(())
}

#[tokio::test]
async fn upgrading_to_replicated_retry_queues_strands_no_message_waiting_in_the_classic_ones()
-> Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    use prost::Message;

    let setup = Setup::new().await?;
    let recorder = Recorder::new(Mode::Apply);
    let subscriber = setup.subscriber(&recorder);
    let retired = subscriber.topology().retired_retry_queues();
    for queue in &retired {
        setup.broker.track(queue);
    }
    assert!(
        subscriber
            .topology()
            .retry_queue(1)
            .contains(".retry.quorum."),
        "quorum work queues get quorum retry queues"
    );

    // What an earlier version left: its classic retry queues, the first
    // holding a message that waits 8 s for its retry.
    let conn = setup.broker.connect().await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for queue in &retired {
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(setup.queue.as_str())),
        );
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
    }
    let waiting = Uuid::now_v7();
    let payload = shop_proto::events::v1::OrderPlaced {
        order_id: "order-waiting".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut headers = FieldTable::default();
    headers.insert(
        "aggregate_id".into(),
        AMQPValue::LongString(LongString::from("order-waiting")),
    );
    headers.insert("x-attempt".into(), AMQPValue::LongUInt(2));
    channel
        .basic_publish(
            "".into(),
            retired[0].as_str().into(),
            BasicPublishOptions::default(),
            &payload,
            lapin::BasicProperties::default()
                .with_message_id(waiting.to_string().as_str().into())
                .with_type("shop.events.v1.OrderPlaced".into())
                .with_expiration("8000".into())
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await?
        .await?;
    let _ = conn.close(200, "OK".into()).await;

    // The new version keeps the one still holding a message and removes
    // the empty ones.
    subscriber.declare().await?;
    assert!(
        setup.messages_in(&retired[0]).await?.is_some(),
        "a non-empty one was removed"
    );
    for queue in &retired[1..] {
        assert!(
            setup.messages_in(queue).await?.is_none(),
            "{queue} was kept"
        );
    }

    // The waiting message still comes back to the work queue and is
    // applied; the next start removes the emptied queue.
    let running = setup.start(&recorder).await?;
    let rows = setup.wait_applied("order-waiting").await?;
    assert_eq!(rows.len(), 1);
    running.stop().await?;
    setup.subscriber(&recorder).declare().await?;
    assert!(
        setup.messages_in(&retired[0]).await?.is_none(),
        "the emptied queue is still there"
    );
    Ok(())
}

/// A delivery whose handler does not get a lock in time (someone else
/// holds the row for longer than the lock timeout, several times over) is
/// tried again in place, without spending an attempt, and applied once the
/// lock is free: a long-held lock delays messages but never dead-letters
/// them.
#[tokio::test]
async fn a_handler_held_up_past_the_lock_timeout_waits_without_spending_attempts() -> Result<()> {
    use shop_proto::events::v1::{OrderLine, OrderPlaced};
    use sqlx::postgres::PgPoolOptions;

    let setup = Setup::new().await?;
    sqlx::query("INSERT INTO counters (key) VALUES ('held')")
        .execute(&setup.db.pool)
        .await?;
    let recorder = Recorder::new(Mode::CountLines);
    // The subscriber's connections give up on a lock after 200 ms, as a
    // service's do after DATABASE_LOCK_TIMEOUT.
    let options = (*setup.db.pool.connect_options())
        .clone()
        .options([("lock_timeout", "200ms"), ("statement_timeout", "5s")]);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    let subscriber = shop_subscriber::Subscriber::builder(
        support::CONSUMER,
        &setup.queue,
        setup.settings.clone(),
    )
    .on::<OrderPlaced, _>(recorder.clone())
    .build(pool);
    for queue in subscriber.topology().queues() {
        setup.broker.track(&queue);
    }
    subscriber.declare().await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(subscriber.run_until_stopped(shutdown.clone()));

    // The test holds the row the handler updates until the handler has
    // given up on it more often than there are attempts: a delivery that
    // spent an attempt per lock timeout would be dead-lettered by then,
    // and never tried that often.
    let mut holder = setup.db.pool.begin().await?;
    sqlx::query("SELECT n FROM counters WHERE key = 'held' FOR UPDATE")
        .execute(&mut *holder)
        .await?;
    let event = OrderPlaced {
        order_id: "order-held".into(),
        lines: vec![OrderLine {
            product_id: "held".into(),
            quantity: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    setup
        .publish_orders(&[(Uuid::now_v7(), "order-held".into(), event)])
        .await?;
    let tries = setup.settings.max_attempts + 2;
    shop_tests::eventually(
        Duration::from_secs(30),
        "the handler to be tried more often than there are attempts",
        || async { Ok((recorder.calls.load(Ordering::SeqCst) >= tries).then_some(())) },
    )
    .await?;
    assert!(setup.applied("order-held").await?.is_empty());
    holder.rollback().await?;

    assert_eq!(
        setup.wait_applied("order-held").await?,
        [(1, false)],
        "applied once, as its first attempt, from its first delivery"
    );
    let counted: i64 = sqlx::query_scalar("SELECT n FROM counters WHERE key = 'held'")
        .fetch_one(&setup.db.pool)
        .await?;
    assert_eq!(counted, 1);
    let conn = setup.broker.connect().await?;
    assert!(
        shop_subscriber::dlq::list(&conn, &setup.queue)
            .await?
            .is_empty()
    );
    shutdown.cancel();
    running.await??;
    Ok(())
}
