//! A message waiting in a retry queue survives the loss of the node that
//! leads that queue, on a three-node cluster of the test's own: it comes
//! back to the work queue when its delay runs out and is applied once.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use support::{Mode, Recorder, Setup};
use uuid::Uuid;

#[tokio::test]
async fn a_message_waiting_for_its_retry_survives_the_loss_of_the_retry_queue_leader() -> Result<()>
{
    let mut cluster = shop_tests::PrivateCluster::start(3).await?;
    let mut setup = Setup::on_broker(shop_tests::TestBroker::on(&cluster.urls())).await?;
    // Long enough to kill the node, and see the message survive, while it
    // waits.
    setup.settings.retry_backoff = Duration::from_secs(15);
    setup.settings.max_retry_backoff = Duration::from_secs(15);
    let recorder = Recorder::new(Mode::NeedsKnownOrder);
    let running = setup.start(&recorder).await?;
    let retry_queue = format!("{}.retry.quorum.1", setup.queue);
    let leader = cluster
        .leaders(&retry_queue)
        .await?
        .into_iter()
        .find(|(name, _)| *name == retry_queue)
        .and_then(|(_, leader)| leader)
        .context("the retry queue's leader")?;

    // The first attempt fails, and the message waits in the first retry
    // queue (confirmed there before the delivery is acknowledged).
    setup.publish(Uuid::now_v7(), "order-waits").await?;
    shop_tests::eventually(Duration::from_secs(30), "the message to wait", || async {
        Ok((setup.messages_in(&retry_queue).await? == Some(1)).then_some(()))
    })
    .await?;
    assert_eq!(recorder.calls.load(Ordering::SeqCst), 1);
    // What it needs arrives; then the node leading its queue goes.
    sqlx::query("INSERT INTO known_orders VALUES ('order-waits')")
        .execute(&setup.db.pool)
        .await?;
    cluster.kill(leader).await;

    // It is still there, on the nodes left, not yet applied; it comes back
    // when its delay runs out and is applied once, on its second attempt.
    // (Until a new leader is elected the queue may not answer.)
    shop_tests::eventually(
        Duration::from_secs(30),
        "the waiting message on the nodes left",
        || async {
            let waiting = setup.messages_in(&retry_queue).await.ok().flatten();
            Ok((waiting == Some(1)).then_some(()))
        },
    )
    .await?;
    assert!(setup.applied("order-waits").await?.is_empty());
    let rows = setup.wait_applied("order-waits").await?;
    assert_eq!(rows.len(), 1, "applied once: {rows:?}");
    assert_eq!(rows[0].0, 2, "on its second attempt");
    cluster.restart(leader).await?;
    running.stop().await?;
    Ok(())
}
