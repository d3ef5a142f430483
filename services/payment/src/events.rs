//! InventoryReserved → charge the order → PaymentSucceeded or PaymentFailed;
//! OrderCancelled → refund a charge already made → PaymentRefunded.
//!
//! InventoryReserved carries the customer and the amount, so payment needs
//! nothing from other services. The `payments.order_id` key makes the charge
//! happen at most once per order even if the event arrives under two message
//! ids.

use std::sync::Arc;

use shop_outbox::Aggregate;
use shop_proto::events::v1::{
    InventoryReserved, OrderCancelled, PaymentFailed, PaymentRefunded, PaymentSucceeded,
};
use shop_proto::types::v1::Money;
use shop_subscriber::{
    EventHandler, HandlerError, HandlerTx, Metadata, Subscriber, SubscriberSettings,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::provider::{Charge, PaymentProvider};

/// The payment service's subscriber on queue `payment.events`.
pub fn subscriber(
    settings: SubscriberSettings,
    pool: PgPool,
    provider: Arc<dyn PaymentProvider>,
) -> Subscriber {
    let charger = Charger { provider };
    Subscriber::builder(crate::CONSUMER, "payment.events", settings)
        .on::<InventoryReserved, _>(charger.clone())
        .on::<OrderCancelled, _>(charger)
        .build(pool)
}

/// Charges reserved orders, and refunds the charge of an order cancelled
/// meanwhile. Both events of an order carry the order id as their aggregate
/// id, so they are applied one at a time, in either order: a cancellation
/// seen first is remembered and the order is never charged; one seen after
/// the charge refunds it.
#[derive(Debug, Clone)]
pub struct Charger {
    provider: Arc<dyn PaymentProvider>,
}

impl EventHandler<InventoryReserved> for Charger {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: InventoryReserved,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        let order_id = Uuid::parse_str(&event.order_id)
            .map_err(|_| HandlerError::permanent("order_id is not a UUID"))?;
        let customer_id = Uuid::parse_str(&event.customer_id)
            .map_err(|_| HandlerError::permanent("customer_id is not a UUID"))?;
        let total = event
            .total
            .ok_or_else(|| HandlerError::permanent("InventoryReserved has no total"))?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM payments WHERE order_id = $1)")
                .bind(order_id)
                .fetch_one(&mut **tx)
                .await?;
        if exists {
            tracing::info!(%order_id, "order already charged");
            return Ok(());
        }
        let cancelled: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM cancelled_orders WHERE order_id = $1)",
        )
        .bind(order_id)
        .fetch_one(&mut **tx)
        .await?;
        if cancelled {
            tracing::info!(%order_id, "order cancelled before its charge; not charged");
            return Ok(());
        }
        let payment_id = Uuid::now_v7();
        let outcome = self
            .provider
            .charge(order_id, total.amount_minor, &total.currency);
        let (status, reason) = match &outcome {
            Charge::Approved => ("SUCCEEDED", String::new()),
            Charge::Declined(reason) => ("FAILED", reason.clone()),
        };
        sqlx::query(
            "INSERT INTO payments (id, order_id, customer_id, amount_minor, currency, status, failure_reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(payment_id)
        .bind(order_id)
        .bind(customer_id)
        .bind(total.amount_minor)
        .bind(&total.currency)
        .bind(status)
        .bind(&reason)
        .execute(&mut **tx)
        .await?;
        let key = order_id.to_string();
        let aggregate = Aggregate::new("payment", &key);
        match outcome {
            Charge::Approved => {
                let event = PaymentSucceeded {
                    payment_id: payment_id.to_string(),
                    order_id: event.order_id,
                    customer_id: event.customer_id,
                    amount: Some(total),
                };
                shop_outbox::enqueue(tx, aggregate, &event, &meta.event_context()).await?;
                tracing::info!(%order_id, "payment succeeded");
            }
            Charge::Declined(reason) => {
                tracing::info!(%order_id, %reason, "payment declined");
                let event = PaymentFailed {
                    payment_id: payment_id.to_string(),
                    order_id: event.order_id,
                    customer_id: event.customer_id,
                    amount: Some(total),
                    reason,
                };
                shop_outbox::enqueue(tx, aggregate, &event, &meta.event_context()).await?;
            }
        }
        Ok(())
    }
}

impl EventHandler<OrderCancelled> for Charger {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: OrderCancelled,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        let order_id = Uuid::parse_str(&event.order_id)
            .map_err(|_| HandlerError::permanent("order_id is not a UUID"))?;
        sqlx::query("INSERT INTO cancelled_orders (order_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(order_id)
            .execute(&mut **tx)
            .await?;
        let charged: Option<(Uuid, Uuid, i64, String)> = sqlx::query_as(
            "SELECT id, customer_id, amount_minor, currency FROM payments \
             WHERE order_id = $1 AND status = 'SUCCEEDED' FOR UPDATE",
        )
        .bind(order_id)
        .fetch_optional(&mut **tx)
        .await?;
        let Some((payment_id, customer_id, amount_minor, currency)) = charged else {
            return Ok(());
        };
        // The provider is told first: if the commit then fails, the event
        // comes back and the refund is asked for again, which refunds
        // nothing more.
        self.provider
            .refund(order_id, amount_minor, &currency)
            .map_err(HandlerError::Transient)?;
        sqlx::query("UPDATE payments SET status = 'REFUNDED', refunded_at = now() WHERE id = $1")
            .bind(payment_id)
            .execute(&mut **tx)
            .await?;
        let key = order_id.to_string();
        let refunded = PaymentRefunded {
            payment_id: payment_id.to_string(),
            order_id: event.order_id,
            customer_id: customer_id.to_string(),
            amount: Some(Money {
                amount_minor,
                currency,
            }),
            reason: "the order was cancelled after it was paid".into(),
        };
        shop_outbox::enqueue(
            tx,
            Aggregate::new("payment", &key),
            &refunded,
            &meta.event_context(),
        )
        .await?;
        tracing::info!(%order_id, "payment refunded");
        Ok(())
    }
}
