//! The order service: places orders, follows them through the saga, and
//! lets clients watch them.
//!
//! - [`grpc`]: the `OrderService` API;
//! - [`events`]: the local catalog and customer replicas, and the saga's
//!   verdicts (PaymentSucceeded → CONFIRMED; PaymentFailed or
//!   InventoryReservationFailed → CANCELLED);
//! - [`domain`]: request checks and pricing; [`db`]: the SQL;
//! - [`watch`]: fan-out of status changes to `WatchOrder` streams;
//! - [`timeouts`]: cancels orders whose saga did not finish in time.

pub mod db;
pub mod domain;
pub mod events;
pub mod grpc;
pub mod timeouts;
pub mod watch;

use std::net::SocketAddr;

use clap::Parser;
use shop_proto::order::v1::order_service_server::{OrderServiceServer, SERVICE_NAME};
use shop_subscriber::SubscriberSettings;

/// Name of this service's consumer of saga verdicts and replica updates
/// (inbox key).
pub const CONSUMER: &str = "order";
/// Name of this service's consumer of history-only events (inbox key).
pub const HISTORY_CONSUMER: &str = "order-history";

/// The events this service publishes, with their aggregates.
pub fn publishes() -> Vec<shop_outbox::Publication> {
    use shop_outbox::Publication;
    use shop_proto::events::v1::{OrderCancelled, OrderConfirmed, OrderPlaced};
    vec![
        Publication::of::<OrderPlaced>("order"),
        Publication::of::<OrderConfirmed>("order"),
        Publication::of::<OrderCancelled>("order"),
    ]
}

/// Migrations of this service's database: outbox, inbox, then its own.
pub fn migrator() -> sqlx::migrate::Migrator {
    static OWN: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/order");
    shop_outbox::migrator([
        &shop_outbox::MIGRATOR,
        &shop_subscriber::inbox::MIGRATOR,
        &OWN,
    ])
}

/// Configuration of the order service.
#[derive(Debug, Clone, Parser)]
#[command(name = "order-service", version, about = "Places and tracks orders.")]
pub struct Settings {
    /// Address the gRPC API listens on.
    #[arg(long, env = "GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// This service's PostgreSQL database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/order",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Address of the Prometheus `/metrics` endpoint; empty turns it off.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9461", value_parser = shop_server::metrics::parse_addr)]
    pub metrics_addr: std::option::Option<SocketAddr>,
    /// Log as JSON lines.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    pub log_json: bool,
    /// An order still PENDING this long after it was placed is cancelled
    /// (and compensated): no order waits forever with stock reserved.
    /// Between 1 s and 30 days.
    #[arg(long, env = "ORDER_SAGA_TIMEOUT", default_value = "15m", value_parser = humantime::parse_duration)]
    pub saga_timeout: std::time::Duration,
    #[command(flatten)]
    pub pool: shop_server::database::PoolSettings,
    #[command(flatten)]
    pub tls: shop_server::grpc::TlsSettings,
    #[command(flatten)]
    pub drain: shop_server::grpc::DrainSettings,
    #[command(flatten)]
    pub auth: shop_server::auth::AuthSettings,
    #[command(flatten)]
    pub subscriber: SubscriberSettings,
}

/// Binds the gRPC address, connects to and migrates the database, and
/// declares the subscriber's queues: the service, ready to run.
pub async fn build(settings: Settings) -> anyhow::Result<shop_server::Service> {
    shop_outbox::declare(publishes());
    anyhow::ensure!(
        (std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(30 * 86_400))
            .contains(&settings.saga_timeout),
        "--saga-timeout must be between 1s and 30days"
    );
    let foundation = shop_server::service::prepare(
        settings.grpc_addr,
        &settings.database_url,
        &settings.pool,
        &migrator(),
    )
    .await?;
    let subscribers = events::subscribers(settings.subscriber, foundation.pool.clone());
    let pool = foundation.pool.clone();
    // Open WatchOrder streams end when shutdown begins.
    let streams = tokio_util::sync::CancellationToken::new();
    let auth = shop_server::auth::Authenticator::from_settings(&settings.auth)?;
    let api = tonic::service::interceptor::InterceptedService::new(
        OrderServiceServer::new(grpc::Orders::new(
            foundation.pool.clone(),
            watch::StatusChanges::start(foundation.pool.clone(), streams.clone()),
            streams.clone(),
        ))
        .max_decoding_message_size(shop_server::grpc::MAX_REQUEST_BYTES),
        auth.clone(),
    );
    Ok(shop_server::Service::new(
        foundation.listener,
        &foundation.pool,
        tonic::service::Routes::new(api).add_service(shop_server::timeline::server(
            foundation.pool.clone(),
            auth.clone(),
        )),
        SERVICE_NAME,
        subscribers,
    )
    .await?
    .with_tls(&settings.tls)?
    .with_drain(&settings.drain, streams)
    .with_background(move |stop| timeouts::run(pool, settings.saga_timeout, stop)))
}
