//! `shop-gateway`: the checkout over HTTP/JSON, for browsers and curl.
//!
//! - [`routes`]: REST routes read from the contracts' `google.api.http`
//!   annotations, so the gRPC and HTTP APIs cannot drift apart;
//! - [`transcode`]: JSON body, path and query → request message → the
//!   service → JSON (proto3 JSON mapping), server streams as server-sent
//!   events;
//! - [`upstream`]: per-service clients with deadlines, read retries,
//!   circuit breakers and balancing over replicas;
//! - [`details`]: one order with its payment, notifications and stock,
//!   gathered concurrently, partial when a service is down;
//! - [`timeline`]: an order's saga across the services, as JSON, as
//!   server-sent events, and as a live page;
//! - [`openapi`]: the OpenAPI document of the routes, generated from the
//!   same contracts;
//! - [`problem`]: errors as `application/problem+json`.

pub mod details;
pub mod openapi;
pub mod problem;
pub mod routes;
pub mod timeline;
pub mod transcode;
pub mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::IntoResponse;
use axum::routing::{MethodFilter, get, on};
use prost_reflect::DescriptorPool;
use tokio_util::sync::CancellationToken;

use crate::upstream::{CallSettings, CircuitState, Upstream};

/// Largest request body the gateway reads, as the services' own limit.
pub const MAX_BODY_BYTES: usize = shop_server::grpc::MAX_REQUEST_BYTES;

/// Configuration of the gateway.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "shop-gateway",
    version,
    about = "The checkout over HTTP/JSON: REST routes, an aggregated order view and an OpenAPI document."
)]
pub struct Settings {
    /// Address the HTTP server listens on.
    #[arg(long, env = "GATEWAY_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// The order service's replicas (comma-separated URLs).
    #[arg(
        long,
        env = "ORDER_URL",
        default_value = "http://127.0.0.1:50051",
        value_delimiter = ','
    )]
    pub order_url: Vec<String>,
    /// The inventory service's replicas.
    #[arg(
        long,
        env = "INVENTORY_URL",
        default_value = "http://127.0.0.1:50052",
        value_delimiter = ','
    )]
    pub inventory_url: Vec<String>,
    /// The payment service's replicas.
    #[arg(
        long,
        env = "PAYMENT_URL",
        default_value = "http://127.0.0.1:50053",
        value_delimiter = ','
    )]
    pub payment_url: Vec<String>,
    /// The notification service's replicas.
    #[arg(
        long,
        env = "NOTIFICATION_URL",
        default_value = "http://127.0.0.1:50054",
        value_delimiter = ','
    )]
    pub notification_url: Vec<String>,
    /// The user service's replicas.
    #[arg(
        long,
        env = "USER_URL",
        default_value = "http://127.0.0.1:50055",
        value_delimiter = ','
    )]
    pub user_url: Vec<String>,
    /// Address of the Prometheus `/metrics` endpoint; empty turns it off.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9466", value_parser = shop_server::metrics::parse_addr)]
    pub metrics_addr: std::option::Option<SocketAddr>,
    /// After a shutdown signal, how long open requests may go on before
    /// the server stops anyway (event streams end at once).
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Most event streams (order watches, live timelines) open at once;
    /// past it new ones are refused with 503.
    #[arg(long, env = "GATEWAY_MAX_STREAMS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_streams: u32,
    /// Log as JSON lines.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    pub log_json: bool,
    #[command(flatten)]
    pub calls: CallSettings,
}

/// What every handler shares: the contracts, the clients, shutdown.
#[derive(Debug)]
pub struct Gateway {
    pub pool: DescriptorPool,
    pub routes: Vec<Arc<routes::Route>>,
    /// The OpenAPI document, generated once.
    pub openapi: serde_json::Value,
    upstreams: BTreeMap<String, Upstream>,
    streams: Arc<tokio::sync::Semaphore>,
    shutdown: CancellationToken,
}

impl Gateway {
    /// The client of a service by short name (`order`, …).
    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.get(name)
    }

    /// Leave to open one more event stream, held for the stream's life;
    /// `None` when as many as allowed are open.
    pub fn open_stream(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.streams.clone().try_acquire_owned().ok()
    }

    /// Each service's circuit.
    pub fn circuits(&self) -> BTreeMap<&str, CircuitState> {
        self.upstreams
            .iter()
            .map(|(name, upstream)| (name.as_str(), upstream.circuit()))
            .collect()
    }
}

/// A gateway bound to its address, ready to serve.
#[derive(Debug)]
pub struct App {
    listener: tokio::net::TcpListener,
    router: Router,
    gateway: Arc<Gateway>,
    drain_timeout: Duration,
}

