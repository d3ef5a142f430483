//! Publishing outbox rows to RabbitMQ with publisher confirms.
//!
//! Several batches may be in flight on the one channel at once (the relay
//! pipelines them); they never share an aggregate.
//!
//! A batch is published in waves: wave `k` holds the `k`-th row of every
//! aggregate in the batch. Rows inside a wave are pipelined on one
//! confirm-select channel; the next wave starts once the broker has confirmed
//! the previous one. When a row fails (nacked, returned as unroutable, or too
//! large), the later rows of its aggregate are left for a later batch, so an
//! aggregate's events never reach the broker out of order.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};
use shop_broker::BrokerSettings;

use crate::store::{Failure, PendingRow};

/// Longest AMQP short string (routing key, `type`, `content-type`), in bytes.
const MAX_SHORT_STRING: usize = 255;

/// AMQP delivery mode of messages that survive a broker restart.
const PERSISTENT: u8 = 2;

/// A connection and a confirm-select channel to the broker.
#[derive(Debug)]
pub struct Publisher {
    connection: Connection,
    channel: Channel,
    exchange: ShortString,
    source: String,
    max_payload_bytes: usize,
    confirm_timeout: Duration,
}

/// Why a batch could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection failed.
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    /// The broker did not confirm in time.
    #[error("the broker did not confirm within {0:?}")]
    ConfirmTimeout(Duration),
}

/// What happened to the rows of a batch.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Rows the broker confirmed.
    pub published: Vec<i64>,
    /// Rows that failed and must be retried.
    pub failed: Vec<Failure>,
    /// Rows held back behind a failed row of their aggregate; untouched.
    pub deferred: usize,
}

impl Publisher {
    /// Connects (each node of `broker` within its connect timeout), then
    /// enables publisher confirms and declares the exchange within
    /// `confirm_timeout`.
    pub async fn connect(
        broker: &BrokerSettings,
        exchange: &str,
        source: &str,
        max_payload_bytes: usize,
        confirm_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let connection = broker.connect("outbox-relay").await?;
        let setup = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            channel
                .exchange_declare(
                    exchange.into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            lapin::Result::Ok(channel)
        };
        let channel = tokio::time::timeout(confirm_timeout, setup)
            .await
            .map_err(|_| anyhow::anyhow!("RabbitMQ did not answer within {confirm_timeout:?}"))?
            .context("failed to open a confirmed channel and declare the exchange")?;
        Ok(Self {
            connection,
            channel,
            exchange: exchange.into(),
            source: source.to_owned(),
            max_payload_bytes,
            confirm_timeout,
        })
    }

