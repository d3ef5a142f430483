//! The checkout end to end: five services, their relays, real PostgreSQL and
//! RabbitMQ. Each test runs its own copy of the whole system.

mod support;

use std::time::Duration;

use anyhow::Result;
use futures_util::StreamExt;
use shop_proto::inventory::v1::{CreateProductRequest, GetStockRequest, Stock};
use shop_proto::notification::v1::ListNotificationsRequest;
use shop_proto::order::v1::{
    CancelOrderRequest, GetOrderRequest, OrderStatus, PlaceOrderRequest, WatchOrderRequest,
};
use shop_proto::payment::v1::{GetPaymentRequest, PaymentStatus};
use shop_proto::types::v1::Money;
use shop_proto::user::v1::{GetPurchaseHistoryRequest, RegisterUserRequest};
use shop_server::auth::signed;
use shop_tests::eventually;
use support::steps::{TIMEOUT, eur, place, product, register, request, wait_for};
use support::{Options, System};
use tonic::Code;
use tonic_types::StatusExt;

async fn stock(system: &System, product_id: &str) -> Result<Stock> {
    Ok(system
        .inventory
        .clone()
        .get_stock(GetStockRequest {
            product_id: product_id.into(),
        })
        .await?
        .into_inner()
        .stock
        .unwrap())
}

async fn wait_for_stock(
    system: &System,
    product_id: &str,
    on_hand: i32,
    reserved: i32,
) -> Result<Stock> {
    eventually(TIMEOUT, "stock levels", || async {
        let stock = stock(system, product_id).await?;
        Ok((stock.on_hand == on_hand && stock.reserved == reserved).then_some(stock))
    })
    .await
}

/// The field an INVALID_ARGUMENT answer names (its first violation).
fn violated_field(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .expect("a BadRequest detail")
        .field_violations[0]
        .field
        .clone()
}

