//! Inspecting and re-publishing dead-lettered messages.

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Confirmation, Connection};

use crate::subscriber::{
    ATTEMPT_HEADER, ATTEMPTS_HEADER, ORIGINAL_ROUTING_KEY_HEADER, REASON_HEADER, header_str,
};
use crate::topology::dead_letter_queue;

/// Header naming the replay run that last re-published a dead letter.
pub const REPLAY_HEADER: &str = "x-replayed-by";

/// A message in a dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The message id, if it had one.
    pub message_id: Option<String>,
    /// Event type.
    pub event_type: Option<String>,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    /// Attempts made before.
    pub attempts: Option<u32>,
    /// Its routing key on the events exchange.
    pub original_routing_key: Option<String>,
    /// Payload size in bytes.
    pub payload_bytes: usize,
}

/// Lists the dead letters of work queue `queue`, leaving them in place.
pub async fn list(conn: &Connection, queue: &str) -> anyhow::Result<Vec<DeadLetter>> {
    let channel = conn.create_channel().await?;
    let dlq = dead_letter_queue(queue);
    let mut letters = Vec::new();
    let mut last_tag = None;
    // Every message taken stays unacknowledged until the end, so none
    // comes round twice.
    while let Some(message) = channel
        .basic_get(dlq.as_str().into(), BasicGetOptions::default())
        .await?
    {
        let properties = &message.delivery.properties;
        letters.push(DeadLetter {
            message_id: properties.message_id().as_ref().map(|id| id.to_string()),
            event_type: properties.kind().as_ref().map(|kind| kind.to_string()),
            reason: header_str(properties, REASON_HEADER),
            attempts: properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(ATTEMPTS_HEADER).cloned())
                .and_then(|value| match value {
                    AMQPValue::LongUInt(n) => Some(n),
                    _ => None,
                }),
            original_routing_key: header_str(properties, ORIGINAL_ROUTING_KEY_HEADER),
            payload_bytes: message.delivery.data.len(),
        });
        last_tag = Some(message.delivery.delivery_tag);
    }
    // Hand every message back, in place.
    if let Some(tag) = last_tag {
        channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await?;
    }
    let _ = channel.close(200, "OK".into()).await;
    Ok(letters)
}

/// Moves dead letters of work queue `queue` back to it with a fresh attempt
/// count: those with the given message ids, or all when `message_ids` is
/// empty. Returns how many were moved.
///
/// A replay always ends, even while the consumer fails every replayed
/// message again: each replayed message carries this run's id in
/// [`REPLAY_HEADER`], and a failed message comes back to the tail of the
/// dead-letter queue, behind every message that was there when the replay
/// started; so the replay stops at the first message marked with its own
/// id and leaves it for the next replay.
pub async fn replay(
    conn: &Connection,
    queue: &str,
    message_ids: &[String],
) -> anyhow::Result<usize> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let dlq = dead_letter_queue(queue);
    let run = uuid::Uuid::now_v7().to_string();
    let mut replayed = 0;
    let mut kept = Vec::new();
    while let Some(message) = channel
        .basic_get(dlq.as_str().into(), BasicGetOptions::default())
        .await?
    {
        let delivery = message.delivery;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string());
        if header_str(&delivery.properties, REPLAY_HEADER).as_deref() == Some(run.as_str()) {
            // Replayed by this run and failed again: everything that was
            // here at the start has been looked at.
            kept.push(delivery.delivery_tag);
            break;
        }
        let selected =
            message_ids.is_empty() || id.as_ref().is_some_and(|id| message_ids.contains(id));
        if !selected {
            kept.push(delivery.delivery_tag);
            continue;
        }
        let mut map = delivery
            .properties
            .headers()
            .as_ref()
            .map(|headers| headers.inner().clone())
            .unwrap_or_default();
        map.retain(|key, _| key.as_str() != REASON_HEADER && key.as_str() != ATTEMPTS_HEADER);
        map.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(1));
        map.insert(
            REPLAY_HEADER.into(),
            AMQPValue::LongString(run.as_str().into()),
        );
        let headers = FieldTable::from(map);
        let confirmation = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &delivery.data,
                delivery.properties.clone().with_headers(headers),
            )
            .await?
            .await?;
        anyhow::ensure!(
            confirmation == Confirmation::Ack(None),
            "the broker refused the replayed message"
        );
        channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await?;
        replayed += 1;
    }
    for tag in kept {
        channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            )
            .await?;
    }
    let _ = channel.close(200, "OK".into()).await;
    Ok(replayed)
}
