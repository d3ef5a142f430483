//! `GET /v1/orders/{order_id}/details`: an order with its payment, the
//! notifications sent about it and the stock of its products, asked
//! of the services concurrently with the caller's own token. Without the
//! order service there is nothing to show (503); without any other, the
//! answer is partial and says which parts are missing and why.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use prost::Message;
use serde_json::{Value as Json, json};
use shop_proto::inventory::v1::GetStockRequest;
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_proto::notification::v1::ListNotificationsRequest;
use shop_proto::notification::v1::notification_service_client::NotificationServiceClient;
use shop_proto::order::v1::GetOrderRequest;
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::payment::v1::GetPaymentRequest;
use shop_proto::payment::v1::payment_service_client::PaymentServiceClient;
use tonic::Code;

use crate::Gateway;
use crate::problem::Problem;
use crate::transcode::{metadata, to_json};

/// Most notifications listed with an order.
const NOTIFICATIONS: i32 = 100;

/// A part of the details: its JSON, `null` when the service has nothing
/// (NOT_FOUND), or the problem that kept it out.
fn part<T: Message>(
    gateway: &Gateway,
    message_name: &str,
    result: Result<T, tonic::Status>,
) -> Result<Json, Problem> {
    match result {
        Ok(message) => {
            let descriptor = gateway
                .pool
                .get_message_by_name(message_name)
                .ok_or_else(|| Problem::from_status(&tonic::Status::internal("unknown message")))?;
            to_json(&descriptor, Bytes::from(message.encode_to_vec()))
        }
        Err(status) if status.code() == Code::NotFound => Ok(Json::Null),
        Err(status) => Err(Problem::from_status(&status)),
    }
}

pub async fn handler(
    State(gateway): State<Arc<Gateway>>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let metadata = metadata(&headers);
    let (Some(orders), Some(payments), Some(notifications), Some(inventory)) = (
        gateway.upstream("order"),
        gateway.upstream("payment"),
        gateway.upstream("notification"),
        gateway.upstream("inventory"),
    ) else {
        return Problem::unavailable("a service is not configured").into_response();
    };

    let order = orders
        .guarded(async {
            OrderServiceClient::new(orders.channel())
                .get_order(orders.request(
                    GetOrderRequest {
                        order_id: order_id.clone(),
                    },
                    &metadata,
                ))
                .await
        })
        .await;
    let order = match order.map(|response| response.into_inner().order) {
        Ok(Some(order)) => order,
        Ok(None) => {
            return Problem::from_status(&tonic::Status::internal("empty answer")).into_response();
        }
        Err(status) => return Problem::from_status(&status).into_response(),
    };

    let payment = payments.guarded(async {
        PaymentServiceClient::new(payments.channel())
            .get_payment(payments.request(
                GetPaymentRequest {
                    order_id: order_id.clone(),
                },
                &metadata,
            ))
            .await
            .map(|response| response.into_inner().payment.unwrap_or_default())
    });
    let listed = notifications.guarded(async {
        NotificationServiceClient::new(notifications.channel())
            .list_notifications(notifications.request(
                ListNotificationsRequest {
                    customer_id: String::new(),
                    order_id: order_id.clone(),
                    page_size: NOTIFICATIONS,
                    page_token: String::new(),
                },
                &metadata,
            ))
            .await
            .map(|response| response.into_inner())
    });
    let products: BTreeSet<String> = order
        .lines
        .iter()
        .map(|line| line.product_id.clone())
        .collect();
    // Every product's stock at once; a product gone from the catalog is
    // left out.
    let stock = inventory.guarded(async {
        let asks = products.into_iter().map(|product_id| {
            let mut client = InventoryServiceClient::new(inventory.channel());
            let request = inventory.request(GetStockRequest { product_id }, &metadata);
            async move { client.get_stock(request).await }
        });
        let mut stocks = Vec::new();
        for answer in futures_util::future::join_all(asks).await {
            match answer {
                Ok(response) => stocks.extend(response.into_inner().stock),
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => return Err(status),
            }
        }
        Ok(stocks)
    });
    let (payment, listed, stock) = tokio::join!(payment, listed, stock);

    let mut body = serde_json::Map::new();
    let mut missing = Vec::new();
    match part(&gateway, "shop.order.v1.Order", Ok(order)) {
        Ok(json) => body.insert("order".into(), json),
        Err(problem) => return problem.into_response(),
    };
    match part(&gateway, "shop.payment.v1.Payment", payment) {
        Ok(json) => {
            body.insert("payment".into(), json);
        }
        Err(problem) => missing.push(json!({ "part": "payment", "problem": problem })),
    }
    match part(
        &gateway,
        "shop.notification.v1.ListNotificationsResponse",
        listed,
    ) {
        Ok(json) => {
            let listed = json.get("notifications").cloned();
            body.insert(
                "notifications".into(),
                listed.unwrap_or(Json::Array(Vec::new())),
            );
        }
        Err(problem) => missing.push(json!({ "part": "notifications", "problem": problem })),
    }
    match stock {
        Ok(stocks) => {
            let mut all = Vec::new();
            for stock in stocks {
                match part(&gateway, "shop.inventory.v1.Stock", Ok(stock)) {
                    Ok(json) => all.push(json),
                    Err(problem) => return problem.into_response(),
                }
            }
            body.insert("stock".into(), Json::Array(all));
        }
        Err(status) => {
            missing.push(json!({ "part": "stock", "problem": Problem::from_status(&status) }))
        }
    }
    body.insert("partial".into(), Json::Bool(!missing.is_empty()));
    body.insert("missing".into(), Json::Array(missing));
    axum::Json(Json::Object(body)).into_response()
}
