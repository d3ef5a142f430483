//! The REST routes, read from the contracts: every RPC of a `shop.*`
//! service that carries a `google.api.http` annotation becomes one route.

use prost_reflect::{DescriptorPool, MethodDescriptor, Value};

/// One HTTP route and the RPC it calls.
#[derive(Debug, Clone)]
pub struct Route {
    /// HTTP method.
    pub method: http::Method,
    /// Path template, e.g. `/v1/orders/{order_id}`.
    pub path: String,
    /// Names of the request fields the path carries, in order.
    pub path_fields: Vec<String>,
    /// `*`: the JSON body is the request message; empty: no body (the
    /// remaining fields come from the query string).
    pub body: String,
    /// The RPC.
    pub rpc: MethodDescriptor,
}

impl Route {
    /// The service's short name, which names its upstream: `order` for
    /// `shop.order.v1.OrderService`.
    pub fn upstream(&self) -> &str {
        upstream_of(self.rpc.parent_service().full_name())
    }

    /// The gRPC path, `/shop.order.v1.OrderService/GetOrder`.
    pub fn grpc_path(&self) -> String {
        format!(
            "/{}/{}",
            self.rpc.parent_service().full_name(),
            self.rpc.name()
        )
    }

    /// Whether calling it twice does no more than calling it once, so a
    /// failed call may be retried: reads only.
    pub fn idempotent(&self) -> bool {
        self.method == http::Method::GET
    }
}

/// `order` for `shop.order.v1.OrderService`.
pub fn upstream_of(service: &str) -> &str {
    service.split('.').nth(1).unwrap_or(service)
}

/// Every annotated RPC of the `shop.*` services in `pool`.
pub fn from_pool(pool: &DescriptorPool) -> anyhow::Result<Vec<Route>> {
    let http = pool
        .get_extension_by_name("google.api.http")
        .ok_or_else(|| anyhow::anyhow!("the contracts lack google.api.http"))?;
    let mut routes = Vec::new();
    for service in pool.services() {
        if !service.full_name().starts_with("shop.") {
            continue;
        }
        for rpc in service.methods() {
            let options = rpc.options();
            if !options.has_extension(&http) {
                continue;
            }
            let Value::Message(rule) = options.get_extension(&http).into_owned() else {
                continue;
            };
            let text = |name: &str| {
                rule.get_field_by_name(name)
                    .and_then(|value| value.as_str().map(str::to_owned))
                    .unwrap_or_default()
            };
            let (method, path) = [
                (http::Method::GET, "get"),
                (http::Method::POST, "post"),
                (http::Method::PUT, "put"),
                (http::Method::DELETE, "delete"),
                (http::Method::PATCH, "patch"),
            ]
            .into_iter()
            .find_map(|(method, name)| {
                let path = text(name);
                (!path.is_empty()).then_some((method, path))
            })
            .ok_or_else(|| anyhow::anyhow!("{}: no HTTP method", rpc.full_name()))?;
            let path_fields = path_fields(&path)
                .map_err(|error| anyhow::anyhow!("{}: {error}", rpc.full_name()))?;
            for field in &path_fields {
                anyhow::ensure!(
                    rpc.input().get_field_by_name(field).is_some(),
                    "{}: the path names {field}, which the request lacks",
                    rpc.full_name()
                );
            }
            let body = text("body");
            anyhow::ensure!(
                body.is_empty() || body == "*",
                "{}: only body \"*\" or none is supported",
                rpc.full_name()
            );
            routes.push(Route {
                method,
                path,
                path_fields,
                body,
                rpc,
            });
        }
    }
    Ok(routes)
}

/// The `{field}` segments of a template; anything fancier is refused.
fn path_fields(path: &str) -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(path.starts_with('/'), "path {path} must start with /");
    let mut fields = Vec::new();
    for segment in path.split('/').skip(1) {
        if let Some(inner) = segment.strip_prefix('{') {
            let field = inner
                .strip_suffix('}')
                .filter(|field| field.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .ok_or_else(|| anyhow::anyhow!("unsupported path segment {segment}"))?;
            fields.push(field.to_owned());
        } else {
            anyhow::ensure!(
                !segment.contains(['{', '}', ':', '*']),
                "unsupported path segment {segment}"
            );
        }
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_public_rpc_has_a_route_and_reads_are_the_only_retried_ones() {
        let pool = DescriptorPool::decode(shop_proto::FILE_DESCRIPTOR_SET).unwrap();
        let routes = from_pool(&pool).unwrap();
        // Every RPC of the five services' own APIs (the timeline API every
        // service serves has gateway routes of its own).
        let rpcs: usize = pool
            .services()
            .filter(|service| {
                ["order", "inventory", "payment", "notification", "user"]
                    .contains(&upstream_of(service.full_name()))
            })
            .map(|service| service.methods().len())
            .sum();
        assert_eq!(routes.len(), rpcs, "an RPC has no google.api.http rule");
        let place = routes
            .iter()
            .find(|route| route.rpc.name() == "PlaceOrder")
            .unwrap();
        assert_eq!(
            (place.method.as_str(), place.path.as_str()),
            ("POST", "/v1/orders")
        );
        assert_eq!(place.upstream(), "order");
        assert!(!place.idempotent());
        let get = routes
            .iter()
            .find(|route| route.rpc.name() == "GetOrder")
            .unwrap();
        assert_eq!(get.path_fields, ["order_id"]);
        assert_eq!(get.grpc_path(), "/shop.order.v1.OrderService/GetOrder");
        assert!(get.idempotent());
    }

    #[test]
    fn every_released_http_route_is_still_served() {
        // `buf breaking` guards the messages and RPCs; the HTTP routes,
        // which live in options it does not compare, are guarded here
        // against the same image of the released contracts.
        let released =
            DescriptorPool::decode(include_bytes!("../../../proto/released.binpb").as_slice())
                .unwrap();
        let current = DescriptorPool::decode(shop_proto::FILE_DESCRIPTOR_SET).unwrap();
        let key = |route: &Route| {
            (
                route.method.to_string(),
                route.path.clone(),
                route.body.clone(),
                route.rpc.full_name().to_owned(),
            )
        };
        let now: std::collections::BTreeSet<_> =
            from_pool(&current).unwrap().iter().map(key).collect();
        let released = from_pool(&released).unwrap();
        assert!(!released.is_empty());
        for route in &released {
            assert!(
                now.contains(&key(route)),
                "the released route {} {} ({}) is gone or changed; release new contracts \
                 (buf build --exclude-source-info -o proto/released.binpb) only for a break on purpose",
                route.method,
                route.path,
                route.rpc.full_name()
            );
        }
    }

    #[test]
    fn templates_beyond_simple_fields_are_refused() {
        assert!(path_fields("/v1/{name=orders/*}").is_err());
        assert!(path_fields("/v1/orders/{id}:cancel").is_err());
        assert!(path_fields("v1/orders").is_err());
        assert_eq!(path_fields("/v1/a/{x}/b/{y_z}").unwrap(), ["x", "y_z"]);
    }
}
