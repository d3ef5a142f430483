//! `shop-local`: the whole checkout in one process, against the PostgreSQL
//! and RabbitMQ of this machine. Creates the five service databases if they
//! are missing, migrates them, starts the five services and one outbox relay
//! per database, prints the addresses, and runs until ctrl-c or SIGTERM.
//! `shop-local demo` then drives it like a customer (see [`demo`]).

mod demo;

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use outbox_relay::{Relay, RelaySettings};
use shop_subscriber::SubscriberSettings;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

/// The gateway's call settings at their defaults.
#[derive(Debug, clap::Parser)]
struct GatewayCalls {
    #[command(flatten)]
    calls: shop_gateway::upstream::CallSettings,
}

/// Runs the checkout locally: five services, their relays and the HTTP
/// gateway.
#[derive(Debug, Parser)]
#[command(name = "shop-local", version)]
struct Cli {
    /// Without a command, runs the checkout.
    #[command(subcommand)]
    command: Option<Command>,

    /// PostgreSQL server; the service databases are created next to this one.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    database_url: String,
    /// Address the order service listens on; the others take the next ports
    /// (inventory, payment, notification, user) and the relays' health
    /// endpoints take the ports from +20.
    #[arg(
        long,
        env = "SHOP_FIRST_ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    first_addr: SocketAddr,
    /// The simulated payment provider declines amounts above this (minor units).
    #[arg(
        long,
        env = "PAYMENT_DECLINE_ABOVE_MINOR",
        default_value_t = 100_000,
        global = true
    )]
    decline_above_minor: i64,
    /// Address of the Prometheus `/metrics` endpoint of the whole process;
    /// empty turns it off.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9460", value_parser = shop_server::metrics::parse_addr)]
    metrics_addr: std::option::Option<SocketAddr>,
    /// Address of the HTTP/JSON gateway in front of the services.
    #[arg(long, env = "GATEWAY_ADDR", default_value = "127.0.0.1:8080")]
    gateway_addr: SocketAddr,
    #[command(flatten)]
    subscriber: SubscriberSettings,
    #[command(flatten)]
    auth: shop_server::auth::AuthSettings,
}

/// The shared secret of a local run when none is configured. It is public
/// (it is in the source): a checkout reachable by others needs its own
/// `AUTH_HS256_SECRET`, or an identity provider's keys.
const LOCAL_SECRET: &str = "shop-local-development-secret-not-for-production";

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Against a running checkout: register a customer, create products, and
    /// place a paid order, a declined one and one that runs out of stock,
    /// printing each order's saga.
    Demo,
    /// Prints a token the local checkout accepts, as shell assignments.
    Token {
        #[command(subcommand)]
        who: Who,
    },
}

#[derive(Debug, clap::Subcommand)]
enum Who {
    /// `CUSTOMER_ID=<new uuid>` and `CUSTOMER_TOKEN=<its token>`.
    Customer,
    /// `STAFF_TOKEN=<a token with the shop.staff scope>`.
    Staff,
}

