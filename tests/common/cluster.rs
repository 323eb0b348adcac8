//! Throwaway PostgreSQL 15 clusters for integration tests: a primary plus optional streaming
//! replicas in one temp dir, admin SQL over the unix socket, instance lifecycle, and teardown that
//! also covers the never-dropped shared clusters and clusters orphaned by a killed test run.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, Once, OnceLock};
use std::time::Duration;

use super::util::{
    conn_str, ensure_exit_hook, free_port, is_root, lock, reap_orphans, tail, temp_base,
    wait_until, write_owner,
};

/// PostgreSQL refuses to run as root, so as root every server-side command runs as this user.
const PG_OS_USER: &str = "postgres";
const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const DIR_PREFIX: &str = "pgmux-test-";
const PASSWORD: &str = "secret";

/// First match wins: the per-user lines force pgmux through each auth method, everything else
/// (the superuser, replication) stays password-less.
const PG_HBA: &str = "\
# written by the pgmux test harness
local all all trust
host all scram_user 127.0.0.1/32 scram-sha-256
host all md5_user 127.0.0.1/32 md5
host all pw_user 127.0.0.1/32 password
host all app 127.0.0.1/32 scram-sha-256
host all aq_scram,aq_expired,aq_auth,aq_lookup,aq_rotating,aq_pool,aq_twin 127.0.0.1/32 scram-sha-256
host all aq_md5 127.0.0.1/32 md5
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
";

/// Clusters started but not yet torn down, for the exit hook.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pg_bin() -> PathBuf {
    std::env::var_os("PGMUX_TEST_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PG_BIN))
}

/// uid/gid that owns the data dirs when we are root.
fn pg_owner() -> Option<(u32, u32)> {
    static OWNER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *OWNER.get_or_init(|| {
        if !is_root() {
            return None;
        }
        let name = CString::new(PG_OS_USER).unwrap();
        // SAFETY: getpwnam returns NULL or a pointer to a static record, read before any other
        // call to the passwd functions (this runs once, under the OnceLock).
        unsafe {
            let pw = libc::getpwnam(name.as_ptr());
            assert!(
                !pw.is_null(),
                "running as root, but there is no `{PG_OS_USER}` user to run PostgreSQL as"
            );
            Some(((*pw).pw_uid, (*pw).pw_gid))
        }
    })
}

fn give_to_pg(path: &Path) {
    if let Some((uid, gid)) = pg_owner() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// A server-side PostgreSQL program, run as `postgres` when we are root.
fn pg_command(program: &str) -> Command {
    let path = pg_bin().join(program);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", PG_OS_USER, "--"]).arg(path);
        c
    } else {
        Command::new(path)
    };
    // Our cwd may be unreadable for `postgres`, which makes initdb and pg_ctl complain.
    cmd.current_dir("/").stdin(Stdio::null());
    scrub_libpq_env(&mut cmd);
    cmd
}

/// Keep the developer's PG* settings from redirecting harness commands to some other server.
fn scrub_libpq_env(cmd: &mut Command) {
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGOPTIONS",
        "PGSSLMODE",
        "PGDATA",
    ] {
        cmd.env_remove(var);
    }
}

