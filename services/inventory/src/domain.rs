//! Inventory rules: what a valid product is, and how an order's lines are
//! checked against stock.

use std::collections::BTreeMap;

use shop_server::ServiceError;
use uuid::Uuid;

/// Checks a SKU: 1 to 64 characters of A-Z, a-z, 0-9, '-' and '_'.
pub fn sku(field: &str, value: &str) -> Result<String, ServiceError> {
    let valid = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(value.to_owned())
    } else {
        Err(ServiceError::invalid(
            field,
            "must be 1 to 64 characters of A-Z, a-z, 0-9, '-' or '_'",
        ))
    }
}

/// Largest quantity a single restock or initial stock may add.
pub const MAX_STOCK_CHANGE: i32 = 1_000_000;

/// Stock of one product at the moment of a reservation attempt.
#[derive(Debug, Clone, Copy)]
pub struct Availability {
    /// Units on hand.
    pub on_hand: i32,
    /// Units already reserved.
    pub reserved: i32,
}

impl Availability {
    /// Units still free to reserve.
    pub fn available(&self) -> i32 {
        self.on_hand - self.reserved
    }
}

/// A line that cannot be reserved: (product, requested, available).
pub type Shortage = (Uuid, i32, i32);

/// Sums an order's lines per product.
pub fn demand(lines: impl IntoIterator<Item = (Uuid, i32)>) -> BTreeMap<Uuid, i32> {
    let mut demand = BTreeMap::new();
    for (product, quantity) in lines {
        *demand.entry(product).or_insert(0) += quantity;
    }
    demand
}

/// The lines that cannot be met from `stock`; empty when all can.
/// Unknown products count as having nothing available.
pub fn shortages(
    demand: &BTreeMap<Uuid, i32>,
    stock: &BTreeMap<Uuid, Availability>,
) -> Vec<Shortage> {
    demand
        .iter()
        .filter_map(|(product, &wanted)| {
            let available = stock.get(product).map_or(0, Availability::available);
            (available < wanted).then_some((*product, wanted, available.max(0)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_is_short_on_lines_beyond_what_is_available() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let demand = demand([(a, 2), (b, 5), (a, 1), (c, 1)]);
        let stock = BTreeMap::from([
            (
                a,
                Availability {
                    on_hand: 3,
                    reserved: 0,
                },
            ),
            (
                b,
                Availability {
                    on_hand: 10,
                    reserved: 6,
                },
            ),
        ]);
        assert_eq!(shortages(&demand, &stock), vec![(b, 5, 4), (c, 1, 0)]);
    }

    #[test]
    fn skus_are_short_plain_words() {
        assert!(sku("sku", "MUG-01_a").is_ok());
        assert!(sku("sku", "").is_err());
        assert!(sku("sku", "has space").is_err());
        assert!(sku("sku", &"x".repeat(65)).is_err());
    }
}
