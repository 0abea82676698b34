//! What the benchmark reads of the agent's processes in `/proc`: resident memory (`VmRSS`) and
//! CPU time (`utime` + `stime`), for one process or a whole process group (the executor and the
//! `helm` processes it starts share its group; see [`crate::AgentProcess::start`]).

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

/// The figures of `/proc/<pid>/stat` the benchmark uses, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    pgrp: u32,
    /// `utime + stime`: the process's own CPU time.
    own: u64,
    /// `cutime + cstime`: CPU time of its children that exited and were waited for.
    reaped_children: u64,
}

/// Parses `/proc/<pid>/stat` (the command name, in parentheses, may hold spaces).
fn parse_stat(text: &str) -> Option<Stat> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `fields[0]` is field 3 of proc(5), `state`.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        pgrp: u32::try_from(field(5)?).ok()?,
        own: field(14)? + field(15)?,
        reaped_children: field(16)? + field(17)?,
    })
}

fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `VmRSS` of `/proc/<pid>/status`, in KiB (`None` for a zombie or a process gone).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The processes of process group `pgid` (its leader included).
fn group(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| stat(*pid).is_some_and(|s| s.pgrp == pgid))
        .collect()
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux almost everywhere).
fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds used so far by `pid`; with `group`, also by its children: those it reaped and
/// those of its process group still running. The difference of two readings is the CPU time
/// of the interval, helm processes that started and ended in it included.
pub fn cpu_seconds(pid: u32, group_too: bool) -> Option<f64> {
    let leader = stat(pid)?;
    let mut ticks = leader.own;
    if group_too {
        ticks += leader.reaped_children;
        ticks += group(pid)
            .into_iter()
            .filter(|member| *member != pid)
            .filter_map(stat)
            .map(|s| s.own)
            .sum::<u64>();
    }
    Some(ticks as f64 / ticks_per_second())
}

/// One reading of the resident memory of the watched processes, in KiB.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    /// One per watched process, in the order given to [`Sampler::start`].
    pub rss: Vec<u64>,
    /// The whole process group of the first watched process (the executor and its helm
    /// children).
    pub group_rss: u64,
}

/// Samples the resident memory of processes in the background until dropped.
pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sampler {
    /// Reads `VmRSS` of each of `pids` every `every`; the first is also read as a group.
    pub fn start(pids: Vec<u32>, every: Duration) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = samples.clone();
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                ticker.tick().await;
                let sample = Sample {
                    at: Instant::now(),
                    rss: pids.iter().map(|pid| rss_kib(*pid).unwrap_or(0)).collect(),
                    group_rss: pids
                        .first()
                        .map(|leader| group(*leader).into_iter().filter_map(rss_kib).sum())
                        .unwrap_or(0),
                };
                sink.lock().unwrap_or_else(PoisonError::into_inner).push(sample);
            }
        });
        Self { samples, task }
    }

    /// The samples taken from `from` to `to`.
    pub fn between(&self, from: Instant, to: Instant) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|s| s.at >= from && s.at <= to)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let line = "4242 (agent (exec) x) S 1 4242 4242 0 -1 4194560 500 0 0 0 120 30 7 3 20 0 9 0 100 \
                    1000 50 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                pgrp: 4242,
                own: 150,
                reaped_children: 10
            })
        );
    }

    #[test]
    fn this_process_is_readable() {
        let me = std::process::id();
        assert!(rss_kib(me).is_some_and(|kib| kib > 0));
        assert!(cpu_seconds(me, true).is_some());
    }
}
