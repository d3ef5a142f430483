//! Connecting a service to its database and migrating it.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;

/// Connects to the service's database and applies its migrations.
pub async fn connect_and_migrate(url: &str, migrator: &Migrator) -> anyhow::Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .context("failed to connect to PostgreSQL")?;
    migrator
        .run(&pool)
        .await
        .context("failed to migrate the database")?;
    Ok(pool)
}
