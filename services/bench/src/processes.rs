//! The checkout under test as separate processes, so that each one's memory
//! can be read on its own.
//!
//! The benchmark re-executes its own binary as `shop-bench serve <kind> --
//! <args>`; the child parses `<args>` (and its environment) with that
//! service's or the relay's own command line, exactly as its `main.rs`
//! does, binds port 0, and prints the address it bound on stdout
//! ([`LISTENING`]). [`Checkout`] owns the children together with the
//! databases and broker names they use; dropping it stops the children
//! (SIGTERM, then SIGKILL after a grace period), drops the databases and
//! deletes the exchange and queues.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use shop_subscriber::SubscriberSettings;
use shop_tests::{TestBroker, TestDatabase};
use tokio::sync::oneshot;

/// A process of the checkout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    /// `order-service`.
    Order,
    /// `inventory-service`.
    Inventory,
    /// `payment-service`.
    Payment,
    /// `notification-service`.
    Notification,
    /// `user-service`.
    User,
    /// `outbox-relay`, for any service database.
    Relay,
}

/// The five services, in the order of every table printed.
pub(crate) const SERVICES: [Kind; 5] = [
    Kind::Order,
    Kind::Inventory,
    Kind::Payment,
    Kind::Notification,
    Kind::User,
];

impl Kind {
    /// The name on the command line, also the service's consumer name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Order => "order",
            Kind::Inventory => "inventory",
            Kind::Payment => "payment",
            Kind::Notification => "notification",
            Kind::User => "user",
            Kind::Relay => "relay",
        }
    }
}

/// The services' work queues, without the run's prefix. Each also has a
/// dead-letter queue and retry queues, removed at the end with it.
pub(crate) const WORK_QUEUES: [&str; 6] = [
    "order.events",
    "order.history",
    "inventory.events",
    "payment.events",
    "notification.events",
    "user.events",
];

/// Start of the line a child prints on stdout once it has bound its address
/// (a service's gRPC address, a relay's health address).
const LISTENING: &str = "shop-bench: listening on ";

/// How long a child may take from start to bound and ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long stopped children get to finish before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs one process of the checkout in this process: the child side of
/// `shop-bench serve`. `args` is that binary's own command line.
pub(crate) async fn serve(kind: Kind, args: Vec<String>) -> Result<()> {
    // Each arm is the binary's `main.rs`, plus the line that tells the
    // parent where it listens.
    macro_rules! serve_service {
        ($service:ident, $binary:literal) => {{
            let settings =
                $service::Settings::try_parse_from(std::iter::once($binary.to_owned()).chain(args))
                    .unwrap_or_else(|error| error.exit());
            let _telemetry = shop_server::telemetry::init($binary, settings.log_json)?;
            if let Some(addr) = settings.metrics_addr {
                shop_server::metrics::install_exporter(addr)?;
            }
            let app = $service::build(settings).await?;
            announce(app.addr());
            app.run_until_stopped(shop_server::shutdown::on_signal())
                .await
        }};
    }
    match kind {
        Kind::Order => serve_service!(order_service, "order-service"),
        Kind::Inventory => serve_service!(inventory_service, "inventory-service"),
        Kind::Payment => serve_service!(payment_service, "payment-service"),
        Kind::Notification => serve_service!(notification_service, "notification-service"),
        Kind::User => serve_service!(user_service, "user-service"),
        Kind::Relay => serve_relay(args).await,
    }
}

/// The relay's `main.rs` without its quarantine commands.
async fn serve_relay(args: Vec<String>) -> Result<()> {
    let cli =
        outbox_relay::Cli::try_parse_from(std::iter::once("outbox-relay".to_owned()).chain(args))
            .unwrap_or_else(|error| error.exit());
    anyhow::ensure!(
        cli.command.is_none(),
        "shop-bench serve relay only runs the relay"
    );
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,sqlx=warn,lapin=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    outbox_relay::metrics::install_exporter(cli.settings.metrics_addr)
        .with_context(|| format!("failed to serve metrics on {}", cli.settings.metrics_addr))?;
    let relay = outbox_relay::Relay::build(cli.settings).await?;
    announce(relay.health_addr());
    relay
        .run_until_stopped(shop_server::shutdown::on_signal())
        .await
}

