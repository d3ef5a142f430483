//! The gRPC listener's accepted connections are configured for RPC traffic.

use tokio_stream::StreamExt;

#[tokio::test]
async fn accepted_grpc_connections_send_small_responses_without_delay() {
    let listener = shop_server::grpc::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = shop_server::grpc::incoming(listener);
    let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let accepted = incoming.next().await.unwrap().unwrap();
    assert!(
        accepted.nodelay().unwrap(),
        "Nagle's algorithm would hold each small response back until the client's delayed ACK"
    );
}
