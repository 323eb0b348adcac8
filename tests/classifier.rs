//! The statement classifier against its corpus (tests/classifier_corpus.tsv), against
//! rewritings that must not change an answer (case, comments, neighbours), against garbage,
//! and against a real hot standby: whatever the corpus calls a read must run there.

mod common;

use common::PgCluster;
use pgmux::router::{classify, Class, Classified, Command, Hint, Lsn, Route};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::NoTls;

const CORPUS: &str = include_str!("classifier_corpus.tsv");

fn write_functions() -> Vec<String> {
    vec!["audit_log_insert".into(), "billing.\"Charge\"".into()]
}

struct Case {
    line: usize,
    expected: Classified,
    sql: String,
}

fn parse_expected(text: &str, line: usize) -> Classified {
    let (class, hint) = match text.split_once('+') {
        Some((c, "primary")) => (c, Some(Hint::Primary)),
        Some((c, "replica")) => (c, Some(Hint::Replica)),
        Some(_) => panic!("line {line}: bad hint in {text:?}"),
        None => (text, None),
    };
    let class = match class {
        "read" => Class::Read,
        "write" => Class::Write,
        "begin" => Class::Begin,
        "begin_ro" => Class::BeginReadOnly,
        "txn" => Class::Transaction,
        "session" => Class::Session,
        "route=primary" => Class::Pgmux(Command::Route(Route::Primary)),
        "route=replica" => Class::Pgmux(Command::Route(Route::Replica)),
        "route=auto" => Class::Pgmux(Command::Route(Route::Auto)),
        "route=reset" => Class::Pgmux(Command::ResetRoute),
        "min_lsn=reset" => Class::Pgmux(Command::ResetMinLsn),
        "min_lsn=none" => Class::Pgmux(Command::MinLsn(None)),
        "invalid" => Class::Pgmux(Command::Invalid("")),
        other => match other.strip_prefix("min_lsn=") {
            Some(lsn) => Class::Pgmux(Command::MinLsn(Some(
                lsn.parse::<Lsn>()
                    .unwrap_or_else(|e| panic!("line {line}: {e}")),
            ))),
            None => panic!("line {line}: unknown expectation {other:?}"),
        },
    };
    Classified { class, hint }
}

fn corpus() -> Vec<Case> {
    CORPUS
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.starts_with('#') && !l.trim().is_empty())
        .map(|(i, l)| {
            let line = i + 1;
            let (expected, sql) = l
                .split_once('\t')
                .unwrap_or_else(|| panic!("line {line}: no tab in {l:?}"));
            Case {
                line,
                expected: parse_expected(expected, line),
                sql: sql.replace('⏎', "\n"),
            }
        })
        .collect()
}

/// Invalid commands carry their message; the corpus only says "invalid".
fn matches(got: Classified, want: Classified) -> bool {
    match (got.class, want.class) {
        (Class::Pgmux(Command::Invalid(_)), Class::Pgmux(Command::Invalid(_))) => {
            got.hint == want.hint
        }
        _ => got == want,
    }
}

