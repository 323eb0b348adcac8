//! Read/write splitting through pgmux against a real primary with two streaming replicas.
//! Where a statement ran is proven by the server that answered it (`inet_server_port()`,
//! `pg_is_in_recovery()`, `pg_stat_database`), never by pgmux's logs. Tests that pause replay,
//! stop or promote servers start their own cluster; the others share one.

mod common;

use common::{wait_until, wait_until_async, PgCluster, Pgmux};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const WAIT: Duration = Duration::from_secs(60);

/// A pgmux in front of `cluster`'s primary with its replicas. `dbs` are extra lines for each
/// [[databases]] entry `app` (and `app_ro`, a replica-only alias); `general` goes to [pgmux].
fn start(cluster: &PgCluster, general: &str, app_extra: &str) -> Pgmux {
    // Tests of where statements go must not depend on how far behind the replicas are on a
    // busy machine (other tests write to the shared cluster): lag limits out of reach,
    // unless the test sets its own.
    let lag = if app_extra.contains("max_replica_lag") {
        ""
    } else {
        "max_replica_lag_bytes = 1099511627776\nmax_replica_lag_ms = 3600000"
    };
    let replicas: Vec<String> = cluster
        .replicas()
        .iter()
        .map(|r| format!("{{ host = \"127.0.0.1\", port = {} }}", r.port))
        .collect();
    let replicas = replicas.join(", ");
    let p = cluster.primary().port;
    Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
admin_users = ["postgres"]
{general}
[[users]]
name = "app"
password = "secret"
[[users]]
name = "postgres"
[[databases]]
name = "app"
host = "127.0.0.1"
port = {p}
read_write_split = true
replicas = [ {replicas} ]
lag_check_interval = 0.1
ban_time = 1
{lag}
{app_extra}
[[databases]]
name = "app_ro"
dbname = "app"
host = "127.0.0.1"
port = {p}
route = "replica"
replicas = [ {replicas} ]
lag_check_interval = 0.1
{lag}
[[databases]]
name = "app_session"
dbname = "app"
host = "127.0.0.1"
port = {p}
pool_mode = "session"
read_write_split = true
replicas = [ {replicas} ]
lag_check_interval = 0.1
"#
    ))
}

