//! The OpenAPI 3.1 document of the gateway's routes, generated from the
//! contracts: paths from the `google.api.http` rules, schemas from the
//! messages in their proto3 JSON form, descriptions from the proto comments.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value as Json, json};

use crate::Gateway;
use crate::routes::Route;

pub async fn handler(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    axum::Json(gateway.openapi.clone())
}

/// The document for `routes`.
pub fn document(pool: &DescriptorPool, routes: &[Arc<Route>]) -> Json {
    let comments = Comments::of(pool);
    let mut schemas = BTreeMap::new();
    let mut paths: BTreeMap<String, Map<String, Json>> = BTreeMap::new();
    for route in routes {
        let input = route.rpc.input();
        let mut parameters: Vec<Json> = route
            .path_fields
            .iter()
            .filter_map(|name| input.get_field_by_name(name))
            .map(|field| {
                json!({
                    "name": field.name(),
                    "in": "path",
                    "required": true,
                    "description": comments.field(&field),
                    "schema": field_schema(&field, &comments, &mut schemas),
                })
            })
            .collect();
        let mut operation = Map::new();
        operation.insert("operationId".into(), json!(route.rpc.name()));
        operation.insert(
            "summary".into(),
            json!(comments.get(route.rpc.full_name()).unwrap_or_default()),
        );
        operation.insert("tags".into(), json!([route.upstream()]));
        if route.body == "*" {
            operation.insert(
                "requestBody".into(),
                json!({
                    "required": true,
                    "content": { "application/json": { "schema": message_ref(&input, &comments, &mut schemas) } }
                }),
            );
        } else {
            for field in input.fields() {
                let scalar = !field.is_list()
                    && !field.is_map()
                    && !matches!(field.kind(), Kind::Message(_));
                if scalar && !route.path_fields.iter().any(|name| name == field.name()) {
                    parameters.push(json!({
                        "name": field.name(),
                        "in": "query",
                        "required": false,
                        "description": comments.field(&field),
                        "schema": field_schema(&field, &comments, &mut schemas),
                    }));
                }
            }
        }
        if !parameters.is_empty() {
            operation.insert("parameters".into(), Json::Array(parameters));
        }
        let ok = if route.rpc.is_server_streaming() {
            json!({
                "description": "A server-sent event stream: one `message` event per update, an `error` event (a problem) if it fails.",
                "content": { "text/event-stream": { "schema": { "type": "string" } } }
            })
        } else {
            json!({
                "description": "OK",
                "content": { "application/json": { "schema": message_ref(&route.rpc.output(), &comments, &mut schemas) } }
            })
        };
        operation.insert(
            "responses".into(),
            json!({ "200": ok, "default": { "$ref": "#/components/responses/Problem" } }),
        );
        paths.entry(route.path.clone()).or_default().insert(
            route.method.as_str().to_lowercase(),
            Json::Object(operation),
        );
    }
    paths.entry("/v1/orders/{order_id}/details".into()).or_default().insert(
        "get".into(),
        json!({
            "operationId": "GetOrderDetails",
            "summary": "An order with its payment, its notifications and the stock of its products. When a service other than the order service is unavailable the answer is partial: `partial` is true and `missing` names each missing part with its problem.",
            "tags": ["order"],
            "parameters": [{ "name": "order_id", "in": "path", "required": true, "schema": { "type": "string" } }],
            "responses": {
                "200": { "description": "OK", "content": { "application/json": { "schema": { "type": "object" } } } },
                "default": { "$ref": "#/components/responses/Problem" }
            }
        }),
    );
    let order_id = json!([{ "name": "order_id", "in": "path", "required": true, "schema": { "type": "string" } }]);
    paths.entry("/v1/orders/{order_id}/timeline".into()).or_default().insert(
        "get".into(),
        json!({
            "operationId": "GetOrderTimeline",
            "summary": "The order's saga across the services: each event, its producer and when it happened, and each consumer that handled it with its latency. Staff only.",
            "tags": ["timeline"],
            "parameters": order_id,
            "responses": {
                "200": { "description": "OK", "content": { "application/json": { "schema": { "type": "object" } } } },
                "default": { "$ref": "#/components/responses/Problem" }
            }
        }),
    );
    paths.entry("/v1/orders/{order_id}/timeline/events".into()).or_default().insert(
        "get".into(),
        json!({
            "operationId": "FollowOrderTimeline",
            "summary": "The timeline as it unfolds: a `timeline` event (the whole timeline) whenever it changed, `end` once the saga is over, `error` (a problem) if it fails. Staff only.",
            "tags": ["timeline"],
            "parameters": order_id,
            "responses": {
                "200": { "description": "Server-sent events", "content": { "text/event-stream": { "schema": { "type": "string" } } } },
                "default": { "$ref": "#/components/responses/Problem" }
            }
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Shop checkout",
            "version": "v1",
            "description": "The checkout's gRPC APIs over HTTP/JSON (proto3 JSON mapping: 64-bit integers as strings, enums by name). Send `Authorization: Bearer <token>`."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {
                "Problem": {
                    "description": "An error, as RFC 9457 problem details; `code` is the gRPC status, `violations` the request's bad fields.",
                    "content": { "application/problem+json": { "schema": { "$ref": "#/components/schemas/Problem" } } }
                }
            },
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } }
        },
        "security": [{ "bearer": [] }]
    })
    .as_object()
    .map(|document| {
        let mut document = document.clone();
        if let Some(Json::Object(schemas)) = document
            .get_mut("components")
            .and_then(|components| components.get_mut("schemas"))
        {
            schemas.insert("Problem".into(), problem_schema());
        }
        Json::Object(document)
    })
    .unwrap_or_default()
}

