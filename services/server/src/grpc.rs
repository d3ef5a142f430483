//! Serving a service's gRPC API with the standard health service and server
//! reflection (so `grpcurl list` works).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

/// TLS for a gRPC server: both files, or neither for plaintext.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsSettings {
    /// PEM certificate chain to serve gRPC over TLS; needs `--tls-key`.
    #[arg(long, env = "GRPC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "GRPC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM certificate of the authority that issues client certificates:
    /// when set, only clients presenting one of its certificates connect
    /// (mutual TLS). Needs `--tls-cert`.
    #[arg(long, env = "GRPC_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsSettings {
    /// Reads the certificate and key, if configured, so a bad path or file
    /// stops the service at start-up with the file named.
    pub fn load(&self) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            anyhow::ensure!(
                self.tls_cert.is_none() && self.tls_key.is_none(),
                "--tls-cert and --tls-key go together"
            );
            anyhow::ensure!(
                self.tls_client_ca.is_none(),
                "--tls-client-ca needs --tls-cert and --tls-key"
            );
            return Ok(None);
        };
        install_crypto_provider();
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))
        };
        let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.tls_client_ca {
            // Client certificates are then required, not optional.
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        Ok(Some(config))
    }
}

/// How long calls may take and how a server ends: the settings every
/// service shares.
#[derive(Debug, Clone, clap::Args)]
pub struct DrainSettings {
    /// After SIGTERM, how long calls in flight may take to finish; then
    /// the remaining connections are closed and the process exits anyway.
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Longest a call may take to answer (a stream: to start answering);
    /// then it ends with DEADLINE_EXCEEDED. A client's own shorter deadline
    /// (`grpc-timeout`) applies as well.
    #[arg(long, env = "GRPC_CALL_TIMEOUT", default_value = "30s", value_parser = crate::database::positive_duration)]
    pub call_timeout: Duration,
}

impl Default for DrainSettings {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(10),
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }
}

/// The default of `GRPC_CALL_TIMEOUT`.
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a server's calls may take, and how it ends them on shutdown.
#[derive(Debug, Clone)]
pub struct Drain {
    /// Longest wait for calls in flight once shutdown begins.
    pub timeout: Duration,
    /// Longest a call may take to answer (see [`CallDeadlineLayer`]).
    pub call_timeout: Duration,
    /// Cancelled when shutdown begins: long-lived streams (such as
    /// `WatchOrder`) end on it, telling their clients to reconnect.
    pub streams: CancellationToken,
}

impl Drain {
    /// A drain of `timeout`, with the default call timeout and a fresh
    /// token for the streams.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            streams: CancellationToken::new(),
        }
    }
}

/// Ends a call that has not answered within its timeout with
/// DEADLINE_EXCEEDED, dropping its work: a transaction it had open is
/// rolled back. A stream is bounded until it starts answering; from then
/// on keepalives and shutdown govern it.
#[derive(Debug, Clone, Copy)]
pub struct CallDeadlineLayer {
    timeout: Duration,
}

impl CallDeadlineLayer {
    /// Calls answer within `timeout` or fail.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> tower::Layer<S> for CallDeadlineLayer {
    type Service = CallDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallDeadline {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service [`CallDeadlineLayer`] wraps around each route.
#[derive(Debug, Clone)]
pub struct CallDeadline<S> {
    inner: S,
    timeout: Duration,
}

impl<S, B, R> tower::Service<http::Request<B>> for CallDeadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let timeout = self.timeout;
        let response = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(timeout, response).await {
                Ok(response) => response,
                Err(_) => {
                    // Inside the call's span, which names the method.
                    tracing::warn!(?timeout, "call not answered in time; ended");
                    Ok(
                        tonic::Status::deadline_exceeded(format!("no answer within {timeout:?}"))
                            .into_http(),
                    )
                }
            }
        })
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new(DrainSettings::default().drain_timeout)
    }
}

/// What a service depends on, for its health.
#[derive(Debug, Clone, Default)]
pub struct Dependencies {
    /// The service's database; checked on a connection of its own, so a
    /// busy pool does not read as an outage.
    pub database: Option<sqlx::postgres::PgConnectOptions>,
    /// Whether each of the service's subscribers is consuming.
    pub subscribers: Vec<tokio::sync::watch::Receiver<bool>>,
}

/// Largest request message a server accepts (decoded). The biggest valid
/// request, an order of 100 lines, is a few kilobytes.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Most calls one client connection may have open at once: bounded so one
/// client cannot hold unbounded server state, and high enough for a
/// gateway that multiplexes many customers' WatchOrder streams over one
/// connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// HTTP/2 pings on idle connections, so a peer that vanished is noticed
/// and its streams end.
const HTTP2_KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(10));