async fn connect_str(s: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(s, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {s}: {e}"));
    tokio::spawn(conn);
    c
}

async fn connect(px: &Pgmux, db: &str) -> Client {
    connect_str(&px.conn_str("app", db, Some("secret"))).await
}

/// The first column of the first row of a simple query.
async fn one(c: &Client, sql: &str) -> String {
    try_one(c, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn try_one(c: &Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    let msgs = c.simple_query(sql).await?;
    Ok(msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .expect("a row"))
}

fn ports(cluster: &PgCluster) -> (u16, Vec<u16>) {
    (
        cluster.primary().port,
        cluster.replicas().iter().map(|r| r.port).collect(),
    )
}

/// Waits until pgmux's monitor has checked every host of `app` (a first client starts it).
async fn warm_up(px: &Pgmux, cluster: &PgCluster) {
    let c = connect(px, "app").await;
    let (_, replicas) = ports(cluster);
    wait_until_async("reads to reach a replica", WAIT, || async {
        let p: u16 = one(&c, "SELECT inet_server_port()").await.parse().unwrap();
        replicas.contains(&p)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_replicas_and_writes_to_the_primary() {
    let cluster = PgCluster::shared_with_replicas();
    let metrics = common::free_port();
    let px = start(
        cluster,
        &format!("metrics_listen_port = {metrics}"),
        "consistency = \"eventual\"",
    );
    warm_up(&px, cluster).await;
    let (primary, replicas) = ports(cluster);
    let c = connect(&px, "app").await;
    c.simple_query("CREATE TABLE IF NOT EXISTS rw_split (id serial PRIMARY KEY, port int)")
        .await
        .unwrap();
    let mut seen: HashMap<u16, u32> = HashMap::new();
    for _ in 0..60 {
        let row = c
            .simple_query("SELECT pg_is_in_recovery(), inet_server_port()")
            .await
            .unwrap();
        let Some(r) = row.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        }) else {
            panic!("no row")
        };
        assert_eq!(r.get(0), Some("t"), "a read ran on the primary");
        *seen.entry(r.get(1).unwrap().parse().unwrap()).or_default() += 1;
    }
    assert!(
        replicas
            .iter()
            .all(|p| seen.get(p).copied().unwrap_or(0) > 0),
        "reads did not spread over both replicas: {seen:?}"
    );
    for _ in 0..5 {
        let p = one(
            &c,
            "INSERT INTO rw_split (port) VALUES (inet_server_port()) RETURNING port",
        )
        .await;
        assert_eq!(p, primary.to_string(), "a write ran elsewhere");
    }
    // an explicit transaction stays on the primary; BEGIN READ ONLY on one replica
    c.simple_query("BEGIN").await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            one(&c, "SELECT inet_server_port()").await,
            primary.to_string()
        );
    }
    c.simple_query("COMMIT").await.unwrap();
    c.simple_query("BEGIN READ ONLY").await.unwrap();
    let first: u16 = one(&c, "SELECT inet_server_port()").await.parse().unwrap();
    assert!(replicas.contains(&first));
    for _ in 0..3 {
        assert_eq!(
            one(&c, "SELECT inet_server_port()").await,
            first.to_string()
        );
    }
    c.simple_query("COMMIT").await.unwrap();

    // server connections opened are counted per host: every host served this client
    let body = scrape(metrics);
    for p in replicas.iter().chain([&primary]) {
        let series = format!("host=\"127.0.0.1:{p}\"");
        let opened: f64 = body
            .lines()
            .filter(|l| l.starts_with("pgmux_server_connects_total{") && l.contains(&series))
            .filter(|l| l.contains("database=\"app\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        assert!(opened >= 1.0, "no connects counted for {p}:\n{body}");
    }
}

/// The body of GET /metrics on `port`.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_prepared_statements_are_routed_by_their_text_each_time() {
    let cluster = PgCluster::shared_with_replicas();
    let px = start(cluster, "", "consistency = \"eventual\"");
    warm_up(&px, cluster).await;
    let (primary, replicas) = ports(cluster);
    let c = connect(&px, "app").await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS rw_prep (port int)")
        .await
        .unwrap();
    // tokio-postgres prepares named statements and binds them by name
    let read = c.prepare("SELECT inet_server_port()").await.unwrap();
    let write = c
        .prepare("INSERT INTO rw_prep VALUES (inet_server_port()) RETURNING port")
        .await
        .unwrap();
    for _ in 0..10 {
        let p: i32 = c.query_one(&read, &[]).await.unwrap().get(0);
        assert!(replicas.contains(&(p as u16)), "read on {p}");
        let p: i32 = c.query_one(&write, &[]).await.unwrap().get(0);
        assert_eq!(p as u16, primary, "write on {p}");
    }

    // a named statement's first use, Parse+Bind+Execute+Sync in one write (as pgjdbc and
    // Npgsql send it), is routed by the text of that Parse
    use common::raw::{error_code, login, msg, until_ready};
    use std::io::Write;
    let (mut s, _) = login(px.port, "app", "app");
    let mut run = |parse: Option<(&str, &str)>, name: &str| {
        let mut out = Vec::new();
        if let Some((name, sql)) = parse {
            out.extend(msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes()));
        }
        out.extend(msg(b'B', format!("\0{name}\0\0\0\0\0\0\0").as_bytes()));
        out.extend(msg(b'E', b"\0\0\0\0\0"));
        out.extend(msg(b'S', b""));
        s.write_all(&out).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(error_code(&answers), None, "{answers:?}");
        let (_, row) = answers.iter().find(|(t, _)| *t == b'D').expect("a row");
        String::from_utf8_lossy(&row[6..]).parse::<u16>().unwrap()
    };
    for i in 0..3 {
        let (r, w) = (format!("r{i}"), format!("w{i}"));
        let p = run(Some((&r, "SELECT inet_server_port()")), &r);
        assert!(replicas.contains(&p), "first use of a named read on {p}");
        let p = run(None, &r);
        assert!(replicas.contains(&p), "second use of a named read on {p}");
        let sql = "INSERT INTO rw_prep VALUES (inet_server_port()) RETURNING port";
        assert_eq!(run(Some((&w, sql)), &w), primary, "first use of a write");
        assert_eq!(run(None, &w), primary, "second use of a write");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_settings_options_and_alias_override_the_classifier() {
    let cluster = PgCluster::shared_with_replicas();
    let px = start(cluster, "", "consistency = \"eventual\"");
    warm_up(&px, cluster).await;
    let (primary, replicas) = ports(cluster);
    let on_replica = |p: String| replicas.contains(&p.parse::<u16>().unwrap());
    let c = connect(&px, "app").await;

    // comment hints
    assert_eq!(
        one(&c, "/* pgmux:primary */ SELECT inet_server_port()").await,
        primary.to_string()
    );
    let rows = c
        .simple_query("/* pgmux:replica */ BEGIN; SELECT inet_server_port(); COMMIT")
        .await
        .unwrap();
    let p = rows
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap();
    assert!(
        on_replica(p),
        "a BEGIN hinted to a replica ran on the primary"
    );

    // SET pgmux.route: answered by pgmux, never seen by a server
    c.simple_query("SET pgmux.route = primary").await.unwrap();
    for _ in 0..5 {
        assert_eq!(
            one(&c, "SELECT inet_server_port()").await,
            primary.to_string()
        );
    }
    assert_eq!(
        one(&c, "SELECT current_setting('pgmux.route', true)").await,
        "NULL",
        "the SET reached the server"
    );
    c.simple_query("RESET pgmux.route").await.unwrap();
    assert!(on_replica(one(&c, "SELECT inet_server_port()").await));
    let err = c
        .simple_query("SET pgmux.route = sideways")
        .await
        .unwrap_err();
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("22023"),
        "{err}"
    );
    // the session survives the error
    assert!(on_replica(one(&c, "SELECT inet_server_port()").await));

    // startup option
    let s = format!(
        "{} options='-c pgmux.route=primary'",
        px.conn_str("app", "app", Some("secret"))
    );
    let o = connect_str(&s).await;
    assert_eq!(
        one(&o, "SELECT inet_server_port()").await,
        primary.to_string()
    );
    assert_eq!(
        one(&o, "SELECT current_setting('pgmux.route', true)").await,
        "NULL"
    );
    // RESET and DEFAULT go back to the startup value, as PostgreSQL's RESET does
    for reset in [
        "SET pgmux.route = replica; RESET pgmux.route",
        "SET pgmux.route = replica",
        "SET pgmux.route = DEFAULT",
    ] {
        o.simple_query(reset).await.unwrap();
    }
    assert_eq!(
        one(&o, "SELECT inet_server_port()").await,
        primary.to_string()
    );
    o.simple_query("RESET pgmux.route").await.unwrap();
    assert_eq!(
        one(&o, "SELECT inet_server_port()").await,
        primary.to_string()
    );

    // the replica-only alias: reads on replicas, a write refused by the replica itself
    let ro = connect(&px, "app_ro").await;
    // the alias's own host monitor starts with pgmux; until its first check the replicas'
    // state is unknown and reads fall back to the primary
    wait_until_async(
        "the alias reads on a replica",
        Duration::from_secs(30),
        || async { on_replica(one(&ro, "SELECT inet_server_port()").await) },
    )
    .await;
    assert!(on_replica(one(&ro, "SELECT inet_server_port()").await));
    let err = ro
        .simple_query("CREATE TABLE rw_never (a int)")
        .await
        .unwrap_err();
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("25006"),
        "{err}"
    );

    // session mode: the primary unless the client asks for replicas at startup
    let sm = connect(&px, "app_session").await;
    assert_eq!(
        one(&sm, "SELECT inet_server_port()").await,
        primary.to_string()
    );
    let s = format!(
        "{} options='-c pgmux.route=replica'",
        px.conn_str("app", "app_session", Some("secret"))
    );
    let sr = connect_str(&s).await;
    assert!(on_replica(one(&sr, "SELECT inet_server_port()").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_select_only_spreads_over_the_replicas() {
    let cluster = PgCluster::shared_with_replicas();
    cluster.create_database("rw_bench", "app");
    let out = std::process::Command::new("pgbench")
        .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-U", "app"])
        .args(["-p", &cluster.primary().port.to_string(), "rw_bench"])
        .env("PGPASSWORD", "secret")
        .output()
        .expect("run pgbench -i");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.wait_replicas_caught_up();
    let (_, replicas) = ports(cluster);
    let px = start(
        cluster,
        "max_client_conn = 200",
        &format!(
            "consistency = \"eventual\"\n[[databases]]\nname = \"rw_bench\"\nhost = \"127.0.0.1\"\nport = {}\nread_write_split = true\nreplicas = [ {} ]\nlag_check_interval = 0.1\npool_size = 10\n",
            cluster.primary().port,
            replicas
                .iter()
                .map(|p| format!("{{ host = \"127.0.0.1\", port = {p} }}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let commits = |inst: &common::PgInstance| -> u64 {
        inst.psql(
            "postgres",
            "SELECT xact_commit FROM pg_stat_database WHERE datname = 'rw_bench'",
        )
        .parse()
        .unwrap()
    };
    let before: Vec<u64> = cluster.replicas().iter().map(commits).collect();
    let (clients, per_client) = (50u64, 40u64);
    let out = std::process::Command::new("pgbench")
        .args([
            "-S",
            "-n",
            "-c",
            "50",
            "-j",
            "2",
            "-t",
            "40",
            "-h",
            "127.0.0.1",
        ])
        .args(["-U", "app", "-p", &px.port.to_string(), "rw_bench"])
        .env("PGPASSWORD", "secret")
        .output()
        .expect("run pgbench -S");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let total = clients * per_client;
    // statistics reach pg_stat_database within about a second of a backend going idle
    let mut deltas = Vec::new();
    wait_until("replica statistics to show the run", WAIT, || {
        deltas = cluster
            .replicas()
            .iter()
            .zip(&before)
            .map(|(r, b)| commits(r) - b)
            .collect();
        deltas.iter().sum::<u64>() >= total
    });
    for d in &deltas {
        assert!(
            *d >= total / 5,
            "reads not spread over the replicas: {deltas:?} of {total}"
        );
    }
}

/// Replay paused on one replica: under read_your_writes no client reads stale data; under
/// eventual, the lagging replica gets no reads. Then the other replica is stopped under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_lag_and_a_replica_stopped_under_load() {
    let cluster = PgCluster::start(2);
    let (primary, replicas) = ports(&cluster);
    // `app` has no lag limits: only read-your-writes keeps stale replicas out of its reads;
    // `app_ev` (same servers) is eventual with a 1-byte lag limit
    let px = {
        let reps = replicas
            .iter()
            .map(|p| format!("{{ host = \"127.0.0.1\", port = {p} }}"))
            .collect::<Vec<_>>()
            .join(", ");
        start(
            &cluster,
            "",
            &format!(
                "max_replica_lag_bytes = 0\nmax_replica_lag_ms = 0\n\
                 [[databases]]\nname = \"app_ev\"\ndbname = \"app\"\nhost = \"127.0.0.1\"\n\
                 port = {primary}\nread_write_split = true\nconsistency = \"eventual\"\n\
                 max_replica_lag_bytes = 1\nmax_replica_lag_ms = 0\nlag_check_interval = 0.1\n\
                 ban_time = 1\nreplicas = [ {reps} ]\n"
            ),
        )
    };
    warm_up(&px, &cluster).await;
    cluster.primary().psql(
        "app",
        "CREATE TABLE ryw (id int PRIMARY KEY, v int); GRANT ALL ON ryw TO app",
    );
    cluster.wait_replicas_caught_up();
    let paused = replicas[0];
    cluster.replicas()[0].psql("postgres", "SELECT pg_wal_replay_pause()");

    // many clients, each writing then reading at once, many times
    let px = Arc::new(px);
    let mut tasks = Vec::new();
    for id in 0..20 {
        let px = px.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&px, "app").await;
            let mut on_replica = 0;
            for v in 1..=4 {
                c.simple_query(&format!(
                    "INSERT INTO ryw VALUES ({id}, {v}) ON CONFLICT (id) DO UPDATE SET v = {v}"
                ))
                .await
                .unwrap();
                // read until a replica serves it: every answer on the way must be fresh. The
                // primary serves them until the monitor has sampled its WAL after the write
                // and the unpaused replica has replayed that far.
                let deadline = tokio::time::Instant::now() + WAIT;
                while tokio::time::Instant::now() < deadline {
                    let rows = c
                        .simple_query(&format!(
                            "SELECT v, inet_server_port() FROM ryw WHERE id = {id}"
                        ))
                        .await
                        .unwrap();
                    let got = rows.iter().find_map(|m| match m {
                        SimpleQueryMessage::Row(r) => {
                            Some((r.get(0).unwrap().to_string(), r.get(1).unwrap().to_string()))
                        }
                        _ => None,
                    });
                    let (seen, port) = got.unwrap_or_else(|| ("none".into(), "0".into()));
                    assert_eq!(seen, v.to_string(), "client {id} read stale data on {port}");
                    let port: u16 = port.parse().unwrap();
                    assert_ne!(port, paused, "a read went to the paused replica");
                    if port != primary {
                        on_replica += 1;
                        break;
                    }
                }
            }
            on_replica
        }));
    }
    let mut replica_reads = 0;
    for t in tasks {
        replica_reads += t.await.unwrap();
    }
    // read-your-writes did not simply send everything to the primary: every write was
    // followed by a fresh read on the replica that was not paused
    assert_eq!(
        replica_reads,
        20 * 4,
        "reads after writes that never reached a replica"
    );

    // eventual: the paused replica is over max_replica_lag_bytes once the monitor sees it
    let admin = connect_str(&px.conn_str("postgres", "pgmux", None)).await;
    // app_ev's monitor starts with its first client
    let ev = connect(&px, "app_ev").await;
    one(&ev, "SELECT 1").await;
    let paused_s = paused.to_string();
    wait_until_async("the paused replica's lag to show", WAIT, || async {
        let rows = admin.simple_query("SHOW HOSTS").await.unwrap();
        rows.iter().any(|m| match m {
            SimpleQueryMessage::Row(r) => {
                r.get(1) == Some(paused_s.as_str())
                    && r.get(7) == Some("app_ev")
                    && r.get(4)
                        .and_then(|b| b.parse::<u64>().ok())
                        .is_some_and(|b| b > 1)
            }
            _ => false,
        })
    })
    .await;
    for _ in 0..40 {
        let p: u16 = one(&ev, "SELECT inet_server_port()").await.parse().unwrap();
        // the other replica may briefly lag too (then the primary serves): what must never
        // happen is a read on the replica whose replay is paused
        assert_ne!(p, paused, "an eventual read went to the lagging replica");
    }
    cluster.replicas()[0].psql("postgres", "SELECT pg_wal_replay_resume()");
    cluster.wait_replicas_caught_up();

    // a replica stopped under load: no read sees an error (one in flight on the stopped
    // replica is sent again elsewhere), the replica is banned and used again once it is back
    // (tests/read_retry.rs does this with more clients, every query form and pgbench)
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..6 {
        let px = px.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut c = connect(&px, "app_ev").await;
            let mut errors = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(e) = try_one(&c, "SELECT inet_server_port()").await {
                    errors.push(e.to_string());
                    c = connect(&px, "app_ev").await;
                }
            }
            errors
        }));
    }
    let victim = &cluster.replicas()[1];
    victim.stop("fast");
    let victim_s = victim.port.to_string();
    wait_until_async("the stopped replica to be banned", WAIT, || async {
        let rows = admin.simple_query("SHOW HOSTS").await.unwrap();
        rows.iter().any(|m| match m {
            SimpleQueryMessage::Row(r) => {
                r.get(1) == Some(victim_s.as_str())
                    && r.get(7) == Some("app_ev")
                    && r.get(6) == Some("1")
            }
            _ => false,
        })
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in load {
        let errors = t.await.unwrap();
        assert!(errors.is_empty(), "reads failed: {errors:?}");
    }
    // now with the replica down: every read succeeds, none on the stopped one
    let c = connect(&px, "app_ev").await;
    for _ in 0..30 {
        let p: u16 = one(&c, "SELECT inet_server_port()").await.parse().unwrap();
        assert_ne!(p, victim.port);
    }
    victim.start();
    wait_until_async(
        "the restarted replica to take reads again",
        WAIT,
        || async {
            let p: u16 = one(&c, "SELECT inet_server_port()").await.parse().unwrap();
            p == victim.port
        },
    )
    .await;
}

/// pgmux in front of all of `cluster`'s hosts, with no roles configured, checking them every
/// 0.1 s; `app` is also an admin.
fn start_unconfigured(cluster: &PgCluster) -> Pgmux {
    let hosts = std::iter::once(cluster.primary().port)
        .chain(cluster.replicas().iter().map(|r| r.port))
        .map(|p| format!("{{ host = \"127.0.0.1\", port = {p} }}"))
        .collect::<Vec<_>>()
        .join(", ");
    Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
server_connect_timeout = 2
admin_users = ["app"]
[[users]]
name = "app"
password = "secret"
[[databases]]
name = "app"
hosts = [ {hosts} ]
read_write_split = true
lag_check_interval = 0.1
ban_time = 1
"#
    ))
}

