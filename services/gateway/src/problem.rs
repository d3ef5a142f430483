//! Errors as HTTP problem details (RFC 9457, `application/problem+json`),
//! mapped from the services' gRPC statuses as Google's HTTP mapping does.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::Code;
use tonic_types::StatusExt;

/// Seconds a client should wait before trying again after a 503.
pub const RETRY_AFTER_SECONDS: u64 = 5;

/// A problem details body: `type`, `title`, `status`, `detail`, and the
/// gRPC `code` and field `violations` behind it.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The gRPC status code name, e.g. `INVALID_ARGUMENT`.
    pub code: &'static str,
    pub status: u16,
    pub detail: String,
    /// The fields a bad request got wrong, as the service named them.
    pub violations: Vec<Violation>,
}

impl Serialize for Problem {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let title = StatusCode::from_u16(self.status)
            .ok()
            .and_then(|status| status.canonical_reason())
            .unwrap_or("Error");
        let mut problem = serializer.serialize_struct("Problem", 6)?;
        problem.serialize_field(
            "type",
            &format!(
                "https://grpc.github.io/grpc/core/md_doc_statuscodes.html#{}",
                self.code
            ),
        )?;
        problem.serialize_field("title", title)?;
        problem.serialize_field("status", &self.status)?;
        problem.serialize_field("detail", &self.detail)?;
        problem.serialize_field("code", self.code)?;
        if !self.violations.is_empty() {
            problem.serialize_field("violations", &self.violations)?;
        }
        problem.end()
    }
}

/// One field of a bad request and what is wrong with it.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

impl Problem {
    /// A problem of the gateway's own (bad JSON, an unknown parameter).
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, detail.into(), Vec::new())
    }

    /// A body that is not declared as JSON.
    pub fn unsupported_media_type() -> Self {
        Self {
            code: code_name(Code::InvalidArgument),
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE.as_u16(),
            detail: "the body must be JSON (content-type: application/json)".into(),
            violations: Vec::new(),
        }
    }

    /// No route for the request's path and method.
    pub fn no_route() -> Self {
        Self {
            code: code_name(Code::NotFound),
            status: StatusCode::NOT_FOUND.as_u16(),
            detail: "no such route; GET /openapi.json lists them".into(),
            violations: Vec::new(),
        }
    }

    /// A downstream service that cannot be reached now.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, detail.into(), Vec::new())
    }

    /// The problem a service's status becomes. Internal errors keep the
    /// service's own generic message, which never carries SQL or traces.
    pub fn from_status(status: &tonic::Status) -> Self {
        let violations = status
            .get_details_bad_request()
            .map(|bad| {
                bad.field_violations
                    .into_iter()
                    .map(|violation| Violation {
                        field: violation.field,
                        description: violation.description,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let detail = match status.code() {
            Code::Internal | Code::Unknown | Code::DataLoss => "internal error".to_owned(),
            _ => status.message().to_owned(),
        };
        Self::new(status.code(), detail, violations)
    }

    fn new(code: Code, detail: String, violations: Vec<Violation>) -> Self {
        Self {
            code: code_name(code),
            status: http_status(code).as_u16(),
            detail,
            violations,
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(&self)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

/// The HTTP status of a gRPC code (google.rpc.Code's documented mapping).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Internal | Code::Unknown | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
