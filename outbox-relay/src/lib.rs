//! The outbox relay: a sidecar that forwards a service's committed outbox
//! rows to a RabbitMQ topic exchange.
//!
//! - [`relay`] runs the publishing loop and owns start-up and shutdown;
//! - [`lease`] shares the outbox between instances by partition;
//! - [`publisher`] publishes with confirms, in order per aggregate;
//! - [`store`] holds the SQL; [`sweeper`] deletes old published rows;
//! - [`health`] decides what the health service reports;
//! - [`config`] is the command line; [`metrics`] names what is measured.

pub mod config;
pub mod health;
pub mod lease;
pub mod metrics;
pub mod publisher;
pub mod relay;
pub mod store;
pub mod sweeper;

pub use config::{Cli, Command, QuarantineAction, RelaySettings};
pub use relay::Relay;
