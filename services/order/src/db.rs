//! The order service's SQL.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::{Price, PricedLine};

/// An order row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OrderRow {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub status: String,
    pub cancel_reason: String,
    pub total_minor: i64,
    pub currency: String,
    pub request_fingerprint: String,
    pub placed_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An order with its lines and history.
#[derive(Debug, Clone)]
pub struct FullOrder {
    pub order: OrderRow,
    pub lines: Vec<PricedLine>,
    pub history: Vec<(String, DateTime<Utc>, String)>,
}

const ORDER_COLUMNS: &str = "id, customer_id, status, cancel_reason, total_minor, currency, \
     request_fingerprint, placed_at, updated_at";

/// The condition under which a catalog change at version `param` replaces
/// what the copy holds at `catalog.version`: only a newer version does.
/// Version 0 comes from producers that predate versions (during a rolling
/// upgrade): such a change is applied as it always was, and leaves the
/// copy's version as it is.
fn newer(param: &str) -> String {
    format!("(catalog.version < {param} OR {param} = 0)")
}

/// Adds a product to the catalog copy, or updates it if `version` is newer
/// than the copy's.
pub async fn upsert_product(
    conn: &mut PgConnection,
    id: Uuid,
    sku: &str,
    name: &str,
    price: &Price,
    version: i64,
) -> sqlx::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO catalog (product_id, sku, name, price_minor, currency, version) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (product_id) DO UPDATE \
         SET sku = $2, name = $3, price_minor = $4, currency = $5, \
             version = greatest(catalog.version, $6), updated_at = now() \
         WHERE {}",
        newer("$6")
    )))
    .bind(id)
    .bind(sku)
    .bind(name)
    .bind(price.price_minor)
    .bind(&price.currency)
    .bind(version)
    .execute(conn)
    .await?;
    Ok(())
}

/// What became of a price change applied to the catalog copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriceUpdate {
    Applied,
    /// The copy already holds this version or a newer one.
    Stale,
    /// The product is not in the copy yet.
    Unknown,
}

/// Sets a known product's price if `version` is newer than the copy's.
pub async fn set_price(
    conn: &mut PgConnection,
    id: Uuid,
    price: &Price,
    version: i64,
) -> sqlx::Result<PriceUpdate> {
    let (known, applied): (bool, bool) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH updated AS ( \
             UPDATE catalog SET price_minor = $2, currency = $3, \
                 version = greatest(catalog.version, $4), updated_at = now() \
             WHERE product_id = $1 AND {} RETURNING 1) \
         SELECT EXISTS (SELECT 1 FROM catalog WHERE product_id = $1), EXISTS (SELECT 1 FROM updated)",
        newer("$4")
    )))
    .bind(id)
    .bind(price.price_minor)
    .bind(&price.currency)
    .bind(version)
    .fetch_one(conn)
    .await?;
    Ok(match (known, applied) {
        (_, true) => PriceUpdate::Applied,
        (true, false) => PriceUpdate::Stale,
        (false, false) => PriceUpdate::Unknown,
    })
}

pub async fn add_customer(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO customers (customer_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// One row of [`customer_and_prices`]: whether the customer is known, and
/// one product's price (none when no product is known).
type CustomerAndPrice = (bool, Option<Uuid>, Option<i64>, Option<String>);

/// What PlaceOrder needs to know before it writes, in one round trip:
/// whether the customer is known, and the prices of the products that are.
pub async fn customer_and_prices(
    conn: &mut PgConnection,
    customer_id: Uuid,
    products: &[Uuid],
) -> sqlx::Result<(bool, HashMap<Uuid, Price>)> {
    let rows: Vec<CustomerAndPrice> = sqlx::query_as(
        "SELECT c.known, p.product_id, p.price_minor, p.currency \
         FROM (SELECT EXISTS (SELECT 1 FROM customers WHERE customer_id = $1) AS known) c \
         LEFT JOIN catalog p ON p.product_id = ANY($2)",
    )
    .bind(customer_id)
    .bind(products)
    .fetch_all(conn)
    .await?;
    let known = rows.first().is_some_and(|row| row.0);
    let prices = rows
        .into_iter()
        .filter_map(|(_, id, price_minor, currency)| {
            Some((
                id?,
                Price {
                    price_minor: price_minor?,
                    currency: currency?,
                },
            ))
        })
        .collect();
    Ok((known, prices))
}

pub async fn find_by_key(
    conn: &mut PgConnection,
    customer_id: Uuid,
    key: &str,
) -> sqlx::Result<Option<OrderRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE customer_id = $1 AND idempotency_key = $2"
    )))
    .bind(customer_id)
    .bind(key)
    .fetch_optional(conn)
    .await
}