/// Run a command that does not leave a server behind, so capturing its output is safe.
fn run_captured(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn append(path: &Path, text: &str) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One PostgreSQL server (primary or replica) of a [`PgCluster`].
#[derive(Debug)]
pub struct PgInstance {
    /// "primary", "replica1", ...
    pub name: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    /// Server log (`pg_ctl -l`).
    pub log_path: PathBuf,
    /// pg_ctl's own stdout/stderr: its error messages land here, never in a pipe (a pipe would
    /// be inherited by the server and never reach EOF).
    ctl_log_path: PathBuf,
}

impl PgInstance {
    /// Stop the server; `mode` is pg_ctl's: "smart", "fast" or "immediate".
    pub fn stop(&self, mode: &str) {
        self.pg_ctl(&["stop", "-m", mode, "-w", "-t", "60"])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn start(&self) {
        self.pg_ctl(&self.start_args())
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn restart(&self) {
        let log = self.log_path.to_string_lossy().into_owned();
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60", "-l", &log])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Promote a replica; returns once it accepts writes.
    pub fn promote(&self) {
        self.pg_ctl(&["promote", "-w", "-t", "60"])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn is_running(&self) -> bool {
        self.pg_ctl(&["status"]).is_ok()
    }

    /// SQL as superuser `postgres` over the unix socket; trimmed stdout, panics with stderr.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("psql on {} ({db}) failed for `{sql}`:\n{e}", self.name))
    }

    /// Like [`psql`](Self::psql) but hands the error text back, for probing servers that may be
    /// down or still starting.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(psql_program());
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db, "-c", sql])
            .stdin(Stdio::null());
        scrub_libpq_env(&mut cmd);
        cmd.env("PGCONNECT_TIMEOUT", "10");
        let out = cmd.output().map_err(|e| format!("cannot run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Connection string for talking to this server directly, bypassing pgmux.
    pub fn conn_str(&self, user: &str, db: &str, password: Option<&str>) -> String {
        conn_str(self.port, user, db, password)
    }

    /// Turns TLS on for this server (issue 7): writes the PEM certificate and key into the data
    /// dir, `ALTER SYSTEM SET ssl = on` with them, reloads, and returns once a TLS connection
    /// over TCP works. Other tests of the binary then reach it with TLS when they ask for it.
    pub fn enable_ssl(&self, cert_pem: &str, key_pem: &str) {
        use std::os::unix::fs::PermissionsExt;
        let cert = self.data_dir.join("pgmux-test-server.crt");
        let key = self.data_dir.join("pgmux-test-server.key");
        fs::write(&cert, cert_pem).expect("write server certificate");
        fs::write(&key, key_pem).expect("write server key");
        // PostgreSQL refuses a key file that others can read
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod server key");
        give_to_pg(&cert);
        give_to_pg(&key);
        for (name, value) in [
            ("ssl_cert_file", cert.to_string_lossy().into_owned()),
            ("ssl_key_file", key.to_string_lossy().into_owned()),
            ("ssl", "on".to_string()),
        ] {
            self.psql(
                "postgres",
                &format!("ALTER SYSTEM SET {name} = {}", quote_literal(&value)),
            );
        }
        self.psql("postgres", "SELECT pg_reload_conf()");
        // the postmaster rereads its files asynchronously after the signal
        wait_until(
            &format!("{} to accept TLS", self.name),
            Duration::from_secs(30),
            || {
                let mut cmd = Command::new(psql_program());
                cmd.args(["-X", "-A", "-t", "-q", "-c", "SELECT 1"])
                    .arg(format!(
                        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
                        self.port
                    ))
                    .stdin(Stdio::null());
                scrub_libpq_env(&mut cmd);
                cmd.output().is_ok_and(|o| o.status.success())
            },
        );
    }

    /// Server log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    fn start_args(&self) -> Vec<String> {
        ["start", "-w", "-t", "60", "-l"]
            .iter()
            .map(|s| s.to_string())
            .chain([self.log_path.to_string_lossy().into_owned()])
            .collect()
    }

    fn pg_ctl<S: AsRef<str>>(&self, args: &[S]) -> Result<(), String> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.ctl_log_path)
            .map_err(|e| format!("open {}: {e}", self.ctl_log_path.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let status = pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .args(&args)
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| format!("cannot spawn pg_ctl: {e}"))?;
        if status.success() {
            return Ok(());
        }
        Err(format!(
            "pg_ctl {} on {} failed ({status})\n--- pg_ctl output ---\n{}\n--- server log ---\n{}",
            args.join(" "),
            self.name,
            tail(&self.ctl_log_path, 10),
            tail(&self.log_path, 30)
        ))
    }
}

/// psql from the server's own bin dir when it ships one, so Debian's wrapper does not pick a
/// different major version.
fn psql_program() -> PathBuf {
    let own = pg_bin().join("psql");
    if own.exists() {
        own
    } else {
        PathBuf::from("psql")
    }
}

/// A primary and its streaming replicas, all on 127.0.0.1, living in one temp dir.
///
/// Started with roles `app`, `scram_user` (SCRAM), `md5_user` (md5) and `pw_user` (cleartext
/// `password` auth), all with password 'secret', and database `app` owned by `app`.
/// Tests that stop, restart or promote instances must use their own [`PgCluster::start`], never
/// a shared one.
#[derive(Debug)]
pub struct PgCluster {
    root: PathBuf,
    /// Primary first, then replica1..N.
    instances: Vec<PgInstance>,
    /// Serialises role/database DDL: concurrent tests creating the same role would otherwise
    /// collide in the catalogs.
    admin: Mutex<()>,
}

impl PgCluster {
    /// initdb a primary plus `replicas` streaming replicas; returns once every replica is in
    /// recovery and streaming.
    pub fn start(replicas: usize) -> PgCluster {
        static REAP: Once = Once::new();
        REAP.call_once(|| reap_orphans(DIR_PREFIX, teardown));

        let root = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(temp_base())
            .expect("create cluster temp dir")
            .keep();
        write_owner(&root);
        lock(&LIVE).push(root.clone());
        ensure_exit_hook();

        // From here on a panic drops `cluster`, which stops whatever did start.
        let mut cluster = PgCluster {
            root,
            instances: Vec::new(),
            admin: Mutex::new(()),
        };
        for dir in ["", "sock", "log"] {
            let path = cluster.root.join(dir);
            fs::create_dir_all(&path).expect("create cluster dir");
            give_to_pg(&path);
        }

        cluster.init_primary();
        // Before any basebackup, so replicas are born with the roles and database.
        cluster.create_role("app", PASSWORD, "scram-sha-256");
        cluster.create_role("scram_user", PASSWORD, "scram-sha-256");
        cluster.create_role("md5_user", PASSWORD, "md5");
        cluster.create_role("pw_user", PASSWORD, "scram-sha-256");
        cluster.create_database("app", "app");
        for i in 1..=replicas {
            cluster.add_replica(i);
        }
        for replica in cluster.replicas() {
            wait_until(
                &format!("{} to be in recovery and streaming", replica.name),
                Duration::from_secs(60),
                || {
                    replica
                        .try_psql(
                            "postgres",
                            "select pg_is_in_recovery() and exists \
                             (select 1 from pg_stat_wal_receiver where status = 'streaming')",
                        )
                        .is_ok_and(|s| s == "t")
                },
            );
        }
        cluster
    }

    /// The cluster shared by every test of this binary (no replicas). Started on first use,
    /// torn down by the exit hook.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| PgCluster::start(0))
    }

    /// A second shared cluster, with two replicas.
    pub fn shared_with_replicas() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| PgCluster::start(2))
    }

    pub fn primary(&self) -> &PgInstance {
        &self.instances[0]
    }

    /// A `[[databases]]` entry's lines that split reads off to this cluster's replicas, with
    /// lag limits out of reach (other tests write to the shared cluster).
    pub fn split_settings(&self) -> String {
        let replicas: Vec<String> = self
            .replicas()
            .iter()
            .map(|r| format!("{{ host = \"127.0.0.1\", port = {} }}", r.port))
            .collect();
        format!(
            "read_write_split = true\nreplicas = [ {} ]\n\
             max_replica_lag_bytes = 1099511627776\nmax_replica_lag_ms = 3600000\n",
            replicas.join(", ")
        )
    }

    pub fn replicas(&self) -> &[PgInstance] {
        &self.instances[1..]
    }

    /// The temp dir holding data dirs, sockets and logs.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// See [`PgInstance::psql`].
    pub fn psql(&self, inst: &PgInstance, db: &str, sql: &str) -> String {
        inst.psql(db, sql)
    }

    /// Create (or reset the password of) a login role on the primary. `encryption` is the
    /// password_encryption to store it with: "scram-sha-256" or "md5".
    pub fn create_role(&self, name: &str, password: &str, encryption: &str) {
        let guard = lock(&self.admin);
        let exists = self.primary().psql(
            "postgres",
            &format!(
                "select count(*) from pg_roles where rolname = {}",
                quote_literal(name)
            ),
        ) == "1";
        let verb = if exists { "ALTER" } else { "CREATE" };
        self.primary().psql(
            "postgres",
            &format!(
                "SET password_encryption = {}; {verb} ROLE {} LOGIN PASSWORD {}",
                quote_literal(encryption),
                quote_ident(name),
                quote_literal(password)
            ),
        );
        drop(guard);
        self.wait_replicas_caught_up();
    }

    /// `pgbench -i -s 1` into `db` on the primary, as postgres; panics with pgbench's stderr.
    pub fn pgbench_init(&self, db: &str) {
        let out = Command::new("pgbench")
            .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p"])
            .arg(self.primary().port.to_string())
            .args(["-U", "postgres", db])
            .output()
            .expect("run pgbench -i");
        assert!(
            out.status.success(),
            "pgbench -i: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn create_database(&self, name: &str, owner: &str) {
        let guard = lock(&self.admin);
        let exists = self.primary().psql(
            "postgres",
            &format!(
                "select count(*) from pg_database where datname = {}",
                quote_literal(name)
            ),
        ) == "1";
        if !exists {
            self.primary().psql(
                "postgres",
                &format!(
                    "CREATE DATABASE {} OWNER {}",
                    quote_ident(name),
                    quote_ident(owner)
                ),
            );
        }
        drop(guard);
        self.wait_replicas_caught_up();
    }

    /// Wait until every replica still in recovery has replayed all WAL the primary had inserted
    /// when this was called (the insert position, not the write position: with
    /// synchronous_commit=off a commit can sit in WAL buffers past the write position), so a read on a replica sees what the test just wrote. Replicas that
    /// are down or promoted are skipped.
    pub fn wait_replicas_caught_up(&self) {
        if self.replicas().is_empty() {
            return;
        }
        let lsn = self
            .primary()
            .psql("postgres", "select pg_current_wal_insert_lsn()");
        for replica in self.replicas() {
            if replica.try_psql("postgres", "select pg_is_in_recovery()") != Ok("t".into()) {
                continue;
            }
            let sql = format!("select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
            wait_until(
                &format!("{} to replay up to {lsn}", replica.name),
                Duration::from_secs(30),
                || replica.try_psql("postgres", &sql).is_ok_and(|s| s == "t"),
            );
        }
    }

    fn init_primary(&mut self) {
        let data_dir = self.root.join("primary");
        let mut initdb = pg_command("initdb");
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale"])
            .arg("--no-sync");
        run_captured(initdb, "initdb");
        // Overwriting keeps the files' owner (postgres) even though we write them as root.
        fs::write(data_dir.join("pg_hba.conf"), PG_HBA).expect("write pg_hba.conf");
        append(
            &data_dir.join("postgresql.conf"),
            &format!(
                "\n# ---- pgmux test harness ----\n\
                 listen_addresses = '127.0.0.1'\n\
                 unix_socket_directories = '{}'\n\
                 max_connections = 300\n\
                 shared_buffers = 32MB\n\
                 fsync = off\n\
                 synchronous_commit = off\n\
                 full_page_writes = off\n\
                 wal_level = replica\n\
                 max_wal_senders = 10\n\
                 max_replication_slots = 10\n\
                 hot_standby = on\n\
                 password_encryption = 'scram-sha-256'\n\
                 logging_collector = off\n\
                 log_line_prefix = '%m [%p] %q%u@%d '\n",
                self.root.join("sock").display()
            ),
        );
        let primary = self.start_new("primary", data_dir);
        self.instances.push(primary);
    }

    fn add_replica(&mut self, i: usize) {
        let name = format!("replica{i}");
        let data_dir = self.root.join(&name);
        let mut backup = pg_command("pg_basebackup");
        backup
            .args(["-h", "127.0.0.1", "-p", &self.primary().port.to_string()])
            .args(["-U", "postgres", "-D"])
            .arg(&data_dir)
            .args(["-R", "-X", "stream", "-C", "-S", &name])
            .args(["-c", "fast", "--no-sync"]);
        run_captured(backup, &format!("pg_basebackup for {name}"));
        append(
            &data_dir.join("postgresql.conf"),
            &format!("cluster_name = '{name}'\n"),
        );
        let replica = self.start_new(&name, data_dir);
        self.instances.push(replica);
    }

    /// First start of a fresh data dir on a free port. The port is only probed, not held, so
    /// on a bind failure pick another one and retry.
    fn start_new(&self, name: &str, data_dir: PathBuf) -> PgInstance {
        let log_path = self.root.join("log").join(format!("{name}.log"));
        let ctl_log_path = self.root.join("log").join(format!("{name}.pg_ctl.log"));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port();
            // Later settings win, so a retry just appends another port line.
            append(
                &data_dir.join("postgresql.conf"),
                &format!("port = {port}\n"),
            );
            let inst = PgInstance {
                name: name.to_string(),
                port,
                data_dir: data_dir.clone(),
                socket_dir: self.root.join("sock"),
                log_path: log_path.clone(),
                ctl_log_path: ctl_log_path.clone(),
            };
            let log_before = inst.log().len();
            match inst.pg_ctl(&inst.start_args()) {
                Ok(()) => return inst,
                Err(e) => {
                    let log = inst.log();
                    let fresh = log.get(log_before..).unwrap_or(&log);
                    let port_taken =
                        fresh.contains("could not bind") || fresh.contains("already in use");
                    if !port_taken || attempt >= 5 {
                        panic!("{e}");
                    }
                }
            }
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for inst in &self.instances {
                eprintln!(
                    "--- {} log ({}), last lines ---\n{}",
                    inst.name,
                    inst.log_path.display(),
                    tail(&inst.log_path, 30)
                );
            }
        }
        teardown(&self.root);
        lock(&LIVE).retain(|r| r != &self.root);
    }
}

