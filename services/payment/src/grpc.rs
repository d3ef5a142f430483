//! The read-only `PaymentService` gRPC API.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;
use shop_proto::payment::v1::payment_service_server::PaymentService;
use shop_proto::payment::v1::*;
use shop_proto::types::v1::Money;
use shop_server::auth::Caller;
use shop_server::{ServiceError, validate};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// The gRPC API over the payment database.
#[derive(Debug, Clone)]
pub struct Payments {
    pool: PgPool,
}

impl Payments {
    /// An API over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

type PaymentRow = (Uuid, Uuid, Uuid, i64, String, String, String, DateTime<Utc>);

#[tonic::async_trait]
impl PaymentService for Payments {
    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<GetPaymentResponse>, Status> {
        let caller = Caller::of(&request)?;
        let order_id = validate::uuid("order_id", &request.get_ref().order_id)?;
        let row: Option<PaymentRow> = sqlx::query_as(
            "SELECT id, order_id, customer_id, amount_minor, currency, status, failure_reason, processed_at \
             FROM payments WHERE order_id = $1",
        )
        .bind(order_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(ServiceError::from)?;
        let (
            id,
            order_id,
            customer_id,
            amount_minor,
            currency,
            status,
            failure_reason,
            processed_at,
        ) = row
            // Another customer's payment is answered like a missing one.
            .filter(|row| caller.may_act_for(row.2))
            .ok_or_else(|| ServiceError::NotFound(format!("no payment for order {order_id}")))?;
        let status = match status.as_str() {
            "SUCCEEDED" => PaymentStatus::Succeeded,
            "FAILED" => PaymentStatus::Failed,
            "REFUNDED" => PaymentStatus::Refunded,
            _ => PaymentStatus::Unspecified,
        };
        Ok(Response::new(GetPaymentResponse {
            payment: Some(Payment {
                payment_id: id.to_string(),
                order_id: order_id.to_string(),
                customer_id: customer_id.to_string(),
                amount: Some(Money {
                    amount_minor,
                    currency,
                }),
                status: status as i32,
                failure_reason,
                processed_at: Some(Timestamp {
                    seconds: processed_at.timestamp(),
                    nanos: processed_at.timestamp_subsec_nanos() as i32,
                }),
            }),
        }))
    }
}
