//! The topology monitor against real servers: a primary with two streaming replicas started by
//! the harness. Roles, replication lag (replay paused on a replica), a replica going down and
//! coming back, and a promotion after the primary is gone, including the old primary coming
//! back on the old timeline and a replica left following it.

mod common;

use common::PgCluster;
use pgmux::topology::{HostConfig, Role, Snapshot, Topology, TopologyConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Generous: the machine is shared, and promotion or a restart can take seconds.
const DEADLINE: Duration = Duration::from_secs(60);

fn monitor(cluster: &PgCluster, with_roles: bool) -> Topology {
    let role = |r| with_roles.then_some(r);
    let hosts = std::iter::once(HostConfig {
        host: "127.0.0.1".into(),
        port: cluster.primary().port,
        configured_role: role(Role::Primary),
    })
    .chain(cluster.replicas().iter().map(|r| HostConfig {
        host: "127.0.0.1".into(),
        port: r.port,
        configured_role: role(Role::Replica),
    }))
    .collect();
    Topology::start(TopologyConfig {
        hosts,
        dbname: "postgres".into(),
        user: "postgres".into(),
        secret: None,
        check_interval: Duration::from_millis(100),
        ban_time: Duration::from_millis(500),
        timeout: Duration::from_secs(5),
    })
}

/// Waits, without polling, until a published snapshot satisfies `cond`; returns that snapshot.
async fn wait_for(topo: &Topology, what: &str, cond: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut rx = topo.subscribe();
    loop {
        let snap = rx.borrow_and_update().clone();
        if cond(&snap) {
            return snap;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("monitor stopped while waiting for {what}"),
            Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}; last: {snap:#?}"),
        }
    }
}

fn all_healthy(s: &Snapshot) -> bool {
    s.hosts.iter().all(|h| h.healthy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_come_from_the_servers() {
    let cluster = PgCluster::shared_with_replicas();
    // A hosts list without roles: the monitor has to ask.
    let topo = monitor(cluster, false);
    let s = wait_for(&topo, "all hosts checked", all_healthy).await;
    assert_eq!(s.primary, Some(0), "{s:#?}");
    assert_eq!(s.hosts[0].role, Role::Primary);
    assert_eq!(s.hosts[1].role, Role::Replica);
    assert_eq!(s.hosts[2].role, Role::Replica);
    assert_eq!(s.replicas().map(|(i, _)| i).collect::<Vec<_>>(), vec![1, 2]);
    let p = s.primary().unwrap();
    assert!(p.lsn.is_some() && p.timeline == Some(1), "{p:#?}");
    assert_eq!(p.port, cluster.primary().port);
    for (_, r) in s.replicas() {
        assert!(r.lsn.is_some() && r.receive_lsn.is_some(), "{r:#?}");
        assert!(r.timeline.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_shows_while_replay_is_paused_and_goes_when_it_resumes() {
    let cluster = PgCluster::start(2);
    let primary = cluster.primary();
    let replica = &cluster.replicas()[0];
    // A replayed transaction gives the replica a last-replay timestamp to measure age from.
    primary.psql("postgres", "CREATE TABLE lag_probe (n int)");
    cluster.wait_replicas_caught_up();
    let topo = monitor(&cluster, true);
    wait_for(&topo, "replicas caught up", |s| {
        all_healthy(s) && s.replicas().all(|(_, r)| r.lag_bytes == Some(0))
    })
    .await;

    replica.psql("postgres", "SELECT pg_wal_replay_pause()");
    common::wait_until("replay paused", DEADLINE, || {
        replica.psql("postgres", "SELECT pg_get_wal_replay_pause_state()") == "paused"
    });
    primary.psql(
        "postgres",
        "INSERT INTO lag_probe SELECT generate_series(1, 10000)",
    );
    let s = wait_for(&topo, "lag on the paused replica", |s| {
        let r = &s.hosts[1];
        r.lag_bytes.is_some_and(|b| b > 0) && r.lag_seconds.is_some_and(|t| t > 0.0)
    })
    .await;
    assert!(s.hosts[1].healthy, "a lagging replica is still healthy");
    // The other replica keeps up.
    wait_for(&topo, "the other replica to keep up", |s| {
        s.hosts[2].lag_bytes == Some(0) && s.hosts[1].lag_bytes.is_some_and(|b| b > 0)
    })
    .await;

    replica.psql("postgres", "SELECT pg_wal_replay_resume()");
    wait_for(&topo, "lag gone after resume", |s| {
        let r = &s.hosts[1];
        r.lag_bytes == Some(0) && r.lag_seconds == Some(0.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_is_banned_and_returns_after_restart() {
    let cluster = PgCluster::start(2);
    let topo = monitor(&cluster, true);
    wait_for(&topo, "all hosts checked", all_healthy).await;

    let replica = &cluster.replicas()[1];
    replica.stop("fast");
    let s = wait_for(&topo, "the stopped replica banned", |s| {
        let r = &s.hosts[2];
        !r.healthy && r.is_banned(Instant::now())
    })
    .await;
    let r = &s.hosts[2];
    assert!(r.failures > 0 && r.last_error.is_some(), "{r:#?}");
    // Its role is remembered; the others are untouched.
    assert_eq!(r.role, Role::Replica);
    assert_eq!(
        r.lag_bytes, None,
        "no lag figure for a host that does not answer"
    );
    assert!(s.hosts[0].healthy && s.hosts[1].healthy, "{s:#?}");
    assert_eq!(s.primary, Some(0));

    replica.start();
    let s = wait_for(&topo, "the restarted replica usable", |s| {
        s.hosts[2].is_usable(Instant::now())
    })
    .await;
    assert_eq!(s.hosts[2].role, Role::Replica);
    assert_eq!(s.hosts[2].last_error, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_is_followed() {
    let cluster = PgCluster::start(2);
    // Configured roles say host 0 is the primary; what the servers say must win.
    let topo = monitor(&cluster, true);
    wait_for(&topo, "all hosts checked", |s| {
        all_healthy(s) && s.primary == Some(0)
    })
    .await;

    cluster.primary().stop("fast");
    let s = wait_for(&topo, "no primary once it is gone", |s| {
        s.primary.is_none() && !s.hosts[0].healthy
    })
    .await;
    assert_eq!(s.hosts[0].role, Role::Primary, "last known role is kept");

    cluster.replicas()[0].promote();
    let s = wait_for(&topo, "the promoted replica as primary", |s| {
        s.primary == Some(1)
    })
    .await;
    let p = &s.hosts[1];
    assert_eq!(p.role, Role::Primary);
    assert_eq!(p.configured_role, Some(Role::Replica));
    assert_eq!(p.timeline, Some(2), "{p:#?}");
    assert_eq!(s.hosts[2].role, Role::Replica);

    // Replica 2 still follows the old primary, which is gone: it replayed all it received,
    // so its own figures show no lag, but it will never see the new primary's writes.
    cluster.replicas()[0].psql("postgres", "CREATE TABLE after_promotion (n int)");
    let s = wait_for(&topo, "time lag on the replica left behind", |s| {
        s.hosts[2].lag_seconds.is_some_and(|t| t >= 1.0)
    })
    .await;
    assert!(s.hosts[2].healthy && !s.hosts[2].diverged, "{s:#?}");

    // The old primary comes back, still believing it is the primary (timeline 1): the
    // promoted host, on the later timeline, stays the primary.
    cluster.primary().start();
    let s = wait_for(&topo, "the old primary answering again", |s| {
        s.hosts[0].healthy
    })
    .await;
    assert_eq!(s.hosts[0].role, Role::Primary);
    assert_eq!(s.hosts[0].timeline, Some(1));
    assert_eq!(s.primary, Some(1), "{s:#?}");
    // SHOW HOSTS tells the old primary from the one in use
    assert!(s.hosts[0].diverged && !s.hosts[1].diverged, "{s:#?}");
    assert_eq!(s.hosts[0].lag_bytes, None, "{s:#?}");
    // Replica 2 streams from it again, on the old timeline: its data may differ from the
    // primary's, whatever its lag.
    wait_for(&topo, "replica 2 seen on the old timeline", |s| {
        s.hosts[2].diverged && s.hosts[2].receive_timeline == Some(1)
    })
    .await;

    // A monitor started now has no current primary to stick to and sees two hosts out of
    // recovery: the later timeline decides, not config order.
    let fresh = monitor(&cluster, true);
    let s = wait_for(&fresh, "a fresh monitor to see both", |s| {
        s.hosts[0].healthy && s.hosts[1].healthy
    })
    .await;
    assert_eq!(s.primary, Some(1), "{s:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_stops_the_monitor() {
    let cluster = PgCluster::shared_with_replicas();
    let primary = cluster.primary();
    let count = || -> usize {
        primary
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE usename = 'postgres' AND query LIKE '%pg_is_in_recovery() AS r%' \
                 AND pid <> pg_backend_pid()",
            )
            .parse()
            .unwrap()
    };
    let before = count();
    let topo = monitor(cluster, false);
    wait_for(&topo, "all hosts checked", all_healthy).await;
    assert!(count() > before, "the monitor's connection is visible");
    drop(topo);
    // The tasks close their connections when they notice; the server then drops the backend.
    // at most as many as before: another test's monitor on the shared cluster may have gone too
    common::wait_until("monitor connection closed", DEADLINE, || count() <= before);
}
