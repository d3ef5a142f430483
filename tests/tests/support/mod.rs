//! The whole checkout for one test: five services, each with its own
//! database and its own relay, on a test exchange and test queue names.

#![allow(dead_code, unreachable_pub)]

pub mod steps;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use outbox_relay::{Relay, RelaySettings};
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_proto::notification::v1::notification_service_client::NotificationServiceClient;
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::payment::v1::payment_service_client::PaymentServiceClient;
use shop_proto::user::v1::user_service_client::UserServiceClient;
use shop_subscriber::SubscriberSettings;
use shop_tests::{TestBroker, TestDatabase};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Orders above this amount (minor units) are declined by payment.
pub const DECLINE_ABOVE: i64 = 100_000;

pub struct System {
    pub order: OrderServiceClient<Channel>,
    pub inventory: InventoryServiceClient<Channel>,
    pub payment: PaymentServiceClient<Channel>,
    pub notification: NotificationServiceClient<Channel>,
    pub user: UserServiceClient<Channel>,
    /// The order service's gRPC address.
    pub order_addr: SocketAddr,
    /// The other services' gRPC addresses.
    pub inventory_addr: SocketAddr,
    pub payment_addr: SocketAddr,
    pub notification_addr: SocketAddr,
    pub user_addr: SocketAddr,
    pub order_db: TestDatabase,
    pub inventory_db: TestDatabase,
    pub payment_db: TestDatabase,
    pub notification_db: TestDatabase,
    pub user_db: TestDatabase,
    /// The broker's URL, and the topic exchange the events go to.
    pub amqp_url: String,
    pub exchange: String,
    /// Prefix of every queue the services declare.
    pub queue_prefix: String,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    payment_settings: payment_service::Settings,
    payment_task: Option<tokio::task::JoinHandle<Result<()>>>,
    _broker: TestBroker,
}

/// Which services to leave out, to hold the saga at a step.
#[derive(Debug, Default, Clone)]
pub struct Options {
    pub without_payment: bool,
    /// Inventory services on the one inventory database and queue (1 when 0).
    pub inventory_replicas: usize,
    /// Services require tokens signed with this secret (HS256); without
    /// one, authentication is off.
    pub auth_secret: Option<String>,
    /// The order service's saga timeout (15 minutes when unset).
    pub saga_timeout: Option<Duration>,
    /// The databases' server, as its admin URL (the shared test server
    /// when unset).
    pub database_admin_url: Option<String>,
    /// The broker and how to reach it (the shared test broker when unset).
    pub broker: Option<shop_broker::BrokerSettings>,
}

async fn create_db(options: &Options, migrator: &sqlx::migrate::Migrator) -> Result<TestDatabase> {
    match &options.database_admin_url {
        Some(url) => TestDatabase::create_on(url, migrator).await,
        None => TestDatabase::create(migrator).await,
    }
}

