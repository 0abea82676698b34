//! Self-update, the poller's part: when the Hub names an agent version other than the one
//! this agent runs (`DISTR_AGENT_VERSION_ID`; empty disables self-update), fetch that
//! version's manifest and hand it to the updater, then follow the updater's progress. A
//! version the updater refused or rolled back is not handed over again until the Hub names
//! another one. Releases are served meanwhile: the poller never waits for a rollout.

use distr_agent_proto::v1::{self as pb, updater_client::UpdaterClient};
use uuid::Uuid;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use agent_runtime::tls::client::ReloadingChannel;

use crate::hub::{AgentVersion, HubClient};

pub struct SelfUpdate {
    updater: UpdaterClient<ReloadingChannel>,
    /// Set while an update this poller handed over is under way.
    under_way: Arc<AtomicBool>,
    /// The updater's last reported phase and message, to log changes once.
    reported: Option<(i32, String)>,
    /// Pauses after a hand-over that did not go through.
    hand_overs: HandOvers,
}

/// First pause after a hand-over that did not go through (the manifest could not be fetched,
/// or the updater did not take it); it doubles with each further one up to
/// [`HAND_OVER_PAUSE_MAX`]. The manifest is not fetched again meanwhile.
pub const HAND_OVER_PAUSE: Duration = Duration::from_secs(30);
pub const HAND_OVER_PAUSE_MAX: Duration = Duration::from_secs(600);

/// When a version may be handed over again after a hand-over that did not go through.
#[derive(Debug, Default)]
pub struct HandOvers {
    /// The version, when it may be tried again, and the pause that led there.
    paused: Option<(Uuid, Instant, Duration)>,
}

impl HandOvers {
    /// Whether `version` may be handed over at `now`.
    pub fn may_try(&self, version: Uuid, now: Instant) -> bool {
        match self.paused {
            Some((paused, until, _)) if paused == version => now >= until,
            _ => true,
        }
    }

    /// A hand-over of `version` did not go through at `now`: the pause until the next try.
    pub fn failed(&mut self, version: Uuid, now: Instant) -> Duration {
        let pause = match self.paused {
            Some((paused, _, last)) if paused == version => (last * 2).min(HAND_OVER_PAUSE_MAX),
            _ => HAND_OVER_PAUSE,
        };
        self.paused = Some((version, now + pause, pause));
        pause
    }

    /// A hand-over went through.
    pub fn succeeded(&mut self) {
        self.paused = None;
    }
}

/// What to do about the version the Hub wants.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: self-update is off, the versions match, or this version is under way.
    Nothing,
    /// The version failed before: wait for the Hub to name another.
    Failed,
    /// Fetch the manifest and hand it over.
    HandOver,
}

/// Decides from the wanted version, the running one, and the updater's state.
pub fn decide(wanted: Option<&AgentVersion>, running: Option<Uuid>, updater: &pb::UpdateStatusResponse) -> Decision {
    let (Some(wanted), Some(running)) = (wanted, running) else {
        return Decision::Nothing;
    };
    if wanted.id == running {
        return Decision::Nothing;
    }
    let id = wanted.id.to_string();
    if updater.failed_version_ids.contains(&id) {
        return Decision::Failed;
    }
    let under_way = matches!(
        pb::UpdatePhase::try_from(updater.phase),
        Ok(pb::UpdatePhase::Validating
            | pb::UpdatePhase::Applying
            | pb::UpdatePhase::Waiting
            | pb::UpdatePhase::RollingBack
            | pb::UpdatePhase::Done)
    );
    if updater.target_version_id == id && under_way {
        return Decision::Nothing;
    }
    Decision::HandOver
}

impl SelfUpdate {
    pub fn new(updater: UpdaterClient<ReloadingChannel>) -> Self {
        Self {
            updater,
            under_way: Arc::default(),
            reported: None,
            hand_overs: HandOvers::default(),
        }
    }

    /// Sets `flag` while an update this poller handed over is under way.
    pub fn tracking(mut self, flag: Arc<AtomicBool>) -> Self {
        self.under_way = flag;
        self
    }

    /// One step, after the cycle's statuses are posted.
    pub async fn step(&mut self, hub: &HubClient, wanted: Option<&AgentVersion>, running: Option<Uuid>) {
        if wanted.is_none() || running.is_none() || wanted.map(|w| w.id) == running {
            self.under_way.store(false, Ordering::Release);
            return;
        }
        let status = match self.updater.update_status(pb::UpdateStatusRequest {}).await {
            Ok(status) => {
                let status = status.into_inner();
                let under_way = wanted.is_some_and(|w| status.target_version_id == w.id.to_string())
                    && matches!(
                        pb::UpdatePhase::try_from(status.phase),
                        Ok(pb::UpdatePhase::Validating
                            | pb::UpdatePhase::Applying
                            | pb::UpdatePhase::Waiting
                            | pb::UpdatePhase::RollingBack)
                    );
                self.under_way.store(under_way, Ordering::Release);
                status
            }
            Err(error) => {
                tracing::warn!(code = ?error.code(), message = error.message(), "cannot reach the agent updater; self-update waits");
                return;
            }
        };
        self.report(&status);
        let Some(wanted) = wanted else { return };
        match decide(Some(wanted), running, &status) {
            Decision::Nothing => {}
            Decision::Failed => {}
            Decision::HandOver => {
                if !self.hand_overs.may_try(wanted.id, Instant::now()) {
                    return;
                }
                let manifest = match hub.manifest().await {
                    Ok(manifest) => manifest,
                    Err(error) => {
                        let pause = self.hand_overs.failed(wanted.id, Instant::now());
                        tracing::warn!(%error, version = %wanted.name, retry_in_seconds = pause.as_secs(), "cannot fetch the agent manifest from the Hub");
                        return;
                    }
                };
                tracing::info!(version = %wanted.name, id = %wanted.id, "handing the new agent version to the updater");
                let request = pb::ApplyAgentManifestRequest {
                    manifest,
                    target_version_id: wanted.id.to_string(),
                };
                match self.updater.apply_agent_manifest(request).await {
                    Ok(report) => {
                        self.hand_overs.succeeded();
                        self.under_way.store(true, Ordering::Release);
                        tracing::info!(
                        version = %wanted.name,
                        objects = report.into_inner().applied.len(),
                        "the updater applied the new agent version; waiting for it to roll out"
                        );
                    }
                    Err(error) => {
                        let pause = self.hand_overs.failed(wanted.id, Instant::now());
                        tracing::warn!(
                            version = %wanted.name,
                            code = ?error.code(),
                            detail = error.message(),
                            retry_in_seconds = pause.as_secs(),
                            "the updater did not apply the new agent version"
                        );
                    }
                }
            }
        }
    }