/// A new primary with `replicas` replicas, pgmux over it without roles, an admin console,
/// and a client that created `table (port int)`.
async fn unconfigured_scene(
    replicas: usize,
    table: &str,
) -> (PgCluster, Pgmux, common::probe::Console, Client) {
    let cluster = PgCluster::start(replicas);
    let px = start_unconfigured(&cluster);
    let console = common::probe::Console::connect(&px, "app", Some("secret")).await;
    let c = connect(&px, "app").await;
    c.batch_execute(&format!("CREATE TABLE {table} (port int)"))
        .await
        .unwrap();
    (cluster, px, console, c)
}

/// Sends `sql` from a new client while there is no primary, and returns it once pgmux
/// shows the client waiting (panics if it ends first). A write that meets a pooled connection
/// the stopping server closed before pgmux noticed fails as it would straight to PostgreSQL
/// (`08006`, `57P01`); it is sent again from a new client, a few times at most.
async fn waiting_for_a_primary(
    px: &Pgmux,
    console: &common::probe::Console,
    sql: &'static str,
) -> tokio::task::JoinHandle<Result<String, String>> {
    for _ in 0..5 {
        let c = connect(px, "app").await;
        let waiting = tokio::spawn(async move {
            try_one(&c, sql).await.map_err(|e| {
                let code = e.as_db_error().map(|d| d.code().code().to_string());
                format!("{} {e}", code.unwrap_or_default())
            })
        });
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if waiting.is_finished() {
                match waiting.await.unwrap() {
                    Err(e)
                        if e.contains("08006") || e.contains("57P01") || e.contains("closed") =>
                    {
                        eprintln!("the write met a closed server connection: {e}");
                        break;
                    }
                    got => panic!("the write ended while there was no primary: {got:?}"),
                }
            }
            let clients = console.show("SHOW CLIENTS").await;
            if clients
                .iter()
                .any(|r| r["database"] == "app" && r["state"] == "waiting")
            {
                return waiting;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the write not waiting after {WAIT:?}: {clients:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("every write met a closed server connection");
}

/// A restart of the primary costs a write a wait, not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_through_a_primary_restart() {
    let (cluster, px, console, c) = unconfigured_scene(1, "restarted").await;
    let write = "INSERT INTO restarted VALUES (inet_server_port()) RETURNING port";
    let port = cluster.primary().port.to_string();
    assert_eq!(one(&c, write).await, port);
    cluster.primary().stop("fast");
    let waiting = waiting_for_a_primary(&px, &console, write).await;
    cluster.primary().start();
    assert_eq!(
        waiting.await.unwrap(),
        Ok(port),
        "the write across the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_a_promotion_without_touching_pgmux() {
    let (cluster, px, console, c) = unconfigured_scene(2, "failover").await;
    let write = "INSERT INTO failover VALUES (inet_server_port()) RETURNING port";
    assert_eq!(one(&c, write).await, cluster.primary().port.to_string());

    let writer = connect(&px, "app").await;
    assert_eq!(
        one(&writer, write).await,
        cluster.primary().port.to_string()
    );
    cluster.primary().stop("fast");
    // once pgmux has seen the primary go (a write sent before that may meet the shutdown
    // itself, as it would straight to PostgreSQL)...
    let old = cluster.primary().port.to_string();
    wait_until_async("pgmux to see the primary down", WAIT, || async {
        let hosts = console.show("SHOW HOSTS").await;
        hosts
            .iter()
            .any(|h| h["port"] == old && h["health"] != "up")
    })
    .await;
    // ...a failover is a wait: a write sent while there is no primary waits for one (within
    // server_login_retry) and runs on the promoted replica
    let waiting = waiting_for_a_primary(&px, &console, write).await;
    // a client that has just written (its read-your-writes floor not yet on any replica)
    // rolls back outside a transaction, as drivers clean up: it reads nothing, so a replica
    // answers it at once instead of the missing primary
    for sql in ["ROLLBACK", "COMMIT; ROLLBACK"] {
        writer
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql} after a write: {e}"));
    }
    let new = &cluster.replicas()[0];
    new.promote();
    let new_port = new.port.to_string();
    assert_eq!(
        waiting.await.unwrap(),
        Ok(new_port.clone()),
        "the write across the failover"
    );

    // after server_login_retry without a primary, a write gets a clear error, never silence
    console
        .client
        .simple_query("SET server_login_retry = 0.5")
        .await
        .unwrap();
    new.stop("fast");
    let c = connect(&px, "app").await;
    let err = c.simple_query(write).await.unwrap_err();
    let code = err.as_db_error().map(|e| e.code().code().to_string());
    assert!(
        matches!(code.as_deref(), Some("57P03") | Some("08006")),
        "unexpected error: {err:?}"
    );
}

/// The host monitors run from pgmux's start, without any client: the very first query of the
/// first client of a replica-only alias runs on a replica. A database added by a reload is
/// monitored at once too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_monitors_run_from_start_so_the_first_read_finds_a_replica() {
    let cluster = PgCluster::shared_with_replicas();
    let px = start(cluster, "", "consistency = \"eventual\"");
    let (primary, replicas) = ports(cluster);
    let admin = common::probe::Console::connect(&px, "postgres", None).await;
    // monitored hosts show their lag; hosts nobody monitors are only probed (lag NULL). Both
    // figures: a replica whose lag in time is not known yet takes no reads
    let monitored = |db: &'static str| {
        let admin = &admin;
        let replicas = &replicas;
        move || async move {
            let hosts = admin.show("SHOW HOSTS").await;
            replicas.iter().all(|p| {
                hosts.iter().any(|r| {
                    r["database"] == db
                        && r["port"] == p.to_string()
                        && r["role"] == "replica"
                        && r["health"] == "up"
                        && !r["lag_bytes"].is_empty()
                        && !r["lag_seconds"].is_empty()
                })
            })
        }
    };
    wait_until_async("app_ro's replicas to be checked", WAIT, monitored("app_ro")).await;
    let pools = admin.show("SHOW POOLS").await;
    assert!(
        pools.iter().all(|p| p["database"] != "app_ro"),
        "a client used app_ro before the check: {pools:?}"
    );
    let ro = connect(&px, "app_ro").await;
    let first: u16 = one(&ro, "SELECT inet_server_port()").await.parse().unwrap();
    assert!(
        replicas.contains(&first),
        "the first read ran on {first}, not a replica"
    );
    // one row per host, sharing the one client: counted once, so the rows add up
    let rows: Vec<_> = admin
        .show("SHOW POOLS")
        .await
        .into_iter()
        .filter(|p| p["database"] == "app_ro")
        .collect();
    let clients: i64 = rows
        .iter()
        .map(|p| p["cl_active"].parse::<i64>().unwrap())
        .sum();
    assert_eq!(clients, 1, "{rows:?}");

    // a reload that adds a database starts its monitor at once
    let config = std::fs::read_to_string(&px.config_path).unwrap();
    let reps = replicas
        .iter()
        .map(|p| format!("{{ host = \"127.0.0.1\", port = {p} }}"))
        .collect::<Vec<_>>()
        .join(", ");
    // with the lag limits `start` gives the other databases, out of reach: on a busy machine
    // the replicas may fall a second behind, and the read would rightly go to the primary
    let added = format!(
        "{config}\n[[databases]]\nname = \"app_ro2\"\ndbname = \"app\"\nhost = \"127.0.0.1\"\n\
         port = {primary}\nroute = \"replica\"\nreplicas = [ {reps} ]\nlag_check_interval = 0.1\n\
         max_replica_lag_bytes = 1099511627776\nmax_replica_lag_ms = 3600000\n"
    );
    std::fs::write(&px.config_path, added).unwrap();
    admin.client.simple_query("RELOAD").await.unwrap();
    wait_until_async(
        "app_ro2's replicas to be checked",
        WAIT,
        monitored("app_ro2"),
    )
    .await;
    let ro2 = connect(&px, "app_ro2").await;
    let first: u16 = one(&ro2, "SELECT inet_server_port()")
        .await
        .parse()
        .unwrap();
    assert!(replicas.contains(&first), "the first read ran on {first}");
}