fn announce(addr: SocketAddr) {
    // stdout is line buffered: the parent sees the line at once.
    println!("{LISTENING}{addr}");
}

/// The checkout under test: five services and five relays, each a process
/// of its own, on fresh databases and on an exchange and queues of its own.
#[derive(Debug)]
pub(crate) struct Checkout {
    // Fields drop in order: the processes stop before their databases and
    // queues are removed.
    children: Children,
    /// gRPC address of each service, in [`SERVICES`] order.
    pub(crate) addrs: Vec<SocketAddr>,
    /// The order service's database: the benchmark reads orders from it.
    pub(crate) order_db: TestDatabase,
    _other_dbs: Vec<TestDatabase>,
    /// The services' work queues, in [`WORK_QUEUES`] order.
    pub(crate) work_queues: Vec<String>,
    /// The broker names of this run, deleted on drop.
    pub(crate) broker: TestBroker,
}

impl Checkout {
    /// Refreshes the planner statistics of every service database.
    pub(crate) async fn analyze(&self) -> Result<()> {
        for db in std::iter::once(&self.order_db).chain(&self._other_dbs) {
            let mut conn = db.connect().await?;
            sqlx::query("ANALYZE")
                .execute(&mut conn)
                .await
                .context("failed to analyze a service database")?;
        }
        Ok(())
    }

    /// Creates the databases and broker names and starts every process;
    /// returns once each has bound its address. `subscriber` is what the
    /// services will read from this environment (for the queue names to
    /// delete at the end).
    pub(crate) async fn start(subscriber: &SubscriberSettings) -> Result<Self> {
        let broker = TestBroker::new().await;
        let exchange = broker.name("events");
        let prefix = broker.name("q");
        let mut work_queues = Vec::new();
        for queue in WORK_QUEUES {
            let queue = format!("{prefix}.{queue}");
            broker.track(&queue);
            broker.track(&format!("{queue}.dlq"));
            for n in 1..subscriber.max_attempts {
                broker.track(&shop_subscriber::topology::retry_queue(
                    &queue,
                    subscriber.queue_kind,
                    n,
                ));
            }
            work_queues.push(queue);
        }

        // In SERVICES order.
        let migrators = [
            order_service::migrator(),
            inventory_service::migrator(),
            payment_service::migrator(),
            notification_service::migrator(),
            user_service::migrator(),
        ];
        let mut dbs = Vec::new();
        for (kind, migrator) in SERVICES.into_iter().zip(migrators) {
            let db = TestDatabase::create(&migrator)
                .await
                .with_context(|| format!("failed to create the {} database", kind.name()))?;
            dbs.push(db);
        }
        // Only the order database is read from here; the other pools would
        // just hold connections the services may need.
        for db in &dbs[1..] {
            db.pool.close().await;
        }

        // Connection strings travel in the environment, not on the command
        // line where `ps` shows them; both binaries read DATABASE_URL and
        // AMQP_URL. Everything else a child inherits from this process, so
        // SUBSCRIBER_*, OUTBOX_RELAY_*, RUST_LOG and the like tune it.
        let mut children = Children::default();
        let mut pending = Vec::new();
        for (kind, db) in SERVICES.into_iter().zip(&dbs) {
            let env = [
                ("DATABASE_URL", db.url.as_str()),
                ("AMQP_URL", broker.url.as_str()),
                ("AUTH_HS256_SECRET", crate::load::secret()),
            ];
            let own = own_environment(kind);
            let service_env: Vec<(&str, &str)> = env
                .iter()
                .copied()
                .chain(own.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .collect();
            let service = children.spawn(
                kind,
                format!("{}-service", kind.name()),
                &service_env,
                &[
                    "--grpc-addr",
                    "127.0.0.1:0",
                    "--metrics-addr",
                    "",
                    "--exchange",
                    &exchange,
                    "--queue-prefix",
                    &format!("{prefix}."),
                ],
            )?;
            let relay = children.spawn(
                Kind::Relay,
                format!("{}-relay", kind.name()),
                &env,
                &[
                    "--exchange",
                    &exchange,
                    "--source",
                    &format!("{}-service", kind.name()),
                    "--health-addr",
                    "127.0.0.1:0",
                    "--metrics-addr",
                    "127.0.0.1:0",
                ],
            )?;
            pending.push((service, relay));
        }
        let mut addrs = Vec::new();
        for (service, relay) in pending {
            addrs.push(children.wait_listening(service).await?);
            children.wait_listening(relay).await?;
        }
        let order_db = dbs.remove(0);
        Ok(Self {
            children,
            addrs,
            order_db,
            _other_dbs: dbs,
            work_queues,
            broker,
        })
    }

    /// The gRPC address of `kind`.
    pub(crate) fn addr(&self, kind: Kind) -> SocketAddr {
        let index = SERVICES.iter().position(|k| *k == kind).expect("a service");
        self.addrs[index]
    }

    /// Peak resident memory of each process so far, in KiB, by process
    /// name (`order-service`, `order-relay`, …); `None` where
    /// `/proc/<pid>/status` could not be read.
    pub(crate) fn peak_rss_kib(&self) -> Vec<(String, Option<u64>)> {
        self.children
            .list
            .iter()
            .map(|child| (child.name.clone(), peak_rss_kib(child.process.id())))
            .collect()
    }

    /// Every process of the checkout by name, with its pid.
    pub(crate) fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .list
            .iter()
            .map(|child| (child.name.clone(), child.process.id()))
            .collect()
    }

