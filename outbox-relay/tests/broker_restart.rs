//! A RabbitMQ restart in the middle of a stream loses nothing, on a broker
//! node of the test's own.

mod support;

use std::time::Duration;

use anyhow::Result;
use support::{RunningRelay, Setup, assert_complete_and_in_order};

#[tokio::test]
async fn broker_restart_mid_stream_loses_nothing() -> Result<()> {
    let node = shop_tests::PrivateBroker::start().await?;
    let setup = Setup::on_broker(shop_tests::TestBroker::on(&node.url)).await?;
    let (aggregates, per_aggregate) = (20, 200);
    setup.insert_events(aggregates, per_aggregate, 400).await?;
    let collector = setup.consume();
    let mut settings = setup.settings();
    settings.batch_size = 50;
    let relay = RunningRelay::start(settings).await?;

    shop_tests::eventually(Duration::from_secs(60), "the first events", || async {
        Ok((!collector.received().is_empty()).then_some(()))
    })
    .await?;
    node.stop_app().await?;
    let unpublished = setup.unpublished().await;
    node.start_app().await?;
    assert!(
        unpublished? > 0,
        "the relay finished before the broker stopped; the test proves nothing"
    );

    let arrived = collector
        .wait_for_distinct(aggregates * per_aggregate, Duration::from_secs(120))
        .await;
    if let Err(error) = arrived {
        let distinct: std::collections::HashSet<String> = collector
            .received()
            .iter()
            .map(|m| m.message_id())
            .collect();
        let conn = setup.broker.connect().await?;
        let channel = conn.create_channel().await?;
        let waiting = channel
            .queue_declare(
                setup.queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await?;
        anyhow::bail!(
            "{error}: {} distinct events arrived, {} rows still unpublished, {} messages ready and {} consumers on the queue",
            distinct.len(),
            setup.unpublished().await?,
            waiting.message_count(),
            waiting.consumer_count()
        );
    }
    relay.stop().await?;
    assert_complete_and_in_order(&collector.received(), aggregates, per_aggregate);
    assert_eq!(setup.unpublished().await?, 0);
    Ok(())
}
