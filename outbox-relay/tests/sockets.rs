//! The health endpoint's accepted connections answer probes at once.

use futures_util::StreamExt;

#[tokio::test]
async fn health_connections_send_small_responses_without_delay() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = outbox_relay::relay::health_incoming(listener);
    let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let accepted = incoming.next().await.unwrap().unwrap();
    assert!(
        accepted.nodelay().unwrap(),
        "Nagle's algorithm would hold each small response back until the client's delayed ACK"
    );
}
