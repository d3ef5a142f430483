//! OrderConfirmed → a purchase in the customer's history; OrderCancelled →
//! out of it again (staff may cancel a confirmed order). Either may arrive
//! first: a cancelled order is remembered, and a late OrderConfirmed for
//! it adds nothing.

use shop_proto::events::v1::{OrderCancelled, OrderConfirmed};
use shop_subscriber::{
    EventHandler, HandlerError, HandlerTx, Metadata, Subscriber, SubscriberSettings,
};
use sqlx::PgPool;
use uuid::Uuid;

/// The user service's subscriber on queue `user.events`.
pub fn subscriber(settings: SubscriberSettings, pool: PgPool) -> Subscriber {
    Subscriber::builder(crate::CONSUMER, "user.events", settings)
        .on::<OrderConfirmed, _>(PurchaseHistory)
        .on::<OrderCancelled, _>(PurchaseHistory)
        .build(pool)
}

/// Records confirmed orders as purchases.
#[derive(Debug, Clone, Copy)]
pub struct PurchaseHistory;

impl EventHandler<OrderConfirmed> for PurchaseHistory {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: OrderConfirmed,
        _: &Metadata,
    ) -> Result<(), HandlerError> {
        let order_id = Uuid::parse_str(&event.order_id)
            .map_err(|_| HandlerError::permanent("order_id is not a UUID"))?;
        let user_id = Uuid::parse_str(&event.customer_id)
            .map_err(|_| HandlerError::permanent("customer_id is not a UUID"))?;
        let total = event.total.unwrap_or_default();
        let items: i32 = event.lines.iter().map(|line| line.quantity).sum();
        let confirmed_at = event
            .confirmed_at
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
            .unwrap_or_else(chrono::Utc::now);
        sqlx::query(
            "INSERT INTO purchases (order_id, user_id, total_minor, currency, item_count, confirmed_at) \
             SELECT $1, $2, $3, $4, $5, $6 \
             WHERE NOT EXISTS (SELECT 1 FROM cancelled_orders WHERE order_id = $1) \
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(order_id)
        .bind(user_id)
        .bind(total.amount_minor)
        .bind(&total.currency)
        .bind(items)
        .bind(confirmed_at)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

impl EventHandler<OrderCancelled> for PurchaseHistory {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: OrderCancelled,
        _: &Metadata,
    ) -> Result<(), HandlerError> {
        let order_id = Uuid::parse_str(&event.order_id)
            .map_err(|_| HandlerError::permanent("order_id is not a UUID"))?;
        sqlx::query("INSERT INTO cancelled_orders (order_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(order_id)
            .execute(&mut **tx)
            .await?;
        sqlx::query("DELETE FROM purchases WHERE order_id = $1")
            .bind(order_id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
