//! Bounds on Helm operations: how many `helm` processes live at once, and how many are in
//! their busy start.

use std::{sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// The right to run one Helm operation. Two bounds apply: Helm processes alive at once
/// ([`HelmLimits::processes`]: their memory), and operations in their busy
/// start (chart download, rendering, applying: CPU, memory, API load). After
/// [`ACTIVE_PHASE`] an operation is almost always waiting for resources (`--wait`), and its
/// active slot passes on: four releases in a long wait no longer hold back every install,
/// upgrade and uninstall of the others.
pub struct HelmSlot {
    _process: OwnedSemaphorePermit,
    active: Option<OwnedSemaphorePermit>,
    active_phase: Duration,
}

impl HelmSlot {
    /// Runs a Helm operation within this slot.
    pub async fn run<F: std::future::Future>(&mut self, operation: F) -> F::Output {
        tokio::pin!(operation);
        tokio::select! {
            output = &mut operation => return output,
            () = tokio::time::sleep(self.active_phase) => {}
        }
        if self.active.take().is_some() {
            tracing::debug!("helm operation still running; its active slot passes on");
        }
        operation.await
    }
}

/// How long a Helm operation holds an active slot at most by default (see [`HelmSlot`]).
pub const ACTIVE_PHASE: Duration = Duration::from_secs(45);

/// Bounds on Helm operations (see [`HelmSlot`]).
#[derive(Clone, Copy, Debug)]
pub struct HelmLimits {
    /// Operations in their busy start at once.
    pub concurrent: usize,
    /// How long an operation counts as busy at most.
    pub active_phase: Duration,
    /// Helm processes alive at once, waiting ones included.
    pub processes: usize,
}
/// Helm processes alive at once by default: a `helm` v4 process holds 60 to 70 MiB while it
/// installs or upgrades, so 6 of them (about 420 MiB) and the executor (under 64 MiB with 500
/// releases) stay inside the executor's 512 MiB memory limit in `deploy/`.
pub const MAX_HELM_PROCESSES: usize = 6;

/// The slots of one executor. Cheap to clone.
#[derive(Clone)]
pub struct HelmSlots {
    active: Arc<Semaphore>,
    processes: Arc<Semaphore>,
    active_phase: Duration,
}

impl HelmSlots {
    pub fn new(limits: HelmLimits) -> Self {
        let slots = limits.concurrent.max(1);
        Self {
            active: Arc::new(Semaphore::new(slots)),
            processes: Arc::new(Semaphore::new(limits.processes.max(1))),
            active_phase: limits.active_phase,
        }
    }

    /// A slot for one Helm operation, or `None` once `shutdown` began.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> Option<HelmSlot> {
        let acquire = async {
            let process = self.processes.clone().acquire_owned().await.ok()?;
            let active = self.active.clone().acquire_owned().await.ok()?;
            Some(HelmSlot {
                _process: process,
                active: Some(active),
                active_phase: self.active_phase,
            })
        };
        // Shutdown first: once it began, no operation starts, free slots or not.
        tokio::select! {
            biased;
            () = shutdown.cancelled() => None,
            slot = acquire => slot,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_release_waiting_in_helm_does_not_hold_back_the_others() {
        let shutdown = CancellationToken::new();
        let slots = HelmSlots::new(HelmLimits {
            concurrent: 1,
            active_phase: Duration::from_millis(150),
            processes: 4,
        });
        // One slot, taken by an operation in a one-hour wait.
        let mut slow = slots.acquire(&shutdown).await.unwrap();
        let waiting = tokio::spawn(async move { slow.run(tokio::time::sleep(Duration::from_secs(3600))).await });
        // Another release's operation gets a slot once the first is past its start.
        let started = std::time::Instant::now();
        let mut next = tokio::time::timeout(Duration::from_secs(10), slots.acquire(&shutdown))
            .await
            .expect("a slot within seconds, not after the other's wait")
            .unwrap();
        next.run(async {}).await;
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );
        drop(next);
        // The number of Helm processes stays bounded (4 here), the waiting one included.
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut slot = tokio::time::timeout(Duration::from_secs(10), slots.acquire(&shutdown))
                .await
                .expect("a slot")
                .unwrap();
            slot.active = None;
            held.push(slot);
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), slots.acquire(&shutdown))
                .await
                .is_err(),
            "no fifth helm process"
        );
        // Once shutdown began, no slot is handed out.
        shutdown.cancel();
        drop(held);
        assert!(slots.acquire(&shutdown).await.is_none());
        waiting.abort();
    }
}
