//! The broker objects one subscriber owns, and their names.
//!
//! For a work queue `Q` bound to the events exchange:
//! - `Q.retry.quorum.N` (`Q.retry.N` for classic queues) holds messages
//!   after their N-th failure until their per-message TTL expires; the
//!   broker then dead-letters them through the default exchange straight
//!   back to `Q` (not through the topic exchange, so no other subscriber
//!   sees the retry). Quorum retry queues are replicated like the work
//!   queue and dead-letter at least once (`x-dead-letter-strategy`), so a
//!   message waiting for its retry survives the loss of a broker node;
//! - `Q.dlq` holds messages that failed for good, with headers saying why.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

/// Kind of the work queue and its dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueKind {
    /// Replicated, durable; the default. Needs RabbitMQ 3.10 or later with
    /// its feature flags enabled (quorum delay queues rely on message TTL
    /// and at-least-once dead-lettering).
    Quorum,
    /// Classic durable queue, for single-node brokers or servers before
    /// 3.10.
    Classic,
}

/// Redeliveries after which a quorum queue dead-letters a message that keeps
/// crashing its consumer before it can be acknowledged.
const DELIVERY_LIMIT: i64 = 20;

/// What a declared queue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    /// The work queue the subscriber consumes.
    Work,
    /// Messages that failed for good.
    DeadLetter,
    /// Messages after their `failures`-th failure, until their TTL expires.
    Retry {
        /// Failures so far.
        failures: u32,
    },
}

/// One queue as declared: its name, role and arguments.
#[derive(Debug, Clone)]
pub struct QueueDeclaration {
    /// Queue name.
    pub name: String,
    /// What the queue is for.
    pub role: QueueRole,
    /// Its `x-` arguments.
    pub arguments: FieldTable,
}

/// The names and shape of one subscriber's queues.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The subscriber's name: its AMQP connection name, and its key in the
    /// inbox.
    pub consumer: String,
    /// Topic exchange the events arrive on.
    pub exchange: String,
    /// Work queue.
    pub queue: String,
    /// Routing keys (event types) bound to the work queue.
    pub routing_keys: Vec<String>,
    /// Routing keys an earlier version bound to the work queue and this one
    /// removes (the events now go to another queue).
    pub retired_keys: Vec<String>,
    /// Kind of the work queue and dead-letter queue.
    pub kind: QueueKind,
    /// Attempts before a message is dead-lettered; one retry queue per
    /// failure before that.
    pub max_attempts: u32,
}

impl Topology {
    /// Delay queue for messages that failed `failures` times.
    pub fn retry_queue(&self, failures: u32) -> String {
        retry_queue(&self.queue, self.kind, failures)
    }

    /// Classic delay queues that versions before replicated retry queues
    /// declared for a quorum work queue; removed once empty.
    pub fn retired_retry_queues(&self) -> Vec<String> {
        match self.kind {
            QueueKind::Quorum => (1..self.max_attempts)
                .map(|n| retry_queue(&self.queue, QueueKind::Classic, n))
                .collect(),
            QueueKind::Classic => Vec::new(),
        }
    }

    /// Dead-letter queue.
    pub fn dead_letter_queue(&self) -> String {
        dead_letter_queue(&self.queue)
    }

    /// Every queue this topology declares.
    pub fn queues(&self) -> Vec<String> {
        self.declarations()
            .into_iter()
            .map(|declaration| declaration.name)
            .collect()
    }

    /// Every queue this topology declares, with its arguments: the work
    /// queue, the dead-letter queue, then the retry queues in order.
    pub fn declarations(&self) -> Vec<QueueDeclaration> {
        let mut work_args = self.kind_args();
        if self.kind == QueueKind::Quorum {
            insert(
                &mut work_args,
                "x-delivery-limit",
                AMQPValue::LongLongInt(DELIVERY_LIMIT),
            );
            insert_str(&mut work_args, "x-dead-letter-exchange", "");
            insert_str(
                &mut work_args,
                "x-dead-letter-routing-key",
                &self.dead_letter_queue(),
            );
        }
        let mut declarations = vec![
            QueueDeclaration {
                name: self.queue.clone(),
                role: QueueRole::Work,
                arguments: work_args,
            },
            QueueDeclaration {
                name: self.dead_letter_queue(),
                role: QueueRole::DeadLetter,
                arguments: self.kind_args(),
            },
        ];
        for failures in 1..self.max_attempts {
            let mut arguments = self.kind_args();
            if self.kind == QueueKind::Quorum {
                // A message leaves the retry queue only once the work queue
                // has it (RabbitMQ 3.10+; at-least-once dead-lettering
                // requires the reject-publish overflow mode).
                insert_str(&mut arguments, "x-dead-letter-strategy", "at-least-once");
                insert_str(&mut arguments, "x-overflow", "reject-publish");
            }
            insert_str(&mut arguments, "x-dead-letter-exchange", "");
            insert_str(&mut arguments, "x-dead-letter-routing-key", &self.queue);
            declarations.push(QueueDeclaration {
                name: self.retry_queue(failures),
                role: QueueRole::Retry { failures },
                arguments,
            });
        }
        declarations
    }

