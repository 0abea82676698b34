//! The executor's fence: the Lease `distr-agent-executor` in its namespace, held by one
//! executor process at a time and renewed while it runs, so that two executors never act at
//! once (two pods during a rollout gone wrong, a pod and a stray host process).
//!
//! - An executor that is its container's first process (PID 1) takes the Lease before it
//!   recovers or runs anything, and is not ready until then; a Lease held by another live
//!   executor is waited for until it expires. (A host process, as the end-to-end tests run the
//!   binaries, is not fenced: its `helm` children outlive it, so nothing would be gained.)
//! - Once every `helm` it started has ended at shutdown, the holder releases the Lease.
//! - A holder that cannot renew for [`GIVE_UP_AFTER`] stops its process, before the Lease
//!   ([`LEASE_DURATION`]) can pass to another executor.
//! - A holder names itself as `<hostname>/<pid namespace>/<pid>/<uuid>`. A pod's hostname is
//!   its name, and an executor that is its container's first process (PID 1) takes every
//!   child (`helm` among them) with it when it dies. So when the previous holder was PID 1
//!   of its container, and is gone (its Lease expired, or it was an earlier container of this
//!   same pod), no `helm` it started can still run: its interrupted operations are taken over
//!   at once instead of after Helm's timeout ([`earlier_helm_ended_before`]). A previous holder
//!   on the same host and in the same PID namespace whose process is gone has released the
//!   Lease too, but its `helm` children may live on: those still wait for their timeout.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, api::PostParams};
use tokio_util::sync::CancellationToken;

/// The Lease's name, in the executor's namespace.
pub const LEASE_NAME: &str = "distr-agent-executor";
/// How long a Lease lasts after its last renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews.
pub const RENEW_EVERY: Duration = Duration::from_secs(3);
/// A holder that has not renewed for this long stops its process (before its Lease can pass).
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(10);

/// Set once the fence is held: the time before which every `helm` of an earlier executor has
/// ended (the moment the fence was taken), when that is known.
static EARLIER_HELM_ENDED: OnceLock<DateTime<Utc>> = OnceLock::new();

/// If known, the time before which every `helm` process an earlier executor started has ended:
/// a pending revision written before it is abandoned and may be taken over at once.
pub fn earlier_helm_ended_before() -> Option<DateTime<Utc>> {
    EARLIER_HELM_ENDED.get().copied()
}

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("cannot read or write the Lease {LEASE_NAME}: {0}")]
    Api(#[from] kube::Error),
    #[error("stopped before the Lease {LEASE_NAME} was taken")]
    Cancelled,
}

/// Who holds the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub hostname: String,
    /// The inode of the PID namespace (`/proc/self/ns/pid`), 0 when unknown.
    pub pid_namespace: u64,
    pub pid: u32,
    pub instance: String,
}

impl Holder {
    /// This process.
    pub fn current() -> Self {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        let pid_namespace = std::fs::read_link("/proc/self/ns/pid")
            .ok()
            .and_then(|link| pid_namespace_inode(&link.to_string_lossy()))
            .unwrap_or(0);
        Self {
            hostname,
            pid_namespace,
            pid: std::process::id(),
            instance: format!("{:x}", Utc::now().timestamp_nanos_opt().unwrap_or_default()),
        }
    }

    pub fn identity(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.hostname, self.pid_namespace, self.pid, self.instance
        )
    }

    pub fn parse(identity: &str) -> Option<Self> {
        let mut parts = identity.rsplitn(4, '/');
        let instance = parts.next()?.to_owned();
        let pid = parts.next()?.parse().ok()?;
        let pid_namespace = parts.next()?.parse().ok()?;
        let hostname = parts.next()?.to_owned();
        Some(Self {
            hostname,
            pid_namespace,
            pid,
            instance,
        })
    }

    /// The first process of its container: its children die with it.
    pub fn contained(&self) -> bool {
        self.pid == 1
    }
}

fn pid_namespace_inode(link: &str) -> Option<u64> {
    link.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

/// What the current holder of a Lease means for `me`.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Take it; `helm_gone`: no `helm` of the previous holder can still run.
    Take { helm_gone: bool },
    /// Another executor may be alive: wait until its Lease expires.
    Wait,
}

