//! Several deliveries applied in one transaction: each message still takes
//! effect exactly once, in order per aggregate, and a failing message or a
//! crash mid-batch costs nothing but a retry.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use shop_proto::events::v1::{OrderLine, OrderPlaced};
use support::{Mode, Recorder, Setup};
use uuid::Uuid;

/// Events `agg-<a>:<n>` for `aggregates` aggregates, `per_aggregate` each,
/// interleaved, as (message id, aggregate id, order id).
fn events(aggregates: usize, per_aggregate: usize) -> Vec<(Uuid, String, String)> {
    let mut events = Vec::new();
    for n in 0..per_aggregate {
        for a in 0..aggregates {
            events.push((Uuid::now_v7(), format!("agg-{a}"), format!("agg-{a}:{n}")));
        }
    }
    events
}

/// Applied order ids, in the order they were applied.
async fn applied_in_order(setup: &Setup) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT order_id FROM applied ORDER BY seq")
            .fetch_all(&setup.db.pool)
            .await?,
    )
}

/// Transactions that wrote the consumer's inbox rows: rows written in one
/// transaction share its start time.
async fn inbox_transactions(setup: &Setup) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(DISTINCT received_at) FROM inbox WHERE consumer = $1")
            .bind(support::CONSUMER)
            .fetch_one(&setup.db.pool)
            .await?,
    )
}

async fn wait_for_applied(setup: &Setup, count: usize) -> Result<()> {
    shop_tests::eventually(Duration::from_secs(60), "every message applied", || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM applied")
            .fetch_one(&setup.db.pool)
            .await?;
        Ok((rows as usize >= count).then_some(()))
    })
    .await
}

/// Panics unless every aggregate's events were applied exactly once each
/// and in the order they were published.
fn assert_once_and_in_order(applied: &[String], aggregates: usize, per_aggregate: usize) {
    let mut seen: HashMap<&str, Vec<usize>> = HashMap::new();
    for order_id in applied {
        let (aggregate, n) = order_id.split_once(':').expect("agg-a:n");
        seen.entry(aggregate).or_default().push(n.parse().unwrap());
    }
    assert_eq!(seen.len(), aggregates, "aggregates applied: {seen:?}");
    for (aggregate, ns) in seen {
        assert_eq!(
            ns,
            (0..per_aggregate).collect::<Vec<_>>(),
            "{aggregate} was not applied once each, in order"
        );
    }
}

#[tokio::test]
async fn a_backlog_is_applied_in_batches_once_each_and_in_order_per_aggregate() -> Result<()> {
    let setup = Setup::new().await?;
    let recorder = Recorder::new(Mode::Apply);
    setup.subscriber(&recorder).declare().await?;
    let (aggregates, per_aggregate) = (8, 40);
    let mut backlog = events(aggregates, per_aggregate);
    // A producer that repeats itself: every tenth message again, right
    // behind the original, so copies land in the same batch.
    let repeats: Vec<_> = backlog.iter().step_by(10).cloned().collect();
    for repeat in repeats {
        let at = backlog.iter().position(|e| e.0 == repeat.0).unwrap() + 1;
        backlog.insert(at, repeat);
    }
    setup.publish_events(&backlog).await?;

    let running = setup.start(&recorder).await?;
    wait_for_applied(&setup, aggregates * per_aggregate).await?;
    shop_tests::eventually(Duration::from_secs(30), "the queue drained", || async {
        Ok((setup.ready_messages().await? == 0).then_some(()))
    })
    .await?;
    running.stop().await?;

    let applied = applied_in_order(&setup).await?;
    assert_eq!(
        applied.len(),
        aggregates * per_aggregate,
        "duplicates applied"
    );
    assert_once_and_in_order(&applied, aggregates, per_aggregate);
    let transactions = inbox_transactions(&setup).await?;
    assert!(
        (transactions as usize) < aggregates * per_aggregate / 2,
        "{transactions} transactions for {} messages: the backlog was not batched",
        aggregates * per_aggregate
    );
    Ok(())
}

