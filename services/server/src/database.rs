//! Connecting a service to its database and migrating it.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;

/// The size of a service's connection pool.
///
/// API calls and every subscriber lane draw from one pool. A lane holds a
/// connection only while it applies a batch, and batching makes each
/// connection carry many messages. Size it for the API's concurrent calls
/// plus one per lane (the order service's WatchOrder listener holds one
/// more for good); PostgreSQL's own limit (100 connections by default) is
/// shared by every service and relay on the server.
#[derive(Debug, Clone, clap::Args)]
pub struct PoolSettings {
    /// Most connections the service opens to its database.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub db_max_connections: u32,
    /// Longest wait for a free connection before a call fails.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub db_acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            db_max_connections: 10,
            db_acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// Connects to the service's database and applies its migrations.
pub async fn connect_and_migrate(
    url: &str,
    pool: &PoolSettings,
    migrator: &Migrator,
) -> anyhow::Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(pool.db_max_connections)
        .acquire_timeout(pool.db_acquire_timeout)
        .connect(url)
        .await
        .context("failed to connect to PostgreSQL")?;
    migrator
        .run(&pool)
        .await
        .context("failed to migrate the database")?;
    Ok(pool)
}
