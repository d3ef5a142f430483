//! Order rules: what a valid PlaceOrder is, how lines are priced, and which
//! status changes are allowed.

use std::collections::{HashMap, HashSet};

use shop_proto::order::v1::PlaceOrderRequest;
use shop_server::{ServiceError, validate};
use uuid::Uuid;

/// Most lines one order may have.
pub const MAX_LINES: usize = 100;
/// Most units of one product per order.
pub const MAX_QUANTITY: i32 = 1000;

/// Order status as stored.
pub const PENDING: &str = "PENDING";
/// Order status as stored.
pub const CONFIRMED: &str = "CONFIRMED";
/// Order status as stored.
pub const CANCELLED: &str = "CANCELLED";

/// A checked PlaceOrder request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub customer_id: Uuid,
    pub lines: Vec<(Uuid, i32)>,
    pub idempotency_key: String,
}

impl NewOrder {
    /// Checks every field; the error names the first wrong one.
    pub fn parse(request: &PlaceOrderRequest) -> Result<Self, ServiceError> {
        let customer_id = validate::uuid("customer_id", &request.customer_id)?;
        if request.lines.is_empty() {
            return Err(ServiceError::invalid(
                "lines",
                "must have at least one line",
            ));
        }
        if request.lines.len() > MAX_LINES {
            return Err(ServiceError::invalid(
                "lines",
                format!("must have at most {MAX_LINES} lines"),
            ));
        }
        let mut seen = HashSet::new();
        let mut lines = Vec::with_capacity(request.lines.len());
        for (i, line) in request.lines.iter().enumerate() {
            let product = validate::uuid(&format!("lines[{i}].product_id"), &line.product_id)?;
            if !(1..=MAX_QUANTITY).contains(&line.quantity) {
                return Err(ServiceError::invalid(
                    format!("lines[{i}].quantity"),
                    format!("must be between 1 and {MAX_QUANTITY}"),
                ));
            }
            if !seen.insert(product) {
                return Err(ServiceError::invalid(
                    format!("lines[{i}].product_id"),
                    "appears in more than one line",
                ));
            }
            lines.push((product, line.quantity));
        }
        let key = request.idempotency_key.as_str();
        if key.trim().is_empty() || key.chars().count() > 100 {
            return Err(ServiceError::invalid(
                "idempotency_key",
                "must be 1 to 100 characters, not all of them spaces",
            ));
        }
        Ok(Self {
            customer_id,
            lines,
            idempotency_key: key.to_owned(),
        })
    }

    /// Identifies the request's content, to tell a retry from a different
    /// order sent with the same idempotency key.
    /// The fingerprint orders placed before fingerprints sorted their lines
    /// were stored with, so their retries are still recognised.
    pub fn legacy_fingerprint(&self) -> String {
        let lines: Vec<String> = self.lines.iter().map(|(p, q)| format!("{p}x{q}")).collect();
        format!("{}:{}", self.customer_id, lines.join(","))
    }

    /// The same lines in another order are the same request.
    pub fn fingerprint(&self) -> String {
        let mut lines: Vec<String> = self.lines.iter().map(|(p, q)| format!("{p}x{q}")).collect();
        lines.sort();
        format!("{}:{}", self.customer_id, lines.join(","))
    }
}

/// A catalog entry as the order service knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    pub price_minor: i64,
    pub currency: String,
}

/// A priced line: (product, quantity, unit price).
pub type PricedLine = (Uuid, i32, i64);

