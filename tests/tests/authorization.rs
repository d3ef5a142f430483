//! Who may do what, on the whole checkout with authentication on: every
//! public call needs a valid bearer token, a customer reaches only what is
//! its own, and the catalog and stock are staff's.

mod support;

use std::time::Duration;

use anyhow::Result;
use shop_proto::inventory::v1::{
    ChangePriceRequest, CreateProductRequest, GetProductRequest, GetStockRequest,
    ListProductsRequest, RestockRequest,
};
use shop_proto::notification::v1::ListNotificationsRequest;
use shop_proto::order::v1::{
    CancelOrderRequest, GetOrderRequest, ListOrdersRequest, OrderStatus, PlaceOrderLine,
    PlaceOrderRequest, WatchOrderRequest,
};
use shop_proto::payment::v1::GetPaymentRequest;
use shop_proto::types::v1::Money;
use shop_proto::user::v1::{GetPurchaseHistoryRequest, GetUserRequest, RegisterUserRequest};
use shop_server::auth::{AuthSettings, LocalTokens, signed};
use shop_tests::eventually;
use support::{Options, System};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(60);
const SECRET: &str = "a test secret of at least thirty-two bytes";

async fn start() -> Result<(System, LocalTokens)> {
    let system = System::start_with(Options {
        auth_secret: Some(SECRET.into()),
        ..Options::default()
    })
    .await?;
    Ok((
        system,
        LocalTokens::new(&AuthSettings::shared_secret(SECRET))?,
    ))
}

fn eur(amount_minor: i64) -> Option<Money> {
    Some(Money {
        amount_minor,
        currency: "EUR".into(),
    })
}

fn code<T>(result: Result<T, Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// A registered customer: its id and token.
async fn customer(system: &System, tokens: &LocalTokens, email: &str) -> Result<(Uuid, String)> {
    let id = Uuid::now_v7();
    let token = tokens.customer(id);
    let user = system
        .user
        .clone()
        .register_user(signed(
            &token,
            RegisterUserRequest {
                name: "Customer".into(),
                email: email.into(),
            },
        ))
        .await?
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.user_id, id.to_string(), "a customer registers itself");
    Ok((id, token))
}

async fn product(system: &System, staff: &str, sku: &str) -> Result<String> {
    let created = system
        .inventory
        .clone()
        .create_product(signed(
            staff,
            CreateProductRequest {
                sku: sku.into(),
                name: sku.into(),
                unit_price: eur(1500),
                initial_stock: 10,
            },
        ))
        .await?
        .into_inner();
    Ok(created.product.unwrap().product_id)
}

fn order_request(customer: Uuid, product: &str, key: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        customer_id: customer.to_string(),
        lines: vec![PlaceOrderLine {
            product_id: product.into(),
            quantity: 1,
        }],
        idempotency_key: key.into(),
    }
}

/// Places an order as `token`, waiting until the order service knows the
/// customer and the product.
async fn place(system: &System, token: &str, request: PlaceOrderRequest) -> Result<String> {
    eventually(TIMEOUT, "the order to be accepted", || async {
        match system
            .order
            .clone()
            .place_order(signed(token, request.clone()))
            .await
        {
            Ok(response) => Ok(Some(response.into_inner().order.unwrap().order_id)),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(status.into()),
        }
    })
    .await
}

