//! A linearizability checker for one key's history: a register with delete.
//!
//! The model is the store's API on one key: `Put(v)` always succeeds and
//! leaves `v`; `Get` returns the value or nothing; `Delete` answers whether
//! it found a value and leaves nothing. A history is linearizable when every
//! operation can be given one instant between its invoke and its return so
//! that, in that order, each operation's answer is the model's (Herlihy &
//! Wing 1990). Linearizability is compositional, so a store is checked key
//! by key: [`check`] takes one key's operations.
//!
//! The search is Wing & Gong's (1993), with Lowe's memoisation ("Testing for
//! linearizability", Concurrency and Computation 29(4), 2017), as Go's
//! porcupine (github.com/anishathalye/porcupine, `checker.go`) and Knossos's
//! `wgl` checker implement it:
//! * every operation becomes a call and a return event; the events, sorted by
//!   time (calls before returns at equal times, so a tie counts as overlap),
//!   form a doubly linked list;
//! * walking the list, a call whose operation the model accepts in the
//!   current state is *linearised*: the operation's two events are lifted out
//!   of the list, the choice pushed on a stack, and the walk restarts at the
//!   head; reaching a return event means some pending operation had to take
//!   effect before it and none could, so the last choice is undone
//!   (backtracking) and the walk continues after it;
//! * Lowe's cache: the set of linearised operations (a bitset) together with
//!   the model state determines everything that can follow, so a
//!   configuration already explored is never explored again. This is what
//!   keeps a *violating* history cheap: without it (stateright 0.31's tester)
//!   the search is exponential exactly when it has to be exhaustive.
//!
//! An operation whose outcome is unknown (a timeout, a 504, a connection
//! broken after the request was written) may take effect at any instant
//! after its invoke, or never: its return is at +∞ and the model accepts any
//! answer from it. Taking effect "never" is the same as taking effect after
//! everything else, which the search does when only such operations are
//! left. An unknown `Get` constrains nothing and is dropped. Operations that
//! definitely did not take effect (`fail`) are left out by the caller.
//!
//! The search is bounded: each step (one event visited) counts, and past
//! `max_steps` (or past 1 GiB of cache, a bit per operation per
//! configuration) the key is reported [`Verdict::TooLarge`] rather than
//! letting the checker run for hours or out of memory. For a violation, [`minimise`] shrinks the
//! history to a small set of operations that is still not linearizable
//! (greedily dropping one operation at a time, each trial bounded too), so
//! the report names the few operations that contradict each other.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

/// What an operation asked. Values are ids: equal ids, equal values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Put(u32),
    Get,
    Delete,
}

/// What it was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A PUT was acknowledged.
    Stored,
    /// A GET found this value, or nothing (404).
    Read(Option<u32>),
    /// A DELETE found a value (200) or nothing (404).
    Deleted(bool),
    /// No answer that says whether it took effect.
    Unknown,
}

/// One operation on the key. Times are nanoseconds on one clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub client: u64,
    pub input: Input,
    pub output: Output,
    pub invoke: u64,
    /// `None` when the outcome is unknown (the return is at +∞).
    pub ret: Option<u64>,
}

impl Op {
    fn is_unknown(&self) -> bool {
        self.output == Output::Unknown || self.ret.is_none()
    }
}

/// The register's state: the id of its value, or nothing.
type State = Option<u32>;

/// The model's transition: the next state, or `None` when `output` is not
/// what `input` answers in `state`.
fn step(state: State, input: Input, output: Output) -> Option<State> {
    match (input, output) {
        (Input::Put(value), Output::Stored | Output::Unknown) => Some(Some(value)),
        (Input::Get, Output::Read(read)) => (read == state).then_some(state),
        (Input::Get, Output::Unknown) => Some(state),
        (Input::Delete, Output::Deleted(found)) => (found == state.is_some()).then_some(None),
        (Input::Delete, Output::Unknown) => Some(None),
        _ => None,
    }
}

/// The result for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order of the operations is valid.
    Violation,
    /// The search took more than the bound; nothing is known.
    TooLarge,
}

/// A verdict and the steps the search took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub verdict: Verdict,
    pub steps: u64,
}

const NIL: usize = usize::MAX;

/// The event list: node 0 is the head; a call node's `partner` is its
/// return node.
struct Events {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Index into the checked operations.
    op: Vec<usize>,
    /// For a call, its return node; `NIL` for a return.
    partner: Vec<usize>,
}

