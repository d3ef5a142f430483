//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set, a service's spans reach an OTLP
//! collector, named after the service. The collector here is a real OTLP
//! gRPC server that records what it receives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_named_after_the_service() -> anyhow::Result<()> {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    // SAFETY: this test binary has a single test; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")) };
    let telemetry = shop_server::telemetry::init("otlp-test-service", false)?;
    let traceparent =
        tracing::info_span!("place_order").in_scope(shop_outbox::trace::current_traceparent);
    drop(telemetry);

    let trace_id = shop_outbox::trace::trace_id(traceparent.as_deref().unwrap())
        .unwrap()
        .to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let received = collector.received.lock().unwrap().clone();
        let spans: Vec<_> = received
            .iter()
            .flat_map(|r| r.resource_spans.iter())
            .flat_map(|rs| {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref()?.value.clone());
                rs.scope_spans.iter().flat_map(move |ss| {
                    ss.spans.iter().map({
                        let service = service.clone();
                        move |span| (service.clone(), span.name.clone(), hex(&span.trace_id))
                    })
                })
            })
            .collect();
        if let Some((service, _, id)) = spans.iter().find(|(_, name, _)| name == "place_order") {
            assert_eq!(
                service,
                &Some(Value::StringValue("otlp-test-service".into()))
            );
            assert_eq!(id, &trace_id);
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no span exported: {spans:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
