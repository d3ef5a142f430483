//! OrderConfirmed / OrderCancelled → a message to the customer →
//! NotificationSent.

use std::sync::Arc;

use shop_outbox::Aggregate;
use shop_proto::events::v1::{NotificationSent, OrderCancelled, OrderConfirmed, PaymentRefunded};
use shop_subscriber::{
    EventHandler, HandlerError, HandlerTx, Metadata, Subscriber, SubscriberSettings,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::channel::NotificationChannel;

/// The notification service's subscriber on queue `notification.events`.
pub fn subscriber(
    settings: SubscriberSettings,
    pool: PgPool,
    channel: Arc<dyn NotificationChannel>,
) -> Subscriber {
    let notifier = Notifier { channel };
    Subscriber::builder(crate::CONSUMER, "notification.events", settings)
        .on::<OrderConfirmed, _>(notifier.clone())
        .on::<OrderCancelled, _>(notifier.clone())
        .on::<PaymentRefunded, _>(notifier)
        .build(pool)
}

/// Sends and records notifications.
#[derive(Debug, Clone)]
pub struct Notifier {
    channel: Arc<dyn NotificationChannel>,
}

impl Notifier {
    async fn notify(
        &self,
        tx: &mut HandlerTx,
        meta: &Metadata,
        order_id: &str,
        customer_id: &str,
        kind: &str,
        body: String,
    ) -> Result<(), HandlerError> {
        let order = Uuid::parse_str(order_id)
            .map_err(|_| HandlerError::permanent("order_id is not a UUID"))?;
        let customer = Uuid::parse_str(customer_id)
            .map_err(|_| HandlerError::permanent("customer_id is not a UUID"))?;
        let id = Uuid::now_v7();
        let inserted = sqlx::query(
            "INSERT INTO notifications (id, order_id, customer_id, kind, channel, body) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id, kind) DO NOTHING",
        )
        .bind(id)
        .bind(order)
        .bind(customer)
        .bind(kind)
        .bind(self.channel.name())
        .bind(&body)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(());
        }
        self.channel
            .send(customer, &body)
            .map_err(HandlerError::Transient)?;
        let event = NotificationSent {
            notification_id: id.to_string(),
            order_id: order_id.to_owned(),
            customer_id: customer_id.to_owned(),
            channel: self.channel.name().to_owned(),
            body,
        };
        let key = id.to_string();
        shop_outbox::enqueue(
            tx,
            Aggregate::new("notification", &key),
            &event,
            &meta.event_context(),
        )
        .await?;
        Ok(())
    }
}

fn amount(money: Option<&shop_proto::types::v1::Money>) -> String {
    money
        .map(|m| shop_server::validate::format_money(m.amount_minor, &m.currency))
        .unwrap_or_default()
}

impl EventHandler<OrderConfirmed> for Notifier {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: OrderConfirmed,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        let body = format!(
            "Your order {} is confirmed. You paid {}.",
            event.order_id,
            amount(event.total.as_ref())
        );
        self.notify(
            tx,
            meta,
            &event.order_id,
            &event.customer_id,
            "confirmed",
            body,
        )
        .await
    }
}

impl EventHandler<OrderCancelled> for Notifier {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: OrderCancelled,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        let body = format!(
            "Your order {} was cancelled: {}.",
            event.order_id, event.detail
        );
        self.notify(
            tx,
            meta,
            &event.order_id,
            &event.customer_id,
            "cancelled",
            body,
        )
        .await
    }
}

impl EventHandler<PaymentRefunded> for Notifier {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: PaymentRefunded,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        let body = format!(
            "Your payment of {} for order {} was refunded: {}.",
            amount(event.amount.as_ref()),
            event.order_id,
            event.reason
        );
        self.notify(
            tx,
            meta,
            &event.order_id,
            &event.customer_id,
            "refunded",
            body,
        )
        .await
    }
}
