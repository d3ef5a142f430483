//! `user-service`: parse the configuration, start logging, run.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = user_service::Settings::parse();
    let _telemetry = shop_server::telemetry::init("user-service", settings.log_json)?;
    if let Some(addr) = settings.metrics_addr {
        shop_server::metrics::install_exporter(addr)?;
    }
    let app = user_service::build(settings).await?;
    tracing::info!(addr = %app.addr(), "user-service listening");
    app.run_until_stopped(shop_server::shutdown::on_signal())
        .await
}
