//! Command line and environment configuration of the relay.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use shop_broker::BrokerSettings;

/// Publishes a service's outbox to RabbitMQ: at least once, in order per
/// aggregate, with publisher confirms. Run one or more next to each service
/// database; instances share the work.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version)]
pub struct Cli {
    /// What to do; without a command the relay runs.
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub settings: RelaySettings,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "LOG_JSON", default_value_t = false, action = ArgAction::Set, global = true)]
    pub log_json: bool,
}

/// Subcommands besides running the relay.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect or replay rows that failed too often and were set aside.
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
    },
}

/// Actions on quarantined rows.
#[derive(Debug, Subcommand)]
pub enum QuarantineAction {
    /// Print the quarantined rows.
    List,
    /// Return quarantined rows to the queue of pending rows.
    Replay {
        /// Message ids to replay.
        #[arg(long = "message-id", required_unless_present = "all")]
        message_ids: Vec<uuid::Uuid>,
        /// Replay every quarantined row.
        #[arg(long, conflicts_with = "message_ids")]
        all: bool,
    },
}

/// Everything the relay needs to run.
#[derive(Debug, Clone, Args)]
pub struct RelaySettings {
    /// PostgreSQL database holding the `outbox` table.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,

    /// The broker: its node URLs and TLS settings.
    #[command(flatten)]
    pub broker: BrokerSettings,

    /// Topic exchange the events are published to; declared durable if missing.
    #[arg(long, env = "OUTBOX_RELAY_EXCHANGE", default_value = "shop.events")]
    pub exchange: String,

    /// Producer name: the AMQP `app_id` and the CloudEvents `source`.
    #[arg(long, env = "OUTBOX_RELAY_SOURCE", default_value = "outbox-relay")]
    pub source: String,

    /// Rows fetched and published per batch.
    #[arg(long, env = "OUTBOX_RELAY_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub batch_size: i64,

    /// Batches published and awaiting their confirms at once. The next batch
    /// is fetched and published while earlier ones wait for the broker;
    /// batches in flight never share an aggregate.
    #[arg(long, env = "OUTBOX_RELAY_PIPELINE_DEPTH", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub pipeline_depth: u16,

    /// How often to look for rows without a notification.
    #[arg(long, env = "OUTBOX_RELAY_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// Wake on PostgreSQL LISTEN/NOTIFY as well as by polling.
    #[arg(long, env = "OUTBOX_RELAY_LISTEN", default_value_t = true, action = ArgAction::Set)]
    pub listen: bool,

    /// How often instances recount each other and rebalance partitions.
    #[arg(long, env = "OUTBOX_RELAY_REBALANCE_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub rebalance_interval: Duration,

    /// Longest wait for the broker to confirm a wave of messages; past it
    /// the connection is considered broken and the relay reconnects.
    #[arg(long, env = "OUTBOX_RELAY_CONFIRM_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub confirm_timeout: Duration,

    /// Longest silence on the lease connection before PostgreSQL ends the
    /// session and frees its partitions (`idle_session_timeout`). A frozen
    /// or cut-off instance loses its partitions to the others this long
    /// after it stopped; a live one touches its connection three times as
    /// often, and gives up on any statement that takes longer.
    #[arg(long, env = "OUTBOX_RELAY_LEASE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_timeout: Duration,

    /// Health turns NOT_SERVING when a row ready to publish has waited this
    /// long and this instance published nothing in that time.
    #[arg(long, env = "OUTBOX_RELAY_STALL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,

    /// Failed attempts after which a row is quarantined.
    #[arg(long, env = "OUTBOX_RELAY_MAX_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..))]
    pub max_attempts: i32,

    /// Delay before the first retry of a failed row; doubles per attempt.
    #[arg(long, env = "OUTBOX_RELAY_RETRY_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,

    /// Longest delay between retries of a failed row.
    #[arg(long, env = "OUTBOX_RELAY_MAX_RETRY_BACKOFF", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_retry_backoff: Duration,

    /// Largest payload the relay publishes; larger rows fail and are quarantined.
    #[arg(long, env = "OUTBOX_RELAY_MAX_PAYLOAD_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_payload_bytes: usize,

    /// How long published rows are kept before the sweeper deletes them.
    #[arg(long, env = "OUTBOX_RELAY_RETENTION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub retention: Duration,

    /// How often the sweeper runs.
    #[arg(long, env = "OUTBOX_RELAY_SWEEP_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,

    /// Rows deleted per sweeper statement, to keep locks short.
    #[arg(long, env = "OUTBOX_RELAY_SWEEP_BATCH", default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..))]
    pub sweep_batch: i64,

    /// Address of the gRPC health service (liveness and readiness probe).
    #[arg(
        long,
        env = "OUTBOX_RELAY_HEALTH_ADDR",
        default_value = "0.0.0.0:50070"
    )]
    pub health_addr: SocketAddr,

    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(
        long,
        env = "OUTBOX_RELAY_METRICS_ADDR",
        default_value = "0.0.0.0:9470"
    )]
    pub metrics_addr: SocketAddr,
}

impl RelaySettings {
    /// Settings for the given servers with every other value at its default.
    pub fn new(database_url: &str, amqp_url: &str) -> Self {
        let cli = Cli::parse_from([
            "outbox-relay",
            "--database-url",
            database_url,
            "--amqp-url",
            amqp_url,
        ]);
        cli.settings
    }

    /// Checks values that clap cannot check alone.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.broker.validate()?;
        anyhow::ensure!(
            self.database_url.starts_with("postgres://")
                || self.database_url.starts_with("postgresql://"),
            "--database-url must start with postgres:// or postgresql://"
        );
        anyhow::ensure!(!self.exchange.is_empty(), "--exchange must not be empty");
        // Both travel as AMQP short strings.
        anyhow::ensure!(
            self.exchange.len() <= 255 && self.source.len() <= 255,
            "--exchange and --source must be at most 255 bytes"
        );
        anyhow::ensure!(
            !self.poll_interval.is_zero() && !self.rebalance_interval.is_zero(),
            "--poll-interval and --rebalance-interval must be positive"
        );
        anyhow::ensure!(
            self.lease_timeout >= Duration::from_secs(1),
            "--lease-timeout must be at least 1s"
        );
        anyhow::ensure!(
            !self.stall_timeout.is_zero(),
            "--stall-timeout must be positive"
        );
        anyhow::ensure!(
            self.retry_backoff <= self.max_retry_backoff,
            "--retry-backoff must not exceed --max-retry-backoff"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_work_on_localhost() {
        let settings = RelaySettings::new(
            "postgres://postgres@127.0.0.1:5432/postgres",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        );
        settings.validate().unwrap();
        assert_eq!(settings.exchange, "shop.events");
        assert_eq!(settings.poll_interval, Duration::from_secs(1));
        assert!(settings.listen);
    }

    #[test]
    fn replay_needs_ids_or_all() {
        let err = Cli::try_parse_from(["outbox-relay", "quarantine", "replay"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let cli = Cli::try_parse_from(["outbox-relay", "quarantine", "replay", "--all"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Quarantine {
                action: QuarantineAction::Replay { all: true, .. }
            })
        ));
    }

    #[test]
    fn rejects_a_broker_url_of_another_scheme() {
        let settings = RelaySettings::new("postgres://localhost/db", "http://localhost");
        let err = settings.validate().unwrap_err();
        assert!(err.to_string().contains("--amqp-url"), "{err}");
    }
}
