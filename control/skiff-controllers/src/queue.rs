//! The work queue every controller reconciles from, with client-go's `workqueue` guarantees:
//! a key queued many times before a worker takes it is reconciled once; a key is never
//! reconciled by two workers at once (one queued while in progress runs again after); delayed
//! adds keep the earliest deadline per key; failures back off per key (800 ms doubling to
//! 30 s, kube-runtime's policy) until the key succeeds.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fmt::Debug,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};

#[derive(Debug)]
struct State<T> {
    queue: VecDeque<T>,
    dirty: HashSet<T>,
    processing: HashSet<T>,
    failures: HashMap<T, u32>,
}

/// A deduplicating, rate-limited work queue of keys.
#[derive(Debug)]
pub struct Queue<T> {
    state: Mutex<State<T>>,
    notify: Notify,
    delayed: mpsc::UnboundedSender<(Instant, T)>,
}

impl<T> Queue<T>
where
    T: Clone + Eq + Hash + Ord + Debug + Send + Sync + 'static,
{
    /// An empty queue (its delay timer runs as a task of the current runtime).
    pub fn new() -> Arc<Queue<T>> {
        let (delayed, rx) = mpsc::unbounded_channel();
        let q = Arc::new(Queue {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                dirty: HashSet::new(),
                processing: HashSet::new(),
                failures: HashMap::new(),
            }),
            notify: Notify::new(),
            delayed,
        });
        tokio::spawn(delay_loop(Arc::downgrade(&q), rx));
        q
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `key` (no-op if it is already waiting).
    pub fn add(&self, key: T) {
        let mut s = self.lock();
        if !s.dirty.insert(key.clone()) {
            return;
        }
        if !s.processing.contains(&key) {
            s.queue.push_back(key);
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Queues `key` after `delay`.
    pub fn add_after(&self, key: T, delay: Duration) {
        if delay.is_zero() {
            self.add(key);
        } else {
            let _ = self.delayed.send((Instant::now() + delay, key));
        }
    }

    /// Queues `key` after its backoff, and lengthens the backoff.
    pub fn add_rate_limited(&self, key: T) {
        let attempt = {
            let mut s = self.lock();
            let n = s.failures.entry(key.clone()).or_default();
            *n += 1;
            *n - 1
        };
        self.add_after(key, crate::backoff(attempt));
    }

    /// Resets `key`'s backoff.
    pub fn forget(&self, key: &T) {
        self.lock().failures.remove(key);
    }

    /// How many keys wait (not counting those in progress or delayed).
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether no key waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the next key, waiting for one; the caller must call [`Queue::done`] after.
    pub async fn get(&self) -> T {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.lock();
                if let Some(k) = s.queue.pop_front() {
                    s.dirty.remove(&k);
                    s.processing.insert(k.clone());
                    let more = !s.queue.is_empty();
                    drop(s);
                    if more {
                        self.notify.notify_one();
                    }
                    return k;
                }
            }
            notified.await;
        }
    }

    /// Marks `key` finished; if it was queued meanwhile, it waits again.
    pub fn done(&self, key: &T) {
        let mut s = self.lock();
        s.processing.remove(key);
        if s.dirty.contains(key) {
            s.queue.push_back(key.clone());
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Runs `workers` workers that reconcile keys with `f` until the process ends. `Ok(None)`:
    /// done; `Ok(Some(d))`: look again after `d`; `Err`: logged and retried with backoff.
    pub async fn run<F, Fut>(self: Arc<Self>, name: &'static str, workers: usize, f: F)
    where
        F: Fn(T) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Option<Duration>>> + Send,
    {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers.max(1) {
            let (q, f) = (self.clone(), f.clone());
            set.spawn(async move {
                loop {
                    let key = q.get().await;
                    match f(key.clone()).await {
                        Ok(again) => {
                            q.forget(&key);
                            if let Some(d) = again {
                                q.add_after(key.clone(), d);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(controller = name, key = ?key, error = format!("{e:#}"), "reconcile failed; retrying");
                            q.add_rate_limited(key.clone());
                        }
                    }
                    q.done(&key);
                }
            });
        }
        while set.join_next().await.is_some() {}
    }
}

/// Moves delayed keys into the queue at their deadlines (earliest deadline per key wins).
async fn delay_loop<T>(
    queue: std::sync::Weak<Queue<T>>,
    mut rx: mpsc::UnboundedReceiver<(Instant, T)>,
) where
    T: Clone + Eq + Hash + Ord + Debug + Send + Sync + 'static,
{
    let mut by_time: BTreeMap<(Instant, T), ()> = BTreeMap::new();
    let mut deadline_of: HashMap<T, Instant> = HashMap::new();
    loop {
        let next = by_time.keys().next().map(|(t, _)| *t);
        let msg = match next {
            Some(t) => tokio::select! {
                m = rx.recv() => m,
                () = tokio::time::sleep_until(t) => {
                    let now = Instant::now();
                    let Some(q) = queue.upgrade() else { return };
                    while let Some(((t, _), ())) = by_time.first_key_value() {
                        if *t > now {
                            break;
                        }
                        let ((_, k), ()) = by_time.pop_first().expect("non-empty");
                        deadline_of.remove(&k);
                        q.add(k);
                    }
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some((at, key)) = msg else { return };
        match deadline_of.get(&key) {
            Some(cur) if *cur <= at => {}
            Some(cur) => {
                by_time.remove(&(*cur, key.clone()));
                deadline_of.insert(key.clone(), at);
                by_time.insert((at, key), ());
            }
            None => {
                deadline_of.insert(key.clone(), at);
                by_time.insert((at, key), ());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn duplicates_fold_and_a_busy_key_waits() {
        let q: Arc<Queue<u32>> = Queue::new();
        q.add(1);
        q.add(1);
        q.add(2);
        assert_eq!(q.len(), 2);
        let k = q.get().await;
        assert_eq!(k, 1);
        q.add(1); // while in progress: not handed to another worker
        assert_eq!(q.get().await, 2);
        assert!(q.is_empty());
        q.done(&1);
        assert_eq!(q.get().await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn delays_keep_the_earliest_deadline_and_failures_back_off() {
        let q: Arc<Queue<u32>> = Queue::new();
        q.add_after(7, Duration::from_secs(10));
        q.add_after(7, Duration::from_secs(2));
        tokio::task::yield_now().await;
        let start = Instant::now();
        assert_eq!(q.get().await, 7);
        assert_eq!(start.elapsed().as_secs(), 2);
        q.done(&7);
        // Once handed out, the later deadline is gone too.
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(q.is_empty());

        let start = Instant::now();
        q.add_rate_limited(9);
        assert_eq!(q.get().await, 9);
        q.done(&9);
        assert_eq!(start.elapsed(), Duration::from_millis(800));
        q.add_rate_limited(9);
        assert_eq!(q.get().await, 9);
        q.done(&9);
        assert_eq!(start.elapsed(), Duration::from_millis(800 + 1600));
        q.forget(&9);
        q.add_rate_limited(9);
        let before = Instant::now();
        q.get().await;
        assert_eq!(before.elapsed(), Duration::from_millis(800));
    }
}
