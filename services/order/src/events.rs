//! What the order service learns from events: its catalog and customer
//! replicas, the saga's verdicts on orders, and each order's history.

use prost_types::Timestamp;
use shop_outbox::{Aggregate, EventContext};
use shop_proto::events::v1::{
    CancelReason, InventoryCommitted, InventoryReleased, InventoryReservationFailed,
    InventoryReserved, NotificationSent, OrderCancelled, OrderConfirmed, OrderLine, PaymentFailed,
    PaymentRefunded, PaymentSucceeded, ProductCreated, ProductPriceChanged, UserRegistered,
};
use shop_proto::types::v1::Money;
use shop_subscriber::{
    EventHandler, HandlerError, HandlerTx, Metadata, Subscriber, SubscriberSettings,
};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::db::{self, PriceUpdate};
use crate::domain::{CANCELLED, CONFIRMED, PENDING, Price};

/// The order service's subscribers, each on its own queue, so the saga's
/// verdicts never wait behind bookkeeping:
/// - `order.events`: the verdicts that move an order (PaymentSucceeded,
///   PaymentFailed, InventoryReservationFailed) and the catalog and
///   customer replicas;
/// - `order.history`: the steps that only add to an order's history.
pub fn subscribers(settings: SubscriberSettings, pool: PgPool) -> [Subscriber; 2] {
    let verdicts = Subscriber::builder(crate::CONSUMER, "order.events", settings.clone())
        .on::<ProductCreated, _>(Catalog)
        .on::<ProductPriceChanged, _>(Catalog)
        .on::<UserRegistered, _>(Catalog)
        .on::<PaymentSucceeded, _>(Saga)
        .on::<PaymentFailed, _>(Saga)
        .on::<InventoryReservationFailed, _>(Saga)
        // Earlier versions routed the history-only steps here too; those
        // still queued are recorded (once: history rows are keyed by
        // message) and the bindings removed.
        .retire::<InventoryReserved, _>(Saga)
        .retire::<InventoryReleased, _>(Saga)
        .retire::<InventoryCommitted, _>(Saga)
        .retire::<NotificationSent, _>(Saga)
        .build(pool.clone());
    let history = Subscriber::builder(crate::HISTORY_CONSUMER, "order.history", settings)
        .on::<InventoryReserved, _>(Saga)
        .on::<InventoryReleased, _>(Saga)
        .on::<InventoryCommitted, _>(Saga)
        .on::<NotificationSent, _>(Saga)
        .on::<PaymentRefunded, _>(Saga)
        .build(pool);
    [verdicts, history]
}

fn uuid(field: &str, value: &str) -> Result<Uuid, HandlerError> {
    Uuid::parse_str(value)
        .map_err(|_| HandlerError::permanent(format!("{field} {value:?} is not a UUID")))
}

fn price(money: Option<Money>) -> Result<Price, HandlerError> {
    let money = money.ok_or_else(|| HandlerError::permanent("the event has no price"))?;
    Ok(Price {
        price_minor: money.amount_minor,
        currency: money.currency,
    })
}

/// Keeps the local replicas of the catalog and of registered customers.
#[derive(Debug, Clone, Copy)]
pub struct Catalog;

impl EventHandler<ProductCreated> for Catalog {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: ProductCreated,
        _: &Metadata,
    ) -> Result<(), HandlerError> {
        let id = uuid("product_id", &event.product_id)?;
        db::upsert_product(
            tx,
            id,
            &event.sku,
            &event.name,
            &price(event.unit_price)?,
            event.version,
        )
        .await?;
        Ok(())
    }
}

impl EventHandler<ProductPriceChanged> for Catalog {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: ProductPriceChanged,
        _: &Metadata,
    ) -> Result<(), HandlerError> {
        let id = uuid("product_id", &event.product_id)?;
        match db::set_price(tx, id, &price(event.new_price)?, event.version).await? {
            PriceUpdate::Applied => Ok(()),
            PriceUpdate::Stale => {
                tracing::info!(product_id = %id, version = event.version, "price change older than the catalog copy; ignored");
                Ok(())
            }
            // The product's creation has not arrived yet; try again later.
            PriceUpdate::Unknown => Err(HandlerError::transient(format!(
                "product {id} is not in the catalog yet"
            ))),
        }
    }
}

