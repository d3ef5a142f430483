//! The inventory service: owns the product catalog and the stock.
//!
//! - [`grpc`]: the `InventoryService` API (catalog and stock commands and
//!   queries);
//! - [`events`]: reactions to the order saga (reserve on OrderPlaced, release
//!   on OrderCancelled, commit on OrderConfirmed);
//! - [`db`]: the SQL; [`domain`]: the checks on input.

pub mod db;
pub mod domain;
pub mod events;
pub mod grpc;

use std::net::SocketAddr;

use clap::Parser;
use shop_proto::inventory::v1::inventory_service_server::{InventoryServiceServer, SERVICE_NAME};
use shop_subscriber::SubscriberSettings;

/// Name of this service's consumer (inbox key) and the prefix of its queues.
pub const CONSUMER: &str = "inventory";

/// The events this service publishes, with their aggregates.
pub fn publishes() -> Vec<shop_outbox::Publication> {
    use shop_outbox::Publication;
    use shop_proto::events::v1::{
        InventoryCommitted, InventoryReleased, InventoryReservationFailed, InventoryReserved,
        ProductCreated, ProductPriceChanged,
    };
    vec![
        Publication::of::<ProductCreated>("product"),
        Publication::of::<ProductPriceChanged>("product"),
        Publication::of::<InventoryReserved>("reservation"),
        Publication::of::<InventoryReservationFailed>("reservation"),
        Publication::of::<InventoryReleased>("reservation"),
        Publication::of::<InventoryCommitted>("reservation"),
    ]
}

/// Migrations of this service's database: outbox, inbox, then its own.
pub fn migrator() -> sqlx::migrate::Migrator {
    static OWN: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/inventory");
    shop_outbox::migrator([
        &shop_outbox::MIGRATOR,
        &shop_subscriber::inbox::MIGRATOR,
        &OWN,
    ])
}

/// Configuration of the inventory service.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "inventory-service",
    version,
    about = "Owns the product catalog and stock."
)]
pub struct Settings {
    /// Address the gRPC API listens on.
    #[arg(long, env = "GRPC_ADDR", default_value = "127.0.0.1:50052")]
    pub grpc_addr: SocketAddr,
    /// This service's PostgreSQL database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/inventory",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Address of the Prometheus `/metrics` endpoint; empty turns it off.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9462", value_parser = shop_server::metrics::parse_addr)]
    pub metrics_addr: std::option::Option<SocketAddr>,
    /// Log as JSON lines.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    pub log_json: bool,
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
    let foundation = shop_server::service::prepare(
        settings.grpc_addr,
        &settings.database_url,
        &settings.pool,
        &migrator(),
    )
    .await?;
    let subscriber = events::subscriber(settings.subscriber, foundation.pool.clone());
    let auth = shop_server::auth::Authenticator::from_settings(&settings.auth)?;
    let api = tonic::service::interceptor::InterceptedService::new(
        InventoryServiceServer::new(grpc::Inventory::new(foundation.pool.clone()))
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
        [subscriber],
    )
    .await?
    .with_tls(&settings.tls)?
    .with_drain(&settings.drain, Default::default()))
}
