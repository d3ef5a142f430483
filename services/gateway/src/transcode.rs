//! HTTP/JSON ↔ gRPC: a request's JSON body, path and query become the
//! RPC's request message (proto3 JSON mapping), and its response message
//! becomes JSON; a server stream becomes server-sent events.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, SerializeOptions,
};
use serde_json::{Map, Value as Json};

use crate::Gateway;
use crate::problem::Problem;
use crate::routes::Route;

/// Longest an event stream stays open; a client that still wants updates
/// opens it again.
pub const MAX_STREAM: std::time::Duration = std::time::Duration::from_secs(600);

/// Request headers passed on to the services as gRPC metadata: the
/// caller's credentials and trace context.
const FORWARDED_HEADERS: &[&str] = &["authorization", "traceparent", "tracestate"];

/// The state of one route's handler.
#[derive(Debug, Clone)]
pub struct RouteState {
    pub gateway: Arc<Gateway>,
    pub route: Arc<Route>,
}

/// Handles a call of a unary RPC's route.
pub async fn unary(
    State(state): State<RouteState>,
    Path(path): Path<HashMap<String, String>>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let route = &state.route;
    if !body.iter().all(u8::is_ascii_whitespace) && !json_content(&headers) {
        return Problem::unsupported_media_type().into_response();
    }
    let request = match request_message(route, &path, &query, &body) {
        Ok(request) => request,
        Err(problem) => return problem.into_response(),
    };
    let Some(upstream) = state.gateway.upstream(route.upstream()) else {
        return Problem::unavailable(format!("no {} service is configured", route.upstream()))
            .into_response();
    };
    let answer = upstream
        .unary(
            &route.grpc_path(),
            Bytes::from(request.encode_to_vec()),
            &metadata(&headers),
            route.idempotent(),
        )
        .await;
    match answer {
        Ok(bytes) => match to_json(&route.rpc.output(), bytes) {
            Ok(json) => axum::Json(json).into_response(),
            Err(problem) => problem.into_response(),
        },
        Err(status) => Problem::from_status(&status).into_response(),
    }
}

/// Handles a server-streaming RPC's route: each message is an `event:
/// message` server-sent event; a failure ends the stream with an `event:
/// error` carrying the problem. Streams end when the gateway shuts down.
pub async fn streaming(
    State(state): State<RouteState>,
    Path(path): Path<HashMap<String, String>>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let route = state.route.clone();
    let request = match request_message(&route, &path, &query, &Bytes::new()) {
        Ok(request) => request,
        Err(problem) => return problem.into_response(),
    };
    let Some(slot) = state.gateway.open_stream() else {
        return Problem::unavailable("too many open streams; try again later").into_response();
    };
    let Some(upstream) = state.gateway.upstream(route.upstream()) else {
        return Problem::unavailable(format!("no {} service is configured", route.upstream()))
            .into_response();
    };
    let stream = match upstream
        .server_streaming(
            &route.grpc_path(),
            Bytes::from(request.encode_to_vec()),
            &metadata(&headers),
        )
        .await
    {
        Ok(stream) => stream,
        Err(status) => return Problem::from_status(&status).into_response(),
    };
    let output = route.rpc.output();
    let events = stream
        .map(move |item| {
            // The stream's slot is held for as long as it is open.
            let _slot = &slot;
            let event = match item {
                Ok(bytes) => match to_json(&output, bytes) {
                    Ok(json) => Event::default().event("message").json_data(json),
                    Err(problem) => Event::default().event("error").json_data(problem),
                },
                Err(status) => Event::default()
                    .event("error")
                    .json_data(Problem::from_status(&status)),
            };
            event.map_err(axum::Error::new)
        })
        .take_until(state.gateway.shutdown.clone().cancelled_owned())
        .take_until(tokio::time::sleep(MAX_STREAM));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Whether the request says its body is JSON.
fn json_content(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json" || mime.ends_with("+json")
        })
}

