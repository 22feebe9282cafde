//! `Events`: the stream behind `rctl events`. One task per controller follows the store this
//! controller applies (and its view of the leader), turns each change into events with
//! [`rudder_model::events::diff`], keeps the latest [`HISTORY`] of them, and hands them to
//! every open stream.
//!
//! Invariants:
//! - Events come from committed state only: the store the raft loop publishes after applying
//!   entries. A follower applies the same log, so it serves the same events as the leader.
//! - The history is ordered by raft index and holds every event after `complete_after`:
//!   eviction drops whole indexes, so a `since_index` at or after `complete_after` replays
//!   without a gap; an older one gets a `notice` event first that says what is missing.
//! - After a restart the history starts again from the store the controller recovered (its
//!   latest snapshot) and the log entries replayed after it; nothing is kept on disk.
//! - Memory is bounded: [`HISTORY`] events, one broadcast buffer of [`LAG_LIMIT`] shared by all
//!   readers, [`STREAM_BUFFER`] per stream, at most [`MAX_STREAMS`] streams. A reader that
//!   falls [`LAG_LIMIT`] events behind is dropped with `resource_exhausted`, which says the
//!   index to resume after.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use rudder_model::events::{self, Event, Filter, Leadership};
use rudder_proto::v1::{ClusterEvent, EventsRequest};
use tokio::sync::{broadcast, mpsc};
use tonic::Status;
use tracing::{debug, info};

use crate::raft_node::RaftHandle;

/// Events kept for `--since`.
pub const HISTORY: usize = 10_000;
/// How far (in events) a reader may fall behind the newest before it is dropped.
pub const LAG_LIMIT: usize = 1024;
/// Events queued for one stream's transport.
pub const STREAM_BUFFER: usize = 64;
/// The most `Events` streams one controller serves at once.
pub const MAX_STREAMS: usize = 64;
/// How long a dropped reader's last message (why it was dropped) may wait to be sent.
const FAREWELL: Duration = Duration::from_secs(5);

/// What an `Events` call streams.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<ClusterEvent, Status>> + Send>>;

/// The latest events, by raft index.
#[derive(Debug, Default)]
struct History {
    events: VecDeque<Arc<Event>>,
    /// Every event with an index above this one is in `events`.
    complete_after: u64,
    cap: usize,
}

impl History {
    fn new(cap: usize, complete_after: u64) -> History {
        History {
            events: VecDeque::new(),
            complete_after,
            cap,
        }
    }

    fn push(&mut self, e: Arc<Event>) {
        self.events.push_back(e);
        while self.events.len() > self.cap {
            let Some(gone) = self.events.pop_front() else {
                break;
            };
            // Whole indexes go, so that the history stays complete after `complete_after`.
            while self.events.front().is_some_and(|f| f.index == gone.index) {
                self.events.pop_front();
            }
            self.complete_after = self.complete_after.max(gone.index);
        }
    }

    fn last_index(&self) -> u64 {
        self.events.back().map_or(self.complete_after, |e| e.index)
    }

    /// The events after `since_index` and at or after `since_ms`, with a notice when some of
    /// them may be missing.
    fn replay(
        &self,
        since_index: Option<u64>,
        since_ms: Option<u64>,
    ) -> (Option<ClusterEvent>, Vec<Arc<Event>>) {
        let after = since_index.unwrap_or(0);
        let from_ms = since_ms.unwrap_or(0);
        let list: Vec<Arc<Event>> = self
            .events
            .iter()
            .filter(|e| e.index > after && e.at >= from_ms)
            .cloned()
            .collect();
        let oldest_ms = self.events.front().map(|e| e.at);
        let missing = if since_index.is_some() {
            after < self.complete_after
        } else {
            // By time: events before the history may be as recent as the asked time when the
            // history does not reach back to it.
            self.complete_after > 0 && oldest_ms.is_none_or(|o| o > from_ms)
        };
        let notice = missing.then(|| ClusterEvent {
            index: self.complete_after,
            r#type: "notice".into(),
            action: "gap".into(),
            message: format!(
                "events: this controller's history starts after raft index {}: earlier events \
                 are not available (it keeps the last {} events since it started)",
                self.complete_after, self.cap
            ),
            ..Default::default()
        });
        (notice, list)
    }
}

