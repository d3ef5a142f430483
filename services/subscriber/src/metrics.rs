//! Metric names of the subscriber runtime.

/// Deliveries settled, by consumer and outcome (`handled`, `duplicate`,
/// `retried`, `dead_lettered`) (counter).
pub const MESSAGES: &str = "subscriber_messages_total";
/// Time spent in handlers, by consumer and event type, in seconds (histogram).
pub const HANDLER_SECONDS: &str = "subscriber_handler_seconds";
/// Deliveries applied per committed batch, by consumer (histogram).
pub const BATCH_SIZE: &str = "subscriber_batch_size";
