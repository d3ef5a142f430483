//! `shop-bench`: the whole checkout measured end to end on one machine.
//!
//! It starts the five services and their five outbox relays as separate
//! processes (this binary run again as `shop-bench serve …`, see
//! [`processes`]) on fresh databases and on an exchange and queues of their
//! own, seeds customers and products, and then runs five phases:
//!
//! 1. **baseline**: PlaceOrder's writes (order, lines, outbox row, history
//!    row, one transaction) straight through sqlx from `--callers` tasks on
//!    a scratch database with the order schema; transactions per second.
//! 2. **PlaceOrder alone**: `--callers` closed-loop PlaceOrder callers for
//!    at most 4 s with the relays paused (SIGSTOP), so no saga step runs:
//!    the API's own rate against the baseline, and its CPU per call. The
//!    orders it placed go through the saga before the next phase.
//! 3. **capacity**: `--callers` closed-loop PlaceOrder callers; PlaceOrder/s
//!    and its ratio to the baseline, latency, sagas confirmed per second
//!    during and after, and the backlog's trend.
//! 4. **steady**: `--steady-load` (80 %) of that capacity as an open-loop
//!    schedule; sagas confirmed/s ÷ orders placed/s, the backlog's trend,
//!    PlaceOrder→CONFIRMED latency, and how long the backlog took to drain.
//! 5. **memory**: the peak resident memory of every process.
//!
//! Phases 3 and 4 also print the CPU time each process (and PostgreSQL
//! and RabbitMQ, when they run on this machine) used per saga, over the
//! phase and its drain: where a faster checkout must save.
//!
//! It prints each figure next to its goal and asserts none of them. The
//! servers come from `DATABASE_URL` and `AMQP_URL`, or are started with
//! testcontainers; the databases, exchange and queues are removed at the
//! end, also after an error or ctrl-c. The processes inherit the
//! environment, so `SUBSCRIBER_*`, `OUTBOX_RELAY_*` and `RUST_LOG` (default
//! `warn` here) tune them; `BENCH_<SERVICE>_<VARIABLE>` sets `<VARIABLE>`
//! for that service's process alone (`BENCH_INVENTORY_SUBSCRIBER_BATCH_SIZE=1`),
//! as each service has its own environment in a deployment.

mod cpu;
mod load;
mod observe;
mod processes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use shop_subscriber::SubscriberSettings;
use uuid::Uuid;

use crate::cpu::{CpuSnapshot, CpuUse};
use crate::load::{Calls, Catalog, Paced, Throughput, millis};
use crate::observe::{Confirmations, Counts, Probe, Sample, Sampler, Trend, p50_p99, trend};
use crate::processes::{Checkout, Kind, SERVICES, WORK_QUEUES};

/// Measures the checkout end to end: PlaceOrder capacity against a
/// same-writes baseline, saga throughput and latency at steady load, and
/// each process's peak memory.
#[derive(Debug, Parser)]
#[command(name = "shop-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    options: Options,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs one process of the checkout under test; the benchmark starts
    /// these itself.
    #[command(hide = true)]
    Serve {
        /// Which process.
        #[arg(value_enum)]
        process: Kind,
        /// That process's own command line.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// How long and how hard the checkout is driven.
#[derive(Debug, Clone, clap::Args)]
struct Options {
    /// Seconds of the baseline and of the capacity phase.
    #[arg(long, env = "BENCH_SECONDS", default_value_t = 20)]
    seconds: u64,
    /// Seconds of the steady phase.
    #[arg(long, env = "BENCH_STEADY_SECONDS", default_value_t = 60)]
    steady_seconds: u64,
    /// Share of the measured PlaceOrder capacity offered in the steady phase.
    #[arg(long, env = "BENCH_STEADY_LOAD", default_value_t = 0.8)]
    steady_load: f64,
    /// Orders per second offered in the steady phase, instead of a share of
    /// the measured capacity (to find the rate the whole checkout sustains).
    #[arg(long, env = "BENCH_STEADY_RATE")]
    steady_rate: Option<f64>,
    /// Concurrent PlaceOrder callers in the capacity phase, writers in the
    /// baseline, and connections in the steady phase.
    #[arg(long, env = "BENCH_CALLERS", default_value_t = 16)]
    callers: usize,
    /// Customers registered before the phases.
    #[arg(long, env = "BENCH_CUSTOMERS", default_value_t = 200)]
    customers: usize,
    /// Products created before the phases.
    #[arg(long, env = "BENCH_PRODUCTS", default_value_t = 100)]
    products: usize,
    /// Longest wait, in seconds, for the backlog to drain after a phase.
    #[arg(long, env = "BENCH_DRAIN_SECONDS", default_value_t = 300)]
    drain_seconds: u64,
}

/// Goal: PlaceOrder/s ÷ baseline transactions/s.
const GOAL_CAPACITY_RATIO: f64 = 0.7;
/// Goal: sagas confirmed/s ÷ orders placed/s at steady load.
const GOAL_SAGA_RATIO: f64 = 0.95;
/// Goal: PlaceOrder→CONFIRMED p99 at steady load, in milliseconds.
const GOAL_CONFIRM_P99_MS: f64 = 250.0;
/// Goal: peak resident memory of each process, in MiB.
const GOAL_RSS_MIB: f64 = 64.0;
/// Orders placed and confirmed before anything is measured.
const WARM_UP_ORDERS: usize = 1000;

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Serve { process, args }) => processes::serve(process, args).await,
        None => {
            // Returning drops the run, which stops the processes and removes
            // the databases and queues.
            tokio::select! {
                result = run(cli.options) => result,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            }
        }
    }
}

