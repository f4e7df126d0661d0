//! Lookups per second: `owner()` on the default 3-node ring (target: under
//! 100 ns a lookup), with keys of the shape kv-bench and the proxy hash.
//!
//! `cargo bench -p kv-ring --bench lookup`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kv_ring::{Ring, DEFAULT_VNODES};

fn lookup(c: &mut Criterion) {
    let Ok(ring) = Ring::new(
        ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"],
        DEFAULT_VNODES,
    ) else {
        panic!("the default ring must build");
    };
    // Many distinct keys, so the bench walks the whole ring rather than one
    // cached path; formatted up front so only the lookup is timed.
    let keys: Vec<String> = (0..4096).map(|i| format!("key_{i}")).collect();
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(1));
    group.bench_function("owner/3 nodes/default vnodes", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(ring.owner(black_box(keys[i].as_bytes())))
        })
    });
    group.bench_function("successors/3 nodes/default vnodes", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(ring.successors(black_box(keys[i].as_bytes())).count())
        })
    });
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
