//! The `UserService` gRPC API.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;
use shop_outbox::{Aggregate, EventContext};
use shop_proto::events::v1::UserRegistered;
use shop_proto::types::v1::Money;
use shop_proto::user::v1::user_service_server::UserService;
use shop_proto::user::v1::*;
use shop_server::auth::Caller;
use shop_server::{ServiceError, validate};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// The gRPC API over the user database.
#[derive(Debug, Clone)]
pub struct Users {
    pool: PgPool,
}

impl Users {
    /// An API over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// Checks an e-mail address and returns it in lower case: one `@`, a
/// non-empty local part, and a domain with a dot, no spaces, at most 254
/// characters.
pub fn email(field: &str, value: &str) -> Result<String, ServiceError> {
    let value = value.trim().to_lowercase();
    let valid = value.len() <= 254
        && !value.contains(char::is_whitespace)
        && match value.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.contains('@')
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
            }
            None => false,
        };
    if valid {
        Ok(value)
    } else {
        Err(ServiceError::invalid(
            field,
            "must be an e-mail address such as ada@example.com",
        ))
    }
}

#[tonic::async_trait]
impl UserService for Users {
    #[tracing::instrument(skip_all)]
    async fn register_user(
        &self,
        request: Request<RegisterUserRequest>,
    ) -> Result<Response<RegisterUserResponse>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        let name = validate::text("name", &request.name, 200)?;
        let email = email("email", &request.email)?;
        // A customer registers itself: its user id is its token's subject.
        // Without authentication (or for staff) a new id is made.
        let id = match caller {
            Caller::Customer(id) => id,
            Caller::Anyone | Caller::Staff(_) => Uuid::now_v7(),
        };
        let mut tx = self.pool.begin().await.map_err(ServiceError::from)?;
        // E-mail addresses are contact details, not identities (the token's
        // issuer owns those), so they need not be unique: registration never
        // tells a caller whether an address is in use.
        let inserted: Option<DateTime<Utc>> = sqlx::query_scalar(
            "INSERT INTO users (id, name, email) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO NOTHING RETURNING registered_at",
        )
        .bind(id)
        .bind(&name)
        .bind(&email)
        .fetch_optional(&mut *tx)
        .await
        .map_err(ServiceError::from)?;
        let Some(registered_at) = inserted else {
            // Registered before: the same registration again gets the same
            // answer; a different one is refused (this says nothing about
            // anyone but the caller).
            let (known_name, known_email, at): (String, String, DateTime<Utc>) =
                sqlx::query_as("SELECT name, email, registered_at FROM users WHERE id = $1")
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(ServiceError::from)?;
            if (known_name.as_str(), known_email.as_str()) != (name.as_str(), email.as_str()) {
                return Err(ServiceError::AlreadyExists(format!(
                    "user {id} is registered already, with other details"
                ))
                .into());
            }
            return Ok(Response::new(RegisterUserResponse {
                user: Some(User {
                    user_id: id.to_string(),
                    name,
                    email,
                    registered_at: Some(timestamp(at)),
                }),
            }));
        };
        let event = UserRegistered {
            user_id: id.to_string(),
            name: name.clone(),
            email: email.clone(),
        };
        let key = id.to_string();
        shop_outbox::enqueue(
            &mut tx,
            Aggregate::new("user", &key),
            &event,
            &EventContext::new_flow(id),
        )
        .await
        .map_err(ServiceError::from)?;
        tx.commit().await.map_err(ServiceError::commit)?;
        Ok(Response::new(RegisterUserResponse {
            user: Some(User {
                user_id: key,
                name,
                email,
                registered_at: Some(timestamp(registered_at)),
            }),
        }))
    }

    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let caller = Caller::of(&request)?;
        let id = validate::uuid("user_id", &request.get_ref().user_id)?;
        if !caller.may_act_for(id) {
            // Another customer's profile is answered like a missing one.
            return Err(ServiceError::NotFound(format!("user {id} does not exist")).into());
        }
        let row: Option<(String, String, DateTime<Utc>)> =
            sqlx::query_as("SELECT name, email, registered_at FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(ServiceError::from)?;
        let (name, email, registered_at) =
            row.ok_or_else(|| ServiceError::NotFound(format!("user {id} does not exist")))?;
        Ok(Response::new(GetUserResponse {
            user: Some(User {
                user_id: id.to_string(),
                name,
                email,
                registered_at: Some(timestamp(registered_at)),
            }),
        }))
    }

    async fn get_purchase_history(
        &self,
        request: Request<GetPurchaseHistoryRequest>,
    ) -> Result<Response<GetPurchaseHistoryResponse>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        let id = validate::uuid("user_id", &request.user_id)?;
        if !caller.may_act_for(id) {
            return Err(ServiceError::NotFound(format!("user {id} does not exist")).into());
        }
        let limit = validate::page_size("page_size", request.page_size, 20, 100)?;
        let offset = validate::page_token("page_token", &request.page_token)?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .map_err(ServiceError::from)?;
        if !exists {
            return Err(ServiceError::NotFound(format!("user {id} does not exist")).into());
        }
        let rows: Vec<(Uuid, i64, String, i32, DateTime<Utc>)> = sqlx::query_as(
            "SELECT order_id, total_minor, currency, item_count, confirmed_at FROM purchases \
             WHERE user_id = $1 ORDER BY confirmed_at DESC, order_id DESC OFFSET $2 LIMIT $3",
        )
        .bind(id)
        .bind(offset)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(ServiceError::from)?;
        Ok(Response::new(GetPurchaseHistoryResponse {
            next_page_token: validate::next_page_token(offset, limit, rows.len()),
            purchases: rows
                .into_iter()
                .map(
                    |(order_id, amount_minor, currency, item_count, confirmed_at)| Purchase {
                        order_id: order_id.to_string(),
                        total: Some(Money {
                            amount_minor,
                            currency,
                        }),
                        item_count,
                        confirmed_at: Some(timestamp(confirmed_at)),
                    },
                )
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::email;

    #[test]
    fn e_mail_addresses_are_checked_and_lower_cased() {
        assert_eq!(
            email("email", " Ada@Example.COM ").unwrap(),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a da@example.com",
            "a@b@c.com",
        ] {
            assert!(email("email", bad).is_err(), "{bad} accepted");
        }
    }
}