/// `SET pgmux.route` / `pgmux.min_lsn` in every form: inside a transaction (kept at COMMIT,
/// dropped at ROLLBACK, SET LOCAL routes nothing), among other statements of one simple
/// Query, over the extended protocol (`query`, `query_typed`) and from psql; a value set on a
/// server never reaches another client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgmux_settings_are_honoured_in_every_form() {
    let cluster = PgCluster::shared_with_replicas();
    let px = start(cluster, "", "consistency = \"eventual\"");
    warm_up(&px, cluster).await;
    let (primary, replicas) = ports(cluster);
    let c = connect(&px, "app").await;
    // every one of a few reads on the primary, or every one on a replica
    async fn reads_on(c: &Client, primary: u16, want_primary: bool, what: &str) {
        for _ in 0..5 {
            let p: u16 = one(c, "SELECT inet_server_port()").await.parse().unwrap();
            assert_eq!(p == primary, want_primary, "{what}: a read ran on {p}");
        }
    }
    let first: u16 = one(&c, "SELECT inet_server_port()").await.parse().unwrap();
    assert!(replicas.contains(&first));

    // in a transaction: taken at COMMIT (PRIMARY is a reserved word in PostgreSQL's grammar:
    // the server wants it quoted)
    for sql in ["BEGIN", "SET pgmux.route = 'primary'", "COMMIT"] {
        c.simple_query(sql).await.unwrap();
    }
    reads_on(&c, primary, true, "after SET in a committed transaction").await;
    // rolled back: no change
    for sql in ["BEGIN", "SET pgmux.route = replica", "ROLLBACK"] {
        c.simple_query(sql).await.unwrap();
    }
    reads_on(&c, primary, true, "after SET in a rolled-back transaction").await;
    // SET LOCAL lasts for its transaction only
    for sql in ["BEGIN", "SET LOCAL pgmux.route = replica", "COMMIT"] {
        c.simple_query(sql).await.unwrap();
    }
    reads_on(&c, primary, true, "after SET LOCAL").await;
    for sql in ["BEGIN", "RESET pgmux.route", "COMMIT"] {
        c.simple_query(sql).await.unwrap();
    }
    reads_on(&c, primary, false, "after RESET in a transaction").await;

    // several statements in one simple Query
    c.simple_query("SET pgmux.route = 'primary'; SELECT 1")
        .await
        .unwrap();
    reads_on(&c, primary, true, "after SET among other statements").await;
    c.simple_query("SELECT 1; RESET pgmux.route").await.unwrap();
    reads_on(&c, primary, false, "after RESET among other statements").await;
    // a bad value is still refused before anything runs
    let err = c
        .simple_query("SET pgmux.route = sideways; SELECT 1")
        .await
        .unwrap_err();
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("22023"));

    // extended protocol: a named statement (query) and the unnamed one (query_typed)
    c.query("SET pgmux.route = 'primary'", &[]).await.unwrap();
    reads_on(&c, primary, true, "after SET by query").await;
    c.query_typed("RESET pgmux.route", &[]).await.unwrap();
    reads_on(&c, primary, false, "after RESET by query_typed").await;
    // a floor no replica has reached sends reads to the primary, until it is reset
    c.query_typed("SET pgmux.min_lsn = 'FFFFFFFF/0'", &[])
        .await
        .unwrap();
    reads_on(&c, primary, true, "with an unreachable min_lsn").await;
    for sql in ["BEGIN", "SET pgmux.min_lsn TO DEFAULT", "COMMIT"] {
        c.simple_query(sql).await.unwrap();
    }
    reads_on(&c, primary, false, "after min_lsn TO DEFAULT").await;

    // a server that ran a client's SET sheds it before another client uses it (the pool
    // lends its most recently returned server first, so the next unit usually gets it)
    for sql in ["BEGIN", "SET pgmux.route = 'primary'", "COMMIT"] {
        c.simple_query(sql).await.unwrap();
    }
    let other = connect(&px, "app").await;
    for sql in ["BEGIN", "SET statement_timeout = '5s'", "COMMIT"] {
        other.simple_query(sql).await.unwrap();
    }
    reads_on(
        &other,
        primary,
        false,
        "another client after a server-side SET",
    )
    .await;
    reads_on(&c, primary, true, "the client that set it").await;

    // psql: each -c is its own simple Query in one session
    let psql = |args: &[&str]| {
        let mut cmd = std::process::Command::new("psql");
        cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(px.conn_str("app", "app", Some("secret")));
        for a in args {
            cmd.args(["-c", a]);
        }
        let out = cmd.output().expect("run psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = psql(&[
        "BEGIN",
        "SET pgmux.route = 'primary'",
        "COMMIT",
        "SELECT inet_server_port()",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().last(),
        Some(primary.to_string().as_str()),
        "{out}"
    );
    let (ok, out, err) = psql(&[
        "SET pgmux.route = 'primary'; SELECT 1",
        "SELECT inet_server_port()",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().last(),
        Some(primary.to_string().as_str()),
        "{out}"
    );
    let (ok, _, err) = psql(&["SET pgmux.route = sideways; SELECT 1"]);
    assert!(!ok && err.contains("pgmux.route must be"), "{err}");
}

/// Waits until a replica of `cluster` runs a query whose text ends with `marker`.
fn wait_running_on_a_replica(cluster: &PgCluster, marker: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{marker}' \
         AND state = 'active' AND pid <> pg_backend_pid()"
    );
    wait_until("the read to run on a replica", WAIT, || {
        cluster
            .replicas()
            .iter()
            .any(|r| cluster.psql(r, "postgres", &sql) == "1")
    });
}

/// The port in the first row of an answer (`inet_server_port()`): the server that ran it.
fn port_of(msgs: &[(u8, Vec<u8>)]) -> u16 {
    let (_, row) = msgs
        .iter()
        .find(|(t, _)| *t == b'D')
        .unwrap_or_else(|| panic!("no row: {:?}", common::raw::error_code(msgs)));
    String::from_utf8_lossy(&row[6..]).parse().unwrap()
}

/// A client that pipelines a write behind a read already running on a replica (libpq
/// pipeline mode, pgx batches): the write waits for the read's end and is routed on its own,
/// to the primary, instead of following the read to the replica (25006 there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_pipelined_behind_a_replica_read_goes_to_the_primary() {
    use common::raw::{error_code, login, query, until_ready};
    use std::io::Write;
    // its own cluster: its write, behind a long read, must not make the shared replicas lag
    // under other tests' first reads
    let cluster = &PgCluster::start(2);
    let px = start(cluster, "", "consistency = \"eventual\"");
    warm_up(&px, cluster).await;
    let (primary, replicas) = ports(cluster);
    let c = connect(&px, "app").await;
    c.simple_query("CREATE TABLE IF NOT EXISTS rw_pipe (id serial PRIMARY KEY, port int)")
        .await
        .unwrap();
    let (mut s, _) = login(px.port, "app", "app");
    s.write_all(&query(
        "SELECT inet_server_port() FROM pg_sleep(2) /*pipelined read*/",
    ))
    .unwrap();
    wait_running_on_a_replica(cluster, "/*pipelined read*/");
    s.write_all(&query(
        "INSERT INTO rw_pipe (port) VALUES (inet_server_port()) RETURNING port",
    ))
    .unwrap();
    let read = until_ready(&mut s);
    assert!(replicas.contains(&port_of(&read)), "{read:?}");
    let write = until_ready(&mut s);
    assert_eq!(error_code(&write), None, "the write failed");
    assert_eq!(port_of(&write), primary);
}

/// A write in the same extended-protocol unit as a read, sent after it (psycopg's pipeline
/// mode; here sent once pgmux has read the read's part): the unit is routed once its Sync
/// has arrived, so it runs on the primary, not on the replica the read alone would pick
/// (25006 there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_later_in_the_same_extended_unit_goes_to_the_primary() {
    use common::raw::{error_code, login, msg, until_ready};
    use std::io::Write;
    let cluster = PgCluster::shared_with_replicas();
    let px = start(cluster, "", "consistency = \"eventual\"");
    warm_up(&px, cluster).await;
    let (primary, _) = ports(cluster);
    let c = connect(&px, "app").await;
    c.simple_query("CREATE TABLE IF NOT EXISTS rw_unit (port int)")
        .await
        .unwrap();
    let console = common::probe::Console::connect(&px, "postgres", None).await;
    let received = || async {
        let rows = console.show("SHOW STATS_TOTALS").await;
        let app = rows.iter().find(|r| r["database"] == "app").unwrap();
        app["bytes_received"].parse::<u64>().unwrap()
    };
    for _ in 0..3 {
        let (mut s, _) = login(px.port, "app", "app");
        let first = exec("SELECT inet_server_port()");
        let before = received().await;
        s.write_all(&first).unwrap();
        // pgmux has read the read's part before the rest of the unit is sent
        wait_until_async("the first part read", WAIT, || async {
            received().await >= before + first.len() as u64
        })
        .await;
        s.write_all(
            &[
                exec("INSERT INTO rw_unit VALUES (inet_server_port()) RETURNING port"),
                msg(b'S', b""),
            ]
            .concat(),
        )
        .unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(error_code(&answers), None, "{answers:?}");
        let ports: Vec<u16> = answers
            .iter()
            .filter(|(t, _)| *t == b'D')
            .map(|(_, row)| String::from_utf8_lossy(&row[6..]).parse().unwrap())
            .collect();
        assert_eq!(ports, vec![primary, primary]);
    }
}

/// With `default_transaction_isolation = serializable` a hot standby refuses every statement
/// (0A000 cannot use serializable mode in a hot standby): the client's reads go to the
/// primary, as a `BEGIN ISOLATION LEVEL SERIALIZABLE` does, and back to replicas after RESET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_by_default_reads_on_the_primary() {
    let cluster = PgCluster::shared_with_replicas();
    let px = start(cluster, "", "consistency = \"eventual\"");
    warm_up(&px, cluster).await;
    let (primary, replicas) = ports(cluster);
    let c = connect(&px, "app").await;
    let port = |rows: Vec<SimpleQueryMessage>| -> u16 {
        rows.iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
                _ => None,
            })
            .unwrap()
    };
    c.simple_query("SET default_transaction_isolation = 'serializable'")
        .await
        .unwrap();
    for _ in 0..5 {
        let rows = c.simple_query("SELECT inet_server_port()").await.unwrap();
        assert_eq!(port(rows), primary);
        let typed = c.query("SELECT inet_server_port()", &[]).await.unwrap();
        assert_eq!(typed[0].get::<_, i32>(0) as u16, primary);
    }
    // the same from the startup packet
    let opt = connect_str(&format!(
        "{} options='-c default_transaction_isolation=serializable'",
        px.conn_str("app", "app", Some("secret"))
    ))
    .await;
    let rows = opt.simple_query("SELECT inet_server_port()").await.unwrap();
    assert_eq!(port(rows), primary);
    c.simple_query("RESET default_transaction_isolation")
        .await
        .unwrap();
    wait_until_async("reads on a replica again", WAIT, || async {
        let rows = c.simple_query("SELECT inet_server_port()").await.unwrap();
        replicas.contains(&port(rows))
    })
    .await;
}