#[tokio::test]
async fn a_failing_message_leaves_its_batch_to_apply_one_by_one_and_goes_to_the_dlq_alone()
-> Result<()> {
    let setup = Setup::new().await?;
    let recorder = Recorder::new(Mode::AlwaysFail);
    setup.subscriber(&recorder).declare().await?;
    let mut backlog = events(4, 10);
    let failing = Uuid::now_v7();
    backlog.insert(
        13,
        (failing, "agg-fail".to_owned(), "agg-fail:0".to_owned()),
    );
    setup.publish_events(&backlog).await?;

    let running = setup.start(&recorder).await?;
    wait_for_applied(&setup, 40).await?;
    let conn = setup.broker.connect().await?;
    let letters = shop_tests::eventually(
        Duration::from_secs(60),
        "the failing message dead-lettered",
        || async {
            let letters = shop_subscriber::dlq::list(&conn, &setup.queue).await?;
            Ok((!letters.is_empty()).then_some(letters))
        },
    )
    .await?;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        letters[0].message_id.as_deref(),
        Some(failing.to_string().as_str())
    );
    running.stop().await?;

    let applied = applied_in_order(&setup).await?;
    assert_eq!(applied.len(), 40, "{applied:?}");
    assert_once_and_in_order(&applied, 4, 10);
    Ok(())
}

#[tokio::test]
async fn a_crash_in_the_middle_of_a_batch_commits_none_of_it_and_the_redelivery_applies_it_once()
-> Result<()> {
    let setup = Setup::new().await?;
    // The first handler call writes, then hangs: the batch it belongs to
    // has written but not committed when the subscriber is killed.
    let recorder = Recorder::new(Mode::HangAfterWriteOnce);
    setup.subscriber(&recorder).declare().await?;
    setup.publish_events(&events(1, 30)).await?;

    let running = setup.start(&recorder).await?;
    tokio::time::timeout(Duration::from_secs(30), recorder.wrote.notified()).await?;
    running.crash().await;
    assert!(
        applied_in_order(&setup).await?.is_empty(),
        "part of an uncommitted batch became visible"
    );

    let running = setup.start(&recorder).await?;
    wait_for_applied(&setup, 30).await?;
    shop_tests::eventually(Duration::from_secs(30), "the queue drained", || async {
        Ok((setup.ready_messages().await? == 0).then_some(()))
    })
    .await?;
    running.stop().await?;
    let applied = applied_in_order(&setup).await?;
    assert_once_and_in_order(&applied, 1, 30);
    Ok(())
}

#[tokio::test]
async fn batches_that_lock_the_same_rows_in_opposite_orders_all_apply_once() -> Result<()> {
    let setup = Setup::new().await?;
    let keys = ["a", "b", "c", "d", "e"];
    for key in keys {
        sqlx::query("INSERT INTO counters (key) VALUES ($1)")
            .bind(key)
            .execute(&setup.db.pool)
            .await?;
    }
    let recorder = Recorder::new(Mode::CountLines);
    setup.subscriber(&recorder).declare().await?;
    // Every message touches two of five rows, in a random order: four lanes
    // applying batches of them wait on each other, and deadlock, all the
    // time.
    let (aggregates, per_aggregate) = (16, 25);
    let backlog: Vec<_> = events(aggregates, per_aggregate)
        .into_iter()
        .map(|(message_id, aggregate_id, order_id)| {
            let first = rand::random_range(0..keys.len());
            let second = (first + rand::random_range(1..keys.len())) % keys.len();
            let event = OrderPlaced {
                order_id,
                lines: [first, second]
                    .into_iter()
                    .map(|k| OrderLine {
                        product_id: keys[k].to_owned(),
                        quantity: 1,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            (message_id, aggregate_id, event)
        })
        .collect();
    setup.publish_orders(&backlog).await?;

    let running = setup.start(&recorder).await?;
    wait_for_applied(&setup, aggregates * per_aggregate).await?;
    shop_tests::eventually(Duration::from_secs(30), "the queue drained", || async {
        Ok((setup.ready_messages().await? == 0).then_some(()))
    })
    .await?;
    running.stop().await?;

    let applied = applied_in_order(&setup).await?;
    assert_eq!(
        applied.len(),
        aggregates * per_aggregate,
        "duplicates applied"
    );
    let counted: i64 = sqlx::query_scalar("SELECT sum(n)::bigint FROM counters")
        .fetch_one(&setup.db.pool)
        .await?;
    assert_eq!(
        counted as usize,
        2 * aggregates * per_aggregate,
        "a message's effect was applied twice or not at all"
    );
    let conn = setup.broker.connect().await?;
    let letters = shop_subscriber::dlq::list(&conn, &setup.queue).await?;
    assert!(letters.is_empty(), "dead-lettered: {letters:?}");
    Ok(())
}
