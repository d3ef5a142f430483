//! What every checkout service shares, so each service holds only its own
//! rules: gRPC serving with health and reflection ([`grpc`]), the one mapping
//! from service errors to gRPC status ([`error`]), input validation
//! ([`validate`]), who may call what ([`auth`]), database set-up
//! ([`database`]), Prometheus metrics
//! ([`metrics`]), logging and trace context ([`telemetry`])
//! and shutdown on signals ([`shutdown`]).

pub mod auth;
pub mod database;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod timeline;
pub mod validate;

pub use error::ServiceError;
pub use service::Service;
