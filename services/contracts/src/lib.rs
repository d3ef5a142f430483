//! The event contract as an AsyncAPI 3 document, generated from the code:
//! - which service publishes which event type, on which routing key of the
//!   topic exchange, in order per which aggregate (each service's
//!   `publishes()`);
//! - which queues each consumer declares, with their arguments, the routing
//!   keys bound to its work queue, and its retry and dead-letter queues (each
//!   subscriber's [`Topology`], the one it declares at start-up);
//! - each payload's protobuf schema ([`proto`]), and the headers every
//!   message carries.
//!
//! `asyncapi.yaml` at the repository root is [`yaml`]'s output for the
//! default settings (`shop-asyncapi --write asyncapi.yaml`); a test fails
//! when the two differ, and another checks, on real servers, that what the
//! checkout publishes is what the document says.

pub mod proto;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use lapin::types::{AMQPValue, FieldTable};
use serde::{Serialize, Serializer};
use serde_json::{Map, Value, json};
use shop_outbox::{PROTOBUF_CONTENT_TYPE, Publication};
use shop_subscriber::dlq::REPLAY_HEADER;
use shop_subscriber::subscriber::{
    ATTEMPT_HEADER, ATTEMPTS_HEADER, ORIGINAL_QUEUE_HEADER, ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
};
use shop_subscriber::topology::{QueueDeclaration, QueueRole};
use shop_subscriber::{QueueKind, SubscriberSettings, Topology};

/// AsyncAPI's name for protobuf schemas.
pub const PROTOBUF_SCHEMA_FORMAT: &str = "application/vnd.google.protobuf;version=3";
/// Version of the AMQP bindings objects used.
const AMQP_BINDING_VERSION: &str = "0.3.0";

/// One service's side of the contract.
#[derive(Debug, Clone)]
pub struct Service {
    /// Short name, for example `order`.
    pub name: &'static str,
    /// The events it writes to its outbox.
    pub publishes: Vec<Publication>,
    /// Its subscribers' queues and bindings.
    pub subscribes: Vec<Topology>,
}

impl Service {
    /// Its relay's CloudEvents `source` (and AMQP `app_id`), as the
    /// deployments in this repository set it.
    pub fn source(&self) -> String {
        format!("{}-service", self.name)
    }
}

/// The five services as built with `settings`. Builds each subscriber the
/// way the service does, on a pool that never connects; call it inside a
/// Tokio runtime.
pub fn services(settings: &SubscriberSettings) -> Result<Vec<Service>> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://localhost/unused")
        .context("a lazy pool")?;
    let topology = |subscriber: shop_subscriber::Subscriber| subscriber.topology().clone();
    Ok(vec![
        Service {
            name: "order",
            publishes: order_service::publishes(),
            subscribes: order_service::events::subscribers(settings.clone(), pool.clone())
                .into_iter()
                .map(topology)
                .collect(),
        },
        Service {
            name: "inventory",
            publishes: inventory_service::publishes(),
            subscribes: vec![topology(inventory_service::events::subscriber(
                settings.clone(),
                pool.clone(),
            ))],
        },
        Service {
            name: "payment",
            publishes: payment_service::publishes(),
            subscribes: vec![topology(payment_service::events::subscriber(
                settings.clone(),
                pool.clone(),
                Arc::new(payment_service::provider::SimulatedProvider::new(0)),
            ))],
        },
        Service {
            name: "notification",
            publishes: notification_service::publishes(),
            subscribes: vec![topology(notification_service::events::subscriber(
                settings.clone(),
                pool.clone(),
                Arc::new(notification_service::channel::LogChannel),
            ))],
        },
        Service {
            name: "user",
            publishes: user_service::publishes(),
            subscribes: vec![topology(user_service::events::subscriber(
                settings.clone(),
                pool,
            ))],
        },
    ])
}

/// The subscriber settings every service starts with when none are given,
/// whatever this process's environment says.
pub fn default_settings() -> SubscriberSettings {
    let mut settings = SubscriberSettings::new("amqp://localhost:5672/%2f");
    settings.exchange = shop_subscriber::settings::DEFAULT_EXCHANGE.to_owned();
    settings.queue_prefix = String::new();
    settings.queue_kind = QueueKind::Quorum;
    settings.max_attempts = shop_subscriber::settings::DEFAULT_MAX_ATTEMPTS;
    settings
}

/// `asyncapi.yaml` for the default settings.
pub fn yaml() -> Result<String> {
    let services = services(&default_settings())?;
    let document = document(&services)?;
    Ok(serde_saphyr::to_string(&Sorted(&document))?)
}

/// Short name of an event type: `shop.events.v1.OrderPlaced` → `OrderPlaced`.
pub fn short_name(event_type: &str) -> &str {
    event_type.rsplit('.').next().unwrap_or(event_type)
}

