//! A message waiting in a retry queue survives the loss of the node that
//! leads that queue, on a three-node cluster of the test's own: it comes
//! back to the work queue when its delay runs out and is applied once.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use support::{Mode, Recorder, Setup};
use uuid::Uuid;

#[tokio::test]
async fn a_message_waiting_for_its_retry_survives_the_loss_of_the_retry_queue_leader() -> Result<()>
{
    let mut cluster = shop_tests::PrivateCluster::start(3).await?;
    let mut setup = Setup::on_broker(shop_tests::TestBroker::on(&cluster.urls())).await?;
    // Long enough to kill the node while the message waits.
    setup.settings.retry_backoff = Duration::from_secs(4);
    setup.settings.max_retry_backoff = Duration::from_secs(4);
    let recorder = Recorder::new(Mode::NeedsKnownOrder);
    let running = setup.start(&recorder).await?;
    setup.publish(Uuid::now_v7(), "order-waits").await?;

    // The first attempt fails, and the message goes to the first retry
    // queue (confirmed before the delivery is acknowledged).
    shop_tests::eventually(Duration::from_secs(30), "the first attempt", || async {
        Ok((recorder.calls.load(Ordering::SeqCst) >= 1).then_some(()))
    })
    .await?;
    let retry_queue = format!("{}.retry.quorum.1", setup.queue);
    shop_tests::eventually(
        Duration::from_secs(30),
        "the message in the retry queue",
        || async {
            let conn = setup.broker.connect().await?;
            let channel = conn.create_channel().await?;
            let queue = channel
                .queue_declare(
                    retry_queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await?;
            let _ = conn.close(200, "OK".into()).await;
            Ok((queue.message_count() == 1).then_some(()))
        },
    )
    .await?;
    let waiting =
        shop_tests::eventually(Duration::from_secs(30), "the message to wait", || async {
            let leaders = cluster.leaders(&retry_queue).await?;
            Ok(leaders.into_iter().find_map(|(_, leader)| leader))
        })
        .await?;
    cluster.kill(waiting).await;

    // Meanwhile what it needed arrives; the message comes back from the
    // retry queue, now led by another node, and is applied once.
    sqlx::query("INSERT INTO known_orders VALUES ('order-waits')")
        .execute(&setup.db.pool)
        .await?;
    let rows = setup.wait_applied("order-waits").await?;
    assert_eq!(rows.len(), 1, "applied once: {rows:?}");
    assert_eq!(rows[0].0, 2, "on its second attempt");
    cluster.restart(waiting).await?;
    running.stop().await?;
    Ok(())
}
