//! InventoryReserved → charge the order → PaymentSucceeded or PaymentFailed.
//!
//! InventoryReserved carries the customer and the amount, so payment needs
//! nothing from other services. The `payments.order_id` key makes the charge
//! happen at most once per order even if the event arrives under two message
//! ids.

use std::sync::Arc;

use shop_outbox::Aggregate;
use shop_proto::events::v1::{InventoryReserved, PaymentFailed, PaymentSucceeded};
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
    Subscriber::builder(crate::CONSUMER, "payment.events", settings)
        .on::<InventoryReserved, _>(Charger { provider })
        .build(pool)
}

/// Charges reserved orders.
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
