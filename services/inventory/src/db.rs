//! The inventory's SQL. Functions that change state take the caller's
//! transaction.

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

/// A product row with its stock.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ProductRow {
    pub id: Uuid,
    pub sku: String,
    pub name: String,
    pub price_minor: i64,
    pub currency: String,
    pub on_hand: i32,
    pub reserved: i32,
    /// Catalog version: 1 at creation, one more with every price change.
    pub version: i64,
}

const PRODUCT_COLUMNS: &str = "id, sku, name, price_minor, currency, on_hand, reserved, version";

pub async fn insert_product(
    tx: &mut Transaction<'_, Postgres>,
    product: &ProductRow,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO products (id, sku, name, price_minor, currency, on_hand) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(product.id)
    .bind(&product.sku)
    .bind(&product.name)
    .bind(product.price_minor)
    .bind(&product.currency)
    .bind(product.on_hand)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn product(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<ProductRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
}

pub async fn product_for_update(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
) -> sqlx::Result<Option<ProductRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1 FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
}

pub async fn list_products(
    pool: &PgPool,
    offset: i64,
    limit: i64,
) -> sqlx::Result<Vec<ProductRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PRODUCT_COLUMNS} FROM products ORDER BY sku OFFSET $1 LIMIT $2"
    )))
    .bind(offset)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Sets a product's price and returns its new catalog version.
pub async fn set_price(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    price_minor: i64,
) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "UPDATE products SET price_minor = $2, version = version + 1 WHERE id = $1 RETURNING version",
    )
    .bind(id)
    .bind(price_minor)
    .fetch_one(&mut **tx)
    .await
}

pub async fn restock(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    quantity: i32,
) -> sqlx::Result<Option<ProductRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE products SET on_hand = on_hand + $2 WHERE id = $1 RETURNING {PRODUCT_COLUMNS}"
    )))
    .bind(id)
    .bind(quantity)
    .fetch_optional(&mut **tx)
    .await
}

/// Locks the given products in id order (so concurrent reservations never
/// deadlock) and returns them.
pub async fn lock_products(conn: &mut PgConnection, ids: &[Uuid]) -> sqlx::Result<Vec<ProductRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PRODUCT_COLUMNS} FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE"
    )))
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// Whether an order was cancelled before its reservation, or already has
/// one: either way a (late or repeated) OrderPlaced reserves nothing.
pub async fn cancelled_or_reserved(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM cancelled_orders WHERE order_id = $1) \
             OR EXISTS (SELECT 1 FROM reservations WHERE order_id = $1)",
    )
    .bind(order_id)
    .fetch_one(conn)
    .await
}

pub async fn mark_cancelled(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO cancelled_orders (order_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(order_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Reserves `held` (product, quantity) for an order: raises each product's
/// reserved count and records the reservation, in two statements whatever
/// the number of lines. The products must already be locked.
pub async fn reserve(
    conn: &mut PgConnection,
    order_id: Uuid,
    held: &[(Uuid, i32)],
) -> sqlx::Result<()> {
    let (ids, quantities): (Vec<Uuid>, Vec<i32>) = held.iter().copied().unzip();
    sqlx::query(
        "UPDATE products p SET reserved = p.reserved + h.quantity \
         FROM unnest($1::uuid[], $2::int[]) AS h(product_id, quantity) \
         WHERE p.id = h.product_id",
    )
    .bind(&ids)
    .bind(&quantities)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO reservations (order_id, product_id, quantity, status) \
         SELECT $1, h.product_id, h.quantity, 'reserved' \
         FROM unnest($2::uuid[], $3::int[]) AS h(product_id, quantity)",
    )
    .bind(order_id)
    .bind(&ids)
    .bind(&quantities)
    .execute(conn)
    .await?;
    Ok(())
}

/// Ends an order's open reservation: `released` gives the units back,
/// `committed` takes them out of stock. Returns what was held.
pub async fn close_reservation(
    conn: &mut PgConnection,
    order_id: Uuid,
    status: &str,
) -> sqlx::Result<Vec<(Uuid, i32)>> {
    let held: Vec<(Uuid, i32)> = sqlx::query_as(
        "UPDATE reservations SET status = $2 WHERE order_id = $1 AND status = 'reserved' \
         RETURNING product_id, quantity",
    )
    .bind(order_id)
    .bind(status)
    .fetch_all(&mut *conn)
    .await?;
    if held.is_empty() {
        return Ok(held);
    }
    let (ids, quantities): (Vec<Uuid>, Vec<i32>) = held.iter().copied().unzip();
    // Products are locked in id order, as reservations lock them, so the
    // two never deadlock.
    lock_products(&mut *conn, &ids).await?;
    let take_from_stock = status == "committed";
    sqlx::query(
        "UPDATE products p SET reserved = p.reserved - h.quantity, \
             on_hand = p.on_hand - CASE WHEN $3 THEN h.quantity ELSE 0 END \
         FROM unnest($1::uuid[], $2::int[]) AS h(product_id, quantity) \
         WHERE p.id = h.product_id",
    )
    .bind(&ids)
    .bind(&quantities)
    .bind(take_from_stock)
    .execute(conn)
    .await?;
    Ok(held)
}

/// Puts back on hand the stock committed to an order cancelled after its
/// confirmation. Returns what went back (nothing if it was not committed,
/// or was put back before).
pub async fn restock_committed(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> sqlx::Result<Vec<(Uuid, i32)>> {
    let returned: Vec<(Uuid, i32)> = sqlx::query_as(
        "UPDATE reservations SET status = 'restocked' WHERE order_id = $1 AND status = 'committed' \
         RETURNING product_id, quantity",
    )
    .bind(order_id)
    .fetch_all(&mut *conn)
    .await?;
    if returned.is_empty() {
        return Ok(returned);
    }
    let (ids, quantities): (Vec<Uuid>, Vec<i32>) = returned.iter().copied().unzip();
    lock_products(&mut *conn, &ids).await?;
    sqlx::query(
        "UPDATE products p SET on_hand = p.on_hand + h.quantity \
         FROM unnest($1::uuid[], $2::int[]) AS h(product_id, quantity) \
         WHERE p.id = h.product_id",
    )
    .bind(&ids)
    .bind(&quantities)
    .execute(conn)
    .await?;
    Ok(returned)
}
