//! A service's health and errors follow its dependencies: with its
//! database out of reach its API answers UNAVAILABLE (which client retry
//! policies retry) and its health turns NOT_SERVING; with its broker out of
//! reach the API keeps working (events wait in the outbox) while the
//! server-wide health says the process is not fully working. Both recover
//! on their own. The servers are put out of reach by proxies the test owns.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use shop_proto::user::v1::RegisterUserRequest;
use shop_proto::user::v1::user_service_client::UserServiceClient;
use shop_subscriber::SubscriberSettings;
use shop_tests::{Proxy, TestBroker, TestDatabase, eventually, target_of};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const TIMEOUT: Duration = Duration::from_secs(60);
const API: &str = "shop.user.v1.UserService";

async fn health(channel: &Channel, service: &str) -> Result<ServingStatus> {
    Ok(HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner()
        .status())
}

async fn wait_health(channel: &Channel, service: &str, expected: ServingStatus) -> Result<()> {
    eventually(
        TIMEOUT,
        &format!("{service:?} to be {expected:?}"),
        || async { Ok((health(channel, service).await? == expected).then_some(())) },
    )
    .await
}

async fn register(channel: &Channel, email: &str) -> Result<(), tonic::Status> {
    UserServiceClient::new(channel.clone())
        .register_user(RegisterUserRequest {
            name: "Grace Hopper".into(),
            email: email.into(),
        })
        .await
        .map(drop)
}

#[tokio::test]
async fn health_and_errors_follow_the_database_and_the_broker_and_recover() -> Result<()> {
    let db = TestDatabase::create(&user_service::migrator()).await?;
    let broker = TestBroker::new().await;
    let db_proxy = Proxy::start(target_of(&db.url)?).await?;
    let broker_proxy = Proxy::start(target_of(&broker.url)?).await?;

    let mut subscriber = SubscriberSettings::new(&broker_proxy.url(&broker.url));
    subscriber.exchange = broker.name("events");
    subscriber.queue_prefix = format!("{}.", broker.name("q"));
    for queue in ["user.events", "user.events.dlq"] {
        broker.track(&format!("{}{queue}", subscriber.queue_prefix));
    }
    for n in 1..subscriber.max_attempts {
        broker.track(&shop_subscriber::topology::retry_queue(
            &format!("{}user.events", subscriber.queue_prefix),
            subscriber.queue_kind,
            n,
        ));
    }
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let app = user_service::build(user_service::Settings {
        grpc_addr: any,
        database_url: db_proxy.url(&db.url),
        metrics_addr: None,
        tls: Default::default(),
        drain: Default::default(),
        auth: shop_server::auth::AuthSettings::disabled(),
        pool: shop_server::database::PoolSettings {
            db_max_connections: 4,
            db_acquire_timeout: Duration::from_secs(1),
            ..Default::default()
        },
        log_json: false,
        subscriber,
    })
    .await?;
    let addr = app.addr();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect_lazy();

    wait_health(&channel, API, ServingStatus::Serving).await?;
    wait_health(&channel, "", ServingStatus::Serving).await?;
    register(&channel, "first@example.com").await?;

    // The database out of reach: UNAVAILABLE, no SQL in the message, and
    // NOT_SERVING for the API and the server.
    db_proxy.cut();
    let refused = register(&channel, "second@example.com").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        !refused.message().to_lowercase().contains("pool"),
        "{refused:?}"
    );
    wait_health(&channel, API, ServingStatus::NotServing).await?;
    wait_health(&channel, "", ServingStatus::NotServing).await?;
    assert_eq!(
        health(&channel, shop_server::grpc::LIVENESS).await?,
        ServingStatus::Serving,
        "alive while its database is out of reach"
    );

    db_proxy.restore();
    wait_health(&channel, API, ServingStatus::Serving).await?;
    eventually(TIMEOUT, "registration to work again", || async {
        Ok(register(&channel, "second@example.com").await.ok())
    })
    .await?;

    // The broker out of reach: the API still works, the server as a whole
    // does not, until the subscriber is consuming again.
    broker_proxy.cut();
    wait_health(&channel, "", ServingStatus::NotServing).await?;
    assert_eq!(health(&channel, API).await?, ServingStatus::Serving);
    register(&channel, "third@example.com").await?;
    broker_proxy.restore();
    wait_health(&channel, "", ServingStatus::Serving).await?;

    shutdown.cancel();
    running.await??;
    Ok(())
}

