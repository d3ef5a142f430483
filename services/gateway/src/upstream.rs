//! The gateway's clients of the services: one per service, balanced over
//! its replicas, every call under a deadline, reads retried with backoff
//! and jitter, and a circuit breaker that stops calling a service that keeps
//! failing until a probe call succeeds.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};

/// Longest pause before a retry.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(2);

/// How the gateway calls the services.
#[derive(Debug, Clone, clap::Args)]
pub struct CallSettings {
    /// Deadline of each call to a service (sent as `grpc-timeout`).
    #[arg(long, env = "GATEWAY_CALL_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub call_timeout: Duration,
    /// Extra attempts of a read that failed with UNAVAILABLE; writes are
    /// never repeated.
    #[arg(long, env = "GATEWAY_READ_RETRIES", default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=10))]
    pub read_retries: u32,
    /// Delay before the first retry; doubles per retry, with full jitter.
    #[arg(long, env = "GATEWAY_RETRY_BACKOFF", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,
    /// Consecutive failures (unreachable, timed out) that open a service's
    /// circuit.
    #[arg(long, env = "GATEWAY_BREAKER_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_failures: u32,
    /// How long an open circuit refuses calls before one probe call is let
    /// through (half-open).
    #[arg(long, env = "GATEWAY_BREAKER_COOLDOWN", default_value = "10s", value_parser = humantime::parse_duration)]
    pub breaker_cooldown: Duration,
}

/// Where a circuit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls are refused at once until the cooldown ends.
    Open,
    /// One probe call is in flight; its outcome closes or reopens.
    HalfOpen,
}

impl CircuitState {
    /// Lower-case name, for JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }

    fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open => 2.0,
        }
    }
}

#[derive(Debug)]
enum Circuit {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// A circuit breaker: consecutive failures open it; after the cooldown one
/// probe is let through.
#[derive(Debug)]
pub struct Breaker {
    service: String,
    threshold: u32,
    cooldown: Duration,
    circuit: Mutex<Circuit>,
}

impl Breaker {
    fn new(service: &str, threshold: u32, cooldown: Duration) -> Self {
        let breaker = Self {
            service: service.to_owned(),
            threshold,
            cooldown,
            circuit: Mutex::new(Circuit::Closed { failures: 0 }),
        };
        breaker.publish(CircuitState::Closed);
        breaker
    }

    /// The state as callers see it now.
    pub fn state(&self) -> CircuitState {
        match &*self.circuit.lock().expect("circuit lock") {
            Circuit::Closed { .. } => CircuitState::Closed,
            Circuit::Open { until } if Instant::now() >= *until => CircuitState::HalfOpen,
            Circuit::Open { .. } => CircuitState::Open,
            Circuit::HalfOpen => CircuitState::HalfOpen,
        }
    }

    /// A permit for a call, if one may go out now; the first call after
    /// the cooldown is the probe, and others are refused until its outcome.
    fn admit(&self) -> Option<Permit<'_>> {
        let mut circuit = self.circuit.lock().expect("circuit lock");
        let probe = match &*circuit {
            Circuit::Closed { .. } => false,
            Circuit::Open { until } if Instant::now() >= *until => {
                *circuit = Circuit::HalfOpen;
                self.publish(CircuitState::HalfOpen);
                true
            }
            Circuit::Open { .. } | Circuit::HalfOpen => return None,
        };
        Some(Permit {
            breaker: self,
            probe,
            recorded: false,
        })
    }

    /// A probe that ended without an outcome (its caller went away): the
    /// circuit is due for another probe at once.
    fn abandon_probe(&self) {
        let mut circuit = self.circuit.lock().expect("circuit lock");
        if matches!(*circuit, Circuit::HalfOpen) {
            *circuit = Circuit::Open {
                until: Instant::now(),
            };
        }
    }

    fn record(&self, healthy: bool) {
        let mut circuit = self.circuit.lock().expect("circuit lock");
        let next = match (&*circuit, healthy) {
            (_, true) => Circuit::Closed { failures: 0 },
            (Circuit::Closed { failures }, false) if failures + 1 < self.threshold => {
                Circuit::Closed {
                    failures: failures + 1,
                }
            }
            (_, false) => Circuit::Open {
                until: Instant::now() + self.cooldown,
            },
        };
        let changed = std::mem::discriminant(&*circuit) != std::mem::discriminant(&next);
        *circuit = next;
        if changed {
            let state = match &*circuit {
                Circuit::Closed { .. } => CircuitState::Closed,
                Circuit::Open { .. } => CircuitState::Open,
                Circuit::HalfOpen => CircuitState::HalfOpen,
            };
            tracing::info!(service = %self.service, state = state.as_str(), "circuit changed");
            self.publish(state);
        }
    }

