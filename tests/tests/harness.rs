//! The harness itself: each test's database and broker names are real,
//! isolated, and gone when the test ends.

use anyhow::Result;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use shop_outbox::{Aggregate, EventContext};
use shop_tests::{TestBroker, TestDatabase, servers};
use sqlx::Connection as _;

#[tokio::test]
async fn a_test_database_is_migrated_writable_and_dropped_afterwards() -> Result<()> {
    let db = TestDatabase::create(&shop_outbox::MIGRATOR).await?;
    let mut tx = db.pool.begin().await?;
    let event = shop_proto::events::v1::UserRegistered {
        user_id: uuid::Uuid::new_v4().to_string(),
        name: "Ada".into(),
        email: "ada@example.com".into(),
    };
    let record = shop_outbox::enqueue(
        &mut tx,
        Aggregate::new("user", &event.user_id),
        &event,
        &EventContext::default(),
    )
    .await?;
    tx.commit().await?;

    let (event_type, payload): (String, Vec<u8>) =
        sqlx::query_as("SELECT event_type, payload FROM outbox WHERE message_id = $1")
            .bind(record.message_id)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(event_type, "shop.events.v1.UserRegistered");
    let decoded: shop_proto::events::v1::UserRegistered = prost::Message::decode(&payload[..])?;
    assert_eq!(decoded, event);

    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&db.pool)
        .await?;
    drop(db);
    let mut admin = sqlx::PgConnection::connect(&servers().await.database_url).await?;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_one(&mut admin)
        .await?;
    assert_eq!(left, 0, "the test database outlived its test");
    Ok(())
}

#[tokio::test]
async fn broker_names_carry_a_message_and_are_deleted_afterwards() -> Result<()> {
    let broker = TestBroker::new().await;
    let queue = broker.name("inbox");
    let conn = broker.connect().await?;
    let channel = conn.create_channel().await?;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"hello",
            BasicProperties::default(),
        )
        .await?
        .await?;
    assert_eq!(confirm, lapin::Confirmation::Ack(None));
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let delivery = consumer.next().await.expect("a delivery")?;
    assert_eq!(delivery.data, b"hello");
    delivery.ack(BasicAckOptions::default()).await?;
    conn.close(200, "OK".into()).await?;

    drop(broker);
    let conn = lapin::Connection::connect(&servers().await.amqp_url, Default::default()).await?;
    let channel = conn.create_channel().await?;
    let passive = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(passive.is_err(), "the test queue outlived its test");
    Ok(())
}
