//! Differential protocol test: seeded random sequences of client messages on the raw v3
//! protocol, sent once straight to PostgreSQL and once through pgmux, whose answers must be
//! the same. Covers transaction mode on the primary alone, transaction mode with read/write
//! splitting over two streaming replicas, and session mode.
//!
//! How a case runs: the generator keeps a small model of the server (transaction status,
//! skip-to-Sync after an extended-protocol error, COPY FROM STDIN in progress, the prepared
//! statements and portal) and sends the sequence in batches, as a driver would: after each
//! batch it waits for the answers the model says PostgreSQL sends to it (counted by the
//! "stop" messages: ReadyForQuery, ParseComplete, CommandComplete, ErrorResponse...). The
//! direct run checks the model against PostgreSQL and records how many messages each batch
//! got; the pgmux run then reads exactly that many after each batch, so pgmux is paced like
//! PostgreSQL and a hang fails with a read timeout (never a sleep, never a clock). Every case
//! ends with a Query whose answer closes the stream, so nothing is left unread.
//!
//! What may legitimately differ is normalised: ParameterStatus messages are dropped (pgmux
//! reports its own set at login and may replay settings), ErrorResponse and NoticeResponse
//! are compared by severity and SQLSTATE only (messages name backend pids, ports...).
//!
//! Data: a fixture table `diff_fix` made before the runs (and replayed by the replicas), and a
//! write table per configuration, emptied before each run of each case. Under read/write
//! splitting pgmux runs with `consistency = "read_your_writes"` (the default): the replicas
//! have replayed the emptying before the pgmux run starts, and a read after the client's
//! own write goes to the primary until a replica has it, so every read is deterministic.
//!
//! After each case in transaction mode a second client (pool of one) runs a query on the
//! primary: the case's server must have gone back to the pool.
//!
//! `PGMUX_DIFF_SEED` sets the first case's seed (case k uses seed + k) and
//! `PGMUX_DIFF_CASES` the number of cases per configuration.

mod common;

use common::raw::{login, msg, read_msg};
use common::{wait_until, PgCluster, Pgmux};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write;
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

const DEFAULT_SEED: u64 = 0x5eed_d1ff;
const DEFAULT_CASES: u64 = 120;
/// How long a read may wait for an answer PostgreSQL gave at once: a hang, past this.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// The statements the generator picks from, each with what PostgreSQL does with it.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fail {
    No,
    /// A syntax error: the whole Query string is refused before anything runs; at Parse.
    Syntax,
    /// Refused when analysed (an unknown table): that statement of a Query; at Parse.
    Analyze,
    /// Refused when planned (constant 1/0): that statement; at Bind.
    Plan,
    /// Refused after its RowDescription went out, at the first row; at Execute.
    Row,
    /// Refused when run (NOT NULL); at Execute.
    Run,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Plain,
    Begin,
    BeginReadOnly,
    /// COMMIT or ROLLBACK: allowed in a failed transaction.
    End,
    Empty,
    CopyIn,
    CopyOut,
}

struct Item {
    sql: &'static str,
    /// Rows returned (a RowDescription is sent), or None for a command without rows.
    rows: Option<u32>,
    fail: Fail,
    kind: Kind,
    /// Refused in a read-only transaction (25006), before any row.
    write: bool,
}

const fn item(sql: &'static str, rows: Option<u32>, fail: Fail, kind: Kind, write: bool) -> Item {
    Item {
        sql,
        rows,
        fail,
        kind,
        write,
    }
}

use Fail as F;
use Kind as K;

/// `{w}` is the configuration's write table.
static ITEMS: &[Item] = &[
    item("SELECT 1", Some(1), F::No, K::Plain, false),
    item(
        "SELECT id, v FROM diff_fix ORDER BY id",
        Some(3),
        F::No,
        K::Plain,
        false,
    ),
    item(
        "SELECT generate_series(1, 5)",
        Some(5),
        F::No,
        K::Plain,
        false,
    ),
    item(
        "SELECT count(*), coalesce(sum(a), 0), string_agg(s, ',' ORDER BY a, s) FROM {w}",
        Some(1),
        F::No,
        K::Plain,
        false,
    ),
    item(
        "INSERT INTO {w} (a, s) VALUES (1, 'x')",
        None,
        F::No,
        K::Plain,
        true,
    ),
    item(
        "INSERT INTO {w} (a, s) VALUES (2, 'y') RETURNING a, s",
        Some(1),
        F::No,
        K::Plain,
        true,
    ),
    item(
        "UPDATE {w} SET s = s || '!' WHERE a = 1",
        None,
        F::No,
        K::Plain,
        true,
    ),
    item("DELETE FROM {w} WHERE a = 2", None, F::No, K::Plain, true),
    item("SELEC 1", None, F::Syntax, K::Plain, false),
    item(
        "SELECT * FROM diff_no_such_table",
        Some(0),
        F::Analyze,
        K::Plain,
        false,
    ),
    item("SELECT 1/0", Some(1), F::Plan, K::Plain, false),
    item(
        "SELECT 1/(id - id) FROM diff_fix",
        Some(3),
        F::Row,
        K::Plain,
        false,
    ),
    item(
        "INSERT INTO {w} (a, s) VALUES (NULL, 'n')",
        None,
        F::Run,
        K::Plain,
        true,
    ),
    item("BEGIN", None, F::No, K::Begin, false),
    item("BEGIN READ ONLY", None, F::No, K::BeginReadOnly, false),
    item("COMMIT", None, F::No, K::End, false),
    item("ROLLBACK", None, F::No, K::End, false),
    item("", None, F::No, K::Empty, false),
    item("COPY {w} (a, s) FROM STDIN", None, F::No, K::CopyIn, true),
    item(
        "COPY (SELECT id, v FROM diff_fix ORDER BY id) TO STDOUT",
        None,
        F::No,
        K::CopyOut,
        false,
    ),
];

