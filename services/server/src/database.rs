//! Connecting a service to its database and migrating it.

use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

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
    /// Longest a statement may run before PostgreSQL cancels it
    /// (`statement_timeout`): the call fails with DEADLINE_EXCEEDED, or
    /// the message is retried as a failed attempt, and the connection is
    /// free again. Keep it at least `GRPC_CALL_TIMEOUT`. It replaces a
    /// `statement_timeout` set in the URL or for the role. Migrations are
    /// not limited.
    #[arg(long, env = "DATABASE_STATEMENT_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub db_statement_timeout: Duration,
    /// Longest a statement waits for one lock (`lock_timeout`), shorter
    /// than the statement timeout: the call fails with ABORTED, or the
    /// message is tried again in place without spending an attempt (a
    /// lock held long delays messages, it does not dead-letter them).
    #[arg(long, env = "DATABASE_LOCK_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub db_lock_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            db_max_connections: 10,
            db_acquire_timeout: Duration::from_secs(5),
            db_statement_timeout: Duration::from_secs(30),
            db_lock_timeout: Duration::from_secs(10),
        }
    }
}

/// A duration of at least a millisecond (PostgreSQL reads 0 as "no limit").
pub fn positive_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value).map_err(|error| error.to_string())?;
    if duration < Duration::from_millis(1) {
        return Err("must be at least 1ms".into());
    }
    Ok(duration)
}

/// Connects to the service's database and applies its migrations.
pub async fn connect_and_migrate(
    url: &str,
    pool: &PoolSettings,
    migrator: &Migrator,
) -> anyhow::Result<PgPool> {
    anyhow::ensure!(
        pool.db_lock_timeout < pool.db_statement_timeout,
        "--db-lock-timeout must be shorter than --db-statement-timeout, or it never applies"
    );
    let options: PgConnectOptions = url.parse().context("invalid database URL")?;
    // Migrations run on a connection of their own, without a statement or
    // lock timeout (whatever the URL or the role says): building an index
    // on a large table may take longer.
    let unlimited = options
        .clone()
        .options([("statement_timeout", "0"), ("lock_timeout", "0")]);
    let mut conn = PgConnection::connect_with(&unlimited)
        .await
        .context("failed to connect to PostgreSQL")?;
    migrator
        .run(&mut conn)
        .await
        .context("failed to migrate the database")?;
    let _ = conn.close().await;
    let statement = format!("{}ms", pool.db_statement_timeout.as_millis());
    let lock = format!("{}ms", pool.db_lock_timeout.as_millis());
    PgPoolOptions::new()
        .max_connections(pool.db_max_connections)
        .acquire_timeout(pool.db_acquire_timeout)
        .connect_with(options.options([
            ("statement_timeout", statement.as_str()),
            ("lock_timeout", lock.as_str()),
        ]))
        .await
        .context("failed to connect to PostgreSQL")
}

/// `url` with its database replaced by `name`, every parameter kept, for
/// deriving each service's database URL from one server URL.
/// (`PgConnectOptions::to_url_lossy` writes certificate paths such as
/// `sslrootcert` in a form its own parser reads back as another path.)
pub fn url_for_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let (scheme, rest) = base
        .split_once("://")
        .context("a database URL needs a scheme")?;
    let authority = rest
        .split_once('/')
        .map_or(rest, |(authority, _)| authority);
    // A `dbname` parameter would override the path.
    let query = query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty() && !pair.starts_with("dbname="))
        .collect::<Vec<_>>()
        .join("&");
    Ok(if query.is_empty() {
        format!("{scheme}://{authority}/{name}")
    } else {
        format!("{scheme}://{authority}/{name}?{query}")
    })
}

#[cfg(test)]
mod tests {
    use super::{positive_duration, url_for_database};

    #[test]
    fn a_timeout_of_zero_is_refused_rather_than_read_as_no_limit() {
        assert!(positive_duration("0s").is_err());
        assert!(positive_duration("soon").is_err());
        assert_eq!(
            positive_duration("1500ms").unwrap(),
            std::time::Duration::from_millis(1500)
        );
    }

    #[test]
    fn the_database_is_replaced_and_tls_parameters_kept() {
        let url = "postgres://u:p@db:5432/postgres?sslmode=verify-full&sslrootcert=/etc/ca.pem";
        assert_eq!(
            url_for_database(url, "order").unwrap(),
            "postgres://u:p@db:5432/order?sslmode=verify-full&sslrootcert=/etc/ca.pem"
        );
        assert_eq!(
            url_for_database("postgres://db", "user").unwrap(),
            "postgres://db/user"
        );
        let options: sqlx::postgres::PgConnectOptions =
            url_for_database(url, "order").unwrap().parse().unwrap();
        assert_eq!(options.get_database(), Some("order"));
        assert!(url_for_database("db:5432/x", "order").is_err());
        assert_eq!(
            url_for_database("postgres://db/?dbname=postgres&sslmode=require", "order").unwrap(),
            "postgres://db/order?sslmode=require"
        );
    }
}
