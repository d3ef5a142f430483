//! Rust types for the checkout's protobuf contracts in `proto/`.
//!
//! Each protobuf package is a module here (`shop.order.v1` is [`order::v1`]),
//! holding its messages, a tonic client and a tonic server trait.
//! [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection, Every message implements
//! [`prost::Name`]; an event's full name (`shop.events.v1.OrderPlaced`) is its
//! routing key and AMQP `type`.

/// Common value types (`shop.types.v1`).
pub mod types {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("shop.types.v1");
    }
}

/// Domain events of the checkout saga (`shop.events.v1`).
pub mod events {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("shop.events.v1");
    }
}

/// Order service API (`shop.order.v1`).
pub mod order {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("shop.order.v1");
    }
}

/// Inventory service API (`shop.inventory.v1`).
pub mod inventory {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("shop.inventory.v1");
    }
}

/// Payment service API (`shop.payment.v1`).
pub mod payment {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("shop.payment.v1");
    }
}

/// Notification service API (`shop.notification.v1`).
pub mod notification {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("shop.notification.v1");
    }
}

/// User service API (`shop.user.v1`).
pub mod user {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("shop.user.v1");
    }
}

/// `shop.timeline.v1`: what each service handled of a business flow.
pub mod timeline {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("shop.timeline.v1");
    }
}

/// Encoded `FileDescriptorSet` of every package, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shop_descriptor");

/// Full protobuf names of every domain event, which are also their routing keys.
pub const EVENT_TYPES: &[&str] = &[
    "shop.events.v1.ProductCreated",
    "shop.events.v1.ProductPriceChanged",
    "shop.events.v1.UserRegistered",
    "shop.events.v1.OrderPlaced",
    "shop.events.v1.InventoryReserved",
    "shop.events.v1.InventoryReservationFailed",
    "shop.events.v1.InventoryReleased",
    "shop.events.v1.InventoryCommitted",
    "shop.events.v1.PaymentSucceeded",
    "shop.events.v1.PaymentFailed",
    "shop.events.v1.OrderConfirmed",
    "shop.events.v1.OrderCancelled",
    "shop.events.v1.NotificationSent",
    "shop.events.v1.PaymentRefunded",
];

/// The request paths (`/package.Service/Method`) of every method of the
/// named services, as described by `descriptor_set` (an encoded
/// `FileDescriptorSet`). Names not in the set contribute nothing.
pub fn method_paths(descriptor_set: &[u8], services: &[&str]) -> Vec<String> {
    use prost::Message;
    let Ok(set) = prost_types::FileDescriptorSet::decode(descriptor_set) else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    for file in &set.file {
        for service in &file.service {
            let full = format!("{}.{}", file.package(), service.name());
            if !services.contains(&full.as_str()) {
                continue;
            }
            for method in &service.method {
                paths.push(format!("/{full}/{}", method.name()));
            }
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn method_paths_list_the_named_services_methods_only() {
        let paths = method_paths(FILE_DESCRIPTOR_SET, &["shop.order.v1.OrderService"]);
        assert!(paths.contains(&"/shop.order.v1.OrderService/PlaceOrder".to_owned()));
        assert!(paths.contains(&"/shop.order.v1.OrderService/WatchOrder".to_owned()));
        assert!(
            paths
                .iter()
                .all(|p| p.starts_with("/shop.order.v1.OrderService/"))
        );
        assert!(method_paths(FILE_DESCRIPTOR_SET, &["no.Such"]).is_empty());
    }

    #[test]
    fn every_event_type_names_a_message_in_the_descriptor_set() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let names: Vec<String> = set
            .file
            .iter()
            .filter(|f| f.package() == "shop.events.v1")
            .flat_map(|f| {
                f.message_type
                    .iter()
                    .map(|m| format!("shop.events.v1.{}", m.name()))
            })
            .collect();
        for event_type in EVENT_TYPES {
            assert!(
                names.iter().any(|n| n == event_type),
                "{event_type} missing"
            );
        }
        assert_eq!(
            <events::v1::OrderPlaced as prost::Name>::full_name(),
            "shop.events.v1.OrderPlaced"
        );
    }
}