    /// Publishes `rows` (in publication order) and waits for every confirm.
    /// An error means the channel or connection broke; nothing of the batch
    /// may then be marked published.
    pub async fn publish_batch(&self, rows: &[PendingRow]) -> Result<BatchOutcome, PublishError> {
        let mut outcome = BatchOutcome::default();
        let mut blocked: HashSet<(&str, &str)> = HashSet::new();
        for wave in waves(rows) {
            let mut in_flight = Vec::with_capacity(wave.len());
            for row in wave {
                let aggregate = (row.aggregate_type.as_str(), row.aggregate_id.as_str());
                if blocked.contains(&aggregate) {
                    outcome.deferred += 1;
                    continue;
                }
                if row.payload.len() > self.max_payload_bytes {
                    // Retried: the limit is a setting an operator may raise.
                    outcome.failed.push(Failure {
                        id: row.id,
                        error: format!(
                            "payload of {} bytes exceeds the limit of {} bytes",
                            row.payload.len(),
                            self.max_payload_bytes
                        ),
                        permanent: false,
                    });
                    blocked.insert(aggregate);
                    continue;
                }
                if let Some(error) = unpublishable(row) {
                    outcome.failed.push(Failure {
                        id: row.id,
                        error,
                        permanent: true,
                    });
                    blocked.insert(aggregate);
                    continue;
                }
                let confirm = self
                    .channel
                    .basic_publish(
                        self.exchange.clone(),
                        row.event_type.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &row.payload,
                        self.properties(row),
                    )
                    .await?;
                in_flight.push((row, confirm));
            }
            let deadline = tokio::time::Instant::now() + self.confirm_timeout;
            for (row, confirm) in in_flight {
                let confirmation = tokio::time::timeout_at(deadline, confirm)
                    .await
                    .map_err(|_| PublishError::ConfirmTimeout(self.confirm_timeout))??;
                let error = match confirmation {
                    Confirmation::Ack(None) => {
                        outcome.published.push(row.id);
                        let latency = (Utc::now() - row.occurred_at).as_seconds_f64();
                        metrics::histogram!(crate::metrics::PUBLISH_LATENCY).record(latency);
                        metrics::counter!(crate::metrics::PUBLISHED, "event_type" => row.event_type.clone())
                            .increment(1);
                        continue;
                    }
                    Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                        format!(
                            "returned by the broker: {} {}",
                            returned.reply_code, returned.reply_text
                        )
                    }
                    Confirmation::Nack(None) => "nacked by the broker".to_owned(),
                    Confirmation::NotRequested => "publisher confirms are off".to_owned(),
                };
                blocked.insert((row.aggregate_type.as_str(), row.aggregate_id.as_str()));
                outcome.failed.push(Failure {
                    id: row.id,
                    error,
                    permanent: false,
                });
            }
        }
        Ok(outcome)
    }

    fn properties(&self, row: &PendingRow) -> BasicProperties {
        let message_id = row.message_id.to_string();
        let time = row
            .occurred_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let mut headers = FieldTable::default();
        let mut put = |key: &str, value: &str| {
            headers.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
        };
        put("aggregate_type", &row.aggregate_type);
        put("aggregate_id", &row.aggregate_id);
        if let Some(traceparent) = &row.traceparent {
            put("traceparent", traceparent);
        }
        if let Some(causation_id) = row.causation_id {
            put("causation_id", &causation_id.to_string());
        }
        // CloudEvents, AMQP binding, binary content mode: the attributes as
        // `cloudEvents_`-prefixed application properties (headers), the
        // data as the body, `datacontenttype` as the content type.
        put("cloudEvents_specversion", "1.0");
        put("cloudEvents_id", &message_id);
        put("cloudEvents_source", &self.source);
        put("cloudEvents_type", &row.event_type);
        put("cloudEvents_time", &time);
        put("cloudEvents_subject", &row.aggregate_id);
        // The HTTP binding's names that relays wrote before, for one more
        // release, so subscribers not upgraded yet still read them.
        put("ce-specversion", "1.0");
        put("ce-id", &message_id);
        put("ce-source", &self.source);
        put("ce-type", &row.event_type);
        put("ce-time", &time);

        let mut properties = BasicProperties::default()
            .with_message_id(message_id.as_str().into())
            .with_type(row.event_type.as_str().into())
            .with_content_type(row.content_type.as_str().into())
            .with_timestamp(row.occurred_at.timestamp().max(0) as u64)
            .with_app_id(self.source.as_str().into())
            .with_delivery_mode(PERSISTENT)
            .with_headers(headers);
        if let Some(correlation_id) = row.correlation_id {
            properties = properties.with_correlation_id(correlation_id.to_string().as_str().into());
        }
        properties
    }

    /// Closes the channel and connection after outstanding confirms.
    pub async fn close(&self) {
        let _ = self.channel.wait_for_confirms().await;
        let _ = self.channel.close(200, "OK".into()).await;
        let _ = self.connection.close(200, "OK".into()).await;
    }
}

/// Why a row can never be published, by any relay, if it cannot: a value
/// AMQP carries as a short string (at most 255 bytes) is longer. Rows
/// written through `shop_outbox::enqueue` never are; other writers may.
fn unpublishable(row: &PendingRow) -> Option<String> {
    [
        ("event_type", &row.event_type),
        ("content_type", &row.content_type),
    ]
    .into_iter()
    .find(|(_, value)| value.len() > MAX_SHORT_STRING)
    .map(|(field, value)| {
        format!(
            "{field} is {} bytes; AMQP allows at most {MAX_SHORT_STRING}",
            value.len()
        )
    })
}

/// Splits rows (in publication order) into waves: wave `k` holds the `k`-th
/// row of each aggregate, in publication order.
fn waves(rows: &[PendingRow]) -> Vec<Vec<&PendingRow>> {
    let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
    let mut waves: Vec<Vec<&PendingRow>> = Vec::new();
    for row in rows {
        let position = seen
            .entry((row.aggregate_type.as_str(), row.aggregate_id.as_str()))
            .or_insert(0);
        if waves.len() <= *position {
            waves.push(Vec::new());
        }
        waves[*position].push(row);
        *position += 1;
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, aggregate_id: &str) -> PendingRow {
        PendingRow {
            id,
            message_id: uuid::Uuid::now_v7(),
            aggregate_type: "order".into(),
            aggregate_id: aggregate_id.into(),
            event_type: "shop.events.v1.OrderPlaced".into(),
            payload: Vec::new(),
            content_type: "application/x-protobuf".into(),
            occurred_at: Utc::now(),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            attempts: 0,
        }
    }

    #[test]
    fn waves_hold_one_row_per_aggregate_in_publication_order() {
        let rows = vec![
            row(1, "a"),
            row(2, "a"),
            row(3, "b"),
            row(4, "a"),
            row(5, "c"),
        ];
        let ids: Vec<Vec<i64>> = waves(&rows)
            .iter()
            .map(|wave| wave.iter().map(|r| r.id).collect())
            .collect();
        assert_eq!(ids, vec![vec![1, 3, 5], vec![2], vec![4]]);
    }
}
