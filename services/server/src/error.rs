//! Service errors and their one mapping to `tonic::Status`.
//!
//! Invalid input becomes `INVALID_ARGUMENT` with a `google.rpc.BadRequest`
//! naming the field. Database and other internal errors are logged in full
//! and reach the client only as "internal error"; unique and foreign-key
//! violations become `ALREADY_EXISTS` and `NOT_FOUND`. A database that
//! cannot be reached (pool timeout, lost connection, server shutting down
//! or full) is `UNAVAILABLE`, which standard client retry policies retry;
//! a statement the database cancelled at its timeout is `DEADLINE_EXCEEDED`,
//! and a lock not had in time (the lock timeout, a deadlock) `ABORTED`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// SQLSTATE of a unique constraint violation.
pub const UNIQUE_VIOLATION: &str = "23505";
/// SQLSTATE of a foreign key violation.
pub const FOREIGN_KEY_VIOLATION: &str = "23503";
/// SQLSTATE of a statement cancelled, by its `statement_timeout` or by an
/// operator.
pub const QUERY_CANCELED: &str = "57014";
/// SQLSTATEs of a lock not had within `lock_timeout`, and of a deadlock
/// victim.
pub const LOCK_NOT_AVAILABLE: &str = "55P03";
pub const DEADLOCK_DETECTED: &str = "40P01";

/// Why a request was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A field of the request is wrong.
    #[error("invalid {field}: {description}")]
    InvalidArgument {
        /// Field path, for example `lines[0].quantity`.
        field: String,
        /// What is wrong with it.
        description: String,
    },
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but not in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A dependency (the database) cannot be reached now; trying again
    /// later may work. Logged in full, shown to clients generically.
    #[error("unavailable: {0:#}")]
    Unavailable(anyhow::Error),
    /// The database did not finish in time (the statement timeout);
    /// nothing was changed and trying again may work. Logged in full,
    /// shown to clients generically.
    #[error("deadline exceeded: {0:#}")]
    DeadlineExceeded(anyhow::Error),
    /// A lock was not had in time (the lock timeout, a deadlock); nothing
    /// was changed and trying again may work. Logged in full, shown to
    /// clients generically.
    #[error("aborted: {0:#}")]
    Aborted(anyhow::Error),
    /// Anything else; never shown to clients.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub use shop_subscriber::database_unavailable as is_unavailable;

impl ServiceError {
    /// A failed COMMIT. Unlike a failure earlier in a transaction, the
    /// change may have been made (the connection broke after the server
    /// committed), so this is never UNAVAILABLE: clients retry that, and a
    /// call that is not idempotent would be applied twice.
    pub fn commit(error: sqlx::Error) -> Self {
        Self::Internal(anyhow::Error::new(error).context("the commit's outcome is unknown"))
    }

    /// An invalid field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            description: description.into(),
        }
    }
}

impl From<sqlx::Error> for ServiceError {
    fn from(error: sqlx::Error) -> Self {
        if let Some(db) = error.as_database_error() {
            match db.code().as_deref() {
                Some(UNIQUE_VIOLATION) => {
                    return Self::AlreadyExists("the resource already exists".into());
                }
                Some(FOREIGN_KEY_VIOLATION) => {
                    return Self::NotFound("a referenced resource does not exist".into());
                }
                Some(QUERY_CANCELED) => return Self::DeadlineExceeded(error.into()),
                Some(LOCK_NOT_AVAILABLE | DEADLOCK_DETECTED) => return Self::Aborted(error.into()),
                _ => {}
            }
        }
        if is_unavailable(&error) {
            return Self::Unavailable(error.into());
        }
        Self::Internal(error.into())
    }
}

impl From<shop_outbox::OutboxError> for ServiceError {
    fn from(error: shop_outbox::OutboxError) -> Self {
        match error {
            shop_outbox::OutboxError::Database(error) => error.into(),
            other => Self::Internal(other.into()),
        }
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::InvalidArgument { field, description } => Status::with_error_details(
                Code::InvalidArgument,
                format!("invalid {field}: {description}"),
                ErrorDetails::with_bad_request_violation(field, description),
            ),
            ServiceError::NotFound(message) => Status::not_found(message),
            ServiceError::AlreadyExists(message) => Status::already_exists(message),
            ServiceError::FailedPrecondition(message) => Status::failed_precondition(message),
            ServiceError::PermissionDenied(message) => Status::permission_denied(message),
            ServiceError::Unavailable(error) => {
                tracing::warn!(error = format!("{error:#}"), "dependency unavailable");
                Status::unavailable("the service cannot reach its database; try again")
            }
            ServiceError::DeadlineExceeded(error) => {
                tracing::warn!(error = format!("{error:#}"), "database statement timed out");
                Status::deadline_exceeded("the database did not answer in time; try again")
            }
            ServiceError::Aborted(error) => {
                tracing::warn!(error = format!("{error:#}"), "lock not had in time");
                Status::aborted("the data is busy; try again")
            }
            ServiceError::Internal(error) => {
                tracing::error!(error = format!("{error:#}"), "internal error");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field_in_bad_request_details() {
        let status = Status::from(ServiceError::invalid(
            "lines[0].quantity",
            "must be at least 1",
        ));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let violation = &details.bad_request().unwrap().field_violations[0];
        assert_eq!(violation.field, "lines[0].quantity");
        assert_eq!(violation.description, "must be at least 1");
    }

    #[test]
    fn a_database_out_of_reach_is_unavailable_without_details() {
        for error in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        ] {
            let status = Status::from(ServiceError::from(error));
            assert_eq!(status.code(), Code::Unavailable);
            assert!(!status.message().contains("pool"), "{status:?}");
        }
        let status = Status::from(ServiceError::from(sqlx::Error::RowNotFound));
        assert_eq!(status.code(), Code::Internal);
        // A broken commit may have committed: not to be retried blindly.
        let status = Status::from(ServiceError::commit(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        ))));
        assert_eq!(status.code(), Code::Internal);
    }

    #[test]
    fn internal_errors_do_not_leak_their_text() {
        let status = Status::from(ServiceError::Internal(anyhow::anyhow!(
            "relation \"orders\" does not exist at character 15"
        )));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
