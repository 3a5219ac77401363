//! The scheduling queue, as kube-scheduler's `PriorityQueue`: pods wait in an active heap
//! ordered by priority, then by arrival; a pod that did not fit waits among the unschedulable
//! ones until the cluster changes (a node added or updated, a pod deleted or finished), then
//! goes back to the active heap once its backoff (1 s doubling to 10 s per attempt) has
//! passed. Pods unschedulable for 5 minutes are retried anyway.

use std::{
    cmp::Reverse,
    collections::{BTreeSet, BinaryHeap, HashMap, HashSet},
    sync::Mutex,
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

/// First retry delay after a failed attempt.
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a pod waits among the unschedulable without a cluster change.
pub const MAX_UNSCHEDULABLE: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
struct State {
    /// (priority, earlier first, uid).
    active: BinaryHeap<(i32, Reverse<u64>, String)>,
    queued: HashSet<String>,
    /// uid → (priority, since).
    unschedulable: HashMap<String, (i32, Instant)>,
    /// (ready at, uid) with the uid's priority.
    backoff: BTreeSet<(Instant, String)>,
    backoff_of: HashMap<String, (Instant, i32)>,
    attempts: HashMap<String, u32>,
    seq: u64,
    /// Cluster changes so far (a pod whose cycle began before the latest one is retried).
    moves: u64,
}

/// The queue of pods to schedule, by uid.
#[derive(Debug, Default)]
pub struct SchedulingQueue {
    state: Mutex<State>,
    notify: Notify,
}

impl SchedulingQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a new or changed pod for an attempt now.
    pub fn add(&self, uid: &str, priority: i32) {
        let mut s = self.lock();
        s.unschedulable.remove(uid);
        if let Some((at, _)) = s.backoff_of.remove(uid) {
            s.backoff.remove(&(at, uid.to_string()));
        }
        if s.queued.insert(uid.to_string()) {
            s.seq += 1;
            let seq = s.seq;
            s.active.push((priority, Reverse(seq), uid.to_string()));
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Forgets a pod (deleted, or bound by someone else).
    pub fn remove(&self, uid: &str) {
        let mut s = self.lock();
        s.queued.remove(uid);
        s.unschedulable.remove(uid);
        s.attempts.remove(uid);
        if let Some((at, _)) = s.backoff_of.remove(uid) {
            s.backoff.remove(&(at, uid.to_string()));
        }
    }

    /// Records a failed attempt: the pod waits for a cluster change. `cycle` is what
    /// [`SchedulingQueue::pop`] returned with the pod: if the cluster changed since, the pod
    /// only backs off (the change may be what it needed).
    pub fn unschedulable(&self, uid: &str, priority: i32, cycle: u64) {
        let mut s = self.lock();
        *s.attempts.entry(uid.to_string()).or_default() += 1;
        if s.moves > cycle {
            let at = Instant::now() + backoff(s.attempts[uid]);
            s.backoff.insert((at, uid.to_string()));
            s.backoff_of.insert(uid.to_string(), (at, priority));
            drop(s);
            self.notify.notify_one();
        } else {
            s.unschedulable
                .insert(uid.to_string(), (priority, Instant::now()));
        }
    }

    /// Records a failed attempt for a passing reason (a binding error): retried after backoff.
    pub fn retry(&self, uid: &str, priority: i32) {
        let mut s = self.lock();
        *s.attempts.entry(uid.to_string()).or_default() += 1;
        let at = Instant::now() + backoff(s.attempts[uid]);
        s.backoff.insert((at, uid.to_string()));
        s.backoff_of.insert(uid.to_string(), (at, priority));
        drop(s);
        self.notify.notify_one();
    }

    /// A cluster change: every unschedulable pod is tried again (after its backoff).
    pub fn cluster_changed(&self) {
        let mut s = self.lock();
        s.moves += 1;
        if s.unschedulable.is_empty() {
            return;
        }
        let moved: Vec<(String, i32)> = s.unschedulable.drain().map(|(u, (p, _))| (u, p)).collect();
        for (uid, priority) in moved {
            let at = Instant::now() + backoff(s.attempts.get(&uid).copied().unwrap_or(0));
            s.backoff.insert((at, uid.clone()));
            s.backoff_of.insert(uid, (at, priority));
        }
        drop(s);
        self.notify.notify_one();
    }

    /// How many pods wait in each part: (active, backoff, unschedulable).
    pub fn lens(&self) -> (usize, usize, usize) {
        let s = self.lock();
        (s.queued.len(), s.backoff.len(), s.unschedulable.len())
    }

    /// Moves due pods into the active heap; returns when the next backoff ends.
    fn flush(s: &mut State) -> Option<Instant> {
        let now = Instant::now();
        while let Some((at, uid)) = s.backoff.first().cloned() {
            if at > now {
                break;
            }
            s.backoff.pop_first();
            if let Some((_, priority)) = s.backoff_of.remove(&uid)
                && s.queued.insert(uid.clone())
            {
                s.seq += 1;
                let seq = s.seq;
                s.active.push((priority, Reverse(seq), uid));
            }
        }
        let stale: Vec<String> = s
            .unschedulable
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) >= MAX_UNSCHEDULABLE)
            .map(|(u, _)| u.clone())
            .collect();
        for uid in stale {
            if let Some((priority, _)) = s.unschedulable.remove(&uid)
                && s.queued.insert(uid.clone())
            {
                s.seq += 1;
                let seq = s.seq;
                s.active.push((priority, Reverse(seq), uid));
            }
        }
        let next_unschedulable = s
            .unschedulable
            .values()
            .map(|(_, since)| *since + MAX_UNSCHEDULABLE)
            .min();
        match (s.backoff.first().map(|(at, _)| *at), next_unschedulable) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes the highest-priority pod ready for an attempt, waiting for one; with it, the
    /// cluster-change count to pass back to [`SchedulingQueue::unschedulable`].
    pub async fn pop(&self) -> (String, u64) {
        loop {
            let notified = self.notify.notified();
            let next = {
                let mut s = self.lock();
                let next = Self::flush(&mut s);
                while let Some((_, _, uid)) = s.active.pop() {
                    if s.queued.remove(&uid) {
                        return (uid, s.moves);
                    }
                }
                next
            };
            match next {
                Some(at) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

fn backoff(attempts: u32) -> Duration {
    if attempts == 0 {
        return Duration::ZERO;
    }
    INITIAL_BACKOFF
        .saturating_mul(1 << (attempts - 1).min(8))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn priority_first_then_arrival() {
        let q = SchedulingQueue::default();
        q.add("low-1", 0);
        q.add("high", 100);
        q.add("low-2", 0);
        q.add("low-1", 0); // already queued
        assert_eq!(q.pop().await.0, "high");
        assert_eq!(q.pop().await.0, "low-1");
        assert_eq!(q.pop().await.0, "low-2");
    }

    #[tokio::test(start_paused = true)]
    async fn unschedulable_pods_wait_for_a_change_then_back_off() {
        let q = SchedulingQueue::default();
        q.add("p", 0);
        let (_, cycle) = q.pop().await;
        q.unschedulable("p", 0, cycle);
        assert_eq!(q.lens(), (0, 0, 1));
        let start = Instant::now();
        q.cluster_changed();
        let (_, cycle) = q.pop().await;
        assert_eq!(start.elapsed(), INITIAL_BACKOFF);
        q.unschedulable("p", 0, cycle);
        let start = Instant::now();
        q.cluster_changed();
        let (_, cycle) = q.pop().await;
        assert_eq!(start.elapsed(), 2 * INITIAL_BACKOFF);
        // Without a change, five minutes.
        q.unschedulable("p", 0, cycle);
        let start = Instant::now();
        let (_, cycle) = q.pop().await;
        assert_eq!(start.elapsed(), MAX_UNSCHEDULABLE);
        // A change during the cycle: back off only.
        q.cluster_changed();
        q.unschedulable("p", 0, cycle);
        let start = Instant::now();
        let (_, cycle) = q.pop().await;
        assert_eq!(start.elapsed(), 8 * INITIAL_BACKOFF);
        // A pod update (add) goes straight back.
        q.unschedulable("p", 0, cycle);
        q.add("p", 0);
        assert_eq!(q.pop().await.0, "p");
    }
}