    fn publish(&self, state: CircuitState) {
        metrics::gauge!("gateway_circuit_state", "service" => self.service.clone())
            .set(state.gauge());
    }
}

/// Leave to make one call; its outcome goes to the breaker through
/// [`Permit::record`]. A probe dropped before that (its caller went away)
/// lets the next call probe.
#[derive(Debug)]
struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Permit<'_> {
    fn record(mut self, healthy: bool) {
        self.recorded = true;
        self.breaker.record(healthy);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            self.breaker.abandon_probe();
        }
    }
}

/// Whether a status means the service could not do the call at all (and
/// counts against its circuit), as opposed to an answer about the request.
fn service_failed(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::ResourceExhausted
    )
}

/// One service: its balanced channels and its breaker.
#[derive(Debug)]
pub struct Upstream {
    /// Short name: `order`, `inventory`, …
    pub name: String,
    channel: Channel,
    /// Long-lived streams get connections of their own, so that they never
    /// use up the streams a connection allows and hold up ordinary calls.
    stream_channel: Channel,
    breaker: Breaker,
    settings: CallSettings,
}

impl Upstream {
    /// A client of the replicas at `urls` (connected lazily: a replica
    /// that is down does not stop the gateway starting).
    pub fn new(name: &str, urls: &[String], settings: &CallSettings) -> anyhow::Result<Self> {
        anyhow::ensure!(!urls.is_empty(), "no address for the {name} service");
        let endpoints = urls
            .iter()
            .map(|url| {
                Ok(Endpoint::from_shared(url.clone())
                    .map_err(|error| anyhow::anyhow!("{name} service address {url}: {error}"))?
                    .connect_timeout(settings.call_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .keep_alive_while_idle(true))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let balanced = |endpoints: &[Endpoint]| {
            if endpoints.len() == 1 {
                endpoints[0].connect_lazy()
            } else {
                Channel::balance_list(endpoints.iter().cloned())
            }
        };
        Ok(Self {
            name: name.to_owned(),
            channel: balanced(&endpoints),
            stream_channel: balanced(&endpoints),
            breaker: Breaker::new(name, settings.breaker_failures, settings.breaker_cooldown),
            settings: settings.clone(),
        })
    }

    /// The channel, for typed clients; calls on it bypass the breaker
    /// unless made through [`Upstream::guarded`].
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// A request for a typed client: the caller's `metadata` and the call
    /// deadline.
    pub fn request<T>(
        &self,
        message: T,
        metadata: &tonic::metadata::MetadataMap,
    ) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        *request.metadata_mut() = metadata.clone();
        request.set_timeout(self.settings.call_timeout);
        request
    }

    /// The deadline of each call.
    pub fn call_timeout(&self) -> Duration {
        self.settings.call_timeout
    }

    /// The circuit's state.
    pub fn circuit(&self) -> CircuitState {
        self.breaker.state()
    }

    /// Calls `path` with an encoded request, forwarding `metadata`.
    /// `idempotent` calls that find the service unavailable are tried again.
    pub async fn unary(
        &self,
        path: &str,
        request: Bytes,
        metadata: &tonic::metadata::MetadataMap,
        idempotent: bool,
    ) -> Result<Bytes, tonic::Status> {
        let retries = if idempotent {
            self.settings.read_retries
        } else {
            0
        };
        let mut attempt = 0;
        loop {
            let result = self.once(path, request.clone(), metadata).await;
            match result {
                Err(status)
                    if status.code() == Code::Unavailable
                        && attempt < retries
                        && self.breaker.state() == CircuitState::Closed =>
                {
                    attempt += 1;
                    let ceiling = self
                        .settings
                        .retry_backoff
                        .saturating_mul(1 << (attempt - 1).min(16))
                        .min(MAX_RETRY_BACKOFF);
                    let delay = ceiling.mul_f64(rand::random::<f64>());
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    /// Runs `call` through the breaker: refused at once while it is open.
    pub async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let Some(permit) = self.breaker.admit() else {
            return Err(tonic::Status::unavailable(format!(
                "the {} service is unavailable (circuit open)",
                self.name
            )));
        };
        let result = tokio::time::timeout(self.settings.call_timeout, call)
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("timeout expired")));
        let result = result.map_err(|status| match status.code() {
            // tonic's own enforcement of the call's deadline.
            Code::Cancelled if status.message().to_lowercase().contains("timeout expired") => {
                tonic::Status::deadline_exceeded(format!(
                    "the {} service did not answer in time",
                    self.name
                ))
            }
            Code::DeadlineExceeded => tonic::Status::deadline_exceeded(format!(
                "the {} service did not answer in time",
                self.name
            )),
            // The gateway cancels no call it waits for: CANCELLED otherwise
            // means the connection to the service broke under the call.
            Code::Cancelled => tonic::Status::unavailable(format!(
                "the connection to the {} service was lost",
                self.name
            )),
            _ => status,
        });
        permit.record(!matches!(&result, Err(status) if service_failed(status.code())));
        result
    }

    async fn once(
        &self,
        path: &str,
        request: Bytes,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Bytes, tonic::Status> {
        let path: http::uri::PathAndQuery = path
            .parse()
            .map_err(|_| tonic::Status::internal("bad method path"))?;
        let channel = self.channel.clone();
        let timeout = self.settings.call_timeout;
        let metadata = metadata.clone();
        self.guarded(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready()
                .await
                .map_err(|error| tonic::Status::unavailable(format!("not reachable: {error}")))?;
            let mut request = tonic::Request::new(request);
            *request.metadata_mut() = metadata;
            request.set_timeout(timeout);
            grpc.unary(request, path, RawCodec)
                .await
                .map(tonic::Response::into_inner)
        })
        .await
    }

    /// Opens a server stream of `path` (no retries; the stream itself has no
    /// deadline, only its opening).
    pub async fn server_streaming(
        &self,
        path: &str,
        request: Bytes,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<tonic::Streaming<Bytes>, tonic::Status> {
        let path: http::uri::PathAndQuery = path
            .parse()
            .map_err(|_| tonic::Status::internal("bad method path"))?;
        let channel = self.stream_channel.clone();
        let metadata = metadata.clone();
        self.guarded(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready()
                .await
                .map_err(|error| tonic::Status::unavailable(format!("not reachable: {error}")))?;
            let mut request = tonic::Request::new(request);
            *request.metadata_mut() = metadata;
            grpc.server_streaming(request, path, RawCodec)
                .await
                .map(tonic::Response::into_inner)
        })
        .await
    }
}

/// Messages passed through as encoded bytes: the gateway encodes and
/// decodes them itself, from the contracts' descriptors.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Self::Error> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_failures_open_the_circuit_and_one_probe_closes_it() {
        let breaker = Breaker::new("test", 3, Duration::from_millis(0));
        breaker.record(false);
        breaker.record(false);
        assert_eq!(breaker.state(), CircuitState::Closed);
        breaker.record(true);
        breaker.record(false);
        breaker.record(false);
        assert_eq!(
            breaker.state(),
            CircuitState::Closed,
            "a success resets the count"
        );
        breaker.record(false);
        // Zero cooldown: open, and due for its probe at once.
        let probe = breaker.admit().expect("the probe goes through");
        assert!(breaker.admit().is_none(), "others wait for the probe");
        probe.record(false);
        let probe = breaker
            .admit()
            .expect("a failed probe reopens, due again at once here");
        probe.record(true);
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert!(breaker.admit().is_some());
    }

    #[test]
    fn a_probe_whose_caller_went_away_lets_the_next_call_probe() {
        let breaker = Breaker::new("test", 1, Duration::from_millis(0));
        breaker.record(false);
        let probe = breaker.admit().expect("the probe goes through");
        assert!(breaker.admit().is_none());
        drop(probe);
        let probe = breaker
            .admit()
            .expect("a new probe after the abandoned one");
        probe.record(true);
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[test]
    fn an_open_circuit_refuses_calls_until_its_cooldown_ends() {
        let breaker = Breaker::new("test", 1, Duration::from_secs(3600));
        breaker.record(false);
        assert_eq!(breaker.state(), CircuitState::Open);
        assert!(breaker.admit().is_none());
    }
}
