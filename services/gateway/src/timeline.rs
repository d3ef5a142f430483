//! An order's saga across the services: every event, when it happened, and
//! when each consumer handled it. Put together from each service's
//! `TimelineService` (what its inbox recorded), for `shop-timeline`, the
//! gateway's `/v1/orders/{order_id}/timeline` and its live page.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::order::v1::{GetOrderRequest, OrderStatus};
use shop_proto::timeline::v1::GetTimelineRequest;
use shop_proto::timeline::v1::timeline_service_client::TimelineServiceClient;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

use crate::Gateway;
use crate::problem::Problem;
use crate::transcode::{MAX_STREAM, metadata};

/// How often a live timeline asks the services again.
const POLL: Duration = Duration::from_millis(250);
/// How long a live timeline goes on after the order's last change once it
/// is CONFIRMED or CANCELLED (late consumers still report in).
const SETTLE: Duration = Duration::from_secs(3);

/// One event of the saga.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub message_id: String,
    pub event_type: String,
    /// The producer, e.g. `order-service`.
    pub source: String,
    pub occurred_at: Option<DateTime<Utc>>,
    /// Each consumer that handled it, in the order they did.
    pub handled_by: Vec<Handling>,
}

/// One consumer's handling of an event.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Handling {
    /// The service whose consumer it is, e.g. `inventory`.
    pub service: String,
    /// The consumer, e.g. `inventory` or `order-history`.
    pub consumer: String,
    pub handled_at: DateTime<Utc>,
    /// From the event's occurrence to its handling.
    pub latency_ms: Option<f64>,
}

/// An order's timeline.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Timeline {
    pub order_id: String,
    /// The order's status, e.g. `ORDER_STATUS_CONFIRMED`.
    pub status: String,
    pub steps: Vec<Step>,
    /// Services that could not be asked, with the reason: their consumers'
    /// handlings are missing.
    pub missing: BTreeMap<String, String>,
}

impl Timeline {
    /// Whether the saga is over.
    pub fn finished(&self) -> bool {
        self.status == OrderStatus::Confirmed.as_str_name()
            || self.status == OrderStatus::Cancelled.as_str_name()
    }
}

fn time(timestamp: Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let timestamp = timestamp?;
    DateTime::from_timestamp(timestamp.seconds, timestamp.nanos.max(0) as u32)
}

/// Asks the order service for the order (with the caller's own rights) and
/// every service for what it handled of the order's flow.
pub async fn gather(
    order: Channel,
    services: &[(String, Channel)],
    order_id: &str,
    metadata: &MetadataMap,
    deadline: Duration,
) -> Result<Timeline, tonic::Status> {
    let mut request = tonic::Request::new(GetOrderRequest {
        order_id: order_id.to_owned(),
    });
    *request.metadata_mut() = metadata.clone();
    request.set_timeout(deadline);
    let status = OrderServiceClient::new(order)
        .get_order(request)
        .await?
        .into_inner()
        .order
        .map(|order| order.status().as_str_name().to_owned())
        .unwrap_or_default();

    let asks = services.iter().map(|(service, channel)| {
        let mut request = tonic::Request::new(GetTimelineRequest {
            correlation_id: order_id.to_owned(),
        });
        *request.metadata_mut() = metadata.clone();
        request.set_timeout(deadline);
        let mut client = TimelineServiceClient::new(channel.clone());
        async move { (service.clone(), client.get_timeline(request).await) }
    });
    let answers = futures_util::future::join_all(asks).await;

    let mut steps: BTreeMap<String, Step> = BTreeMap::new();
    let mut missing = BTreeMap::new();
    for (service, answer) in answers {
        let entries = match answer {
            Ok(response) => response.into_inner().entries,
            Err(status) if status.code() == tonic::Code::PermissionDenied => return Err(status),
            Err(status) => {
                missing.insert(service, status.message().to_owned());
                continue;
            }
        };
        for entry in entries {
            let occurred_at = time(entry.occurred_at);
            let step = steps
                .entry(entry.message_id.clone())
                .or_insert_with(|| Step {
                    message_id: entry.message_id.clone(),
                    event_type: entry.event_type.clone(),
                    source: entry.source.clone(),
                    occurred_at,
                    handled_by: Vec::new(),
                });
            if let Some(handled_at) = time(entry.handled_at) {
                let latency_ms = occurred_at.map(|occurred| {
                    (handled_at - occurred).num_microseconds().unwrap_or(0) as f64 / 1000.0
                });
                step.handled_by.push(Handling {
                    service: service.clone(),
                    consumer: entry.consumer,
                    handled_at,
                    latency_ms,
                });
            }
        }
    }
    let mut steps: Vec<Step> = steps.into_values().collect();
    for step in &mut steps {
        step.handled_by.sort_by_key(|handling| handling.handled_at);
    }
    steps.sort_by_key(|step| {
        (
            step.occurred_at
                .or_else(|| step.handled_by.first().map(|h| h.handled_at)),
            step.message_id.clone(),
        )
    });
    Ok(Timeline {
        order_id: order_id.to_owned(),
        status,
        steps,
        missing,
    })
}