async fn notifications_for(system: &System, order_id: &str) -> Result<Vec<String>> {
    eventually(TIMEOUT, "a notification", || {
        let mut client = system.notification.clone();
        let order_id = order_id.to_owned();
        async move {
            let list = client
                .list_notifications(ListNotificationsRequest {
                    order_id,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .notifications;
            Ok((!list.is_empty()).then(|| list.into_iter().map(|n| n.body).collect()))
        }
    })
    .await
}

#[tokio::test]
async fn a_paid_order_is_confirmed_watched_live_committed_notified_and_in_the_purchase_history()
-> Result<()> {
    let system = System::start().await?;
    let customer = register(&system, "ada@example.com").await?;
    let mug = product(&system, "MUG", 1250, 10).await?;

    let order = place(&system, request(&customer, &[(&mug, 2)], "checkout-1")).await?;
    assert_eq!(order.total, eur(2500));
    let mut watch = system
        .order
        .clone()
        .watch_order(WatchOrderRequest {
            order_id: order.order_id.clone(),
        })
        .await?
        .into_inner();
    let mut seen = Vec::new();
    while let Some(update) = tokio::time::timeout(TIMEOUT, watch.message()).await?? {
        seen.push(update.order.unwrap().status());
    }
    assert_eq!(seen.first(), Some(&OrderStatus::Pending), "{seen:?}");
    assert_eq!(seen.last(), Some(&OrderStatus::Confirmed), "{seen:?}");

    wait_for_stock(&system, &mug, 8, 0).await?;
    let payment = system
        .payment
        .clone()
        .get_payment(GetPaymentRequest {
            order_id: order.order_id.clone(),
        })
        .await?
        .into_inner()
        .payment
        .unwrap();
    assert_eq!(payment.status(), PaymentStatus::Succeeded);
    assert_eq!(payment.amount, eur(2500));
    let notes = notifications_for(&system, &order.order_id).await?;
    assert!(notes[0].contains("is confirmed"), "{notes:?}");
    let history = eventually(TIMEOUT, "the purchase history", || {
        let mut client = system.user.clone();
        let user_id = customer.clone();
        async move {
            let purchases = client
                .get_purchase_history(GetPurchaseHistoryRequest {
                    user_id,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .purchases;
            Ok((!purchases.is_empty()).then_some(purchases))
        }
    })
    .await?;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].order_id, order.order_id);
    assert_eq!(history[0].item_count, 2);
    assert_eq!(history[0].total, eur(2500));

    let steps = eventually(TIMEOUT, "the saga history", || async {
        let order = system
            .order
            .clone()
            .get_order(GetOrderRequest {
                order_id: order.order_id.clone(),
            })
            .await?
            .into_inner()
            .order
            .unwrap();
        let steps: Vec<String> = order.history.iter().map(|h| h.event_type.clone()).collect();
        Ok((steps.len() >= 6).then_some(steps))
    })
    .await?;
    for expected in [
        "OrderPlaced",
        "InventoryReserved",
        "PaymentSucceeded",
        "OrderConfirmed",
        "InventoryCommitted",
        "NotificationSent",
    ] {
        assert!(
            steps.iter().any(|s| s.ends_with(expected)),
            "{expected} missing from {steps:?}"
        );
    }
    system.stop().await
}

#[tokio::test]
async fn a_declined_payment_cancels_the_order_releases_the_stock_and_tells_the_customer()
-> Result<()> {
    let system = System::start().await?;
    let customer = register(&system, "big@example.com").await?;
    let tv = product(&system, "TV", support::DECLINE_ABOVE, 5).await?;

    let order = place(&system, request(&customer, &[(&tv, 2)], "big-1")).await?;
    let cancelled = wait_for(&system, &order.order_id, OrderStatus::Cancelled).await?;
    assert!(
        cancelled.cancel_reason.contains("payment declined"),
        "{}",
        cancelled.cancel_reason
    );
    wait_for_stock(&system, &tv, 5, 0).await?;
    let notes = notifications_for(&system, &order.order_id).await?;
    assert!(notes[0].contains("was cancelled"), "{notes:?}");
    system.stop().await
}

#[tokio::test]
async fn an_order_for_more_than_the_stock_is_cancelled_naming_the_short_item() -> Result<()> {
    let system = System::start().await?;
    let customer = register(&system, "many@example.com").await?;
    let pen = product(&system, "PEN", 100, 50).await?;
    let lamp = product(&system, "LAMP", 3000, 2).await?;

    let order = place(
        &system,
        request(&customer, &[(&pen, 1), (&lamp, 3)], "short-1"),
    )
    .await?;
    let cancelled = wait_for(&system, &order.order_id, OrderStatus::Cancelled).await?;
    assert!(
        cancelled.cancel_reason.contains("out of stock"),
        "{}",
        cancelled.cancel_reason
    );
    assert!(
        cancelled.cancel_reason.contains(&lamp),
        "the short item is named: {}",
        cancelled.cancel_reason
    );
    assert!(
        !cancelled.cancel_reason.contains(&pen),
        "{}",
        cancelled.cancel_reason
    );
    // Nothing was reserved, not even the line that was available.
    assert_eq!(stock(&system, &pen).await?.reserved, 0);
    assert_eq!(stock(&system, &lamp).await?.available, 2);
    notifications_for(&system, &order.order_id).await?;
    system.stop().await
}

#[tokio::test]
async fn a_customer_cancelling_a_pending_order_gets_the_reservation_released() -> Result<()> {
    // Without the payment service the order waits, reserved, for payment.
    let system = System::start_with(Options {
        without_payment: true,
        ..Options::default()
    })
    .await?;
    let customer = register(&system, "undecided@example.com").await?;
    let chair = product(&system, "CHAIR", 5000, 4).await?;

    let order = place(&system, request(&customer, &[(&chair, 3)], "cancel-1")).await?;
    wait_for_stock(&system, &chair, 4, 3).await?;
    let cancelled = system
        .order
        .clone()
        .cancel_order(CancelOrderRequest {
            order_id: order.order_id.clone(),
        })
        .await?
        .into_inner()
        .order
        .unwrap();
    assert_eq!(cancelled.status(), OrderStatus::Cancelled);
    wait_for_stock(&system, &chair, 4, 0).await?;

    let again = system
        .order
        .clone()
        .cancel_order(CancelOrderRequest {
            order_id: order.order_id.clone(),
        })
        .await;
    assert_eq!(again.unwrap_err().code(), Code::FailedPrecondition);
    system.stop().await
}

#[tokio::test]
async fn placing_the_same_order_twice_with_one_key_makes_one_order_and_moves_stock_once()
-> Result<()> {
    let system = System::start().await?;
    let customer = register(&system, "retry@example.com").await?;
    let book = product(&system, "BOOK", 900, 10).await?;

    let first = place(&system, request(&customer, &[(&book, 1)], "same-key")).await?;
    let second = place(&system, request(&customer, &[(&book, 1)], "same-key")).await?;
    assert_eq!(first.order_id, second.order_id);
    wait_for(&system, &first.order_id, OrderStatus::Confirmed).await?;
    wait_for_stock(&system, &book, 9, 0).await?;

    let other_body = system
        .order
        .clone()
        .place_order(request(&customer, &[(&book, 2)], "same-key"))
        .await;
    assert_eq!(other_body.unwrap_err().code(), Code::AlreadyExists);
    let placed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE event_type = 'shop.events.v1.OrderPlaced'",
    )
    .fetch_one(&system.order_db.pool)
    .await?;
    assert_eq!(placed, 1, "one OrderPlaced event");
    assert_eq!(stock(&system, &book).await?.on_hand, 9);
    system.stop().await
}

#[tokio::test]
async fn fifty_concurrent_orders_for_ten_units_confirm_exactly_ten() -> Result<()> {
    let system = System::start().await?;
    let customer = register(&system, "rush@example.com").await?;
    let console = product(&system, "CONSOLE", 30000, 10).await?;
    // Wait until orders are accepted at all, then fire the rest at once.
    let first = place(&system, request(&customer, &[(&console, 1)], "rush-0")).await?;

    let mut placing = Vec::new();
    for n in 1..50 {
        let mut client = system.order.clone();
        let request = request(&customer, &[(&console, 1)], &format!("rush-{n}"));
        placing.push(tokio::spawn(
            async move { client.place_order(request).await },
        ));
    }
    let mut ids = vec![first.order_id];
    for task in placing {
        ids.push(task.await??.into_inner().order.unwrap().order_id);
    }
    let mut confirmed = 0;
    for id in &ids {
        let order = eventually(TIMEOUT, "a final status", || {
            let mut client = system.order.clone();
            let order_id = id.clone();
            async move {
                let order = client
                    .get_order(GetOrderRequest { order_id })
                    .await?
                    .into_inner()
                    .order
                    .unwrap();
                Ok((order.status() != OrderStatus::Pending).then_some(order))
            }
        })
        .await?;
        if order.status() == OrderStatus::Confirmed {
            confirmed += 1;
        } else {
            assert!(
                order.cancel_reason.contains("out of stock"),
                "{}",
                order.cancel_reason
            );
        }
    }
    assert_eq!(confirmed, 10);
    let stock = wait_for_stock(&system, &console, 0, 0).await?;
    assert_eq!(stock.available, 0);
    system.stop().await
}

#[tokio::test]
async fn bad_requests_are_rejected_naming_the_field_and_write_nothing() -> Result<()> {
    let system = System::start().await?;
    let customer = register(&system, "careful@example.com").await?;
    let mut order = system.order.clone();

    let status = order
        .place_order(request(&customer, &[("not-a-uuid", 1)], "bad-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_field(&status), "lines[0].product_id");

    let status = order
        .place_order(request(&customer, &[], "bad-2"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_field(&status), "lines");

    let unknown = uuid::Uuid::new_v4().to_string();
    let status = order
        .get_order(GetOrderRequest { order_id: unknown })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let status = system
        .user
        .clone()
        .register_user(RegisterUserRequest {
            name: "X".into(),
            email: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_field(&status), "email");
    // An address already in use is not refused: registration never tells
    // whether an address is registered.
    let again = system
        .user
        .clone()
        .register_user(RegisterUserRequest {
            name: "Ada".into(),
            email: "careful@example.com".into(),
        })
        .await?
        .into_inner()
        .user
        .unwrap();
    assert_eq!(again.email, "careful@example.com");

    let status = system
        .inventory
        .clone()
        .create_product(CreateProductRequest {
            sku: "has space".into(),
            name: "x".into(),
            unit_price: eur(1),
            initial_stock: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&status), "sku");

    // Three capital letters are not enough: the code must be ISO 4217's.
    let status = system
        .inventory
        .clone()
        .create_product(CreateProductRequest {
            sku: "PLAY-MONEY".into(),
            name: "x".into(),
            unit_price: Some(Money {
                amount_minor: 100,
                currency: "ABC".into(),
            }),
            initial_stock: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&status), "unit_price.currency");
    // A request larger than any valid one is refused before it is read.
    let status = system
        .inventory
        .clone()
        .create_product(CreateProductRequest {
            sku: "HUGE".into(),
            name: "x".repeat(2 * 1024 * 1024),
            unit_price: eur(1),
            initial_stock: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // A key of spaces is no key.
    let any_product = uuid::Uuid::new_v4().to_string();
    let status = order
        .place_order(PlaceOrderRequest {
            idempotency_key: "   ".into(),
            ..request(&customer, &[(&any_product, 1)], "unused")
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&status), "idempotency_key");

    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&system.order_db.pool)
        .await?;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&system.order_db.pool)
        .await?;
    assert_eq!((orders, events), (0, 0), "rejected requests wrote nothing");
    let products: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&system.inventory_db.pool)
        .await?;
    assert_eq!(products, 0);
    system.stop().await
}

#[tokio::test]
async fn one_trace_follows_an_order_from_place_order_through_every_service() -> Result<()> {
    let system = System::start().await?;
    let customer = register(&system, "traced@example.com").await?;
    let kettle = product(&system, "KETTLE", 2500, 3).await?;
    // Wait until the order service knows both, then place the traced order.
    place(&system, request(&customer, &[(&kettle, 1)], "warm-up")).await?;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut call = tonic::Request::new(request(&customer, &[(&kettle, 1)], "traced-1"));
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").parse()?,
    );
    let order = system
        .order
        .clone()
        .place_order(call)
        .await?
        .into_inner()
        .order
        .unwrap();
    wait_for(&system, &order.order_id, OrderStatus::Confirmed).await?;
    notifications_for(&system, &order.order_id).await?;

    // Every event of the saga, in every service's outbox, carries the trace.
    let hops = [
        (&system.order_db, "shop.events.v1.OrderPlaced"),
        (&system.inventory_db, "shop.events.v1.InventoryReserved"),
        (&system.payment_db, "shop.events.v1.PaymentSucceeded"),
        (&system.order_db, "shop.events.v1.OrderConfirmed"),
        (&system.inventory_db, "shop.events.v1.InventoryCommitted"),
        (&system.notification_db, "shop.events.v1.NotificationSent"),
    ];
    for (db, event_type) in hops {
        let traceparents: Vec<Option<String>> = eventually(TIMEOUT, event_type, || async {
            let rows: Vec<Option<String>> = sqlx::query_scalar(
                "SELECT traceparent FROM outbox WHERE event_type = $1 AND correlation_id = $2::uuid",
            )
            .bind(event_type)
            .bind(&order.order_id)
            .fetch_all(&db.pool)
            .await?;
            Ok((!rows.is_empty()).then_some(rows))
        })
        .await?;
        let ids: Vec<Option<&str>> = traceparents
            .iter()
            .map(|tp| tp.as_deref().and_then(shop_outbox::trace::trace_id))
            .collect();
        assert_eq!(ids, vec![Some(trace_id)], "{event_type} left the trace");
    }
    system.stop().await
}

#[tokio::test]
async fn orders_still_end_right_when_the_payment_service_crashes_twice_mid_stream() -> Result<()> {
    let mut system = System::start().await?;
    let customer = register(&system, "chaos@example.com").await?;
    let cup = product(&system, "CUP", 500, 100).await?;
    let first = place(&system, request(&customer, &[(&cup, 1)], "chaos-0")).await?;

    let mut ids = vec![first.order_id];
    for round in 0..2 {
        for n in 0..10 {
            let key = format!("chaos-{round}-{n}");
            let order = system
                .order
                .clone()
                .place_order(request(&customer, &[(&cup, 1)], &key))
                .await?;
            ids.push(order.into_inner().order.unwrap().order_id);
        }
        // Crash payment while those orders are flowing through it.
        system.crash_payment().await;
        system.start_payment().await?;
    }

    for id in &ids {
        wait_for(&system, id, OrderStatus::Confirmed).await?;
    }
    let orders = ids.len() as i32;
    wait_for_stock(&system, &cup, 100 - orders, 0).await?;
    let (payments, charged): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT order_id) FROM payments")
            .fetch_one(&system.payment_db.pool)
            .await?;
    assert_eq!(
        (payments, charged),
        (orders as i64, orders as i64),
        "one charge per order"
    );
    let succeeded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE event_type = 'shop.events.v1.PaymentSucceeded'",
    )
    .fetch_one(&system.payment_db.pool)
    .await?;
    assert_eq!(succeeded, orders as i64, "one PaymentSucceeded per order");
    system.stop().await
}

#[tokio::test]
async fn with_two_inventory_replicas_orders_cancelled_while_placed_hold_no_stock() -> Result<()> {
    // Two inventory services share one queue, so an order's OrderPlaced and
    // OrderCancelled can reach different replicas at the same moment.
    let system = System::start_with(Options {
        without_payment: true,
        inventory_replicas: 2,
        ..Options::default()
    })
    .await?;
    let customer = register(&system, "hesitant@example.com").await?;
    let mug = product(&system, "MUG", 800, 1_000).await?;
    const ORDERS: usize = 200;

    let placed_and_cancelled = futures_util::stream::iter(0..ORDERS)
        .map(|n| {
            let request = request(&customer, &[(&mug, 1)], &format!("flip-{n}"));
            let system = &system;
            async move {
                let order = place(system, request).await?;
                system
                    .order
                    .clone()
                    .cancel_order(CancelOrderRequest {
                        order_id: order.order_id,
                    })
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    for result in placed_and_cancelled {
        result?;
    }

    // Every OrderPlaced and OrderCancelled has been applied...
    eventually(TIMEOUT, "inventory to apply every event", || async {
        let mut conn = system.inventory_db.connect().await?;
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
            .fetch_one(&mut conn)
            .await?;
        Ok((applied as usize == 2 * ORDERS).then_some(()))
    })
    .await?;
    // ...and nothing stays reserved for an order that was cancelled.
    let stock = stock(&system, &mug).await?;
    assert_eq!((stock.on_hand, stock.reserved), (1_000, 0));
    let mut conn = system.inventory_db.connect().await?;
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reservations WHERE status = 'reserved'")
            .fetch_one(&mut conn)
            .await?;
    assert_eq!(open, 0, "reservations of cancelled orders left open");
    system.stop().await
}

#[tokio::test]
async fn a_price_change_that_arrives_late_never_undoes_a_newer_one() -> Result<()> {
    let system = System::start().await?;
    let customer = register(&system, "bargain@example.com").await?;
    let vase = product(&system, "VASE", 1000, 10).await?;
    // Version 1 is the creation. Versions 3 and then 2 are published, as
    // when version 2 failed once and came back through a retry queue.
    let mut tx = system.inventory_db.pool.begin().await?;
    for (version, amount) in [(3, 3000), (2, 2000)] {
        let key = vase.clone();
        shop_outbox::enqueue(
            &mut tx,
            shop_outbox::Aggregate::new("product", &key),
            &shop_proto::events::v1::ProductPriceChanged {
                product_id: vase.clone(),
                old_price: eur(1000),
                new_price: eur(amount),
                version,
            },
            &shop_outbox::EventContext::default(),
        )
        .await?;
    }
    tx.commit().await?;
    eventually(
        TIMEOUT,
        "the order service to apply both changes",
        || async {
            let mut conn = system.order_db.connect().await?;
            let applied: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM inbox WHERE event_type = 'shop.events.v1.ProductPriceChanged'",
        )
        .fetch_one(&mut conn)
        .await?;
            Ok((applied == 2).then_some(()))
        },
    )
    .await?;

    let order = place(&system, request(&customer, &[(&vase, 2)], "late-price")).await?;
    assert_eq!(order.total, eur(6000), "priced at version 3");
    system.stop().await
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_a_call_that_never_ends_waits_only_for_the_drain_timeout()
-> Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    let system = System::start_with(Options {
        without_payment: true,
        ..Options::default()
    })
    .await?;
    let customer = register(&system, "watcher@example.com").await?;
    let lamp = product(&system, "LAMP", 3000, 5).await?;
    let order = place(&system, request(&customer, &[(&lamp, 1)], "watch-1")).await?;

    // A client watching the order, one watching health, and one holding a
    // reflection stream open without ever finishing its requests.
    let mut watch = system
        .order
        .clone()
        .watch_order(WatchOrderRequest {
            order_id: order.order_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(
        watch.message().await?.unwrap().order.unwrap().status(),
        OrderStatus::Pending
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", system.order_addr))?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest::default())
        .await?
        .into_inner();
    // SERVING once the subscribers consume (perhaps after NOT_SERVING).
    while health.message().await?.unwrap().status() != ServingStatus::Serving {}
    let (requests, outbound) = tokio::sync::mpsc::channel(1);
    requests
        .send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .await?;
    let mut reflection = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await?
        .into_inner();
    reflection.message().await?.expect("a reflection answer");

    // Every service stops, the order service included, within its drain
    // timeout (2 s here) of the request to stop.
    tokio::time::timeout(Duration::from_secs(30), system.stop())
        .await
        .expect("shutdown never completed")?;

    let ended = watch.message().await.unwrap_err();
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    let mut last = None;
    while let Ok(Some(message)) = health.message().await {
        last = Some(message.status());
    }
    assert_eq!(last, Some(ServingStatus::NotServing));
    drop(requests);
    Ok(())
}

#[tokio::test]
async fn a_payment_made_for_an_order_cancelled_meanwhile_is_refunded_and_the_customer_told()
-> Result<()> {
    // The payment service is down while the customer cancels, so the charge
    // is made after the cancellation and must be given back.
    let mut system = System::start_with(Options {
        without_payment: true,
        ..Options::default()
    })
    .await?;
    let customer = register(&system, "regret@example.com").await?;
    let desk = product(&system, "DESK", 20000, 3).await?;
    let order = place(&system, request(&customer, &[(&desk, 1)], "regret-1")).await?;
    wait_for_stock(&system, &desk, 3, 1).await?;
    eventually(
        TIMEOUT,
        "InventoryReserved to reach the payment queue",
        || async {
            let published: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM outbox \
             WHERE event_type = 'shop.events.v1.InventoryReserved' AND published_at IS NOT NULL)",
            )
            .fetch_one(&system.inventory_db.pool)
            .await?;
            Ok(published.then_some(()))
        },
    )
    .await?;
    system
        .order
        .clone()
        .cancel_order(CancelOrderRequest {
            order_id: order.order_id.clone(),
        })
        .await?;
    wait_for_stock(&system, &desk, 3, 0).await?;

    system.start_payment().await?;
    let payment = eventually(TIMEOUT, "the payment to be refunded", || {
        let mut client = system.payment.clone();
        let order_id = order.order_id.clone();
        async move {
            match client.get_payment(GetPaymentRequest { order_id }).await {
                Ok(response) => {
                    let payment = response.into_inner().payment.unwrap();
                    Ok((payment.status() == PaymentStatus::Refunded).then_some(payment))
                }
                Err(status) if status.code() == Code::NotFound => Ok(None),
                Err(status) => Err(status.into()),
            }
        }
    })
    .await?;
    assert_eq!(payment.amount, eur(20000));

    let told = eventually(TIMEOUT, "the refund notification", || async {
        let bodies = notifications_for(&system, &order.order_id).await?;
        Ok(bodies.into_iter().find(|body| body.contains("refunded")))
    })
    .await?;
    assert!(told.contains("200.00 EUR"), "{told}");
    let history = eventually(TIMEOUT, "the refund in the order's history", || {
        let mut client = system.order.clone();
        let order_id = order.order_id.clone();
        async move {
            let order = client
                .get_order(GetOrderRequest { order_id })
                .await?
                .into_inner()
                .order
                .unwrap();
            let refunded = order
                .history
                .iter()
                .any(|step| step.event_type == "shop.events.v1.PaymentRefunded");
            Ok(refunded.then_some(order))
        }
    })
    .await?;
    assert_eq!(history.status(), OrderStatus::Cancelled);
    assert_eq!(stock(&system, &desk).await?.reserved, 0);
    system.stop().await
}

#[tokio::test]
async fn an_order_whose_saga_never_finishes_is_cancelled_and_its_stock_released() -> Result<()> {
    // Without the payment service the saga stops after the reservation.
    let system = System::start_with(Options {
        without_payment: true,
        saga_timeout: Some(Duration::from_secs(2)),
        ..Options::default()
    })
    .await?;
    let customer = register(&system, "patient@example.com").await?;
    let clock = product(&system, "CLOCK", 4500, 2).await?;
    let order = place(&system, request(&customer, &[(&clock, 2)], "stuck-1")).await?;
    wait_for_stock(&system, &clock, 2, 2).await?;

    let cancelled = wait_for(&system, &order.order_id, OrderStatus::Cancelled).await?;
    assert!(
        cancelled.cancel_reason.contains("did not finish within 2s"),
        "{}",
        cancelled.cancel_reason
    );
    wait_for_stock(&system, &clock, 2, 0).await?;
    let told = notifications_for(&system, &order.order_id).await?;
    assert!(told[0].contains("was cancelled"), "{told:?}");
    system.stop().await
}

#[tokio::test]
async fn staff_cancelling_a_confirmed_order_restocks_refunds_and_clears_the_purchase() -> Result<()>
{
    const SECRET: &str = "a test secret of at least thirty-two bytes";
    let system = System::start_with(Options {
        auth_secret: Some(SECRET.into()),
        ..Options::default()
    })
    .await?;
    let tokens = shop_server::auth::LocalTokens::new(
        &shop_server::auth::AuthSettings::shared_secret(SECRET),
    )?;
    let staff = tokens.staff("support");
    let customer = uuid::Uuid::now_v7();
    let shopper = tokens.customer(customer);
    system
        .user
        .clone()
        .register_user(signed(
            &shopper,
            RegisterUserRequest {
                name: "Changed Mind".into(),
                email: "changed@example.com".into(),
            },
        ))
        .await?;
    let chair = system
        .inventory
        .clone()
        .create_product(signed(
            &staff,
            CreateProductRequest {
                sku: "ARMCHAIR".into(),
                name: "Armchair".into(),
                unit_price: eur(25000),
                initial_stock: 4,
            },
        ))
        .await?
        .into_inner()
        .product
        .unwrap()
        .product_id;
    let stock_of = || async {
        anyhow::Ok(
            system
                .inventory
                .clone()
                .get_stock(signed(
                    &staff,
                    GetStockRequest {
                        product_id: chair.clone(),
                    },
                ))
                .await?
                .into_inner()
                .stock
                .unwrap(),
        )
    };
    let purchases = || async {
        anyhow::Ok(
            system
                .user
                .clone()
                .get_purchase_history(signed(
                    &shopper,
                    GetPurchaseHistoryRequest {
                        user_id: customer.to_string(),
                        ..Default::default()
                    },
                ))
                .await?
                .into_inner()
                .purchases
                .len(),
        )
    };
    let order_id = eventually(TIMEOUT, "the order to be accepted", || async {
        let placed = system
            .order
            .clone()
            .place_order(signed(
                &shopper,
                request(&customer.to_string(), &[(&chair, 2)], "keep-it"),
            ))
            .await;
        match placed {
            Ok(response) => Ok(Some(response.into_inner().order.unwrap().order_id)),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(status.into()),
        }
    })
    .await?;
    eventually(
        TIMEOUT,
        "the stock committed and the purchase recorded",
        || async {
            let stock = stock_of().await?;
            Ok((stock.on_hand == 2 && purchases().await? == 1).then_some(()))
        },
    )
    .await?;

    // The customer may not take a confirmed order back; staff may.
    let cancel = |token: &str| {
        signed(
            token,
            CancelOrderRequest {
                order_id: order_id.clone(),
            },
        )
    };
    let refused = system
        .order
        .clone()
        .cancel_order(cancel(&shopper))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let cancelled = system
        .order
        .clone()
        .cancel_order(cancel(&staff))
        .await?
        .into_inner()
        .order
        .unwrap();
    assert_eq!(cancelled.status(), OrderStatus::Cancelled);

    // Stock back on hand, the charge refunded, the purchase gone.
    eventually(TIMEOUT, "the armchairs back in stock", || async {
        let stock = stock_of().await?;
        Ok((stock.on_hand == 4 && stock.reserved == 0).then_some(()))
    })
    .await?;
    eventually(TIMEOUT, "the refund", || async {
        let payment = system
            .payment
            .clone()
            .get_payment(signed(
                &shopper,
                GetPaymentRequest {
                    order_id: order_id.clone(),
                },
            ))
            .await?
            .into_inner()
            .payment
            .unwrap();
        Ok((payment.status() == PaymentStatus::Refunded).then_some(()))
    })
    .await?;
    eventually(TIMEOUT, "the purchase to leave the history", || async {
        Ok((purchases().await? == 0).then_some(()))
    })
    .await?;
    system.stop().await
}

#[tokio::test]
async fn the_checkout_runs_over_verified_tls_to_postgres_and_rabbitmq_and_plaintext_is_refused()
-> Result<()> {
    use shop_tests::pki::{Authority, write_file};
    use shop_tests::{BrokerTls, PrivateBroker, PrivatePostgres};
    use sqlx::Connection as _;

    let ca = Authority::new("shop test CA")?;
    let postgres = PrivatePostgres::start_tls(&ca).await?;
    let broker = PrivateBroker::start_tls(BrokerTls {
        authority: &ca,
        require_client_certificate: true,
    })
    .await?;
    let ca_file = write_file(None, "ca.pem", &ca.pem)?;
    let services = ca.issue(&["shop-services"])?;
    let cert_file = write_file(None, "client.pem", &services.cert)?;
    let key_file = write_file(None, "client.key", &services.key)?;
    let stranger = Authority::new("stranger CA")?;
    let stranger_ca = write_file(None, "stranger-ca.pem", &stranger.pem)?;

    // PostgreSQL: only TLS gets in, and only to a client that verifies the
    // server against the right authority.
    let refused = sqlx::PgConnection::connect(&postgres.url("postgres", "disable")).await;
    assert!(
        refused.is_err(),
        "a plaintext PostgreSQL connection was let in"
    );
    let foreign = postgres.url("postgres", "verify-full").replace(
        &postgres.ca_file.display().to_string(),
        &stranger_ca.display().to_string(),
    );
    assert!(
        sqlx::PgConnection::connect(&foreign).await.is_err(),
        "a server certificate from another authority was accepted"
    );

    // RabbitMQ: the node listens for AMQPS only (no plaintext listener at
    // all), and lets in only clients that trust the private CA and present
    // a certificate from it.
    let mut settings = broker.client(Some(&ca_file), Some((&cert_file, &key_file)));
    settings.amqp_connect_timeout = Duration::from_secs(10);
    let mut plaintext = settings.clone();
    plaintext.amqp_url = broker.url.replace("amqps://", "amqp://");
    let mut without_identity = settings.clone();
    without_identity.amqp_client_cert = None;
    without_identity.amqp_client_key = None;
    let mut system_roots = settings.clone();
    system_roots.amqp_ca_file = None;
    for (what, refused) in [
        ("plaintext AMQP", plaintext),
        ("AMQPS without a client certificate", without_identity),
        ("AMQPS trusting only the system's roots", system_roots),
    ] {
        assert!(refused.connect("test").await.is_err(), "{what} was let in");
    }

    let system = System::start_with(Options {
        database_admin_url: Some(postgres.url("postgres", "verify-full")),
        broker: Some(settings),
        ..Options::default()
    })
    .await?;
    let customer = register(&system, "tls@example.com").await?;
    let widget = product(&system, "TLS-1", 1_500, 5).await?;
    let order = place(&system, request(&customer, &[(&widget, 2)], "tls-1")).await?;
    let order = wait_for(&system, &order.order_id, OrderStatus::Confirmed).await?;
    assert_eq!(order.total, eur(3_000));

    // Every session of the services and relays on the server is encrypted.
    let mut admin = sqlx::PgConnection::connect(&postgres.url("postgres", "verify-full")).await?;
    let (encrypted, plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname LIKE 'test_%'",
    )
    .fetch_one(&mut admin)
    .await?;
    assert!(encrypted >= 10, "only {encrypted} encrypted sessions");
    assert_eq!(plain, 0);
    // ...and verified: each service's URL kept the mode and the CA.
    for db in [&system.order_db, &system.inventory_db, &system.user_db] {
        assert!(db.url.contains("sslmode=verify-full"), "{}", db.url);
        assert!(db.url.contains("sslrootcert="), "{}", db.url);
    }
    system.stop().await?;
    for file in [ca_file, cert_file, key_file, stranger_ca] {
        let _ = std::fs::remove_file(file);
    }
    Ok(())
}