struct Inner {
    history: History,
    /// The newest store index the events were derived up to.
    applied: u64,
    tx: broadcast::Sender<Arc<Event>>,
}

/// The events of one controller: its history and the streams that follow it.
pub struct EventHub {
    inner: Mutex<Inner>,
    streams: Arc<AtomicUsize>,
}

/// One open stream; the count goes down when its task ends, however it ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl EventHub {
    /// A hub whose history is complete after raft index `applied` (the store it starts from).
    fn new(cap: usize, applied: u64) -> Arc<EventHub> {
        let (tx, _) = broadcast::channel(LAG_LIMIT);
        Arc::new(EventHub {
            inner: Mutex::new(Inner {
                history: History::new(cap, applied),
                applied,
                tx,
            }),
            streams: Default::default(),
        })
    }

    /// Starts following `raft`'s applied store and leadership; the task ends with the raft
    /// loop.
    pub fn start(raft: &RaftHandle) -> Arc<EventHub> {
        let mut store_rx = raft.watch_store();
        let mut status_rx = raft.watch_status();
        let mut prev = store_rx.borrow_and_update().clone();
        let mut lead = {
            let s = status_rx.borrow_and_update();
            Leadership {
                term: s.term,
                leader: s.leader_id,
            }
        };
        let hub = EventHub::new(HISTORY, prev.applied);
        let me = hub.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    r = store_rx.changed() => {
                        if r.is_err() { return }
                        let next = store_rx.borrow_and_update().clone();
                        me.publish(events::diff(&prev, &next, crate::now_ms()), next.applied);
                        prev = next;
                    }
                    r = status_rx.changed() => {
                        if r.is_err() { return }
                        let now = {
                            let s = status_rx.borrow_and_update();
                            Leadership { term: s.term, leader: s.leader_id }
                        };
                        let index = prev.applied.max(me.last_index());
                        if let Some(e) = events::leader_change(lead, now, index, crate::now_ms()) {
                            me.publish(vec![e], index);
                        }
                        lead = now;
                    }
                }
            }
        });
        hub
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent history (pushes are whole).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn last_index(&self) -> u64 {
        self.lock().history.last_index()
    }

    /// Hands out `list`, the events up to store index `applied`.
    fn publish(&self, list: Vec<Event>, applied: u64) {
        let mut inner = self.lock();
        inner.applied = inner.applied.max(applied);
        for e in list {
            debug!(index = e.index, kind = e.kind.as_str(), action = %e.action, name = %e.name, "event");
            let e = Arc::new(e);
            inner.history.push(e.clone());
            // No receiver is not an error: the history keeps it.
            let _ = inner.tx.send(e);
        }
    }

    fn take(&self) -> Result<Slot, Status> {
        let n = self.streams.fetch_add(1, Ordering::AcqRel);
        if n >= MAX_STREAMS {
            self.streams.fetch_sub(1, Ordering::AcqRel);
            return Err(Status::resource_exhausted(format!(
                "events: this controller already serves {MAX_STREAMS} event streams; retry later"
            )));
        }
        Ok(Slot(self.streams.clone()))
    }

    /// Opens a stream: the history asked for (`since_*`), then every new event, each passed
    /// through the request's filters, until `until_*` or the reader goes away.
    pub fn subscribe(&self, req: EventsRequest) -> Result<EventStream, Status> {
        let filter =
            Filter::parse(&req.filters).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let slot = self.take()?;
        let replaying = req.since_index.is_some() || req.since_ms.is_some();
        // One lock: nothing published between the replay and the subscription is lost or
        // sent twice.
        let (notice, replay, mut live, applied) = {
            let inner = self.lock();
            let (notice, replay) = if replaying {
                inner.history.replay(req.since_index, req.since_ms)
            } else {
                (None, Vec::new())
            };
            (notice, replay, inner.tx.subscribe(), inner.applied)
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let until = Until {
            index: req.until_index,
            ms: req.until_ms,
        };
        tokio::spawn(async move {
            let _slot = slot;
            if let Some(n) = notice {
                if tx.send(Ok(n)).await.is_err() {
                    return;
                }
            }
            let mut last = 0;
            for e in replay {
                if until.passed(&e) {
                    return;
                }
                last = e.index;
                if filter.matches(&e) && tx.send(Ok(to_proto(&e))).await.is_err() {
                    return;
                }
            }
            // Every event up to `until_index` was in the history: nothing more will come.
            if until.index.is_some_and(|i| i <= applied) {
                return;
            }
            let deadline = until.ms.map(|ms| {
                let wait = ms.saturating_sub(crate::now_ms());
                tokio::time::Instant::now() + Duration::from_millis(wait)
            });
            loop {
                let next = tokio::select! {
                    r = live.recv() => r,
                    _ = tx.closed() => return,
                    _ = sleep_until(deadline) => return,
                };
                match next {
                    Ok(e) => {
                        if until.passed(&e) {
                            return;
                        }
                        last = e.index;
                        if filter.matches(&e) && tx.send(Ok(to_proto(&e))).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        info!(behind = n, last, "events: dropped a slow reader");
                        let why = Status::resource_exhausted(format!(
                            "events: this reader fell more than {LAG_LIMIT} events behind and \
                             was dropped; resume with --since {last}"
                        ));
                        let _ = tokio::time::timeout(FAREWELL, tx.send(Err(why))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// Streams open now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }
}

/// Where a stream ends.
#[derive(Debug, Clone, Copy)]
struct Until {
    index: Option<u64>,
    ms: Option<u64>,
}

impl Until {
    fn passed(&self, e: &Event) -> bool {
        self.index.is_some_and(|i| e.index > i) || self.ms.is_some_and(|ms| e.at > ms)
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn to_proto(e: &Event) -> ClusterEvent {
    ClusterEvent {
        index: e.index,
        at_ms: e.at,
        r#type: e.kind.as_str().to_string(),
        action: e.action.clone(),
        id: e.id.clone(),
        name: e.name.clone(),
        service: e.service.clone(),
        node: e.node.clone(),
        message: e.message.clone(),
        attributes: e.attributes.clone().into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use rudder_model::events::EventType;

    fn ev(index: u64, at: u64, service: &str) -> Event {
        Event {
            index,
            at,
            kind: EventType::Service,
            action: "created".into(),
            id: String::new(),
            name: service.into(),
            service: service.into(),
            node: String::new(),
            message: String::new(),
            attributes: Default::default(),
        }
    }

    fn put(hub: &EventHub, list: Vec<Event>) {
        let applied = list.iter().map(|e| e.index).max().unwrap_or(0);
        hub.publish(list, applied);
    }

    fn req() -> EventsRequest {
        EventsRequest::default()
    }

    #[test]
    fn history_evicts_whole_indexes_and_says_what_is_missing() {
        let mut h = History::new(3, 0);
        for (i, s) in [(1, "a"), (2, "b"), (2, "c"), (3, "d")] {
            h.push(Arc::new(ev(i, i * 10, s)));
        }
        // Index 1 went, and with it nothing else; then 2 must go whole.
        h.push(Arc::new(ev(4, 40, "e")));
        let names: Vec<_> = h.events.iter().map(|e| e.name.clone()).collect();
        assert_eq!(names, ["d", "e"]);
        assert_eq!(h.complete_after, 2);
        let (notice, list) = h.replay(Some(2), None);
        assert!(notice.is_none());
        assert_eq!(list.len(), 2);
        let (notice, _) = h.replay(Some(1), None);
        assert!(notice.expect("gap").message.contains("after raft index 2"));
        let (_, list) = h.replay(None, Some(40));
        assert_eq!(list.len(), 1);
    }

    #[tokio::test]
    async fn replay_then_live_without_gap_or_repeat() {
        let hub = EventHub::new(100, 0);
        put(&hub, vec![ev(1, 10, "a"), ev(2, 20, "b")]);
        let mut s = hub
            .subscribe(EventsRequest {
                since_index: Some(1),
                ..req()
            })
            .expect("stream");
        put(&hub, vec![ev(3, 30, "c")]);
        let got: Vec<u64> = vec![
            s.next().await.expect("b").expect("ok").index,
            s.next().await.expect("c").expect("ok").index,
        ];
        assert_eq!(got, [2, 3]);
        // Without `since`, only new events.
        let mut live = hub.subscribe(req()).expect("stream");
        put(&hub, vec![ev(4, 40, "d")]);
        assert_eq!(live.next().await.expect("d").expect("ok").index, 4);
    }

    #[tokio::test]
    async fn filters_and_until() {
        let hub = EventHub::new(100, 0);
        put(
            &hub,
            vec![ev(1, 10, "web"), ev(2, 20, "db"), ev(3, 30, "web")],
        );
        let s = hub
            .subscribe(EventsRequest {
                since_index: Some(0),
                until_index: Some(3),
                filters: vec!["service=web".into()],
                ..req()
            })
            .expect("stream");
        put(&hub, vec![ev(4, 40, "web")]);
        let got: Vec<u64> = s.map(|r| r.expect("ok").index).collect().await;
        assert_eq!(got, [1, 3]);
        let Err(e) = hub.subscribe(EventsRequest {
            filters: vec!["colour=red".into()],
            ..req()
        }) else {
            panic!("a bad filter was taken");
        };
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    /// A reader that does not read is dropped with a message that says where to resume, and
    /// the hub's memory does not grow with what it missed.
    #[tokio::test]
    async fn a_slow_reader_is_dropped() {
        let hub = EventHub::new(100, 0);
        let mut s = hub.subscribe(req()).expect("stream");
        for i in 1..=(LAG_LIMIT + STREAM_BUFFER + 10) as u64 {
            put(&hub, vec![ev(i, i, "x")]);
            tokio::task::yield_now().await;
        }
        assert!(hub.lock().history.events.len() <= 100);
        let mut last = None;
        while let Some(r) = s.next().await {
            match r {
                Ok(_) => {}
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        let e = last.expect("dropped with an error");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("resume with --since"), "{e}");
    }

    /// On a real (one-member) raft group: the election and a committed service come out as
    /// events with their raft indexes, and a stream from `since` the first resumes after it.
    #[tokio::test(start_paused = true)]
    async fn follows_the_applied_store() {
        let raft = crate::raft_node::start(
            1,
            crate::raft_sim::SimStorage::new(vec![1]),
            Arc::new(crate::transport::NoopTransport),
        )
        .expect("start raft");
        let hub = EventHub::start(&raft);
        let spec: rudder_model::ServiceSpec =
            serde_json::from_value(serde_json::json!({"name": "web", "image": "busybox"}))
                .expect("spec");
        raft.propose(rudder_model::Command::PutService {
            id: "s1".into(),
            spec: Box::new(spec),
            now: 5,
        })
        .await
        .expect("commit");
        let s = hub
            .subscribe(EventsRequest {
                since_index: Some(0),
                filters: vec!["type=service".into(), "type=leader".into()],
                ..req()
            })
            .expect("stream");
        let got: Vec<ClusterEvent> = tokio::time::timeout(Duration::from_secs(5), async {
            s.map(|r| r.expect("ok"))
                .filter(|e| std::future::ready(e.r#type != "notice"))
                .take(2)
                .collect()
                .await
        })
        .await
        .expect("two events");
        // The election and the commit may be observed in one go: leadership comes second.
        let kinds: std::collections::BTreeSet<(&str, &str)> = got
            .iter()
            .map(|e| (e.r#type.as_str(), e.action.as_str()))
            .collect();
        assert!(kinds.contains(&("leader", "elected")), "{got:?}");
        assert!(kinds.contains(&("service", "created")), "{got:?}");
        let created = got.iter().find(|e| e.r#type == "service").expect("created");
        assert_eq!(created.index, raft.store().services["web"].version);
        let mut after = hub
            .subscribe(EventsRequest {
                since_index: Some(created.index - 1),
                filters: vec!["service=web".into()],
                ..req()
            })
            .expect("stream");
        let again = after.next().await.expect("one").expect("ok");
        assert_eq!(again.index, created.index);
    }

    #[tokio::test]
    async fn streams_are_bounded_and_released() {
        let hub = EventHub::new(10, 0);
        let streams: Vec<_> = (0..MAX_STREAMS)
            .map(|_| hub.subscribe(req()).expect("stream"))
            .collect();
        let Err(e) = hub.subscribe(req()) else {
            panic!("one more than the limit");
        };
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        drop(streams);
        // The tasks see their readers gone on the next event.
        put(&hub, vec![ev(1, 1, "a")]);
        for _ in 0..100 {
            if hub.open() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(hub.open(), 0);
    }
}
