//! `shop-timeline <order-id>`: prints an order's saga across the services:
//! each event with its time from the first, its producer, and each
//! consumer that handled it with the latency from the event's occurrence.
//! Needs a staff token (`SHOP_TOKEN`; `shop-local token staff` prints one
//! for the local checkout).

use clap::Parser;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
#[command(name = "shop-timeline", version)]
struct Cli {
    /// The order (UUID).
    order_id: String,
    /// A staff bearer token.
    #[arg(long, env = "SHOP_TOKEN", hide_env_values = true)]
    token: String,
    /// The order service.
    #[arg(long, env = "ORDER_URL", default_value = "http://127.0.0.1:50051")]
    order_url: String,
    /// The inventory service.
    #[arg(long, env = "INVENTORY_URL", default_value = "http://127.0.0.1:50052")]
    inventory_url: String,
    /// The payment service.
    #[arg(long, env = "PAYMENT_URL", default_value = "http://127.0.0.1:50053")]
    payment_url: String,
    /// The notification service.
    #[arg(
        long,
        env = "NOTIFICATION_URL",
        default_value = "http://127.0.0.1:50054"
    )]
    notification_url: String,
    /// The user service.
    #[arg(long, env = "USER_URL", default_value = "http://127.0.0.1:50055")]
    user_url: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(10))
        .connect_lazy())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let order = channel(&cli.order_url)?;
    let services = vec![
        ("order".to_owned(), order.clone()),
        ("inventory".to_owned(), channel(&cli.inventory_url)?),
        ("payment".to_owned(), channel(&cli.payment_url)?),
        ("notification".to_owned(), channel(&cli.notification_url)?),
        ("user".to_owned(), channel(&cli.user_url)?),
    ];
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert("authorization", format!("Bearer {}", cli.token).parse()?);
    let deadline = std::time::Duration::from_secs(10);
    let timeline =
        shop_gateway::timeline::gather(order, &services, &cli.order_id, &metadata, deadline)
            .await
            .map_err(|status| anyhow::anyhow!("{:?}: {}", status.code(), status.message()))?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&timeline)?);
    } else {
        print!("{}", shop_gateway::timeline::render(&timeline));
    }
    Ok(())
}
