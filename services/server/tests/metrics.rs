//! gRPC metrics are labelled with the server's own methods only: calls to
//! paths a client made up share one `unknown` series, so no client can
//! grow the metrics without bound.

use metrics_exporter_prometheus::PrometheusBuilder;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http::uri::PathAndQuery;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn calls_to_made_up_methods_share_one_unknown_series() -> anyhow::Result<()> {
    let recorder = PrometheusBuilder::new().install_recorder()?;
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

    for n in 0..500 {
        let mut client = tonic::client::Grpc::new(channel.clone());
        client.ready().await?;
        let path = PathAndQuery::try_from(format!("/made.up.Service{n}/Method{n}"))?;
        let status = client
            .unary::<(), (), _>(
                tonic::Request::new(()),
                path,
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await?;

    let text = recorder.render();
    assert!(!text.contains("made.up"), "a made-up path became a label");
    let series: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("grpc_server_requests_total{"))
        .collect();
    assert_eq!(series.len(), 2, "{series:#?}");
    assert!(
        series
            .iter()
            .any(|s| s.contains(r#"method="unknown""#) && s.ends_with(" 500")),
        "{series:#?}"
    );
    assert!(
        series
            .iter()
            .any(|s| s.contains(r#"method="/grpc.health.v1.Health/Check""#)),
        "{series:#?}"
    );

    shutdown.cancel();
    server.await??;
    Ok(())
}
