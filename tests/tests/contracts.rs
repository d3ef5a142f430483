//! The event contract as a team outside this repository meets it: a Python
//! consumer (pika, classes generated from `proto/` by protoc) bound to the
//! events exchange reads every event a checkout produces, and what it reads
//! is what `asyncapi.yaml` describes. Events from an older producer (without
//! a field added since) and from a newer one (with a field this build does
//! not know) are both handled, by the services and by that consumer.
//!
//! Needs `python3` with `tests/python/requirements.txt` installed.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use prost::Message;
use serde_json::Value as Json;
use shop_outbox::{Aggregate, EventContext};
use shop_proto::events::v1::{ProductCreated, ProductPriceChanged, UserRegistered};
use shop_proto::inventory::v1::ChangePriceRequest;
use shop_proto::order::v1::{CancelOrderRequest, OrderStatus};
use support::System;
use support::steps::{TIMEOUT, eur, place, product, register, request, wait_for};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// The committed contract, as a consumer reads it.
fn asyncapi() -> Result<Json> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../asyncapi.yaml"))?;
    Ok(serde_saphyr::from_str(&text)?)
}

/// `tests/python/consume.py`, running against the system's exchange. Its
/// output is read as it comes, so the consumer never blocks on a full pipe.
struct PythonConsumer {
    records: tokio::sync::mpsc::UnboundedReceiver<Result<Json>>,
    _child: Child,
    /// Every message read so far, by message id.
    seen: HashMap<String, Json>,
}

impl PythonConsumer {
    async fn start(system: &System) -> Result<Self> {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut child = Command::new("python3")
            .arg(format!("{root}/python/consume.py"))
            .args(["--amqp-url", &system.amqp_url])
            .args(["--exchange", &system.exchange])
            .args(["--proto-dir", &format!("{root}/../proto")])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting python3 tests/python/consume.py")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let (sender, mut records) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let record = match lines.next_line().await {
                    Ok(Some(line)) => serde_json::from_str::<Json>(&line)
                        .with_context(|| format!("the Python consumer printed {line:?}")),
                    Ok(None) => Err(anyhow::anyhow!(
                        "the Python consumer exited (pip install -r tests/python/requirements.txt)"
                    )),
                    Err(error) => Err(error.into()),
                };
                let last = record.is_err();
                if sender.send(record).is_err() || last {
                    return;
                }
            }
        });
        let ready = tokio::time::timeout(TIMEOUT, records.recv())
            .await
            .context("the Python consumer to bind its queue")?
            .context("the Python consumer's output")??;
        anyhow::ensure!(ready["ready"] == true, "the Python consumer said {ready}");
        Ok(Self {
            records,
            _child: child,
            seen: HashMap::new(),
        })
    }

    /// Reads until `done` holds for what was seen, or fails after
    /// [`TIMEOUT`] with `what`.
    async fn read_until(
        &mut self,
        what: &str,
        mut done: impl AsyncFnMut(&HashMap<String, Json>) -> Result<bool>,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while !done(&self.seen).await? {
            if tokio::time::Instant::now() >= deadline {
                bail!("timed out waiting for {what}");
            }
            let record = tokio::time::timeout(Duration::from_millis(500), self.records.recv())
                .await
                .ok();
            if let Some(record) = record {
                let record = record.context("the Python consumer's output")??;
                let id = record["message_id"].as_str().context("message_id")?;
                self.seen.insert(id.to_owned(), record);
            }
        }
        Ok(())
    }
}

/// Every row of the five outboxes: message id → (source, event type).
async fn outboxes(system: &System) -> Result<BTreeMap<String, (String, String)>> {
    let mut rows = BTreeMap::new();
    for (service, db) in [
        ("order", &system.order_db),
        ("inventory", &system.inventory_db),
        ("payment", &system.payment_db),
        ("notification", &system.notification_db),
        ("user", &system.user_db),
    ] {
        let found: Vec<(String, String)> =
            sqlx::query_as("SELECT message_id::text, event_type FROM outbox")
                .fetch_all(&db.pool)
                .await?;
        for (id, event_type) in found {
            rows.insert(id, (format!("{service}-service"), event_type));
        }
    }
    Ok(rows)
}

/// (producer, event type) for every operation that sends to the exchange.
fn documented_publications(document: &Json) -> Result<BTreeSet<(String, String)>> {
    let messages = document["components"]["messages"]
        .as_object()
        .context("components.messages")?;
    let mut publications = BTreeSet::new();
    for message in messages.values() {
        let name = message["name"].as_str().context("message name")?;
        for producer in message["x-producers"].as_array().context("x-producers")? {
            publications.insert((
                producer.as_str().context("producer")?.to_owned(),
                name.into(),
            ));
        }
    }
    Ok(publications)
}

