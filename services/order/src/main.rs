//! `order-service`: parse the configuration, start logging, run.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = order_service::Settings::parse();
    let _telemetry = shop_server::telemetry::init("order-service", settings.log_json)?;
    if let Some(addr) = settings.metrics_addr {
        shop_server::metrics::install_exporter(addr)?;
    }
    let app = order_service::build(settings).await?;
    tracing::info!(addr = %app.addr(), "order-service listening");
    app.run_until_stopped(shop_server::shutdown::on_signal())
        .await
}
