//! Server reflection lists exactly the services a server serves, plus
//! health, and describes them, so `grpcurl list` and `describe` work without
//! proto files.

use tokio_util::sync::CancellationToken;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn ask(
    client: &mut ServerReflectionClient<tonic::transport::Channel>,
    request: MessageRequest,
) -> anyhow::Result<MessageResponse> {
    let outbound = tokio_stream::once(ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    });
    let mut responses = client.server_reflection_info(outbound).await?.into_inner();
    let response = responses.message().await?.expect("a reflection response");
    Ok(response.message_response.expect("a message response"))
}

#[tokio::test]
async fn reflection_lists_and_describes_the_served_service() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(shop_server::grpc::serve(
        listener,
        tonic::service::Routes::default(),
        &["shop.order.v1.OrderService"],
        Default::default(),
        shutdown.clone(),
    ));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = ServerReflectionClient::new(channel);

    let MessageResponse::ListServicesResponse(list) =
        ask(&mut client, MessageRequest::ListServices(String::new())).await?
    else {
        panic!("not a list of services");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        vec!["grpc.health.v1.Health", "shop.order.v1.OrderService"]
    );

    let MessageResponse::FileDescriptorResponse(files) = ask(
        &mut client,
        MessageRequest::FileContainingSymbol("shop.order.v1.OrderService".into()),
    )
    .await?
    else {
        panic!("not a file descriptor");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    shutdown.cancel();
    server.await??;
    Ok(())
}
