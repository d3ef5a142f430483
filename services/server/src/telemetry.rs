//! Logging and tracing set-up for the service binaries.

use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Logs to stdout, filtered by `RUST_LOG` (default `info`), as JSON lines
/// when `json` is set; gives every span a W3C trace context whatever the
/// log filter, so traces propagate through requests and events.
pub fn init(json: bool) {
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
    let traces =
        shop_outbox::trace::layer().with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .init();
}
