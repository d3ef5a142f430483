//! Checks of request fields; each error names the field.

use uuid::Uuid;

use crate::ServiceError;

/// Parses a UUID field.
pub fn uuid(field: &str, value: &str) -> Result<Uuid, ServiceError> {
    if value.is_empty() {
        return Err(ServiceError::invalid(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| ServiceError::invalid(field, "must be a UUID"))
}

/// A required text of at most `max` characters, trimmed.
pub fn text(field: &str, value: &str, max: usize) -> Result<String, ServiceError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(ServiceError::invalid(field, "is required"));
    }
    if trimmed.chars().count() > max {
        return Err(ServiceError::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    Ok(trimmed.to_owned())
}

/// Largest amount of money a request may name, in minor units: with at
/// most 100 lines of at most 1,000 units each, no order total can then
/// leave the 64-bit range.
pub const MAX_AMOUNT_MINOR: i64 = 10_000_000_000_000;

/// A current ISO 4217 alphabetic currency code (not the special X codes
/// such as XXX "no currency" or XTS "testing").
pub fn currency(field: &str, value: &str) -> Result<String, ServiceError> {
    match iso_currency::Currency::from_code(value) {
        Some(code) if !code.is_special() => Ok(value.to_owned()),
        _ => Err(ServiceError::invalid(
            field,
            "must be an ISO 4217 currency code such as EUR",
        )),
    }
}

/// An amount in minor units written for people in its currency's own
/// decimals: 1999 EUR is "19.99 EUR", 1999 JPY is "1999 JPY".
pub fn format_money(amount_minor: i64, currency: &str) -> String {
    let exponent = iso_currency::Currency::from_code(currency)
        .and_then(|code| code.exponent())
        .unwrap_or(2) as u32;
    if exponent == 0 {
        return format!("{amount_minor} {currency}");
    }
    let unit = 10_i64.pow(exponent);
    let sign = if amount_minor < 0 { "-" } else { "" };
    let amount = amount_minor.unsigned_abs();
    format!(
        "{sign}{}.{:0width$} {currency}",
        amount / unit as u64,
        amount % unit as u64,
        width = exponent as usize
    )
}

/// Money present, with a valid currency and a non-negative amount.
pub fn money(
    field: &str,
    value: Option<&shop_proto::types::v1::Money>,
) -> Result<(i64, String), ServiceError> {
    let money = value.ok_or_else(|| ServiceError::invalid(field, "is required"))?;
    if !(0..=MAX_AMOUNT_MINOR).contains(&money.amount_minor) {
        return Err(ServiceError::invalid(
            format!("{field}.amount_minor"),
            format!("must be between 0 and {MAX_AMOUNT_MINOR}"),
        ));
    }
    let currency = currency(&format!("{field}.currency"), &money.currency)?;
    Ok((money.amount_minor, currency))
}

/// A page size: 0 means `default`; otherwise 1 to `max`.
pub fn page_size(field: &str, value: i32, default: i64, max: i64) -> Result<i64, ServiceError> {
    match value {
        0 => Ok(default),
        n if n < 0 || n as i64 > max => Err(ServiceError::invalid(
            field,
            format!("must be between 1 and {max}"),
        )),
        n => Ok(n as i64),
    }
}

/// A page token: empty for the first page, else an offset this service
/// issued.
pub fn page_token(field: &str, value: &str) -> Result<i64, ServiceError> {
    if value.is_empty() {
        return Ok(0);
    }
    value
        .parse::<i64>()
        .ok()
        .filter(|offset| *offset >= 0)
        .ok_or_else(|| ServiceError::invalid(field, "is not a token from a previous response"))
}

/// The token of the page after one of `returned` rows at `offset`.
pub fn next_page_token(offset: i64, page_size: i64, returned: usize) -> String {
    if (returned as i64) < page_size {
        String::new()
    } else {
        (offset + page_size).to_string()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn money_is_written_in_its_currency_s_own_decimals() {
        assert_eq!(format_money(1999, "EUR"), "19.99 EUR");
        assert_eq!(format_money(5, "EUR"), "0.05 EUR");
        assert_eq!(format_money(1999, "JPY"), "1999 JPY");
        assert_eq!(format_money(1999, "BHD"), "1.999 BHD");
    }

    #[test]
    fn currencies_come_from_the_iso_4217_list() {
        assert_eq!(currency("c", "EUR").unwrap(), "EUR");
        assert_eq!(currency("c", "JPY").unwrap(), "JPY");
        for bad in ["ABC", "QQQ", "eur", "EURO", "", "XXX", "XTS"] {
            assert!(currency("c", bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn amounts_stay_within_what_totals_can_hold() {
        let money = |amount_minor| shop_proto::types::v1::Money {
            amount_minor,
            currency: "EUR".into(),
        };
        assert!(super::money("p", Some(&money(MAX_AMOUNT_MINOR))).is_ok());
        assert!(super::money("p", Some(&money(MAX_AMOUNT_MINOR + 1))).is_err());
        assert!(super::money("p", Some(&money(i64::MAX))).is_err());
        assert!(super::money("p", Some(&money(-1))).is_err());
        // The largest order the rules allow still fits.
        assert!(MAX_AMOUNT_MINOR.checked_mul(100 * 1000).is_some());
    }
    use super::*;

    #[test]
    fn rejects_what_is_not_a_uuid() {
        assert!(
            matches!(uuid("order_id", "nope"), Err(ServiceError::InvalidArgument { field, .. }) if field == "order_id")
        );
        assert!(uuid("order_id", "").is_err());
        assert!(uuid("order_id", "67e55044-10b1-426f-9247-bb680e5fe0c8").is_ok());
    }

    #[test]
    fn currencies_are_three_upper_case_letters() {
        assert!(currency("c", "EUR").is_ok());
        assert!(currency("c", "eur").is_err());
        assert!(currency("c", "EURO").is_err());
    }

    #[test]
    fn page_sizes_and_tokens() {
        assert_eq!(page_size("page_size", 0, 20, 100).unwrap(), 20);
        assert!(page_size("page_size", 101, 20, 100).is_err());
        assert!(page_size("page_size", -1, 20, 100).is_err());
        assert_eq!(page_token("page_token", "").unwrap(), 0);
        assert!(page_token("page_token", "x").is_err());
        assert_eq!(next_page_token(0, 2, 2), "2");
        assert_eq!(next_page_token(0, 2, 1), "");
    }
}
