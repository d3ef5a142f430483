//! Test harness: real PostgreSQL and RabbitMQ for every test.
//!
//! When `DATABASE_URL` and `AMQP_URL` are set, tests use those servers;
//! otherwise the first test starts both with testcontainers and the rest of
//! the test binary shares them. Every test gets a fresh database of its own
//! ([`TestDatabase`]) and broker names of its own ([`TestBroker`]), so tests
//! run in parallel, and both are removed when the test ends, pass or fail.
//!
//! Tests that stop or restart the broker get a node of their own
//! ([`PrivateBroker`]), or a cluster of their own ([`PrivateCluster`]); tests that put a server out of reach do it with a
//! [`Proxy`] in front of it.
//!
//! Set `TEST_LOG=1` to see the code under test's tracing output.

mod local_rabbitmq;
pub mod pki;
mod private_broker;
mod private_cluster;
mod private_postgres;
mod proxy;

pub use private_broker::{BrokerTls, PrivateBroker};
pub use private_cluster::PrivateCluster;
pub use private_postgres::PrivatePostgres;
pub use proxy::{Proxy, target_of};

use std::sync::Once;
use std::time::Duration;

use anyhow::{Context, Result};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection as _, PgConnection, PgPool};
use tokio::sync::OnceCell;
use uuid::Uuid;

/// Addresses of the servers the tests run against.
#[derive(Debug, Clone)]
pub struct Servers {
    /// Administrative connection string (any database of the server).
    pub database_url: String,
    /// AMQP URI of the broker.
    pub amqp_url: String,
    containers: Option<&'static Containers>,
}

#[derive(Debug)]
struct Containers {
    rabbitmq: testcontainers_modules::testcontainers::ContainerAsync<
        testcontainers_modules::rabbitmq::RabbitMq,
    >,
    _postgres: testcontainers_modules::testcontainers::ContainerAsync<
        testcontainers_modules::postgres::Postgres,
    >,
}

static SERVERS: OnceCell<Servers> = OnceCell::const_new();
static CONTAINERS: OnceCell<Containers> = OnceCell::const_new();

/// The servers for this test binary, started on first use if the environment
/// names none.
pub async fn servers() -> &'static Servers {
    init_tracing();
    SERVERS
        .get_or_init(|| async {
            match (std::env::var("DATABASE_URL"), std::env::var("AMQP_URL")) {
                (Ok(database_url), Ok(amqp_url)) => Servers {
                    database_url,
                    amqp_url,
                    containers: None,
                },
                _ => start_containers()
                    .await
                    .expect("failed to start test containers"),
            }
        })
        .await
}

/// Image tags of the containers: the relay's lease needs PostgreSQL 14 or
/// later (`idle_session_timeout`), and quorum dead-lettering RabbitMQ 3.10
/// or later; the modules' defaults are older.
pub(crate) const POSTGRES_TAG: &str = "17-alpine";
pub(crate) const RABBITMQ_TAG: &str = "3.13-management";

async fn start_containers() -> Result<Servers> {
    use testcontainers_modules::testcontainers::ImageExt;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    let containers = CONTAINERS
        .get_or_try_init(|| async {
            let postgres = testcontainers_modules::postgres::Postgres::default()
                .with_tag(POSTGRES_TAG)
                .start()
                .await
                .context("failed to start the PostgreSQL container")?;
            let rabbitmq = testcontainers_modules::rabbitmq::RabbitMq::default()
                .with_tag(RABBITMQ_TAG)
                .start()
                .await
                .context("failed to start the RabbitMQ container")?;
            anyhow::Ok(Containers {
                rabbitmq,
                _postgres: postgres,
            })
        })
        .await?;
    let pg_port = containers._postgres.get_host_port_ipv4(5432).await?;
    let pg_host = containers._postgres.get_host().await?;
    let amqp_port = containers.rabbitmq.get_host_port_ipv4(5672).await?;
    let amqp_host = containers.rabbitmq.get_host().await?;
    Ok(Servers {
        database_url: format!("postgres://postgres:postgres@{pg_host}:{pg_port}/postgres"),
        amqp_url: format!("amqp://guest:guest@{amqp_host}:{amqp_port}/%2f"),
        containers: Some(containers),
    })
}