async fn run(options: Options) -> Result<()> {
    anyhow::ensure!(
        options.seconds > 0 && options.steady_seconds > 0,
        "BENCH_SECONDS and BENCH_STEADY_SECONDS must be positive"
    );
    anyhow::ensure!(
        options.steady_load > 0.0,
        "BENCH_STEADY_LOAD must be positive"
    );
    anyhow::ensure!(options.callers > 0, "BENCH_CALLERS must be positive");
    let subscriber = subscriber_settings()?;
    let drain_timeout = Duration::from_secs(options.drain_seconds);

    let started = Instant::now();
    let mut checkout = Checkout::start(&subscriber).await?;
    let pool = checkout.order_db.pool.clone();
    header(&options, &subscriber, &pool).await?;
    println!(
        "started five services and five relays, each its own process, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let probe = Arc::new(
        Probe::connect(pool.clone(), &checkout.broker, checkout.work_queues.clone()).await?,
    );
    let confirmations = Confirmations::start(&pool).await?;

    let catalog = Arc::new(
        Catalog::seed(
            checkout.addr(Kind::User),
            checkout.addr(Kind::Inventory),
            options.customers,
            options.products,
        )
        .await?,
    );
    let learned = catalog.wait_known(&pool, Duration::from_secs(60)).await?;
    println!(
        "seeded {} customers and {} products; the order service knew them all {:.1} s later",
        options.customers,
        options.products,
        learned.as_secs_f64()
    );
    let order_addr = checkout.addr(Kind::Order);
    load::place_some(order_addr, &catalog, WARM_UP_ORDERS).await?;
    let warm_up = probe
        .wait_drained(Duration::from_secs(60))
        .await?
        .context("the warm-up orders were not all decided within 60 s")?;
    println!(
        "warm-up: {WARM_UP_ORDERS} orders through the whole saga, all decided {:.2} s after the last was placed",
        warm_up.as_secs_f64()
    );
    // A running system's tables have statistics; fresh ones would keep the
    // plans made while they were empty (sequential scans) until autovacuum
    // gets to them, a minute or more into the run.
    checkout.analyze().await?;
    println!("analyzed every service database, as autovacuum does on a running system");
    ensure_running(&mut checkout)?;

    let baseline = baseline_phase(&options, &catalog).await?;
    let alone = alone_phase(
        &options,
        &checkout,
        &probe,
        &catalog,
        baseline,
        drain_timeout,
    )
    .await?;
    ensure_running(&mut checkout)?;
    let capacity = capacity_phase(
        &options,
        &checkout,
        &probe,
        &catalog,
        baseline,
        drain_timeout,
    )
    .await?;
    ensure_running(&mut checkout)?;
    let steady = steady_phase(
        &options,
        &checkout,
        &probe,
        &confirmations,
        &catalog,
        capacity.calls.per_second(),
        drain_timeout,
    )
    .await?;
    ensure_running(&mut checkout)?;

    let memory = checkout.peak_rss_kib();
    checkout.stop();
    let largest = memory_table(&memory);
    summary(baseline, alone, &capacity, &steady, &largest);
    Ok(())
}

