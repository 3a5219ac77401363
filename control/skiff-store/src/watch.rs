//! Watches: every event of a key range from a start revision, once, in revision order.
//!
//! A watcher is a task with three states:
//! - **catching up**: it replays the on-disk event log from its next revision, a bounded batch
//!   at a time, until it reaches the revision committed when it looked;
//! - **live**: it follows the in-memory broadcast of committed batches, skipping what it already
//!   sent;
//! - **lagging**: when the broadcast overtook it (its consumer is slow), it goes back to
//!   catching up from disk.
//!
//! It subscribes to the broadcast before its first replay, so nothing committed in between is
//! missed. Writers never wait for watchers; a watcher's memory is bounded by its output channel
//! and the broadcast buffer. If its next revision has been compacted away it ends with
//! [`StoreError::Compacted`] (the client re-lists).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::sync::{broadcast, mpsc};

use crate::{Event, Mvcc, RangeRequest, Revision, StoreError};

/// Events replayed from disk per read transaction.
const REPLAY_BATCH: usize = 512;
/// Messages buffered between a watcher task and its consumer.
const OUTPUT_BUFFER: usize = 64;

/// What a watch yields.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WatchEvent {
    /// Events, in revision order.
    Events(Vec<Event>),
    /// Nothing in the range changed up to and including this revision (for bookmarks).
    Progress(Revision),
}

/// A running watch; dropping it stops the watcher.
#[derive(Debug)]
pub struct WatchStream {
    rx: mpsc::Receiver<Result<WatchEvent, StoreError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Mvcc {
    /// Watches keys in `range` (its `revision` and `limit` are ignored) starting at revision
    /// `start` (0 = changes after the current revision). With `progress`, a
    /// [`WatchEvent::Progress`] is sent after each such interval without events. Needs a Tokio
    /// runtime.
    pub fn watch(
        &self,
        range: RangeRequest,
        start: Revision,
        progress: Option<Duration>,
    ) -> WatchStream {
        let (tx, rx) = mpsc::channel(OUTPUT_BUFFER);
        let sub = self.subscribe();
        let next = if start == 0 {
            self.revision() + 1
        } else {
            start
        };
        let task = tokio::spawn(run(self.clone(), range, next, progress, sub, tx));
        WatchStream { rx, task }
    }
}

type Out = mpsc::Sender<Result<WatchEvent, StoreError>>;

async fn run(
    mvcc: Mvcc,
    range: RangeRequest,
    mut next: Revision,
    progress: Option<Duration>,
    mut sub: broadcast::Receiver<Arc<Vec<Event>>>,
    tx: Out,
) {
    let range = Arc::new(range);
    let mut ticker = progress.map(|p| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        // Catching up from disk.
        loop {
            let (m, r) = (mvcc.clone(), range.clone());
            let read = tokio::task::spawn_blocking(move || m.events_since(&r, next, REPLAY_BATCH))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            let (events, through) = match read {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            if !events.is_empty() && tx.send(Ok(WatchEvent::Events(events))).await.is_err() {
                return;
            }
            next = through + 1;
            if through >= mvcc.revision() {
                break;
            }
        }
        // Live until the broadcast overtakes us.
        let mut sent_since_tick = false;
        loop {
            let tick = async {
                match ticker.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = sub.recv() => match msg {
                    Ok(batch) => {
                        let Some(first) = batch.first() else { continue };
                        let last = batch.last().map_or(0, |e| e.kv.mod_revision);
                        if last < next {
                            continue; // already sent from disk
                        }
                        if first.kv.mod_revision > next {
                            break; // a gap: replay from disk
                        }
                        let events: Vec<Event> = batch
                            .iter()
                            .filter(|e| e.kv.mod_revision >= next && range.contains(&e.kv.key))
                            .cloned()
                            .collect();
                        next = last + 1;
                        if !events.is_empty() {
                            sent_since_tick = true;
                            if tx.send(Ok(WatchEvent::Events(events))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = tick => {
                    if !sent_since_tick
                        && tx.send(Ok(WatchEvent::Progress(next - 1))).await.is_err()
                    {
                        return;
                    }
                    sent_since_tick = false;
                }
            }
        }
    }
}