/// A replica-only alias whose replicas are all unusable: a read falls back to the primary
/// (`primary_reads = "fallback"`), but a write is refused with 57P03 instead of being run on
/// the primary, where the client asked for a replica only; so is a write the client routes to
/// replicas with `pgmux.route`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_that_may_write_never_falls_back_from_replicas_to_the_primary() {
    let cluster = PgCluster::shared_with_replicas();
    let (primary, _) = ports(cluster);
    let dead = common::free_port();
    let px = Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
[[users]]
name = "app"
password = "secret"
[[databases]]
name = "app_ro"
dbname = "app"
host = "127.0.0.1"
port = {primary}
route = "replica"
replicas = [ {{ host = "127.0.0.1", port = {dead} }} ]
lag_check_interval = 0.1
[[databases]]
name = "app"
host = "127.0.0.1"
port = {primary}
read_write_split = true
replicas = [ {{ host = "127.0.0.1", port = {dead} }} ]
lag_check_interval = 0.1
"#
    ));
    let rw = connect(&px, "app").await;
    rw.simple_query("CREATE TABLE IF NOT EXISTS never_via_ro (a int); TRUNCATE never_via_ro")
        .await
        .unwrap();
    let ro = connect(&px, "app_ro").await;
    assert_eq!(
        one(&ro, "SELECT inet_server_port()").await,
        primary.to_string(),
        "a read through the alias did not fall back to the primary"
    );
    rw.simple_query("SET pgmux.route = replica").await.unwrap();
    for (through, c) in [("the alias", &ro), ("pgmux.route = replica", &rw)] {
        let err = c
            .simple_query("INSERT INTO never_via_ro VALUES (1)")
            .await
            .unwrap_err();
        assert_eq!(
            err.as_db_error().map(|e| e.code().code()),
            Some("57P03"),
            "a write through {through}: {err}"
        );
    }
    rw.simple_query("RESET pgmux.route").await.unwrap();
    assert_eq!(one(&rw, "SELECT count(*) FROM never_via_ro").await, "0");
}

/// pgmux started while the primary is down: new clients still log in (with a replica's
/// parameters) and read from the replicas; writes get a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_log_in_and_read_while_the_primary_is_down() {
    let cluster = &PgCluster::start(2);
    let (_, replicas) = ports(cluster);
    cluster.primary().stop("fast");
    let px = start(
        cluster,
        "server_connect_timeout = 2",
        "consistency = \"eventual\"",
    );
    let c = connect(&px, "app").await;
    wait_until_async("reads to reach a replica", WAIT, || async {
        try_one(&c, "SELECT inet_server_port()")
            .await
            .is_ok_and(|p| replicas.contains(&p.parse().unwrap()))
    })
    .await;
    let err = c
        .simple_query("CREATE TABLE primary_down (a int)")
        .await
        .unwrap_err();
    let code = err.as_db_error().map(|e| e.code().code().to_string());
    assert!(
        matches!(code.as_deref(), Some("57P03" | "08006")),
        "{err:?}"
    );
    // outside a transaction, COMMIT and ROLLBACK draw only PostgreSQL's warning, which a
    // replica gives as well: drivers' clean-up ROLLBACKs do not fail for want of a primary
    for sql in ["ROLLBACK", "COMMIT", "ABORT", "END"] {
        c.simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    c.execute("ROLLBACK", &[])
        .await
        .expect("ROLLBACK, extended");
    let err = c.simple_query("SAVEPOINT s").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25P01"), "{err}");
    // the replica-only alias too
    let ro = connect(&px, "app_ro").await;
    wait_until_async("the alias to read on a replica", WAIT, || async {
        try_one(&ro, "SELECT inet_server_port()")
            .await
            .is_ok_and(|p| replicas.contains(&p.parse().unwrap()))
    })
    .await;
}

/// Work a client forces onto the primary (a hint, `SET pgmux.route = primary`) is taken to
/// write: with replay paused on the only replica, the client's next read must see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_covers_work_forced_onto_the_primary() {
    let cluster = PgCluster::start(1);
    let (primary, replicas) = ports(&cluster);
    let px = start(
        &cluster,
        "",
        "max_replica_lag_bytes = 0\nmax_replica_lag_ms = 0",
    );
    warm_up(&px, &cluster).await;
    cluster.primary().psql(
        "app",
        "CREATE TABLE forced (v int); INSERT INTO forced VALUES (0); GRANT ALL ON forced TO app;
         CREATE FUNCTION bump(x int) RETURNS int LANGUAGE sql AS
           'UPDATE forced SET v = x RETURNING v';",
    );
    cluster.wait_replicas_caught_up();
    let c = connect(&px, "app").await;
    // the classifier sees a read in `SELECT bump(..)`: before any forced write, reads go to
    // the replica
    wait_until_async("a read on the replica", WAIT, || async {
        one(&c, "SELECT inet_server_port()").await == replicas[0].to_string()
    })
    .await;
    cluster.replicas()[0].psql("postgres", "SELECT pg_wal_replay_pause()");

    let read = "SELECT v, inet_server_port() FROM forced";
    let row = |msgs: Vec<SimpleQueryMessage>| {
        msgs.iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    Some(format!("{} on {}", r.get(0).unwrap(), r.get(1).unwrap()))
                }
                _ => None,
            })
            .unwrap()
    };
    one(&c, "/* pgmux:primary */ SELECT bump(1)").await;
    assert_eq!(
        row(c.simple_query(read).await.unwrap()),
        format!("1 on {primary}"),
        "the read after a hinted write"
    );

    c.simple_query("SET pgmux.route = primary").await.unwrap();
    one(&c, "SELECT bump(2)").await;
    c.simple_query("RESET pgmux.route").await.unwrap();
    assert_eq!(
        row(c.simple_query(read).await.unwrap()),
        format!("2 on {primary}"),
        "the read after a write under pgmux.route = primary"
    );

    cluster.replicas()[0].psql("postgres", "SELECT pg_wal_replay_resume()");
    // once the replica has replayed the writes, reads go back to it
    wait_until_async("reads back on the replica", WAIT, || async {
        row(c.simple_query(read).await.unwrap()) == format!("2 on {}", replicas[0])
    })
    .await;
}

/// What pools and drivers send at every hand-back or login (asyncpg's reset: advisory
/// unlocks, CLOSE ALL, UNLISTEN *, RESET ALL; pgjdbc's SET extra_float_digits) changes no
/// data: under read-your-writes the reads after it still go to the replicas, while a real
/// write keeps them on the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_commands_do_not_hold_reads_on_the_primary() {
    let cluster = PgCluster::shared_with_replicas();
    let px = start(cluster, "", "");
    warm_up(&px, cluster).await;
    let (primary, replicas) = ports(cluster);
    let c = connect(&px, "app").await;
    let read = "SELECT inet_server_port()";
    for reset in [
        "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;",
        "SET extra_float_digits = 3",
        "SET application_name = 'x'",
    ] {
        c.batch_execute(reset).await.unwrap();
        let p: u16 = one(&c, read).await.parse().unwrap();
        assert!(replicas.contains(&p), "a read after {reset:?} ran on {p}");
    }
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS ryw_session (a int); INSERT INTO ryw_session VALUES (1)",
    )
    .await
    .unwrap();
    let p: u16 = one(&c, read).await.parse().unwrap();
    assert_eq!(p, primary, "a read right after a write");
}

/// A Query after an extended unit left without its Sync (Parse, Describe, Flush: asyncpg's
/// prepare before a COPY) ends that unit, as a Sync would: the read's server goes back after
/// the Query's ReadyForQuery, and the client's next unit is answered. The Query used to leave
/// the client waiting forever for the server that would not go back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_after_a_flushed_unit_ends_it() {
    use common::raw::{error_code, login, msg, query, tags, until_ready, until_tag};
    use std::io::Write;
    let cluster = PgCluster::shared_with_replicas();
    let px = start(cluster, "", "consistency = \"eventual\"");
    warm_up(&px, cluster).await;
    let (mut s, _) = login(px.port, "app", "app");
    let describe = |name: &str, sql: &str| {
        let mut out = msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes());
        out.extend(msg(b'D', format!("S{name}\0").as_bytes()));
        out.extend(msg(b'H', b""));
        out
    };
    let until = |s: &mut std::net::TcpStream, tag: u8| tags(&until_tag(s, tag));
    for round in 0..3 {
        s.write_all(&describe(&format!("d{round}"), "SELECT 1"))
            .unwrap();
        assert_eq!(until(&mut s, b'T'), "1tT", "round {round}: the Describe");
        s.write_all(&query("SELECT 2")).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(error_code(&answers), None, "{answers:?}");
        // read timeout 30 s: a hang fails here
        s.write_all(&describe(&format!("e{round}"), "SELECT 11"))
            .unwrap();
        assert_eq!(until(&mut s, b'T'), "1tT", "round {round}: the next unit");
        s.write_all(&msg(b'S', b"")).unwrap();
        assert_eq!(until(&mut s, b'Z'), "Z", "round {round}: its Sync");
    }
}

