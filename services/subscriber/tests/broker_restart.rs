//! A RabbitMQ restart while a subscriber is consuming loses nothing and
//! applies nothing twice, on a broker node of the test's own.

mod support;

use std::time::Duration;

use anyhow::Result;
use support::{Mode, Recorder, Setup};

#[tokio::test]
async fn broker_restart_mid_stream_loses_nothing_and_applies_nothing_twice() -> Result<()> {
    let node = shop_tests::PrivateBroker::start().await?;
    let setup = Setup::on_broker(shop_tests::TestBroker::on(&node.url)).await?;
    let recorder = Recorder::new(Mode::Apply);
    setup.subscriber(&recorder).declare().await?;
    let total = 10_000;
    let order_ids: Vec<String> = (0..total).map(|n| format!("order-{n}")).collect();
    setup.publish_many(&order_ids).await?;
    let running = setup.start(&recorder).await?;

    let count = || async {
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM applied")
            .fetch_one(&setup.db.pool)
            .await?;
        anyhow::Ok(applied)
    };
    shop_tests::eventually(Duration::from_secs(30), "the first messages", || async {
        Ok((count().await? > 0).then_some(()))
    })
    .await?;
    node.stop_app().await?;
    let applied = count().await;
    node.start_app().await?;
    assert!(
        applied? < total,
        "everything was applied before the broker stopped; the test proves nothing"
    );

    let all = shop_tests::eventually(Duration::from_secs(120), "every message", || async {
        Ok((count().await? >= total).then_some(()))
    })
    .await;
    if let Err(error) = all {
        let conn = setup.broker.connect().await?;
        let dead = shop_subscriber::dlq::list(&conn, &setup.queue).await?;
        anyhow::bail!(
            "{error}: {} applied, {} dead-lettered {:?}",
            count().await?,
            dead.len(),
            dead.first()
        );
    }
    running.stop().await?;
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT message_id) FROM applied")
            .fetch_one(&setup.db.pool)
            .await?;
    assert_eq!((rows, distinct), (total, total));
    Ok(())
}
