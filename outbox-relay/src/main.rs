//! `outbox-relay`: parse the command line, start telemetry, run.

use anyhow::Context;
use clap::Parser;
use outbox_relay::{Cli, Command, QuarantineAction, Relay};
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    match cli.command {
        None => run(cli).await,
        Some(Command::Quarantine { action }) => {
            quarantine(&cli.settings.database_url, action).await
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    outbox_relay::metrics::install_exporter(cli.settings.metrics_addr)
        .with_context(|| format!("failed to serve metrics on {}", cli.settings.metrics_addr))?;
    let relay = Relay::build(cli.settings).await?;
    tracing::info!(health_addr = %relay.health_addr(), "relay starting");
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    relay.run_until_stopped(shutdown).await
}

async fn quarantine(database_url: &str, action: QuarantineAction) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await
        .context("failed to connect to PostgreSQL")?;
    match action {
        QuarantineAction::List => {
            let rows = outbox_relay::store::list_quarantined(&pool).await?;
            println!(
                "{:<36}  {:<40}  {:<40}  {:>8}  {:<25}  LAST ERROR",
                "MESSAGE ID", "AGGREGATE", "EVENT TYPE", "ATTEMPTS", "QUARANTINED AT"
            );
            for row in &rows {
                println!(
                    "{:<36}  {:<40}  {:<40}  {:>8}  {:<25}  {}",
                    row.message_id,
                    format!("{}/{}", row.aggregate_type, row.aggregate_id),
                    row.event_type,
                    row.attempts,
                    row.quarantined_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    row.last_error.as_deref().unwrap_or("")
                );
            }
            eprintln!("{} quarantined row(s)", rows.len());
        }
        QuarantineAction::Replay { message_ids, all } => {
            let ids = if all { Vec::new() } else { message_ids };
            let replayed = outbox_relay::store::replay_quarantined(&pool, &ids).await?;
            println!("{replayed} row(s) returned to the outbox");
        }
    }
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or ctrl-c.
async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("failed to install the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
    shutdown.cancel();
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,sqlx=warn,lapin=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
