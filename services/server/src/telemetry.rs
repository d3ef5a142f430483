//! Logging set-up for the service binaries.

/// Logs to stdout, filtered by `RUST_LOG` (default `info`), as JSON lines
/// when `json` is set.
pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,sqlx=warn,lapin=warn,h2=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