/// A service running until [`Running::stop`].
struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Running {
    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// Runs an order service on `db` whose calls may take `call_timeout` and
/// whose statements wait for a lock at most `lock_timeout`; its
/// subscribers use `broker`.
async fn order_service_with(
    db: &TestDatabase,
    broker: &TestBroker,
    call_timeout: Duration,
    lock_timeout: Duration,
) -> Result<Running> {
    let mut subscriber = SubscriberSettings::new(&broker.url);
    subscriber.exchange = broker.name("events");
    subscriber.queue_prefix = format!("{}.", broker.name("q"));
    for queue in ["order.events", "order.history"] {
        for name in [queue.to_owned(), format!("{queue}.dlq")] {
            broker.track(&format!("{}{name}", subscriber.queue_prefix));
        }
        for n in 1..subscriber.max_attempts {
            broker.track(&shop_subscriber::topology::retry_queue(
                &format!("{}{queue}", subscriber.queue_prefix),
                subscriber.queue_kind,
                n,
            ));
        }
    }
    let app = order_service::build(order_service::Settings {
        saga_timeout: Duration::from_secs(15 * 60),
        grpc_addr: "127.0.0.1:0".parse()?,
        database_url: db.url.clone(),
        metrics_addr: None,
        tls: Default::default(),
        drain: shop_server::grpc::DrainSettings {
            drain_timeout: Duration::from_secs(2),
            call_timeout,
        },
        auth: shop_server::auth::AuthSettings::disabled(),
        pool: shop_server::database::PoolSettings {
            db_statement_timeout: lock_timeout * 2,
            db_lock_timeout: lock_timeout,
            ..Default::default()
        },
        log_json: false,
        subscriber,
    })
    .await?;
    let shutdown = CancellationToken::new();
    Ok(Running {
        addr: app.addr(),
        shutdown: shutdown.clone(),
        task: tokio::spawn(app.run_until_stopped(shutdown)),
    })
}

/// Whether any session other than the test's own is waiting for a lock
/// in `db`.
async fn someone_waits_for_a_lock(db: &TestDatabase) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
                        WHERE datname = current_database() AND pid <> pg_backend_pid() \
                          AND wait_event_type = 'Lock')",
    )
    .fetch_one(&db.pool)
    .await?)
}

