//! A linearizability checker for histories of register operations (Wing & Gong's search with
//! Lowe's memoization, as in Porcupine/Knossos), applied per key (a key-value store is
//! linearizable iff every key's history is).
//!
//! An operation whose outcome the client could not learn (timeout, connection lost, server
//! killed) has no return time: it may take effect at any point after its call, or never.

use std::collections::HashSet;

/// What a client asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// Write a value (values are unique per history).
    Put(u64),
    /// Read.
    Get,
    /// Write `new` if the register holds `expect` (`None` = absent).
    Cas {
        /// Expected value.
        expect: Option<u64>,
        /// New value.
        new: u64,
    },
}

/// What it was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// A put completed.
    Ok,
    /// A read returned this.
    Value(Option<u64>),
    /// A compare-and-set succeeded or not.
    Cas(bool),
    /// Unknown outcome.
    Unknown,
}

/// One operation of one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operation {
    /// The request.
    pub input: Input,
    /// The answer.
    pub output: Output,
    /// When it was sent (any monotonic unit).
    pub call: u64,
    /// When the answer arrived; `None` if it never did.
    pub ret: Option<u64>,
}

type State = Option<u64>;

/// The register's next state if `input` answered `output` in `state` is possible.
fn step(state: State, input: Input, output: Output) -> Option<State> {
    match (input, output) {
        (Input::Put(v), Output::Ok | Output::Unknown) => Some(Some(v)),
        (Input::Get, Output::Value(v)) => (v == state).then_some(state),
        (Input::Get, Output::Unknown) => Some(state),
        (Input::Cas { expect, new }, Output::Cas(true)) => (state == expect).then_some(Some(new)),
        (Input::Cas { expect, .. }, Output::Cas(false)) => (state != expect).then_some(state),
        (Input::Cas { expect, new }, Output::Unknown) => {
            Some(if state == expect { Some(new) } else { state })
        }
        _ => None,
    }
}

/// Whether one register's history (starting absent) is linearizable.
pub fn check(history: &[Operation]) -> bool {
    let n = history.len();
    let words = n.div_ceil(64).max(1);
    let mut done = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, State)> = HashSet::new();
    search(history, &mut done, None, 0, &mut seen)
}

fn is_done(done: &[u64], i: usize) -> bool {
    done[i / 64] & (1 << (i % 64)) != 0
}

fn search(
    h: &[Operation],
    done: &mut Vec<u64>,
    state: State,
    count: usize,
    seen: &mut HashSet<(Vec<u64>, State)>,
) -> bool {
    if count == h.len() {
        return true;
    }
    if !seen.insert((done.clone(), state)) {
        return false;
    }
    // An operation may go next only if no pending operation returned before it was called.
    let horizon = (0..h.len())
        .filter(|&i| !is_done(done, i))
        .filter_map(|i| h[i].ret)
        .min()
        .unwrap_or(u64::MAX);
    for i in 0..h.len() {
        if is_done(done, i) || h[i].call > horizon {
            continue;
        }
        if let Some(next) = step(state, h[i].input, h[i].output) {
            done[i / 64] |= 1 << (i % 64);
            if search(h, done, next, count + 1, seen) {
                return true;
            }
            done[i / 64] &= !(1 << (i % 64));
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(input: Input, output: Output, call: u64, ret: u64) -> Operation {
        Operation {
            input,
            output,
            call,
            ret: Some(ret),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            op(Input::Put(1), Output::Ok, 0, 1),
            op(Input::Get, Output::Value(Some(1)), 2, 3),
            op(
                Input::Cas {
                    expect: Some(1),
                    new: 2,
                },
                Output::Cas(true),
                4,
                5,
            ),
            op(Input::Get, Output::Value(Some(2)), 6, 7),
        ];
        assert!(check(&h));
    }

    #[test]
    fn stale_read_after_completed_write_is_not() {
        let h = [
            op(Input::Put(1), Output::Ok, 0, 1),
            op(Input::Put(2), Output::Ok, 2, 3),
            op(Input::Get, Output::Value(Some(1)), 4, 5),
        ];
        assert!(!check(&h));
    }

    #[test]
    fn concurrent_reads_may_see_either_order() {
        let h = [
            op(Input::Put(1), Output::Ok, 0, 10),
            op(Input::Get, Output::Value(None), 1, 2),
            op(Input::Get, Output::Value(Some(1)), 3, 4),
        ];
        assert!(check(&h));
        // …but not go back in time.
        let h = [
            op(Input::Put(1), Output::Ok, 0, 10),
            op(Input::Get, Output::Value(Some(1)), 1, 2),
            op(Input::Get, Output::Value(None), 3, 4),
        ];
        assert!(!check(&h));
    }

    #[test]
    fn two_successful_cas_from_the_same_value_are_not() {
        let h = [
            op(Input::Put(1), Output::Ok, 0, 1),
            op(
                Input::Cas {
                    expect: Some(1),
                    new: 2,
                },
                Output::Cas(true),
                2,
                5,
            ),
            op(
                Input::Cas {
                    expect: Some(1),
                    new: 3,
                },
                Output::Cas(true),
                2,
                5,
            ),
        ];
        assert!(!check(&h));
    }

    #[test]
    fn unknown_writes_may_apply_late_or_never() {
        let lost = Operation {
            input: Input::Put(9),
            output: Output::Unknown,
            call: 0,
            ret: None,
        };
        let never = [lost, op(Input::Get, Output::Value(None), 5, 6)];
        assert!(check(&never));
        let late = [
            lost,
            op(Input::Get, Output::Value(None), 5, 6),
            op(Input::Get, Output::Value(Some(9)), 7, 8),
        ];
        assert!(check(&late));
        // It cannot be seen before it was sent.
        let early = [
            op(Input::Get, Output::Value(Some(9)), 0, 1),
            Operation { call: 5, ..lost },
        ];
        assert!(!check(&early));
    }

    #[test]
    fn lost_acknowledged_write_is_not() {
        let h = [
            op(Input::Put(1), Output::Ok, 0, 1),
            op(Input::Get, Output::Value(None), 2, 3),
        ];
        assert!(!check(&h));
    }
}