// why: every index here is a node of this list (`0..=2 * ops.len()`, or a
// `next`/`prev`/`partner` read from it) or an op below `ops.len()` that `new`
// itself numbered: in range by construction, on the search's hottest path.
#[allow(clippy::indexing_slicing)]
impl Events {
    fn new(ops: &[&Op]) -> Self {
        // (time, is_return, op): calls sort before returns at equal times.
        let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate() {
            let ret = match op.ret {
                Some(ret) if !op.is_unknown() => ret.max(op.invoke),
                _ => u64::MAX,
            };
            order.push((op.invoke, false, i));
            order.push((ret, true, i));
        }
        order.sort_unstable();
        let nodes = order.len() + 1;
        let mut events = Events {
            next: (1..=nodes)
                .map(|n| if n == nodes { NIL } else { n })
                .collect(),
            prev: (0..nodes).map(|n| n.wrapping_sub(1)).collect(),
            op: vec![NIL; nodes],
            partner: vec![NIL; nodes],
        };
        events.prev[0] = NIL;
        let mut call_node = vec![NIL; ops.len()];
        for (position, &(_, is_return, op)) in order.iter().enumerate() {
            let node = position + 1;
            events.op[node] = op;
            if is_return {
                events.partner[call_node[op]] = node;
            } else {
                call_node[op] = node;
            }
        }
        events
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    /// Undoes `unlink(node)`; the node still holds its neighbours.
    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        if next != NIL {
            self.prev[next] = node;
        }
    }

    /// Removes a call and its return.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.partner[call]);
    }

    /// Puts them back, in the reverse order.
    fn unlift(&mut self, call: usize) {
        self.relink(self.partner[call]);
        self.relink(call);
    }
}

/// A set of operation indices.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Box<[u64]>);

