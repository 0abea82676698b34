//! Readiness gates: the process is ready once every gate opened and until shutdown begins.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use tokio_util::sync::CancellationToken;

/// Named gates, each open or not.
type Gates = Arc<Mutex<Vec<(&'static str, Arc<AtomicBool>)>>>;

#[derive(Clone)]
pub struct Readiness {
    gates: Gates,
    shutdown: CancellationToken,
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
            shutdown,
        }
    }

    /// Adds a closed gate; readiness waits for it to open.
    pub fn gate(&self, name: &'static str) -> ReadyGate {
        let flag = Arc::new(AtomicBool::new(false));
        self.gates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, flag.clone()));
        ReadyGate(flag)
    }

    /// `Ok(())` when ready, otherwise the names of the gates still closed.
    pub fn check(&self) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("shutting down".to_owned());
        }
        let gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
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
}
