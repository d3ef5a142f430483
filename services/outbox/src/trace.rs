//! W3C trace context across the outbox and the broker.
//!
//! A service's spans become OpenTelemetry spans through [`layer`]. An event
//! written inside a span carries that span's `traceparent`; the relay copies
//! it into the message's headers; the subscriber makes its handler span a
//! child of it ([`continue_trace`]); events the handler writes carry the
//! handler's span, and so one trace follows an order from the first request
//! through every hop.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";

/// A `tracing` layer that gives spans OpenTelemetry trace and span ids, so
/// they can be propagated. It exports nothing; see [`layer_with`].
pub fn layer<S>() -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    layer_with(SdkTracerProvider::builder().build())
}

/// Like [`layer`], with spans going to `provider` (and its exporters).
/// The provider also becomes the global one.
pub fn layer_with<S>(
    provider: SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let tracer = provider.tracer("shop");
    opentelemetry::global::set_tracer_provider(provider);
    tracing_opentelemetry::layer().with_tracer(tracer)
}

/// The `traceparent` of the current span, if it belongs to a trace.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the remote span named by `traceparent`.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    // A span that was already entered keeps its parent; that is harmless.
    let _ = span.set_parent(parent);
}

/// The trace id part of a `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn a_child_span_continues_the_remote_trace() {
        let subscriber = tracing_subscriber::registry().with(layer());
        tracing::subscriber::with_default(subscriber, || {
            let remote = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let span = tracing::info_span!("handler");
            continue_trace(&span, Some(remote));
            let inside = span.in_scope(current_traceparent).expect("a traceparent");
            assert_eq!(trace_id(&inside), trace_id(remote));
            assert_ne!(inside, remote, "the handler has a span id of its own");
        });
    }

    #[test]
    fn outside_any_span_there_is_no_traceparent() {
        let subscriber = tracing_subscriber::registry().with(layer());
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(current_traceparent(), None);
        });
    }
}