// why: `set`/`clear` take an index below the `len` the set was made for
// (`check` sizes `known` by the ops, `unknown` by their count of unknown).
#[allow(clippy::indexing_slicing)]
impl Bits {
    fn new(len: usize) -> Self {
        Bits(vec![0; len.div_ceil(64)].into_boxed_slice())
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    fn is_subset_of(&self, other: &Bits) -> bool {
        self.0.iter().zip(other.0.iter()).all(|(a, b)| a & !b == 0)
    }
}

/// Lowe's cache of configurations explored (or being explored), with
/// subsumption for unknown operations: a configuration that linearised
/// *fewer* unknown operations, with the same known ones and the same state,
/// can do everything this one can (the extra pending ones may never take
/// effect and, returning at +∞, never block), so when it was explored (or
/// is being explored: it reaches success without linearising the extra
/// ones, since the search ends when no known operation is left) this one
/// needs no search. Each pending unknown operation can double the
/// configurations (20 timeouts in 1,000 operations of 8 overlapping clients
/// make a late violation cost over 10 million steps, where ~100 thousand
/// suffice without them); the search tries linearising an unknown operation
/// before leaving it out, so this prunes only part of that (measured: 4%).
#[derive(Default)]
struct Cache {
    seen: HashMap<(Bits, State), Vec<Bits>>,
    /// Roughly what the entries take: a bitset of the key's operations
    /// each, plus the map's own overhead.
    bytes: usize,
}

/// Most memory one key's cache may take before the key is reported too
/// large: each entry holds a bit per operation, so a key with 100,000
/// operations would need ~12 KB per configuration.
pub(crate) const MAX_CACHE_BYTES: usize = 1 << 30;

impl Cache {
    /// Records the configuration; false if it (or one subsuming it) was
    /// already there.
    fn insert(&mut self, known: Bits, unknown: Bits, state: State) -> bool {
        let size = 8 * (known.0.len() + unknown.0.len()) + 96;
        let variants = self.seen.entry((known, state)).or_default();
        if variants.iter().any(|seen| seen.is_subset_of(&unknown)) {
            return false;
        }
        variants.push(unknown);
        self.bytes += size;
        true
    }
}

/// Checks one key's operations, visiting at most `max_steps` events.
// why: the search indexes `events` by nodes read from it, and `ops`/`rank`
// by the op numbers `Events::new` gave out (below `ops.len()`): in range by
// construction, in the loop that runs up to `max_steps` times.
#[allow(clippy::indexing_slicing)]
pub fn check(ops: &[Op], max_steps: u64) -> Checked {
    // An unknown GET could have read anything, or nothing: no constraint.
    let ops: Vec<&Op> = ops
        .iter()
        .filter(|op| !(op.input == Input::Get && op.is_unknown()))
        .collect();
    let mut events = Events::new(&ops);
    // The linearised set, split: known operations in `known`, unknown ones
    // (by their rank among the unknown) in `unknown`.
    let mut rank = vec![NIL; ops.len()];
    let mut unknown_count = 0;
    for (i, op) in ops.iter().enumerate() {
        if op.is_unknown() {
            rank[i] = unknown_count;
            unknown_count += 1;
        }
    }
    let mut known = Bits::new(ops.len());
    // Known operations not linearised yet: the search succeeds at 0, as
    // unknown operations may never take effect.
    let mut known_left = ops.len() - unknown_count;
    let mut unknown = Bits::new(unknown_count);
    let mut cache = Cache::default();
    // The linearised calls, the state before each, and whether the choice
    // was forced (see `preserves_state`).
    let mut stack: Vec<(usize, State, bool)> = Vec::new();
    let mut state: State = None;
    let mut entry = events.next[0];
    let mut steps = 0u64;
    let set = |known: &mut Bits, unknown: &mut Bits, op: usize, on: bool| {
        let (bits, i) = if rank[op] == NIL {
            (known, op)
        } else {
            (unknown, rank[op])
        };
        if on {
            bits.set(i);
        } else {
            bits.clear(i);
        }
    };
    while known_left > 0 {
        steps += 1;
        if steps > max_steps || cache.bytes > MAX_CACHE_BYTES {
            return Checked {
                verdict: Verdict::TooLarge,
                steps,
            };
        }
        // The list always ends with a return, so `NIL` is not reached
        // while it holds events; treated as a return all the same.
        let is_call = entry != NIL && events.partner[entry] != NIL;
        if is_call {
            let op = events.op[entry];
            let forced = preserves_state(ops[op]);
            if let Some(next_state) = step(state, ops[op].input, ops[op].output) {
                let (mut next_known, mut next_unknown) = (known.clone(), unknown.clone());
                set(&mut next_known, &mut next_unknown, op, true);
                if cache.insert(next_known, next_unknown, next_state) {
                    stack.push((entry, state, forced));
                    state = next_state;
                    set(&mut known, &mut unknown, op, true);
                    if rank[op] == NIL {
                        known_left -= 1;
                    }
                    events.lift(entry);
                    entry = events.next[0];
                    continue;
                }
                if !forced {
                    entry = events.next[entry];
                    continue;
                }
                // A forced move into an explored configuration: this one
                // fails as that one did; fall through to backtrack.
            } else {
                entry = events.next[entry];
                continue;
            }
        }
        // A return (or a dead forced move): an operation pending here had
        // to come first. Undo the last free choice and try the next call
        // after it; forced moves on the way are undone too.
        loop {
            let Some((call, before, forced)) = stack.pop() else {
                return Checked {
                    verdict: Verdict::Violation,
                    steps,
                };
            };
            state = before;
            set(&mut known, &mut unknown, events.op[call], false);
            if rank[events.op[call]] == NIL {
                known_left += 1;
            }
            events.unlift(call);
            if !forced {
                entry = events.next[call];
                break;
            }
        }
    }
    Checked {
        verdict: Verdict::Linearizable,
        steps,
    }
}

/// Whether an operation never changes the state when it is valid: a known
/// read, or a delete that found nothing. Such an operation, once callable
/// (everything that returned before it began is linearised) and valid in the
/// current state, can be linearised at once without losing any solution: in
/// any valid order from here, moving it to the front keeps every other
/// operation's state and every real-time constraint (those ahead of it are
/// already placed). So it is no choice point, and when the search from it
/// fails, the configuration before it fails too. This partial-order
/// reduction keeps concurrent readers from multiplying the search.
fn preserves_state(op: &Op) -> bool {
    matches!(
        (op.input, op.output),
        (Input::Get, Output::Read(_)) | (Input::Delete, Output::Deleted(false))
    )
}

/// How many checks' worth of steps [`minimise`] may spend in all.
const MINIMISE_BUDGET: u64 = 20;

/// Shrinks a violating history to a few operations that are still not
/// linearizable: first the operations invoked before the earliest return
/// that the search could not pass, then dropping one operation at a time
/// while the rest still violates. Returns indices into `ops`, by invoke
/// time. Each trial is bounded by `max_steps`; a trial that runs out keeps
/// the operation, and all trials share a budget of `MINIMISE_BUDGET`
/// checks, after which the set found so far is returned. Above `max_ops`
/// operations after the first cut, only the cut is returned (greedy
/// shrinking is quadratic).
pub fn minimise(ops: &[Op], max_steps: u64, max_ops: usize) -> Vec<usize> {
    // All trials together get a few times one check's bound.
    let budget = std::cell::Cell::new(max_steps.saturating_mul(MINIMISE_BUDGET));
    let violates = |subset: &[usize]| {
        let left = budget.get();
        if left == 0 {
            return false;
        }
        let chosen: Vec<Op> = subset.iter().filter_map(|&i| ops.get(i)).cloned().collect();
        let checked = check(&chosen, max_steps.min(left));
        budget.set(left.saturating_sub(checked.steps));
        checked.verdict == Verdict::Violation
    };
    // A subset keeps the puts of every value its gets returned: without
    // them any such get would be "a value never written", a violation of
    // the subset that the whole history does not have.
    let close = |subset: &mut Vec<usize>| {
        let read: HashSet<u32> = subset
            .iter()
            .filter_map(|&i| match ops.get(i)?.output {
                Output::Read(Some(v)) => Some(v),
                _ => None,
            })
            .collect();
        for (i, op) in ops.iter().enumerate() {
            if matches!(op.input, Input::Put(v) if read.contains(&v)) && !subset.contains(&i) {
                subset.push(i);
            }
        }
        subset.sort_by_key(|&i| (ops.get(i).map(|op| op.invoke), i));
    };
    // Indices of `ops` (so every `get` above finds its op), by invoke time.
    let mut by_invoke: Vec<usize> = (0..ops.len()).collect();
    by_invoke.sort_by_key(|&i| (ops.get(i).map(|op| op.invoke), i));
    // The shortest prefix (by invoke) that already violates: found by
    // doubling, then bisecting, so it costs O(log n) checks.
    let prefix = |len: usize| {
        let mut subset: Vec<usize> = by_invoke.iter().take(len).copied().collect();
        close(&mut subset);
        subset
    };
    let mut high = 1usize.min(by_invoke.len());
    while high < by_invoke.len() && !violates(&prefix(high)) {
        high = (high * 2).min(by_invoke.len());
    }
    let mut low = high / 2;
    while low + 1 < high {
        let mid = (low + high) / 2;
        if violates(&prefix(mid)) {
            high = mid;
        } else {
            low = mid;
        }
    }
    let mut keep = prefix(high);
    if keep.len() > max_ops {
        return keep;
    }
    // A put is only droppable once the gets that read it are gone, so
    // repeat the passes until one drops nothing.
    loop {
        let before = keep.len();
        let mut i = 0;
        while i < keep.len() {
            let mut without = keep.clone();
            let dropped = without.remove(i);
            close(&mut without);
            if !without.contains(&dropped) && !without.is_empty() && violates(&without) {
                keep = without;
            } else {
                i += 1;
            }
        }
        if keep.len() == before {
            break;
        }
    }
    keep
}

/// Seconds with nanoseconds, e.g. `1.250000000s`.
pub fn format_time(ns: u64) -> String {
    format!("{}.{:09}s", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// One operation in words: `get by client 3 at t=1.2s..1.3s returned "v"`.
pub fn describe_op(op: &Op, values: &[String]) -> String {
    let value = |id: u32| {
        values
            .get(id as usize)
            .map_or_else(|| format!("#{id}"), |v| shorten(v))
    };
    let what = match op.input {
        Input::Put(v) => format!("put {}", value(v)),
        Input::Get => "get".to_owned(),
        Input::Delete => "delete".to_owned(),
    };
    let when = match op.ret {
        Some(ret) if !op.is_unknown() => {
            format!("t={}..{}", format_time(op.invoke), format_time(ret))
        }
        _ => format!("t={}..(unknown outcome)", format_time(op.invoke)),
    };
    let answer = match op.output {
        Output::Stored => "acknowledged".to_owned(),
        Output::Read(Some(v)) => format!("returned {}", value(v)),
        Output::Read(None) => "found nothing".to_owned(),
        Output::Deleted(true) => "deleted a value".to_owned(),
        Output::Deleted(false) => "found nothing to delete".to_owned(),
        Output::Unknown => "outcome unknown".to_owned(),
    };
    format!("{what} by client {} at {when} {answer}", op.client)
}

/// A minimal violation in words: the last observing operation (a get or a
/// delete), what it saw, and how each other operation stands to it, e.g.
/// `get by client 2 at t=… returned "v1", but put "v2" by client 1 was
/// acknowledged at t=… before it began`.
pub fn describe_violation(ops: &[Op], involved: &[usize], values: &[String]) -> String {
    // Indices that name no operation (never given by `minimise`) are left out.
    let mut involved: Vec<(usize, &Op)> = involved
        .iter()
        .filter_map(|&i| ops.get(i).map(|op| (i, op)))
        .collect();
    involved.sort_by_key(|&(i, op)| (op.invoke, i));
    let observer = involved
        .iter()
        .rev()
        .copied()
        .find(|(_, op)| matches!(op.output, Output::Read(_) | Output::Deleted(_)))
        .or_else(|| involved.last().copied());
    let Some((observer, seen)) = observer else {
        return "no operations".to_owned();
    };
    let mut text = describe_op(seen, values);
    let others: Vec<&Op> = involved
        .into_iter()
        .filter(|&(i, _)| i != observer)
        .map(|(_, op)| op)
        .collect();
    if others.is_empty() {
        text.push_str(match seen.output {
            Output::Read(Some(_)) => ", which no put wrote",
            Output::Deleted(true) => ", but no put wrote a value",
            _ => ", which no order explains",
        });
        return text;
    }
    text.push_str(", but");
    let shown = others.len().min(DESCRIBED);
    for (n, &other) in others.iter().skip(others.len() - shown).enumerate() {
        let what = match other.input {
            Input::Put(v) => format!(
                "put {}",
                values
                    .get(v as usize)
                    .map_or_else(|| format!("#{v}"), |v| shorten(v))
            ),
            Input::Get => "get".to_owned(),
            Input::Delete => "delete".to_owned(),
        };
        let result = match other.output {
            Output::Stored => String::new(),
            Output::Read(Some(v)) => format!(
                " (returned {})",
                values
                    .get(v as usize)
                    .map_or_else(|| format!("#{v}"), |v| shorten(v))
            ),
            Output::Read(None) => " (found nothing)".to_owned(),
            Output::Deleted(true) => " (deleted a value)".to_owned(),
            Output::Deleted(false) => " (found nothing)".to_owned(),
            Output::Unknown => " (outcome unknown)".to_owned(),
        };
        let _ = write!(
            text,
            "{} {what} by client {}{result}",
            if n == 0 { "" } else { ";" },
            other.client
        );
        match other.ret {
            Some(ret) if !other.is_unknown() && ret < seen.invoke => {
                let _ = write!(
                    text,
                    " was acknowledged at t={} before it began",
                    format_time(ret)
                );
            }
            Some(ret) if !other.is_unknown() => {
                let _ = write!(
                    text,
                    " ran at t={}..{}, overlapping it",
                    format_time(other.invoke),
                    format_time(ret)
                );
            }
            _ => {
                let _ = write!(
                    text,
                    " was sent at t={} (outcome unknown)",
                    format_time(other.invoke)
                );
            }
        }
    }
    if others.len() > shown {
        let _ = write!(
            text,
            "; and {} earlier operations (no smaller contradiction found within the work bound)",
            others.len() - shown
        );
    }
    text
}

/// Most operations a violation names besides the one that observed it.
const DESCRIBED: usize = 6;

fn shorten(value: &str) -> String {
    if value.chars().count() > 40 {
        format!("{}…", value.chars().take(40).collect::<String>())
    } else {
        value.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: u64 = 1_000_000;

    fn put(client: u64, value: u32, invoke: u64, ret: u64) -> Op {
        Op {
            client,
            input: Input::Put(value),
            output: Output::Stored,
            invoke,
            ret: Some(ret),
        }
    }

    fn get(client: u64, read: Option<u32>, invoke: u64, ret: u64) -> Op {
        Op {
            client,
            input: Input::Get,
            output: Output::Read(read),
            invoke,
            ret: Some(ret),
        }
    }

    fn delete(client: u64, found: bool, invoke: u64, ret: u64) -> Op {
        Op {
            client,
            input: Input::Delete,
            output: Output::Deleted(found),
            invoke,
            ret: Some(ret),
        }
    }

    fn unknown_put(client: u64, value: u32, invoke: u64) -> Op {
        Op {
            client,
            input: Input::Put(value),
            output: Output::Unknown,
            invoke,
            ret: None,
        }
    }

    fn verdict(ops: &[Op]) -> Verdict {
        check(ops, BOUND).verdict
    }

    fn values() -> Vec<String> {
        (0..10).map(|i| format!("\"v{i}\"")).collect()
    }

    #[test]
    fn concurrent_puts_and_gets_that_fit_an_order() {
        // Two overlapping puts; readers may see them in either order, but
        // once a reader saw the later one nobody after sees the earlier one.
        let ops = [
            put(1, 1, 0, 100),
            put(2, 2, 10, 90),
            get(3, Some(2), 20, 50),
            get(4, Some(1), 60, 120),
            get(3, Some(1), 130, 140),
        ];
        assert_eq!(verdict(&ops), Verdict::Linearizable);
        // A read of nothing before any put began is fine too.
        let mut with_empty = ops.to_vec();
        with_empty.push(get(5, None, 0, 5));
        assert_eq!(verdict(&with_empty), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_is_a_violation() {
        let ops = [put(1, 1, 0, 10), put(1, 2, 20, 30), get(2, Some(1), 40, 50)];
        assert_eq!(verdict(&ops), Verdict::Violation);
        let involved = minimise(&ops, BOUND, 500);
        assert_eq!(involved, vec![0, 1, 2]);
        let text = describe_violation(&ops, &involved, &values());
        assert!(
            text.starts_with(
                "get by client 2 at t=0.000000040s..0.000000050s returned \"v1\", but"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "put \"v2\" by client 1 was acknowledged at t=0.000000030s before it began"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_lost_acknowledged_write_is_a_violation() {
        let ops = [
            put(1, 1, 0, 10),
            get(2, Some(1), 12, 14),
            put(1, 2, 20, 30),
            get(2, None, 40, 50),
        ];
        assert_eq!(verdict(&ops), Verdict::Violation);
        let involved = minimise(&ops, BOUND, 500);
        // Either put, acknowledged before the get began, is lost.
        assert_eq!(involved.len(), 2, "{involved:?}");
        assert!(involved.contains(&3), "{involved:?}");
        let text = describe_violation(&ops, &involved, &values());
        assert!(text.contains("get by client 2"), "{text}");
        assert!(text.contains("found nothing, but put \"v"), "{text}");
    }

    #[test]
    fn a_read_of_a_value_never_written_is_a_violation() {
        let ops = [
            put(1, 1, 0, 10),
            get(2, Some(7), 5, 15),
            get(2, Some(1), 20, 25),
        ];
        assert_eq!(verdict(&ops), Verdict::Violation);
        let involved = minimise(&ops, BOUND, 500);
        assert_eq!(involved, vec![1]);
        let text = describe_violation(&ops, &involved, &values());
        assert!(
            text.ends_with("returned \"v7\", which no put wrote"),
            "{text}"
        );
    }

    #[test]
    fn an_unknown_put_may_have_taken_effect_or_not() {
        // Seen later: it took effect.
        let seen = [
            put(1, 1, 0, 10),
            unknown_put(1, 2, 20),
            get(2, Some(2), 100, 110),
            get(2, Some(2), 120, 130),
        ];
        assert_eq!(verdict(&seen), Verdict::Linearizable);
        // Never seen: it did not (or is still in flight).
        let unseen = [
            put(1, 1, 0, 10),
            unknown_put(1, 2, 20),
            get(2, Some(1), 100, 110),
            get(2, Some(1), 120, 130),
        ];
        assert_eq!(verdict(&unseen), Verdict::Linearizable);
        // Seen late, after the old value was read again: it took effect
        // between the reads, still fine.
        let late = [
            put(1, 1, 0, 10),
            unknown_put(1, 2, 20),
            get(2, Some(1), 100, 110),
            get(2, Some(2), 120, 130),
        ];
        assert_eq!(verdict(&late), Verdict::Linearizable);
        // But it cannot take effect twice: 2, then 1 again, then 2.
        let twice = [
            put(1, 1, 0, 10),
            unknown_put(1, 2, 20),
            get(2, Some(2), 100, 110),
            get(2, Some(1), 120, 130),
        ];
        assert_eq!(verdict(&twice), Verdict::Violation);
        // Nor before it was sent.
        let early = [
            put(1, 1, 0, 10),
            get(2, Some(2), 12, 15),
            unknown_put(1, 2, 20),
        ];
        assert_eq!(verdict(&early), Verdict::Violation);
    }

    #[test]
    fn a_delete_race() {
        // Two concurrent deletes of one value: only one can find it.
        let both = [
            put(1, 1, 0, 10),
            delete(2, true, 20, 40),
            delete(3, true, 25, 45),
        ];
        assert_eq!(verdict(&both), Verdict::Violation);
        let one = [
            put(1, 1, 0, 10),
            delete(2, true, 20, 40),
            delete(3, false, 25, 45),
        ];
        assert_eq!(verdict(&one), Verdict::Linearizable);
        // A delete racing a put: it may find the value or not, and a read
        // after both must agree with whichever order was taken.
        let raced = [
            put(1, 1, 0, 30),
            delete(2, false, 5, 20),
            get(3, Some(1), 40, 50),
        ];
        assert_eq!(verdict(&raced), Verdict::Linearizable);
        let contradiction = [
            put(1, 1, 0, 30),
            delete(2, false, 5, 20),
            get(3, None, 40, 50),
        ];
        assert_eq!(verdict(&contradiction), Verdict::Violation);
        let found = [
            put(1, 1, 0, 30),
            delete(2, true, 5, 35),
            get(3, None, 40, 50),
        ];
        assert_eq!(verdict(&found), Verdict::Linearizable);
    }

    #[test]
    fn ties_count_as_overlap() {
        // The get began at the instant the put returned: either order.
        assert_eq!(
            verdict(&[put(1, 1, 0, 10), get(2, None, 10, 20)]),
            Verdict::Linearizable
        );
        assert_eq!(
            verdict(&[put(1, 1, 0, 10), get(2, None, 11, 20)]),
            Verdict::Violation
        );
    }

    #[test]
    fn the_work_bound_reports_too_large() {
        let ops: Vec<Op> = (0..50).map(|i| put(i, i as u32, 0, 100)).collect();
        let mut ops = ops;
        ops.push(get(99, Some(1000), 200, 300));
        let checked = check(&ops, 1000);
        assert_eq!(checked.verdict, Verdict::TooLarge);
        assert!(checked.steps > 1000);
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A sequential history from a simulated register: each op runs alone,
    /// answered by the register's real state.
    fn sequential(rng: &mut Rng, len: usize) -> Vec<Op> {
        let mut state: Option<u32> = None;
        let mut next_value = 0u32;
        let mut t = 0u64;
        (0..len)
            .map(|_| {
                let invoke = t + 1 + rng.below(5);
                let ret = invoke + 1 + rng.below(5);
                t = ret;
                let client = rng.below(4);
                match rng.below(3) {
                    0 => {
                        next_value += 1;
                        state = Some(next_value);
                        put(client, next_value, invoke, ret)
                    }
                    1 => get(client, state, invoke, ret),
                    _ => {
                        let found = state.take().is_some();
                        delete(client, found, invoke, ret)
                    }
                }
            })
            .collect()
    }

    #[test]
    fn random_sequential_histories_pass_and_fail_once_a_read_is_mutated() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut mutated_count = 0;
        for round in 0..300 {
            let len = 1 + rng.below(60) as usize;
            let ops = sequential(&mut rng, len);
            assert_eq!(
                verdict(&ops),
                Verdict::Linearizable,
                "round {round}: {ops:?}"
            );
            let reads: Vec<usize> = (0..ops.len())
                .filter(|&i| ops[i].input == Input::Get)
                .collect();
            if reads.is_empty() {
                continue;
            }
            let i = reads[rng.below(reads.len() as u64) as usize];
            let mut bad = ops.clone();
            // Any other answer: another value, a value for an empty
            // register, or nothing for a full one.
            bad[i].output = Output::Read(match ops[i].output {
                Output::Read(Some(_)) if rng.below(2) == 0 => None,
                Output::Read(Some(v)) => Some(v + 1000),
                _ => Some(1 + rng.below(1000) as u32),
            });
            mutated_count += 1;
            assert_eq!(
                verdict(&bad),
                Verdict::Violation,
                "round {round}: read {i} mutated: {bad:?}"
            );
            let involved = minimise(&bad, BOUND, 500);
            assert!(involved.contains(&i), "round {round}: {involved:?}");
            let shown: Vec<&Op> = involved.iter().map(|&j| &bad[j]).collect();

            assert!(involved.len() <= 3, "round {round}: {involved:?} {shown:?}");
        }
        assert!(mutated_count > 100);
    }

    /// The definition, by brute force: some operation that no other
    /// remaining one must precede (by real time) is valid now, and the
    /// rest is linearizable after it; unknown operations may also never
    /// happen. Exponential, so only for a handful of operations; it shares
    /// nothing with `check` but `step`.
    fn brute_force(ops: &[Op], remaining: &mut Vec<usize>, state: State) -> bool {
        if remaining.iter().all(|&i| ops[i].is_unknown()) {
            return true;
        }
        for n in 0..remaining.len() {
            let i = remaining[n];
            let blocked = remaining.iter().any(|&j| {
                j != i && !ops[j].is_unknown() && ops[j].ret.is_some_and(|r| r < ops[i].invoke)
            });
            if blocked {
                continue;
            }
            let Some(next) = step(state, ops[i].input, ops[i].output) else {
                continue;
            };
            remaining.remove(n);
            let found = brute_force(ops, remaining, next);
            remaining.insert(n, i);
            if found {
                return true;
            }
        }
        false
    }

    #[test]
    fn agrees_with_brute_force_on_small_concurrent_histories() {
        // More (e.g. a million) for a soak: KV_ORACLE_ROUNDS, KV_ORACLE_SEED.
        let env = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let mut rng = Rng(env("KV_ORACLE_SEED", 7).max(1));
        let rounds = env("KV_ORACLE_ROUNDS", 3000);
        let (mut passes, mut violations) = (0, 0);
        for round in 0..rounds {
            let len = 1 + rng.below(9) as usize;
            let ops: Vec<Op> = (0..len)
                .map(|_| {
                    let invoke = rng.below(40);
                    let ret = invoke + rng.below(15);
                    let value = rng.below(3) as u32;
                    let (input, output) = match rng.below(3) {
                        0 => (Input::Put(value), Output::Stored),
                        1 => (
                            Input::Get,
                            Output::Read((rng.below(4) != 0).then_some(value)),
                        ),
                        _ => (Input::Delete, Output::Deleted(rng.below(2) == 0)),
                    };
                    let unknown = rng.below(6) == 0;
                    Op {
                        client: rng.below(3),
                        input,
                        output: if unknown { Output::Unknown } else { output },
                        invoke,
                        ret: (!unknown).then_some(ret),
                    }
                })
                .collect();
            let expected = brute_force(&ops, &mut (0..len).collect(), None);
            let got = check(&ops, BOUND).verdict;
            assert_eq!(
                got == Verdict::Linearizable,
                expected,
                "round {round}: {ops:?}"
            );
            if expected {
                passes += 1;
            } else {
                violations += 1;
            }
        }
        // Both sides exercised.
        assert!(
            passes > rounds / 6 && violations > rounds / 6,
            "{passes} / {violations}"
        );
    }

    #[test]
    fn a_thousand_ops_of_eight_concurrent_clients_check_within_a_work_bound() {
        // Eight clients on one key, each op overlapping the others' ops,
        // answered by a register that applies each op at a random instant
        // inside its interval (so the history is linearizable by
        // construction), with some outcomes unknown.
        let mut rng = Rng(42);
        let mut ops = Vec::new();
        let mut clock = [0u64; 8];
        let mut next_value = 0u32;
        // (linearisation instant, client, kind, invoke, ret, unknown)
        let mut planned = Vec::new();
        for _ in 0..1000 {
            let client = rng.below(8) as usize;
            let invoke = clock[client] + 1 + rng.below(50);
            let ret = invoke + 1 + rng.below(200);
            clock[client] = ret;
            let at = invoke + rng.below(ret - invoke);
            planned.push((
                at,
                client as u64,
                rng.below(3),
                invoke,
                ret,
                rng.below(50) == 0,
            ));
        }
        planned.sort_unstable();
        let mut state: Option<u32> = None;
        for (_, client, kind, invoke, ret, unknown) in planned {
            let mut op = match kind {
                0 => {
                    next_value += 1;
                    state = Some(next_value);
                    put(client, next_value, invoke, ret)
                }
                1 => get(client, state, invoke, ret),
                _ => delete(client, state.take().is_some(), invoke, ret),
            };
            if unknown {
                op.output = Output::Unknown;
                op.ret = None;
            }
            ops.push(op);
        }
        let checked = check(&ops, 200_000);
        assert_eq!(
            checked.verdict,
            Verdict::Linearizable,
            "{} steps",
            checked.steps
        );
        // A wrong read early on is found within the same bound, and shrunk
        // to itself (a value never written).
        let read = (100..ops.len())
            .find(|&i| matches!(ops[i].output, Output::Read(_)))
            .unwrap();
        let mut bad = ops.clone();
        bad[read].output = Output::Read(Some(999_999));
        assert_eq!(check(&bad, 200_000).verdict, Verdict::Violation);
        assert_eq!(minimise(&bad, 200_000, 500), vec![read]);
    }
}
