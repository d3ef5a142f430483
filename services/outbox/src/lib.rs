//! Transactional outbox: the write side.
//!
//! A service never publishes to the broker from a request handler. It calls
//! [`enqueue`] with the transaction that holds its domain change, so the event
//! row commits or rolls back together with that change. The `outbox-relay`
//! sidecar later publishes committed rows to RabbitMQ.
//!
//! The table's DDL lives in `migrations/outbox/` and is exposed here as
//! [`MIGRATOR`]; every service database applies it (see [`migrator`]).

pub mod trace;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use sqlx::migrate::{Migration, Migrator};
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

/// Content type of every payload this crate writes.
pub const PROTOBUF_CONTENT_TYPE: &str = "application/x-protobuf";

/// The outbox table's migrations.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/outbox");

/// Builds one migrator from several migration sets (for example the outbox's,
/// the inbox's and a service's own), so a database keeps one history table.
/// Sets must use distinct version numbers.
pub fn migrator<'a>(sets: impl IntoIterator<Item = &'a Migrator>) -> Migrator {
    let migrations: Vec<Migration> = sets
        .into_iter()
        .flat_map(|set| set.iter().cloned())
        .collect();
    Migrator::with_migrations(migrations)
}

/// Errors from writing to the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The insert failed; the caller's transaction should be rolled back.
    #[error("failed to write the event to the outbox")]
    Database(#[from] sqlx::Error),
    /// The event could not be published as given; nothing was written.
    #[error("{field} is {len} bytes; AMQP allows at most {MAX_SHORT_STRING} bytes")]
    TooLong {
        /// Which value: `event_type` or `content_type`.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The process declared what it publishes ([`declare`]), and this is
    /// not among it; nothing was written.
    #[error("{event_type} on {aggregate} aggregates is not among the declared publications")]
    Undeclared {
        /// The event's type.
        event_type: String,
        /// The aggregate kind it was written for.
        aggregate: String,
    },
}

/// The publications declared in this process.
static DECLARED: std::sync::Mutex<Vec<Publication>> = std::sync::Mutex::new(Vec::new());

/// Declares what this process's service publishes (its `publishes()`, from
/// which `asyncapi.yaml` is generated). From then on, writing an event whose
/// type and aggregate kind are not among the publications declared in the
/// process is refused with [`OutboxError::Undeclared`], so no service writes
/// what its contract does not describe. A process running several services
/// declares each one's; one that declares nothing is not checked.
pub fn declare(publications: impl IntoIterator<Item = Publication>) {
    let mut declared = DECLARED.lock().unwrap_or_else(|e| e.into_inner());
    for publication in publications {
        if !declared.contains(&publication) {
            declared.push(publication);
        }
    }
}

/// Refuses an event the process has not declared, if it declared any.
fn check_declared(event_type: &str, aggregate: &str) -> Result<(), OutboxError> {
    let declared = DECLARED.lock().unwrap_or_else(|e| e.into_inner());
    let allowed = declared.is_empty()
        || declared
            .iter()
            .any(|p| p.event_type == event_type && p.aggregate == aggregate);
    if allowed {
        Ok(())
    } else {
        Err(OutboxError::Undeclared {
            event_type: event_type.to_owned(),
            aggregate: aggregate.to_owned(),
        })
    }
}

/// Longest AMQP short string (routing key, `type`, `content-type`), in bytes.
pub const MAX_SHORT_STRING: usize = 255;

/// Where an event came from: the ids that tie it to the request or message
/// that caused it, and the trace it belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventContext {
    /// Shared by every event of one business flow (for example one checkout).
    pub correlation_id: Option<Uuid>,
    /// Message id of the event that caused this one, if any.
    pub causation_id: Option<Uuid>,
    /// W3C `traceparent` the event carries; when `None`, the current
    /// span's (see [`trace`]).
    pub traceparent: Option<String>,
}

impl EventContext {
    /// Context for an event that starts a new flow: its correlation id is new.
    pub fn new_flow(correlation_id: Uuid) -> Self {
        Self {
            correlation_id: Some(correlation_id),
            ..Self::default()
        }
    }

    /// Context for an event caused by a received message: it keeps the
    /// message's correlation id and names the message as its cause.
    pub fn caused_by(message_id: Uuid, correlation_id: Option<Uuid>) -> Self {
        Self {
            correlation_id,
            causation_id: Some(message_id),
            ..Self::default()
        }
    }

    /// Sets the W3C `traceparent` the event carries to its consumers.
    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }
}

/// The aggregate an event belongs to. Events of one aggregate are published
/// in the order they were written.
#[derive(Debug, Clone, Copy)]
pub struct Aggregate<'a> {
    /// Kind of aggregate, for example `order`.
    pub kind: &'a str,
    /// Its id.
    pub id: &'a str,
}

impl<'a> Aggregate<'a> {
    /// Names an aggregate.
    pub fn new(kind: &'a str, id: &'a str) -> Self {
        Self { kind, id }
    }
}

