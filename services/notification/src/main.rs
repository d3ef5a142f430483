//! `notification-service`: parse the configuration, start logging, run.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = notification_service::Settings::parse();
    let _telemetry = shop_server::telemetry::init("notification-service", settings.log_json)?;
    if let Some(addr) = settings.metrics_addr {
        shop_server::metrics::install_exporter(addr)?;
    }
    let app = notification_service::build(settings).await?;
    tracing::info!(addr = %app.addr(), "notification-service listening");
    app.run_until_stopped(shop_server::shutdown::on_signal())
        .await
}