/// The headers passed on, as gRPC metadata.
pub fn metadata(headers: &HeaderMap) -> tonic::metadata::MetadataMap {
    let mut forwarded = HeaderMap::new();
    for name in FORWARDED_HEADERS {
        if let Some(value) = headers.get(*name) {
            forwarded.insert(*name, value.clone());
        }
    }
    tonic::metadata::MetadataMap::from_headers(forwarded)
}

/// The request message: the JSON body (for routes with a body), then the
/// query parameters (for routes without one), then the path's fields, which
/// win over both.
fn request_message(
    route: &Route,
    path: &HashMap<String, String>,
    query: &[(String, String)],
    body: &Bytes,
) -> Result<DynamicMessage, Problem> {
    let input = route.rpc.input();
    let mut object = if route.body == "*" && !body.iter().all(u8::is_ascii_whitespace) {
        match serde_json::from_slice::<Json>(body) {
            Ok(Json::Object(object)) => object,
            Ok(_) => return Err(Problem::bad_request("the body must be a JSON object")),
            Err(error) => {
                return Err(Problem::bad_request(format!(
                    "the body is not JSON: {error}"
                )));
            }
        }
    } else {
        Map::new()
    };
    if route.body == "*" {
        if let Some((name, _)) = query.first() {
            return Err(Problem::bad_request(format!(
                "unknown query parameter {name:?}: this route takes its fields in the body"
            )));
        }
    } else {
        for (name, value) in query {
            if object.contains_key(name) {
                return Err(Problem::bad_request(format!(
                    "query parameter {name:?} given twice"
                )));
            }
            object.insert(name.clone(), scalar(&input, name, value)?);
        }
    }
    for field in &route.path_fields {
        let value = path.get(field).cloned().unwrap_or_default();
        // The path's value wins over the body's, under either field name.
        if let Some(descriptor) = input.get_field_by_name(field) {
            object.remove(descriptor.json_name());
        }
        object.insert(field.clone(), scalar(&input, field, &value)?);
    }
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    DynamicMessage::deserialize_with_options(input, Json::Object(object), &options)
        .map_err(|error| Problem::bad_request(format!("invalid request: {error}")))
}

/// A path or query value as the JSON the field's type takes: booleans as
/// booleans, everything else as a string (proto3 JSON reads numbers and
/// enum names from strings).
fn scalar(input: &MessageDescriptor, name: &str, value: &str) -> Result<Json, Problem> {
    let field = input
        .get_field_by_name(name)
        .or_else(|| input.get_field_by_json_name(name))
        .ok_or_else(|| Problem::bad_request(format!("unknown parameter {name:?}")))?;
    if field.is_list() || field.is_map() || matches!(field.kind(), Kind::Message(_)) {
        return Err(Problem::bad_request(format!(
            "parameter {name:?} cannot be given in the URL"
        )));
    }
    Ok(match field.kind() {
        Kind::Bool => match value {
            "true" => Json::Bool(true),
            "false" => Json::Bool(false),
            _ => {
                return Err(Problem::bad_request(format!(
                    "parameter {name:?} must be true or false"
                )));
            }
        },
        _ => Json::String(value.to_owned()),
    })
}

/// A response message as JSON (proto3 JSON mapping; every field present,
/// 64-bit integers as strings).
pub fn to_json(output: &MessageDescriptor, bytes: Bytes) -> Result<Json, Problem> {
    let message = DynamicMessage::decode(output.clone(), bytes).map_err(|error| {
        tracing::error!(%error, message = output.full_name(), "undecodable response");
        Problem::from_status(&tonic::Status::internal("undecodable response"))
    })?;
    let options = SerializeOptions::new().skip_default_fields(false);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|error| {
            tracing::error!(%error, message = output.full_name(), "unserialisable response");
            Problem::from_status(&tonic::Status::internal("unserialisable response"))
        })
}