    /// Pauses every relay (SIGSTOP) until the value returned is dropped or
    /// `limit` has passed, whichever comes first (SIGCONT): nothing is
    /// published, so no saga step runs and the services answer only their
    /// callers. Keep `limit` well under the relays' lease timeout (10 s),
    /// after which PostgreSQL ends their silent sessions.
    pub(crate) fn pause_relays(&self, limit: Duration) -> Result<PausedRelays> {
        let mut paused = PausedRelays { pids: Vec::new() };
        for child in &self.children.list {
            if child.name.ends_with("-relay") {
                let pid = child.process.id();
                anyhow::ensure!(
                    signal("-STOP", pid),
                    "failed to pause {} (pid {pid})",
                    child.name
                );
                paused.pids.push(pid);
            }
        }
        let pids = paused.pids.clone();
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            for pid in pids {
                // Resuming a process that runs already changes nothing.
                signal("-CONT", pid);
            }
        });
        Ok(paused)
    }

    /// Names of children that have exited on their own.
    pub(crate) fn exited(&mut self) -> Vec<String> {
        let mut exited = Vec::new();
        for child in &mut self.children.list {
            if !matches!(child.process.try_wait(), Ok(None)) {
                exited.push(child.name.clone());
            }
        }
        exited
    }

    /// Stops every process, gracefully first; the databases and broker
    /// names go when the value is dropped.
    pub(crate) fn stop(&mut self) {
        self.children.stop();
    }
}

/// The variables set for `kind`'s service alone: `BENCH_<KIND>_<NAME>`
/// in this process's environment becomes `<NAME>` in the service's.
fn own_environment(kind: Kind) -> Vec<(String, String)> {
    own_environment_in(kind, std::env::vars())
}

fn own_environment_in(
    kind: Kind,
    vars: impl Iterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    let prefix = format!("BENCH_{}_", kind.name().to_uppercase());
    vars.filter_map(|(key, value)| {
        let name = key.strip_prefix(&prefix)?;
        (!name.is_empty()).then(|| (name.to_owned(), value))
    })
    .collect()
}

/// Peak resident set size (`VmHWM`) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[derive(Debug)]
struct Child {
    name: String,
    process: std::process::Child,
    listening: Option<oneshot::Receiver<SocketAddr>>,
}

/// Relays paused by [`Checkout::pause_relays`]; they resume when this is
/// dropped (also on an error) or at the pause's limit.
#[derive(Debug)]
pub(crate) struct PausedRelays {
    pids: Vec<u32>,
}