/// The subscriber settings the services will read from this environment.
fn subscriber_settings() -> Result<SubscriberSettings> {
    #[derive(Debug, Parser)]
    struct FromEnvironment {
        #[command(flatten)]
        subscriber: SubscriberSettings,
    }
    Ok(FromEnvironment::try_parse_from(["shop-bench"])
        .context("invalid SUBSCRIBER_* settings in the environment")?
        .subscriber)
}

async fn header(
    options: &Options,
    subscriber: &SubscriberSettings,
    pool: &sqlx::PgPool,
) -> Result<()> {
    let postgres: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(pool)
        .await
        .context("failed to read the PostgreSQL version")?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("shop-bench: the checkout end to end");
    if cfg!(debug_assertions) {
        println!(
            "  DEBUG BUILD: figures say nothing about the product; use cargo run --release -p shop-bench"
        );
    }
    println!(
        "  {cores} cores shared by everything; PostgreSQL {postgres}; subscribers: {:?} queues, prefetch {}, {} lanes",
        subscriber.queue_kind, subscriber.prefetch, subscriber.concurrency
    );
    println!(
        "  baseline and capacity {} s each with {} callers; steady {} s at {:.0} % of capacity",
        options.seconds,
        options.callers,
        options.steady_seconds,
        options.steady_load * 100.0
    );
    Ok(())
}

/// Fails if a process of the checkout has exited: figures from a partial
/// checkout would mean nothing.
fn ensure_running(checkout: &mut Checkout) -> Result<()> {
    let exited = checkout.exited();
    anyhow::ensure!(
        exited.is_empty(),
        "{} exited during the run; its errors are above",
        exited.join(", ")
    );
    Ok(())
}

async fn baseline_phase(options: &Options, catalog: &Arc<Catalog>) -> Result<Throughput> {
    println!();
    println!(
        "baseline: PlaceOrder's writes through sqlx, {} writers, {} s",
        options.callers, options.seconds
    );
    println!(
        "  one transaction per order: orders, order_lines, outbox (with its NOTIFY trigger), order_history;"
    );
    println!(
        "  the order service's own SQL on a scratch database with the order schema; nothing relays or consumes"
    );
    let baseline = load::baseline(
        catalog.clone(),
        options.callers,
        Duration::from_secs(options.seconds),
    )
    .await?;
    println!(
        "  transactions/s      {:>9.1}   ({} in {:.1} s)",
        baseline.per_second(),
        baseline.count,
        baseline.elapsed.as_secs_f64()
    );
    Ok(baseline)
}

/// What the capacity phase measured.
#[derive(Debug)]
struct Capacity {
    calls: Calls,
    ratio: f64,
}

async fn capacity_phase(
    options: &Options,
    checkout: &Checkout,
    probe: &Arc<Probe>,
    catalog: &Arc<Catalog>,
    baseline: Throughput,
    drain_timeout: Duration,
) -> Result<Capacity> {
    println!();
    println!(
        "capacity: {} closed-loop PlaceOrder callers, {} s",
        options.callers, options.seconds
    );
    let before = probe.counts().await?;
    let cpu_before = CpuSnapshot::take(&checkout.pids());
    let sampler = Sampler::start(probe.clone());
    let calls = load::closed_loop(
        checkout.addr(Kind::Order),
        catalog.clone(),
        options.callers,
        Duration::from_secs(options.seconds),
    )
    .await?;
    let at_end = probe.counts().await?;
    let samples = sampler.finish().await?;
    let drain = probe.wait_drained(drain_timeout).await?;
    let after = probe.counts().await?;
    let cpu = cpu_use(cpu_before, &checkout.pids());

    let placed = print_calls(&calls);
    let ratio = placed / baseline.per_second();
    println!("  ÷ baseline          {ratio:>9.2}   (goal ≥ {GOAL_CAPACITY_RATIO:.2})");
    let during = (at_end.confirmed - before.confirmed) as f64 / calls.elapsed.as_secs_f64();
    print!("  sagas confirmed/s   {during:>9.1}   during the phase");
    match drain {
        Some(drain) if !drain.is_zero() => println!(
            "; {:.1} over the {:.1} s it took the backlog of {} orders to drain",
            (after.confirmed - at_end.confirmed) as f64 / drain.as_secs_f64(),
            drain.as_secs_f64(),
            at_end.pending
        ),
        Some(_) => println!("; no backlog left at its end"),
        None => println!(
            "; {} orders still pending {} s after it",
            after.pending,
            drain_timeout.as_secs()
        ),
    }
    print_cancelled(after.cancelled);
    print_trends(&samples);
    print_cpu(cpu, &before, &after);
    Ok(Capacity { calls, ratio })
}