    /// Declares the exchange, the queues and the bindings (idempotent), on
    /// a channel of its own, and removes retired retry queues that are
    /// empty.
    pub async fn declare(&self, connection: &Connection) -> lapin::Result<()> {
        let channel = connection.create_channel().await?;
        self.declare_on(&channel).await?;
        let _ = channel.close(200, "OK".into()).await;
        for queue in self.retired_retry_queues() {
            // Each on a channel of its own, which the broker closes when the
            // queue's node is down. Only a queue that is up and empty is
            // deleted (a delete on a crashed classic queue would ignore
            // `if_empty`); one still holding messages keeps sending them
            // back to the work queue, and a later start removes it.
            //
            // Declared as the earlier versions declared it, not passively:
            // a missing queue is then created and at once deleted, rather
            // than answered with a channel error that the AMQP client logs
            // as an error at every start of every subscriber. The type is
            // named (RabbitMQ takes a classic queue declared without it as
            // the same queue), so that a virtual host whose default queue
            // type is quorum does not create a quorum queue here, which
            // would refuse the delete below.
            let channel = connection.create_channel().await?;
            let mut legacy = FieldTable::default();
            insert_str(&mut legacy, "x-queue-type", "classic");
            insert_str(&mut legacy, "x-dead-letter-exchange", "");
            insert_str(&mut legacy, "x-dead-letter-routing-key", &self.queue);
            let found = declare_queue(&channel, &queue, legacy).await;
            let empty = match found {
                Ok(state) => state.message_count() == 0,
                Err(error) => {
                    // Its node is down, or it is not the classic queue an
                    // earlier version declared: kept, and nothing is lost.
                    tracing::info!(%queue, %error, "retired retry queue not checked; kept for now");
                    continue;
                }
            };
            if !empty {
                tracing::info!(%queue, "retired retry queue still holds messages; kept for now");
                let _ = channel.close(200, "OK".into()).await;
                continue;
            }
            let deleted = channel
                .queue_delete(
                    queue.as_str().into(),
                    QueueDeleteOptions {
                        if_empty: true,
                        ..Default::default()
                    },
                )
                .await;
            match deleted {
                Ok(_) => {
                    let _ = channel.close(200, "OK".into()).await;
                }
                Err(error) => {
                    tracing::info!(%queue, %error, "retired retry queue kept for now");
                }
            }
        }
        Ok(())
    }

    async fn declare_on(&self, channel: &Channel) -> lapin::Result<()> {
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;

        for declaration in self.declarations() {
            declare_queue(channel, &declaration.name, declaration.arguments).await?;
        }
        for key in &self.routing_keys {
            channel
                .queue_bind(
                    self.queue.as_str().into(),
                    self.exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        for key in &self.retired_keys {
            channel
                .queue_unbind(
                    self.queue.as_str().into(),
                    self.exchange.as_str().into(),
                    key.as_str().into(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    fn kind_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.kind == QueueKind::Quorum {
            insert_str(&mut args, "x-queue-type", "quorum");
        }
        args
    }
}

/// Delay queue of work queue `queue` (of kind `kind`) for messages that
/// failed `failures` times.
pub fn retry_queue(queue: &str, kind: QueueKind, failures: u32) -> String {
    match kind {
        QueueKind::Quorum => format!("{queue}.retry.quorum.{failures}"),
        QueueKind::Classic => format!("{queue}.retry.{failures}"),
    }
}

/// Dead-letter queue of a work queue.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// Delay before the retry that follows the `failures`-th failure:
/// `base * 2^(failures-1)`, at most `max`.
pub fn retry_delay(failures: u32, base: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
    base.saturating_mul(factor).min(max)
}

/// Declares durable queue `name` with `args`; returns its state (the
/// messages it holds).
async fn declare_queue(
    channel: &Channel,
    name: &str,
    args: FieldTable,
) -> lapin::Result<lapin::Queue> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
}

fn insert(table: &mut FieldTable, key: &str, value: AMQPValue) {
    table.insert(ShortString::from(key), value);
}

fn insert_str(table: &mut FieldTable, key: &str, value: &str) {
    insert(table, key, AMQPValue::LongString(LongString::from(value)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let delays: Vec<u128> = (1..=6)
            .map(|n| retry_delay(n, base, max).as_millis())
            .collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn one_retry_queue_per_failure_before_the_last_attempt() {
        let topology = Topology {
            consumer: "inventory".into(),
            exchange: "shop.events".into(),
            queue: "inventory.events".into(),
            routing_keys: vec![],
            retired_keys: vec![],
            kind: QueueKind::Quorum,
            max_attempts: 3,
        };
        assert_eq!(
            topology.queues(),
            vec![
                "inventory.events",
                "inventory.events.dlq",
                "inventory.events.retry.quorum.1",
                "inventory.events.retry.quorum.2"
            ]
        );
        assert_eq!(
            topology.retired_retry_queues(),
            vec!["inventory.events.retry.1", "inventory.events.retry.2"]
        );
    }
}