/// Decides whether `me` may take a Lease held by `holder` (its identity as written), last
/// renewed `since_renewal` ago (`None`: never).
pub fn verdict(
    me: &Holder,
    holder: Option<&str>,
    since_renewal: Option<Duration>,
    alive: impl Fn(u32) -> bool,
) -> Verdict {
    let Some(identity) = holder.filter(|h| !h.is_empty()) else {
        // Released: a holder releases only once every helm it started has ended.
        return Verdict::Take { helm_gone: true };
    };
    let previous = Holder::parse(identity);
    let contained = previous.as_ref().is_some_and(Holder::contained);
    if identity == me.identity() {
        return Verdict::Take { helm_gone: false };
    }
    if since_renewal.is_none_or(|age| age >= LEASE_DURATION) {
        // Expired: its holder stopped itself before (GIVE_UP_AFTER) or died.
        return Verdict::Take { helm_gone: contained };
    }
    if let Some(previous) = previous {
        let same_host = previous.hostname == me.hostname && !me.hostname.is_empty();
        // An earlier container of this pod: the kubelet starts a container again only after
        // the one before exited, and all its processes with it.
        if same_host && contained && me.contained() && previous.pid_namespace != me.pid_namespace {
            return Verdict::Take { helm_gone: true };
        }
        // A process of this host and PID namespace that is gone.
        if same_host
            && previous.pid_namespace == me.pid_namespace
            && previous.pid_namespace != 0
            && !alive(previous.pid)
        {
            return Verdict::Take { helm_gone: false };
        }
    }
    Verdict::Wait
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Time since `time` (zero when it is in the future).
fn since(time: Option<&MicroTime>) -> Option<Duration> {
    time.map(|t| Duration::try_from(k8s_openapi::jiff::Timestamp::now().duration_since(t.0)).unwrap_or_default())
}

/// Takes the Lease for `me`, waiting while another live executor holds it; then keeps it
/// renewed in the background, and stops the process when it cannot.
pub async fn hold(client: kube::Client, namespace: &str, shutdown: CancellationToken) -> Result<Held, FenceError> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let me = Holder::current();
    let identity = me.identity();
    let mut said_waiting = false;
    let lease = loop {
        if shutdown.is_cancelled() {
            return Err(FenceError::Cancelled);
        }
        let taken_at = Utc::now();
        let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.to_owned()),
                    labels: Some([("app.kubernetes.io/part-of".to_owned(), "distr-agent".to_owned())].into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(identity.clone()),
                    lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                // A first executor of this version: earlier ones held no Lease, and their helm
                // may still run.
                Ok(lease) => break lease,
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(error) => return Err(error.into()),
            }
        };
        let spec = lease.spec.clone().unwrap_or_default();
        match verdict(
            &me,
            spec.holder_identity.as_deref(),
            since(spec.renew_time.as_ref()),
            alive,
        ) {
            Verdict::Take { helm_gone } => {
                let transitions = spec.lease_transitions.unwrap_or(0) + 1;
                lease.spec = Some(LeaseSpec {
                    holder_identity: Some(identity.clone()),
                    lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(transitions),
                    ..Default::default()
                });
                // The resourceVersion read above makes this a compare-and-swap.
                match api.replace(LEASE_NAME, &PostParams::default(), &lease).await {
                    Ok(lease) => {
                        if helm_gone {
                            let _ = EARLIER_HELM_ENDED.set(taken_at);
                        }
                        tracing::info!(
                            previous = spec.holder_identity.as_deref().unwrap_or(""),
                            earlier_helm_ended = helm_gone,
                            "took the executor Lease"
                        );
                        break lease;
                    }
                    Err(kube::Error::Api(status)) if status.code == 409 => continue,
                    Err(error) => return Err(error.into()),
                }
            }
            Verdict::Wait => {
                if !said_waiting {
                    tracing::warn!(
                        holder = spec.holder_identity.as_deref().unwrap_or(""),
                        "another executor holds the Lease {LEASE_NAME}; waiting until it expires"
                    );
                    said_waiting = true;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Err(FenceError::Cancelled),
                    () = tokio::time::sleep(RENEW_EVERY) => {}
                }
            }
        }
    };
    let renewing = CancellationToken::new();
    tokio::spawn(renew(api.clone(), lease, identity.clone(), renewing.clone()));
    Ok(Held {
        api,
        identity,
        renewing,
    })
}

/// The Lease, held.
pub struct Held {
    api: Api<Lease>,
    identity: String,
    renewing: CancellationToken,
}

