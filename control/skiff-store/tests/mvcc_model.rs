//! Property test: random histories of puts, deletes, compare-and-swaps, prefix deletes and
//! compactions, applied to the store and to a plain in-memory model of etcd's semantics. After
//! every step, reads at every readable revision and the event log from every watchable revision
//! must match the model.

use std::collections::BTreeMap;

use proptest::prelude::*;
use skiff_store::{EventKind, Mvcc, Op, RangeRequest, StoreError, Txn};

#[derive(Clone, Debug)]
enum Step {
    Put(usize, u8),
    Delete(usize),
    /// Update key `.0` comparing against its true mod revision when `.1`, else a wrong one.
    Cas(usize, bool, u8),
    DeletePrefix(usize),
    /// Compact at this fraction (0..=100 %) of the way from compacted to current.
    Compact(u8),
}

const KEYS: &[&str] = &["/m/a", "/m/a/x", "/m/ab", "/m/b", "/m/b/y", "/m/c"];
const PREFIXES: &[&str] = &["/m/a", "/m/a/", "/m/b/", "/m/"];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..KEYS.len(), any::<u8>()).prop_map(|(k, v)| Step::Put(k, v)),
        2 => (0..KEYS.len()).prop_map(Step::Delete),
        2 => (0..KEYS.len(), any::<bool>(), any::<u8>()).prop_map(|(k, ok, v)| Step::Cas(k, ok, v)),
        1 => (0..PREFIXES.len()).prop_map(Step::DeletePrefix),
        1 => (0u8..=100).prop_map(Step::Compact),
    ]
}

/// (value, create revision, version) of a live key.
type Live = (Vec<u8>, u64, u64);
/// (revision, kind, key, value, previous value) of an event.
type Ev = (u64, EventKind, Vec<u8>, Vec<u8>, Option<Vec<u8>>);
/// (key, value, create revision, mod revision, version) of a read.
type Row = (Vec<u8>, Vec<u8>, u64, u64, u64);

#[derive(Default)]
struct Model {
    rev: u64,
    compacted: u64,
    /// key -> [(revision, Some(live) | None = deleted)]
    history: BTreeMap<Vec<u8>, Vec<(u64, Option<Live>)>>,
    /// (revision, kind, key, value, prev value)
    events: Vec<Ev>,
}

impl Model {
    fn live(&self, key: &[u8], at: u64) -> Option<(u64, Live)> {
        self.history
            .get(key)?
            .iter()
            .rev()
            .find(|(r, _)| *r <= at)
            .and_then(|(r, l)| l.clone().map(|l| (*r, l)))
    }

    fn state(&self, at: u64) -> Vec<Row> {
        self.history
            .keys()
            .filter_map(|k| {
                self.live(k, at)
                    .map(|(m, (v, c, ver))| (k.clone(), v, c, m, ver))
            })
            .collect()
    }

    fn put(&mut self, key: &[u8], value: Vec<u8>) {
        let rev = self.rev + 1;
        let prev = self.live(key, self.rev);
        let (create, version) = prev.as_ref().map_or((rev, 1), |(_, (_, c, v))| (*c, v + 1));
        self.history
            .entry(key.to_vec())
            .or_default()
            .push((rev, Some((value.clone(), create, version))));
        self.events.push((
            rev,
            EventKind::Put,
            key.to_vec(),
            value,
            prev.map(|p| p.1.0),
        ));
        self.rev = rev;
    }

    /// Deletes the live keys, all at one new revision; no revision if none is live.
    fn delete(&mut self, keys: &[Vec<u8>]) {
        let rev = self.rev + 1;
        let mut any = false;
        for k in keys {
            if let Some((_, (v, _, _))) = self.live(k, self.rev) {
                self.history.entry(k.clone()).or_default().push((rev, None));
                self.events
                    .push((rev, EventKind::Delete, k.clone(), Vec::new(), Some(v)));
                any = true;
            }
        }
        if any {
            self.rev = rev;
        }
    }
}

