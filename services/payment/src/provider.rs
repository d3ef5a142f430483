//! The payment-provider port and the built-in simulated provider.

use shop_server::validate::format_money;
use uuid::Uuid;

/// The outcome of a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charge {
    /// The customer was charged.
    Approved,
    /// The provider declined, with a reason for people.
    Declined(String),
}

/// A payment provider. Implementations must be idempotent per order: the
/// same order charged twice is charged once (real providers take the order
/// id as an idempotency key).
pub trait PaymentProvider: Send + Sync + std::fmt::Debug + 'static {
    /// Charges `amount_minor` of `currency` for `order_id`.
    fn charge(&self, order_id: Uuid, amount_minor: i64, currency: &str) -> Charge;

    /// Refunds the charge of `order_id` in full. An error is worth retrying;
    /// a second refund of one order refunds nothing more.
    fn refund(&self, order_id: Uuid, amount_minor: i64, currency: &str) -> anyhow::Result<()>;
}

/// Approves every charge up to a limit and declines the rest, so a large
/// order shows the saga's compensation.
#[derive(Debug, Clone)]
pub struct SimulatedProvider {
    decline_above_minor: i64,
}

impl SimulatedProvider {
    /// Declines amounts above `decline_above_minor`.
    pub fn new(decline_above_minor: i64) -> Self {
        Self {
            decline_above_minor,
        }
    }
}

impl PaymentProvider for SimulatedProvider {
    fn charge(&self, _order_id: Uuid, amount_minor: i64, currency: &str) -> Charge {
        if amount_minor > self.decline_above_minor {
            Charge::Declined(format!(
                "{} exceeds the card limit of {}",
                format_money(amount_minor, currency),
                format_money(self.decline_above_minor, currency)
            ))
        } else {
            Charge::Approved
        }
    }

    fn refund(&self, _order_id: Uuid, _amount_minor: i64, _currency: &str) -> anyhow::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declines_only_above_the_limit() {
        let provider = SimulatedProvider::new(1000);
        assert_eq!(provider.charge(Uuid::nil(), 1000, "EUR"), Charge::Approved);
        assert!(matches!(
            provider.charge(Uuid::nil(), 1001, "EUR"),
            Charge::Declined(_)
        ));
    }
}
