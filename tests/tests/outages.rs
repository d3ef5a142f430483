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
