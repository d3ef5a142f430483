//! `shop-gateway`: parse the configuration, start logging, serve.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = shop_gateway::Settings::parse();
    let _telemetry = shop_server::telemetry::init("shop-gateway", settings.log_json)?;
    if let Some(addr) = settings.metrics_addr {
        shop_server::metrics::install_exporter(addr)?;
    }
    let app = shop_gateway::build(settings).await?;
    tracing::info!(addr = %app.addr(), "shop-gateway listening");
    app.run_until_stopped(shop_server::shutdown::on_signal())
        .await
}