impl System {
    pub async fn start() -> Result<Self> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Result<Self> {
        let broker = match &options.broker {
            Some(settings) => TestBroker::on(&settings.amqp_url),
            None => TestBroker::new().await,
        };
        let exchange = broker.name("events");
        let prefix = broker.name("q");
        let mut subscriber = SubscriberSettings::new(&broker.url);
        if let Some(settings) = &options.broker {
            subscriber.broker = settings.clone();
        }
        subscriber.exchange = exchange.clone();
        subscriber.queue_prefix = format!("{prefix}.");
        subscriber.retry_backoff = Duration::from_millis(100);
        subscriber.max_retry_backoff = Duration::from_secs(1);
        subscriber.max_attempts = 10;
        for queue in [
            "order.events",
            "order.history",
            "inventory.events",
            "payment.events",
            "notification.events",
            "user.events",
        ] {
            let queue = format!("{prefix}.{queue}");
            broker.track(&queue);
            broker.track(&format!("{queue}.dlq"));
            for n in 1..subscriber.max_attempts {
                broker.track(&shop_subscriber::topology::retry_queue(
                    &queue,
                    subscriber.queue_kind,
                    n,
                ));
            }
        }
        let auth = match &options.auth_secret {
            Some(secret) => shop_server::auth::AuthSettings::shared_secret(secret),
            None => shop_server::auth::AuthSettings::disabled(),
        };
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let any: SocketAddr = "127.0.0.1:0".parse()?;

        let order_db = create_db(&options, &order_service::migrator()).await?;
        let inventory_db = create_db(&options, &inventory_service::migrator()).await?;
        let payment_db = create_db(&options, &payment_service::migrator()).await?;
        let notification_db = create_db(&options, &notification_service::migrator()).await?;
        let user_db = create_db(&options, &user_service::migrator()).await?;

        for (service, db) in [
            ("order", &order_db),
            ("inventory", &inventory_db),
            ("payment", &payment_db),
            ("notification", &notification_db),
            ("user", &user_db),
        ] {
            let mut settings = RelaySettings::new(&db.url, &broker.url);
            settings.source = format!("{service}-service");
            settings.broker = subscriber.broker.clone();
            settings.exchange = exchange.clone();
            settings.health_addr = any;
            settings.retry_backoff = Duration::from_millis(100);
            settings.max_retry_backoff = Duration::from_secs(1);
            settings.max_attempts = 50;
            let relay = Relay::build(settings).await?;
            tasks.push(tokio::spawn(relay.run_until_stopped(shutdown.clone())));
        }

        let app = user_service::build(user_service::Settings {
            grpc_addr: any,
            database_url: user_db.url.clone(),
            metrics_addr: None,
            tls: Default::default(),
            drain: shop_server::grpc::DrainSettings {
                drain_timeout: Duration::from_secs(2),
                ..Default::default()
            },
            auth: auth.clone(),
            pool: Default::default(),
            log_json: false,
            subscriber: subscriber.clone(),
        })
        .await?;
        let user_addr = app.addr();
        tasks.push(tokio::spawn(app.run_until_stopped(shutdown.clone())));

        let mut inventory_addr = any;
        for _ in 0..options.inventory_replicas.max(1) {
            let app = inventory_service::build(inventory_service::Settings {
                grpc_addr: any,
                database_url: inventory_db.url.clone(),
                metrics_addr: None,
                tls: Default::default(),
                drain: shop_server::grpc::DrainSettings {
                    drain_timeout: Duration::from_secs(2),
                    ..Default::default()
                },
                auth: auth.clone(),
                pool: Default::default(),
                log_json: false,
                subscriber: subscriber.clone(),
            })
            .await?;
            inventory_addr = app.addr();
            tasks.push(tokio::spawn(app.run_until_stopped(shutdown.clone())));
        }

        let app = order_service::build(order_service::Settings {
            saga_timeout: options.saga_timeout.unwrap_or(Duration::from_secs(15 * 60)),
            grpc_addr: any,
            database_url: order_db.url.clone(),
            metrics_addr: None,
            tls: Default::default(),
            drain: shop_server::grpc::DrainSettings {
                drain_timeout: Duration::from_secs(2),
                ..Default::default()
            },
            auth: auth.clone(),
            pool: Default::default(),
            log_json: false,
            subscriber: subscriber.clone(),
        })
        .await?;
        let order_addr = app.addr();
        tasks.push(tokio::spawn(app.run_until_stopped(shutdown.clone())));

        let payment_settings = payment_service::Settings {
            grpc_addr: any,
            database_url: payment_db.url.clone(),
            decline_above_minor: DECLINE_ABOVE,
            metrics_addr: None,
            tls: Default::default(),
            drain: shop_server::grpc::DrainSettings {
                drain_timeout: Duration::from_secs(2),
                ..Default::default()
            },
            auth: auth.clone(),
            pool: Default::default(),
            log_json: false,
            subscriber: subscriber.clone(),
        };
        let payment = payment_service::build(payment_settings.clone()).await?;
        let payment_addr = payment.addr();
        let payment_task = (!options.without_payment)
            .then(|| tokio::spawn(payment.run_until_stopped(shutdown.clone())));

        let app = notification_service::build(notification_service::Settings {
            grpc_addr: any,
            database_url: notification_db.url.clone(),
            metrics_addr: None,
            tls: Default::default(),
            drain: shop_server::grpc::DrainSettings {
                drain_timeout: Duration::from_secs(2),
                ..Default::default()
            },
            auth: auth.clone(),
            pool: Default::default(),
            log_json: false,
            subscriber,
        })
        .await?;
        let notification_addr = app.addr();
        tasks.push(tokio::spawn(app.run_until_stopped(shutdown.clone())));

        let channel = |addr: SocketAddr| {
            Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy()
        };
        Ok(Self {
            order: OrderServiceClient::new(channel(order_addr)),
            order_addr,
            inventory_addr,
            payment_addr,
            notification_addr,
            user_addr,
            inventory: InventoryServiceClient::new(channel(inventory_addr)),
            payment: PaymentServiceClient::new(channel(payment_addr)),
            notification: NotificationServiceClient::new(channel(notification_addr)),
            user: UserServiceClient::new(channel(user_addr)),
            order_db,
            inventory_db,
            shutdown,
            tasks,
            payment_settings,
            payment_task,
            payment_db,
            notification_db,
            user_db,
            amqp_url: broker.url.clone(),
            exchange,
            queue_prefix: format!("{prefix}."),
            _broker: broker,
        })
    }

    /// Kills the payment service without a shutdown, as a crash would: its
    /// open transaction is dropped and its broker connection closes.
    pub async fn crash_payment(&mut self) {
        if let Some(task) = self.payment_task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Starts the payment service again on its database.
    /// The service comes back on the address it had, so clients that knew
    /// it (a gateway) find it again.
    pub async fn start_payment(&mut self) -> Result<()> {
        let mut settings = self.payment_settings.clone();
        settings.grpc_addr = self.payment_addr;
        let app = payment_service::build(settings).await?;
        let addr = app.addr();
        self.payment_addr = addr;
        self.payment = PaymentServiceClient::new(
            Channel::from_shared(format!("http://{addr}"))?.connect_lazy(),
        );
        self.payment_task = Some(tokio::spawn(app.run_until_stopped(self.shutdown.clone())));
        Ok(())
    }

    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.payment_task {
            task.await??;
        }
        for task in self.tasks {
            task.await??;
        }
        Ok(())
    }
}