fn find(sql: &str) -> usize {
    ITEMS.iter().position(|i| i.sql == sql).unwrap()
}

// ---------------------------------------------------------------------------------------
// Client messages.

#[derive(Clone, Debug)]
enum Msg {
    /// Statements joined with "; " (none: the empty query).
    Query(Vec<usize>),
    Parse(&'static str, usize),
    Bind(&'static str),
    DescribeStmt(&'static str),
    DescribePortal,
    Execute(u32),
    CloseStmt(&'static str),
    Sync,
    Flush,
    CopyData(&'static str),
    CopyDone,
    CopyFail,
    /// int4pl(2, 3) by OID.
    FunctionCall,
}

fn sql_of(i: usize, table: &str) -> String {
    ITEMS[i].sql.replace("{w}", table)
}

fn encode(m: &Msg, table: &str) -> Vec<u8> {
    match m {
        Msg::Query(items) => {
            let text: Vec<String> = items.iter().map(|&i| sql_of(i, table)).collect();
            common::raw::query(&text.join("; "))
        }
        Msg::Parse(name, i) => msg(
            b'P',
            format!("{name}\0{}\0\0\0", sql_of(*i, table)).as_bytes(),
        ),
        Msg::Bind(stmt) => msg(b'B', format!("\0{stmt}\0\0\0\0\0\0\0").as_bytes()),
        Msg::DescribeStmt(name) => msg(b'D', format!("S{name}\0").as_bytes()),
        Msg::DescribePortal => msg(b'D', b"P\0"),
        Msg::Execute(max) => {
            let mut b = vec![0u8];
            b.extend(max.to_be_bytes());
            msg(b'E', &b)
        }
        Msg::CloseStmt(name) => msg(b'C', format!("S{name}\0").as_bytes()),
        Msg::Sync => msg(b'S', b""),
        Msg::Flush => msg(b'H', b""),
        Msg::CopyData(rows) => msg(b'd', rows.as_bytes()),
        Msg::CopyDone => msg(b'c', b""),
        Msg::CopyFail => msg(b'f', b"diff gives up\0"),
        Msg::FunctionCall => {
            let mut b = 177u32.to_be_bytes().to_vec(); // int4pl
            b.extend([0, 1, 0, 0, 0, 2]);
            for arg in [b"2", b"3"] {
                b.extend(1u32.to_be_bytes());
                b.extend(arg);
            }
            b.extend([0, 0]);
            msg(b'F', &b)
        }
    }
}

fn show(m: &Msg, table: &str) -> String {
    match m {
        Msg::Query(items) => {
            let text: Vec<String> = items.iter().map(|&i| sql_of(i, table)).collect();
            format!("Query({:?})", text.join("; "))
        }
        Msg::Parse(name, i) => format!("Parse({name:?}, {:?})", sql_of(*i, table)),
        Msg::CopyData(rows) => format!("CopyData({rows:?})"),
        other => format!("{other:?}"),
    }
}

/// Copy rows: good ones, and ones the server refuses.
const GOOD_ROWS: &[&str] = &["7\tgood\n", "8\tg1\n9\tg2\n"];
const BAD_ROWS: &[&str] = &["\\N\tnull\n", "x\tnot a number\n"];

// ---------------------------------------------------------------------------------------
// The model of PostgreSQL: which answers each message gets, as "stop" tags (the messages a
// client waits for; DataRow, CopyData, notices and parameters are not counted).

const STOP: &[u8] = b"123tTnCsIEZGHV";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CopyMode {
    No,
    Simple,
    Extended,
}

#[derive(Clone, Copy)]
struct Portal {
    item: usize,
    left: u32,
}

#[derive(Clone)]
struct Model {
    /// 'I', 'T' or 'E', as the server has it now (an implicit transaction counts as 'I').
    status: u8,
    read_only: bool,
    /// A read-only transaction ended since the last ReadyForQuery `I`: under read/write
    /// splitting its replica serves the client until then (`writes_behind_read_only_end`).
    read_only_ended: bool,
    /// An extended-protocol message failed: everything up to the next Sync is ignored.
    skipping: bool,
    copy: CopyMode,
    /// Extended-protocol messages since the last Sync.
    open: bool,
    stmts: HashMap<&'static str, usize>,
    unnamed: Option<usize>,
    /// An unnamed Parse was skipped after an error since the unnamed statement was made:
    /// PostgreSQL keeps the older statement, pgmux counts the skipped one as made
    /// (docs/transaction-pooling.md), so the generator binds neither.
    unnamed_skipped: bool,
    portal: Option<Portal>,
    /// A row limit suspended a portal since the last Sync (even if it was fetched to the end
    /// since: pgmux does not tell which portal a later CommandComplete ends).
    suspended: bool,
    /// Answers in PostgreSQL's output buffer, not yet flushed (it flushes at a
    /// ReadyForQuery, an error or notice, a CopyInResponse and a Flush).
    unflushed: Vec<u8>,
    /// Answers flushed to a batch that does not wait for them (`push`).
    carried: Vec<u8>,
}

impl Model {
    fn new() -> Model {
        Model {
            status: b'I',
            read_only: false,
            read_only_ended: false,
            skipping: false,
            copy: CopyMode::No,
            open: false,
            stmts: HashMap::new(),
            unnamed: None,
            unnamed_skipped: false,
            portal: None,
            suspended: false,
            unflushed: Vec::new(),
            carried: Vec::new(),
        }
    }

    /// The stop tags the client sees for message `m`: what PostgreSQL flushes.
    fn feed(&mut self, m: &Msg) -> Vec<u8> {
        let copying = self.copy != CopyMode::No;
        let skipping = self.skipping;
        let tags = self.answer(m);
        let flushes = matches!(m, Msg::Flush) && !copying && !skipping;
        let upto = match tags.iter().rposition(|t| b"ZEGN".contains(t)) {
            _ if flushes => tags.len(),
            Some(at) => at + 1,
            None => 0,
        };
        self.unflushed.extend_from_slice(&tags);
        if upto == 0 {
            return Vec::new();
        }
        let keep = tags.len() - upto;
        let mut out: Vec<u8> = self
            .unflushed
            .drain(..self.unflushed.len() - keep)
            .collect();
        out.retain(|&t| t != b'N');
        out
    }

    fn tx_failed(&mut self) {
        if self.status == b'T' {
            self.status = b'E';
        }
    }

    /// An error in the extended protocol.
    fn ext_error(&mut self, out: &mut Vec<u8>) {
        out.push(b'E');
        self.skipping = true;
        self.tx_failed();
    }

    fn ready(&mut self, out: &mut Vec<u8>) {
        if self.status == b'I' {
            // a BEGIN before it stays on that replica, its whole transaction
            self.read_only_ended = false;
            self.read_only = false;
        }
        out.push(b'Z');
    }

    /// A transaction command runs; a notice goes out for one that does nothing.
    fn transaction(&mut self, kind: Kind, out: &mut Vec<u8>) {
        let idle = self.status == b'I';
        if (matches!(kind, Kind::Begin | Kind::BeginReadOnly) && !idle)
            || (kind == Kind::End && idle)
        {
            out.push(b'N');
        }
        match kind {
            Kind::Begin if self.status == b'I' => self.status = b'T',
            // in a transaction already: only warned, but read-only from now on
            Kind::BeginReadOnly => {
                self.status = b'T';
                self.read_only = true;
            }
            Kind::End => {
                self.status = b'I';
                self.read_only_ended |= self.read_only;
                self.read_only = false;
            }
            _ => {}
        }
    }

    /// The stop tags PostgreSQL answers `m` with, and 'N' where a notice (which flushes)
    /// goes out.
    fn answer(&mut self, m: &Msg) -> Vec<u8> {
        let mut out = Vec::new();
        if self.copy != CopyMode::No {
            match m {
                Msg::Sync | Msg::Flush => {}
                Msg::CopyData(rows) => {
                    if BAD_ROWS.contains(rows) {
                        self.copy_failed(&mut out);
                    }
                }
                Msg::CopyDone => {
                    out.push(b'C');
                    if self.copy == CopyMode::Simple {
                        self.ready(&mut out);
                    }
                    self.copy = CopyMode::No;
                }
                // any other message aborts the COPY, and is lost
                _ => self.copy_failed(&mut out),
            }
            return out;
        }
        if self.skipping && !matches!(m, Msg::Sync) {
            self.unnamed_skipped |= matches!(m, Msg::Parse("", _));
            return out;
        }
        match m {
            Msg::Query(items) => {
                self.open = false;
                self.suspended = false;
                self.unnamed = None;
                self.unnamed_skipped = false;
                self.portal = None;
                self.query(items, &mut out);
            }
            Msg::FunctionCall => {
                self.open = false;
                self.suspended = false;
                self.portal = None;
                if self.status == b'E' {
                    out.push(b'E');
                } else {
                    out.push(b'V');
                }
                self.ready(&mut out);
            }
            Msg::Sync => {
                self.skipping = false;
                self.suspended = false;
                self.open = false;
                self.portal = None;
                self.ready(&mut out);
            }
            Msg::Flush | Msg::CopyData(_) | Msg::CopyDone | Msg::CopyFail => {}
            Msg::Parse(name, i) => {
                self.open = true;
                let it = &ITEMS[*i];
                if name.is_empty() {
                    self.unnamed = None;
                    self.unnamed_skipped = false;
                } else if self.stmts.contains_key(name) {
                    return self.err(out);
                }
                if matches!(it.fail, Fail::Syntax | Fail::Analyze)
                    || (self.status == b'E' && !matches!(it.kind, Kind::End | Kind::Empty))
                {
                    return self.err(out);
                }
                if name.is_empty() {
                    self.unnamed = Some(*i);
                } else {
                    self.stmts.insert(name, *i);
                }
                out.push(b'1');
            }
            Msg::Bind(stmt) => {
                self.open = true;
                let Some(i) = self.lookup(stmt) else {
                    return self.err(out);
                };
                let it = &ITEMS[i];
                if (self.status == b'E' && it.kind != Kind::End) || it.fail == Fail::Plan {
                    return self.err(out);
                }
                self.portal = Some(Portal {
                    item: i,
                    left: it.rows.unwrap_or(0),
                });
                out.push(b'2');
            }
            Msg::DescribeStmt(name) => {
                self.open = true;
                let Some(i) = self.lookup(name) else {
                    return self.err(out);
                };
                if self.status == b'E' && ITEMS[i].rows.is_some() {
                    return self.err(out);
                }
                out.push(b't');
                out.push(if ITEMS[i].rows.is_some() { b'T' } else { b'n' });
            }
            Msg::DescribePortal => {
                self.open = true;
                let Some(p) = self.portal else {
                    return self.err(out);
                };
                if self.status == b'E' && ITEMS[p.item].rows.is_some() {
                    return self.err(out);
                }
                out.push(if ITEMS[p.item].rows.is_some() {
                    b'T'
                } else {
                    b'n'
                });
            }
            Msg::Execute(max) => {
                self.open = true;
                let Some(mut p) = self.portal else {
                    return self.err(out);
                };
                let it = &ITEMS[p.item];
                if self.status == b'E' && it.kind != Kind::End {
                    return self.err(out);
                }
                if matches!(it.fail, Fail::Row | Fail::Run) || (self.read_only && it.write) {
                    return self.err(out);
                }
                match it.kind {
                    Kind::Empty => out.push(b'I'),
                    Kind::CopyIn => {
                        out.push(b'G');
                        self.copy = CopyMode::Extended;
                    }
                    Kind::CopyOut => out.extend(b"HC"),
                    Kind::Plain if it.rows.is_some() && *max > 0 => {
                        if p.left < *max {
                            out.push(b'C');
                            p.left = 0;
                        } else {
                            out.push(b's');
                            self.suspended = true;
                            p.left -= max;
                        }
                        self.portal = Some(p);
                    }
                    kind => {
                        self.transaction(kind, &mut out);
                        out.push(b'C');
                        p.left = 0;
                        self.portal = Some(p);
                    }
                }
            }
            Msg::CloseStmt(name) => {
                self.open = true;
                self.stmts.remove(name);
                out.push(b'3');
            }
        }
        out
    }

    fn err(&mut self, mut out: Vec<u8>) -> Vec<u8> {
        self.ext_error(&mut out);
        out
    }

    fn copy_failed(&mut self, out: &mut Vec<u8>) {
        let simple = self.copy == CopyMode::Simple;
        self.copy = CopyMode::No;
        if simple {
            out.push(b'E');
            self.tx_failed();
            self.ready(out);
        } else {
            self.ext_error(out);
        }
    }

    fn lookup(&self, name: &str) -> Option<usize> {
        match name {
            "" => self.unnamed,
            n => self.stmts.get(n).copied(),
        }
    }

    fn query(&mut self, items: &[usize], out: &mut Vec<u8>) {
        // the empty query: answered even in a failed transaction
        if items.iter().all(|&i| ITEMS[i].kind == Kind::Empty) {
            out.push(b'I');
            return self.ready(out);
        }
        if items.iter().any(|&i| ITEMS[i].fail == Fail::Syntax) {
            out.push(b'E');
            self.tx_failed();
            return self.ready(out);
        }
        for &i in items {
            let it = &ITEMS[i];
            if self.status == b'E' && it.kind != Kind::End {
                out.push(b'E');
                return self.ready(out);
            }
            let refused = match it.fail {
                Fail::Analyze | Fail::Plan | Fail::Run => Some(""),
                Fail::Row => Some("T"),
                _ if self.read_only && it.write => Some(""),
                _ => None,
            };
            if let Some(before) = refused {
                out.extend(before.as_bytes());
                out.push(b'E');
                self.tx_failed();
                return self.ready(out);
            }
            match it.kind {
                Kind::CopyIn => {
                    out.push(b'G');
                    self.copy = CopyMode::Simple;
                    return;
                }
                Kind::CopyOut => out.extend(b"HC"),
                Kind::Empty => out.push(b'I'),
                kind if it.rows.is_some() => {
                    self.transaction(kind, out);
                    out.extend(b"TC");
                }
                kind => {
                    self.transaction(kind, out);
                    out.push(b'C');
                }
            }
        }
        self.ready(out);
    }
}

// ---------------------------------------------------------------------------------------
// The generator.

/// splitmix64: small, and the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Clone>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())].clone()
    }
}

/// A batch of messages sent at once, and the stop tags PostgreSQL answers it with.
struct Batch {
    msgs: Vec<Msg>,
    expect: Vec<u8>,
}

/// Statements for simple and extended use: anything but COPY FROM STDIN, which gets its own
/// flows.
fn plain_item(rng: &mut Rng) -> usize {
    loop {
        let i = rng.below(ITEMS.len());
        if ITEMS[i].kind != Kind::CopyIn {
            return i;
        }
    }
}

fn gen_case(seed: u64) -> Vec<Batch> {
    let mut rng = Rng(seed);
    let mut model = Model::new();
    let mut batches: Vec<Batch> = Vec::new();
    let n = 1 + rng.below(8);
    for _ in 0..n {
        let msgs = loop {
            let msgs = gen_batch(&mut rng, &model);
            if !writes_behind_read_only_end(&model, &msgs)
                && !writes_behind_suspended_read(&model, &msgs)
            {
                break msgs;
            }
        };
        push(&mut batches, &mut model, msgs);
    }
    // back to a known state, then a Query whose answer closes the stream
    let mut end = Vec::new();
    match model.copy {
        CopyMode::Simple => end.push(Msg::CopyFail),
        CopyMode::Extended => end.extend([Msg::CopyFail, Msg::Sync]),
        CopyMode::No if model.skipping || model.open => end.push(Msg::Sync),
        CopyMode::No => {}
    }
    if !end.is_empty() {
        push(&mut batches, &mut model, end);
    }
    let mut end = Vec::new();
    if model.status != b'I' {
        end.push(Msg::Query(vec![find("ROLLBACK")]));
    }
    end.push(Msg::Query(vec![find("SELECT 1")]));
    push(&mut batches, &mut model, end);
    batches
}

/// Whether `msgs`, sent in a read-only transaction, end it and write behind the end in the
/// same batch. Under read/write splitting such a transaction has a replica until its
/// ReadyForQuery `I` (docs/routing.md): what is pipelined behind its COMMIT goes there too,
/// and a write fails (25006) where PostgreSQL, on the primary, would make it. pgmux's
/// documented behaviour, left out of the comparison. So is a write in a later batch before
/// that ReadyForQuery (the COMMIT sent up to a Flush), and in a transaction begun there.
fn writes_behind_read_only_end(model: &Model, msgs: &[Msg]) -> bool {
    if !model.read_only && !model.read_only_ended {
        return false;
    }
    let mut ended = model.read_only_ended;
    for m in msgs {
        let items: Vec<usize> = match m {
            Msg::Query(items) => items.clone(),
            Msg::Parse(_, i) => vec![*i],
            Msg::Bind(name) => model.lookup(name).into_iter().collect(),
            _ => Vec::new(),
        };
        for i in items {
            ended |= ITEMS[i].kind == Kind::End;
            if ended && ITEMS[i].write {
                return true;
            }
        }
    }
    false
}

/// Whether `msgs` write in an extended-protocol unit whose read was flushed in an earlier
/// batch after a row limit suspended its portal (fetched to the end since, or not). Under read/write splitting the unit stays on
/// the replica (the client may fetch more of that portal: docs/routing.md), where a write fails
/// (25006). pgmux's documented behaviour, left out of the comparison.
fn writes_behind_suspended_read(model: &Model, msgs: &[Msg]) -> bool {
    if !model.open || model.skipping || !model.suspended {
        return false;
    }
    msgs.iter().any(|m| match m {
        Msg::Parse(_, i) => ITEMS[*i].write,
        Msg::Bind(name) => model.lookup(name).is_some_and(|i| ITEMS[i].write),
        _ => false,
    })
}

fn push(batches: &mut Vec<Batch>, model: &mut Model, msgs: Vec<Msg>) {
    let mut expect = Vec::new();
    for m in &msgs {
        expect.extend(model.feed(m));
    }
    // A Query or FunctionCall skipped after an extended-protocol error gets no
    // ReadyForQuery: a client waiting for one would wait on PostgreSQL too. This one goes on
    // without waiting; what PostgreSQL flushed (the error) is waited for with the next batch.
    // (pgmux holds a replica read's answer back until its unit ends, in case it must be
    // retried elsewhere: `relay::retry`.)
    //
    // Nor does a client wait after extended-protocol messages without a Sync or Flush:
    // PostgreSQL flushes an error or notice at once, but the protocol promises answers only
    // at a Sync or Flush, and under read/write splitting pgmux routes a unit only once it is
    // whole (docs/routing.md), so a unit cut short has no answer yet.
    let waits_for_ready = matches!(msgs.last(), Some(Msg::Query(_) | Msg::FunctionCall));
    let unflushed_unit = msgs.iter().all(|m| {
        matches!(
            m,
            Msg::Parse(..)
                | Msg::Bind(_)
                | Msg::DescribeStmt(_)
                | Msg::DescribePortal
                | Msg::Execute(_)
                | Msg::CloseStmt(_)
        )
    });
    if unflushed_unit || (waits_for_ready && !expect.contains(&b'Z') && !expect.contains(&b'G')) {
        model.carried.append(&mut expect);
    } else if !expect.is_empty() {
        expect.splice(0..0, std::mem::take(&mut model.carried));
    }
    batches.push(Batch { msgs, expect });
}

fn gen_batch(rng: &mut Rng, model: &Model) -> Vec<Msg> {
    let mut out = Vec::new();
    if model.copy != CopyMode::No {
        // rows, perhaps a Sync or Flush among them (ignored during a COPY), perhaps a
        // refused one, then the end of the COPY, or more rows later
        for _ in 0..rng.below(3) {
            out.push(Msg::CopyData(rng.pick(GOOD_ROWS)));
        }
        if rng.chance(10) {
            out.push(rng.pick(&[Msg::Sync, Msg::Flush]));
            out.push(Msg::CopyData(rng.pick(GOOD_ROWS)));
        }
        let refused = rng.chance(25);
        if refused {
            out.push(Msg::CopyData(rng.pick(BAD_ROWS)));
            // the client goes on, unaware
            if rng.chance(60) {
                out.push(Msg::CopyData(rng.pick(GOOD_ROWS)));
            }
        }
        // (not a Query: PostgreSQL refuses its type byte and reads the rest as a message.
        // Nor, after a refused row, a Sync before the end of the COPY: PostgreSQL answers
        // it, which pgmux cannot tell from a Sync during the COPY, ignored)
        match rng.below(10) {
            0..=6 => out.push(Msg::CopyDone),
            7 | 8 => out.push(Msg::CopyFail),
            _ if refused => out.push(Msg::CopyDone),
            _ => {}
        }
        if model.copy == CopyMode::Extended && rng.chance(85) {
            out.push(Msg::Sync);
        }
        if rng.chance(15) {
            // strays after the end
            out.push(Msg::CopyData(rng.pick(GOOD_ROWS)));
            out.push(rng.pick(&[Msg::CopyDone, Msg::CopyFail]));
        }
        return out;
    }
    match rng.below(100) {
        0..=29 => {
            let n = if rng.chance(25) { 2 + rng.below(2) } else { 1 };
            let items = (0..n)
                .map(|_| loop {
                    let i = plain_item(rng);
                    if n == 1 || ITEMS[i].kind != Kind::Empty {
                        break i;
                    }
                })
                .collect();
            out.push(Msg::Query(items));
        }
        30..=64 => gen_extended(rng, model, &mut out),
        65..=72 => {
            // COPY FROM STDIN as a Query; the rows come in the next batch
            out.push(Msg::Query(vec![find("COPY {w} (a, s) FROM STDIN")]));
        }
        73..=80 => {
            // and by Execute; a Sync or Flush behind it, which a COPY in progress ignores
            let copy = find("COPY {w} (a, s) FROM STDIN");
            out.push(Msg::Parse("", copy));
            out.push(Msg::Bind(""));
            if rng.chance(30) {
                out.push(Msg::DescribePortal);
            }
            out.push(Msg::Execute(0));
            out.push(rng.pick(&[Msg::Sync, Msg::Sync, Msg::Flush]));
        }
        81..=85 => out.push(Msg::FunctionCall),
        _ => {
            // strays: COPY messages with no COPY, lone Syncs and Flushes
            for _ in 0..1 + rng.below(3) {
                out.push(rng.pick(&[
                    Msg::CopyData("1\tstray\n"),
                    Msg::CopyDone,
                    Msg::CopyFail,
                    Msg::Sync,
                    Msg::Flush,
                ]));
            }
            if rng.chance(50) {
                out.push(Msg::Query(vec![plain_item(rng)]));
            }
        }
    }
    out
}

/// Extended-protocol statements, up to a Sync, a Flush, a Query or nothing.
fn gen_extended(rng: &mut Rng, model: &Model, out: &mut Vec<Msg>) {
    let mut m = model.clone();
    // a suspended portal may be fetched from again
    if let Some(p) = m.portal.filter(|p| p.left > 0 && m.open && !m.skipping) {
        if ITEMS[p.item].rows.is_some() && rng.chance(70) {
            out.push(Msg::Execute(if rng.chance(50) { 2 } else { 0 }));
        }
    }
    let statements = 1 + rng.below(3);
    for _ in 0..statements {
        let before = out.len();
        // pgx without a statement cache: the unnamed statement of an earlier unit, bound again
        // (not a COPY FROM STDIN, which only its own flows use)
        let rebind = m.unnamed.is_some_and(|u| ITEMS[u].kind != Kind::CopyIn)
            && !m.unnamed_skipped
            && out.is_empty()
            && rng.chance(20);
        let mut stmt = "";
        let mut what = m.unnamed;
        if !rebind {
            let i = plain_item(rng);
            stmt = if rng.chance(30) {
                rng.pick(&["s1", "s2"])
            } else {
                ""
            };
            what = m.stmts.get(stmt).copied();
            if stmt.is_empty() || what.is_none() || rng.chance(15) {
                what = Some(i);
                out.push(Msg::Parse(stmt, i));
                if rng.chance(30) {
                    out.push(Msg::DescribeStmt(stmt));
                }
            }
        }
        if rng.chance(8) {
            // Parse and Describe only (the Bind comes in a later unit)
        } else {
            out.push(Msg::Bind(stmt));
            if rng.chance(30) {
                out.push(Msg::DescribePortal);
            }
            // a row limit, on a query of more rows: the portal is suspended, to fetch again
            let many = what.is_some_and(|i| {
                let it = &ITEMS[i];
                it.kind == Kind::Plain && !it.write && it.rows.is_some_and(|r| r > 2)
            });
            let limited = many && rng.chance(35);
            out.push(Msg::Execute(if limited { 2 } else { 0 }));
            if limited && rng.chance(50) {
                if rng.chance(40) {
                    out.push(Msg::Flush);
                }
                out.push(Msg::Execute(0));
            }
        }
        if !stmt.is_empty() && rng.chance(15) {
            out.push(Msg::CloseStmt(stmt));
        }
        for msg in &out[before..] {
            m.feed(msg);
        }
    }
    match rng.below(100) {
        0..=59 => out.push(Msg::Sync),
        60..=79 => out.push(Msg::Flush),
        80..=89 => out.push(Msg::Query(vec![plain_item(rng)])),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------
// Running a case.

type Answer = (u8, Vec<u8>);
/// A run's answers, and how many came after each batch.
type Answers = (Vec<Answer>, Vec<usize>);

/// Reads the next message that is not a ParameterStatus.
fn next(s: &mut TcpStream) -> Option<Answer> {
    loop {
        let m = read_msg(s)?;
        if m.0 != b'S' {
            return Some(m);
        }
    }
}

/// An answer with what may differ taken out: errors and notices keep severity and SQLSTATE.
fn normal(m: &Answer) -> Answer {
    match m.0 {
        b'E' | b'N' => {
            let mut keep = Vec::new();
            for f in m.1.split(|&b| b == 0) {
                if matches!(f.first(), Some(b'V' | b'C')) {
                    keep.extend_from_slice(f);
                    keep.push(0);
                }
            }
            (m.0, keep)
        }
        _ => m.clone(),
    }
}

fn show_answer(m: &Answer) -> String {
    let text = String::from_utf8_lossy(&normal(m).1).replace('\0', "|");
    format!("{}:{}", m.0 as char, text)
}

fn show_case(seed: u64, batches: &[Batch], table: &str) -> String {
    let mut s = format!("case seed {seed} (rerun: PGMUX_DIFF_SEED={seed} PGMUX_DIFF_CASES=1)\n");
    for (n, b) in batches.iter().enumerate() {
        let msgs: Vec<String> = b.msgs.iter().map(|m| show(m, table)).collect();
        let _ = writeln!(
            s,
            "  batch {n}: [{}] -> {}",
            msgs.join(", "),
            String::from_utf8_lossy(&b.expect)
        );
    }
    s
}

fn show_answers(answers: &[Answer]) -> String {
    answers
        .iter()
        .map(show_answer)
        .collect::<Vec<_>>()
        .join("\n    ")
}

/// Sends each batch and reads its answers: up to the model's stop tags (direct run, which
/// returns the count read per batch) or exactly `counts` messages (pgmux run).
fn run(
    s: &mut TcpStream,
    batches: &[Batch],
    table: &str,
    counts: Option<&[usize]>,
) -> Result<Answers, (String, Vec<Answer>)> {
    let mut answers = Vec::new();
    let mut got_counts = Vec::new();
    for (n, b) in batches.iter().enumerate() {
        let bytes: Vec<u8> = b.msgs.iter().flat_map(|m| encode(m, table)).collect();
        if let Err(e) = s.write_all(&bytes) {
            return Err((format!("batch {n}: write failed: {e}"), answers));
        }
        let before = answers.len();
        match counts {
            Some(counts) => {
                for _ in 0..counts[n] {
                    match next(s) {
                        Some(m) => answers.push(m),
                        None => {
                            return Err((
                                format!(
                                    "batch {n}: no answer within {READ_TIMEOUT:?} (or closed): \
                                     {} of {} messages",
                                    answers.len() - before,
                                    counts[n]
                                ),
                                answers,
                            ))
                        }
                    }
                }
            }
            None => {
                let mut stops = Vec::new();
                while stops.len() < b.expect.len() {
                    let Some(m) = next(s) else {
                        return Err((
                            format!(
                                "batch {n}: PostgreSQL sent stop tags {:?}, the model expects \
                                 {:?} (read timed out)",
                                String::from_utf8_lossy(&stops),
                                String::from_utf8_lossy(&b.expect)
                            ),
                            answers,
                        ));
                    };
                    if STOP.contains(&m.0) {
                        stops.push(m.0);
                    }
                    answers.push(m);
                }
                if stops != b.expect {
                    return Err((
                        format!(
                            "batch {n}: PostgreSQL sent stop tags {:?}, the model expects {:?}",
                            String::from_utf8_lossy(&stops),
                            String::from_utf8_lossy(&b.expect)
                        ),
                        answers,
                    ));
                }
                // a row-limited fetch and the DataRows of the last stop come before it
            }
        }
        got_counts.push(answers.len() - before);
    }
    Ok((answers, got_counts))
}

/// A simple query on a raw connection; the first column of each row, panicking on errors.
fn rows(s: &mut TcpStream, sql: &str) -> Vec<String> {
    s.write_all(&common::raw::query(sql)).unwrap();
    let answers = common::raw::until_ready(s);
    assert_eq!(
        common::raw::error_code(&answers),
        None,
        "{sql}: {answers:?}"
    );
    answers
        .iter()
        .filter(|m| m.0 == b'D')
        .map(|m| {
            let len = i32::from_be_bytes(m.1[2..6].try_into().unwrap());
            if len < 0 {
                "NULL".into()
            } else {
                String::from_utf8_lossy(&m.1[6..6 + len as usize]).into_owned()
            }
        })
        .collect()
}

struct Scene {
    cluster: &'static PgCluster,
    px: Pgmux,
    table: &'static str,
    /// Transaction mode with a pool of one: a client that checks the server went back.
    probe: bool,
}

fn setup_fixtures(cluster: &PgCluster) {
    static DONE: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    let port = cluster.primary().port;
    if done.contains(&port) {
        return;
    }
    cluster.psql(
        cluster.primary(),
        "app",
        "CREATE TABLE IF NOT EXISTS diff_fix (id int PRIMARY KEY, v text);
         INSERT INTO diff_fix VALUES (1, 'a'), (2, 'b'), (3, 'c') ON CONFLICT DO NOTHING;
         CREATE TABLE IF NOT EXISTS diff_w_tx (a int NOT NULL, s text);
         CREATE TABLE IF NOT EXISTS diff_w_split (a int NOT NULL, s text);
         CREATE TABLE IF NOT EXISTS diff_w_session (a int NOT NULL, s text);
         CREATE TABLE IF NOT EXISTS diff_copy_sync (a int NOT NULL, s text);",
    );
    cluster.wait_replicas_caught_up();
    done.push(port);
}

fn scene(name: &'static str) -> Scene {
    let (cluster, mode, table, split) = match name {
        "transaction" => (PgCluster::shared(), "transaction", "diff_w_tx", false),
        "split" => (
            PgCluster::shared_with_replicas(),
            "transaction",
            "diff_w_split",
            true,
        ),
        _ => (PgCluster::shared(), "session", "diff_w_session", false),
    };
    setup_fixtures(cluster);
    let split = if split {
        cluster.split_settings()
    } else {
        String::new()
    };
    let px = Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
pool_mode = "{mode}"
default_pool_size = 1
query_wait_timeout = 5
[[users]]
name = "postgres"
[[databases]]
name = "app"
host = "127.0.0.1"
port = {}
lag_check_interval = 0.1
{split}
"#,
        cluster.primary().port
    ));
    Scene {
        cluster,
        px,
        table,
        probe: mode == "transaction",
    }
}

/// Waits until every replica has replayed what the primary wrote so far.
fn replicas_caught_up(control: &mut TcpStream, replicas: &mut [TcpStream]) {
    if replicas.is_empty() {
        return;
    }
    let lsn = rows(control, "SELECT pg_current_wal_insert_lsn()").remove(0);
    for r in replicas {
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'");
        wait_until(
            "a replica to replay the emptied table",
            Duration::from_secs(60),
            || rows(r, &sql) == ["t"],
        );
    }
}

fn differential(name: &'static str) {
    let seed: u64 = std::env::var("PGMUX_DIFF_SEED")
        .ok()
        .map(|s| s.parse().expect("PGMUX_DIFF_SEED: a number"))
        .unwrap_or(DEFAULT_SEED);
    let cases: u64 = std::env::var("PGMUX_DIFF_CASES")
        .ok()
        .map(|s| s.parse().expect("PGMUX_DIFF_CASES: a number"))
        .unwrap_or(DEFAULT_CASES);
    eprintln!("differential {name}: PGMUX_DIFF_SEED={seed} PGMUX_DIFF_CASES={cases}");
    let sc = scene(name);
    let primary = sc.cluster.primary().port;
    let (mut control, _) = login(primary, "postgres", "app");
    let mut replicas: Vec<TcpStream> = sc
        .cluster
        .replicas()
        .iter()
        .map(|r| login(r.port, "postgres", "app").0)
        .collect();
    let mut probe = sc.probe.then(|| {
        let (s, _) = login(sc.px.port, "postgres", "app");
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        s
    });
    let truncate = format!("TRUNCATE {}", sc.table);
    for k in 0..cases {
        let case_seed = seed.wrapping_add(k);
        let batches = gen_case(case_seed);
        let fail = |what: &str, detail: String| -> ! {
            panic!(
                "differential {name}: {what}\n{}{detail}",
                show_case(case_seed, &batches, sc.table)
            )
        };

        rows(&mut control, &truncate);
        let (mut direct, _) = login(primary, "postgres", "app");
        direct.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let (want, counts) = match run(&mut direct, &batches, sc.table, None) {
            Ok(r) => r,
            Err((why, got)) => fail(
                "the generator's model disagrees with PostgreSQL (a test bug)",
                format!("{why}\n  PostgreSQL answered:\n    {}", show_answers(&got)),
            ),
        };
        drop(direct);

        rows(&mut control, &truncate);
        replicas_caught_up(&mut control, &mut replicas);
        let (mut through, _) = login(sc.px.port, "postgres", "app");
        through.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let got = match run(&mut through, &batches, sc.table, Some(&counts)) {
            Ok((got, _)) => got,
            Err((why, got)) => fail(
                "pgmux did not answer as PostgreSQL did",
                format!(
                    "{why}\n  PostgreSQL answered:\n    {}\n  pgmux answered:\n    {}",
                    show_answers(&want),
                    show_answers(&got)
                ),
            ),
        };
        let (w, g): (Vec<Answer>, Vec<Answer>) = (
            want.iter().map(normal).collect(),
            got.iter().map(normal).collect(),
        );
        if w != g {
            let at = w.iter().zip(&g).position(|(a, b)| a != b).unwrap_or(0);
            fail(
                &format!("answers differ at message {at}"),
                format!(
                    "  PostgreSQL answered:\n    {}\n  pgmux answered:\n    {}",
                    show_answers(&want),
                    show_answers(&got)
                ),
            );
        }
        if let Some(p) = probe.as_mut() {
            // the case's client is idle, outside a transaction: its server is back
            p.write_all(&common::raw::query("/* pgmux:primary */ SELECT 1"))
                .unwrap();
            let answers = common::raw::until_ready(p);
            if common::raw::error_code(&answers).is_some()
                || answers.last().map(|m| m.0) != Some(b'Z')
            {
                fail(
                    "the server did not go back to the pool after the case",
                    format!("  the probe got:\n    {}", show_answers(&answers)),
                );
            }
        }
        drop(through);
    }
    eprintln!("differential {name}: {cases} cases agree");
}

#[test]
fn transaction_mode_answers_as_postgresql() {
    differential("transaction");
}

#[test]
fn read_write_split_answers_as_postgresql() {
    differential("split");
}

#[test]
fn session_mode_answers_as_postgresql() {
    differential("session");
}

/// A Sync sent during a COPY FROM STDIN started by a simple Query is ignored by PostgreSQL,
/// as during one started by an Execute. pgmux counted it as owed a ReadyForQuery that never
/// came, and the server never went back to the pool: with a pool of one, every other client
/// waited out query_wait_timeout. Found by the differential test.
#[test]
fn a_sync_during_a_copy_started_by_a_query_is_owed_nothing() {
    use common::raw::{query, until_ready};
    let sc = scene("transaction");
    let (mut s, _) = login(sc.px.port, "postgres", "app");
    let (mut other, _) = login(sc.px.port, "postgres", "app");
    let tags = |m: &[Answer]| String::from_utf8(m.iter().map(|m| m.0).collect()).unwrap();
    for round in 0..3 {
        s.write_all(&query("COPY diff_copy_sync (a, s) FROM STDIN"))
            .unwrap();
        let started = next(&mut s).expect("an answer to the COPY");
        assert_eq!(started.0, b'G', "round {round}: {}", show_answer(&started));
        let mut out = msg(b'd', b"1\tx\n");
        out.extend(msg(b'S', b""));
        out.extend(msg(b'd', b"2\ty\n"));
        out.extend(msg(b'c', b""));
        s.write_all(&out).unwrap();
        let answers = until_ready(&mut s);
        assert_eq!(tags(&answers), "CZ", "round {round}: {answers:?}");
        assert_eq!(answers[0].1, b"COPY 2\0");
        // the one server is back in the pool
        other
            .write_all(&query("INSERT INTO diff_copy_sync VALUES (0, 'other')"))
            .unwrap();
        let answers = until_ready(&mut other);
        assert_eq!(tags(&answers), "CZ", "round {round}: {answers:?}");
    }
}