/// asyncpg's `copy_records_to_table`: Parse and Describe of a `SELECT` of the table, Flush,
/// then `COPY ... FROM STDIN` as a Query. The read goes to a replica; the Query must not (a
/// standby refuses it with 25006): pgmux ends the read with a Sync of its own, whose
/// ReadyForQuery the client never sees, and routes the Query on its own. A write Query, or a
/// write's Parse (psycopg's pipeline mode), after a flushed read reaches the primary the
/// same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_a_flushed_read_reaches_the_primary() {
    use common::raw::{error_code, login, msg, query, tags, until_ready, until_tag};
    use std::io::Write;
    let cluster = PgCluster::shared_with_replicas();
    let (px, _c) = flushed_copy_scene(cluster, "", "").await;
    let (primary, replicas) = ports(cluster);
    // the Describe below must find the table on whichever replica it reaches
    for r in cluster.replicas() {
        wait_until_async("the table on the replica", WAIT, || async {
            r.try_psql("app", "SELECT 1 FROM flushed_copy LIMIT 1")
                .is_ok()
        })
        .await;
    }
    let (mut s, _) = login(px.port, "app", "app");
    let describe_port = |s: &mut std::net::TcpStream| {
        let mut out = msg(
            b'P',
            b"\0SELECT a, inet_server_port() FROM flushed_copy LIMIT 1\0\0\0",
        );
        out.extend(msg(b'D', b"S\0"));
        out.extend(msg(b'H', b""));
        s.write_all(&out).unwrap();
        let got = tags(&until_tag(s, b'T'));
        assert_eq!(got, "1tT", "the Describe, answered from the Flush");
    };
    for round in 0..3 {
        describe_port(&mut s);
        s.write_all(&query("COPY flushed_copy (a) FROM STDIN"))
            .unwrap();
        let got = until_tag(&mut s, b'G');
        assert_eq!(error_code(&got), None, "round {round}: {got:?}");
        let mut out = msg(b'd', format!("{round}\n").as_bytes());
        out.extend(msg(b'c', b""));
        s.write_all(&out).unwrap();
        let answers = until_ready(&mut s);
        let got_tags = tags(&answers);
        assert_eq!(got_tags, "CZ", "round {round}: {answers:?}");
        assert_eq!(answers[0].1, b"COPY 1\0");

        describe_port(&mut s);
        s.write_all(&query(
            "INSERT INTO flushed_copy VALUES (-1, inet_server_port()) RETURNING port",
        ))
        .unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(error_code(&answers), None, "{answers:?}");
        let got_tags = tags(&answers);
        assert_eq!(
            got_tags, "TDCZ",
            "one ReadyForQuery, the Query's: {answers:?}"
        );
        let row = &answers[1].1;
        let port: u16 = std::str::from_utf8(&row[6..]).unwrap().parse().unwrap();
        assert_eq!(port, primary, "round {round}");

        // psycopg's pipeline mode: a read executed up to a Flush, its rows fetched, then an
        // INSERT in the same unit; the INSERT's Parse ends the read
        let mut out = exec("SELECT inet_server_port()");
        out.extend(msg(b'H', b""));
        s.write_all(&out).unwrap();
        let got = until_tag(&mut s, b'C');
        let got_tags = tags(&got);
        assert_eq!(
            got_tags, "12DC",
            "round {round}: the read, up to its Flush: {got:?}"
        );
        let port: u16 = std::str::from_utf8(&got[2].1[6..])
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            replicas.contains(&port),
            "the read ran on a replica: {port}"
        );
        let mut out =
            exec("INSERT INTO flushed_copy VALUES (-2, inet_server_port()) RETURNING port");
        out.extend(msg(b'S', b""));
        s.write_all(&out).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(error_code(&answers), None, "{answers:?}");
        let got_tags = tags(&answers);
        assert_eq!(
            got_tags, "12DCZ",
            "one ReadyForQuery, the Sync's: {answers:?}"
        );
        let port: u16 = std::str::from_utf8(&answers[2].1[6..])
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(port, primary, "round {round}: the INSERT");

        // a portal suspended by a row limit may still be fetched from after another
        // statement: the unit stays on its replica
        let mut out = msg(b'P', b"\0SELECT generate_series(1, 3)\0\0\0");
        out.extend(msg(b'B', b"c\0\0\0\0\0\0\0\0"));
        out.extend(msg(b'E', b"c\0\0\0\0\x01"));
        out.extend(msg(b'H', b""));
        s.write_all(&out).unwrap();
        let got_tags = tags(&until_tag(&mut s, b's'));
        assert_eq!(got_tags, "12Ds", "one row, then suspended");
        let mut out = exec("SELECT 7");
        out.extend(msg(b'E', b"c\0\0\0\0\0"));
        out.extend(msg(b'S', b""));
        s.write_all(&out).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(
            error_code(&answers),
            None,
            "the portal is still there: {answers:?}"
        );
        let got_tags = tags(&answers);
        assert_eq!(got_tags, "12DCDDCZ", "{answers:?}");

        // a read Query after a flushed read is still answered, by a replica
        describe_port(&mut s);
        s.write_all(&query("SELECT inet_server_port()")).unwrap();
        let answers = until_ready(&mut s);
        let got_tags = tags(&answers);
        assert_eq!(got_tags, "TDCZ", "{answers:?}");
        let port: u16 = std::str::from_utf8(&answers[1].1[6..])
            .unwrap()
            .parse()
            .unwrap();
        assert!(replicas.contains(&port), "{port}");
    }
    // a malformed Bind behind a flushed read (no names in it) goes on to the replica, which
    // refuses it; the client is answered instead of left waiting
    let mut out = exec("SELECT inet_server_port()");
    out.extend(msg(b'H', b""));
    s.write_all(&out).unwrap();
    let got = until_tag(&mut s, b'C');
    let port: u16 = std::str::from_utf8(&got[2].1[6..])
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        replicas.contains(&port),
        "the read ran on a replica: {port}"
    );
    let mut out = msg(b'B', b"abcd");
    out.extend(msg(b'S', b""));
    s.write_all(&out).unwrap();
    let answers = until_ready(&mut s);
    assert_eq!(
        error_code(&answers).as_deref(),
        Some("08P01"),
        "{answers:?}"
    );
    let copied = cluster
        .primary()
        .psql("app", "SELECT count(*) FROM flushed_copy WHERE a >= 0");
    assert!(copied.parse::<u32>().unwrap() >= 3, "{copied}");
}

/// Parse, Bind and Execute of `sql` (unnamed statement and portal, no parameters, all rows).
fn exec(sql: &str) -> Vec<u8> {
    execute_rows(sql, 0)
}

/// `exec` fetching one row, then a Flush: a flushed read whose portal the row limit
/// suspends (answered `12Ds` when the query has more rows).
fn first_row_flushed(sql: &str) -> Vec<u8> {
    let mut out = execute_rows(sql, 1);
    out.extend(common::raw::msg(b'H', b""));
    out
}

fn execute_rows(sql: &str, max_rows: u32) -> Vec<u8> {
    use common::raw::msg;
    let mut out = msg(b'P', format!("\0{sql}\0\0\0").as_bytes());
    out.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
    let mut execute = vec![0];
    execute.extend(max_rows.to_be_bytes());
    out.extend(msg(b'E', &execute));
    out
}

/// pgmux over the replica cluster (eventual consistency, and `app_extra`), warmed up, with
/// the table `flushed_copy` on the primary; and a client of it.
async fn flushed_copy_scene(
    cluster: &PgCluster,
    general: &str,
    app_extra: &str,
) -> (Pgmux, Client) {
    let px = start(
        cluster,
        general,
        &format!("consistency = \"eventual\"\n{app_extra}"),
    );
    warm_up(&px, cluster).await;
    let c = connect(&px, "app").await;
    // several tests set this scene at once, and PostgreSQL's CREATE TABLE IF NOT EXISTS run
    // concurrently can fail (42710, the table's type already exists)
    static CREATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let creating = CREATING.lock().await;
    c.simple_query("CREATE TABLE IF NOT EXISTS flushed_copy (a int, port int)")
        .await
        .unwrap();
    drop(creating);
    (px, c)
}

/// The port an extended-protocol write ran on: Parse, Bind and Execute of an INSERT
/// returning `inet_server_port()`, then `tail` (a Sync, perhaps more), answered up to its
/// ReadyForQuery; the error's SQLSTATE if it failed.
/// pgx without a statement cache parses and describes the unnamed statement in one unit and
/// binds it in the next: the Bind's unit is routed by the text of the client's last unnamed
/// Parse (pgmux keeps it), and the server it lands on is given that Parse first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_statement_bound_in_a_later_unit_is_routed_by_its_text() {
    use common::raw::{error_code, login, msg, until_ready};
    use std::io::Write;
    let cluster = PgCluster::shared_with_replicas();
    let px = start(cluster, "", "consistency = \"eventual\"");
    warm_up(&px, cluster).await;
    let (primary, replicas) = ports(cluster);
    let c = connect(&px, "app").await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS rw_unnamed (port int)")
        .await
        .unwrap();
    let (mut s, _) = login(px.port, "app", "app");
    let mut send = |msgs: &[Vec<u8>]| {
        s.write_all(&msgs.concat()).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(error_code(&answers), None, "{answers:?}");
        answers
            .iter()
            .find(|(t, _)| *t == b'D')
            .map(|(_, row)| String::from_utf8_lossy(&row[6..]).parse::<u16>().unwrap())
    };
    let sync = || msg(b'S', b"");
    let bound = || {
        vec![
            msg(b'B', b"\0\0\0\0\0\0\0\0"),
            msg(b'E', b"\0\0\0\0\0"),
            sync(),
        ]
    };
    let write = "INSERT INTO rw_unnamed VALUES (inet_server_port()) RETURNING port";
    for round in 0..3 {
        for (sql, read) in [("SELECT inet_server_port()", true), (write, false)] {
            let parse = msg(b'P', format!("\0{sql}\0\0\0").as_bytes());
            send(&[parse, msg(b'D', b"S\0"), sync()]);
            let p = send(&bound()).expect("a row");
            match read {
                true => assert!(replicas.contains(&p), "round {round}: read on {p}"),
                false => assert_eq!(p, primary, "round {round}: write on {p}"),
            }
        }
    }
}

fn insert_port(s: &mut std::net::TcpStream, tail: &[u8]) -> Result<u16, String> {
    use common::raw::{error_code, until_ready};
    use std::io::Write;
    let mut out = exec("INSERT INTO flushed_copy VALUES (-3, inet_server_port()) RETURNING port");
    out.extend_from_slice(tail);
    s.write_all(&out).unwrap();
    let answers = until_ready(s);
    if let Some(code) = error_code(&answers) {
        return Err(code);
    }
    let row = answers.iter().find(|m| m.0 == b'D').expect("a row");
    Ok(std::str::from_utf8(&row.1[6..]).unwrap().parse().unwrap())
}