/// Inserts an order and its lines, unless the customer already used the
/// order's idempotency key (then nothing is written). Returns whether the
/// order was inserted. A concurrent insert with the same key is waited for.
pub async fn insert_order(
    conn: &mut PgConnection,
    order: &OrderRow,
    key: &str,
    lines: &[PricedLine],
) -> sqlx::Result<bool> {
    let products: Vec<Uuid> = lines.iter().map(|l| l.0).collect();
    let quantities: Vec<i32> = lines.iter().map(|l| l.1).collect();
    let prices: Vec<i64> = lines.iter().map(|l| l.2).collect();
    sqlx::query_scalar(
        "WITH o AS ( \
             INSERT INTO orders (id, customer_id, status, total_minor, currency, idempotency_key, \
                                 request_fingerprint, placed_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
             ON CONFLICT (customer_id, idempotency_key) DO NOTHING \
             RETURNING id), \
         l AS ( \
             INSERT INTO order_lines (order_id, line_no, product_id, quantity, unit_price_minor) \
             SELECT o.id, l.no, l.product_id, l.quantity, l.price \
             FROM o, unnest($9::uuid[], $10::int[], $11::bigint[]) \
                  WITH ORDINALITY AS l(product_id, quantity, price, no)) \
         SELECT EXISTS (SELECT 1 FROM o)",
    )
    .bind(order.id)
    .bind(order.customer_id)
    .bind(&order.status)
    .bind(order.total_minor)
    .bind(&order.currency)
    .bind(key)
    .bind(&order.request_fingerprint)
    .bind(order.placed_at)
    .bind(&products)
    .bind(&quantities)
    .bind(&prices)
    .fetch_one(conn)
    .await
}

/// Locks an order for a status change.
///
/// `FOR NO KEY UPDATE`, the lock an `UPDATE` of non-key columns takes:
/// status changes wait for each other, while the foreign-key checks of
/// rows added to the order (its history) do not wait for them.
pub async fn lock_order(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<OrderRow>> {
    lock_order_of(conn, id, None).await
}

/// Locks an order, only if it is `customer`'s when one is given: an order
/// of someone else's is neither locked nor waited for.
pub async fn lock_order_of(
    conn: &mut PgConnection,
    id: Uuid,
    customer: Option<Uuid>,
) -> sqlx::Result<Option<OrderRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 AND ($2::uuid IS NULL OR customer_id = $2) \
         FOR NO KEY UPDATE"
    )))
    .bind(id)
    .bind(customer)
    .fetch_optional(conn)
    .await
}

pub async fn set_status(
    conn: &mut PgConnection,
    id: Uuid,
    status: &str,
    cancel_reason: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE orders SET status = $2, cancel_reason = $3, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(cancel_reason)
    .execute(&mut *conn)
    .await?;
    crate::watch::announce(conn, id).await
}

/// Adds a saga step to an order's history (once per message), at the time
/// the event occurred (now, if it is not known). Steps are ordered by that
/// time, so they read in saga order however late each event was handled.
pub async fn add_history(
    conn: &mut PgConnection,
    order_id: Uuid,
    message_id: Uuid,
    event_type: &str,
    occurred_at: Option<DateTime<Utc>>,
    detail: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO order_history (order_id, message_id, event_type, occurred_at, detail) \
         VALUES ($1, $2, $3, coalesce($4, clock_timestamp()), $5) ON CONFLICT DO NOTHING",
    )
    .bind(order_id)
    .bind(message_id)
    .bind(event_type)
    .bind(occurred_at)
    .bind(detail)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn load(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<FullOrder>> {
    load_of(pool, id, None).await
}

/// Loads an order, only if it is `customer`'s when one is given (so an
/// order of someone else's is looked up exactly like a missing one).
pub async fn load_of(
    pool: &PgPool,
    id: Uuid,
    customer: Option<Uuid>,
) -> sqlx::Result<Option<FullOrder>> {
    let order: Option<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 AND ($2::uuid IS NULL OR customer_id = $2)"
    )))
    .bind(id)
    .bind(customer)
    .fetch_optional(pool)
    .await?;
    match order {
        Some(order) => Ok(Some(complete(pool, order).await?)),
        None => Ok(None),
    }
}

pub async fn list_by_customer(
    pool: &PgPool,
    customer_id: Uuid,
    offset: i64,
    limit: i64,
) -> sqlx::Result<Vec<FullOrder>> {
    let rows: Vec<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE customer_id = $1 \
         ORDER BY placed_at DESC, id DESC OFFSET $2 LIMIT $3"
    )))
    .bind(customer_id)
    .bind(offset)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut orders = Vec::with_capacity(rows.len());
    for row in rows {
        orders.push(complete(pool, row).await?);
    }
    Ok(orders)
}

/// An order's lines: (product, quantity, unit price).
pub async fn load_lines(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<Vec<PricedLine>> {
    sqlx::query_as("SELECT product_id, quantity, unit_price_minor FROM order_lines WHERE order_id = $1 ORDER BY line_no")
        .bind(order_id)
        .fetch_all(conn)
        .await
}

async fn complete(pool: &PgPool, order: OrderRow) -> sqlx::Result<FullOrder> {
    let lines = sqlx::query_as(
        "SELECT product_id, quantity, unit_price_minor FROM order_lines WHERE order_id = $1 ORDER BY line_no",
    )
    .bind(order.id)
    .fetch_all(pool)
    .await?;
    let history = sqlx::query_as(
        "SELECT event_type, occurred_at, detail FROM order_history WHERE order_id = $1 ORDER BY occurred_at, event_type",
    )
    .bind(order.id)
    .fetch_all(pool)
    .await?;
    Ok(FullOrder {
        order,
        lines,
        history,
    })
}
