//! `payment-service`: parse the configuration, start logging, run.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = payment_service::Settings::parse();
    let _telemetry = shop_server::telemetry::init("payment-service", settings.log_json)?;
    if let Some(addr) = settings.metrics_addr {
        shop_server::metrics::install_exporter(addr)?;
    }
    let app = payment_service::build(settings).await?;
    tracing::info!(addr = %app.addr(), "payment-service listening");
    app.run_until_stopped(shop_server::shutdown::on_signal())
        .await
}
