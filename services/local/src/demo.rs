//! `shop-local demo`: drives a running checkout like a customer would and
//! prints each order's saga as it happens. It mints its own tokens with the
//! local secret: a staff token to stock the shop, and a customer's.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use shop_proto::inventory::v1::CreateProductRequest;
use shop_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{
    GetOrderRequest, OrderStatus, PlaceOrderLine, PlaceOrderRequest, WatchOrderRequest,
};
use shop_proto::types::v1::Money;
use shop_proto::user::v1::RegisterUserRequest;
use shop_proto::user::v1::user_service_client::UserServiceClient;
use shop_server::auth::{AuthSettings, LocalTokens, signed};
use tonic::transport::Channel;

fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?.connect_lazy())
}

fn eur(amount_minor: i64) -> Option<Money> {
    Some(Money {
        amount_minor,
        currency: "EUR".into(),
    })
}

/// Seeds a customer and three products, then places an order that is paid,
/// one whose payment is declined and one that runs out of stock.
pub(crate) async fn run(
    order_addr: SocketAddr,
    inventory_addr: SocketAddr,
    user_addr: SocketAddr,
    decline_above_minor: i64,
    auth: &AuthSettings,
) -> anyhow::Result<()> {
    let mut orders = OrderServiceClient::new(channel(order_addr)?);
    let inventory = InventoryServiceClient::new(channel(inventory_addr)?);
    let mut users = UserServiceClient::new(channel(user_addr)?);
    let run = uuid_suffix();
    // With authentication off the services ignore the tokens.
    let (customer_token, staff_token) = match LocalTokens::new(auth) {
        Ok(tokens) => (
            tokens.customer(uuid::Uuid::now_v7()),
            tokens.staff("shop-local demo"),
        ),
        Err(_) => (String::new(), String::new()),
    };

    let customer = users
        .register_user(signed(
            &customer_token,
            RegisterUserRequest {
                name: "Demo Customer".into(),
                email: format!("demo-{run}@example.com"),
            },
        ))
        .await
        .context("failed to register the demo customer; is the checkout running?")?
        .into_inner()
        .user
        .context("no user in the response")?;
    println!(
        "registered customer {} ({})",
        customer.name, customer.user_id
    );

    let product = |sku: &str, name: &str, price: i64, stock: i32| {
        let request = CreateProductRequest {
            sku: format!("{sku}-{run}"),
            name: name.into(),
            unit_price: eur(price),
            initial_stock: stock,
        };
        let mut client = inventory.clone();
        let token = staff_token.clone();
        async move {
            let created = client
                .create_product(signed(&token, request))
                .await?
                .into_inner();
            let product = created.product.context("no product in the response")?;
            println!(
                "created product {} at {} minor units, stock {stock}",
                product.sku, price
            );
            anyhow::Ok(product.product_id)
        }
    };
    let mug = product("MUG", "Coffee mug", 1250, 100).await?;
    let tv = product("TV", "Wall-sized TV", decline_above_minor + 1, 5).await?;
    let lamp = product("LAMP", "Desk lamp", 3999, 1).await?;

    for (title, product_id, quantity) in [
        ("a paid order", &mug, 2),
        ("an order whose payment is declined", &tv, 1),
        ("an order for more lamps than there are", &lamp, 2),
    ] {
        println!("\n== {title}");
        let request = PlaceOrderRequest {
            customer_id: customer.user_id.clone(),
            lines: vec![PlaceOrderLine {
                product_id: product_id.clone(),
                quantity,
            }],
            idempotency_key: format!("demo-{run}-{product_id}"),
        };
        let order = place(&mut orders, &customer_token, request).await?;
        println!("placed order {order}");
        let mut stream = orders
            .watch_order(signed(
                &customer_token,
                WatchOrderRequest {
                    order_id: order.clone(),
                },
            ))
            .await?
            .into_inner();
        while let Some(update) = stream.message().await? {
            let update = update.order.context("no order in the update")?;
            println!("  status {:?} {}", update.status(), update.cancel_reason);
        }
        // Later steps (stock committed or released, the customer notified)
        // follow the final status; give them a moment, then print the saga.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let full = orders
            .get_order(signed(&customer_token, GetOrderRequest { order_id: order }))
            .await?
            .into_inner()
            .order
            .context("no order")?;
        for step in &full.history {
            let event = step.event_type.rsplit('.').next().unwrap_or_default();
            println!("  saga: {event:<28} {}", step.detail);
        }
        if full.status() == OrderStatus::Pending {
            println!("  (still pending)");
        }
    }
    Ok(())
}

/// Places an order, retrying while the order service has not yet learned
/// the new customer or products from their events.
async fn place(
    orders: &mut OrderServiceClient<Channel>,
    token: &str,
    request: PlaceOrderRequest,
) -> anyhow::Result<String> {
    for _ in 0..100 {
        match orders.place_order(signed(token, request.clone())).await {
            Ok(response) => return Ok(response.into_inner().order.context("no order")?.order_id),
            Err(status) if status.code() == tonic::Code::NotFound => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => return Err(status.into()),
        }
    }
    anyhow::bail!("the order service did not learn the customer and products within 10 s")
}

fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}", nanos & 0xffff_ffff)
}