/// Binds the address and builds the routes from the contracts.
pub async fn build(settings: Settings) -> anyhow::Result<App> {
    let pool = DescriptorPool::decode(shop_proto::FILE_DESCRIPTOR_SET)
        .context("the contracts' descriptors do not decode")?;
    let routes: Vec<_> = routes::from_pool(&pool)?
        .into_iter()
        .map(Arc::new)
        .collect();
    let mut upstreams = BTreeMap::new();
    for (name, urls) in [
        ("order", &settings.order_url),
        ("inventory", &settings.inventory_url),
        ("payment", &settings.payment_url),
        ("notification", &settings.notification_url),
        ("user", &settings.user_url),
    ] {
        upstreams.insert(name.to_owned(), Upstream::new(name, urls, &settings.calls)?);
    }
    let openapi = openapi::document(&pool, &routes);
    let gateway = Arc::new(Gateway {
        pool,
        routes,
        openapi,
        upstreams,
        streams: Arc::new(tokio::sync::Semaphore::new(settings.max_streams as usize)),
        shutdown: CancellationToken::new(),
    });
    let router = router(gateway.clone());
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .with_context(|| format!("failed to bind {}", settings.addr))?;
    Ok(App {
        listener,
        router,
        gateway,
        drain_timeout: settings.drain_timeout,
    })
}

/// The HTTP routes: one per annotated RPC, the order details, health and
/// the OpenAPI document.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let mut router = Router::new();
    // Routes sharing a path get their methods merged.
    let mut by_path: BTreeMap<String, axum::routing::MethodRouter> = BTreeMap::new();
    for route in &gateway.routes {
        let state = transcode::RouteState {
            gateway: gateway.clone(),
            route: route.clone(),
        };
        let filter = MethodFilter::try_from(route.method.clone()).expect("HTTP method of a rule");
        let handler = if route.rpc.is_server_streaming() {
            on(filter, transcode::streaming).with_state(state)
        } else {
            on(filter, transcode::unary).with_state(state)
        };
        let entry = by_path.remove(&route.path);
        by_path.insert(
            route.path.clone(),
            match entry {
                Some(existing) => existing.merge(handler),
                None => handler,
            },
        );
    }
    for (path, handler) in by_path {
        router = router.route(&path, handler);
    }
    router
        .route(
            "/v1/orders/{order_id}/details",
            get(details::handler).with_state(gateway.clone()),
        )
        .route(
            "/v1/orders/{order_id}/timeline",
            get(timeline::handler).with_state(gateway.clone()),
        )
        .route(
            "/v1/orders/{order_id}/timeline/events",
            get(timeline::events).with_state(gateway.clone()),
        )
        .route("/orders/{order_id}/timeline", get(timeline::page))
        .route("/health", get(health).with_state(gateway.clone()))
        .route("/openapi.json", get(openapi::handler).with_state(gateway))
        .fallback(|| async { problem::Problem::no_route() })
        .method_not_allowed_fallback(|| async { problem::Problem::no_route() })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// `GET /health`: 200 while the gateway runs, with each service's circuit;
/// `degraded` while any circuit is not closed.
async fn health(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    let circuits = gateway.circuits();
    let degraded = circuits
        .values()
        .any(|state| *state != CircuitState::Closed);
    axum::Json(serde_json::json!({
        "status": if degraded { "degraded" } else { "ok" },
        "circuits": circuits
            .iter()
            .map(|(name, state)| (name.to_string(), serde_json::Value::from(state.as_str())))
            .collect::<serde_json::Map<_, _>>(),
    }))
}

impl App {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// The shared state, e.g. to read the circuits.
    pub fn gateway(&self) -> Arc<Gateway> {
        self.gateway.clone()
    }

    /// Serves until `shutdown`: then event streams end, open requests get
    /// the drain timeout, and the server stops.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let gateway = self.gateway.clone();
        let stop = shutdown.clone();
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(listener, self.router).with_graceful_shutdown(async move {
            stop.cancelled().await;
            gateway.shutdown.cancel();
        });
        let server = server.into_future();
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => return result.context("the HTTP server failed"),
            _ = shutdown.cancelled() => {}
        }
        match tokio::time::timeout(self.drain_timeout, server).await {
            Ok(result) => result.context("the HTTP server failed"),
            Err(_) => {
                tracing::warn!(timeout = ?self.drain_timeout, "requests still open after the drain timeout; stopping");
                Ok(())
            }
        }
    }
}
