//! Which updater acts on an update: the state names its holder and a heartbeat the holder
//! renews; another updater stands by while that heartbeat moves (watched on its own clock) and
//! takes the update over once it has not moved for [`STALE_PERIODS`] periods.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::state::State;

/// A holder's heartbeat that has not moved for this many periods is stale: its updater is gone.
pub const STALE_PERIODS: u32 = 3;

/// Whether this updater may act.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The state is not read yet.
    Loading,
    /// Another updater (named) acts on an update under way and is alive.
    Standby(String),
    /// This updater acts.
    Active,
    /// Another updater wrote the state after this one (or this one let go): it acts no more
    /// until it has read the state again.
    Lost,
}

/// This process's identity as a holder: its pod (host) name and process id.
pub fn identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "updater".into());
    format!("{host}/{}", std::process::id())
}

/// Watches another holder's heartbeat on this process's own clock (no clock is shared with the
/// other pod): stale once it has not moved for [`STALE_PERIODS`] periods.
#[derive(Default)]
pub struct Watch {
    seen: Option<(String, Option<DateTime<Utc>>, Instant)>,
}

impl Watch {
    pub fn stale(&mut self, state: &State, period: Duration) -> bool {
        let now = (state.holder.clone(), state.heartbeat);
        match &self.seen {
            Some((holder, beat, since)) if (holder, beat) == (&now.0, &now.1) => {
                since.elapsed() >= period * STALE_PERIODS
            }
            _ => {
                self.seen = Some((now.0, now.1, Instant::now()));
                false
            }
        }
    }
}
