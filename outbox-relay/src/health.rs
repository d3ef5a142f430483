//! What the relay's gRPC health service reports.
//!
//! SERVING means this instance is connected and its part of the outbox is
//! moving: it is NOT_SERVING while its session is down (no database or
//! broker), and while a row it should be publishing (ready, in one of its
//! partitions or in one no relay holds) has waited longer than the stall
//! timeout with this instance publishing nothing in that time. A relay busy
//! publishing a backlog, however old its oldest row, is making progress and
//! stays SERVING; rows held back behind a quarantined or retrying row of
//! their aggregate, and rows of partitions other live relays hold, do not
//! count against it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The relay's health, fed by the publishing loop and the backlog watcher.
#[derive(Debug)]
pub struct Health {
    reporter: HealthReporter,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    connected: bool,
    owned: Vec<i32>,
    stalled: bool,
    last_progress: Instant,
    reported: Option<ServingStatus>,
}

impl Health {
    /// Starts NOT_SERVING.
    pub fn new(reporter: HealthReporter) -> Self {
        Self {
            reporter,
            state: Mutex::new(State {
                connected: false,
                owned: Vec::new(),
                stalled: false,
                last_progress: Instant::now(),
                reported: None,
            }),
        }
    }

    /// The publishing session connected (`true`) or ended (`false`).
    pub async fn set_connected(&self, connected: bool) {
        {
            let mut state = self.state.lock().expect("health state poisoned");
            state.connected = connected;
            if connected {
                // A new session gets a full stall timeout to show progress.
                state.last_progress = Instant::now();
            }
        }
        self.report().await;
    }

    /// The partitions this instance holds now.
    pub fn set_owned(&self, owned: Vec<i32>) {
        self.state.lock().expect("health state poisoned").owned = owned;
    }

    /// The partitions this instance holds, as last set.
    pub fn owned(&self) -> Vec<i32> {
        self.state
            .lock()
            .expect("health state poisoned")
            .owned
            .clone()
    }

    /// Rows were published.
    pub fn progressed(&self) {
        self.state
            .lock()
            .expect("health state poisoned")
            .last_progress = Instant::now();
    }

    /// Takes in how long the outbox's oldest ready row has waited.
    pub async fn observe_backlog(&self, oldest_ready_wait: Duration, stall_timeout: Duration) {
        let stalled = {
            let mut state = self.state.lock().expect("health state poisoned");
            let stalled =
                oldest_ready_wait > stall_timeout && state.last_progress.elapsed() > stall_timeout;
            if stalled != state.stalled {
                if stalled {
                    tracing::warn!(
                        waited = ?oldest_ready_wait,
                        "the outbox is not moving: a ready row has waited past the stall timeout and this relay published nothing"
                    );
                } else {
                    tracing::info!("the outbox is moving again");
                }
            }
            state.stalled = stalled;
            stalled
        };
        metrics::gauge!(crate::metrics::STALLED).set(if stalled { 1.0 } else { 0.0 });
        self.report().await;
    }

    async fn report(&self) {
        let status = {
            let mut state = self.state.lock().expect("health state poisoned");
            let status = if state.connected && !state.stalled {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            if state.reported == Some(status) {
                return;
            }
            state.reported = Some(status);
            status
        };
        self.reporter.set_service_status("", status).await;
    }
}

/// Converts seconds from SQL to a duration, treating nonsense as zero.
pub fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or_default()
}
