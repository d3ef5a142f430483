//! How inventory takes part in the checkout saga:
//! OrderPlaced → reserve every line or none (InventoryReserved or
//! InventoryReservationFailed); OrderCancelled → release what is reserved,
//! or put back what was committed (InventoryReleased); OrderConfirmed →
//! commit (InventoryCommitted).
//!
//! Products are locked in id order before their stock is checked, so
//! concurrent orders for the last units cannot both reserve them, and
//! concurrent reservations never deadlock.

use std::collections::BTreeMap;

use shop_outbox::Aggregate;
use shop_proto::events::v1::{
    InventoryCommitted, InventoryReleased, InventoryReservationFailed, InventoryReserved,
    OrderCancelled, OrderConfirmed, OrderPlaced, ReservedItem, ShortItem,
};
use shop_subscriber::{
    EventHandler, HandlerError, HandlerTx, Metadata, Subscriber, SubscriberSettings,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::db;
use crate::domain::{self, Availability};

/// The inventory's subscriber on queue `inventory.events`.
pub fn subscriber(settings: SubscriberSettings, pool: PgPool) -> Subscriber {
    Subscriber::builder(crate::CONSUMER, "inventory.events", settings)
        .on::<OrderPlaced, _>(Reservations)
        .on::<OrderCancelled, _>(Reservations)
        .on::<OrderConfirmed, _>(Reservations)
        .build(pool)
}

/// Reserves, releases and commits stock for orders.
#[derive(Debug, Clone, Copy)]
pub struct Reservations;

fn order_id(value: &str) -> Result<Uuid, HandlerError> {
    Uuid::parse_str(value)
        .map_err(|_| HandlerError::permanent(format!("order_id {value:?} is not a UUID")))
}

fn items(held: &[(Uuid, i32)]) -> Vec<ReservedItem> {
    held.iter()
        .map(|(product, quantity)| ReservedItem {
            product_id: product.to_string(),
            quantity: *quantity,
        })
        .collect()
}

impl EventHandler<OrderPlaced> for Reservations {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: OrderPlaced,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        let order = order_id(&event.order_id)?;
        if db::cancelled_or_reserved(tx, order).await? {
            tracing::info!(order_id = %order, "order already handled or cancelled; nothing to reserve");
            return Ok(());
        }
        let mut lines = Vec::with_capacity(event.lines.len());
        for line in &event.lines {
            let product = Uuid::parse_str(&line.product_id).map_err(|_| {
                HandlerError::permanent(format!("product_id {:?} is not a UUID", line.product_id))
            })?;
            if line.quantity <= 0 {
                return Err(HandlerError::permanent(format!(
                    "quantity {} is not positive",
                    line.quantity
                )));
            }
            lines.push((product, line.quantity));
        }
        let demand = domain::demand(lines);
        let ids: Vec<Uuid> = demand.keys().copied().collect();
        let stock: BTreeMap<Uuid, Availability> = db::lock_products(tx, &ids)
            .await?
            .into_iter()
            .map(|row| {
                (
                    row.id,
                    Availability {
                        on_hand: row.on_hand,
                        reserved: row.reserved,
                    },
                )
            })
            .collect();
        let shortages = domain::shortages(&demand, &stock);
        let key = order.to_string();
        let aggregate = Aggregate::new("reservation", &key);
        if shortages.is_empty() {
            let held: Vec<(Uuid, i32)> = demand.into_iter().collect();
            db::reserve(tx, order, &held).await?;
            let reserved = InventoryReserved {
                order_id: event.order_id.clone(),
                customer_id: event.customer_id.clone(),
                items: items(&held),
                total: event.total.clone(),
            };
            shop_outbox::enqueue(tx, aggregate, &reserved, &meta.event_context()).await?;
            tracing::info!(order_id = %order, "stock reserved");
        } else {
            let failed = InventoryReservationFailed {
                order_id: event.order_id.clone(),
                customer_id: event.customer_id.clone(),
                short_items: shortages
                    .iter()
                    .map(|(product, requested, available)| ShortItem {
                        product_id: product.to_string(),
                        requested: *requested,
                        available: *available,
                    })
                    .collect(),
            };
            shop_outbox::enqueue(tx, aggregate, &failed, &meta.event_context()).await?;
            tracing::info!(order_id = %order, short = shortages.len(), "stock short; nothing reserved");
        }
        Ok(())
    }
}

impl EventHandler<OrderCancelled> for Reservations {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: OrderCancelled,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        let order = order_id(&event.order_id)?;
        db::mark_cancelled(tx, order).await?;
        let mut held = db::close_reservation(tx, order, "released").await?;
        // An order cancelled after its confirmation gives its stock back.
        held.extend(db::restock_committed(tx, order).await?);
        if !held.is_empty() {
            let key = order.to_string();
            let released = InventoryReleased {
                order_id: event.order_id,
                items: items(&held),
            };
            shop_outbox::enqueue(
                tx,
                Aggregate::new("reservation", &key),
                &released,
                &meta.event_context(),
            )
            .await?;
            tracing::info!(order_id = %order, "reservation released");
        }
        Ok(())
    }
}

impl EventHandler<OrderConfirmed> for Reservations {
    async fn handle(
        &self,
        tx: &mut HandlerTx,
        event: OrderConfirmed,
        meta: &Metadata,
    ) -> Result<(), HandlerError> {
        let order = order_id(&event.order_id)?;
        let held = db::close_reservation(tx, order, "committed").await?;
        if !held.is_empty() {
            let key = order.to_string();
            let committed = InventoryCommitted {
                order_id: event.order_id,
                items: items(&held),
            };
            shop_outbox::enqueue(
                tx,
                Aggregate::new("reservation", &key),
                &committed,
                &meta.event_context(),
            )
            .await?;
            tracing::info!(order_id = %order, "reservation committed");
        }
        Ok(())
    }
}
