//! Review R1: the proxy's `/-/ready` with two of three nodes dead.
//!
//! `/-/ready` promises 503 when no shard has a leader that serves. With
//! two of three nodes killed no shard has a quorum, so nothing is served:
//! the survivor answers every key 503 ("no quorum") and its own `/-/ready`
//! is 503. The proxy counts a shard whose leader is the survivor (up, but
//! without a quorum) as led, so it stays ready and a load balancer keeps
//! sending it traffic that all fails.
//!
//! Against a real 3-node cluster (kv-testkit's [`Cluster`]) and a real proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kv_testkit::cluster::{wait_until, Cluster, ClusterOpts, BOUND};
use kv_testkit::request;

#[test]
fn the_proxy_is_not_ready_when_no_shard_has_a_quorum() {
    let mut cluster = Cluster::start(
        3,
        3,
        ClusterOpts {
            proxy: Some(vec!["--health-interval".into(), "200ms".into()]),
            ..ClusterOpts::default()
        },
    );
    let proxy = cluster.proxy_addr().unwrap();
    let leaders = cluster.wait_for_leaders(BOUND);
    assert!(leaders.contains(&1), "node 1 leads a shard: {leaders:?}");
    wait_until("the proxy is ready", BOUND, || {
        request(proxy, "GET", "/-/ready", None).unwrap().status == 200
    });

    cluster.kill9(2);
    cluster.kill9(3);
    wait_until("node 1 itself is not ready", BOUND, || {
        request(cluster.addr(1), "GET", "/-/ready", None)
            .unwrap()
            .status
            == 503
    });
    wait_until("the proxy is not ready either", BOUND, || {
        request(proxy, "GET", "/-/ready", None).unwrap().status == 503
    });
}
