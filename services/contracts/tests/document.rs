//! `asyncapi.yaml` is the generator's output for the code as it is, so a
//! published or bound event type the document does not describe (or the
//! reverse) fails here before anything runs.

use shop_contracts::{default_settings, document, services, short_name};

#[tokio::test]
async fn the_committed_asyncapi_document_is_the_one_the_code_generates() -> anyhow::Result<()> {
    let committed = include_str!("../../../asyncapi.yaml");
    let generated = shop_contracts::yaml()?;
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or(
                committed.lines().count().min(generated.lines().count()),
                |n| n,
            )
            + 1;
        panic!(
            "asyncapi.yaml differs from what the code publishes and binds, first at line {line}; \
             regenerate it with `cargo run -p shop-contracts --bin shop-asyncapi -- --write asyncapi.yaml`"
        );
    }
    Ok(())
}

#[tokio::test]
async fn every_bound_routing_key_has_a_publisher_and_every_event_a_schema() -> anyhow::Result<()> {
    let services = services(&default_settings())?;
    let document = document(&services)?;
    let messages = document["components"]["messages"]
        .as_object()
        .expect("messages");
    let published: Vec<&str> = services
        .iter()
        .flat_map(|service| &service.publishes)
        .map(|publication| short_name(&publication.event_type))
        .collect();
    let mut names: Vec<&str> = messages.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut expected = published.clone();
    expected.sort_unstable();
    expected.dedup();
    assert_eq!(names, expected, "one message per published event type");
    for (name, message) in messages {
        let schema = message["payload"]["schema"].as_str().expect("schema text");
        assert!(
            schema.contains(&format!("// @RootNode\nmessage {name} {{")),
            "{name}'s schema marks its root"
        );
    }

    // A subscriber binding an event nobody publishes is refused.
    let mut broken = services.clone();
    broken[0].subscribes[0]
        .routing_keys
        .push("shop.events.v1.NobodyPublishesThis".into());
    let error = shop_contracts::document(&broken).expect_err("an unpublished binding");
    assert!(error.to_string().contains("NobodyPublishesThis"), "{error}");
    Ok(())
}
