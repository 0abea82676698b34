//! The watch of the policy ConfigMap in the agent's namespace: every change (created,
//! edited, deleted) is parsed at once and published, so the next install or upgrade follows
//! it without a restart. A change is logged with what it means (a parse error at `warn`).

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event, watcher},
    },
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    PolicyState,
    document::{CONFIG_MAP, KEY},
};

/// Starts the watch of `namespace`'s policy ConfigMap; it runs until `shutdown`. The
/// receiver says [`PolicyState::Unknown`] until the first listing.
pub fn start(client: kube::Client, namespace: &str, shutdown: CancellationToken) -> watch::Receiver<PolicyState> {
    let (sender, receiver) = watch::channel(PolicyState::Unknown);
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP}"));
    let stream = watcher(api, config).default_backoff();
    let namespace = namespace.to_owned();
    tokio::spawn(async move {
        tokio::select! {
            () = feed(stream, &sender, &namespace) => {}
            () = shutdown.cancelled() => {}
        }
    });
    receiver
}

/// The state a ConfigMap gives.
pub fn state_of(config_map: &ConfigMap) -> PolicyState {
    let text = config_map
        .data
        .as_ref()
        .and_then(|data| data.get(KEY))
        .map(String::as_str);
    PolicyState::from_document(text)
}

async fn feed(
    stream: impl futures::Stream<Item = Result<Event<ConfigMap>, watcher::Error>>,
    sender: &watch::Sender<PolicyState>,
    namespace: &str,
) {
    futures::pin_mut!(stream);
    let mut listing: Option<PolicyState> = None;
    while let Some(event) = stream.next().await {
        let next = match event {
            Ok(Event::Init) => {
                listing = Some(PolicyState::Absent);
                continue;
            }
            Ok(Event::InitApply(config_map)) => {
                listing = Some(state_of(&config_map));
                continue;
            }
            Ok(Event::InitDone) => listing.take().unwrap_or(PolicyState::Absent),
            Ok(Event::Apply(config_map)) => state_of(&config_map),
            Ok(Event::Delete(_)) => PolicyState::Absent,
            Err(error) => {
                tracing::warn!(%namespace, %error, "the policy watch failed; it restarts");
                continue;
            }
        };
        publish(sender, next, namespace);
    }
}

fn publish(sender: &watch::Sender<PolicyState>, next: PolicyState, namespace: &str) {
    if *sender.borrow() == next {
        return;
    }
    match &next {
        PolicyState::Absent => tracing::info!(%namespace, "no agent policy: installs are not restricted"),
        PolicyState::Active(_) => tracing::info!(%namespace, "agent policy loaded"),
        PolicyState::Invalid(error) => {
            tracing::warn!(%namespace, %error, "the agent policy is invalid: every install and upgrade is refused until it is fixed");
        }
        PolicyState::Unknown => {}
    }
    sender.send_replace(next);
}
