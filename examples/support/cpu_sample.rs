//! Where a benchmark's CPU went: ticks of the broker, of PostgreSQL, of given processes and of
//! the whole machine, read from `/proc` at the start and the end of a drain (shared by the AMQP
//! benchmarks through `#[path]`).

/// One reading of those ticks.
#[derive(Clone, Copy, Default)]
pub struct CpuSample {
    broker: u64,
    postgres: u64,
    consumers: u64,
    machine_busy: u64,
    machine_total: u64,
}

fn process_ticks(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the `(comm)`: state is field 3, utime 14 and stime 15.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Ticks of the RabbitMQ node (its Erlang VM, `beam.smp`) and of PostgreSQL's server processes
/// (`postgres`), in one pass over `/proc`.
fn server_ticks() -> (u64, u64) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    let (mut broker, mut postgres) = (0, 0);
    for entry in dir.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        match std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .as_deref()
            .map(str::trim)
        {
            Ok("beam.smp") => broker += process_ticks(&pid),
            Ok("postgres") => postgres += process_ticks(&pid),
            _ => {}
        }
    }
    (broker, postgres)
}

impl CpuSample {
    pub fn now(consumers: &[String]) -> Self {
        let (machine_busy, machine_total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let v: Vec<u64> = s
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let total: u64 = v.iter().take(8).sum();
                // idle and iowait are not busy.
                Some((total - v.get(3)? - v.get(4)?, total))
            })
            .unwrap_or((0, 0));
        let (broker, postgres) = server_ticks();
        Self {
            broker,
            postgres,
            consumers: consumers.iter().map(|p| process_ticks(p)).sum(),
            machine_busy,
            machine_total,
        }
    }

    /// "broker X µs/msg, [postgres P µs/msg,] consumer Y µs/msg, machine Z % busy" between
    /// `self` and `end`.
    pub fn describe(&self, end: &Self, messages: usize) -> String {
        let tick_us = 1e6 / 100.0; // USER_HZ
        let per_msg = |a: u64, b: u64| (b.saturating_sub(a)) as f64 * tick_us / messages as f64;
        let total = end.machine_total.saturating_sub(self.machine_total).max(1) as f64;
        let postgres = per_msg(self.postgres, end.postgres);
        format!(
            "broker {:.1} µs/msg, {}consumer {:.1} µs/msg, machine {:.0} % busy",
            per_msg(self.broker, end.broker),
            if postgres >= 0.5 {
                format!("postgres {postgres:.1} µs/msg, ")
            } else {
                String::new()
            },
            per_msg(self.consumers, end.consumers),
            100.0 * end.machine_busy.saturating_sub(self.machine_busy) as f64 / total
        )
    }
}