/// How often dependencies are checked, and how long a check may take.
const DEPENDENCY_CHECK: Duration = Duration::from_secs(1);
const DEPENDENCY_TIMEOUT: Duration = Duration::from_secs(2);

impl Dependencies {
    /// Checks the database; `conn` is kept between checks.
    async fn database_reachable(&self, conn: &mut Option<sqlx::PgConnection>) -> bool {
        use sqlx::Connection;
        let Some(options) = &self.database else {
            return true;
        };
        let check = async {
            if conn.is_none() {
                *conn = Some(sqlx::PgConnection::connect_with(options).await?);
            }
            let connection = conn.as_mut().expect("connected above");
            connection.ping().await
        };
        match tokio::time::timeout(DEPENDENCY_TIMEOUT, check).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                tracing::debug!(%error, "database check failed");
                *conn = None;
                false
            }
            Err(_) => {
                *conn = None;
                false
            }
        }
    }

    fn subscribers_consuming(&self) -> bool {
        self.subscribers.iter().all(|consuming| *consuming.borrow())
    }
}

/// How a server runs: TLS, how it ends, what its health follows.
#[derive(Debug, Clone, Default)]
pub struct Serving {
    /// Serve over TLS with this configuration; plaintext when `None`.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// How calls end on shutdown.
    pub drain: Drain,
    /// What health follows.
    pub dependencies: Dependencies,
}

/// Keeps health in step with the dependencies until dropped: each API
/// service is SERVING while the database answers; the whole server ("")
/// while the database answers and every subscriber is consuming. So a
/// readiness probe on the API's name keeps a replica in rotation through a
/// broker outage (its writes only need the database; events wait in the
/// outbox), while "" tells operators the process is not fully working.
async fn follow_dependencies(
    mut dependencies: Dependencies,
    reporter: tonic_health::server::HealthReporter,
    service_names: Vec<String>,
) {
    let mut conn = None;
    let mut last = None;
    loop {
        let database = dependencies.database_reachable(&mut conn).await;
        let everything = database && dependencies.subscribers_consuming();
        if last != Some((database, everything)) {
            if last.is_some() || !everything {
                tracing::info!(
                    database,
                    subscribers = dependencies.subscribers_consuming(),
                    "dependency health changed"
                );
            }
            last = Some((database, everything));
            let status = |up: bool| {
                if up {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                }
            };
            for name in &service_names {
                reporter
                    .set_service_status(name.as_str(), status(database))
                    .await;
            }
            reporter.set_service_status("", status(everything)).await;
        }
        // Next check after the interval, or at once when a subscriber
        // starts or stops consuming.
        let changed = async {
            if dependencies.subscribers.is_empty() {
                return std::future::pending().await;
            }
            let changes = dependencies
                .subscribers
                .iter_mut()
                .map(|consuming| Box::pin(consuming.changed()));
            let (changed, _, _) = futures_util::future::select_all(changes).await;
            if changed.is_err() {
                // A subscriber is gone for good: nothing more to wait for.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = tokio::time::sleep(DEPENDENCY_CHECK) => {}
            () = changed => {}
        }
    }
}

/// Makes aws-lc-rs the process's TLS provider, so TLS works however the
/// workspace's crates configure rustls. Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// How long an idle accepted connection waits before TCP keepalive probes
/// start, so a peer that vanished without closing is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The accepted connections of `listener`, configured for RPC traffic:
/// `TCP_NODELAY` on (without it, Nagle's algorithm holds small responses
/// back until the client's delayed ACK, some 40 ms per call) and TCP
/// keepalive on.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE))
}

/// Binds the gRPC listener (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to bind the gRPC server to {addr}"))
}

/// Serves `routes` plus health and reflection on `listener` until
/// `shutdown`. Health reports on `service_names` and the whole server
/// (named "") as their dependencies allow (see [`Dependencies`]) until
/// shutdown begins.
///
/// Shutdown: new connections are refused, health turns NOT_SERVING (and
/// Health/Watch streams end after saying so), `drain.streams` is cancelled
/// so the service's own long-lived streams end, and calls in flight get up
/// to `drain.timeout` to finish; connections still open then are closed.
/// Health name that is SERVING for as long as the server answers, whatever
/// its dependencies: for liveness probes, which should restart a process
/// that no longer answers, not one whose database is down.
pub const LIVENESS: &str = "liveness";

pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    service_names: &[&str],
    serving: Serving,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Serving {
        tls,
        drain,
        dependencies,
    } = serving;
    let (reporter, health) = tonic_health::server::health_reporter();
    let names: Vec<String> = service_names
        .iter()
        .map(|name| (*name).to_owned())
        .chain([String::new()])
        .collect();
    // The database answered moments ago (it was migrated); the subscribers,
    // if any, have yet to start consuming.
    for name in &names {
        let waiting = name.is_empty() && !dependencies.subscribers.is_empty();
        let status = if waiting {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        reporter.set_service_status(name.as_str(), status).await;
    }
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    // Reflection lists exactly the services this server serves.
    let reflection_builder = || {
        service_names.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(shop_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health"),
            |builder, name| builder.with_service_name(*name),
        )
    };
    let reflection = reflection_builder()
        .build_v1()
        .context("failed to build the reflection service")?;
    let reflection_alpha = reflection_builder()
        .build_v1alpha()
        .context("failed to build the reflection service")?;
    let routes = routes
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha);

    let began = shutdown.clone();
    let streams = drain.streams.clone();
    let api_names: Vec<String> = service_names
        .iter()
        .map(|name| (*name).to_owned())
        .collect();
    let stopping = async move {
        tokio::select! {
            () = began.cancelled() => {}
            () = follow_dependencies(dependencies, reporter.clone(), api_names) => {}
        }
        let mut reporter = reporter;
        for name in &names {
            reporter
                .set_service_status(name.as_str(), ServingStatus::NotServing)
                .await;
            // Dropping a status ends its Watch streams once they have sent
            // NOT_SERVING; later Checks answer NOT_FOUND.
            reporter.clear_service_status(name).await;
        }
        streams.cancel();
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server
            .tls_config(tls)
            .context("the TLS certificate or key is not valid")?;
    }
    let served = server
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE.0))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE.1))
        .trace_fn(request_span)
        .layer(crate::metrics::GrpcMetricsLayer::new(known_methods(
            service_names,
        )))
        .layer(CallDeadlineLayer::new(drain.call_timeout))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming(listener), stopping);
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(drain.timeout).await;
    };
    tokio::select! {
        served = served => served.context("gRPC server failed"),
        () = deadline => {
            tracing::warn!(timeout = ?drain.timeout, "calls still open at the drain deadline; closing their connections");
            Ok(())
        }
    }
}

/// Request paths of every method a server with `service_names` serves:
/// theirs, health's and reflection's.
fn known_methods(service_names: &[&str]) -> Vec<String> {
    let mut services = service_names.to_vec();
    // Every service serves its timeline too.
    services.push(shop_proto::timeline::v1::timeline_service_server::SERVICE_NAME);
    let mut methods = shop_proto::method_paths(shop_proto::FILE_DESCRIPTOR_SET, &services);
    methods.extend(shop_proto::method_paths(
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        &["grpc.health.v1.Health"],
    ));
    methods.extend(
        [
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .map(str::to_owned),
    );
    methods
}

/// The span of one gRPC call, continuing the caller's trace when the call
/// carries a `traceparent` header.
fn request_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!("grpc", method = %request.uri().path());
    let traceparent = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok());
    shop_outbox::trace::continue_trace(&span, traceparent);
    span
}

/// Runs a service: its gRPC API (with health and reflection) and its event
/// subscribers, until `shutdown`. If any part stops with an error, the
/// others are stopped too.
pub async fn run_service(
    listener: TcpListener,
    routes: Routes,
    service_names: &[&str],
    subscribers: Vec<shop_subscriber::Subscriber>,
    mut serving: Serving,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serving
        .dependencies
        .subscribers
        .extend(subscribers.iter().map(|subscriber| subscriber.consuming()));
    // Both run inside this future (no detached tasks), so dropping it, as
    // a crash or an abort does, stops both.
    let stop_all = shutdown.child_token();
    let serving = async {
        let served = serve(listener, routes, service_names, serving, stop_all.clone()).await;
        stop_all.cancel();
        served
    };
    let consuming = async {
        let results =
            futures_util::future::join_all(subscribers.into_iter().map(|subscriber| async {
                let consumed = subscriber.run_until_stopped(stop_all.clone()).await;
                if consumed.is_err() {
                    stop_all.cancel();
                }
                consumed
            }))
            .await;
        results
            .into_iter()
            .collect::<anyhow::Result<Vec<()>>>()
            .map(drop)
    };
    let (served, consumed) = tokio::join!(serving, consuming);
    served.and(consumed)
}