/// Prints closed-loop PlaceOrder calls' rate, failures and latency;
/// returns the rate.
fn print_calls(calls: &Calls) -> f64 {
    let placed = calls.per_second();
    let (p50, p99) = p50_p99(calls.latencies_ms.clone());
    println!(
        "  PlaceOrder/s        {placed:>9.1}   ({} placed, {} failed)",
        calls.latencies_ms.len(),
        calls.failures.total()
    );
    if calls.failures.total() > 0 {
        println!("  failures: {}", calls.failures);
    }
    println!("  PlaceOrder latency  p50 {p50:.1} ms, p99 {p99:.1} ms");
    placed
}

/// How long PlaceOrder runs with the relays paused, and the longest they
/// stay paused whatever happens: well under their lease timeout (10 s),
/// which a relay may have used a third of before it was paused, so that
/// they keep their sessions and partitions.
const ALONE_SECONDS: u64 = 4;
const PAUSE_LIMIT: Duration = Duration::from_secs(5);

/// PlaceOrder with nothing else running: the relays are paused, so no
/// event reaches a subscriber and the order service and PostgreSQL have the
/// machine to themselves, as the baseline's writers had. Set against the
/// capacity phase, it tells the API's own cost from the saga's. Returns
/// PlaceOrder/s; the orders it placed go through the saga before the
/// capacity phase starts.
async fn alone_phase(
    options: &Options,
    checkout: &Checkout,
    probe: &Arc<Probe>,
    catalog: &Arc<Catalog>,
    baseline: Throughput,
    drain_timeout: Duration,
) -> Result<f64> {
    let seconds = options.seconds.min(ALONE_SECONDS);
    println!();
    println!(
        "PlaceOrder alone: {} closed-loop callers, {seconds} s, the relays paused (no saga step runs)",
        options.callers
    );
    let paused = checkout.pause_relays(PAUSE_LIMIT)?;
    let cpu_before = CpuSnapshot::take(&checkout.pids());
    let calls = load::closed_loop(
        checkout.addr(Kind::Order),
        catalog.clone(),
        options.callers,
        Duration::from_secs(seconds),
    )
    .await;
    let cpu = cpu_use(cpu_before, &checkout.pids());
    drop(paused);
    let calls = calls?;
    let placed = print_calls(&calls);
    println!(
        "  ÷ baseline          {:>9.2}",
        placed / baseline.per_second()
    );
    match cpu {
        Some(cpu) => cpu.print(calls.latencies_ms.len() as i64, "PlaceOrder"),
        None => println!("  CPU: /proc could not be read on this machine"),
    }
    let drain = probe.wait_drained(drain_timeout).await?.with_context(|| {
        format!(
            "the orders placed with the relays paused were not all decided within {} s",
            drain_timeout.as_secs()
        )
    })?;
    println!(
        "  with the relays resumed, their sagas were all decided {:.1} s later",
        drain.as_secs_f64()
    );
    Ok(placed)
}

/// What the steady phase measured.
#[derive(Debug)]
struct Steady {
    rate: f64,
    placed_per_s: f64,
    confirmed_per_s: f64,
    pending: Trend,
    /// The work queue whose depth grew fastest, and its trend.
    steepest_queue: (String, Trend),
    window: f64,
    confirm_p99_ms: f64,
}

