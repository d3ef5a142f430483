//! Subscriber runtime: consume domain events from a service's own durable
//! queue and apply each exactly once.
//!
//! A service builds a [`Subscriber`] with one typed [`EventHandler`] per
//! event type. Each message is applied in one database transaction that
//! first records its id in the inbox ([`inbox`]); the broker's
//! acknowledgement follows the commit. Failures retry through delay queues
//! and end in a dead-letter queue ([`topology`], [`dlq`]).

pub mod dlq;
pub mod handler;
pub mod inbox;
pub mod metrics;
pub mod settings;
pub mod subscriber;
pub mod topology;

pub use handler::{EventHandler, HandlerError, HandlerTx, Metadata};
pub use settings::SubscriberSettings;
pub use subscriber::{Subscriber, SubscriberBuilder, database_unavailable};
pub use topology::{QueueKind, Topology};
