//! The `InventoryService` gRPC API. Each command validates its input, then
//! changes the catalog and writes its event in one transaction.

use shop_outbox::{Aggregate, EventContext};
use shop_proto::events::v1 as events;
use shop_proto::inventory::v1::inventory_service_server::InventoryService;
use shop_proto::inventory::v1::*;
use shop_proto::types::v1::Money;
use shop_server::auth::Caller;
use shop_server::{ServiceError, validate};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::db::{self, ProductRow};
use crate::domain::{self, MAX_STOCK_CHANGE};

/// The gRPC API over the inventory database.
#[derive(Debug, Clone)]
pub struct Inventory {
    pool: PgPool,
}

impl Inventory {
    /// An API over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn product_message(row: &ProductRow) -> Product {
    Product {
        product_id: row.id.to_string(),
        sku: row.sku.clone(),
        name: row.name.clone(),
        unit_price: Some(Money {
            amount_minor: row.price_minor,
            currency: row.currency.clone(),
        }),
    }
}

fn stock_message(row: &ProductRow) -> Stock {
    Stock {
        product_id: row.id.to_string(),
        on_hand: row.on_hand,
        reserved: row.reserved,
        available: row.on_hand - row.reserved,
    }
}

fn not_found(id: Uuid) -> ServiceError {
    ServiceError::NotFound(format!("product {id} does not exist"))
}

#[tonic::async_trait]
impl InventoryService for Inventory {
    #[tracing::instrument(skip_all, fields(sku = %request.get_ref().sku))]
    async fn create_product(
        &self,
        request: Request<CreateProductRequest>,
    ) -> Result<Response<CreateProductResponse>, Status> {
        Caller::of(&request)?.require_staff()?;
        let request = request.into_inner();
        let sku = domain::sku("sku", &request.sku)?;
        let name = validate::text("name", &request.name, 200)?;
        let (price_minor, currency) = validate::money("unit_price", request.unit_price.as_ref())?;
        if !(0..=MAX_STOCK_CHANGE).contains(&request.initial_stock) {
            return Err(ServiceError::invalid(
                "initial_stock",
                format!("must be between 0 and {MAX_STOCK_CHANGE}"),
            )
            .into());
        }
        let row = ProductRow {
            id: Uuid::now_v7(),
            sku,
            name,
            price_minor,
            currency,
            on_hand: request.initial_stock,
            reserved: 0,
            version: 1,
        };
        let mut tx = self.pool.begin().await.map_err(ServiceError::from)?;
        if let Err(error) = db::insert_product(&mut tx, &row).await {
            return Err(match ServiceError::from(error) {
                ServiceError::AlreadyExists(_) => {
                    ServiceError::AlreadyExists(format!("a product with sku {} exists", row.sku))
                }
                other => other,
            }
            .into());
        }
        let product = product_message(&row);
        let event = events::ProductCreated {
            product_id: product.product_id.clone(),
            sku: product.sku.clone(),
            name: product.name.clone(),
            unit_price: product.unit_price.clone(),
            version: row.version,
        };
        let id = row.id.to_string();
        shop_outbox::enqueue(
            &mut tx,
            Aggregate::new("product", &id),
            &event,
            &EventContext::new_flow(row.id),
        )
        .await
        .map_err(ServiceError::from)?;
        tx.commit().await.map_err(ServiceError::commit)?;
        Ok(Response::new(CreateProductResponse {
            product: Some(product),
            stock: Some(stock_message(&row)),
        }))
    }

    #[tracing::instrument(skip_all, fields(product_id = %request.get_ref().product_id))]
    async fn change_price(
        &self,
        request: Request<ChangePriceRequest>,
    ) -> Result<Response<ChangePriceResponse>, Status> {
        Caller::of(&request)?.require_staff()?;
        let request = request.into_inner();
        let id = validate::uuid("product_id", &request.product_id)?;
        let (price_minor, currency) = validate::money("unit_price", request.unit_price.as_ref())?;
        let mut tx = self.pool.begin().await.map_err(ServiceError::from)?;
        let mut row = db::product_for_update(&mut tx, id)
            .await
            .map_err(ServiceError::from)?
            .ok_or_else(|| not_found(id))?;
        if row.currency != currency {
            return Err(ServiceError::FailedPrecondition(format!(
                "product {id} is priced in {}; a price change cannot switch currency",
                row.currency
            ))
            .into());
        }
        let old_price = Money {
            amount_minor: row.price_minor,
            currency: row.currency.clone(),
        };
        row.version = db::set_price(&mut tx, id, price_minor)
            .await
            .map_err(ServiceError::from)?;
        row.price_minor = price_minor;
        let event = events::ProductPriceChanged {
            product_id: id.to_string(),
            old_price: Some(old_price),
            new_price: Some(Money {
                amount_minor: price_minor,
                currency,
            }),
            version: row.version,
        };
        let key = id.to_string();
        shop_outbox::enqueue(
            &mut tx,
            Aggregate::new("product", &key),
            &event,
            &EventContext::new_flow(Uuid::now_v7()),
        )
        .await
        .map_err(ServiceError::from)?;
        tx.commit().await.map_err(ServiceError::commit)?;
        Ok(Response::new(ChangePriceResponse {
            product: Some(product_message(&row)),
        }))
    }

    #[tracing::instrument(skip_all, fields(product_id = %request.get_ref().product_id))]
    async fn restock(
        &self,
        request: Request<RestockRequest>,
    ) -> Result<Response<RestockResponse>, Status> {
        Caller::of(&request)?.require_staff()?;
        let request = request.into_inner();
        let id = validate::uuid("product_id", &request.product_id)?;
        if !(1..=MAX_STOCK_CHANGE).contains(&request.quantity) {
            return Err(ServiceError::invalid(
                "quantity",
                format!("must be between 1 and {MAX_STOCK_CHANGE}"),
            )
            .into());
        }
        let mut tx = self.pool.begin().await.map_err(ServiceError::from)?;
        let row = db::restock(&mut tx, id, request.quantity)
            .await
            .map_err(ServiceError::from)?
            .ok_or_else(|| not_found(id))?;
        tx.commit().await.map_err(ServiceError::commit)?;
        Ok(Response::new(RestockResponse {
            stock: Some(stock_message(&row)),
        }))
    }

    async fn get_product(
        &self,
        request: Request<GetProductRequest>,
    ) -> Result<Response<GetProductResponse>, Status> {
        let id = validate::uuid("product_id", &request.get_ref().product_id)?;
        let row = db::product(&self.pool, id)
            .await
            .map_err(ServiceError::from)?
            .ok_or_else(|| not_found(id))?;
        Ok(Response::new(GetProductResponse {
            product: Some(product_message(&row)),
        }))
    }

    async fn get_stock(
        &self,
        request: Request<GetStockRequest>,
    ) -> Result<Response<GetStockResponse>, Status> {
        let id = validate::uuid("product_id", &request.get_ref().product_id)?;
        let row = db::product(&self.pool, id)
            .await
            .map_err(ServiceError::from)?
            .ok_or_else(|| not_found(id))?;
        Ok(Response::new(GetStockResponse {
            stock: Some(stock_message(&row)),
        }))
    }

    async fn list_products(
        &self,
        request: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        let request = request.into_inner();
        let limit = validate::page_size("page_size", request.page_size, 20, 100)?;
        let offset = validate::page_token("page_token", &request.page_token)?;
        let rows = db::list_products(&self.pool, offset, limit)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(ListProductsResponse {
            next_page_token: validate::next_page_token(offset, limit, rows.len()),
            products: rows.iter().map(product_message).collect(),
        }))
    }
}
