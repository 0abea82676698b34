//! Readiness gates: the process is ready once every gate opened and until shutdown begins.

use crate::sync::MutexExt as _;
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

/// Named gates, each open or not.
type Gates = Arc<Mutex<Vec<(&'static str, Arc<AtomicBool>)>>>;

/// Named heartbeats, each with the instant by which the next beat is due.
type Heartbeats = Arc<Mutex<Vec<(&'static str, Arc<Mutex<Instant>>)>>>;

#[derive(Clone)]
pub struct Readiness {
    gates: Gates,
    heartbeats: Heartbeats,
    shutdown: CancellationToken,
}

/// The heartbeat of a loop that must keep running (liveness): a loop that misses its beat
/// is wedged, and `/livez` says so, so that the kubelet restarts the container.
#[derive(Clone)]
pub struct Heartbeat(Arc<Mutex<Instant>>);

impl Heartbeat {
    /// The loop is alive; its next beat is due within `next_within`.
    pub fn beat(&self, next_within: Duration) {
        *self.0.locked() = Instant::now() + next_within;
    }
}

/// One condition of readiness, such as "gRPC listener bound" or "watches synced".
#[derive(Clone)]
pub struct ReadyGate(Arc<AtomicBool>);

impl ReadyGate {
    pub fn open(&self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Readiness {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            gates: Arc::default(),
            heartbeats: Arc::default(),
            shutdown,
        }
    }

    /// Adds a heartbeat whose first beat is due within `first_within`; liveness fails once a
    /// beat is overdue.
    pub fn heartbeat(&self, name: &'static str, first_within: Duration) -> Heartbeat {
        let due = Arc::new(Mutex::new(Instant::now() + first_within));
        self.heartbeats.locked().push((name, due.clone()));
        Heartbeat(due)
    }

    /// `Ok(())` while every heartbeat is on time, otherwise which are overdue and by how much.
    pub fn check_live(&self) -> Result<(), String> {
        let now = Instant::now();
        let heartbeats = self.heartbeats.locked();
        let overdue: Vec<String> = heartbeats
            .iter()
            .filter_map(|(name, due)| {
                let due = *due.locked();
                (now > due).then(|| format!("{name} ({}s overdue)", (now - due).as_secs()))
            })
            .collect();
        if overdue.is_empty() {
            Ok(())
        } else {
            Err(format!("heartbeat missed: {}", overdue.join(", ")))
        }
    }

    /// Adds a closed gate; readiness waits for it to open.
    pub fn gate(&self, name: &'static str) -> ReadyGate {
        let flag = Arc::new(AtomicBool::new(false));
        self.gates.locked().push((name, flag.clone()));
        ReadyGate(flag)
    }

    /// `Ok(())` when ready, otherwise the names of the gates still closed.
    pub fn check(&self) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("shutting down".to_owned());
        }
        let gates = self.gates.locked();
        let closed: Vec<_> = gates
            .iter()
            .filter(|(_, open)| !open.load(Ordering::Acquire))
            .map(|(name, _)| *name)
            .collect();
        if gates.is_empty() {
            Err("starting".to_owned())
        } else if closed.is_empty() {
            Ok(())
        } else {
            Err(format!("waiting for: {}", closed.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_gates_open_and_not_after_shutdown() {
        let shutdown = CancellationToken::new();
        let readiness = Readiness::new(shutdown.clone());
        assert!(readiness.check().is_err(), "no gate yet means still starting");
        let a = readiness.gate("a");
        let b = readiness.gate("b");
        a.open();
        assert_eq!(readiness.check(), Err("waiting for: b".to_owned()));
        b.open();
        assert_eq!(readiness.check(), Ok(()));
        shutdown.cancel();
        assert_eq!(readiness.check(), Err("shutting down".to_owned()));
    }

    #[test]
    fn liveness_follows_the_heartbeats() {
        let readiness = Readiness::new(CancellationToken::new());
        assert_eq!(readiness.check_live(), Ok(()), "no heartbeat: alive");
        let poll = readiness.heartbeat("poll loop", Duration::from_secs(60));
        assert_eq!(readiness.check_live(), Ok(()));
        poll.beat(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        let error = readiness.check_live().expect_err("overdue");
        assert!(error.starts_with("heartbeat missed: poll loop ("), "{error}");
        poll.beat(Duration::from_secs(60));
        assert_eq!(readiness.check_live(), Ok(()));
    }
}