/// Prices the lines from the catalog. Every product must be known, and all
/// prices must be in one currency. Returns the lines, total and currency.
pub fn price(
    lines: &[(Uuid, i32)],
    catalog: &HashMap<Uuid, Price>,
) -> Result<(Vec<PricedLine>, i64, String), ServiceError> {
    let mut priced = Vec::with_capacity(lines.len());
    let mut total: i64 = 0;
    let mut currency: Option<&str> = None;
    for (i, (product, quantity)) in lines.iter().enumerate() {
        let price = catalog.get(product).ok_or_else(|| {
            ServiceError::NotFound(format!(
                "product {product} (lines[{i}]) is not in the catalog"
            ))
        })?;
        match currency {
            None => currency = Some(&price.currency),
            Some(c) if c != price.currency => {
                return Err(ServiceError::FailedPrecondition(format!(
                    "products are priced in different currencies ({c} and {}); order them separately",
                    price.currency
                )));
            }
            Some(_) => {}
        }
        let line_total = price
            .price_minor
            .checked_mul(i64::from(*quantity))
            .and_then(|t| t.checked_add(total))
            .ok_or_else(|| {
                ServiceError::invalid(format!("lines[{i}].quantity"), "makes the total too large")
            })?;
        total = line_total;
        priced.push((*product, *quantity, price.price_minor));
    }
    Ok((priced, total, currency.unwrap_or_default().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shop_proto::order::v1::PlaceOrderLine;

    fn request(lines: Vec<(&str, i32)>) -> PlaceOrderRequest {
        PlaceOrderRequest {
            customer_id: Uuid::from_u128(9).to_string(),
            lines: lines
                .into_iter()
                .map(|(p, q)| PlaceOrderLine {
                    product_id: p.into(),
                    quantity: q,
                })
                .collect(),
            idempotency_key: "k1".into(),
        }
    }

    fn field_of(error: ServiceError) -> String {
        match error {
            ServiceError::InvalidArgument { field, .. } => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn invalid_requests_name_the_wrong_field() {
        let p = Uuid::from_u128(1).to_string();
        assert_eq!(
            field_of(NewOrder::parse(&request(vec![])).unwrap_err()),
            "lines"
        );
        assert_eq!(
            field_of(NewOrder::parse(&request(vec![(&p, 0)])).unwrap_err()),
            "lines[0].quantity"
        );
        assert_eq!(
            field_of(NewOrder::parse(&request(vec![(&p, 1), (&p, 2)])).unwrap_err()),
            "lines[1].product_id"
        );
        assert_eq!(
            field_of(NewOrder::parse(&request(vec![("x", 1)])).unwrap_err()),
            "lines[0].product_id"
        );
        let mut no_key = request(vec![(&p, 1)]);
        no_key.idempotency_key.clear();
        assert_eq!(
            field_of(NewOrder::parse(&no_key).unwrap_err()),
            "idempotency_key"
        );
        let mut blank_key = request(vec![(&p, 1)]);
        blank_key.idempotency_key = " \t ".into();
        assert_eq!(
            field_of(NewOrder::parse(&blank_key).unwrap_err()),
            "idempotency_key"
        );
    }

    #[test]
    fn the_same_lines_in_another_order_are_the_same_request() {
        let (a, b) = (
            Uuid::from_u128(1).to_string(),
            Uuid::from_u128(2).to_string(),
        );
        let one = NewOrder::parse(&request(vec![(&a, 1), (&b, 2)])).unwrap();
        let other = NewOrder::parse(&request(vec![(&b, 2), (&a, 1)])).unwrap();
        assert_eq!(one.fingerprint(), other.fingerprint());
        let different = NewOrder::parse(&request(vec![(&b, 1), (&a, 2)])).unwrap();
        assert_ne!(one.fingerprint(), different.fingerprint());
    }

    #[test]
    fn lines_are_priced_from_the_catalog_in_one_currency() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut catalog = HashMap::from([
            (
                a,
                Price {
                    price_minor: 250,
                    currency: "EUR".into(),
                },
            ),
            (
                b,
                Price {
                    price_minor: 1000,
                    currency: "EUR".into(),
                },
            ),
        ]);
        let (lines, total, currency) = price(&[(a, 2), (b, 1)], &catalog).unwrap();
        assert_eq!((lines.len(), total, currency.as_str()), (2, 1500, "EUR"));
        catalog.insert(
            b,
            Price {
                price_minor: 1000,
                currency: "USD".into(),
            },
        );
        assert!(matches!(
            price(&[(a, 2), (b, 1)], &catalog),
            Err(ServiceError::FailedPrecondition(_))
        ));
        assert!(matches!(
            price(&[(Uuid::from_u128(3), 1)], &catalog),
            Err(ServiceError::NotFound(_))
        ));
    }
}
