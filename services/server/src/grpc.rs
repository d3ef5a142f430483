//! Serving a service's gRPC API with the standard health service and server
//! reflection (so `grpcurl list` works).

use std::net::SocketAddr;
use std::path::PathBuf;
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
            return Ok(None);
        };
        install_crypto_provider();
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))
        };
        let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        Ok(Some(
            tonic::transport::ServerTlsConfig::new().identity(identity),
        ))
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
/// `shutdown`. Health reports SERVING for `service_names` (and the whole
/// server, named "") until shutdown begins, then NOT_SERVING while
/// in-flight calls finish.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    service_names: &[&str],
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let names: Vec<String> = service_names
        .iter()
        .map(|name| (*name).to_owned())
        .chain([String::new()])
        .collect();
    for name in &names {
        reporter
            .set_service_status(name.as_str(), ServingStatus::Serving)
            .await;
    }
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

    let stopping = async move {
        shutdown.cancelled().await;
        for name in &names {
            reporter
                .set_service_status(name.as_str(), ServingStatus::NotServing)
                .await;
        }
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server
            .tls_config(tls)
            .context("the TLS certificate or key is not valid")?;
    }
    server
        .trace_fn(request_span)
        .layer(crate::metrics::GrpcMetricsLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming(listener), stopping)
        .await
        .context("gRPC server failed")
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
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Both run inside this future (no detached tasks), so dropping it, as
    // a crash or an abort does, stops both.
    let stop_all = shutdown.child_token();
    let serving = async {
        let served = serve(listener, routes, service_names, tls, stop_all.clone()).await;
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
