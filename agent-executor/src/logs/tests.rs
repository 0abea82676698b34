//! The collection's decisions over a fake source: failed reads, byte bounds, the deadline.

#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_runtime::sync::MutexExt as _;
use chrono::{DateTime, SecondsFormat, Utc};
use tokio::time::Instant;

use super::{
    source::{LogRequest, LogStream, PodContainers},
    *,
};
use crate::cluster::kube_util::ApiError;

/// A line of a container's log and its time.
type TimedLine = (DateTime<Utc>, String);

/// A kubelet in memory: per (pod, container) its lines; reads fail on demand.
#[derive(Default)]
struct FakeSource {
    logs: Mutex<BTreeMap<(String, String), Vec<TimedLine>>>,
    /// Reads that fail the next time they are opened.
    fail_next: Mutex<HashSet<(String, String)>>,
    /// Reads that never answer.
    hang: Mutex<HashSet<(String, String)>>,
    stored: Mutex<HashMap<ReleaseKey, DateTime<Utc>>>,
    opened: Mutex<usize>,
}

impl FakeSource {
    fn log(&self, pod: &str, container: &str, time: DateTime<Utc>, body: &str) {
        self.logs
            .locked()
            .entry((pod.to_owned(), container.to_owned()))
            .or_default()
            .push((time, body.to_owned()));
    }

    fn fail_next(&self, pod: &str, container: &str) {
        self.fail_next.locked().insert((pod.to_owned(), container.to_owned()));
    }
}

fn server_error() -> ApiError {
    ApiError::Kube(kube::Error::Api(
        kube::core::Status::failure("the kubelet did not answer", "InternalError")
            .with_code(500)
            .boxed(),
    ))
}

impl LogSource for FakeSource {
    async fn workloads(&self, _: &ReleaseKey) -> Result<Option<Arc<[Workload]>>, SourceError> {
        Ok(Some(Arc::from(vec![Workload {
            resource: "deployments/web".into(),
            pods: lines::PodSelector::Labels("app=web".into()),
        }])))
    }

    async fn pods(&self, _: &str, _: &Workload) -> Result<Vec<PodContainers>, SourceError> {
        let mut pods: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (pod, container) in self.logs.locked().keys() {
            pods.entry(pod.clone()).or_default().push(container.clone());
        }
        Ok(pods
            .into_iter()
            .map(|(pod, containers)| PodContainers { pod, containers })
            .collect())
    }

    async fn open(&self, request: &LogRequest) -> Result<Option<LogStream>, SourceError> {
        *self.opened.locked() += 1;
        let id = (request.pod.clone(), request.container.clone());
        if self.hang.locked().contains(&id) {
            std::future::pending::<()>().await;
        }
        if self.fail_next.locked().remove(&id) {
            return Err(SourceError::Read {
                pod: request.pod.clone(),
                container: request.container.clone(),
                source: server_error(),
            });
        }
        // As a kubelet: from the whole second of `since`, at most `limit_bytes`.
        let since = request
            .since
            .map(|since| DateTime::from_timestamp(since.timestamp(), 0).unwrap());
        let mut text = String::new();
        for (time, body) in self.logs.locked().get(&id).into_iter().flatten() {
            if since.is_none_or(|since| *time >= since) {
                text.push_str(&format!(
                    "{} {body}\n",
                    time.to_rfc3339_opts(SecondsFormat::Nanos, true)
                ));
            }
        }
        let mut bytes = text.into_bytes();
        bytes.truncate(usize::try_from(request.limit_bytes).unwrap());
        Ok(Some(Box::pin(futures::io::Cursor::new(bytes))))
    }

    async fn stored_watermark(&self, key: &ReleaseKey) -> Result<Option<DateTime<Utc>>, SourceError> {
        Ok(self.stored.locked().get(key).copied())
    }