fn init_tracing() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Spans always get trace ids, so tests can follow a trace; logs
        // print only with TEST_LOG.
        let logs = std::env::var_os("TEST_LOG").is_some().then(|| {
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
        });
        let traces =
            shop_outbox::trace::layer().with_filter(tracing_subscriber::filter::LevelFilter::INFO);
        let _ = tracing_subscriber::registry()
            .with(logs)
            .with(traces)
            .try_init();
    });
}

/// A database created for one test and dropped when the value is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    /// Connection string of this database.
    pub url: String,
    /// Pool connected to this database.
    pub pool: PgPool,
    name: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates an empty database and applies `migrator` to it.
    pub async fn create(migrator: &Migrator) -> Result<Self> {
        Self::create_on(&servers().await.database_url, migrator).await
    }

    /// Creates an empty database on the server `admin_url` connects to (for
    /// example a [`PrivatePostgres`]) and applies `migrator` to it.
    pub async fn create_on(admin_url: &str, migrator: &Migrator) -> Result<Self> {
        let name = format!("test_{}", Uuid::new_v4().simple());
        let admin: PgConnectOptions = admin_url.parse()?;
        let mut conn = admin
            .connect()
            .await
            .context("failed to connect to PostgreSQL")?;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;

        let options = admin.clone().database(&name);
        let url = shop_server::database::url_for_database(admin_url, &name)?;
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect_with(options)
            .await?;
        migrator
            .run(&pool)
            .await
            .context("failed to migrate the test database")?;
        Ok(Self {
            url,
            pool,
            name,
            admin_url: admin_url.to_owned(),
        })
    }

    /// Opens a new connection to this database.
    pub async fn connect(&self) -> Result<PgConnection> {
        Ok(PgConnection::connect(&self.url).await?)
    }

    /// Terminates every other session on this database, as a database
    /// restart or failover would.
    pub async fn terminate_connections(&self) -> Result<u64> {
        let mut conn = PgConnection::connect(&self.admin_url).await?;
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_one(&mut conn)
        .await?;
        Ok(killed as u64)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = self.admin_url.clone();
        // The test's runtime may be blocked in this very call, so the cleanup
        // gets a runtime of its own and must not touch the test's pool: the
        // forced drop ends that pool's sessions.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let mut conn = PgConnection::connect(&admin_url).await?;
                sqlx::query(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                anyhow::Ok(())
            })
        })
        .join();
    }
}

/// Broker names reserved for one test; the exchanges and queues they name are
/// deleted when the value is dropped.
#[derive(Debug)]
pub struct TestBroker {
    /// AMQP URI of the broker.
    pub url: String,
    prefix: String,
    names: std::sync::Mutex<Vec<String>>,
}

impl TestBroker {
    /// Reserves a fresh name prefix on the test broker.
    pub async fn new() -> Self {
        Self::on(&servers().await.amqp_url)
    }

    /// Reserves a fresh name prefix on the broker at `url` (for example a
    /// [`PrivateBroker`]).
    pub fn on(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: format!("test.{}", Uuid::new_v4().simple()),
            names: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// A name unique to this test, for an exchange or a queue.
    pub fn name(&self, suffix: &str) -> String {
        let name = format!("{}.{suffix}", self.prefix);
        self.names.lock().expect("names lock").push(name.clone());
        name
    }

    /// Deletes `name` (a queue or exchange made from one of this test's names)
    /// at the end of the test too.
    pub fn track(&self, name: &str) {
        self.names.lock().expect("names lock").push(name.to_owned());
    }

    /// Opens a connection to the broker (to the first node that answers,
    /// when the URL lists a cluster's nodes).
    pub async fn connect(&self) -> Result<Connection> {
        connect_any(&self.url).await
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.names.lock().expect("names lock"));
        let url = self.url.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let conn = connect_any(&url).await?;
                for name in names {
                    // Each name may be a queue, an exchange, or both: delete
                    // either kind, each on its own channel.
                    let channel = conn.create_channel().await?;
                    let _ = channel
                        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                        .await;
                    let channel = conn.create_channel().await?;
                    let _ = channel
                        .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = conn.close(200, "OK".into()).await;
                anyhow::Ok(())
            })
        })
        .join();
    }
}

/// Connects to the first of the comma-separated AMQP URLs `urls` that
/// answers.
async fn connect_any(urls: &str) -> Result<Connection> {
    let mut last = None;
    for url in urls.split(',') {
        match Connection::connect(url, ConnectionProperties::default()).await {
            Ok(conn) => return Ok(conn),
            Err(error) => last = Some(error),
        }
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no broker URL"), Into::into))
}

/// Polls `check` until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