#[tokio::test]
async fn calls_without_a_valid_token_are_refused_while_health_and_reflection_stay_open()
-> Result<()> {
    let (system, tokens) = start().await?;
    let some_id = Uuid::now_v7().to_string();

    // No token at all, on every service.
    let refused = system
        .order
        .clone()
        .get_order(GetOrderRequest {
            order_id: some_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("Bearer"), "{refused:?}");
    let checks = [
        code(
            system
                .inventory
                .clone()
                .list_products(ListProductsRequest::default())
                .await,
        ),
        code(
            system
                .payment
                .clone()
                .get_payment(GetPaymentRequest {
                    order_id: some_id.clone(),
                })
                .await,
        ),
        code(
            system
                .notification
                .clone()
                .list_notifications(ListNotificationsRequest {
                    order_id: some_id.clone(),
                    ..Default::default()
                })
                .await,
        ),
        code(
            system
                .user
                .clone()
                .get_user(GetUserRequest {
                    user_id: some_id.clone(),
                })
                .await,
        ),
    ];
    assert_eq!(checks, [Code::Unauthenticated; 4]);

    // Tokens that are expired, from another issuer, for another audience
    // or signed with another key.
    let ours = AuthSettings::shared_secret(SECRET);
    let an_hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        - 3600;
    let expired = LocalTokens::new(&ours)?.token_until(&some_id, "", an_hour_ago);
    let foreign = LocalTokens::new(&AuthSettings {
        auth_issuer: "someone-else".into(),
        ..ours.clone()
    })?
    .customer(Uuid::now_v7());
    let elsewhere = LocalTokens::new(&AuthSettings {
        auth_audience: "another-shop".into(),
        ..ours.clone()
    })?
    .customer(Uuid::now_v7());
    let forged = LocalTokens::new(&AuthSettings::shared_secret(
        "another secret of at least thirty-two bytes",
    ))?
    .staff("mallory");
    for (token, reason) in [
        (expired.as_str(), "expired"),
        (foreign.as_str(), "issuer"),
        (elsewhere.as_str(), "audience"),
        (forged.as_str(), "signature"),
        ("not.a.token", "not a JWT"),
    ] {
        let status = system
            .inventory
            .clone()
            .list_products(signed(token, ListProductsRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{reason}");
        assert!(status.message().contains(reason), "{status:?}");
    }

    // A valid token works; health and reflection need none.
    system
        .inventory
        .clone()
        .list_products(signed(
            &tokens.customer(Uuid::now_v7()),
            ListProductsRequest::default(),
        ))
        .await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", system.order_addr))?
        .connect()
        .await?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "shop.order.v1.OrderService".into(),
        })
        .await?;
    system.stop().await
}

#[tokio::test]
async fn a_customer_reaches_only_its_own_orders_payments_notifications_and_profile() -> Result<()> {
    let (system, tokens) = start().await?;
    let staff = tokens.staff("ops");
    let (alice, alice_token) = customer(&system, &tokens, "alice@example.com").await?;
    let (_bob, bob_token) = customer(&system, &tokens, "bob@example.com").await?;
    let pen = product(&system, &staff, "PEN").await?;

    // Bob may not order as Alice.
    let status = system
        .order
        .clone()
        .place_order(signed(&bob_token, order_request(alice, &pen, "as-alice")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let order_id = place(&system, &alice_token, order_request(alice, &pen, "mine")).await?;
    eventually(TIMEOUT, "Alice's order to be confirmed", || async {
        let order = system
            .order
            .clone()
            .get_order(signed(
                &alice_token,
                GetOrderRequest {
                    order_id: order_id.clone(),
                },
            ))
            .await?
            .into_inner()
            .order
            .unwrap();
        Ok((order.status() == OrderStatus::Confirmed).then_some(()))
    })
    .await?;
    eventually(TIMEOUT, "Alice's purchase history", || async {
        let history = system
            .user
            .clone()
            .get_purchase_history(signed(
                &alice_token,
                GetPurchaseHistoryRequest {
                    user_id: alice.to_string(),
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        Ok((!history.purchases.is_empty()).then_some(()))
    })
    .await?;

    // Everything of Alice's, asked for with Bob's token: answered as if it
    // did not exist, or refused without saying whether it does.
    let order = || GetOrderRequest {
        order_id: order_id.clone(),
    };
    let as_bob = [
        (
            "GetOrder",
            code(
                system
                    .order
                    .clone()
                    .get_order(signed(&bob_token, order()))
                    .await,
            ),
            Code::NotFound,
        ),
        (
            "WatchOrder",
            code(
                system
                    .order
                    .clone()
                    .watch_order(signed(
                        &bob_token,
                        WatchOrderRequest {
                            order_id: order_id.clone(),
                        },
                    ))
                    .await,
            ),
            Code::NotFound,
        ),
        (
            "CancelOrder",
            code(
                system
                    .order
                    .clone()
                    .cancel_order(signed(
                        &bob_token,
                        CancelOrderRequest {
                            order_id: order_id.clone(),
                        },
                    ))
                    .await,
            ),
            Code::NotFound,
        ),
        (
            "ListOrders",
            code(
                system
                    .order
                    .clone()
                    .list_orders(signed(
                        &bob_token,
                        ListOrdersRequest {
                            customer_id: alice.to_string(),
                            ..Default::default()
                        },
                    ))
                    .await,
            ),
            Code::PermissionDenied,
        ),
        (
            "GetPayment",
            code(
                system
                    .payment
                    .clone()
                    .get_payment(signed(
                        &bob_token,
                        GetPaymentRequest {
                            order_id: order_id.clone(),
                        },
                    ))
                    .await,
            ),
            Code::NotFound,
        ),
        (
            "ListNotifications by customer",
            code(
                system
                    .notification
                    .clone()
                    .list_notifications(signed(
                        &bob_token,
                        ListNotificationsRequest {
                            customer_id: alice.to_string(),
                            ..Default::default()
                        },
                    ))
                    .await,
            ),
            Code::PermissionDenied,
        ),
        (
            "GetUser",
            code(
                system
                    .user
                    .clone()
                    .get_user(signed(
                        &bob_token,
                        GetUserRequest {
                            user_id: alice.to_string(),
                        },
                    ))
                    .await,
            ),
            Code::NotFound,
        ),
        (
            "GetPurchaseHistory",
            code(
                system
                    .user
                    .clone()
                    .get_purchase_history(signed(
                        &bob_token,
                        GetPurchaseHistoryRequest {
                            user_id: alice.to_string(),
                            ..Default::default()
                        },
                    ))
                    .await,
            ),
            Code::NotFound,
        ),
    ];
    for (rpc, got, expected) in as_bob {
        assert_eq!(got, expected, "{rpc} with another customer's token");
    }
    // Notifications by order show Bob none of Alice's.
    let listed = system
        .notification
        .clone()
        .list_notifications(signed(
            &bob_token,
            ListNotificationsRequest {
                order_id: order_id.clone(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    assert!(listed.notifications.is_empty());

    // Alice reaches all of it, and staff may read any order.
    eventually(TIMEOUT, "Alice's notification", || async {
        let listed = system
            .notification
            .clone()
            .list_notifications(signed(
                &alice_token,
                ListNotificationsRequest {
                    order_id: order_id.clone(),
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        Ok((!listed.notifications.is_empty()).then_some(()))
    })
    .await?;
    system
        .payment
        .clone()
        .get_payment(signed(
            &alice_token,
            GetPaymentRequest {
                order_id: order_id.clone(),
            },
        ))
        .await?;
    system
        .user
        .clone()
        .get_user(signed(
            &alice_token,
            GetUserRequest {
                user_id: alice.to_string(),
            },
        ))
        .await?;
    system
        .order
        .clone()
        .get_order(signed(&staff, order()))
        .await?;
    system.stop().await
}

#[tokio::test]
async fn catalog_price_and_stock_changes_are_for_staff_only() -> Result<()> {
    let (system, tokens) = start().await?;
    let staff = tokens.staff("ops");
    let shopper = tokens.customer(Uuid::now_v7());
    let lamp = product(&system, &staff, "LAMP").await?;

    let mut inventory = system.inventory.clone();
    let refused = [
        code(
            inventory
                .create_product(signed(
                    &shopper,
                    CreateProductRequest {
                        sku: "FREE".into(),
                        name: "Free lunch".into(),
                        unit_price: eur(0),
                        initial_stock: 1,
                    },
                ))
                .await,
        ),
        code(
            inventory
                .change_price(signed(
                    &shopper,
                    ChangePriceRequest {
                        product_id: lamp.clone(),
                        unit_price: eur(0),
                    },
                ))
                .await,
        ),
        code(
            inventory
                .restock(signed(
                    &shopper,
                    RestockRequest {
                        product_id: lamp.clone(),
                        quantity: 100,
                    },
                ))
                .await,
        ),
    ];
    assert_eq!(refused, [Code::PermissionDenied; 3]);

    // Nothing changed; customers still read the catalog.
    let stock = inventory
        .get_stock(signed(
            &shopper,
            GetStockRequest {
                product_id: lamp.clone(),
            },
        ))
        .await?
        .into_inner()
        .stock
        .unwrap();
    assert_eq!(stock.on_hand, 10);
    let found = inventory
        .get_product(signed(
            &shopper,
            GetProductRequest {
                product_id: lamp.clone(),
            },
        ))
        .await?
        .into_inner()
        .product
        .unwrap();
    assert_eq!(found.unit_price, eur(1500));

    // Staff may.
    inventory
        .change_price(signed(
            &staff,
            ChangePriceRequest {
                product_id: lamp.clone(),
                unit_price: eur(1800),
            },
        ))
        .await?;
    inventory
        .restock(signed(
            &staff,
            RestockRequest {
                product_id: lamp,
                quantity: 5,
            },
        ))
        .await?;
    system.stop().await
}

#[tokio::test]
async fn registration_never_tells_whether_an_address_is_in_use() -> Result<()> {
    let (system, tokens) = start().await?;
    let (first, first_token) = customer(&system, &tokens, "shared@example.com").await?;
    // Another customer with the same address is registered just the same.
    let (second, _) = customer(&system, &tokens, "shared@example.com").await?;
    assert_ne!(first, second);

    // Registering oneself again: the same details get the same answer,
    // other details are refused (which says nothing about anyone else).
    let mut users = system.user.clone();
    let again = users
        .register_user(signed(
            &first_token,
            RegisterUserRequest {
                name: "Customer".into(),
                email: "shared@example.com".into(),
            },
        ))
        .await?
        .into_inner()
        .user
        .unwrap();
    assert_eq!(again.user_id, first.to_string());
    let changed = users
        .register_user(signed(
            &first_token,
            RegisterUserRequest {
                name: "Someone Else".into(),
                email: "shared@example.com".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(changed.code(), Code::AlreadyExists);
    system.stop().await
}