    async fn save_watermark(&self, key: &ReleaseKey, time: DateTime<Utc>) -> Result<(), SourceError> {
        self.stored.locked().insert(key.clone(), time);
        Ok(())
    }

    fn retain(&self, _: &dyn Fn(&ReleaseKey) -> bool) {}
}

fn target() -> LogTarget {
    LogTarget {
        key: ReleaseKey::new("apps", "web"),
        deployment_id: "d".into(),
        revision_id: "r".into(),
    }
}

fn later(seconds: u64) -> Instant {
    Instant::now() + Duration::from_secs(seconds)
}

/// The poller's side: collect, ship everything, acknowledge. Returns the bodies shipped.
async fn cycle(collector: &LogCollector<FakeSource>, shipped: &mut Vec<String>) -> usize {
    let collection = collector.collect(vec![target()], None, 100_000, later(30)).await;
    let count = collection.records.len();
    shipped.extend(collection.records.into_iter().map(|record| record.body));
    collector.ack(collection.cursors).await.unwrap();
    count
}

fn ago(seconds: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::seconds(seconds)
}

#[tokio::test]
async fn a_container_whose_read_fails_once_ships_every_line_once() {
    let source = FakeSource::default();
    source.log("web-1", "app", ago(30), "one-a");
    source.log("web-2", "app", ago(29), "two-a");
    source.log("web-1", "app", ago(20), "one-b");
    source.log("web-2", "app", ago(19), "two-b");
    let collector = LogCollector::new(source);
    let mut shipped = Vec::new();

    collector.source.fail_next("web-2", "app");
    cycle(&collector, &mut shipped).await;
    assert_eq!(collector.read_failures.get(), 1, "the failure is counted");
    assert!(
        collector.source.stored.locked().get(&target().key).is_none(),
        "the watermark did not move past the lines of the failed container"
    );

    // The read succeeds now: every line comes, including web-1's read the first time.
    cycle(&collector, &mut shipped).await;
    assert_eq!(cycle(&collector, &mut shipped).await, 0, "nothing comes twice");
    shipped.sort();
    assert_eq!(shipped, ["one-a", "one-b", "two-a", "two-b"], "every line once");
}

#[tokio::test]
async fn a_read_that_fails_part_way_resumes_where_it_stopped() {
    /// Serves the log whole from the second open on; the first breaks after the first line.
    struct Breaks(FakeSource, Mutex<bool>);
    impl LogSource for Breaks {
        async fn workloads(&self, key: &ReleaseKey) -> Result<Option<Arc<[Workload]>>, SourceError> {
            self.0.workloads(key).await
        }
        async fn pods(&self, namespace: &str, workload: &Workload) -> Result<Vec<PodContainers>, SourceError> {
            self.0.pods(namespace, workload).await
        }
        async fn open(&self, request: &LogRequest) -> Result<Option<LogStream>, SourceError> {
            let stream = self.0.open(request).await?;
            if std::mem::replace(&mut *self.1.locked(), false) {
                use futures::AsyncReadExt as _;
                let mut text = String::new();
                stream.unwrap().read_to_string(&mut text).await.unwrap();
                let first = text.lines().next().unwrap().to_owned() + "\n";
                let failing =
                    futures::stream::iter([Ok(first.into_bytes()), Err(std::io::Error::other("connection reset"))]);
                return Ok(Some(Box::pin(futures::TryStreamExt::into_async_read(failing))));
            }
            Ok(stream)
        }
        async fn stored_watermark(&self, key: &ReleaseKey) -> Result<Option<DateTime<Utc>>, SourceError> {
            self.0.stored_watermark(key).await
        }
        async fn save_watermark(&self, key: &ReleaseKey, time: DateTime<Utc>) -> Result<(), SourceError> {
            self.0.save_watermark(key, time).await
        }
        fn retain(&self, _: &dyn Fn(&ReleaseKey) -> bool) {}
    }
    let source = Breaks(FakeSource::default(), Mutex::new(true));
    let (first, second) = (ago(30), ago(20));
    source.0.log("web-1", "app", first, "a");
    source.0.log("web-1", "app", second, "b1");
    source.0.log("web-1", "app", second, "b2");
    let collector = LogCollector::new(source);
    let collection = collector.collect(vec![target()], None, 1000, later(30)).await;
    // More lines of `first` may have followed: the cursor stops just before it.
    assert!(collection.records.is_empty(), "{collection:?}");
    assert_eq!(collection.cursors[0].time, first - chrono::Duration::nanoseconds(1));
    assert_eq!(collector.read_failures.get(), 1);
    collector.ack(collection.cursors).await.unwrap();
    let collection = collector.collect(vec![target()], None, 1000, later(30)).await;
    let bodies: Vec<&str> = collection.records.iter().map(|r| r.body.as_str()).collect();
    assert_eq!(bodies, ["a", "b1", "b2"]);
}

