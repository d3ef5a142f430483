//! The load the benchmark puts on the checkout: the customers and products
//! orders are made of, the same-writes baseline, closed-loop PlaceOrder
//! callers that find the capacity, and open-loop paced orders for the
//! steady phase.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use order_service::db::{self, OrderRow};
use order_service::domain::{NewOrder, PENDING, PricedLine};
use rand::Rng;
use shop_outbox::{Aggregate, EventContext};
use shop_proto::events::v1 as events;
use shop_proto::inventory::v1::CreateProductRequest;
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{PlaceOrderLine, PlaceOrderRequest};
use shop_proto::types::v1::Money;
use shop_proto::user::v1::RegisterUserRequest;
use shop_proto::user::v1::user_service_client::UserServiceClient;
use shop_server::auth::{AuthSettings, LocalTokens, signed};
use shop_tests::TestDatabase;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::Status;
use tonic::transport::Channel;
use uuid::Uuid;

/// Price of every product, in minor units: two of them stay far below the
/// payment service's decline limit, so every saga ends CONFIRMED.
pub(crate) const PRICE_MINOR: i64 = 100;
const CURRENCY: &str = "EUR";

/// Most PlaceOrder calls the open-loop schedule keeps in flight; past it the
/// schedule falls behind, which shows as sender lag.
const MAX_IN_FLIGHT: usize = 2048;

/// The secret this run's services check tokens with (HS256), made per run.
pub(crate) fn secret() -> &'static str {
    static SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SECRET.get_or_init(shop_server::auth::random_secret)
}

/// Tokens this run's services accept.
fn tokens() -> LocalTokens {
    LocalTokens::new(&AuthSettings::shared_secret(secret())).expect("a secret is set")
}

/// Opens a gRPC connection to `addr`.
pub(crate) async fn connect(addr: SocketAddr) -> Result<Channel> {
    Channel::from_shared(format!("http://{addr}"))
        .context("invalid service address")?
        .connect()
        .await
        .with_context(|| format!("failed to connect to {addr}"))
}

/// The customers and products orders are made of.
#[derive(Debug)]
pub(crate) struct Catalog {
    /// Customer ids with their tokens.
    customers: Vec<(String, String)>,
    products: Vec<String>,
}

impl Catalog {
    /// Registers `customers` customers with the user service and creates
    /// `products` products (price [`PRICE_MINOR`], the most stock a product
    /// may start with) with the inventory service.
    pub(crate) async fn seed(
        user: SocketAddr,
        inventory: SocketAddr,
        customers: usize,
        products: usize,
    ) -> Result<Self> {
        anyhow::ensure!(products >= 2, "orders need at least two products");
        anyhow::ensure!(customers >= 1, "orders need at least one customer");
        let tokens = tokens();
        let mut users = UserServiceClient::new(connect(user).await?);
        let mut customer_ids = Vec::with_capacity(customers);
        for i in 0..customers {
            let token = tokens.customer(Uuid::now_v7());
            let response = users
                .register_user(signed(
                    &token,
                    RegisterUserRequest {
                        name: format!("Bench Customer {i}"),
                        email: format!("customer-{i}@bench.example.com"),
                    },
                ))
                .await
                .context("RegisterUser failed")?
                .into_inner();
            let user = response.user.context("RegisterUser answered no user")?;
            customer_ids.push((user.user_id, token));
        }
        let staff = tokens.staff("shop-bench");
        let mut stock = InventoryServiceClient::new(connect(inventory).await?);
        let mut product_ids = Vec::with_capacity(products);
        for i in 0..products {
            let response = stock
                .create_product(signed(
                    &staff,
                    CreateProductRequest {
                        sku: format!("BENCH-{i:05}"),
                        name: format!("Bench product {i}"),
                        unit_price: Some(Money {
                            amount_minor: PRICE_MINOR,
                            currency: CURRENCY.to_owned(),
                        }),
                        initial_stock: inventory_service::domain::MAX_STOCK_CHANGE,
                    },
                ))
                .await
                .context("CreateProduct failed")?
                .into_inner();
            let product = response
                .product
                .context("CreateProduct answered no product")?;
            product_ids.push(product.product_id);
        }
        Ok(Self {
            customers: customer_ids,
            products: product_ids,
        })
    }

