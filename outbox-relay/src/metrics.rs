//! Metric names and the Prometheus exporter.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Rows waiting to be published (gauge).
pub const PENDING_ROWS: &str = "outbox_relay_pending_rows";
/// Age of the oldest pending row in seconds (gauge).
pub const OLDEST_PENDING_AGE: &str = "outbox_relay_oldest_pending_age_seconds";
/// Rows in quarantine (gauge).
pub const QUARANTINED_ROWS: &str = "outbox_relay_quarantined_rows";
/// Rows confirmed by the broker, by event type (counter).
pub const PUBLISHED: &str = "outbox_relay_published_total";
/// Failed publish attempts (counter).
pub const PUBLISH_FAILURES: &str = "outbox_relay_publish_failures_total";
/// Time from the event's write to the broker's confirm, in seconds (histogram).
pub const PUBLISH_LATENCY: &str = "outbox_relay_commit_to_confirm_seconds";
/// Partitions this instance holds (gauge).
pub const PARTITIONS_OWNED: &str = "outbox_relay_partitions_owned";
/// 1 while the outbox is stalled (see the `health` module), else 0 (gauge).
pub const STALLED: &str = "outbox_relay_stalled";
/// Published rows deleted by the sweeper (counter).
pub const SWEPT: &str = "outbox_relay_swept_total";

/// Serves the metrics at `http://{addr}/metrics` from a background task.
pub fn install_exporter(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(PUBLISH_LATENCY.to_owned()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .install()?;
    Ok(())
}
