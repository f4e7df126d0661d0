//! Measures how evenly a ring spreads the hash space, to choose
//! `DEFAULT_VNODES`: for each virtual-node count, the most-loaded node's share
//! divided by the mean share (1.0 is perfect), on average and at worst over
//! many random 3-node lists, and for the default list 127.0.0.1:8081-8083.
//!
//! `cargo run --release -p kv-ring --example balance [lists]`

use kv_ring::Ring;

/// splitmix64: a tiny deterministic generator, so runs are repeatable and the
/// crate needs no `rand` dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn max_over_mean(ring: &Ring) -> f64 {
    let shares = ring.shares();
    let mean = 1.0 / shares.len() as f64;
    shares.iter().copied().fold(0.0, f64::max) / mean
}

fn random_node(rng: &mut SplitMix) -> String {
    let r = rng.next();
    format!(
        "10.{}.{}.{}:{}",
        (r >> 8) as u8,
        (r >> 16) as u8,
        (r >> 24) as u8,
        1024 + (r >> 32) % 60_000
    )
}

fn main() {
    let lists: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(300);
    let default_list = ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"];
    println!("3 nodes, {lists} random node lists per row; max share / mean share");
    println!(
        "{:>7} {:>9} {:>9} {:>14}",
        "vnodes", "average", "worst", "8081-8083"
    );
    for vnodes in [40, 100, 160, 250, 500, 750, 1000, 1500, 2000] {
        let mut rng = SplitMix(42);
        let mut sum = 0.0;
        let mut worst: f64 = 0.0;
        for _ in 0..lists {
            let nodes: Vec<String> = (0..3).map(|_| random_node(&mut rng)).collect();
            // A random list can repeat a node only with negligible odds; skip it if so.
            let Ok(ring) = Ring::new(nodes, vnodes) else {
                continue;
            };
            let ratio = max_over_mean(&ring);
            sum += ratio;
            worst = worst.max(ratio);
        }
        let default_ratio = match Ring::new(default_list, vnodes) {
            Ok(ring) => max_over_mean(&ring),
            Err(error) => {
                eprintln!("cannot build the default ring: {error}");
                return;
            }
        };
        println!(
            "{vnodes:>7} {:>9.4} {:>9.4} {:>14.4}",
            sum / lists as f64,
            worst,
            default_ratio
        );
    }
}