#[allow(clippy::too_many_arguments)]
async fn steady_phase(
    options: &Options,
    checkout: &Checkout,
    probe: &Arc<Probe>,
    confirmations: &Confirmations,
    catalog: &Arc<Catalog>,
    capacity: f64,
    drain_timeout: Duration,
) -> Result<Steady> {
    let rate = options
        .steady_rate
        .unwrap_or(capacity * options.steady_load);
    anyhow::ensure!(
        rate >= 1.0,
        "the measured capacity ({capacity:.1} orders/s) is too low for a steady phase"
    );
    let duration = Duration::from_secs(options.steady_seconds);
    println!();
    println!(
        "steady: {rate:.1} orders/s open-loop ({:.0} % of capacity), {} s",
        rate / capacity * 100.0,
        options.steady_seconds
    );
    println!(
        "  a fixed schedule: one PlaceOrder every {:.2} ms, each its own task, over {} connections",
        1e3 / rate,
        options.callers
    );
    let before = probe.counts().await?;
    let cpu_before = CpuSnapshot::take(&checkout.pids());
    let sampler = Sampler::start(probe.clone());
    let paced: Paced = load::open_loop(
        checkout.addr(Kind::Order),
        catalog.clone(),
        rate,
        duration,
        options.callers,
    )
    .await?;
    let at_end = probe.counts().await?;
    let samples = sampler.finish().await?;
    let drain = probe.wait_drained(drain_timeout).await?;
    let after = probe.counts().await?;
    let cpu = cpu_use(cpu_before, &checkout.pids());

    let window = paced.elapsed.as_secs_f64();
    let placed_per_s = paced.placed.len() as f64 / window;
    let confirmed_per_s = (at_end.confirmed - before.confirmed) as f64 / window;
    let (lag_p50, lag_p99) = p50_p99(paced.lag_ms.clone());
    let place_ms: Vec<f64> = paced
        .placed
        .iter()
        .map(|p| millis(p.answered - p.sent))
        .collect();
    let (place_p50, place_p99) = p50_p99(place_ms);
    println!(
        "  orders placed/s     {placed_per_s:>9.1}   ({} of {} scheduled placed, {} failed; sent late by p50 {lag_p50:.1} ms, p99 {lag_p99:.1} ms)",
        paced.placed.len(),
        paced.offered,
        paced.failures.total()
    );
    if paced.failures.total() > 0 {
        println!("  failures: {}", paced.failures);
    }
    println!("  PlaceOrder latency  p50 {place_p50:.1} ms, p99 {place_p99:.1} ms");
    println!("  sagas confirmed/s   {confirmed_per_s:>9.1}");
    let saga_ratio = confirmed_per_s / placed_per_s;
    println!(
        "  confirmed ÷ placed  {saga_ratio:>9.3}   (goal ≥ {GOAL_SAGA_RATIO:.2}, over the {window:.1} s from the first slot to the last answer)"
    );
    print_trends(&samples);

    // PlaceOrder→CONFIRMED, per order.
    let ids: Vec<Uuid> = paced.placed.iter().map(|p| p.id).collect();
    let confirmed: Vec<(Uuid, f64)> = sqlx::query_as(
        "SELECT id, extract(epoch FROM updated_at - placed_at)::float8 \
         FROM orders WHERE status = 'CONFIRMED' AND id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&checkout.order_db.pool)
    .await
    .context("failed to read the confirmed orders")?;
    let confirmed_ids: std::collections::HashSet<Uuid> =
        confirmed.iter().map(|(id, _)| *id).collect();
    let mut from_sent = Vec::with_capacity(confirmed.len());
    let mut from_answer = Vec::with_capacity(confirmed.len());
    for placed in paced
        .placed
        .iter()
        .filter(|p| confirmed_ids.contains(&p.id))
    {
        if let Some(at) = confirmations.get(&placed.id) {
            from_sent.push(millis(at.saturating_duration_since(placed.sent)));
            from_answer.push(millis(at.saturating_duration_since(placed.answered)));
        }
    }
    let unheard = confirmed.len() - from_sent.len();
    let (sent_p50, sent_p99) = p50_p99(from_sent);
    let (answer_p50, answer_p99) = p50_p99(from_answer);
    let (db_p50, db_p99) = p50_p99(confirmed.iter().map(|(_, s)| s * 1e3).collect());
    println!(
        "  PlaceOrder→CONFIRMED, {} of {} orders confirmed{}:",
        confirmed.len(),
        paced.placed.len(),
        if unheard > 0 || confirmations.errors() > 0 {
            format!(
                " ({unheard} without a notification; the listener lost its connection {} times)",
                confirmations.errors()
            )
        } else {
            String::new()
        }
    );
    println!(
        "    sent → committed      p50 {sent_p50:>7.1} ms, p99 {sent_p99:>7.1} ms   (goal p99 ≤ {GOAL_CONFIRM_P99_MS:.0} ms)"
    );
    println!("    answered → committed  p50 {answer_p50:>7.1} ms, p99 {answer_p99:>7.1} ms");
    println!("    database clock        p50 {db_p50:>7.1} ms, p99 {db_p99:>7.1} ms");
    println!(
        "    (\"committed\" is when this benchmark received the order's pg_notify('order_status'), which the"
    );
    println!(
        "    order service sends in the transaction that confirms the order, so PostgreSQL delivers it at"
    );
    println!(
        "    commit; \"database clock\" is updated_at − placed_at: the service's clock at PlaceOrder to the"
    );
    println!("    start of the confirming transaction)");
    match drain {
        Some(drain) => println!(
            "  drain               {:>9.2} s  for the {} orders pending when the last PlaceOrder answered",
            drain.as_secs_f64(),
            at_end.pending
        ),
        None => println!(
            "  drain               not done: {} orders still pending {} s after the phase",
            after.pending,
            drain_timeout.as_secs()
        ),
    }
    print_cancelled(after.cancelled);
    print_cpu(cpu, &before, &after);

    let pending = trend(&samples, |s| s.counts.pending as f64);
    let steepest_queue = WORK_QUEUES
        .iter()
        .enumerate()
        .map(|(i, queue)| {
            (
                (*queue).to_owned(),
                trend(&samples, |s| f64::from(s.depths[i])),
            )
        })
        .max_by(|a, b| a.1.slope.total_cmp(&b.1.slope))
        .expect("work queues");
    Ok(Steady {
        rate,
        placed_per_s,
        confirmed_per_s,
        pending,
        steepest_queue,
        window,
        confirm_p99_ms: sent_p99,
    })
}

fn print_cancelled(cancelled: i64) {
    if cancelled > 0 {
        println!(
            "  note: {cancelled} orders were CANCELLED; every order should be confirmed (see the services' logs)"
        );
    }
}

/// CPU used from `before` until now.
fn cpu_use(before: Option<CpuSnapshot>, pids: &[(String, u32)]) -> Option<CpuUse> {
    before?.until(&CpuSnapshot::take(pids)?)
}

/// CPU per saga decided (confirmed or cancelled) between two counts, over
/// the phase and its drain.
fn print_cpu(cpu: Option<CpuUse>, before: &Counts, after: &Counts) {
    match cpu {
        Some(cpu) => cpu.print(
            (after.confirmed + after.cancelled) - (before.confirmed + before.cancelled),
            "saga",
        ),
        None => println!("  CPU: /proc could not be read on this machine"),
    }
}

fn print_trends(samples: &[Sample]) {
    println!(
        "  backlog, sampled once a second ({} samples): first → last, fitted slope",
        samples.len()
    );
    let line = |label: &str, trend: Trend| {
        println!(
            "    {label:<26} {:>7.0} → {:>7.0}   {:>+8.1}/s",
            trend.first, trend.last, trend.slope
        );
    };
    line(
        "pending orders",
        trend(samples, |s| s.counts.pending as f64),
    );
    for (i, queue) in WORK_QUEUES.iter().enumerate() {
        line(
            &format!("{queue} ready"),
            trend(samples, |s| f64::from(s.depths[i])),
        );
    }
}

/// The largest peak RSS of a service and of a relay, in MiB, with the
/// process names.
#[derive(Debug, Default)]
struct Largest {
    service: Option<(String, f64)>,
    relay: Option<(String, f64)>,
}

fn memory_table(memory: &[(String, Option<u64>)]) -> Largest {
    println!();
    println!(
        "peak resident memory (VmHWM from /proc/<pid>/status), goal ≤ {GOAL_RSS_MIB:.0} MiB per process"
    );
    println!("  {:<14} {:>12} {:>12}", "", "service", "relay");
    let mib = |name: &str| {
        memory
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, kib)| *kib)
            .map(|kib| kib as f64 / 1024.0)
    };
    let show =
        |value: Option<f64>| value.map_or_else(|| "unknown".to_owned(), |v| format!("{v:.1} MiB"));
    let mut largest = Largest::default();
    for kind in SERVICES {
        let service = mib(&format!("{}-service", kind.name()));
        let relay = mib(&format!("{}-relay", kind.name()));
        println!(
            "  {:<14} {:>12} {:>12}",
            kind.name(),
            show(service),
            show(relay)
        );
        for (value, slot) in [(service, &mut largest.service), (relay, &mut largest.relay)] {
            if let Some(value) = value
                && slot.as_ref().is_none_or(|(_, v)| value > *v)
            {
                *slot = Some((kind.name().to_owned(), value));
            }
        }
    }
    largest
}