fn check_all(what: &str, rewrite: impl Fn(&str) -> Option<String>) {
    let wf = write_functions();
    let mut failures = Vec::new();
    for case in corpus() {
        let Some(sql) = rewrite(&case.sql) else {
            continue;
        };
        let got = classify(&sql, &wf);
        if !matches(got, case.expected) {
            failures.push(format!(
                "line {}: {sql:?}\n    expected {:?}, got {got:?}",
                case.line, case.expected
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of the corpus misclassified:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn corpus_is_classified_as_expected() {
    let cases = corpus();
    assert!(cases.len() >= 200, "corpus has only {} cases", cases.len());
    // The corpus must exercise every kind of answer, or a broken branch could hide.
    for kind in [
        "read", "write", "begin", "begin_ro", "txn", "session", "invalid",
    ] {
        let want = parse_expected(kind, 0);
        assert!(
            cases.iter().any(|c| matches(c.expected, want)),
            "no {kind} case"
        );
    }
    check_all("as written", |sql| Some(sql.to_string()));
}

#[test]
fn letter_case_changes_nothing() {
    // Keywords, names, string contents, dollar tags and hints are case-insensitive here.
    check_all("upper-cased", |sql| Some(sql.to_ascii_uppercase()));
    check_all("lower-cased", |sql| Some(sql.to_ascii_lowercase()));
}

#[test]
fn comments_in_place_of_spaces_change_nothing() {
    // A block comment separates tokens like a space, and inside strings, quoted names, dollar
    // quotes and other comments it is just more text.
    check_all("spaces as comments", |sql| {
        Some(sql.replace(' ', "/* c */"))
    });
}

#[test]
fn a_write_stays_a_write_among_reads() {
    let wf = write_functions();
    for case in corpus() {
        if case.expected.class != Class::Write {
            continue;
        }
        // The newline ends any line comment the statement ends with.
        for sql in [
            format!("{}\n;SELECT 1", case.sql),
            format!("SELECT 1;\n{}", case.sql),
            format!("SELECT 1; {}\n; SHOW x", case.sql),
        ] {
            assert_eq!(
                classify(&sql, &wf).class,
                Class::Write,
                "line {}: {sql:?}",
                case.line
            );
        }
    }
}

/// Pieces that matter to the lexer, so random strings reach its corners.
const PIECES: &[&str] = &[
    "'",
    "''",
    "\"",
    "$$",
    "$a$",
    "$1",
    "$",
    "/*",
    "*/",
    "--",
    "\n",
    " ",
    "E'",
    "e'",
    "U&'",
    "\\",
    "\\'",
    "(",
    ")",
    ";",
    ",",
    ".",
    "=",
    "::",
    "SELECT",
    "select",
    "DELETE",
    "INSERT",
    "INTO",
    "FOR",
    "UPDATE",
    "KEY",
    "SHARE",
    "NO",
    "WITH",
    "EXPLAIN",
    "ANALYZE",
    "COPY",
    "TO",
    "FROM",
    "BEGIN",
    "READ",
    "ONLY",
    "WRITE",
    "SET",
    "RESET",
    "LOCAL",
    "SESSION",
    "TRANSACTION",
    "pgmux",
    "route",
    "min_lsn",
    "replica",
    "primary",
    "DEFAULT",
    "'0/16B3748'",
    "pgmux:replica",
    "pgmux:primary",
    "nextval",
    "audit_log_insert",
    "1",
    "1.5e3",
    "é",
    "名",
    "\u{0}",
    "\t",
    "x",
    "*",
    "-",
    "/",
];

fn random_sql(rng: &mut StdRng) -> String {
    let n = rng.gen_range(0..24);
    let mut s = String::new();
    for _ in 0..n {
        if rng.gen_bool(0.1) {
            s.push(rng.gen::<char>());
        } else {
            s.push_str(PIECES[rng.gen_range(0..PIECES.len())]);
        }
    }
    s
}

#[test]
fn garbage_never_panics_and_answers_are_stable() {
    let wf = write_functions();
    // A fixed seed: a failure is reproducible, and the test cannot pass by luck one run and
    // fail the next.
    let mut rng = StdRng::seed_from_u64(0x5eed_0003);
    let mut seen_read = 0;
    let mut seen_write = 0;
    for _ in 0..50_000 {
        let sql = random_sql(&mut rng);
        let a = classify(&sql, &wf);
        assert_eq!(a, classify(&sql, &wf), "{sql:?}");
        match a.class {
            Class::Read => seen_read += 1,
            Class::Write => seen_write += 1,
            _ => {}
        }
    }
    // Random text should mostly not be understood; but some of it must be, or the generator
    // never reached the interesting paths.
    assert!(
        seen_write > seen_read,
        "read {seen_read}, write {seen_write}"
    );
    assert!(seen_read > 0);
}

#[test]
fn every_prefix_of_the_corpus_is_handled() {
    let wf = write_functions();
    for case in corpus() {
        for (i, _) in case.sql.char_indices() {
            let _ = classify(&case.sql[..i], &wf);
        }
    }
}

/// The server's "you cannot do that here" answers: a statement the corpus calls a read must
/// never get one of these from a hot standby.
const STANDBY_REFUSALS: &[&str] = &["25006", "0A000", "55000", "25P02"];

#[tokio::test(flavor = "current_thread")]
async fn what_the_corpus_calls_a_read_runs_on_a_hot_standby() {
    let pg = PgCluster::shared_with_replicas();
    pg.create_database("corpus", "postgres");
    // The objects the corpus names, so statements get past name lookup to execution, where a
    // standby refuses writes. Type mismatches between statements remain and are harmless: any
    // error other than a refusal shows nothing.
    pg.primary().psql(
        "corpus",
        "CREATE TABLE IF NOT EXISTS t (id int, a int, b int, c int, x text, y int[], name text, \
           status text, created_at timestamptz, updated_at timestamptz, deleted bool, \
           inserted_by text, \"for\" int, \"update\" int, \"delete\" int, \"insert\" int);
         CREATE TABLE IF NOT EXISTS u (id int, a int, b int, c int);
         CREATE TABLE IF NOT EXISTS v (a int);
         CREATE TABLE IF NOT EXISTS users (id int, name text, email text);
         CREATE TABLE IF NOT EXISTS orders (user_id int, total numeric);
         CREATE TABLE IF NOT EXISTS stats (nextval_count int, audit_log_inserts int, \
           audit_log_insert int);
         CREATE TABLE IF NOT EXISTS portfolio (share int);
         CREATE TABLE IF NOT EXISTS updates (id int);
         CREATE TABLE IF NOT EXISTS deletes (id int);
         CREATE TABLE IF NOT EXISTS \"update\" (id int);
         CREATE TABLE IF NOT EXISTS blocks (lo_id int);
         CREATE TABLE IF NOT EXISTS \"Ta\"\"ble\" (\"we\"\"ird\" int);
         CREATE TABLE IF NOT EXISTS 名前 (列 text);
         CREATE OR REPLACE FUNCTION my_nextval(int) RETURNS int LANGUAGE sql AS 'SELECT $1';
         CREATE OR REPLACE FUNCTION lotus(int) RETURNS int LANGUAGE sql AS 'SELECT $1';
         INSERT INTO t (id, a) SELECT 1, 1 WHERE NOT EXISTS (SELECT 1 FROM t);",
    );
    pg.wait_replicas_caught_up();
    let replica = &pg.replicas()[0];
    let (client, conn) =
        tokio_postgres::connect(&replica.conn_str("postgres", "corpus", None), NoTls)
            .await
            .expect("connect to replica");
    tokio::spawn(conn);
    let in_recovery = client
        .simple_query("SELECT pg_is_in_recovery()::text")
        .await
        .unwrap();
    assert!(
        matches!(&in_recovery[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("true"))
    );

    let wf = write_functions();
    let mut refused = Vec::new();
    let mut ran = 0;
    for case in corpus() {
        let runs_on_replica = matches!(
            classify(&case.sql, &wf).class,
            Class::Read | Class::BeginReadOnly
        );
        // COPY needs the copy sub-protocol, which simple_query does not speak.
        if !runs_on_replica || case.sql.to_ascii_uppercase().starts_with("COPY") {
            continue;
        }
        let result = client.simple_query(&case.sql).await;
        // Whatever happened, leave no transaction open for the next statement.
        let _ = client.simple_query("ROLLBACK").await;
        assert!(
            !client.is_closed(),
            "line {}: {:?} lost the connection: {result:?}",
            case.line,
            case.sql
        );
        match result {
            Ok(_) => ran += 1,
            Err(e) => {
                let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
                if STANDBY_REFUSALS.contains(&code.as_str()) {
                    refused.push(format!("line {}: {:?}: {e}", case.line, case.sql));
                }
            }
        }
    }
    assert!(
        refused.is_empty(),
        "the standby refused reads:\n{}",
        refused.join("\n")
    );
    // Most reads name objects created above, so most must have run; otherwise this test
    // proves nothing.
    assert!(ran >= 80, "only {ran} corpus reads ran on the standby");
}
