//! Every binary's configuration parses with its defaults, which work on
//! localhost, and accepts the documented ways to switch things off.

use clap::Parser;

#[test]
fn services_start_from_defaults_that_work_on_localhost() {
    let order = order_service::Settings::try_parse_from(["order-service"]).unwrap();
    assert_eq!(order.grpc_addr.to_string(), "127.0.0.1:50051");
    assert_eq!(
        order.metrics_addr.map(|a| a.to_string()).as_deref(),
        Some("127.0.0.1:9461")
    );
    assert_eq!(order.subscriber.exchange, "shop.events");

    let inventory = inventory_service::Settings::try_parse_from(["inventory-service"]).unwrap();
    assert_eq!(inventory.grpc_addr.port(), 50052);
    let payment = payment_service::Settings::try_parse_from(["payment-service"]).unwrap();
    assert_eq!(
        (payment.grpc_addr.port(), payment.decline_above_minor),
        (50053, 100_000)
    );
    let notification =
        notification_service::Settings::try_parse_from(["notification-service"]).unwrap();
    assert_eq!(notification.grpc_addr.port(), 50054);
    let user = user_service::Settings::try_parse_from(["user-service"]).unwrap();
    assert_eq!(user.grpc_addr.port(), 50055);
}

#[test]
fn an_empty_metrics_address_turns_the_endpoint_off() {
    let order =
        order_service::Settings::try_parse_from(["order-service", "--metrics-addr", ""]).unwrap();
    assert_eq!(order.metrics_addr, None);
}

#[test]
fn a_malformed_address_is_refused_with_the_flag_named() {
    let error = user_service::Settings::try_parse_from(["user-service", "--grpc-addr", "nowhere"])
        .unwrap_err();
    assert!(error.to_string().contains("--grpc-addr"), "{error}");
}

#[test]
fn a_broker_client_certificate_needs_its_key_and_several_nodes_are_accepted() {
    let error = user_service::Settings::try_parse_from([
        "user-service",
        "--amqp-client-cert",
        "/etc/shop/client.pem",
    ])
    .unwrap_err();
    assert!(error.to_string().contains("--amqp-client-key"), "{error}");

    let user = user_service::Settings::try_parse_from([
        "user-service",
        "--amqp-url",
        "amqps://a:5671/%2f,amqps://b:5671/%2f",
    ])
    .unwrap();
    assert_eq!(user.subscriber.broker.nodes().len(), 2);
}