fn summary(
    baseline: Throughput,
    alone: f64,
    capacity: &Capacity,
    steady: &Steady,
    largest: &Largest,
) {
    println!();
    println!("summary");
    if cfg!(debug_assertions) {
        println!("  (a debug build: these figures say nothing about the product)");
    }
    let mut rows: Vec<[String; 4]> = Vec::new();
    let verdict = |met: bool| if met { "met" } else { "missed" }.to_owned();
    rows.push([
        "PlaceOrder/s ÷ baseline transactions/s".into(),
        format!(
            "{:.2} ({:.1} / {:.1})",
            capacity.ratio,
            capacity.calls.per_second(),
            baseline.per_second()
        ),
        format!("≥ {GOAL_CAPACITY_RATIO:.2}"),
        verdict(capacity.ratio >= GOAL_CAPACITY_RATIO),
    ]);
    rows.push([
        "  the same with the relays paused".into(),
        format!(
            "{:.2} ({:.1} / {:.1})",
            alone / baseline.per_second(),
            alone,
            baseline.per_second()
        ),
        "(for reference)".into(),
        String::new(),
    ]);
    let saga_ratio = steady.confirmed_per_s / steady.placed_per_s;
    rows.push([
        format!("sagas confirmed/s ÷ placed/s at {:.1}/s", steady.rate),
        format!(
            "{saga_ratio:.3} ({:.1} / {:.1})",
            steady.confirmed_per_s, steady.placed_per_s
        ),
        format!("≥ {GOAL_SAGA_RATIO:.2}"),
        verdict(saga_ratio >= GOAL_SAGA_RATIO),
    ]);
    // "No growth": over the whole phase the fitted backlog grew by less
    // than one second's worth of orders.
    let grows = |trend: &Trend| trend.slope * steady.window > steady.rate;
    rows.push([
        "pending orders at steady load".into(),
        format!("{:+.1}/s", steady.pending.slope),
        "no growth".into(),
        verdict(!grows(&steady.pending)),
    ]);
    rows.push([
        "work queue depth at steady load".into(),
        format!(
            "{:+.1}/s (steepest, {})",
            steady.steepest_queue.1.slope, steady.steepest_queue.0
        ),
        "no growth".into(),
        verdict(!grows(&steady.steepest_queue.1)),
    ]);
    rows.push([
        "PlaceOrder→CONFIRMED p99 at steady load".into(),
        format!("{:.1} ms", steady.confirm_p99_ms),
        format!("≤ {GOAL_CONFIRM_P99_MS:.0} ms"),
        verdict(steady.confirm_p99_ms <= GOAL_CONFIRM_P99_MS),
    ]);
    for (what, largest) in [("service", &largest.service), ("relay", &largest.relay)] {
        rows.push(match largest {
            Some((name, mib)) => [
                format!("peak RSS, largest {what}"),
                format!("{mib:.1} MiB ({name})"),
                format!("≤ {GOAL_RSS_MIB:.0} MiB"),
                verdict(*mib <= GOAL_RSS_MIB),
            ],
            None => [
                format!("peak RSS, largest {what}"),
                "unknown".into(),
                format!("≤ {GOAL_RSS_MIB:.0} MiB"),
                "—".into(),
            ],
        });
    }
    println!("  {:<42} {:<34} {:<10} ", "figure", "value", "goal");
    for [figure, value, goal, verdict] in rows {
        println!("  {figure:<42} {value:<34} {goal:<10} {verdict}");
    }
    println!(
        "  (\"no growth\": the backlog's fitted slope over the {:.0} s phase adds up to less than one second of orders)",
        steady.window
    );
}