impl EventHandler<UserRegistered> for Catalog {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: UserRegistered,
        _: &Metadata,
    ) -> Result<(), HandlerError> {
        db::add_customer(tx, uuid("user_id", &event.user_id)?).await?;
        Ok(())
    }
}

/// Moves orders through the saga and records each step.
#[derive(Debug, Clone, Copy)]
pub struct Saga;

/// Confirms a pending order: CONFIRMED, history, OrderConfirmed.
/// Returns false if the order was no longer pending.
pub async fn confirm(
    conn: &mut PgConnection,
    order_id: Uuid,
    context: &EventContext,
) -> Result<bool, HandlerError> {
    let order = db::lock_order(conn, order_id)
        .await?
        .ok_or_else(|| HandlerError::transient(format!("order {order_id} is not known")))?;
    if order.status != PENDING {
        tracing::warn!(%order_id, status = %order.status, "payment for an order that is no longer pending");
        return Ok(false);
    }
    db::set_status(conn, order_id, CONFIRMED, "").await?;
    let full = db::load_lines(conn, order_id).await?;
    let event = OrderConfirmed {
        order_id: order_id.to_string(),
        customer_id: order.customer_id.to_string(),
        lines: full
            .iter()
            .map(|(product, quantity, unit)| OrderLine {
                product_id: product.to_string(),
                quantity: *quantity,
                unit_price: Some(Money {
                    amount_minor: *unit,
                    currency: order.currency.clone(),
                }),
            })
            .collect(),
        total: Some(Money {
            amount_minor: order.total_minor,
            currency: order.currency.clone(),
        }),
        confirmed_at: Some(now()),
    };
    let record = emit(conn, order_id, &event, context).await?;
    db::add_history(
        conn,
        order_id,
        record.message_id,
        "shop.events.v1.OrderConfirmed",
        Some(record.occurred_at),
        "order confirmed",
    )
    .await?;
    Ok(true)
}

/// Cancels a pending order: CANCELLED with a reason, history, OrderCancelled
/// (which makes inventory release what it reserved, and payment refund what
/// it charged). Returns false if the order was no longer pending.
pub async fn cancel(
    conn: &mut PgConnection,
    order_id: Uuid,
    reason: CancelReason,
    detail: &str,
    context: &EventContext,
) -> Result<bool, HandlerError> {
    cancel_from(conn, order_id, PENDING, reason, detail, context).await
}

/// Cancels a confirmed order (staff only): as [`cancel`], and inventory
/// puts the committed stock back. Returns false if the order was not
/// confirmed.
pub async fn revoke(
    conn: &mut PgConnection,
    order_id: Uuid,
    detail: &str,
    context: &EventContext,
) -> Result<bool, HandlerError> {
    cancel_from(
        conn,
        order_id,
        CONFIRMED,
        CancelReason::StaffRequest,
        detail,
        context,
    )
    .await
}

async fn cancel_from(
    conn: &mut PgConnection,
    order_id: Uuid,
    from: &str,
    reason: CancelReason,
    detail: &str,
    context: &EventContext,
) -> Result<bool, HandlerError> {
    let order = db::lock_order(conn, order_id)
        .await?
        .ok_or_else(|| HandlerError::transient(format!("order {order_id} is not known")))?;
    if order.status != from {
        return Ok(false);
    }
    db::set_status(conn, order_id, CANCELLED, detail).await?;
    let event = OrderCancelled {
        order_id: order_id.to_string(),
        customer_id: order.customer_id.to_string(),
        reason: reason as i32,
        detail: detail.to_owned(),
        cancelled_at: Some(now()),
    };
    let record = emit(conn, order_id, &event, context).await?;
    db::add_history(
        conn,
        order_id,
        record.message_id,
        "shop.events.v1.OrderCancelled",
        Some(record.occurred_at),
        &format!("order cancelled: {detail}"),
    )
    .await?;
    Ok(true)
}

