//! Where the machine's CPU time went during a phase, read from `/proc`:
//! each process of the checkout, this benchmark (the load generator),
//! PostgreSQL's and RabbitMQ's processes when they run on this machine,
//! and the rest. Saying "the saga is slow" is not enough to make it
//! faster; CPU milliseconds per saga, by process, say where to look.
//!
//! Only processes alive at both ends of a window are counted exactly: a
//! PostgreSQL backend that disconnects inside the window takes its time
//! with it (it then shows as part of "everything else" only if the
//! machine-wide total saw it, which it does). The connection pools keep
//! their backends for the whole run, so this is small.

use std::collections::HashMap;
use std::time::Instant;

/// CPU ticks used so far, by process and machine-wide.
#[derive(Debug, Clone)]
pub(crate) struct CpuSnapshot {
    at: Instant,
    /// user + system ticks of every process, by pid, with its group.
    processes: HashMap<u32, (String, u64)>,
    /// Machine-wide busy and total ticks (all cores).
    busy: u64,
    total: u64,
    /// Cores the machine-wide figures add up.
    cores: usize,
}

/// CPU used between two snapshots, by group.
#[derive(Debug, Clone)]
pub(crate) struct CpuUse {
    /// Wall-clock seconds of the window.
    pub(crate) seconds: f64,
    /// Cores of the machine.
    pub(crate) cores: usize,
    /// Share of all cores' time that was busy (0..=1).
    pub(crate) busy_share: f64,
    /// CPU seconds by group, largest first; the last entry is everything
    /// busy that no group accounts for.
    pub(crate) groups: Vec<(String, f64)>,
}

impl CpuSnapshot {
    /// Reads `/proc` now. `children` names the checkout's processes by
    /// pid; PostgreSQL and RabbitMQ are recognised by their command names.
    pub(crate) fn take(children: &[(String, u32)]) -> Option<Self> {
        let (busy, total, cores) = machine_ticks()?;
        let own = std::process::id();
        let mut processes = HashMap::new();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Some((command, ticks)) = process_ticks(pid) else {
                continue;
            };
            let group = if pid == own {
                Some("shop-bench (load, probes)".to_owned())
            } else if let Some((name, _)) = children.iter().find(|(_, p)| *p == pid) {
                Some(name.clone())
            } else {
                server_group(&command).map(str::to_owned)
            };
            if let Some(group) = group {
                processes.insert(pid, (group, ticks));
            }
        }
        Some(Self {
            at: Instant::now(),
            processes,
            busy,
            total,
            cores,
        })
    }

    /// What was used from `self` to `later`.
    pub(crate) fn until(&self, later: &CpuSnapshot) -> Option<CpuUse> {
        let total = later.total.checked_sub(self.total)?;
        if total == 0 {
            return None;
        }
        let seconds = later.at.duration_since(self.at).as_secs_f64();
        // The cores `/proc/stat` adds up: every online core of the host,
        // which under a CPU quota or affinity mask can be more than this
        // process may use.
        let cores = later.cores;
        // Ticks to CPU seconds: the machine-wide total is every core's
        // time over the window.
        let per_tick = seconds * cores as f64 / total as f64;
        let mut by_group: HashMap<String, u64> = HashMap::new();
        for (pid, (group, ticks)) in &later.processes {
            let before = match self.processes.get(pid) {
                Some((_, before)) => *before,
                // Started inside the window: all of its time is in it.
                None => 0,
            };
            *by_group.entry(group.clone()).or_default() += ticks.saturating_sub(before);
        }
        let busy = later.busy.saturating_sub(self.busy);
        let accounted: u64 = by_group.values().sum();
        let mut groups: Vec<(String, f64)> = by_group
            .into_iter()
            .map(|(group, ticks)| (group, ticks as f64 * per_tick))
            .collect();
        groups.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        groups.push((
            "everything else".to_owned(),
            busy.saturating_sub(accounted) as f64 * per_tick,
        ));
        Some(CpuUse {
            seconds,
            cores,
            busy_share: busy as f64 / total as f64,
            groups,
        })
    }
}

impl CpuUse {
    /// Prints the use by group, as CPU milliseconds per `unit` of work
    /// (`count` of them were done in the window).
    pub(crate) fn print(&self, count: i64, unit: &str) {
        println!(
            "  CPU over the {:.1} s: {:.0} % of {} cores busy; CPU ms per {unit} ({count} {unit}s), by process:",
            self.seconds,
            self.busy_share * 100.0,
            self.cores
        );
        let per = |seconds: f64| {
            if count > 0 {
                seconds * 1e3 / count as f64
            } else {
                f64::NAN
            }
        };
        let total: f64 = self.groups.iter().map(|(_, s)| s).sum();
        for (group, seconds) in &self.groups {
            println!(
                "    {group:<28} {:>7.2} ms   ({seconds:.1} s)",
                per(*seconds)
            );
        }
        println!("    {:<28} {:>7.2} ms   ({total:.1} s)", "all", per(total));
    }
}

/// The group of a server process on this machine, by its command name.
fn server_group(command: &str) -> Option<&'static str> {
    match command {
        "postgres" | "postmaster" => Some("PostgreSQL"),
        "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => Some("RabbitMQ (Erlang VM)"),
        _ => None,
    }
}

/// A process's command name and user + system ticks, from
/// `/proc/<pid>/stat`.
fn process_ticks(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> Option<(String, u64)> {
    // "pid (command) state ppid … utime stime …": the command may hold
    // spaces and parentheses, so split at the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let command = stat.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // Fields 14 and 15 of the line; the first after ')' is field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((command, utime + stime))
}

/// Machine-wide busy and total ticks, from the `cpu` line of `/proc/stat`,
/// and the number of cores they add up (its `cpuN` lines).
fn machine_ticks() -> Option<(u64, u64, usize)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let (busy, total) = parse_machine(stat.lines().next()?)?;
    let cores = stat
        .lines()
        .filter(|line| {
            line.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    Some((busy, total, cores.max(1)))
}

fn parse_machine(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is
    // already inside user and nice).
    let values: Vec<u64> = fields
        .take(8)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = values.iter().sum();
    // Idle, waiting for I/O, or stolen by the hypervisor: not busy here.
    let idle = values.get(3)? + values.get(4)? + values.get(7)?;
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_line_gives_its_command_and_cpu_ticks() {
        let line = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 150 25 0 0 20 0 9 0 100 1000 200 18446744073709551615";
        assert_eq!(parse_stat(line), Some(("tokio (rt) x".to_owned(), 175)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn the_machine_line_gives_busy_and_total_ticks() {
        let line = "cpu  100 5 50 800 40 3 2 0 0 0";
        assert_eq!(parse_machine(line), Some((160, 1000)));
        let stolen = "cpu  100 5 50 800 40 3 2 30 0 0";
        assert_eq!(parse_machine(stolen), Some((160, 1030)));
        assert_eq!(parse_machine("cpu0 1 2 3 4 5 6 7 8"), None);
    }
}