    fn report(&mut self, status: &pb::UpdateStatusResponse) {
        let now = (status.phase, status.message.clone());
        if self.reported.as_ref() == Some(&now) {
            return;
        }
        self.reported = Some(now);
        if !worth_reporting(status) {
            return;
        }
        let phase = pb::UpdatePhase::try_from(status.phase).unwrap_or(pb::UpdatePhase::Unspecified);
        match phase {
            pb::UpdatePhase::Failed => {
                tracing::warn!(version = %status.target_version_id, detail = %status.message, "self-update failed")
            }
            _ => tracing::info!(version = %status.target_version_id, ?phase, detail = %status.message, "self-update"),
        }
    }
}

/// Whether the updater's status says anything: not before its first update (no version, idle).
fn worth_reporting(status: &pb::UpdateStatusResponse) -> bool {
    let idle = matches!(
        pb::UpdatePhase::try_from(status.phase),
        Ok(pb::UpdatePhase::Idle | pb::UpdatePhase::Unspecified) | Err(_)
    );
    !(idle && status.target_version_id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_updater_that_never_updated_has_nothing_to_report() {
        assert!(!worth_reporting(&pb::UpdateStatusResponse::default()));
        assert!(worth_reporting(&pb::UpdateStatusResponse {
            target_version_id: Uuid::new_v4().to_string(),
            phase: pb::UpdatePhase::Waiting.into(),
            ..Default::default()
        }));
    }

    #[test]
    fn a_hand_over_that_did_not_go_through_waits_longer_each_time() {
        let (version, other) = (Uuid::new_v4(), Uuid::new_v4());
        let start = Instant::now();
        let mut hand_overs = HandOvers::default();
        assert!(hand_overs.may_try(version, start));
        assert_eq!(hand_overs.failed(version, start), HAND_OVER_PAUSE);
        // The next poller cycles (every 5 s by default) fetch nothing.
        for cycle in 1..6 {
            assert!(!hand_overs.may_try(version, start + Duration::from_secs(5 * cycle)));
        }
        assert!(hand_overs.may_try(other, start), "another version is not held back");
        let later = start + HAND_OVER_PAUSE;
        assert!(hand_overs.may_try(version, later));
        assert_eq!(hand_overs.failed(version, later), 2 * HAND_OVER_PAUSE);
        let mut pause = Duration::ZERO;
        for _ in 0..10 {
            pause = hand_overs.failed(version, later);
        }
        assert_eq!(pause, HAND_OVER_PAUSE_MAX);
        hand_overs.succeeded();
        assert!(hand_overs.may_try(version, later));
    }

    fn version(id: Uuid) -> AgentVersion {
        AgentVersion {
            id,
            created_at: None,
            name: "0.2.0".into(),
        }
    }

    #[test]
    fn a_new_version_is_handed_over_once_and_a_failed_one_never_again() {
        let (running, wanted) = (Uuid::new_v4(), Uuid::new_v4());
        let idle = pb::UpdateStatusResponse::default();
        assert_eq!(decide(Some(&version(wanted)), Some(running), &idle), Decision::HandOver);
        assert_eq!(decide(Some(&version(running)), Some(running), &idle), Decision::Nothing);
        assert_eq!(
            decide(Some(&version(wanted)), None, &idle),
            Decision::Nothing,
            "disabled"
        );
        let waiting = pb::UpdateStatusResponse {
            target_version_id: wanted.to_string(),
            phase: pb::UpdatePhase::Waiting.into(),
            ..Default::default()
        };
        assert_eq!(
            decide(Some(&version(wanted)), Some(running), &waiting),
            Decision::Nothing
        );
        let failed = pb::UpdateStatusResponse {
            target_version_id: wanted.to_string(),
            phase: pb::UpdatePhase::Failed.into(),
            failed_version_ids: vec![wanted.to_string()],
            ..Default::default()
        };
        assert_eq!(decide(Some(&version(wanted)), Some(running), &failed), Decision::Failed);
        let another = Uuid::new_v4();
        assert_eq!(
            decide(Some(&version(another)), Some(running), &failed),
            Decision::HandOver
        );
    }
}
