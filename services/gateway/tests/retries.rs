//! What the gateway does when a service answers UNAVAILABLE: reads are
//! tried again (with backoff), writes never, so a retry cannot place an
//! order twice; either way the caller gets 503 with Retry-After.
//!
//! The service here is a stand-in order service that fails every call and
//! counts the calls it receives; with two of them, reads are spread over
//! both replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use shop_gateway::upstream::CallSettings;
use shop_proto::order::v1::order_service_server::{OrderService, OrderServiceServer};
use shop_proto::order::v1::{
    CancelOrderRequest, CancelOrderResponse, GetOrderRequest, GetOrderResponse, ListOrdersRequest,
    ListOrdersResponse, PlaceOrderRequest, PlaceOrderResponse, WatchOrderRequest,
    WatchOrderResponse,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

#[derive(Debug, Default, Clone)]
struct Failing {
    calls: Arc<AtomicUsize>,
}

impl Failing {
    fn fail<T>(&self) -> Result<T, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(Status::unavailable("down for maintenance"))
    }
}

#[tonic::async_trait]
impl OrderService for Failing {
    async fn place_order(
        &self,
        _: Request<PlaceOrderRequest>,
    ) -> Result<Response<PlaceOrderResponse>, Status> {
        self.fail()
    }
    async fn get_order(
        &self,
        _: Request<GetOrderRequest>,
    ) -> Result<Response<GetOrderResponse>, Status> {
        self.fail()
    }
    async fn list_orders(
        &self,
        _: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        self.fail()
    }
    async fn cancel_order(
        &self,
        _: Request<CancelOrderRequest>,
    ) -> Result<Response<CancelOrderResponse>, Status> {
        self.fail()
    }
    type WatchOrderStream =
        tokio_stream::wrappers::ReceiverStream<Result<WatchOrderResponse, Status>>;
    async fn watch_order(
        &self,
        _: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        self.fail()
    }
}

/// Runs curl with `args`; the answer's status and whole text.
async fn curl(args: &[&str]) -> anyhow::Result<(u16, String)> {
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "-i"])
        .args(args)
        .output()
        .await?;
    let text = String::from_utf8(output.stdout)?;
    let status = text.split_whitespace().nth(1).unwrap_or_default().parse()?;
    Ok((status, text))
}

async fn post(url: &str, body: &str) -> anyhow::Result<(u16, String)> {
    curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        body,
        url,
    ])
    .await
}

async fn get(url: &str) -> anyhow::Result<(u16, String)> {
    curl(&[url]).await
}

/// Serves a failing order service on a free port until `stop`.
async fn failing_service(
    stop: &CancellationToken,
) -> anyhow::Result<(
    Failing,
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
)> {
    let service = Failing::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(OrderServiceServer::new(service.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    Ok((service, addr, server))
}

/// A gateway whose order service is at `order_urls`; the others point at
/// a port nothing listens on.
async fn gateway(
    order_urls: Vec<String>,
    read_retries: u32,
) -> anyhow::Result<(
    String,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let calls = CallSettings {
        call_timeout: Duration::from_secs(5),
        read_retries,
        retry_backoff: Duration::from_millis(10),
        // High enough that the circuit stays closed for these tests.
        breaker_failures: 1000,
        breaker_cooldown: Duration::from_secs(1),
    };
    let app = shop_gateway::build(shop_gateway::Settings {
        addr: "127.0.0.1:0".parse()?,
        order_url: order_urls,
        inventory_url: vec!["http://127.0.0.1:9".into()],
        payment_url: vec!["http://127.0.0.1:9".into()],
        notification_url: vec!["http://127.0.0.1:9".into()],
        user_url: vec!["http://127.0.0.1:9".into()],
        metrics_addr: None,
        drain_timeout: Duration::from_secs(1),
        max_streams: 100,
        log_json: false,
        calls,
    })
    .await?;
    let base = format!("http://{}", app.addr());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    Ok((base, shutdown, task))
}

#[tokio::test]
async fn reads_are_spread_over_the_replicas_of_a_service() -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let (first, first_addr, first_server) = failing_service(&stop).await?;
    let (second, second_addr, second_server) = failing_service(&stop).await?;
    let (base, shutdown, task) = gateway(
        vec![
            format!("http://{first_addr}"),
            format!("http://{second_addr}"),
        ],
        0,
    )
    .await?;
    for _ in 0..40 {
        let (status, _) = get(&format!("{base}/v1/orders/some-order")).await?;
        assert_eq!(status, 503);
    }
    let (first, second) = (
        first.calls.load(Ordering::SeqCst),
        second.calls.load(Ordering::SeqCst),
    );
    assert_eq!(first + second, 40, "each read is sent once");
    assert!(first > 0 && second > 0, "{first} and {second} calls");
    shutdown.cancel();
    task.await??;
    stop.cancel();
    first_server.await??;
    second_server.await??;
    Ok(())
}

#[tokio::test]
async fn reads_are_retried_and_writes_are_sent_once() -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let (service, order_addr, server) = failing_service(&stop).await?;
    let (base, shutdown, gateway) = gateway(vec![format!("http://{order_addr}")], 2).await?;

    let (status, text) = post(
        &format!("{base}/v1/orders"),
        r#"{"customerId":"c","idempotencyKey":"k"}"#,
    )
    .await?;
    assert_eq!(status, 503, "{text}");
    assert!(text.to_lowercase().contains("retry-after: 5"), "{text}");
    assert_eq!(
        service.calls.load(Ordering::SeqCst),
        1,
        "a write was repeated"
    );

    let (status, text) = get(&format!("{base}/v1/orders/some-order")).await?;
    assert_eq!(status, 503, "{text}");
    assert_eq!(
        service.calls.load(Ordering::SeqCst),
        1 + 3,
        "a read is tried once and retried twice"
    );

    shutdown.cancel();
    gateway.await??;
    stop.cancel();
    server.await??;
    Ok(())
}
