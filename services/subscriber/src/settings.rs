//! Subscriber configuration, as command-line flags and environment
//! variables a service flattens into its own command line.

use std::time::Duration;

use clap::Args;
use shop_broker::BrokerSettings;

use crate::topology::QueueKind;

/// The events exchange when none is given.
pub const DEFAULT_EXCHANGE: &str = "shop.events";
/// Attempts before dead-lettering when none are given.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// How a service consumes its events.
#[derive(Debug, Clone, Args)]
pub struct SubscriberSettings {
    /// The broker: its node URLs and TLS settings.
    #[command(flatten)]
    pub broker: BrokerSettings,

    /// Topic exchange the events are published on.
    #[arg(long, env = "EVENTS_EXCHANGE", default_value = DEFAULT_EXCHANGE)]
    pub exchange: String,

    /// Prefix of every queue name, to run several systems on one broker.
    #[arg(long, env = "SUBSCRIBER_QUEUE_PREFIX", default_value = "")]
    pub queue_prefix: String,

    /// Kind of the work and dead-letter queues.
    #[arg(long, env = "SUBSCRIBER_QUEUE_KIND", value_enum, default_value_t = QueueKind::Quorum)]
    pub queue_kind: QueueKind,

    /// Unacknowledged deliveries the broker may send ahead; enough to keep
    /// every lane's batches full.
    #[arg(long, env = "SUBSCRIBER_PREFETCH", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Lanes applying deliveries at once (each on its own aggregates); each
    /// holds one database connection while it applies.
    #[arg(long, env = "SUBSCRIBER_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,

    /// Most deliveries a lane applies in one transaction (one inbox row per
    /// message, one commit, acknowledgements after it). A lane takes what
    /// has already arrived and never waits to fill a batch; 1 applies each
    /// message on its own. At most 64 (each delivery in a batch is a
    /// savepoint, and PostgreSQL slows down past 64 in one transaction).
    #[arg(long, env = "SUBSCRIBER_BATCH_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub batch_size: u16,

    /// Attempts before a failing message goes to the dead-letter queue.
    #[arg(long, env = "SUBSCRIBER_MAX_ATTEMPTS", default_value_t = DEFAULT_MAX_ATTEMPTS, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub max_attempts: u32,

    /// Delay before the first retry; doubles per attempt.
    #[arg(long, env = "SUBSCRIBER_RETRY_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,

    /// Longest delay between retries.
    #[arg(long, env = "SUBSCRIBER_MAX_RETRY_BACKOFF", default_value = "1m", value_parser = humantime::parse_duration)]
    pub max_retry_backoff: Duration,

    /// How long applied message ids are remembered. Must exceed the longest
    /// time a message can be redelivered after it was applied.
    #[arg(long, env = "SUBSCRIBER_INBOX_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub inbox_retention: Duration,
}

impl SubscriberSettings {
    /// Settings for the given broker URL(s) with every other value at its default.
    pub fn new(amqp_url: &str) -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            settings: SubscriberSettings,
        }
        let wrapper = <Wrapper as clap::Parser>::parse_from(["subscriber", "--amqp-url", amqp_url]);
        wrapper.settings
    }
}
