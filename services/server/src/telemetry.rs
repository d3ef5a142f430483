//! Logging and tracing set-up for the service binaries.
//!
//! Logs go to stdout, filtered by `RUST_LOG`. Every span gets a W3C trace
//! context whatever the log filter, so traces propagate through requests and
//! events; when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (for example
//! `http://localhost:4317`), spans are also exported there over OTLP/gRPC.

use anyhow::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Exports the spans still buffered when dropped: keep it for the life of
/// the process.
#[derive(Debug)]
#[must_use = "dropping it stops span export"]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Installs logging (JSON lines when `json`) and tracing for `service`.
pub fn init(service: &str, json: bool) -> anyhow::Result<Telemetry> {
    let provider = tracer_provider(service)?;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "info,sqlx=warn,lapin=warn,h2=warn".into())
    };
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_filter(filter())
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_filter(filter())
            .boxed()
    };
    let traces = shop_outbox::trace::layer_with(provider.clone())
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .context("a global tracing subscriber is already installed")?;
    Ok(Telemetry { provider })
}

/// A tracer provider named after `service`, exporting over OTLP when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn tracer_provider(service: &str) -> anyhow::Result<SdkTracerProvider> {
    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
        return Ok(builder.build());
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .context("failed to configure the OTLP exporter")?;
    Ok(builder.with_batch_exporter(exporter).build())
}
