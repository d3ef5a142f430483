//! A checkout service assembled from its parts: a gRPC listener, its API,
//! and its event subscriber.

use std::net::SocketAddr;

use shop_subscriber::Subscriber;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// What every service starts from: its bound gRPC listener and its
/// connected, migrated database.
#[derive(Debug)]
pub struct Foundation {
    /// The bound gRPC listener.
    pub listener: TcpListener,
    /// The service's database, migrated.
    pub pool: PgPool,
}

/// Binds `grpc_addr` (port 0 picks a free port), connects to the database
/// with a pool sized by `pool` and applies `migrator`.
pub async fn prepare(
    grpc_addr: SocketAddr,
    database_url: &str,
    pool: &crate::database::PoolSettings,
    migrator: &Migrator,
) -> anyhow::Result<Foundation> {
    let listener = crate::grpc::bind(grpc_addr).await?;
    let pool = crate::database::connect_and_migrate(database_url, pool, migrator).await?;
    Ok(Foundation { listener, pool })
}

/// A service, bound and connected, ready to run.
#[derive(Debug)]
pub struct Service {
    listener: TcpListener,
    addr: SocketAddr,
    routes: Routes,
    name: &'static str,
    subscribers: Vec<Subscriber>,
    serving: crate::grpc::Serving,
    background: Vec<Background>,
}

/// A task that runs next to the API until shutdown.
struct Background(
    Box<dyn FnOnce(CancellationToken) -> futures_util::future::BoxFuture<'static, ()> + Send>,
);

impl std::fmt::Debug for Background {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Background")
    }
}

impl Service {
    /// Assembles a service serving `routes` (whose gRPC service is `name`)
    /// and consuming with `subscribers` (each on its own queue), whose
    /// queues are declared now so that events published before the first
    /// run are kept.
    /// Its health follows `pool`'s database and the subscribers.
    pub async fn new(
        listener: TcpListener,
        pool: &PgPool,
        routes: Routes,
        name: &'static str,
        subscribers: impl IntoIterator<Item = Subscriber>,
    ) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let subscribers: Vec<Subscriber> = subscribers.into_iter().collect();
        for subscriber in &subscribers {
            subscriber.declare().await?;
        }
        Ok(Self {
            listener,
            addr,
            routes,
            name,
            subscribers,
            serving: crate::grpc::Serving {
                dependencies: crate::grpc::Dependencies {
                    database: Some((*pool.connect_options()).clone()),
                    subscribers: Vec::new(),
                },
                ..Default::default()
            },
            background: Vec::new(),
        })
    }

    /// Serves over TLS when `tls` names a certificate and key; reads them now.
    pub fn with_tls(mut self, tls: &crate::grpc::TlsSettings) -> anyhow::Result<Self> {
        self.serving.tls = tls.load()?;
        Ok(self)
    }

    /// Bounds calls and ends them on shutdown as `settings` say, and
    /// cancels `streams` when shutdown begins (the service's long-lived
    /// streams end on it).
    pub fn with_drain(
        mut self,
        settings: &crate::grpc::DrainSettings,
        streams: CancellationToken,
    ) -> Self {
        self.serving.drain = crate::grpc::Drain {
            timeout: settings.drain_timeout,
            call_timeout: settings.call_timeout,
            streams,
        };
        self
    }

    /// Runs `task` next to the API; it gets a token cancelled when shutdown
    /// begins and must return soon after.
    pub fn with_background<F, Fut>(mut self, task: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.background
            .push(Background(Box::new(move |token| Box::pin(task(token)))));
        self
    }

    /// The bound gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves the API and consumes events until `shutdown`.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let stop = shutdown.child_token();
        // In this future, not spawned: dropping it stops them too.
        let background = futures_util::future::join_all(
            self.background
                .into_iter()
                .map(|Background(task)| task(stop.clone())),
        );
        let service = async {
            let result = crate::grpc::run_service(
                self.listener,
                self.routes,
                &[self.name],
                self.subscribers,
                self.serving,
                shutdown,
            )
            .await;
            stop.cancel();
            result
        };
        let (result, _) = tokio::join!(service, background);
        result
    }
}
