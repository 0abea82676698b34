//! Deciding which statuses to post to the Hub. Pure bookkeeping, no I/O.
//!
//! A status is posted at once when its type or message changed since the last accepted post,
//! and otherwise again once `refresh` has passed, so the Hub (which calls a status older than
//! 60 s stale) always has a fresh one without a post every cycle.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use uuid::Uuid;

use crate::hub::{StatusReport, StatusType};

#[derive(Debug)]
struct Posted {
    kind: StatusType,
    message: String,
    at: Instant,
}

/// Remembers what the Hub last accepted for each revision.
#[derive(Debug)]
pub struct StatusBook {
    refresh: Duration,
    posted: HashMap<Uuid, Posted>,
    /// Since when each revision has had a report due and not accepted.
    due_since: HashMap<Uuid, Instant>,
}

impl StatusBook {
    pub fn new(refresh: Duration) -> Self {
        Self {
            refresh,
            posted: HashMap::new(),
            due_since: HashMap::new(),
        }
    }

    /// The reports among `current` that are due at `now`: changed, never posted, or older than
    /// the refresh period. Revisions absent from `current` are forgotten.
    pub fn due(&mut self, current: &[StatusReport], now: Instant) -> Vec<StatusReport> {
        let known = |revision: &Uuid| current.iter().any(|r| &r.revision_id == revision);
        self.posted.retain(|revision, _| known(revision));
        self.due_since.retain(|revision, _| known(revision));
        let due: Vec<StatusReport> = current
            .iter()
            .filter(|report| match self.posted.get(&report.revision_id) {
                None => true,
                Some(last) => {
                    last.kind != report.status_type
                        || last.message != report.message
                        || now.saturating_duration_since(last.at) >= self.refresh
                }
            })
            .cloned()
            .collect();
        for report in &due {
            self.due_since.entry(report.revision_id).or_insert(now);
        }
        due
    }

    /// How long the oldest report that is due has waited for the Hub to accept it (zero when
    /// every due report was accepted).
    pub fn oldest_unposted(&self, now: Instant) -> Duration {
        self.due_since
            .values()
            .map(|since| now.saturating_duration_since(*since))
            .max()
            .unwrap_or_default()
    }

    /// Records that the Hub accepted `report` at `now`.
    pub fn accepted(&mut self, report: &StatusReport, now: Instant) {
        self.due_since.remove(&report.revision_id);
        self.posted.insert(
            report.revision_id,
            Posted {
                kind: report.status_type,
                message: report.message.clone(),
                at: now,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_unposted_report_ages_until_accepted() {
        let mut book = StatusBook::new(Duration::from_secs(30));
        let start = Instant::now();
        let current = [
            report(1, StatusType::Healthy, "ok"),
            report(2, StatusType::Running, "done"),
        ];
        assert_eq!(book.due(&current, start).len(), 2);
        book.accepted(&current[1], start);
        let later = start + Duration::from_secs(7);
        assert_eq!(book.due(&current, later).len(), 1, "the first is still due");
        assert_eq!(book.oldest_unposted(later), Duration::from_secs(7));
        book.accepted(&current[0], later);
        assert_eq!(book.oldest_unposted(later), Duration::ZERO);
    }

    fn report(revision: u128, kind: StatusType, message: &str) -> StatusReport {
        StatusReport {
            revision_id: Uuid::from_u128(revision),
            status_type: kind,
            message: message.into(),
        }
    }

    #[test]
    fn posts_changes_at_once_and_repeats_only_after_the_refresh_period() {
        let mut book = StatusBook::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let running = report(1, StatusType::Running, "helm install succeeded");
        assert_eq!(
            book.due(std::slice::from_ref(&running), t0),
            vec![running.clone()],
            "new status is due"
        );
        book.accepted(&running, t0);
        let later = t0 + Duration::from_secs(5);
        assert!(
            book.due(std::slice::from_ref(&running), later).is_empty(),
            "unchanged within 30 s"
        );

        let healthy = report(1, StatusType::Healthy, "status check passed. 1 resources healthy");
        assert_eq!(
            book.due(std::slice::from_ref(&healthy), later),
            vec![healthy.clone()],
            "a change is due"
        );
        book.accepted(&healthy, later);

        let message_changed = report(1, StatusType::Healthy, "status check passed. 2 resources healthy");
        assert_eq!(
            book.due(std::slice::from_ref(&message_changed), later).len(),
            1,
            "a new message is a change"
        );

        assert!(
            book.due(std::slice::from_ref(&healthy), later + Duration::from_secs(29))
                .is_empty()
        );
        assert_eq!(
            book.due(std::slice::from_ref(&healthy), later + Duration::from_secs(30))
                .len(),
            1,
            "refresh"
        );
    }

    #[test]
    fn a_failed_post_is_retried_and_gone_revisions_are_forgotten() {
        let mut book = StatusBook::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let a = report(2, StatusType::Progressing, "helm install in progress");
        assert_eq!(book.due(std::slice::from_ref(&a), t0).len(), 1);
        // Not accepted (the post failed): still due next cycle.
        assert_eq!(book.due(std::slice::from_ref(&a), t0 + Duration::from_secs(1)).len(), 1);
        book.accepted(&a, t0);
        assert!(book.due(&[], t0).is_empty());
        assert_eq!(
            book.due(std::slice::from_ref(&a), t0 + Duration::from_secs(1)).len(),
            1,
            "forgotten, so new"
        );
    }
}