/// An event type a service writes to its outbox, and the kind of aggregate
/// it belongs to (its events are published in order per aggregate id, which
/// consumers see as the CloudEvents `subject`). A service's list of these is
/// its published contract; `asyncapi.yaml` is generated from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// Full protobuf name of the event: routing key and AMQP `type`.
    pub event_type: String,
    /// Kind of aggregate, for example `order`.
    pub aggregate: &'static str,
}

impl Publication {
    /// Events of type `E` on aggregates of kind `aggregate`.
    pub fn of<E: prost::Name>(aggregate: &'static str) -> Self {
        Self {
            event_type: E::full_name(),
            aggregate,
        }
    }
}

/// An event as written to the outbox.
#[derive(Debug, Clone)]
pub struct OutboxRecord {
    /// Unique event id (UUIDv7).
    pub message_id: Uuid,
    /// Full protobuf name of the payload.
    pub event_type: String,
    /// When the event was written.
    pub occurred_at: DateTime<Utc>,
}

/// Writes `event` to the outbox inside `tx`. The event becomes visible to the
/// relay when, and only if, `tx` commits. A failure is the caller's to
/// report (an API call answers it, a subscriber retries it, a batch's lock
/// timeout is routine); here it is only logged at debug, in full.
#[tracing::instrument(skip_all, fields(aggregate = aggregate.kind, aggregate_id = aggregate.id, event_type), err(level = "debug", Debug))]
pub async fn enqueue<E>(
    tx: &mut Transaction<'_, Postgres>,
    aggregate: Aggregate<'_>,
    event: &E,
    context: &EventContext,
) -> Result<OutboxRecord, OutboxError>
where
    E: prost::Message + prost::Name,
{
    let event_type = E::full_name();
    tracing::Span::current().record("event_type", event_type.as_str());
    enqueue_raw(
        tx,
        aggregate,
        &event_type,
        &event.encode_to_vec(),
        PROTOBUF_CONTENT_TYPE,
        context,
    )
    .await
}

/// Like [`enqueue`], for code that holds the transaction as a connection
/// (for example a helper shared by a request handler and an event handler).
/// The caller must be inside a transaction that also holds the domain change.
pub async fn enqueue_on<E>(
    conn: &mut PgConnection,
    aggregate: Aggregate<'_>,
    event: &E,
    context: &EventContext,
) -> Result<OutboxRecord, OutboxError>
where
    E: prost::Message + prost::Name,
{
    insert(
        conn,
        aggregate,
        &E::full_name(),
        &event.encode_to_vec(),
        PROTOBUF_CONTENT_TYPE,
        context,
    )
    .await
}

/// Writes an already encoded payload to the outbox inside `tx`.
pub async fn enqueue_raw(
    tx: &mut Transaction<'_, Postgres>,
    aggregate: Aggregate<'_>,
    event_type: &str,
    payload: &[u8],
    content_type: &str,
    context: &EventContext,
) -> Result<OutboxRecord, OutboxError> {
    insert(tx, aggregate, event_type, payload, content_type, context).await
}

async fn insert(
    conn: &mut PgConnection,
    aggregate: Aggregate<'_>,
    event_type: &str,
    payload: &[u8],
    content_type: &str,
    context: &EventContext,
) -> Result<OutboxRecord, OutboxError> {
    // The relay sends event_type as the routing key and `type` property and
    // content_type as `content-type`: AMQP short strings.
    for (field, value) in [("event_type", event_type), ("content_type", content_type)] {
        if value.len() > MAX_SHORT_STRING {
            return Err(OutboxError::TooLong {
                field,
                len: value.len(),
            });
        }
    }
    check_declared(event_type, aggregate.kind)?;
    let now = Utc::now();
    let record = OutboxRecord {
        message_id: Uuid::now_v7(),
        event_type: event_type.to_owned(),
        // Microseconds, as PostgreSQL keeps them, so the record and the
        // row agree.
        occurred_at: now
            .duration_trunc(TimeDelta::microseconds(1))
            .unwrap_or(now),
    };
    sqlx::query(
        "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload, \
         content_type, occurred_at, correlation_id, causation_id, traceparent) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(record.message_id)
    .bind(aggregate.kind)
    .bind(aggregate.id)
    .bind(event_type)
    .bind(payload)
    .bind(content_type)
    .bind(record.occurred_at)
    .bind(context.correlation_id)
    .bind(context.causation_id)
    .bind(
        context
            .traceparent
            .clone()
            .or_else(trace::current_traceparent),
    )
    .execute(conn)
    .await?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_publications_are_declared_only_those_are_written() {
        // Nothing declared: anything goes (tools, tests, other writers).
        assert!(check_declared("shop.events.v1.Anything", "thing").is_ok());
        declare([Publication {
            event_type: "shop.events.v1.OrderPlaced".into(),
            aggregate: "order",
        }]);
        assert!(check_declared("shop.events.v1.OrderPlaced", "order").is_ok());
        let refused = check_declared("shop.events.v1.OrderShipped", "order").unwrap_err();
        assert!(refused.to_string().contains("OrderShipped"), "{refused}");
        assert!(
            check_declared("shop.events.v1.OrderPlaced", "payment").is_err(),
            "the aggregate kind is part of the contract"
        );
    }
}