#[tokio::test]
async fn a_python_consumer_decodes_every_event_of_a_checkout_as_the_asyncapi_document_describes()
-> Result<()> {
    let document = asyncapi()?;
    let documented = documented_publications(&document)?;
    let header_schema = &document["components"]["schemas"]["EventHeaders"];
    let system = System::start().await?;
    let mut python = PythonConsumer::start(&system).await?;

    // Every kind of event: a customer, a product and its new price; a paid
    // order that staff then take back (refund); an order for more than the
    // stock; and an order whose payment is declined.
    let customer = register(&system, "contracts@example.com").await?;
    let lamp = product(&system, "LAMP", 1500, 3).await?;
    system
        .inventory
        .clone()
        .change_price(ChangePriceRequest {
            product_id: lamp.clone(),
            unit_price: eur(1800),
        })
        .await?;
    let tv = product(&system, "TV", support::DECLINE_ABOVE, 5).await?;
    let paid = place(&system, request(&customer, &[(&lamp, 1)], "paid")).await?;
    wait_for(&system, &paid.order_id, OrderStatus::Confirmed).await?;
    system
        .order
        .clone()
        .cancel_order(CancelOrderRequest {
            order_id: paid.order_id.clone(),
        })
        .await?;
    let short = place(&system, request(&customer, &[(&lamp, 50)], "short")).await?;
    let declined = place(&system, request(&customer, &[(&tv, 2)], "declined")).await?;
    for order in [&paid, &short, &declined] {
        wait_for(&system, &order.order_id, OrderStatus::Cancelled).await?;
    }

    // The consumer has read every event the outboxes hold, and together
    // they are every publication the document names.
    let mut published = BTreeMap::new();
    let mut unread = Vec::new();
    python
        .read_until(
            "every outbox row and every documented event",
            async |seen| {
                published = outboxes(&system).await?;
                unread = published
                    .iter()
                    .filter(|(id, _)| !seen.contains_key(*id))
                    .map(|(id, (source, event_type))| format!("{id} ({source} {event_type})"))
                    .collect();
                let observed: BTreeSet<(String, String)> = published.values().cloned().collect();
                Ok(unread.is_empty() && observed == documented)
            },
        )
        .await
        .with_context(|| {
            let observed: BTreeSet<(String, String)> = published.values().cloned().collect();
            format!(
                "documented but not published: {:?}; published but not documented: {:?}; \
                 in an outbox but not read by the consumer: {unread:?}",
                documented.difference(&observed).collect::<Vec<_>>(),
                observed.difference(&documented).collect::<Vec<_>>()
            )
        })?;

    let allowed: BTreeSet<&str> = header_schema["properties"]
        .as_object()
        .context("header properties")?
        .keys()
        .map(String::as_str)
        .collect();
    let required: Vec<&str> = header_schema["required"]
        .as_array()
        .context("required headers")?
        .iter()
        .filter_map(Json::as_str)
        .collect();
    for (id, (source, event_type)) in &published {
        let record = &python.seen[id];
        let short = event_type.rsplit('.').next().unwrap_or_default();
        let message = &document["components"]["messages"][short];
        let headers = record["headers"].as_object().context("headers")?;
        assert!(record.get("error").is_none(), "{event_type}: {record}");
        assert_eq!(record["routing_key"], event_type.as_str(), "{record}");
        assert_eq!(record["type"], event_type.as_str(), "{record}");
        assert_eq!(record["app_id"], source.as_str(), "{record}");
        assert_eq!(record["content_type"], message["contentType"], "{record}");
        assert_eq!(headers["cloudEvents_specversion"], "1.0", "{record}");
        assert_eq!(headers["cloudEvents_id"], id.as_str(), "{record}");
        assert_eq!(headers["cloudEvents_type"], event_type.as_str(), "{record}");
        assert_eq!(headers["cloudEvents_source"], source.as_str(), "{record}");
        assert_eq!(
            headers["cloudEvents_subject"], headers["aggregate_id"],
            "{record}"
        );
        assert_eq!(
            headers["aggregate_type"], message["x-aggregate"],
            "{record}"
        );
        for name in headers.keys() {
            assert!(
                allowed.contains(name.as_str()),
                "undocumented header {name}"
            );
        }
        for name in &required {
            assert!(headers.contains_key(*name), "{event_type} lacks {name}");
        }
        assert_eq!(record["unknown_fields"], 0, "{record}");
    }
    // Every header the relay is documented to write was written (those
    // starting with x- come only with retries, dead letters and replays).
    let written: BTreeSet<&str> = published
        .keys()
        .flat_map(|id| python.seen[id]["headers"].as_object())
        .flat_map(|headers| headers.keys().map(String::as_str))
        .collect();
    for name in allowed.iter().filter(|name| !name.starts_with("x-")) {
        assert!(
            written.contains(name),
            "no event carried the documented header {name}"
        );
    }

    // The payloads decode to what happened.
    let of_type = |event_type: &str| -> Vec<&Json> {
        python
            .seen
            .values()
            .filter(|record| record["type"] == event_type)
            .map(|record| &record["payload"])
            .collect()
    };
    let placed = of_type("shop.events.v1.OrderPlaced");
    let first = placed
        .iter()
        .find(|payload| payload["order_id"] == paid.order_id.as_str())
        .context("OrderPlaced of the paid order")?;
    assert_eq!(first["customer_id"], customer.as_str());
    assert_eq!(first["lines"][0]["product_id"], lamp.as_str());
    assert_eq!(first["lines"][0]["quantity"], 1);
    let total = paid.total.as_ref().context("total")?;
    assert_eq!(
        first["total"]["amount_minor"],
        total.amount_minor.to_string(),
        "int64 as a JSON string"
    );
    let refunded = of_type("shop.events.v1.PaymentRefunded");
    assert_eq!(refunded.len(), 1);
    assert_eq!(refunded[0]["order_id"], paid.order_id.as_str());
    assert_eq!(refunded[0]["amount"]["currency"], "EUR");
    let failed = of_type("shop.events.v1.InventoryReservationFailed");
    assert_eq!(failed[0]["short_items"][0]["requested"], 50);
    system.stop().await
}