/// Called from the exit hook: clusters still registered here are the shared statics (or ones a
/// test leaked).
pub(crate) fn teardown_live_clusters() {
    let roots = std::mem::take(&mut *lock(&LIVE));
    for root in roots.iter().rev() {
        teardown(root);
    }
}

/// Stop every server under a cluster dir and delete it. Works from the directory alone, so the
/// exit hook and the orphan reaper can use it without a `PgCluster`. Never panics.
fn teardown(root: &Path) {
    let mut data_dirs: Vec<PathBuf> = fs::read_dir(root)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("PG_VERSION").exists())
                .collect()
        })
        .unwrap_or_default();
    // Replicas before the primary, so their walreceivers do not spin on a vanished primary.
    data_dirs.sort_by_key(|p| p.file_name().map(|n| n == "primary"));
    for data_dir in &data_dirs {
        let pid_file = data_dir.join("postmaster.pid");
        if !pid_file.exists() {
            continue;
        }
        let stopped = pg_command("pg_ctl")
            .arg("-D")
            .arg(data_dir)
            .args(["stop", "-m", "immediate", "-w", "-t", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            kill_postmaster(&pid_file);
        }
    }
    let _ = fs::remove_dir_all(root);
}

/// Last resort when pg_ctl cannot stop a server: SIGKILL the postmaster (its backends notice
/// and exit). Checks the pid still is a postgres process, since pid files can be stale.
fn kill_postmaster(pid_file: &Path) {
    let Some(pid) = fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
    else {
        return;
    };
    let is_postgres = fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("postgres"));
    if pid > 0 && is_postgres {
        // SAFETY: plain kill(2) on a pid we just checked.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