async fn emit<E: prost::Message + prost::Name>(
    conn: &mut PgConnection,
    order_id: Uuid,
    event: &E,
    context: &EventContext,
) -> Result<shop_outbox::OutboxRecord, HandlerError> {
    let key = order_id.to_string();
    Ok(shop_outbox::enqueue_on(conn, Aggregate::new("order", &key), event, context).await?)
}

/// Now as a protobuf timestamp.
pub fn now() -> Timestamp {
    let now = chrono::Utc::now();
    Timestamp {
        seconds: now.timestamp(),
        nanos: now.timestamp_subsec_nanos() as i32,
    }
}

async fn history(
    tx: &mut HandlerTx,
    order_id: &str,
    meta: &Metadata,
    detail: &str,
) -> Result<Uuid, HandlerError> {
    let order_id = uuid("order_id", order_id)?;
    // The history row's foreign key is the check that the order exists: no
    // look-up first, and no lock that a status change would wait for (the
    // key check only keeps the order from being deleted).
    let added = db::add_history(
        tx,
        order_id,
        meta.message_id,
        &meta.event_type,
        meta.occurred_at,
        detail,
    )
    .await;
    match added {
        Ok(()) => Ok(order_id),
        Err(error)
            if error
                .as_database_error()
                .is_some_and(|error| error.is_foreign_key_violation()) =>
        {
            Err(HandlerError::transient(format!(
                "order {order_id} is not known"
            )))
        }
        Err(error) => Err(error.into()),
    }
}

impl EventHandler<PaymentSucceeded> for Saga {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: PaymentSucceeded,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        let order_id = history(tx, &event.order_id, meta, "payment succeeded").await?;
        confirm(tx, order_id, &meta.event_context()).await?;
        Ok(())
    }
}

impl EventHandler<PaymentFailed> for Saga {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: PaymentFailed,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        let detail = format!("payment declined: {}", event.reason);
        let order_id = history(tx, &event.order_id, meta, &detail).await?;
        cancel(
            tx,
            order_id,
            CancelReason::PaymentDeclined,
            &detail,
            &meta.event_context(),
        )
        .await?;
        Ok(())
    }
}

impl EventHandler<InventoryReservationFailed> for Saga {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: InventoryReservationFailed,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        let short: Vec<String> = event
            .short_items
            .iter()
            .map(|item| {
                format!(
                    "product {} (requested {}, available {})",
                    item.product_id, item.requested, item.available
                )
            })
            .collect();
        let detail = format!("out of stock: {}", short.join("; "));
        let order_id = history(tx, &event.order_id, meta, &detail).await?;
        cancel(
            tx,
            order_id,
            CancelReason::OutOfStock,
            &detail,
            &meta.event_context(),
        )
        .await?;
        Ok(())
    }
}

impl EventHandler<InventoryReserved> for Saga {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: InventoryReserved,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        history(tx, &event.order_id, meta, "stock reserved")
            .await
            .map(drop)
    }
}

impl EventHandler<InventoryReleased> for Saga {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: InventoryReleased,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        history(tx, &event.order_id, meta, "stock released")
            .await
            .map(drop)
    }
}

impl EventHandler<InventoryCommitted> for Saga {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: InventoryCommitted,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        history(tx, &event.order_id, meta, "stock committed")
            .await
            .map(drop)
    }
}

impl EventHandler<NotificationSent> for Saga {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: NotificationSent,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        let detail = format!("customer notified by {}", event.channel);
        history(tx, &event.order_id, meta, &detail).await.map(drop)
    }
}

impl EventHandler<PaymentRefunded> for Saga {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: PaymentRefunded,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        history(tx, &event.order_id, meta, "payment refunded")
            .await
            .map(drop)
    }
}