/// The timeline as text, for a terminal: each event with its time from the
/// first one, its producer, and each consumer with its latency.
pub fn render(timeline: &Timeline) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "order {}  {}", timeline.order_id, timeline.status);
    let start = timeline.steps.iter().find_map(|step| step.occurred_at);
    let mut previous: Option<DateTime<Utc>> = None;
    for step in &timeline.steps {
        let at = match (step.occurred_at, start) {
            (Some(at), Some(start)) => format!("+{:>8.1} ms", ms(at - start)),
            _ => format!("{:>12}", "?"),
        };
        let gap = match (step.occurred_at, previous) {
            (Some(at), Some(before)) => format!("(+{:.1} ms)", ms(at - before)),
            _ => String::new(),
        };
        let name = step
            .event_type
            .rsplit('.')
            .next()
            .unwrap_or(&step.event_type);
        let _ = writeln!(out, "{at}  {name:<28} {:<22} {gap}", step.source);
        for handling in &step.handled_by {
            let latency = handling
                .latency_ms
                .map(|ms| format!("{ms:.1} ms"))
                .unwrap_or_else(|| "?".into());
            let _ = writeln!(
                out,
                "{:>14}  → {:<26} handled after {latency}",
                "", handling.consumer
            );
        }
        previous = step.occurred_at.or(previous);
    }
    for (service, reason) in &timeline.missing {
        let _ = writeln!(out, "(the {service} service did not answer: {reason})");
    }
    out
}

fn ms(delta: chrono::TimeDelta) -> f64 {
    delta.num_microseconds().unwrap_or(0) as f64 / 1000.0
}

/// The order service's channel, every service's by name, and the call
/// deadline.
type Targets = (Channel, Vec<(String, Channel)>, Duration);

fn channels(gateway: &Gateway) -> Option<Targets> {
    let upstream = gateway.upstream("order")?;
    let (order, deadline) = (upstream.channel(), upstream.call_timeout());
    let services = ["order", "inventory", "payment", "notification", "user"]
        .into_iter()
        .filter_map(|name| Some((name.to_owned(), gateway.upstream(name)?.channel())))
        .collect();
    Some((order, services, deadline))
}

/// `GET /v1/orders/{order_id}/timeline`: the timeline now, as JSON.
pub async fn handler(
    State(gateway): State<Arc<Gateway>>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some((order, services, deadline)) = channels(&gateway) else {
        return Problem::unavailable("a service is not configured").into_response();
    };
    match gather(order, &services, &order_id, &metadata(&headers), deadline).await {
        Ok(timeline) => axum::Json(timeline).into_response(),
        Err(status) => Problem::from_status(&status).into_response(),
    }
}

/// `GET /v1/orders/{order_id}/timeline/events`: the timeline as it
/// unfolds, as server-sent events: a `timeline` event whenever it changed,
/// `end` once the saga is over and settled; an `error` event (a problem)
/// ends it early.
pub async fn events(
    State(gateway): State<Arc<Gateway>>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some((order, services, deadline)) = channels(&gateway) else {
        return Problem::unavailable("a service is not configured").into_response();
    };
    let metadata = metadata(&headers);
    // The first answer decides between an error status and a stream.
    let first = match gather(order.clone(), &services, &order_id, &metadata, deadline).await {
        Ok(timeline) => timeline,
        Err(status) => return Problem::from_status(&status).into_response(),
    };
    let Some(slot) = gateway.open_stream() else {
        return Problem::unavailable("too many open streams; try again later").into_response();
    };
    let shutdown = gateway.shutdown.clone();
    let poll = Poll {
        order,
        services,
        order_id,
        metadata,
        deadline,
        _slot: slot,
    };
    let stream = async_stream(first, poll);
    let events = futures_util::StreamExt::take_until(stream, shutdown.cancelled_owned());
    let events = futures_util::StreamExt::take_until(events, tokio::time::sleep(MAX_STREAM));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// What a live timeline asks, and its stream slot.
struct Poll {
    order: Channel,
    services: Vec<(String, Channel)>,
    order_id: String,
    metadata: MetadataMap,
    deadline: Duration,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

fn async_stream(
    first: Timeline,
    poll: Poll,
) -> impl futures_util::Stream<Item = Result<Event, axum::Error>> {
    struct Polling {
        last: Option<Timeline>,
        pending: Option<Timeline>,
        changed_at: tokio::time::Instant,
        started: tokio::time::Instant,
        done: bool,
    }
    let state = Polling {
        last: None,
        pending: Some(first),
        changed_at: tokio::time::Instant::now(),
        started: tokio::time::Instant::now(),
        done: false,
    };
    let poll = Arc::new(poll);
    futures_util::stream::unfold(state, move |mut state| {
        let poll = poll.clone();
        async move {
            if state.done {
                return None;
            }
            loop {
                if let Some(timeline) = state.pending.take()
                    && state.last.as_ref() != Some(&timeline)
                {
                    state.changed_at = tokio::time::Instant::now();
                    let event = Event::default().event("timeline").json_data(&timeline);
                    state.last = Some(timeline);
                    return Some((event.map_err(axum::Error::new), state));
                }
                let settled = state.last.as_ref().is_some_and(Timeline::finished)
                    && state.changed_at.elapsed() >= SETTLE;
                if settled || state.started.elapsed() >= MAX_STREAM {
                    state.done = true;
                    return Some((Ok(Event::default().event("end").data("{}")), state));
                }
                tokio::time::sleep(POLL).await;
                let next = gather(
                    poll.order.clone(),
                    &poll.services,
                    &poll.order_id,
                    &poll.metadata,
                    poll.deadline,
                );
                match next.await {
                    Ok(timeline) => state.pending = Some(timeline),
                    Err(status) => {
                        state.done = true;
                        let event = Event::default()
                            .event("error")
                            .json_data(Problem::from_status(&status));
                        return Some((event.map_err(axum::Error::new), state));
                    }
                }
            }
        }
    })
}

/// `GET /orders/{order_id}/timeline`: a page that shows the timeline live.
/// It reads a staff token from its URL fragment (`#token=…`), which the
/// browser never sends to the server.
pub async fn page() -> impl IntoResponse {
    (
        [
            (axum::http::header::CACHE_CONTROL, "no-store"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
            ),
            (axum::http::header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(include_str!("timeline.html")),
    )
}
