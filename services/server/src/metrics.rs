//! Prometheus metrics of a service: its gRPC calls, plus whatever its
//! libraries record (the subscriber's handler outcomes and latencies).

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// gRPC calls answered, by method and status code (counter).
pub const GRPC_REQUESTS: &str = "grpc_server_requests_total";
/// Time to the response headers, by method, in seconds (histogram).
pub const GRPC_DURATION: &str = "grpc_server_request_duration_seconds";

/// Parses a metrics address; an empty value means no metrics endpoint.
/// (Declare the field as `std::option::Option<SocketAddr>` so clap uses
/// this parser's output as is.)
pub fn parse_addr(value: &str) -> Result<Option<SocketAddr>, std::net::AddrParseError> {
    if value.is_empty() {
        Ok(None)
    } else {
        value.parse().map(Some)
    }
}

/// Serves the process's metrics at `http://{addr}/metrics`.
pub fn install_exporter(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".to_owned()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .install()?;
    Ok(())
}

/// The `method` label of calls to paths the server does not serve. Paths
/// come from clients, so labelling them as sent would let any client
/// create series (and memory) without bound.
pub const UNKNOWN_METHOD: &str = "unknown";

/// A tower layer that counts and times every gRPC call, labelled with the
/// method's path when it is one of the server's methods and
/// [`UNKNOWN_METHOD`] otherwise.
#[derive(Debug, Clone, Default)]
pub struct GrpcMetricsLayer {
    known: Arc<HashSet<String>>,
}

impl GrpcMetricsLayer {
    /// Labels calls to `methods` (request paths) by path.
    pub fn new(methods: impl IntoIterator<Item = String>) -> Self {
        Self {
            known: Arc::new(methods.into_iter().collect()),
        }
    }

    /// The label of a call to `path`.
    pub fn label(&self, path: &str) -> String {
        if self.known.contains(path) {
            path.to_owned()
        } else {
            UNKNOWN_METHOD.to_owned()
        }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around each route.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    layer: GrpcMetricsLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = self.layer.label(request.uri().path());
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            // Errors travel as trailers-only responses with the status in
            // the headers; a successful call's status comes in trailers.
            let code = match &response {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                Err(_) => tonic::Code::Unavailable,
            };
            metrics::histogram!(GRPC_DURATION, "method" => method.clone())
                .record(started.elapsed().as_secs_f64());
            metrics::counter!(GRPC_REQUESTS, "method" => method, "code" => format!("{code:?}"))
                .increment(1);
            response
        })
    }
}
