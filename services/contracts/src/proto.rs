//! Each event's protobuf schema as one self-contained text, cut from
//! `proto/shop/events/v1/events.proto`: the event's message, the messages
//! and enums it uses, and `Money` copied in from `shop/types/v1` (AsyncAPI's
//! protobuf parser reads inline text and resolves no imports but Google's).
//! The copied `Money` is the same message on the wire.

/// The events' source, as released with this build.
const EVENTS: &str = include_str!("../../../proto/shop/events/v1/events.proto");
/// The money type the events use.
const MONEY: &str = include_str!("../../../proto/shop/types/v1/money.proto");

const MONEY_FULL_NAME: &str = "shop.types.v1.Money";
const TIMESTAMP: &str = "google.protobuf.Timestamp";

/// One top-level `message` or `enum` with the comment lines just above it.
#[derive(Debug, Clone)]
struct Block {
    name: String,
    /// Comment lines, without `//`.
    comment: Vec<String>,
    /// The text, comments included, as in the file.
    text: String,
}

fn blocks(source: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut comment: Vec<&str> = Vec::new();
    let mut current: Option<(String, Vec<&str>, Vec<&str>)> = None;
    for line in source.lines() {
        if let Some((name, lines, comment_lines)) = current.as_mut() {
            lines.push(line);
            if line == "}" {
                blocks.push(Block {
                    name: std::mem::take(name),
                    comment: comment_lines
                        .iter()
                        .map(|line| line.trim_start_matches("//").trim().to_owned())
                        .collect(),
                    text: lines.join("\n"),
                });
                current = None;
            }
            continue;
        }
        if line.starts_with("//") {
            comment.push(line);
        } else if let Some(name) = line
            .strip_prefix("message ")
            .or_else(|| line.strip_prefix("enum "))
            .and_then(|rest| rest.split_whitespace().next())
        {
            let mut lines = comment.clone();
            lines.push(line);
            current = Some((name.to_owned(), lines, std::mem::take(&mut comment)));
        } else {
            comment.clear();
        }
    }
    blocks
}

/// Identifiers outside comments: the types a block refers to.
fn references(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .flat_map(|code| code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|word| !word.is_empty())
}

/// An event's schema: the protobuf text of message `event` (its short
/// name) marked `// @RootNode`, with everything it uses. `None` if
/// `events.proto` has no such message.
pub fn schema(event: &str) -> Option<String> {
    let mut all = blocks(EVENTS);
    let money = blocks(MONEY)
        .into_iter()
        .find(|block| block.name == "Money")
        .expect("money.proto defines Money");
    for block in &mut all {
        block.text = block.text.replace(MONEY_FULL_NAME, "Money");
    }
    all.push(money);
    if !all.iter().any(|block| block.name == event) {
        return None;
    }

    let mut needed = vec![event.to_owned()];
    let mut next = 0;
    while next < needed.len() {
        let block = all
            .iter()
            .find(|block| block.name == needed[next])
            .expect("needed blocks exist");
        for word in references(&block.text) {
            if word != block.name
                && all.iter().any(|other| other.name == word)
                && !needed.iter().any(|name| name == word)
            {
                needed.push(word.to_owned());
            }
        }
        next += 1;
    }

    let chosen: Vec<&Block> = all
        .iter()
        .filter(|block| needed.contains(&block.name))
        .collect();
    let mut text = String::from("syntax = \"proto3\";\n\npackage shop.events.v1;\n");
    if chosen.iter().any(|block| block.text.contains(TIMESTAMP)) {
        text.push_str("\nimport \"google/protobuf/timestamp.proto\";\n");
    }
    for block in chosen {
        text.push('\n');
        if block.name == event {
            let declaration = format!("message {event} ");
            let marked =
                block
                    .text
                    .replacen(&declaration, &format!("// @RootNode\n{declaration}"), 1);
            text.push_str(&marked);
        } else {
            text.push_str(&block.text);
        }
        text.push('\n');
    }
    Some(text)
}

/// The comment above message `event` in `events.proto`, as one paragraph.
pub fn summary(event: &str) -> Option<String> {
    blocks(EVENTS)
        .into_iter()
        .find(|block| block.name == event)
        .map(|block| block.comment.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_schema_holds_its_message_what_it_uses_and_nothing_else() {
        let text = schema("OrderPlaced").expect("OrderPlaced is an event");
        assert!(
            text.contains("// @RootNode\nmessage OrderPlaced {"),
            "{text}"
        );
        assert!(text.contains("message OrderLine {"), "{text}");
        assert!(text.contains("message Money {"), "{text}");
        assert!(text.contains("import \"google/protobuf/timestamp.proto\";"));
        assert!(!text.contains("shop.types.v1"), "{text}");
        assert!(!text.contains("message OrderConfirmed"), "{text}");
        assert_eq!(text.matches("@RootNode").count(), 1);
    }

    #[test]
    fn an_enum_an_event_uses_comes_with_it() {
        let text = schema("OrderCancelled").expect("OrderCancelled is an event");
        assert!(text.contains("enum CancelReason {"), "{text}");
        assert!(!text.contains("message Money"), "{text}");
    }

    #[test]
    fn an_unknown_message_has_no_schema() {
        assert!(schema("NoSuchEvent").is_none());
        assert_eq!(
            summary("OrderCancelled").as_deref(),
            Some("The order ended without a sale; reserved stock is released on this event.")
        );
    }
}
