//! `shop-dlq`: list and re-publish the dead letters of a subscriber's queue.

use clap::{Parser, Subcommand};

/// Lists or replays the messages in `<queue>.dlq`.
#[derive(Debug, Parser)]
#[command(name = "shop-dlq", version)]
struct Cli {
    #[command(flatten)]
    broker: shop_broker::BrokerSettings,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints the dead letters of a work queue, leaving them in place.
    List {
        /// Work queue, for example `inventory.events`.
        queue: String,
    },
    /// Moves dead letters back to their work queue with a fresh attempt count.
    Replay {
        /// Work queue, for example `inventory.events`.
        queue: String,
        /// Message ids to replay.
        #[arg(long = "message-id", required_unless_present = "all")]
        message_ids: Vec<String>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "message_ids")]
        all: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.broker.validate()?;
    let conn = cli.broker.connect("shop-dlq").await?;
    match cli.command {
        Command::List { queue } => {
            let letters = shop_subscriber::dlq::list(&conn, &queue).await?;
            println!(
                "{:<36}  {:<40}  {:>8}  {:>8}  REASON",
                "MESSAGE ID", "EVENT TYPE", "ATTEMPTS", "BYTES"
            );
            for letter in &letters {
                println!(
                    "{:<36}  {:<40}  {:>8}  {:>8}  {}",
                    letter.message_id.as_deref().unwrap_or("-"),
                    letter.event_type.as_deref().unwrap_or("-"),
                    letter
                        .attempts
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "-".into()),
                    letter.payload_bytes,
                    letter.reason.as_deref().unwrap_or("-"),
                );
            }
            eprintln!("{} dead letter(s)", letters.len());
        }
        Command::Replay {
            queue,
            message_ids,
            all,
        } => {
            let ids = if all { Vec::new() } else { message_ids };
            let replayed = shop_subscriber::dlq::replay(&conn, &queue, &ids).await?;
            println!("{replayed} message(s) returned to {queue}");
        }
    }
    let _ = conn.close(200, "OK".into()).await;
    Ok(())
}
