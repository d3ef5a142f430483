//! The read-only `NotificationService` gRPC API.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;
use shop_proto::notification::v1::notification_service_server::NotificationService;
use shop_proto::notification::v1::*;
use shop_server::auth::Caller;
use shop_server::{ServiceError, validate};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// The gRPC API over the notification database.
#[derive(Debug, Clone)]
pub struct Notifications {
    pool: PgPool,
}

impl Notifications {
    /// An API over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

type Row = (Uuid, Uuid, Uuid, String, String, DateTime<Utc>);

#[tonic::async_trait]
impl NotificationService for Notifications {
    async fn list_notifications(
        &self,
        request: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        let (column, id) = match (request.customer_id.is_empty(), request.order_id.is_empty()) {
            (false, true) => {
                let customer = validate::uuid("customer_id", &request.customer_id)?;
                caller.require_acting_for(customer, "list notifications")?;
                ("customer_id", customer)
            }
            (true, false) => ("order_id", validate::uuid("order_id", &request.order_id)?),
            _ => {
                return Err(ServiceError::invalid(
                    "customer_id",
                    "set exactly one of customer_id and order_id",
                )
                .into());
            }
        };
        let limit = validate::page_size("page_size", request.page_size, 20, 100)?;
        let offset = validate::page_token("page_token", &request.page_token)?;
        let sql = format!(
            "SELECT id, order_id, customer_id, channel, body, sent_at FROM notifications \
             WHERE {column} = $1 AND ($4::uuid IS NULL OR customer_id = $4) \
             ORDER BY sent_at DESC, id DESC OFFSET $2 LIMIT $3"
        );
        // A customer sees only its own notifications, whatever it asks for.
        let only = match caller {
            Caller::Customer(customer) => Some(customer),
            Caller::Anyone | Caller::Staff(_) => None,
        };
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(offset)
            .bind(limit)
            .bind(only)
            .fetch_all(&self.pool)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(ListNotificationsResponse {
            next_page_token: validate::next_page_token(offset, limit, rows.len()),
            notifications: rows
                .into_iter()
                .map(
                    |(id, order_id, customer_id, channel, body, sent_at)| Notification {
                        notification_id: id.to_string(),
                        order_id: order_id.to_string(),
                        customer_id: customer_id.to_string(),
                        channel,
                        body,
                        sent_at: Some(Timestamp {
                            seconds: sent_at.timestamp(),
                            nanos: sent_at.timestamp_subsec_nanos() as i32,
                        }),
                    },
                )
                .collect(),
        }))
    }
}
