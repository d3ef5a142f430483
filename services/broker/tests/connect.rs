//! Connecting to the nodes of a cluster: a node that refuses connections or
//! never answers is passed over for the next, within the connect timeout.

use std::time::Duration;

use shop_broker::BrokerSettings;
use shop_tests::servers;

/// A port nothing listens on: connections to it are refused.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_dead_node_and_a_silent_node_are_passed_over_for_a_live_one() -> anyhow::Result<()> {
    // Accepts TCP connections (the kernel does) but never speaks AMQP.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let silent_port = silent.local_addr()?.port();
    let live = &servers().await.amqp_url;
    let mut settings = BrokerSettings::new(&format!(
        "amqp://guest:secret@127.0.0.1:{}/%2f,amqp://guest:secret@127.0.0.1:{silent_port}/%2f,{live}",
        closed_port()
    ));
    settings.amqp_connect_timeout = Duration::from_secs(1);
    settings.validate()?;
    // Each connection starts at a random node; every one must end on the
    // live node whatever the order.
    for _ in 0..6 {
        let connection = settings.connect("failover-test").await?;
        assert!(connection.status().connected());
        connection.close(200, "OK".into()).await?;
    }
    Ok(())
}

#[tokio::test]
async fn with_no_node_answering_the_error_names_each_node_without_its_password()
-> anyhow::Result<()> {
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let silent_port = silent.local_addr()?.port();
    let closed = closed_port();
    let mut settings = BrokerSettings::new(&format!(
        "amqp://guest:secret@127.0.0.1:{closed}/%2f,amqp://guest:secret@127.0.0.1:{silent_port}/%2f"
    ));
    settings.amqp_connect_timeout = Duration::from_millis(500);
    let error = settings
        .connect("failover-test")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains(&format!("127.0.0.1:{closed}")), "{error}");
    assert!(
        error.contains(&format!("127.0.0.1:{silent_port}")),
        "{error}"
    );
    assert!(error.contains("no answer within"), "{error}");
    assert!(!error.contains("secret"), "{error}");
    Ok(())
}
