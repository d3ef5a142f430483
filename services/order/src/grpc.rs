//! The `OrderService` gRPC API.

use std::pin::Pin;
use std::time::Duration;

use chrono::DurationRound;
use prost_types::Timestamp;
use shop_outbox::{Aggregate, EventContext};
use shop_proto::events::v1 as events;
use shop_proto::order::v1::order_service_server::OrderService;
use shop_proto::order::v1::*;
use shop_proto::types::v1::Money;
use shop_server::{ServiceError, validate};
use shop_subscriber::HandlerError;
use sqlx::PgPool;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use shop_server::auth::Caller;
use tokio_util::sync::CancellationToken;

use crate::db::{self, FullOrder, OrderRow};
use crate::domain::{self, CANCELLED, CONFIRMED, NewOrder, PENDING};
use crate::watch::StatusChanges;

/// The gRPC API over the order database.
#[derive(Debug, Clone)]
pub struct Orders {
    pool: PgPool,
    changes: StatusChanges,
    stopping: CancellationToken,
}

impl Orders {
    /// An API over `pool`, streaming status changes from `changes`.
    /// `WatchOrder` streams end with UNAVAILABLE when `stopping` is
    /// cancelled, so their clients watch again on another replica.
    pub fn new(pool: PgPool, changes: StatusChanges, stopping: CancellationToken) -> Self {
        Self {
            pool,
            changes,
            stopping,
        }
    }

    async fn get(&self, id: Uuid) -> Result<FullOrder, ServiceError> {
        db::load(&self.pool, id).await?.ok_or_else(|| not_found(id))
    }

    /// The order, if `caller` may see it; another customer's order is
    /// looked up and answered exactly like one that does not exist.
    async fn get_for(&self, id: Uuid, caller: &Caller) -> Result<FullOrder, ServiceError> {
        db::load_of(&self.pool, id, caller.customer())
            .await?
            .ok_or_else(|| not_found(id))
    }
}

fn not_found(id: Uuid) -> ServiceError {
    ServiceError::NotFound(format!("order {id} does not exist"))
}