fn problem_schema() -> Json {
    json!({
        "type": "object",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": { "type": "string" },
            "title": { "type": "string" },
            "status": { "type": "integer" },
            "detail": { "type": "string" },
            "code": { "type": "string" },
            "violations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": { "field": { "type": "string" }, "description": { "type": "string" } }
                }
            }
        }
    })
}

/// A `$ref` to the message's schema, adding it (and what it refers to).
fn message_ref(
    message: &MessageDescriptor,
    comments: &Comments,
    schemas: &mut BTreeMap<String, Json>,
) -> Json {
    if message.full_name() == "google.protobuf.Timestamp" {
        return json!({ "type": "string", "format": "date-time" });
    }
    let name = message.full_name().to_owned();
    if !schemas.contains_key(&name) {
        // Placed first, so that a message referring to itself ends.
        schemas.insert(name.clone(), Json::Null);
        let mut properties = Map::new();
        for field in message.fields() {
            let mut schema = field_schema(&field, comments, schemas);
            if let (Json::Object(object), Some(text)) = (&mut schema, comments.field_text(&field)) {
                object.insert("description".into(), json!(text));
            }
            properties.insert(field.json_name().to_owned(), schema);
        }
        let mut schema = json!({ "type": "object", "properties": properties });
        if let Some(text) = comments.get(message.full_name()) {
            schema["description"] = json!(text);
        }
        schemas.insert(name.clone(), schema);
    }
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn field_schema(
    field: &FieldDescriptor,
    comments: &Comments,
    schemas: &mut BTreeMap<String, Json>,
) -> Json {
    let single = match field.kind() {
        Kind::Bool => json!({ "type": "boolean" }),
        Kind::String => json!({ "type": "string" }),
        Kind::Bytes => json!({ "type": "string", "format": "byte" }),
        Kind::Double | Kind::Float => json!({ "type": "number" }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({ "type": "integer", "format": "int32" })
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({ "type": "integer", "format": "int64", "minimum": 0 })
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            json!({ "type": "string", "format": "int64" })
        }
        Kind::Enum(enumeration) => json!({
            "type": "string",
            "enum": enumeration.values().map(|value| value.name().to_owned()).collect::<Vec<_>>(),
        }),
        Kind::Message(message) if field.is_map() => {
            let value = message.map_entry_value_field();
            return json!({ "type": "object", "additionalProperties": field_schema(&value, comments, schemas) });
        }
        Kind::Message(message) => message_ref(&message, comments, schemas),
    };
    if field.is_list() {
        json!({ "type": "array", "items": single })
    } else {
        single
    }
}

/// The leading comments of the contracts' elements, by full name.
struct Comments(BTreeMap<String, String>);

impl Comments {
    fn of(pool: &DescriptorPool) -> Self {
        let mut comments = BTreeMap::new();
        for file in pool.files() {
            let proto = file.file_descriptor_proto();
            let Some(info) = &proto.source_code_info else {
                continue;
            };
            for location in &info.location {
                let Some(text) = location.leading_comments.as_deref() else {
                    continue;
                };
                if let Some(name) = element_name(&file, &location.path) {
                    comments.insert(name, text.trim().replace('\n', " ").replace("  ", " "));
                }
            }
        }
        Self(comments)
    }

    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    fn field_text(&self, field: &FieldDescriptor) -> Option<String> {
        self.get(field.full_name())
    }

    fn field(&self, field: &FieldDescriptor) -> String {
        self.field_text(field).unwrap_or_default()
    }
}

/// The full name of the element at a source location path: top-level
/// messages (4), their fields (2), services (6) and their methods (2).
fn element_name(file: &prost_reflect::FileDescriptor, path: &[i32]) -> Option<String> {
    let proto = file.file_descriptor_proto();
    let package = proto.package();
    match path {
        [4, message] => Some(format!(
            "{package}.{}",
            proto.message_type.get(*message as usize)?.name()
        )),
        [4, message, 2, field] => {
            let message = proto.message_type.get(*message as usize)?;
            Some(format!(
                "{package}.{}.{}",
                message.name(),
                message.field.get(*field as usize)?.name()
            ))
        }
        [6, service, 2, method] => {
            let service = proto.service.get(*service as usize)?;
            Some(format!(
                "{package}.{}.{}",
                service.name(),
                service.method.get(*method as usize)?.name()
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_with_resolvable_schemas() {
        let pool = DescriptorPool::decode(shop_proto::FILE_DESCRIPTOR_SET).unwrap();
        let routes: Vec<_> = crate::routes::from_pool(&pool)
            .unwrap()
            .into_iter()
            .map(Arc::new)
            .collect();
        let document = document(&pool, &routes);
        for route in &routes {
            let operation = &document["paths"][&route.path][route.method.as_str().to_lowercase()];
            assert_eq!(operation["operationId"], route.rpc.name(), "{}", route.path);
        }
        let place = &document["paths"]["/v1/orders"]["post"];
        assert!(
            !place["summary"].as_str().unwrap().is_empty(),
            "comments become summaries"
        );
        // Every reference points at a schema that exists.
        let text = document.to_string();
        for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap();
            assert!(
                document["components"]["schemas"][name].is_object(),
                "{name}"
            );
        }
        let money = &document["components"]["schemas"]["shop.types.v1.Money"];
        assert_eq!(money["properties"]["amountMinor"]["type"], "string");
    }
}
