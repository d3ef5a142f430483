//! The checkout's steps as a customer and staff take them, shared by the
//! tests that walk through it.

use std::time::Duration;

use anyhow::Result;
use shop_proto::inventory::v1::CreateProductRequest;
use shop_proto::order::v1::{
    GetOrderRequest, Order, OrderStatus, PlaceOrderLine, PlaceOrderRequest,
};
use shop_proto::types::v1::Money;
use shop_proto::user::v1::RegisterUserRequest;
use shop_tests::eventually;
use tonic::Code;

use super::System;

/// How long a step may take to show.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub fn eur(amount_minor: i64) -> Option<Money> {
    Some(Money {
        amount_minor,
        currency: "EUR".into(),
    })
}

pub async fn register(system: &System, email: &str) -> Result<String> {
    let user = system
        .user
        .clone()
        .register_user(RegisterUserRequest {
            name: "Ada Lovelace".into(),
            email: email.into(),
        })
        .await?
        .into_inner()
        .user
        .unwrap();
    Ok(user.user_id)
}

pub async fn product(system: &System, sku: &str, price: i64, stock: i32) -> Result<String> {
    let created = system
        .inventory
        .clone()
        .create_product(CreateProductRequest {
            sku: sku.into(),
            name: sku.into(),
            unit_price: eur(price),
            initial_stock: stock,
        })
        .await?
        .into_inner();
    Ok(created.product.unwrap().product_id)
}

pub fn request(customer: &str, lines: &[(&str, i32)], key: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        customer_id: customer.into(),
        lines: lines
            .iter()
            .map(|(product, quantity)| PlaceOrderLine {
                product_id: (*product).into(),
                quantity: *quantity,
            })
            .collect(),
        idempotency_key: key.into(),
    }
}

/// Places an order, waiting until the order service has learned the
/// customer and the products from their events.
pub async fn place(system: &System, request: PlaceOrderRequest) -> Result<Order> {
    eventually(TIMEOUT, "the order service to accept the order", || {
        let mut client = system.order.clone();
        let request = request.clone();
        async move {
            match client.place_order(request).await {
                Ok(response) => Ok(response.into_inner().order),
                Err(status) if status.code() == Code::NotFound => Ok(None),
                Err(status) => Err(status.into()),
            }
        }
    })
    .await
}

pub async fn wait_for(system: &System, order_id: &str, status: OrderStatus) -> Result<Order> {
    eventually(
        TIMEOUT,
        &format!("order {order_id} to be {status:?}"),
        || {
            let mut client = system.order.clone();
            let order_id = order_id.to_owned();
            async move {
                let order = client
                    .get_order(GetOrderRequest { order_id })
                    .await?
                    .into_inner()
                    .order
                    .unwrap();
                Ok((order.status() == status).then_some(order))
            }
        },
    )
    .await
}