fn timestamp(at: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

fn status_of(status: &str) -> OrderStatus {
    match status {
        PENDING => OrderStatus::Pending,
        CONFIRMED => OrderStatus::Confirmed,
        CANCELLED => OrderStatus::Cancelled,
        _ => OrderStatus::Unspecified,
    }
}

/// The API view of an order.
pub fn order_message(full: &FullOrder) -> Order {
    let order = &full.order;
    let money = |amount_minor| {
        Some(Money {
            amount_minor,
            currency: order.currency.clone(),
        })
    };
    Order {
        order_id: order.id.to_string(),
        customer_id: order.customer_id.to_string(),
        lines: full
            .lines
            .iter()
            .map(|(product, quantity, unit)| OrderLine {
                product_id: product.to_string(),
                quantity: *quantity,
                unit_price: money(*unit),
            })
            .collect(),
        total: money(order.total_minor),
        status: status_of(&order.status) as i32,
        cancel_reason: order.cancel_reason.clone(),
        placed_at: Some(timestamp(order.placed_at)),
        updated_at: Some(timestamp(order.updated_at)),
        history: full
            .history
            .iter()
            .map(|(event_type, at, detail)| OrderHistoryEntry {
                event_type: event_type.clone(),
                occurred_at: Some(timestamp(*at)),
                detail: detail.clone(),
            })
            .collect(),
    }
}

fn handler_error(error: HandlerError) -> ServiceError {
    let (HandlerError::Transient(error) | HandlerError::Permanent(error)) = error;
    let database = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<sqlx::Error>());
    let Some(cause) = database else {
        return ServiceError::Internal(error);
    };
    if shop_server::error::is_unavailable(cause) {
        return ServiceError::Unavailable(error);
    }
    use shop_server::error::{DEADLOCK_DETECTED, LOCK_NOT_AVAILABLE, QUERY_CANCELED};
    match cause
        .as_database_error()
        .and_then(|db| db.code())
        .as_deref()
    {
        Some(QUERY_CANCELED) => ServiceError::DeadlineExceeded(error),
        Some(LOCK_NOT_AVAILABLE | DEADLOCK_DETECTED) => ServiceError::Aborted(error),
        _ => ServiceError::Internal(error),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchOrderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl OrderService for Orders {
    #[tracing::instrument(skip_all, fields(customer_id = %request.get_ref().customer_id))]
    async fn place_order(
        &self,
        request: Request<PlaceOrderRequest>,
    ) -> Result<Response<PlaceOrderResponse>, Status> {
        let caller = Caller::of(&request)?;
        let new = NewOrder::parse(request.get_ref())?;
        caller.require_acting_for(new.customer_id, "place orders")?;
        let fingerprint = new.fingerprint();
        let mut tx = self.pool.begin().await.map_err(ServiceError::from)?;

        let products: Vec<Uuid> = new.lines.iter().map(|l| l.0).collect();
        let (customer_known, catalog) =
            db::customer_and_prices(&mut tx, new.customer_id, &products)
                .await
                .map_err(ServiceError::from)?;
        if !customer_known {
            return Err(ServiceError::NotFound(format!(
                "customer {} is not registered (a new registration takes a moment to reach the order service)",
                new.customer_id
            ))
            .into());
        }
        let priced = domain::price(&new.lines, &catalog);

        // Microseconds, as PostgreSQL keeps them, so this answer and later
        // reads show the same times.
        let now = chrono::Utc::now()
            .duration_trunc(chrono::TimeDelta::microseconds(1))
            .map_err(|error| ServiceError::Internal(error.into()))?;
        let (lines, total, currency) = match priced {
            Ok(priced) => priced,
            Err(error) => {
                // A retry of an order placed before a product's price or
                // currency changed still gets its first answer.
                drop(tx);
                return match self.existing(&new).await? {
                    Some(existing) => self.replay(existing, &new).await,
                    None => Err(error.into()),
                };
            }
        };
        let order = OrderRow {
            id: Uuid::now_v7(),
            customer_id: new.customer_id,
            status: PENDING.to_owned(),
            cancel_reason: String::new(),
            total_minor: total,
            currency: currency.clone(),
            request_fingerprint: fingerprint.clone(),
            placed_at: now,
            updated_at: now,
        };
        let inserted = db::insert_order(&mut tx, &order, &new.idempotency_key, &lines)
            .await
            .map_err(ServiceError::from)?;
        if !inserted {
            // The key was used before (or by a concurrent retry that
            // committed first): answer with that order.
            drop(tx);
            let existing = self.existing(&new).await?.ok_or_else(|| {
                ServiceError::Internal(anyhow::anyhow!("an idempotency key's order vanished"))
            })?;
            return self.replay(existing, &new).await;
        }
        let event = events::OrderPlaced {
            order_id: order.id.to_string(),
            customer_id: order.customer_id.to_string(),
            lines: lines
                .iter()
                .map(|(product, quantity, unit)| events::OrderLine {
                    product_id: product.to_string(),
                    quantity: *quantity,
                    unit_price: Some(Money {
                        amount_minor: *unit,
                        currency: currency.clone(),
                    }),
                })
                .collect(),
            total: Some(Money {
                amount_minor: total,
                currency: currency.clone(),
            }),
            placed_at: Some(timestamp(now)),
        };
        let key = order.id.to_string();
        let record = shop_outbox::enqueue(
            &mut tx,
            Aggregate::new("order", &key),
            &event,
            &EventContext::new_flow(order.id),
        )
        .await
        .map_err(ServiceError::from)?;
        db::add_history(
            &mut tx,
            order.id,
            record.message_id,
            "shop.events.v1.OrderPlaced",
            Some(record.occurred_at),
            "order placed",
        )
        .await
        .map_err(ServiceError::from)?;
        tx.commit().await.map_err(ServiceError::commit)?;
        tracing::info!(order_id = %order.id, total, "order placed");
        // The order as just written; reading it back would only cost time.
        let full = FullOrder {
            order,
            lines,
            history: vec![(
                "shop.events.v1.OrderPlaced".to_owned(),
                record.occurred_at,
                "order placed".to_owned(),
            )],
        };
        Ok(Response::new(PlaceOrderResponse {
            order: Some(order_message(&full)),
        }))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<GetOrderResponse>, Status> {
        let caller = Caller::of(&request)?;
        let id = validate::uuid("order_id", &request.get_ref().order_id)?;
        let full = self.get_for(id, &caller).await?;
        Ok(Response::new(GetOrderResponse {
            order: Some(order_message(&full)),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        let customer = validate::uuid("customer_id", &request.customer_id)?;
        caller.require_acting_for(customer, "list orders")?;
        let limit = validate::page_size("page_size", request.page_size, 20, 100)?;
        let offset = validate::page_token("page_token", &request.page_token)?;
        let orders = db::list_by_customer(&self.pool, customer, offset, limit)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(ListOrdersResponse {
            next_page_token: validate::next_page_token(offset, limit, orders.len()),
            orders: orders.iter().map(order_message).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(order_id = %request.get_ref().order_id))]
    async fn cancel_order(
        &self,
        request: Request<CancelOrderRequest>,
    ) -> Result<Response<CancelOrderResponse>, Status> {
        let caller = Caller::of(&request)?;
        let id = validate::uuid("order_id", &request.get_ref().order_id)?;
        let mut tx = self.pool.begin().await.map_err(ServiceError::from)?;
        let order = db::lock_order_of(&mut tx, id, caller.customer())
            .await
            .map_err(ServiceError::from)?
            .ok_or_else(|| not_found(id))?;
        let context = EventContext::new_flow(id);
        match (order.status.as_str(), caller.is_staff()) {
            (PENDING, _) => {
                let (reason, detail) = match caller {
                    Caller::Staff(_) => (events::CancelReason::StaffRequest, "cancelled by staff"),
                    _ => (
                        events::CancelReason::CustomerRequest,
                        "cancelled by the customer",
                    ),
                };
                crate::events::cancel(&mut tx, id, reason, detail, &context)
                    .await
                    .map_err(handler_error)?;
            }
            // Staff may take back a confirmed order: the stock goes back
            // and the charge is refunded.
            (CONFIRMED, true) => {
                crate::events::revoke(
                    &mut tx,
                    id,
                    "cancelled by staff after confirmation",
                    &context,
                )
                .await
                .map_err(handler_error)?;
            }
            (status, _) => {
                return Err(ServiceError::FailedPrecondition(format!(
                    "order {id} is {status} and can no longer be cancelled"
                ))
                .into());
            }
        }
        tx.commit().await.map_err(ServiceError::commit)?;
        let full = self.get(id).await?;
        Ok(Response::new(CancelOrderResponse {
            order: Some(order_message(&full)),
        }))
    }

    type WatchOrderStream = WatchStream;

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let caller = Caller::of(&request)?;
        let id = validate::uuid("order_id", &request.get_ref().order_id)?;
        let mut changes = self.changes.subscribe();
        let first = self.get_for(id, &caller).await?;
        let (sender, receiver) = tokio::sync::mpsc::channel(8);
        let pool = self.pool.clone();
        let stopping = self.stopping.clone();
        tokio::spawn(async move {
            let mut last = first.order.status.clone();
            let mut current = first;
            loop {
                let terminal = current.order.status != PENDING;
                let message = WatchOrderResponse {
                    order: Some(order_message(&current)),
                };
                if sender.send(Ok(message)).await.is_err() || terminal {
                    return;
                }
                // Wait for this order's next status change.
                loop {
                    tokio::select! {
                        changed = changes.recv() => match changed {
                            Ok(changed) if changed != id => continue,
                            _ => {}
                        },
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = sender.closed() => return,
                        _ = stopping.cancelled() => {
                            // Not waiting for a client that stopped reading.
                            let _ = sender.try_send(Err(Status::unavailable(
                                "the server is shutting down; watch the order again",
                            )));
                            return;
                        }
                    }
                    match db::load(&pool, id).await {
                        Ok(Some(full)) if full.order.status != last => {
                            last = full.order.status.clone();
                            current = full;
                            break;
                        }
                        Ok(_) => {}
                        Err(error) => {
                            let _ = sender.try_send(Err(ServiceError::from(error).into()));
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}

impl Orders {
    /// The order a customer already placed with this idempotency key.
    async fn existing(&self, new: &NewOrder) -> Result<Option<OrderRow>, ServiceError> {
        let mut conn = self.pool.acquire().await?;
        Ok(db::find_by_key(&mut conn, new.customer_id, &new.idempotency_key).await?)
    }

    /// Answers a retried PlaceOrder: the same order if the request matches
    /// the first one, an error if the key was used for something else.
    async fn replay(
        &self,
        existing: OrderRow,
        new: &NewOrder,
    ) -> Result<Response<PlaceOrderResponse>, Status> {
        let stored = existing.request_fingerprint.as_str();
        if stored != new.fingerprint() && stored != new.legacy_fingerprint() {
            return Err(ServiceError::AlreadyExists(
                "idempotency_key was already used for a different order".into(),
            )
            .into());
        }
        let full = self.get(existing.id).await?;
        Ok(Response::new(PlaceOrderResponse {
            order: Some(order_message(&full)),
        }))
    }
}