impl Held {
    /// Gives the Lease up, when every `helm` this executor started has ended: the next
    /// executor takes it at once, and knows none of them runs.
    pub async fn release(&self) {
        self.renewing.cancel();
        let Ok(Some(mut lease)) = self.api.get_opt(LEASE_NAME).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = Some(now());
        match self.api.replace(LEASE_NAME, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!("released the executor Lease"),
            Err(error) => tracing::warn!(%error, "cannot release the executor Lease; it expires"),
        }
    }
}

/// Renews the Lease every [`RENEW_EVERY`]. Stops the process when the Lease went to another
/// executor, or could not be renewed for [`GIVE_UP_AFTER`]: from then on another may act.
async fn renew(api: Api<Lease>, mut lease: Lease, identity: String, shutdown: CancellationToken) {
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RENEW_EVERY) => {}
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.renew_time = Some(now());
        }
        match api.replace(LEASE_NAME, &PostParams::default(), &lease).await {
            Ok(updated) => {
                lease = updated;
                renewed = Instant::now();
            }
            Err(error) => {
                // Read it again: another executor may have taken it, or a write raced.
                match api.get_opt(LEASE_NAME).await {
                    Ok(Some(current))
                        if current.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(&identity) =>
                    {
                        lease = current;
                    }
                    Ok(_) => lost("another executor holds the Lease now"),
                    Err(_) => tracing::warn!(%error, "cannot renew the executor Lease"),
                }
                if renewed.elapsed() >= GIVE_UP_AFTER {
                    lost("the Lease could not be renewed in time");
                }
            }
        }
    }
}

fn lost(why: &str) -> ! {
    tracing::error!(
        "{why}: stopping, so that two executors never act at once (the container restarts and takes the Lease again)"
    );
    std::process::exit(75)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn holder(hostname: &str, pid_namespace: u64, pid: u32) -> Holder {
        Holder {
            hostname: hostname.into(),
            pid_namespace,
            pid,
            instance: "i".into(),
        }
    }

    const FRESH: Option<Duration> = Some(Duration::from_secs(2));

    #[test]
    fn identity_round_trips_with_slashes_in_the_hostname() {
        let h = holder("a/b", 4026531836, 1);
        assert_eq!(Holder::parse(&h.identity()), Some(h));
        assert_eq!(Holder::parse("junk"), None);
        assert_eq!(pid_namespace_inode("pid:[4026531836]"), Some(4026531836));
    }

    #[test]
    fn a_live_holder_elsewhere_is_waited_for() {
        let me = holder("pod-b", 2, 1);
        let other = holder("pod-a", 1, 1).identity();
        assert_eq!(verdict(&me, Some(&other), FRESH, |_| true), Verdict::Wait);
    }

    #[test]
    fn an_expired_lease_is_taken_and_a_contained_holders_helm_is_gone() {
        let me = holder("pod-b", 2, 1);
        let contained = holder("pod-a", 1, 1).identity();
        let host_process = holder("host", 1, 4242).identity();
        let old = Some(LEASE_DURATION);
        assert_eq!(
            verdict(&me, Some(&contained), old, |_| true),
            Verdict::Take { helm_gone: true }
        );
        assert_eq!(
            verdict(&me, Some(&host_process), old, |_| true),
            Verdict::Take { helm_gone: false }
        );
        assert_eq!(
            verdict(&me, Some(""), FRESH, |_| true),
            Verdict::Take { helm_gone: true }
        );
    }

    #[test]
    fn an_earlier_container_of_the_same_pod_is_gone_with_its_helm() {
        let me = holder("pod-a", 2, 1);
        let before = holder("pod-a", 1, 1).identity();
        assert_eq!(
            verdict(&me, Some(&before), FRESH, |_| true),
            Verdict::Take { helm_gone: true }
        );
        // Not PID 1: its children may outlive it.
        let me_on_host = holder("pod-a", 2, 77);
        assert_eq!(verdict(&me_on_host, Some(&before), FRESH, |_| true), Verdict::Wait);
    }

    #[test]
    fn a_dead_process_of_this_host_releases_the_lease_but_not_its_helm() {
        let me = holder("host", 1, 200);
        let dead = holder("host", 1, 100).identity();
        assert_eq!(
            verdict(&me, Some(&dead), FRESH, |_| false),
            Verdict::Take { helm_gone: false }
        );
        assert_eq!(verdict(&me, Some(&dead), FRESH, |_| true), Verdict::Wait);
    }
}