#[tokio::test]
async fn fifty_flooding_pods_ship_everything_once_within_the_byte_bound() {
    let source = FakeSource::default();
    let body = "x".repeat(200);
    let start = ago(100);
    let mut all = Vec::new();
    for pod in 0..50 {
        for n in 0..1000 {
            let line = format!("{pod}-{n}-{body}");
            source.log(
                &format!("web-{pod}"),
                "app",
                start + chrono::Duration::milliseconds(n * 50),
                &line,
            );
            all.push(line);
        }
    }
    let collector = LogCollector::new(source);
    let mut shipped = Vec::new();
    let mut largest = 0;
    let mut cycles = 0;
    while shipped.len() < all.len() && cycles < 200 {
        let collection = collector.collect(vec![target()], None, 100_000, later(30)).await;
        let bytes: usize = collection
            .records
            .iter()
            .map(|r| r.body.len() + read::LINE_OVERHEAD)
            .sum();
        largest = largest.max(bytes);
        shipped.extend(collection.records.into_iter().map(|record| record.body));
        collector.ack(collection.cursors).await.unwrap();
        cycles += 1;
    }
    eprintln!(
        "{} lines in {cycles} collections, at most {largest} bytes each",
        all.len()
    );
    assert!(largest <= BATCH_BYTES, "{largest} bytes in one collection");
    assert_eq!(shipped.len(), all.len(), "nothing repeated");
    shipped.sort();
    all.sort();
    assert!(shipped == all, "every line, once");
}

#[tokio::test]
async fn a_read_that_hangs_gives_way_to_the_deadline_and_holds_its_release() {
    let source = FakeSource::default();
    source.log("web-1", "app", ago(30), "a");
    source.log("web-2", "app", ago(30), "b");
    source.hang.locked().insert(("web-2".into(), "app".into()));
    let collector = LogCollector::new(source);
    let started = std::time::Instant::now();
    let collection = collector
        .collect(vec![target()], None, 1000, Instant::now() + Duration::from_millis(200))
        .await;
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(
        collection.records.is_empty() && collection.cursors.is_empty(),
        "{collection:?}"
    );
    assert_eq!(collector.read_failures.get(), 0, "running out of time is no failure");
    collector.source.hang.locked().clear();
    let collection = collector.collect(vec![target()], None, 1000, later(30)).await;
    assert_eq!(collection.records.len(), 2);
}

#[tokio::test]
async fn releases_no_longer_collected_are_forgotten() {
    let collector = LogCollector::new(FakeSource::default());
    let other = LogTarget {
        key: ReleaseKey::new("apps", "other"),
        ..target()
    };
    collector
        .collect(vec![target(), other.clone()], None, 1000, later(30))
        .await;
    assert_eq!(collector.watermarks.locked().len(), 2);
    collector.collect(vec![target()], None, 1000, later(30)).await;
    assert_eq!(
        collector.watermarks.locked().keys().collect::<Vec<_>>(),
        [&target().key]
    );
    assert_eq!(collector.written.locked().len(), 1);
}