/// A channel, operation or component id made of the characters AsyncAPI
/// allows in them.
fn id(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The header names the relay and the subscribers write, with their
/// schemas: CloudEvents attributes (AMQP binding), ordering and tracing
/// headers, and those a retry or a dead-letter adds.
pub fn headers_schema() -> Value {
    let text = |description: &str| json!({"type": "string", "description": description});
    let old = |attribute: &str| {
        json!({
            "type": "string",
            "deprecated": true,
            "description": format!(
                "The same value as cloudEvents_{attribute}, under the CloudEvents HTTP binding's \
                 name that relays wrote before; written for one more release, for subscribers \
                 not upgraded yet. Read cloudEvents_{attribute}."
            ),
        })
    };
    json!({
        "type": "object",
        "description": "AMQP headers (application properties) of every event. The CloudEvents \
            attributes follow the CloudEvents AMQP binding, binary content mode: the body is the \
            event's protobuf encoding and the AMQP content_type is its datacontenttype \
            (application/x-protobuf). The AMQP properties also carry message_id (the \
            cloudEvents_id, the key to deduplicate by), type (the cloudEvents_type, also the \
            routing key), app_id (the producer), correlation_id (shared by every event of one \
            checkout), timestamp, and delivery_mode 2 (persistent).",
        "required": [
            "cloudEvents_specversion", "cloudEvents_id", "cloudEvents_source",
            "cloudEvents_type", "cloudEvents_time", "cloudEvents_subject",
            "aggregate_type", "aggregate_id"
        ],
        "properties": {
            "cloudEvents_specversion": {"type": "string", "const": "1.0", "description": "CloudEvents version."},
            "cloudEvents_id": {"type": "string", "format": "uuid", "description": "The event's unique id (UUIDv7), equal to the AMQP message_id. A redelivered or republished event keeps it."},
            "cloudEvents_source": text("The producing service, for example order-service; equal to the AMQP app_id."),
            "cloudEvents_type": text("The event's full protobuf name, for example shop.events.v1.OrderPlaced; equal to the routing key and the AMQP type."),
            "cloudEvents_time": {"type": "string", "format": "date-time", "description": "When the event was written, in the same transaction as the change it reports (RFC 3339, microseconds, UTC)."},
            "cloudEvents_subject": text("The aggregate id (the aggregate_id header): events of one aggregate are published in the order they were written."),
            "aggregate_type": text("Kind of aggregate the event belongs to (x-aggregate of its message)."),
            "aggregate_id": text("Id of that aggregate; order is kept per aggregate."),
            "traceparent": text("W3C trace context of the request or message that caused the event."),
            "causation_id": {"type": "string", "format": "uuid", "description": "Message id of the event that caused this one; absent on events caused by an API call."},
            "ce-specversion": old("specversion"),
            "ce-id": old("id"),
            "ce-source": old("source"),
            "ce-type": old("type"),
            "ce-time": old("time"),
            ATTEMPT_HEADER: {"type": "integer", "description": "Set by a subscriber when it sends a message to a retry queue: the attempt the message will be on when it comes back (2 for the first retry); kept on a dead letter, and set to 1 again by a replay. Absent means 1."},
            REASON_HEADER: text("On a dead-lettered message: why it failed for good."),
            ATTEMPTS_HEADER: {"type": "integer", "description": "On a dead-lettered message: the attempts made."},
            ORIGINAL_QUEUE_HEADER: text("On a dead-lettered message: the work queue it failed in."),
            ORIGINAL_ROUTING_KEY_HEADER: text("On a retried or dead-lettered message: its routing key on the events exchange (it comes back from a retry queue under the work queue's name)."),
            REPLAY_HEADER: text("On a message shop-dlq replayed: the id of the replay run, so a run stops when it meets its own messages again."),
        },
        "additionalProperties": {
            "description": "Headers the broker adds: x-death, x-first-death-* and x-last-death-* on a message that was dead-lettered by the broker (back from a retry queue, or sent to the dead-letter queue by a quorum queue's delivery limit).",
        }
    })
}

fn message(event_type: &str, aggregate: &str, producers: &[String]) -> Result<Value> {
    let short = short_name(event_type);
    let schema = proto::schema(short)
        .with_context(|| format!("{event_type} is not a message of events.proto"))?;
    Ok(json!({
        "name": event_type,
        "title": short,
        "summary": proto::summary(short).unwrap_or_default(),
        "contentType": PROTOBUF_CONTENT_TYPE,
        "headers": {"$ref": "#/components/schemas/EventHeaders"},
        "payload": {"schemaFormat": PROTOBUF_SCHEMA_FORMAT, "schema": schema},
        "bindings": {"amqp": {"messageType": event_type, "bindingVersion": AMQP_BINDING_VERSION}},
        "x-aggregate": aggregate,
        "x-producers": producers,
    }))
}

fn arguments(table: &FieldTable) -> Value {
    let mut arguments = Map::new();
    for (key, value) in table.inner() {
        let value = match value {
            AMQPValue::LongString(text) => {
                Value::String(String::from_utf8_lossy(text.as_bytes()).into_owned())
            }
            AMQPValue::ShortString(text) => Value::String(text.to_string()),
            AMQPValue::LongLongInt(n) => json!(n),
            AMQPValue::LongInt(n) => json!(n),
            AMQPValue::LongUInt(n) => json!(n),
            AMQPValue::Boolean(b) => json!(b),
            other => Value::String(format!("{other:?}")),
        };
        arguments.insert(key.to_string(), value);
    }
    Value::Object(arguments)
}

fn queue_channel(
    topology: &Topology,
    declaration: &QueueDeclaration,
    consumer: &str,
    messages: &Map<String, Value>,
) -> Value {
    let description = match declaration.role {
        QueueRole::Work => format!(
            "Work queue of {consumer}'s subscriber `{}` (its inbox key), bound to the {} \
             exchange by the routing keys in x-bindings. A message that fails waits in a \
             retry queue ({} for the first failure, and so on) for a back-off, and after {} \
             attempts goes to {}.",
            topology.consumer,
            topology.exchange,
            topology.retry_queue(1),
            topology.max_attempts,
            topology.dead_letter_queue()
        ),
        QueueRole::Retry { failures } => format!(
            "Holds {consumer}'s messages after their failure number {failures}, each with a \
             per-message expiration (the back-off); the broker then dead-letters them through \
             the default exchange straight back to {}, so no other subscriber sees the retry.",
            topology.queue
        ),
        QueueRole::DeadLetter => format!(
            "Messages {consumer} failed on for good, with headers saying why \
             ({REASON_HEADER}, {ATTEMPTS_HEADER}, {ORIGINAL_QUEUE_HEADER}), and messages the \
             work queue dead-lettered itself after its delivery limit (a message that keeps \
             crashing the consumer before it can be acknowledged; these carry the broker's \
             x-death headers instead). `shop-dlq` lists and replays them."
        ),
    };
    let mut channel = json!({
        "address": declaration.name,
        "description": description,
        "messages": messages,
        "bindings": {"amqp": {
            "is": "queue",
            "queue": {"name": declaration.name, "durable": true, "exclusive": false, "autoDelete": false, "vhost": "/"},
            "bindingVersion": AMQP_BINDING_VERSION,
        }},
        "x-arguments": arguments(&declaration.arguments),
    });
    if declaration.role == QueueRole::Work {
        let bindings: Vec<Value> = topology
            .routing_keys
            .iter()
            .map(|key| json!({"exchange": topology.exchange, "routingKey": key}))
            .collect();
        channel["x-bindings"] = Value::Array(bindings);
        if !topology.retired_keys.is_empty() {
            channel["x-retired-bindings"] = json!(topology.retired_keys);
            channel["description"] = Value::String(format!(
                "{description} The routing keys in x-retired-bindings were bound here by \
                 earlier versions; the subscriber removes those bindings at start-up and still \
                 handles what is left queued under them."
            ));
        }
    }
    channel
}

/// The AsyncAPI 3 document for `services`.
pub fn document(services: &[Service]) -> Result<Value> {
    let exchange = services
        .iter()
        .flat_map(|service| &service.subscribes)
        .map(|topology| topology.exchange.clone())
        .next()
        .context("no subscriber names the exchange")?;

    let mut producers: BTreeMap<&str, (Vec<String>, &str)> = BTreeMap::new();
    for service in services {
        for publication in &service.publishes {
            let entry = producers
                .entry(publication.event_type.as_str())
                .or_insert_with(|| (Vec::new(), publication.aggregate));
            anyhow::ensure!(
                entry.1 == publication.aggregate,
                "{} is published on {} and on {} aggregates",
                publication.event_type,
                entry.1,
                publication.aggregate
            );
            entry.0.push(service.source());
        }
    }

    let mut messages = Map::new();
    let mut channels = Map::new();
    let mut operations = Map::new();
    for (event_type, (sources, aggregate)) in &producers {
        let short = short_name(event_type);
        anyhow::ensure!(
            !messages.contains_key(short),
            "two published event types are named {short}"
        );
        messages.insert(short.to_owned(), message(event_type, aggregate, sources)?);
        channels.insert(
            id(short),
            json!({
                "address": event_type,
                "title": format!("{short} on {exchange}"),
                "description": format!(
                    "{short} events, published by {} to the {exchange} topic exchange with \
                     routing key {event_type}, at least once and in order per {aggregate}.",
                    sources.join(", ")
                ),
                "messages": {short: {"$ref": format!("#/components/messages/{short}")}},
                "bindings": {"amqp": {
                    "is": "routingKey",
                    "exchange": {"name": exchange, "type": "topic", "durable": true, "autoDelete": false, "vhost": "/"},
                    "bindingVersion": AMQP_BINDING_VERSION,
                }},
            }),
        );
    }
    for service in services {
        for publication in &service.publishes {
            let short = short_name(&publication.event_type);
            operations.insert(
                id(&format!("{}_publishes_{short}", service.source())),
                json!({
                    "action": "send",
                    "title": format!("{} publishes {short}", service.source()),
                    "summary": "Written to the service's outbox in the transaction of the change it reports; its outbox-relay publishes it with publisher confirms.",
                    "channel": {"$ref": format!("#/channels/{}", id(short))},
                    "messages": [{"$ref": format!("#/channels/{}/messages/{short}", id(short))}],
                }),
            );
        }
        for topology in &service.subscribes {
            let consumer = service.source();
            let mut handled = Map::new();
            // The bound types, and those a retired binding may have left
            // queued, which the subscriber still handles.
            for key in topology.routing_keys.iter().chain(&topology.retired_keys) {
                let short = short_name(key);
                if messages.get(short).map(|message| &message["name"]) != Some(&json!(key)) {
                    anyhow::bail!(
                        "{consumer} binds {key} to {}, but no service publishes it",
                        topology.queue
                    );
                }
                handled.insert(
                    short.to_owned(),
                    json!({"$ref": format!("#/components/messages/{short}")}),
                );
            }
            for declaration in topology.declarations() {
                let channel_id = id(&declaration.name);
                channels.insert(
                    channel_id.clone(),
                    queue_channel(topology, &declaration, &consumer, &handled),
                );
                let refs: Vec<Value> = handled
                    .keys()
                    .map(|short| json!({"$ref": format!("#/channels/{channel_id}/messages/{short}")}))
                    .collect();
                let (verb, action, summary) = match declaration.role {
                    QueueRole::Work => (
                        "consumes",
                        "receive",
                        "Each message is applied once: its id is recorded in the consumer's inbox in the transaction of the handler's effect, and acknowledged after that commits.",
                    ),
                    QueueRole::Retry { .. } => (
                        "retries-through",
                        "send",
                        "A message whose handler failed is published here (default exchange) and acknowledged on the work queue.",
                    ),
                    QueueRole::DeadLetter => (
                        "dead-letters-to",
                        "send",
                        "A message that failed for good, or cannot be decoded, is published here (default exchange) and acknowledged on the work queue.",
                    ),
                };
                operations.insert(
                    id(&format!("{consumer}_{verb}_{}", declaration.name)),
                    json!({
                        "action": action,
                        "title": format!("{consumer} {} {}", verb.replace('-', " "), declaration.name),
                        "summary": summary,
                        "channel": {"$ref": format!("#/channels/{channel_id}")},
                        "messages": refs,
                    }),
                );
            }
        }
    }

    Ok(json!({
        "asyncapi": "3.1.0",
        "info": {
            "title": "Shop checkout events",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "Every domain event of the checkout, on the {exchange} topic exchange of \
                 RabbitMQ. Each service writes its events to an outbox table in the transaction \
                 of the change they report; its outbox-relay publishes them at least once, in \
                 order per aggregate, with publisher confirms. The routing key and the AMQP type \
                 are the event's full protobuf name. Consumers deduplicate by message id. \
                 Payload schemas are cut from proto/shop/events/v1/events.proto, with \
                 shop.types.v1.Money copied in as Money (the same message on the wire). This \
                 document is generated from the services' code (shop-asyncapi); do not edit it \
                 by hand."
            ),
            "license": {"name": "MIT OR Apache-2.0"},
        },
        "defaultContentType": PROTOBUF_CONTENT_TYPE,
        "servers": {
            "local": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0-9-1",
                "description": "The broker of shop-local and docker compose (vhost /).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": {"EventHeaders": headers_schema()},
        },
    }))
}

/// Serialises a JSON value with every object's keys sorted, so the
/// document's text depends on nothing but its content.
struct Sorted<'a>(&'a Value);

impl Serialize for Sorted<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self.0 {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                let mut out = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    out.serialize_entry(key, &Sorted(value))?;
                }
                out.end()
            }
            Value::Array(items) => {
                let mut out = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    out.serialize_element(&Sorted(item))?;
                }
                out.end()
            }
            other => other.serialize(serializer),
        }
    }
}