/// psycopg's pipeline mode sends a Flush right behind each Sync, often after the Sync's
/// ReadyForQuery, when no server is attached. Such a Flush has nothing to flush: it takes no
/// server (a replica lent for it used to keep serving the client, writes included, until a
/// Sync; 25006). A lone COMMIT or ROLLBACK sent to a replica without a Sync (class
/// `Transaction`) ends its unit there the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_flush_or_rollback_does_not_keep_a_replica() {
    use common::raw::{login, msg, until_tag};
    use std::io::Write;
    let cluster = PgCluster::shared_with_replicas();
    let (px, _c) = flushed_copy_scene(cluster, "", "").await;
    let (primary, _) = ports(cluster);
    let (mut s, _) = login(px.port, "app", "app");
    for round in 0..3 {
        s.write_all(&msg(b'H', b"")).unwrap();
        let port = insert_port(&mut s, &msg(b'S', b""));
        assert_eq!(port, Ok(primary), "round {round}: after a lone Flush");

        let mut out = exec("ROLLBACK");
        out.extend(msg(b'H', b""));
        s.write_all(&out).unwrap();
        // ParseComplete, BindComplete, then the WARNING (no transaction) and the tag
        until_tag(&mut s, b'C');
        let port = insert_port(&mut s, &msg(b'S', b""));
        assert_eq!(port, Ok(primary), "round {round}: after a flushed ROLLBACK");
    }
}

/// A Flush right behind a Sync, both sent while the server is attached (psycopg's pipeline
/// mode again): the server goes back to the pool at that Sync's ReadyForQuery. With a pool of
/// one, another client's write waits for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_behind_a_sync_lets_the_server_go_back() {
    use common::raw::{login, msg};
    let cluster = PgCluster::shared_with_replicas();
    let (px, c) = flushed_copy_scene(cluster, "query_wait_timeout = 5", "pool_size = 1").await;
    let (primary, _) = ports(cluster);
    let (mut s, _) = login(px.port, "app", "app");
    let mut tail = msg(b'S', b"");
    tail.extend(msg(b'H', b""));
    for round in 0..3 {
        assert_eq!(insert_port(&mut s, &tail), Ok(primary), "round {round}");
        // the one primary server is free again: this does not wait out query_wait_timeout
        let other = try_one(&c, "INSERT INTO flushed_copy VALUES (-4, 0) RETURNING a").await;
        assert_eq!(
            other.map_err(|e| e.to_string()),
            Ok("-4".to_string()),
            "round {round}"
        );
    }
}

/// A primary that refuses the login (its password changed under pgmux) is not a restart to
/// wait through: writes fail at once, with the server's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_on_the_primary_is_not_waited_for() {
    let (cluster, px, console, _) = unconfigured_scene(1, "refused").await;
    cluster
        .primary()
        .psql("postgres", "ALTER ROLE app PASSWORD 'changed'");
    // the restart ends the monitor's connection and the pooled ones
    cluster.primary().restart();
    wait_until_async("the monitor refused", WAIT, || async {
        let hosts = console.show("SHOW HOSTS").await;
        hosts.iter().any(|h| {
            h.get("last_error")
                .is_some_and(|e| e.contains("password authentication failed"))
        })
    })
    .await;
    let c = connect(&px, "app").await;
    let e = c
        .simple_query("INSERT INTO refused VALUES (1)")
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("password authentication failed")
            || e.as_db_error()
                .is_some_and(|d| d.message().contains("password authentication failed")),
        "{e:?}"
    );
}

/// State that pins its client is made on the primary, where its writes can follow: an
/// autocommit `SET LOCAL search_path` naming pg_temp (a read to the classifier), SQL
/// `PREPARE` and a `WITH HOLD` cursor; and a client pinned by the one unit a replica was lent
/// for keeps that server rather than waiting for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_that_pins_is_made_on_the_primary() {
    let cluster = PgCluster::shared_with_replicas();
    let px = start(cluster, "", "consistency = \"eventual\"");
    warm_up(&px, cluster).await;
    let (primary, _) = ports(cluster);
    let c = connect(&px, "app").await;
    c.simple_query("CREATE TABLE IF NOT EXISTS pin_w (x int)")
        .await
        .unwrap();
    for setup in [
        "SET LOCAL search_path = pg_temp, public",
        "PREPARE pin_p AS SELECT 1",
        "DECLARE pin_c CURSOR WITH HOLD FOR SELECT 1",
    ] {
        let c = connect(&px, "app").await;
        c.simple_query(setup).await.unwrap();
        let port = tokio::time::timeout(WAIT, one(&c, "SELECT inet_server_port()"))
            .await
            .unwrap_or_else(|_| panic!("the query after {setup:?} was never answered"));
        assert_eq!(port, primary.to_string(), "{setup}");
        c.simple_query("INSERT INTO pin_w VALUES (1)")
            .await
            .unwrap_or_else(|e| panic!("a write after {setup:?}: {e}"));
    }
    // an explicit replica hint still sends it there: pinned to the replica, the client
    // keeps that server for its next query instead of waiting for good
    let c = connect(&px, "app").await;
    c.simple_query("/* pgmux:replica */ SET LOCAL search_path = pg_temp, public")
        .await
        .unwrap();
    let port = tokio::time::timeout(WAIT, one(&c, "SELECT inet_server_port()"))
        .await
        .expect("the query after a pin on a replica was never answered");
    assert_ne!(port, primary.to_string());
}

/// pgx's CopyFrom goes on sending rows after the server refused one, then CopyDone: those
/// arrive after the failed COPY's ReadyForQuery gave the server back, and PostgreSQL ignores
/// them. The unit behind them (a Query, or extended messages up to a Query, with no Sync)
/// must still be routed and answered: pgmux waited for a Sync that never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_messages_after_a_failed_copy_do_not_hold_back_what_follows() {
    use common::raw::{error_code, login, msg, query, read_msg, until_ready};
    use std::io::Write;
    let cluster = PgCluster::shared_with_replicas();
    let px = start(cluster, "", "consistency = \"eventual\"");
    warm_up(&px, cluster).await;
    let c = connect(&px, "app").await;
    c.simple_query("CREATE TABLE IF NOT EXISTS stray_copy (a int NOT NULL, s text NOT NULL)")
        .await
        .unwrap();
    // the reads below must find the table on whichever replica they reach
    for r in cluster.replicas() {
        wait_until_async("the table on the replica", WAIT, || async {
            r.try_psql("app", "SELECT 1 FROM stray_copy LIMIT 1")
                .is_ok()
        })
        .await;
    }
    let (mut s, _) = login(px.port, "app", "app");
    use common::raw::tags;
    for round in 0..3 {
        s.write_all(&query("COPY stray_copy (a, s) FROM STDIN"))
            .unwrap();
        let got = common::raw::until_tag(&mut s, b'G');
        assert_eq!(tags(&got), "G", "round {round}: {got:?}");
        s.write_all(&msg(b'd', b"1\t\\N\n")).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(
            error_code(&answers).as_deref(),
            Some("23502"),
            "{answers:?}"
        );
        assert_eq!(tags(&answers), "EZ");
        // the client, unaware, sends the rest of its rows and CopyDone, then reads
        let mut out = msg(b'd', b"2\tx\n");
        out.extend(msg(b'c', b""));
        out.extend(msg(b'f', b"given up\0"));
        out.extend(query("SELECT count(*) FROM stray_copy WHERE a = 2"));
        s.write_all(&out).unwrap();
        // read timeout 30 s: a hang fails here
        let answers = until_ready(&mut s);
        assert_eq!(tags(&answers), "TDCZ", "round {round}: {answers:?}");
        assert_eq!(answers[1].1, b"\0\x01\0\0\0\x010", "nothing was copied");

        // extended messages up to a Query, no Sync: PostgreSQL answers them all
        let mut out = msg(b'd', b"3\tx\n");
        out.extend(msg(
            b'P',
            b"\0SELECT count(*) FROM stray_copy WHERE a = 3\0\0\0",
        ));
        out.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
        out.extend(msg(b'E', b"\0\0\0\0\0"));
        out.extend(query("SELECT 1"));
        s.write_all(&out).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(tags(&answers), "12DCTDCZ", "round {round}: {answers:?}");

        // psycopg and asyncpg stop at the server's error, with no CopyDone or CopyFail: the
        // Syncs that follow are answered (pgmux took them for Syncs the COPY ignores)
        s.write_all(&query("COPY stray_copy (a, s) FROM STDIN"))
            .unwrap();
        assert_eq!(read_msg(&mut s).map(|m| m.0), Some(b'G'));
        s.write_all(&msg(b'd', b"1\t\\N\n")).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(
            error_code(&answers).as_deref(),
            Some("23502"),
            "{answers:?}"
        );
        for _ in 0..2 {
            let mut out = exec("SELECT count(*) FROM stray_copy WHERE a = 1");
            out.extend(msg(b'S', b""));
            out.extend(query("SELECT 1"));
            s.write_all(&out).unwrap();
            let answers = until_ready(&mut s);
            assert_eq!(tags(&answers), "12DCZ", "round {round}: {answers:?}");
            let answers = until_ready(&mut s);
            assert_eq!(tags(&answers), "TDCZ", "round {round}: {answers:?}");
        }
    }
}