    /// Waits until the order service's replicas, built from UserRegistered
    /// and ProductCreated, hold every customer and product (until then
    /// PlaceOrder answers NOT_FOUND for them). `pool` is the order database.
    pub(crate) async fn wait_known(&self, pool: &PgPool, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let (customers, products) = (self.customers.len() as i64, self.products.len() as i64);
        shop_tests::eventually(
            timeout,
            "the order service to learn every customer and product",
            || async {
                let known: (i64, i64) = sqlx::query_as(
                    "SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM catalog)",
                )
                .fetch_one(pool)
                .await?;
                Ok((known == (customers, products)).then_some(()))
            },
        )
        .await?;
        Ok(started.elapsed())
    }

    /// A new order: a random customer, two different random products, one
    /// unit each, a fresh idempotency key.
    pub(crate) fn order(&self) -> PlaceOrderRequest {
        self.order_by(rand::rng().random_range(0..self.customers.len()))
            .into_inner()
    }

    /// Like [`Catalog::order`], with the customer's token.
    pub(crate) fn signed_order(&self) -> tonic::Request<PlaceOrderRequest> {
        self.order_by(rand::rng().random_range(0..self.customers.len()))
    }

    fn order_by(&self, customer: usize) -> tonic::Request<PlaceOrderRequest> {
        let mut rng = rand::rng();
        let (customer, token) = &self.customers[customer];
        let n = self.products.len();
        let first = rng.random_range(0..n);
        let second = (first + rng.random_range(1..n)) % n;
        let request = PlaceOrderRequest {
            customer_id: customer.clone(),
            lines: [first, second]
                .into_iter()
                .map(|i| PlaceOrderLine {
                    product_id: self.products[i].clone(),
                    quantity: 1,
                })
                .collect(),
            idempotency_key: Uuid::new_v4().to_string(),
        };
        signed(token, request)
    }
}

/// Places one order; returns its id.
async fn place(
    client: &mut OrderServiceClient<Channel>,
    request: tonic::Request<PlaceOrderRequest>,
) -> Result<Uuid, Status> {
    let response = client.place_order(request).await?.into_inner();
    response
        .order
        .and_then(|order| Uuid::parse_str(&order.order_id).ok())
        .ok_or_else(|| Status::internal("PlaceOrder answered without an order id"))
}

/// Places `orders` orders one after the other; fails on the first error.
/// Returns their ids.
pub(crate) async fn place_some(
    addr: SocketAddr,
    catalog: &Catalog,
    orders: usize,
) -> Result<Vec<Uuid>> {
    let mut client = OrderServiceClient::new(connect(addr).await?);
    let mut ids = Vec::with_capacity(orders);
    for _ in 0..orders {
        ids.push(
            place(&mut client, catalog.signed_order())
                .await
                .context("PlaceOrder failed")?,
        );
    }
    Ok(ids)
}

/// PlaceOrder calls that failed, by status code, with the first message of
/// each code.
#[derive(Debug, Default)]
pub(crate) struct Failures(BTreeMap<String, (u64, String)>);

impl Failures {
    fn add(&mut self, status: &Status) {
        self.0
            .entry(format!("{:?}", status.code()))
            .or_insert_with(|| (0, status.message().to_owned()))
            .0 += 1;
    }

    fn merge(&mut self, other: Failures) {
        for (code, (count, message)) in other.0 {
            self.0.entry(code).or_insert((0, message)).0 += count;
        }
    }

    /// Failed calls in all.
    pub(crate) fn total(&self) -> u64 {
        self.0.values().map(|(count, _)| count).sum()
    }
}

impl fmt::Display for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (code, (count, message))) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{count} × {code} (first: {message})")?;
        }
        Ok(())
    }
}

/// Transactions committed in a timed run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Throughput {
    /// Transactions committed.
    pub(crate) count: u64,
    /// From the start to the end of the last one.
    pub(crate) elapsed: Duration,
}

impl Throughput {
    /// Transactions per second.
    pub(crate) fn per_second(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }
}