fn check(m: &Mvcc, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(m.revision(), model.rev);
    for at in model.compacted.max(1)..=model.rev {
        let got: Vec<_> = m
            .range(&RangeRequest::prefix("/m/").at(at))
            .map_err(|e| TestCaseError::fail(format!("range at {at}: {e}")))?
            .kvs
            .into_iter()
            .map(|kv| {
                (
                    kv.key,
                    kv.value,
                    kv.create_revision,
                    kv.mod_revision,
                    kv.version,
                )
            })
            .collect();
        prop_assert_eq!(got, model.state(at), "state at revision {}", at);
    }
    if model.compacted > 1 {
        let below = m.range(&RangeRequest::prefix("/m/").at(model.compacted - 1));
        prop_assert!(
            matches!(below, Err(StoreError::Compacted { .. })),
            "{:?}",
            below
        );
    }
    // The event log from every watchable revision, via a synchronous replay.
    for from in model.compacted + 1..=model.rev + 1 {
        let got = replay(m, from)?;
        let want: Vec<_> = model
            .events
            .iter()
            .filter(|e| e.0 >= from)
            .cloned()
            .collect();
        prop_assert_eq!(got, want, "events from {}", from);
    }
    Ok(())
}

fn replay(m: &Mvcc, from: u64) -> Result<Vec<Ev>, TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        use futures::StreamExt;
        let mut w = m.watch(RangeRequest::prefix("/m/"), from, None);
        let mut out = Vec::new();
        if from > m.revision() {
            return Ok(out);
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        while out.last().is_none_or(|l: &Ev| l.0 < m.revision()) {
            let ev = tokio::time::timeout_at(deadline, w.next())
                .await
                .map_err(|_| {
                    TestCaseError::fail(format!("replay from {from} stalled after {out:?}"))
                })?
                .ok_or_else(|| TestCaseError::fail("watch ended"))?
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let skiff_store::WatchEvent::Events(evs) = ev {
                for e in evs {
                    out.push((
                        e.kv.mod_revision,
                        e.kind,
                        e.kv.key,
                        e.kv.value,
                        e.prev_kv.map(|p| p.value),
                    ));
                }
            }
        }
        Ok(out)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(steps in proptest::collection::vec(step(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Mvcc::open(&dir.path().join("s.redb")).expect("open");
        let mut model = Model::default();
        for s in steps {
            match s {
                Step::Put(k, v) => {
                    m.txn(&Txn::put(KEYS[k], vec![v])).expect("put");
                    model.put(KEYS[k].as_bytes(), vec![v]);
                }
                Step::Delete(k) => {
                    m.txn(&Txn { success: vec![Op::Delete { key: KEYS[k].into() }], ..Txn::default() })
                        .expect("delete");
                    model.delete(&[KEYS[k].as_bytes().to_vec()]);
                }
                Step::Cas(k, right, v) => {
                    let cur = model.live(KEYS[k].as_bytes(), model.rev).map_or(0, |(r, _)| r);
                    let expected = if right { cur } else { cur + 1000 };
                    let r = m.txn(&Txn::update(KEYS[k], vec![v], expected)).expect("cas");
                    prop_assert_eq!(r.succeeded, right);
                    if right {
                        model.put(KEYS[k].as_bytes(), vec![v]);
                    }
                }
                Step::DeletePrefix(p) => {
                    m.txn(&Txn {
                        success: vec![Op::DeletePrefix { prefix: PREFIXES[p].into() }],
                        ..Txn::default()
                    })
                    .expect("delete prefix");
                    let victims: Vec<Vec<u8>> = model
                        .history
                        .keys()
                        .filter(|k| k.starts_with(PREFIXES[p].as_bytes()))
                        .cloned()
                        .collect();
                    model.delete(&victims);
                }
                Step::Compact(pct) => {
                    let target = model.compacted + (model.rev - model.compacted) * pct as u64 / 100;
                    m.compact(target).expect("compact");
                    model.compacted = model.compacted.max(target);
                }
            }
            check(&m, &model)?;
        }
    }
}