/// A PlaceOrder stuck behind a lock ends, and writes nothing: at the
/// call's deadline with DEADLINE_EXCEEDED, or at the database's lock
/// timeout with ABORTED, and then the database stops waiting too, so the
/// connection is free while the lock is still held.
#[tokio::test]
async fn calls_stuck_behind_a_lock_end_at_their_deadline_or_the_lock_timeout() -> Result<()> {
    use shop_proto::order::v1::order_service_client::OrderServiceClient;
    use shop_proto::order::v1::{PlaceOrderLine, PlaceOrderRequest};
    use sqlx::Connection;

    let db = TestDatabase::create(&order_service::migrator()).await?;
    let broker = TestBroker::new().await;
    let customer = uuid::Uuid::new_v4();
    let product = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO customers (customer_id) VALUES ($1)")
        .bind(customer)
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "INSERT INTO catalog (product_id, sku, name, price_minor, currency) \
         VALUES ($1, 'SKU-1', 'Pen', 250, 'EUR')",
    )
    .bind(product)
    .execute(&db.pool)
    .await?;
    // The call carries no deadline of its own; the test gives up on an
    // answer after a minute.
    let place = |addr: SocketAddr, key: &'static str| async move {
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let mut client = OrderServiceClient::new(channel);
        let call = client.place_order(PlaceOrderRequest {
            customer_id: customer.to_string(),
            lines: vec![PlaceOrderLine {
                product_id: product.to_string(),
                quantity: 1,
            }],
            idempotency_key: key.into(),
        });
        let answer = tokio::time::timeout(TIMEOUT, call)
            .await
            .map_err(|_| anyhow::anyhow!("PlaceOrder did not answer within {TIMEOUT:?}"))?;
        anyhow::Ok(answer)
    };
    let orders_with_key = |key: &'static str| {
        let pool = db.pool.clone();
        async move {
            anyhow::Ok(
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM orders WHERE customer_id = $1 AND idempotency_key = $2",
                )
                .bind(customer)
                .bind(key)
                .fetch_one(&pool)
                .await?,
            )
        }
    };
    // The test's own transaction uses the key first and stays open (see
    // `hold_key`): the service's insert with the same key waits for it.

    // The call's deadline first (the lock timeout is far away).
    let service = order_service_with(
        &db,
        &broker,
        Duration::from_secs(1),
        Duration::from_secs(600),
    )
    .await?;
    let addr = service.addr;
    let mut holder = db.connect().await?;
    let mut held = holder.begin().await?;
    hold_key(&mut held, customer, "first").await?;
    let call = tokio::spawn(place(addr, "first"));
    eventually(
        TIMEOUT,
        "the service to wait for the test's lock",
        || async { Ok(someone_waits_for_a_lock(&db).await?.then_some(())) },
    )
    .await?;
    let ended = call.await??.unwrap_err();
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    assert!(!ended.message().contains("SELECT"), "{ended:?}");
    held.rollback().await?;
    // The abandoned call's transaction was rolled back, not committed once
    // the lock was gone: counted once the service has stopped and no
    // session of its is left working or in a transaction.
    service.stop().await?;
    eventually(
        TIMEOUT,
        "the service's sessions to be idle or gone",
        || async {
            let busy: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
                            WHERE datname = current_database() AND pid <> pg_backend_pid() \
                              AND state IN ('active', 'idle in transaction'))",
            )
            .fetch_one(&db.pool)
            .await?;
            Ok((!busy).then_some(()))
        },
    )
    .await?;
    assert_eq!(
        orders_with_key("first").await?,
        0,
        "the timed-out call wrote its order"
    );

    // The lock timeout first (the call's deadline is far away): the
    // database gives up while the test still holds the lock.
    let service = order_service_with(
        &db,
        &broker,
        Duration::from_secs(600),
        Duration::from_secs(1),
    )
    .await?;
    let addr = service.addr;
    let mut held = holder.begin().await?;
    hold_key(&mut held, customer, "second").await?;
    let ended = place(addr, "second").await?.unwrap_err();
    assert_eq!(ended.code(), Code::Aborted, "{ended:?}");
    assert!(!ended.message().contains("lock"), "{ended:?}");
    assert!(
        !someone_waits_for_a_lock(&db).await?,
        "the service's statement still waits although its call has ended"
    );
    held.rollback().await?;
    assert_eq!(
        orders_with_key("second").await?,
        0,
        "the statement that gave up wrote its order"
    );
    // The service recovers: the same key now places the order.
    let placed = place(addr, "second").await??.into_inner();
    assert!(placed.order.is_some());
    assert_eq!(orders_with_key("second").await?, 1);
    service.stop().await?;
    Ok(())
}

/// Inserts an order with `key` in the test's open transaction `tx`.
async fn hold_key(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    customer: uuid::Uuid,
    key: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO orders (id, customer_id, status, total_minor, currency, \
                             idempotency_key, request_fingerprint, placed_at, updated_at) \
         VALUES ($1, $2, 'PENDING', 250, 'EUR', $3, 'held by the test', now(), now())",
    )
    .bind(uuid::Uuid::new_v4())
    .bind(customer)
    .bind(key)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Every connection of a service's pool carries the statement and lock
/// timeouts it was given; a lock timeout that could never apply is
/// refused.
#[tokio::test]
async fn a_services_connections_carry_its_statement_and_lock_timeouts() -> Result<()> {
    let db = TestDatabase::create(&user_service::migrator()).await?;
    let settings = shop_server::database::PoolSettings {
        db_max_connections: 2,
        db_statement_timeout: Duration::from_millis(1500),
        db_lock_timeout: Duration::from_millis(700),
        ..Default::default()
    };
    let pool =
        shop_server::database::connect_and_migrate(&db.url, &settings, &user_service::migrator())
            .await?;
    let mut conn = pool.acquire().await?;
    let statement: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&mut *conn)
        .await?;
    let lock: String = sqlx::query_scalar("SHOW lock_timeout")
        .fetch_one(&mut *conn)
        .await?;
    assert_eq!((statement.as_str(), lock.as_str()), ("1500ms", "700ms"));
    // A slow statement that waits for no lock is cancelled too.
    let slow = sqlx::query("SELECT pg_sleep(5)")
        .execute(&mut *conn)
        .await
        .unwrap_err();
    let status = tonic::Status::from(shop_server::error::ServiceError::from(slow));
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    drop(conn);
    pool.close().await;

    let backwards = shop_server::database::PoolSettings {
        db_statement_timeout: Duration::from_secs(1),
        db_lock_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let refused =
        shop_server::database::connect_and_migrate(&db.url, &backwards, &user_service::migrator())
            .await
            .unwrap_err();
    assert!(
        format!("{refused:#}").contains("--db-lock-timeout"),
        "{refused:#}"
    );
    Ok(())
}