/// The baseline: PlaceOrder's writes without the service around them.
/// `writers` tasks on a scratch database with the order schema (and its
/// outbox trigger) commit one order each per transaction through the order
/// service's own SQL for `duration`. Nothing relays or consumes the events.
pub(crate) async fn baseline(
    catalog: Arc<Catalog>,
    writers: usize,
    duration: Duration,
) -> Result<Throughput> {
    let scratch = TestDatabase::create(&order_service::migrator())
        .await
        .context("failed to create the baseline database")?;
    scratch.pool.close().await;
    let pool = PgPoolOptions::new()
        .max_connections(writers as u32)
        .connect(&scratch.url)
        .await
        .context("failed to connect to the baseline database")?;
    // Open every connection before the clock starts.
    let mut connections = Vec::with_capacity(writers);
    for _ in 0..writers {
        connections.push(pool.acquire().await?);
    }
    drop(connections);

    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..writers {
        let (pool, catalog) = (pool.clone(), catalog.clone());
        tasks.spawn(async move {
            let mut count = 0u64;
            while Instant::now() < deadline {
                write_order(&pool, &catalog).await?;
                count += 1;
            }
            anyhow::Ok(count)
        });
    }
    let mut count = 0;
    while let Some(result) = tasks.join_next().await {
        count += result.context("a baseline writer panicked")??;
    }
    let elapsed = started.elapsed();
    pool.close().await;
    drop(scratch);
    Ok(Throughput { count, elapsed })
}

