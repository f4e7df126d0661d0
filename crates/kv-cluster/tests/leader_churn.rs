//! Issue 13: a layout change re-targets leadership only where it must.
//!
//! The bench for adding a 4th member (`scripts/bench-membership.sh`) saw
//! ~500 leader changes during one add of 47 moves: the preferred leaders
//! were re-balanced over the voters after every move, and a greedy balance
//! in shard order shifts many unrelated shards for one changed row.
//! Here a whole rebalance is replayed move by move (kv-cluster's own
//! `next_swap`, as the executor applies them), and after each move the
//! preferred leaders ([`preferred_leaders_toward`]) are compared with the
//! ones before it.

use std::collections::{BTreeMap, BTreeSet};

use kv_cluster::{next_swap, placement_over, preferred_leaders, preferred_leaders_toward};

const REPLICAS: u32 = 3;

/// Per step, the shard that moved and the preferred leaders after it.
fn replay(from: &[u64], to: &[u64], shards: u32) -> (Vec<u64>, Vec<(usize, Vec<u64>)>) {
    let mut current = placement_over(from.iter().copied(), shards, REPLICAS);
    let target = placement_over(to.iter().copied(), shards, REPLICAS);
    let leaving: BTreeSet<u64> = from.iter().copied().filter(|id| !to.contains(id)).collect();
    let start = preferred_leaders_toward(&current, &target);
    let mut steps = Vec::new();
    loop {
        let step = current.iter_mut().enumerate().find_map(|(shard, row)| {
            let (_, _, goal) = next_swap(row, &target[shard], &leaving)?;
            *row = goal;
            Some(shard)
        });
        let Some(shard) = step else { break };
        steps.push((shard, preferred_leaders_toward(&current, &target)));
    }
    assert_eq!(current, target, "the replay reaches the target");
    (start, steps)
}

#[test]
fn a_move_re_targets_the_leader_of_its_own_shard_only() {
    let changes = [
        (vec![1u64, 2, 3], vec![1u64, 2, 3, 4]),
        (vec![1, 2, 3, 4], vec![1, 3, 4]),
        (vec![1, 2, 3, 4, 5], vec![1, 2, 3, 4, 5, 6]),
        (vec![1, 2, 3, 4, 5, 6], vec![2, 3, 4, 5, 6]),
    ];
    for shards in [8u32, 64, 256] {
        for (from, to) in &changes {
            let (start, steps) = replay(from, to, shards);
            let mut before = start.clone();
            let mut own = 0;
            for (moved, after) in &steps {
                let current_rows = after.len();
                assert_eq!(current_rows, shards as usize);
                for (shard, (b, a)) in before.iter().zip(after).enumerate() {
                    if b != a {
                        assert_eq!(
                            shard, *moved,
                            "{shards} shards {from:?} -> {to:?}: moving shard {moved} \
                             re-targeted shard {shard} ({b} -> {a})"
                        );
                        own += 1;
                    }
                }
                before = after.clone();
            }
            let net = start.iter().zip(&before).filter(|(a, b)| a != b).count();
            println!(
                "{shards} shards {from:?} -> {to:?}: {} moves, {own} re-targeted \
                 on their own move, {net} differ at the end",
                steps.len()
            );
            // The end state is the target's own balance.
            let target = placement_over(to.iter().copied(), shards, REPLICAS);
            assert_eq!(before, preferred_leaders(&target));
        }
    }
}

#[test]
fn without_a_change_toward_is_the_balance_itself() {
    for (members, shards) in [(3u64, 64u32), (4, 64), (5, 256)] {
        let rows = placement_over(1..=members, shards, REPLICAS);
        assert_eq!(
            preferred_leaders_toward(&rows, &rows),
            preferred_leaders(&rows)
        );
    }
}

#[test]
fn mid_change_every_shard_is_led_by_one_of_its_voters_preferring_those_that_stay() {
    let target = placement_over([1u64, 3, 4], 64, REPLICAS);
    // Half-way through removing member 2: shards before 32 moved.
    let mut current = placement_over([1u64, 2, 3, 4], 64, REPLICAS);
    for (row, goal) in current.iter_mut().zip(&target).take(32) {
        *row = goal.clone();
    }
    let leaders = preferred_leaders_toward(&current, &target);
    let mut led: BTreeMap<u64, usize> = BTreeMap::new();
    for (row, leader) in current.iter().zip(&leaders) {
        assert!(row.contains(leader), "{leader} not in {row:?}");
        assert_ne!(*leader, 2, "the leaving member is never preferred");
        *led.entry(*leader).or_default() += 1;
    }
    assert!(!led.contains_key(&2));
    assert_eq!(
        preferred_leaders_toward(&[vec![]], &[]),
        vec![kv_cluster::NO_LEADER]
    );
}
