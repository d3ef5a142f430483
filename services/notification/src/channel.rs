//! The channel port: how a message reaches a customer.

use uuid::Uuid;

/// Sends a message to a customer. The service records every message it
/// sends in its own database in the same transaction as the inbox entry; a
/// channel with effects outside that database (e-mail, SMS) may repeat a
/// message if the process dies between sending and committing.
pub trait NotificationChannel: Send + Sync + std::fmt::Debug + 'static {
    /// Name stored with each notification, for example `log`.
    fn name(&self) -> &'static str;
    /// Sends `body` to `customer_id`.
    fn send(&self, customer_id: Uuid, body: &str) -> anyhow::Result<()>;
}

/// The built-in channel: writes each message to the log. The notification
/// table holds the record of what was sent.
#[derive(Debug, Clone, Copy)]
pub struct LogChannel;

impl NotificationChannel for LogChannel {
    fn name(&self) -> &'static str {
        "log"
    }

    fn send(&self, customer_id: Uuid, body: &str) -> anyhow::Result<()> {
        tracing::info!(%customer_id, %body, "notification sent");
        Ok(())
    }
}