/// A flushed read whose portal a row limit suspended keeps its replica up to its Sync (the
/// client may fetch more), and a BEGIN sent there opens the transaction on that replica. The
/// client must keep the replica for that transaction: pgmux held its next Query back, to be
/// routed on its own once the replica went back, which it never does in a transaction (the
/// client hung). Found by tests/differential.rs (seed 30239).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_begun_behind_a_suspended_read_keeps_its_replica() {
    use common::raw::{login, msg, query, until_ready};
    use std::io::Write;
    let cluster = PgCluster::shared_with_replicas();
    let (px, _c) = flushed_copy_scene(cluster, "", "").await;
    let (_, replicas) = ports(cluster);
    let (mut s, _) = login(px.port, "app", "app");
    use common::raw::tags;
    for round in 0..3 {
        s.write_all(&first_row_flushed("SELECT g FROM generate_series(1, 3) g"))
            .unwrap();
        let got = common::raw::until_tag(&mut s, b's');
        assert_eq!(tags(&got), "12Ds", "round {round}: {got:?}");
        let mut out = exec("BEGIN");
        out.extend(msg(b'S', b""));
        s.write_all(&out).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(tags(&answers), "12CZ", "round {round}: {answers:?}");
        assert_eq!(answers[3].1, b"T");
        // read timeout 30 s: a hang fails here
        s.write_all(&query("SELECT inet_server_port()")).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(tags(&answers), "TDCZ", "round {round}: {answers:?}");
        let port: u16 = std::str::from_utf8(&answers[1].1[6..])
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            replicas.contains(&port),
            "the transaction's replica: {port}"
        );
        s.write_all(&query("ROLLBACK")).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(tags(&answers), "CZ", "round {round}: {answers:?}");
        assert_eq!(answers[1].1, b"I");
    }
}

/// A unit routed to a replica as a lone ROLLBACK or COMMIT (class Transaction, no retry
/// armed) is sent whole: with no Flush from the client it is no flushed read, so a Bind of a
/// named statement after its Parse is not a statement of its own. pgmux ended the "read"
/// with a Sync of its own after the Parse: PostgreSQL's 42P05 for a Parse of a name in use no
/// longer skipped the Bind and Execute, which ran the old statement on another server.
/// Found by tests/differential.rs (seed 2894).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_rollback_parse_on_a_replica_keeps_its_unit_whole() {
    use common::raw::{error_code, login, msg, until_ready};
    use std::io::Write;
    let cluster = PgCluster::shared_with_replicas();
    let (px, _c) = flushed_copy_scene(cluster, "", "").await;
    let (mut s, _) = login(px.port, "app", "app");
    use common::raw::tags;
    let mut out = msg(b'P', b"s1\0SELECT 1\0\0\0");
    out.extend(msg(b'S', b""));
    s.write_all(&out).unwrap();
    assert_eq!(tags(&until_ready(&mut s)), "1Z");
    for round in 0..3 {
        let mut out = msg(b'P', b"s1\0ROLLBACK\0\0\0");
        out.extend(msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
        out.extend(msg(b'E', b"\0\0\0\0\0"));
        out.extend(msg(b'S', b""));
        s.write_all(&out).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(tags(&answers), "EZ", "round {round}: {answers:?}");
        assert_eq!(error_code(&answers).as_deref(), Some("42P05"));
    }
}

/// A pipelining client sends a read up to a Flush and, without waiting for its answer, more
/// statements before the Sync. When the read fails, PostgreSQL skips them on their way to the
/// Sync. pgmux used to end the flushed read before the replica's answer had come and route
/// what followed on its own: the client got a second error (below), or a write PostgreSQL
/// would have skipped was made on the primary. It now waits for the read's answers before it
/// decides. Found by tests/differential.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_pipelined_behind_a_failed_flushed_read_are_skipped() {
    use common::raw::{login, msg, until_ready};
    use std::io::Write;
    let cluster = PgCluster::shared_with_replicas();
    let (px, _c) = flushed_copy_scene(cluster, "", "").await;
    let (mut s, _) = login(px.port, "app", "app");
    use common::raw::tags;
    for round in 0..3 {
        // refused when bound (a constant 1/0 is folded when planned)
        let mut out = exec("SELECT 1/0");
        out.extend(msg(b'H', b""));
        let mut rest = exec("SELECT * FROM flushed_copy_no_such_table");
        rest.extend(msg(b'S', b""));
        // all reads, all at once: the unit goes to a replica
        s.write_all(&[out.clone(), rest.clone()].concat()).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(tags(&answers), "1EZ", "round {round}: {answers:?}");
        assert_eq!(common::raw::error_code(&answers).as_deref(), Some("22012"));
        // a write sent right behind the flushed read
        s.write_all(&out).unwrap();
        let mut write = exec("INSERT INTO flushed_copy VALUES (-5, 0)");
        write.extend(rest.clone());
        s.write_all(&write).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(tags(&answers), "1EZ", "round {round}: {answers:?}");
        // the read fails in an Execute sent after the client's Flush, which nothing flushes
        let mut out = msg(
            b'P',
            b"\0SELECT 1/(g - g) FROM generate_series(1, 2) g\0\0\0",
        );
        out.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
        out.extend(msg(b'H', b""));
        out.extend(msg(b'E', b"\0\0\0\0\0"));
        out.extend(rest);
        s.write_all(&out).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(tags(&answers), "12EZ", "round {round}: {answers:?}");
    }
    let written = cluster
        .primary()
        .psql("app", "SELECT count(*) FROM flushed_copy WHERE a = -5");
    assert_eq!(written, "0", "a skipped INSERT ran");
    // without a Flush nothing is answered before the Sync, and nothing waits for it: a lone
    // COMMIT by the extended protocol (a replica's, not retried) hung on the first version
    for sql in ["COMMIT", "ROLLBACK"] {
        let mut out = exec(sql);
        out.extend(msg(b'S', b""));
        s.write_all(&out).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(tags(&answers), "12NCZ", "{sql}: {answers:?}");
    }
}

/// A read unit that fails before a Query in it, without a Sync: PostgreSQL skips the Query
/// (it owes no ReadyForQuery) and everything after it up to the client's next Sync. pgmux
/// held what followed back, to be routed on its own once the replica went back; but the
/// replica, waiting for a Sync, never went back: the client hung. Found by
/// tests/differential.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_after_a_failed_read_before_a_query_reaches_its_replica() {
    use common::raw::{error_code, login, msg, query, until_ready};
    use std::io::Write;
    let cluster = PgCluster::shared_with_replicas();
    let (px, _c) = flushed_copy_scene(cluster, "", "").await;
    let (mut s, _) = login(px.port, "app", "app");
    use common::raw::tags;
    for round in 0..3 {
        let mut out = exec("SELECT * FROM flushed_copy_no_such_table");
        out.extend(query("SELECT 1"));
        s.write_all(&out).unwrap();
        // the client, seeing no ReadyForQuery, goes on with an extended unit
        let mut out = exec("SELECT 2");
        out.extend(msg(b'S', b""));
        s.write_all(&out).unwrap();
        // read timeout 30 s: a hang fails here
        let answers = until_ready(&mut s);
        assert_eq!(tags(&answers), "EZ", "round {round}: {answers:?}");
        assert_eq!(error_code(&answers).as_deref(), Some("42P01"));
        s.write_all(&query("SELECT 3")).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(tags(&answers), "TDCZ", "round {round}: {answers:?}");
    }
}

/// A read fetched with a row limit up to a Flush, its portal suspended, then a write as a
/// Query: the Query ends the read's implicit transaction and its portals, so nothing can be
/// fetched from that portal any more, and the write reaches the primary. pgmux kept the unit
/// on the replica for the portal's sake, where the write failed (25006). Found by
/// tests/differential.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_query_after_a_suspended_flushed_read_reaches_the_primary() {
    use common::raw::{error_code, login, query, tags, until_ready, until_tag};
    use std::io::Write;
    let cluster = PgCluster::shared_with_replicas();
    let (px, _c) = flushed_copy_scene(cluster, "", "").await;
    let (primary, _) = ports(cluster);
    let (mut s, _) = login(px.port, "app", "app");
    for round in 0..3 {
        s.write_all(&first_row_flushed("SELECT generate_series(1, 3)"))
            .unwrap();
        let got = tags(&until_tag(&mut s, b's'));
        assert_eq!(got, "12Ds", "round {round}: one row, then suspended");
        s.write_all(&query(
            "INSERT INTO flushed_copy VALUES (-6, inet_server_port()) RETURNING port",
        ))
        .unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(error_code(&answers), None, "round {round}: {answers:?}");
        let row = answers.iter().find(|m| m.0 == b'D').expect("a row");
        let port: u16 = std::str::from_utf8(&row.1[6..]).unwrap().parse().unwrap();
        assert_eq!(port, primary, "round {round}");
    }
}

/// A client that pipelines a write behind a read-only transaction (libpq pipeline mode, pgx
/// batches), sent while the transaction runs on a replica: the transaction's statements go
/// one at a time, and the write, which comes after its COMMIT, is routed on its own, to the
/// primary, instead of following the transaction to the replica (25006 there). (Sent in one
/// write with the transaction, the write would take it all to the primary.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_pipelined_behind_a_read_only_transaction_goes_to_the_primary() {
    use common::raw::{error_code, login, query, until_ready};
    use std::io::Write;
    // its own cluster: its write, behind a long read, must not make the shared replicas lag
    // under other tests' first reads
    let cluster = &PgCluster::start(2);
    let px = start(cluster, "", "consistency = \"eventual\"");
    warm_up(&px, cluster).await;
    let (primary, replicas) = ports(cluster);
    let c = connect(&px, "app").await;
    c.simple_query("CREATE TABLE IF NOT EXISTS ro_pipe (id serial PRIMARY KEY, port int)")
        .await
        .unwrap();
    let (mut s, _) = login(px.port, "app", "app");
    let mut transaction = Vec::new();
    for sql in [
        "BEGIN READ ONLY",
        "SELECT inet_server_port() FROM pg_sleep(2) /*read-only pipeline*/",
        "COMMIT",
    ] {
        transaction.extend(query(sql));
    }
    s.write_all(&transaction).unwrap();
    wait_running_on_a_replica(cluster, "/*read-only pipeline*/");
    s.write_all(&query(
        "INSERT INTO ro_pipe (port) VALUES (inet_server_port()) RETURNING port",
    ))
    .unwrap();
    let begin = until_ready(&mut s);
    assert_eq!(error_code(&begin), None);
    let read = until_ready(&mut s);
    assert!(replicas.contains(&port_of(&read)), "{read:?}");
    let commit = until_ready(&mut s);
    assert_eq!(error_code(&commit), None);
    let write = until_ready(&mut s);
    assert_eq!(error_code(&write), None, "the write failed");
    assert_eq!(port_of(&write), primary);
}