/// One order's writes, in one transaction, as PlaceOrder makes them: the
/// order and its lines, the OrderPlaced event in the outbox, the history
/// entry.
async fn write_order(pool: &PgPool, catalog: &Catalog) -> Result<()> {
    let new = NewOrder::parse(&catalog.order())
        .map_err(|error| anyhow::anyhow!("invalid order: {error}"))?;
    let lines: Vec<PricedLine> = new
        .lines
        .iter()
        .map(|&(product, quantity)| (product, quantity, PRICE_MINOR))
        .collect();
    let total: i64 = lines.iter().map(|l| i64::from(l.1) * l.2).sum();
    let now = chrono::Utc::now();
    let order = OrderRow {
        id: Uuid::now_v7(),
        customer_id: new.customer_id,
        status: PENDING.to_owned(),
        cancel_reason: String::new(),
        total_minor: total,
        currency: CURRENCY.to_owned(),
        request_fingerprint: new.fingerprint(),
        placed_at: now,
        updated_at: now,
    };
    let money = |amount_minor| {
        Some(Money {
            amount_minor,
            currency: CURRENCY.to_owned(),
        })
    };
    let event = events::OrderPlaced {
        order_id: order.id.to_string(),
        customer_id: order.customer_id.to_string(),
        lines: lines
            .iter()
            .map(|&(product, quantity, unit)| events::OrderLine {
                product_id: product.to_string(),
                quantity,
                unit_price: money(unit),
            })
            .collect(),
        total: money(total),
        placed_at: Some(prost_types::Timestamp {
            seconds: now.timestamp(),
            nanos: now.timestamp_subsec_nanos() as i32,
        }),
    };

    let mut tx = pool.begin().await?;
    db::insert_order(&mut tx, &order, &new.idempotency_key, &lines).await?;
    let key = order.id.to_string();
    let record = shop_outbox::enqueue(
        &mut tx,
        Aggregate::new("order", &key),
        &event,
        &EventContext::new_flow(order.id),
    )
    .await?;
    db::add_history(
        &mut tx,
        order.id,
        record.message_id,
        &record.event_type,
        Some(record.occurred_at),
        "order placed",
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Successful PlaceOrder calls of a closed-loop run and their latencies.
#[derive(Debug)]
pub(crate) struct Calls {
    /// Latency of each successful call, in milliseconds.
    pub(crate) latencies_ms: Vec<f64>,
    /// The calls that failed.
    pub(crate) failures: Failures,
    /// From the start to the end of the last call.
    pub(crate) elapsed: Duration,
}

impl Calls {
    /// Successful calls per second.
    pub(crate) fn per_second(&self) -> f64 {
        self.latencies_ms.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// `callers` callers, each on its own connection, place orders back to back
/// for `duration`.
pub(crate) async fn closed_loop(
    addr: SocketAddr,
    catalog: Arc<Catalog>,
    callers: usize,
    duration: Duration,
) -> Result<Calls> {
    let mut clients = Vec::with_capacity(callers);
    for _ in 0..callers {
        clients.push(OrderServiceClient::new(connect(addr).await?));
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for mut client in clients {
        let catalog = catalog.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = Failures::default();
            while Instant::now() < deadline {
                let request = catalog.signed_order();
                let sent = Instant::now();
                match place(&mut client, request).await {
                    Ok(_) => latencies.push(millis(sent.elapsed())),
                    Err(status) => {
                        failures.add(&status);
                        // Do not spin on a service that answers at once.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (latencies, failures)
        });
    }
    let mut calls = Calls {
        latencies_ms: Vec::new(),
        failures: Failures::default(),
        elapsed: Duration::ZERO,
    };
    while let Some(result) = tasks.join_next().await {
        let (latencies, failures) = result.context("a PlaceOrder caller panicked")?;
        calls.latencies_ms.extend(latencies);
        calls.failures.merge(failures);
    }
    calls.elapsed = started.elapsed();
    Ok(calls)
}

/// An order placed by the open-loop schedule.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placed {
    /// The order's id.
    pub(crate) id: Uuid,
    /// When PlaceOrder was sent.
    pub(crate) sent: Instant,
    /// When PlaceOrder answered.
    pub(crate) answered: Instant,
}

/// What an open-loop run placed.
#[derive(Debug)]
pub(crate) struct Paced {
    /// Orders placed, in the order they were answered.
    pub(crate) placed: Vec<Placed>,
    /// The calls that failed.
    pub(crate) failures: Failures,
    /// Orders the schedule held.
    pub(crate) offered: usize,
    /// How late each call was sent against its slot, in milliseconds.
    pub(crate) lag_ms: Vec<f64>,
    /// From the first slot to the end of the last call.
    pub(crate) elapsed: Duration,
}

/// Places orders on a fixed schedule, `rate` a second for `duration`,
/// whatever the answers take: each slot's call is its own task, spread over
/// `connections` connections.
pub(crate) async fn open_loop(
    addr: SocketAddr,
    catalog: Arc<Catalog>,
    rate: f64,
    duration: Duration,
    connections: usize,
) -> Result<Paced> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        clients.push(OrderServiceClient::new(connect(addr).await?));
    }
    let offered = (rate * duration.as_secs_f64()).round() as usize;
    let period = Duration::from_secs_f64(1.0 / rate);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut paced = Paced {
        placed: Vec::with_capacity(offered),
        failures: Failures::default(),
        offered,
        lag_ms: Vec::with_capacity(offered),
        elapsed: Duration::ZERO,
    };
    let mut record = |result: Result<_, tokio::task::JoinError>| -> Result<()> {
        let (due, sent, answered, outcome): (Instant, Instant, Instant, Result<Uuid, Status>) =
            result.context("a PlaceOrder call panicked")?;
        paced
            .lag_ms
            .push(millis(sent.saturating_duration_since(due)));
        match outcome {
            Ok(id) => paced.placed.push(Placed { id, sent, answered }),
            Err(status) => paced.failures.add(&status),
        }
        Ok(())
    };

    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for slot in 0..offered {
        let due = started + period.mul_f64(slot as f64);
        tokio::time::sleep_until(due.into()).await;
        let permit = in_flight.clone().acquire_owned().await?;
        let mut client = clients[slot % clients.len()].clone();
        let request = catalog.signed_order();
        tasks.spawn(async move {
            let _permit = permit;
            let sent = Instant::now();
            let outcome = place(&mut client, request).await;
            (due, sent, Instant::now(), outcome)
        });
        while let Some(result) = tasks.try_join_next() {
            record(result)?;
        }
    }
    while let Some(result) = tasks.join_next().await {
        record(result)?;
    }
    paced.elapsed = started.elapsed();
    Ok(paced)
}

/// A duration in milliseconds.
pub(crate) fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
