//! `shop.timeline.v1.TimelineService`, served by every service: what its
//! consumers handled of one business flow, read from its inbox.

use sqlx::PgPool;
use tonic::{Request, Response, Status};

use shop_proto::timeline::v1::timeline_service_server::{TimelineService, TimelineServiceServer};
use shop_proto::timeline::v1::{GetTimelineRequest, GetTimelineResponse, TimelineEntry};

use crate::auth::{Authenticator, Caller};
use crate::error::ServiceError;

/// Most entries one service returns for a flow.
const MAX_ENTRIES: i64 = 1000;

/// The timeline API of one service's database.
#[derive(Debug, Clone)]
pub struct Timeline {
    pool: PgPool,
}

/// The timeline API behind `auth`, to add to a service's routes.
pub fn server(
    pool: PgPool,
    auth: Authenticator,
) -> tonic::service::interceptor::InterceptedService<TimelineServiceServer<Timeline>, Authenticator>
{
    tonic::service::interceptor::InterceptedService::new(
        TimelineServiceServer::new(Timeline { pool })
            .max_decoding_message_size(crate::grpc::MAX_REQUEST_BYTES),
        auth,
    )
}

fn timestamp(at: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

#[tonic::async_trait]
impl TimelineService for Timeline {
    async fn get_timeline(
        &self,
        request: Request<GetTimelineRequest>,
    ) -> Result<Response<GetTimelineResponse>, Status> {
        Caller::of(&request)?.require_staff()?;
        let correlation_id =
            crate::validate::uuid("correlation_id", &request.get_ref().correlation_id)?;
        type Row = (
            uuid::Uuid,
            String,
            Option<String>,
            Option<chrono::DateTime<chrono::Utc>>,
            String,
            chrono::DateTime<chrono::Utc>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT message_id, event_type, source, occurred_at, consumer, received_at \
             FROM inbox WHERE correlation_id = $1 \
             ORDER BY received_at, message_id LIMIT $2",
        )
        .bind(correlation_id)
        .bind(MAX_ENTRIES)
        .fetch_all(&self.pool)
        .await
        .map_err(ServiceError::from)?;
        let entries = rows
            .into_iter()
            .map(
                |(message_id, event_type, source, occurred_at, consumer, handled_at)| {
                    TimelineEntry {
                        message_id: message_id.to_string(),
                        event_type,
                        source: source.unwrap_or_default(),
                        occurred_at: occurred_at.map(timestamp),
                        consumer,
                        handled_at: Some(timestamp(handled_at)),
                    }
                },
            )
            .collect();
        Ok(Response::new(GetTimelineResponse { entries }))
    }
}
