//! What a service implements to react to an event, and what it gets.

use std::future::Future;

use shop_outbox::EventContext;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// The transaction a handler runs in. The inbox entry is already in it; the
/// handler adds its own writes (and outbox events), and the runtime commits.
pub type HandlerTx = Transaction<'static, Postgres>;

/// Facts about a delivered message besides its payload.
#[derive(Debug, Clone)]
pub struct Metadata {
    /// Unique event id, the key of the inbox.
    pub message_id: Uuid,
    /// Full protobuf name of the event.
    pub event_type: String,
    /// Kind of aggregate the event belongs to, if the producer said.
    pub aggregate_type: Option<String>,
    /// Id of that aggregate, if the producer said.
    pub aggregate_id: Option<String>,
    /// When the producer wrote the event (the CloudEvents `time`), if it
    /// said.
    pub occurred_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Correlation id of the business flow, if any.
    pub correlation_id: Option<Uuid>,
    /// W3C trace context of the producer's span, if any.
    pub traceparent: Option<String>,
    /// The producer (the CloudEvents `source`, e.g. `order-service`), if
    /// it said.
    pub source: Option<String>,
    /// 1 on the first delivery, 2 on the first retry, and so on.
    pub attempt: u32,
    /// The broker redelivered this message (an earlier consumer did not
    /// acknowledge it).
    pub redelivered: bool,
}

impl Metadata {
    /// Context for events this handler writes: same flow, caused by this
    /// message, same trace (the handler's span is a child of the producer's;
    /// the producer's `traceparent` is the fallback outside a traced span).
    pub fn event_context(&self) -> EventContext {
        EventContext::caused_by(self.message_id, self.correlation_id).with_traceparent(
            shop_outbox::trace::current_traceparent().or_else(|| self.traceparent.clone()),
        )
    }
}

/// Why a handler did not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// May succeed later (a dependency not there yet): the message is
    /// retried with backoff, then dead-lettered. One whose cause is a lock
    /// not had in time (`lock_timeout`, a deadlock) is tried again in place
    /// instead, without spending an attempt.
    #[error("transient: {0:#}")]
    Transient(anyhow::Error),
    /// Will never succeed: the message goes to the dead-letter queue at once.
    #[error("permanent: {0:#}")]
    Permanent(anyhow::Error),
}

impl HandlerError {
    /// A transient failure with a message.
    pub fn transient(message: impl std::fmt::Display) -> Self {
        Self::Transient(anyhow::anyhow!("{message}"))
    }

    /// A permanent failure with a message.
    pub fn permanent(message: impl std::fmt::Display) -> Self {
        Self::Permanent(anyhow::anyhow!("{message}"))
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(error: sqlx::Error) -> Self {
        Self::Transient(error.into())
    }
}

impl From<shop_outbox::OutboxError> for HandlerError {
    fn from(error: shop_outbox::OutboxError) -> Self {
        match error {
            // The same event would be refused again on every attempt.
            shop_outbox::OutboxError::TooLong { .. }
            | shop_outbox::OutboxError::Undeclared { .. } => Self::Permanent(error.into()),
            shop_outbox::OutboxError::Database(_) => Self::Transient(error.into()),
        }
    }
}

/// Reacts to events of type `E`.
///
/// The handler must do all its writes through `tx`: they commit together
/// with the inbox entry, or not at all.
pub trait EventHandler<E>: Send + Sync + 'static {
    /// Applies one event.
    fn handle(
        &self,
        tx: &mut HandlerTx,
        event: E,
        metadata: &Metadata,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}
