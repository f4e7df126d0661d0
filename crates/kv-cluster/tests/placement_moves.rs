//! Issue 13: "moved replicas within a few percent of the ideal 1/(N+1)"
//! (`docs/membership.md` §4.2). How many replicas move is a property of the
//! ring's placement alone (`placement_over`, `replicas_to_move`), so it is
//! checked here over many shards rather than on running nodes (the
//! `membership_*` tests of kv-node check that the moves made are this
//! diff).
//!
//! For each change (3 → 4, 5 → 6, and removing each kind of member: the
//! lowest id, a middle one, the newest) at 64, 1024 and 4096 shards with 3
//! replicas:
//! * only the new member enters a shard (add), only the removed member
//!   leaves one (remove), and a shard changes at most one replica: the
//!   moves are exactly the slots the changed member takes or gives up;
//! * the number of moved replicas is within [`TOLERANCE`] of the ideal
//!   `shards × replicas / members`, `members` being the larger membership
//!   (N + 1 for an add of the (N+1)th, N for a removal from N).
//!
//! The figures are printed (`--nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use kv_cluster::{placement_over, replicas_to_move};

const REPLICAS: u32 = 3;

/// Allowed relative distance between the replicas moved and the ideal.
///
/// Measured (replicas moved / ideal, this ring, members `1..=N`):
///
/// | change         | 64 shards     | 1024 shards     | 4096 shards       |
/// |----------------|---------------|-----------------|-------------------|
/// | 3 → 4          | 47 / 48 (-2.1%) | 761 / 768 (-0.9%) | 3058 / 3072 (-0.5%) |
/// | 5 → 6          | 33 / 32 (+3.1%) | 517 / 512 (+1.0%) | 2005 / 2048 (-2.1%) |
/// | remove 1 of 4  | 48 / 48 (0%)    | 743 / 768 (-3.3%) | 3048 / 3072 (-0.8%) |
/// | remove 2 of 4  | 48 / 48 (0%)    | 772 / 768 (+0.5%) | 3078 / 3072 (+0.2%) |
/// | remove 4 of 4  | 47 / 48 (-2.1%) | 761 / 768 (-0.9%) | 3058 / 3072 (-0.5%) |
/// | remove 3 of 6  | 33 / 32 (+3.1%) | 521 / 512 (+1.8%) | 2063 / 2048 (+0.7%) |
/// | remove 6 of 6  | 33 / 32 (+3.1%) | 517 / 512 (+1.0%) | 2005 / 2048 (-2.1%) |
///
/// The worst is 3.3%; 5% is the margin the design names for these
/// configurations. The figures are deterministic (the ring is a fixed hash
/// of the ids), so this test cannot flake; what it guards is a change of
/// the ring or the placement that moves more than the member's share. It is
/// not a law for any ids: with 64 shards a shard gains a given new member
/// with probability 3/4 independently of the others, so the count's
/// standard deviation alone is sqrt(64 · 3/4 · 1/4) ≈ 3.5 replicas, 7% of
/// 48, and other ids may land further from the ideal than these do.
const TOLERANCE: f64 = 0.05;

/// Checks one change from members `from` to members `to`; returns the
/// replicas moved and the ideal.
fn check(shards: u32, from: &[u64], to: &[u64]) -> (usize, f64) {
    let before = placement_over(from.iter().copied(), shards, REPLICAS);
    let after = placement_over(to.iter().copied(), shards, REPLICAS);
    let added: BTreeSet<u64> = to.iter().filter(|id| !from.contains(id)).copied().collect();
    let removed: BTreeSet<u64> = from.iter().filter(|id| !to.contains(id)).copied().collect();
    for (shard, (old, new)) in before.iter().zip(&after).enumerate() {
        let gained: BTreeSet<u64> = new.iter().filter(|id| !old.contains(id)).copied().collect();
        let lost: BTreeSet<u64> = old.iter().filter(|id| !new.contains(id)).copied().collect();
        assert!(
            gained.len() <= 1 && gained.len() == lost.len(),
            "shard {shard}: {old:?} -> {new:?} is not one swap"
        );
        if !added.is_empty() {
            assert!(
                gained.is_subset(&added),
                "shard {shard}: {old:?} -> {new:?}: an old member entered"
            );
        }
        if !removed.is_empty() {
            assert!(
                lost.is_subset(&removed),
                "shard {shard}: {old:?} -> {new:?}: a staying member left"
            );
        }
    }
    let moved = replicas_to_move(&before, &after);
    // Every slot the changed member takes or gives up is a move, no more.
    let changed: BTreeSet<u64> = added.union(&removed).copied().collect();
    let slots = before
        .iter()
        .chain(&after)
        .flatten()
        .filter(|id| changed.contains(id))
        .count();
    assert_eq!(moved, slots, "{from:?} -> {to:?} at {shards} shards");
    let members = from.len().max(to.len());
    let ideal = f64::from(shards) * f64::from(REPLICAS) / members as f64;
    (moved, ideal)
}

#[test]
fn adding_or_removing_a_member_moves_its_share_of_replicas() {
    let changes: [(&str, &[u64], &[u64]); 7] = [
        ("3 -> 4", &[1, 2, 3], &[1, 2, 3, 4]),
        ("5 -> 6", &[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5, 6]),
        ("remove 1 of 4", &[1, 2, 3, 4], &[2, 3, 4]),
        ("remove 2 of 4", &[1, 2, 3, 4], &[1, 3, 4]),
        ("remove 4 of 4", &[1, 2, 3, 4], &[1, 2, 3]),
        ("remove 3 of 6", &[1, 2, 3, 4, 5, 6], &[1, 2, 4, 5, 6]),
        ("remove 6 of 6", &[1, 2, 3, 4, 5, 6], &[1, 2, 3, 4, 5]),
    ];
    let mut worst = 0.0f64;
    for shards in [64, 1024, 4096] {
        for (name, from, to) in changes {
            let (moved, ideal) = check(shards, from, to);
            let off = (moved as f64 - ideal) / ideal;
            println!(
                "{shards} shards x {REPLICAS} replicas, {name}: {moved} replicas moved, \
                 ideal {ideal:.1} ({:+.1}%)",
                off * 100.0
            );
            assert!(
                off.abs() <= TOLERANCE,
                "{name} at {shards} shards: {moved} replicas moved, ideal {ideal:.1} ({:+.1}%)",
                off * 100.0
            );
            worst = worst.max(off.abs());
        }
    }
    println!("worst: {:.1}% off the ideal", worst * 100.0);
}