/// Appends field 15 (a string, unknown to this build) to an encoding, as a
/// newer producer that added a field would send it.
fn with_newer_field(mut encoded: Vec<u8>) -> Vec<u8> {
    let value = b"added by a newer producer";
    encoded.push((15 << 3) | 2);
    encoded.push(value.len() as u8);
    encoded.extend_from_slice(value);
    encoded
}

#[tokio::test]
async fn events_from_an_older_and_a_newer_producer_are_both_handled() -> Result<()> {
    let system = System::start().await?;
    let mut python = PythonConsumer::start(&system).await?;
    let customer = Uuid::now_v7().to_string();
    let product = Uuid::now_v7().to_string();

    // What other versions of the user and inventory services write: a
    // customer with a field added after this build, a product created
    // before catalog versions existed (no `version`), and a price change
    // with a version and a field added after this build.
    let user = with_newer_field(
        UserRegistered {
            user_id: customer.clone(),
            name: "Newer Producer".into(),
            email: "newer@example.com".into(),
        }
        .encode_to_vec(),
    );
    let created = ProductCreated {
        product_id: product.clone(),
        sku: "OLD-1".into(),
        name: "From an older producer".into(),
        unit_price: eur(1234),
        version: 0,
    }
    .encode_to_vec();
    let repriced = with_newer_field(
        ProductPriceChanged {
            product_id: product.clone(),
            old_price: eur(1234),
            new_price: eur(1500),
            version: 2,
        }
        .encode_to_vec(),
    );
    let mut ids = Vec::new();
    for (db, kind, key, event_type, payload) in [
        (
            &system.user_db,
            "user",
            &customer,
            "shop.events.v1.UserRegistered",
            user,
        ),
        (
            &system.inventory_db,
            "product",
            &product,
            "shop.events.v1.ProductCreated",
            created,
        ),
        (
            &system.inventory_db,
            "product",
            &product,
            "shop.events.v1.ProductPriceChanged",
            repriced,
        ),
    ] {
        let mut tx = db.pool.begin().await?;
        let record = shop_outbox::enqueue_raw(
            &mut tx,
            Aggregate::new(kind, key),
            event_type,
            &payload,
            shop_outbox::PROTOBUF_CONTENT_TYPE,
            &EventContext::default(),
        )
        .await?;
        tx.commit().await?;
        ids.push(record.message_id.to_string());
    }

    // The order service took the customer and the product at the newer
    // price: an order for two is priced at 2 × 15.00.
    shop_tests::eventually(TIMEOUT, "the order service to apply the price", || async {
        let applied: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM inbox WHERE event_type = 'shop.events.v1.ProductPriceChanged'",
        )
        .fetch_one(&system.order_db.pool)
        .await?;
        Ok((applied == 1).then_some(()))
    })
    .await?;
    let order = place(&system, request(&customer, &[(&product, 2)], "compat")).await?;
    assert_eq!(order.total, eur(3000));

    // The Python consumer decoded all three, kept the unknown field aside,
    // and read the missing version as 0.
    python
        .read_until("the three events", async |seen| {
            Ok(ids.iter().all(|id| seen.contains_key(id)))
        })
        .await?;
    let records: Vec<&Json> = ids.iter().map(|id| &python.seen[id]).collect();
    assert_eq!(records[0]["payload"]["email"], "newer@example.com");
    assert_eq!(records[0]["unknown_fields"], 1);
    assert_eq!(records[1]["payload"]["unit_price"]["amount_minor"], "1234");
    assert!(
        records[1]["payload"].get("version").is_none(),
        "absent means 0"
    );
    assert_eq!(records[1]["unknown_fields"], 0);
    assert_eq!(records[2]["payload"]["version"], "2");
    assert_eq!(records[2]["unknown_fields"], 1);
    system.stop().await
}
