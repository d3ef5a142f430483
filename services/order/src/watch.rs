//! Status changes of orders, for `WatchOrder`.
//!
//! Every status change runs `pg_notify('order_status', <order id>)` in its
//! transaction, so the notification is delivered when, and only if, the
//! change commits, whichever instance made it. One listener per process
//! fans notifications out to the open streams; streams also re-read the
//! order every second in case a notification was lost.

use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use std::sync::Arc;
use tokio::sync::broadcast;

use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

const CHANNEL: &str = "order_status";

/// Announces, inside `conn`'s transaction, that an order's status changed.
pub async fn announce(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify('order_status', $1)")
        .bind(order_id.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// Ids of orders whose status changed, as they are committed. Listening
/// stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct StatusChanges {
    sender: broadcast::Sender<Uuid>,
    _stop: Arc<DropGuard>,
}

impl StatusChanges {
    /// Starts listening on `pool`'s database, until `stopping` is
    /// cancelled or the last clone is dropped.
    pub fn start(pool: PgPool, stopping: CancellationToken) -> Self {
        let shutdown = stopping.child_token();
        let stop = Arc::new(shutdown.clone().drop_guard());
        let (sender, _) = broadcast::channel(1024);
        let forward = sender.clone();
        tokio::spawn(async move {
            while !shutdown.is_cancelled() {
                let result: sqlx::Result<()> = async {
                    let mut listener = PgListener::connect_with(&pool).await?;
                    listener.listen(CHANNEL).await?;
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            notification = listener.recv() => {
                                if let Ok(id) = Uuid::parse_str(notification?.payload()) {
                                    let _ = forward.send(id);
                                }
                            }
                        }
                    }
                }
                .await;
                if let Err(error) = result {
                    tracing::warn!(%error, "order status listener failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        });
        Self {
            sender,
            _stop: stop,
        }
    }

    /// A receiver of every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.sender.subscribe()
    }
}