const SERVICES: [&str; 5] = ["order", "inventory", "payment", "notification", "user"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    let keys_given = cli.auth.auth_hs256_secret.is_some() || cli.auth.auth_jwks_file.is_some();
    if !keys_given && !cli.auth.auth_disabled {
        // The built-in secret is public: only for a checkout no one else
        // can reach.
        let exposed = [cli.first_addr.ip(), cli.gateway_addr.ip()]
            .into_iter()
            .find(|ip| !ip.is_loopback());
        anyhow::ensure!(
            exposed.is_none() || cli.command.is_some(),
            "set AUTH_HS256_SECRET (or AUTH_JWKS_FILE): the built-in development secret is public \
             and {} is reachable from other hosts",
            exposed.map(|ip| ip.to_string()).unwrap_or_default()
        );
        cli.auth.auth_hs256_secret = Some(LOCAL_SECRET.to_owned());
    }
    let addr = |offset: u16| SocketAddr::new(cli.first_addr.ip(), cli.first_addr.port() + offset);
    match &cli.command {
        Some(Command::Demo) => {
            return demo::run(
                addr(0),
                addr(1),
                addr(4),
                cli.decline_above_minor,
                &cli.auth,
            )
            .await;
        }
        Some(Command::Token { who }) => {
            let tokens = shop_server::auth::LocalTokens::new(&cli.auth)?;
            match who {
                Who::Customer => {
                    let id = uuid::Uuid::now_v7();
                    println!("CUSTOMER_ID={id}");
                    println!("CUSTOMER_TOKEN={}", tokens.customer(id));
                }
                Who::Staff => println!("STAFF_TOKEN={}", tokens.staff("shop-local")),
            }
            return Ok(());
        }
        None => {}
    }
    let _telemetry = shop_server::telemetry::init("shop-local", false)?;
    if !keys_given && !cli.auth.auth_disabled {
        tracing::warn!(
            "tokens are checked against shop-local's built-in development secret; `shop-local token customer|staff` prints tokens"
        );
    }
    if let Some(addr) = cli.metrics_addr {
        shop_server::metrics::install_exporter(addr)?;
    }
    let admin: PgConnectOptions = cli
        .database_url
        .parse()
        .context("--database-url is not a PostgreSQL URL")?;
    let mut conn = admin
        .connect()
        .await
        .context("failed to connect to PostgreSQL")?;
    let mut urls = Vec::new();
    for service in SERVICES {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(service)
                .fetch_one(&mut conn)
                .await?;
        if !exists {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE \"{service}\""
            )))
            .execute(&mut conn)
            .await
            .with_context(|| format!("failed to create database {service}"))?;
        }
        urls.push(shop_server::database::url_for_database(
            &cli.database_url,
            service,
        )?);
    }
    conn.close().await?;

    let shutdown = shop_server::shutdown::on_signal();
    let mut tasks = tokio::task::JoinSet::new();
    let mut table = Vec::new();

    let order = order_service::build(order_service::Settings {
        saga_timeout: std::time::Duration::from_secs(15 * 60),
        grpc_addr: addr(0),
        database_url: urls[0].clone(),
        metrics_addr: None,
        tls: Default::default(),
        drain: Default::default(),
        auth: cli.auth.clone(),
        pool: Default::default(),
        log_json: false,
        subscriber: cli.subscriber.clone(),
    })
    .await?;
    table.push(("order", order.addr()));
    tasks.spawn(order.run_until_stopped(shutdown.clone()));
    let inventory = inventory_service::build(inventory_service::Settings {
        grpc_addr: addr(1),
        database_url: urls[1].clone(),
        metrics_addr: None,
        tls: Default::default(),
        drain: Default::default(),
        auth: cli.auth.clone(),
        pool: Default::default(),
        log_json: false,
        subscriber: cli.subscriber.clone(),
    })
    .await?;
    table.push(("inventory", inventory.addr()));
    tasks.spawn(inventory.run_until_stopped(shutdown.clone()));
    let payment = payment_service::build(payment_service::Settings {
        grpc_addr: addr(2),
        database_url: urls[2].clone(),
        decline_above_minor: cli.decline_above_minor,
        metrics_addr: None,
        tls: Default::default(),
        drain: Default::default(),
        auth: cli.auth.clone(),
        pool: Default::default(),
        log_json: false,
        subscriber: cli.subscriber.clone(),
    })
    .await?;
    table.push(("payment", payment.addr()));
    tasks.spawn(payment.run_until_stopped(shutdown.clone()));
    let notification = notification_service::build(notification_service::Settings {
        grpc_addr: addr(3),
        database_url: urls[3].clone(),
        metrics_addr: None,
        tls: Default::default(),
        drain: Default::default(),
        auth: cli.auth.clone(),
        pool: Default::default(),
        log_json: false,
        subscriber: cli.subscriber.clone(),
    })
    .await?;
    table.push(("notification", notification.addr()));
    tasks.spawn(notification.run_until_stopped(shutdown.clone()));
    let user = user_service::build(user_service::Settings {
        grpc_addr: addr(4),
        database_url: urls[4].clone(),
        metrics_addr: None,
        tls: Default::default(),
        drain: Default::default(),
        auth: cli.auth.clone(),
        pool: Default::default(),
        log_json: false,
        subscriber: cli.subscriber.clone(),
    })
    .await?;
    table.push(("user", user.addr()));
    tasks.spawn(user.run_until_stopped(shutdown.clone()));

    for (i, (service, url)) in SERVICES.iter().zip(&urls).enumerate() {
        let mut settings = RelaySettings::new(url, &cli.subscriber.broker.amqp_url);
        settings.broker = cli.subscriber.broker.clone();
        settings.exchange = cli.subscriber.exchange.clone();
        settings.source = format!("{service}-service");
        settings.health_addr = addr(20 + i as u16);
        let relay = Relay::build(settings).await?;
        println!(
            "{:<14} relay health {}",
            format!("{service}-relay"),
            relay.health_addr()
        );
        tasks.spawn(relay.run_until_stopped(shutdown.clone()));
    }
    let url = |name: &str| -> Vec<String> {
        table
            .iter()
            .filter(|(service, _)| *service == name)
            .map(|(_, addr)| format!("http://{addr}"))
            .collect()
    };
    let gateway = shop_gateway::build(shop_gateway::Settings {
        addr: cli.gateway_addr,
        order_url: url("order"),
        inventory_url: url("inventory"),
        payment_url: url("payment"),
        notification_url: url("notification"),
        user_url: url("user"),
        metrics_addr: None,
        drain_timeout: std::time::Duration::from_secs(10),
        max_streams: 1000,
        log_json: false,
        calls: <GatewayCalls as clap::Parser>::parse_from(["gateway"]).calls,
    })
    .await?;
    let gateway_addr = gateway.addr();
    tasks.spawn(gateway.run_until_stopped(shutdown.clone()));
    for (service, addr) in &table {
        println!("{:<14} gRPC {addr}", format!("{service}-service"));
    }
    println!(
        "{:<14} HTTP http://{gateway_addr} (OpenAPI at /openapi.json)",
        "gateway"
    );
    println!(
        "{:<14} http://{gateway_addr}/orders/<order-id>/timeline#token=<staff token>",
        "timeline page"
    );
    println!("the checkout is running; ctrl-c stops it");

    while let Some(result) = tasks.join_next().await {
        if let Err(error) = result.context("a task panicked").and_then(|r| r) {
            tracing::error!(error = format!("{error:#}"), "stopping");
            shutdown.cancel();
        }
    }
    Ok(())
}