impl Drop for PausedRelays {
    fn drop(&mut self) {
        for pid in &self.pids {
            if !signal("-CONT", *pid) {
                eprintln!("failed to resume relay pid {pid}");
            }
        }
    }
}

/// Sends `signal` (`-STOP`, `-CONT`, `-TERM`) to `pid`; whether it was sent.
fn signal(signal: &str, pid: u32) -> bool {
    Command::new("kill")
        .args([signal, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Child processes, stopped when dropped (also on an error or ctrl-c).
#[derive(Debug, Default)]
struct Children {
    list: Vec<Child>,
}

impl Children {
    /// Starts `shop-bench serve <kind> -- <args>` with `env` added to this
    /// process's environment; returns its index.
    fn spawn(
        &mut self,
        kind: Kind,
        name: String,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Result<usize> {
        let exe = std::env::current_exe().context("failed to find the shop-bench binary")?;
        let mut command = Command::new(exe);
        command
            .args(["serve", kind.name(), "--"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            // Logging every order at info would cost more than the work
            // measured; RUST_LOG overrides.
            command.env("RUST_LOG", "warn");
        }
        let mut process = command
            .spawn()
            .with_context(|| format!("failed to start {name}"))?;
        let stdout = process.stdout.take().expect("stdout is piped");
        let (sender, receiver) = oneshot::channel();
        let prefix = name.clone();
        // Reads the child's stdout to its end: the address line once, then
        // its logs, passed on to stderr so that the pipe never fills up.
        std::thread::spawn(move || {
            let mut sender = Some(sender);
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match line.strip_prefix(LISTENING).map(str::parse::<SocketAddr>) {
                    Some(Ok(addr)) if sender.is_some() => {
                        let _ = sender.take().expect("checked").send(addr);
                    }
                    _ => eprintln!("{prefix}: {line}"),
                }
            }
        });
        self.list.push(Child {
            name,
            process,
            listening: Some(receiver),
        });
        Ok(self.list.len() - 1)
    }

    /// Waits until child `index` has printed its address.
    async fn wait_listening(&mut self, index: usize) -> Result<SocketAddr> {
        let child = &mut self.list[index];
        let receiver = child.listening.take().expect("waited for once");
        match tokio::time::timeout(START_TIMEOUT, receiver).await {
            Ok(Ok(addr)) => Ok(addr),
            Ok(Err(_)) => {
                // The reader saw the end of stdout: the child is exiting.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let status = match child.process.try_wait() {
                    Ok(Some(status)) => status.to_string(),
                    _ => "it closed its output".to_owned(),
                };
                anyhow::bail!(
                    "{} stopped before it listened ({status}); its errors are above",
                    child.name
                )
            }
            Err(_) => anyhow::bail!("{} did not listen within {START_TIMEOUT:?}", child.name),
        }
    }

    /// SIGTERM to every child, then up to [`STOP_GRACE`] for all of them to
    /// exit, then SIGKILL to the rest.
    fn stop(&mut self) {
        for child in &mut self.list {
            if matches!(child.process.try_wait(), Ok(None)) && !signal("-TERM", child.process.id())
            {
                let _ = child.process.kill();
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for child in &mut self.list {
            loop {
                match child.process.try_wait() {
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok(None) => {
                        eprintln!(
                            "{} did not stop within {STOP_GRACE:?}; killing it",
                            child.name
                        );
                        let _ = child.process.kill();
                        let _ = child.process.wait();
                        break;
                    }
                    Ok(Some(_)) | Err(_) => break,
                }
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_gets_the_variables_prefixed_with_its_name_and_no_others() {
        let vars = [
            ("BENCH_INVENTORY_SUBSCRIBER_BATCH_SIZE", "1"),
            ("BENCH_ORDER_SUBSCRIBER_CONCURRENCY", "8"),
            ("BENCH_INVENTORY_", "ignored"),
            ("SUBSCRIBER_PREFETCH", "32"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(
            own_environment_in(Kind::Inventory, vars.clone().into_iter()),
            vec![("SUBSCRIBER_BATCH_SIZE".to_owned(), "1".to_owned())]
        );
        assert!(own_environment_in(Kind::Payment, vars.into_iter()).is_empty());
    }
}
