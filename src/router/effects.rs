//! What a query does to its server session beyond the statement itself, for transaction
//! pooling: settings changed (SET, RESET, set_config, DISCARD), or state that cannot move to another server and
//! so pins the client to this one (LISTEN, SQL PREPARE, temporary objects, WITH HOLD
//! cursors, session advisory locks). Built on the classifier's lexer, so strings, comments
//! and dollar quotes cannot fool it; unlexable text is reported as pinning (when in doubt,
//! keep the server).

use super::classify::{Backslash, Lexer, Tok};

/// Effects found in one query string (one or more statements).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Effects {
    /// Session settings may have changed: read them back before the server is reused.
    pub settings: bool,
    /// State that cannot follow the client: it keeps this server until it leaves.
    pub pin: Option<PinReason>,
    /// A DISCARD ALL alone in its text. PostgreSQL refuses one among other statements (an
    /// implicit transaction block), so such a text reports none: it discards nothing. One
    /// alone may still be refused (in a transaction block, in a pipeline): what it undoes is
    /// forgotten only when the server says `DISCARD ALL` (`SessionState::discarded`).
    pub discard_all: bool,
    /// A custom setting (a dotted name, `myapp.tenant`) was named by SET, RESET or
    /// set_config: PostgreSQL does not list those in pg_settings, so pgmux reads them back
    /// by name ([`custom_setting_names`]).
    pub custom_settings: bool,
    /// A setting reset (`RESET name`, `RESET ALL`, `SET name TO DEFAULT`): on a server it
    /// goes to the server's default, where PostgreSQL gives the client's startup value.
    pub resets: bool,
    /// pgmux settings reset to their defaults (`RESET pgmux.route`, `SET pgmux.min_lsn TO
    /// DEFAULT`, `RESET ALL`, `DISCARD ALL`): `PGMUX_ROUTE` | `PGMUX_MIN_LSN`.
    pub pgmux_reset: u8,
    /// A statement cannot run in a batch (`batch`): it opens a transaction block (`BEGIN`,
    /// `START TRANSACTION`; also a PL/pgSQL block's `BEGIN` in a DO body), which may leave the
    /// session inside it, or it is a `COPY`, whose data would come in the middle of the batch,
    /// or a `DEALLOCATE`: after `DEALLOCATE ALL` pgmux must forget the statements it prepared
    /// on that server, which a batched query cannot tell it (its client is lent a stand-in for
    /// the server, `batch::Seat`).
    pub unbatchable: bool,
    /// `DEALLOCATE ALL` or `DISCARD ALL`: the client's prepared statements are gone, and so
    /// are those pgmux prepared on its server (forgotten when the query is sent, so the
    /// requests behind it in the same write see it done).
    pub drops_all_statements: bool,
    /// The server may lose statements pgmux prepared there in a way pgmux cannot follow (a
    /// SQL `DEALLOCATE` of one of pgmux's names, dynamic SQL in a DO block): it deallocates
    /// them all before it serves another client.
    pub may_drop_statements: bool,
}

pub const PGMUX_ROUTE: u8 = 1;
pub const PGMUX_MIN_LSN: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinReason {
    Listen,
    Prepare,
    TempObject,
    HoldCursor,
    AdvisoryLock,
    /// The text could not be read (unterminated string or comment).
    Unreadable,
    /// Settings pgmux cannot follow to another server: `SET SESSION AUTHORIZATION`, or
    /// set_config with a computed name.
    Settings,
    /// A DO block runs SQL built at run time (PL/pgSQL `EXECUTE`), which may do anything
    /// above unseen.
    DynamicSql,
}

impl PinReason {
    pub const ALL: [PinReason; 8] = [
        PinReason::Listen,
        PinReason::Prepare,
        PinReason::TempObject,
        PinReason::HoldCursor,
        PinReason::AdvisoryLock,
        PinReason::Unreadable,
        PinReason::Settings,
        PinReason::DynamicSql,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PinReason::Listen => "listen",
            PinReason::Prepare => "prepare",
            PinReason::TempObject => "temp_object",
            PinReason::HoldCursor => "hold_cursor",
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::Unreadable => "unreadable",
            PinReason::Settings => "settings",
            PinReason::DynamicSql => "dynamic_sql",
        }
    }
}

impl Effects {
    pub fn any(&self) -> bool {
        *self != Effects::default()
    }
}

/// The effects of `sql`.
pub fn effects(sql: &str) -> Effects {
    let mut lexer = Lexer::new(sql, Backslash::Literal);
    let mut scan = Scan::default();
    loop {
        match lexer.next() {
            Ok(Some(t)) => scan.token(t),
            Ok(None) => return also_escaped(sql, lexer.saw_backslash(), scan.finish()),
            Err(_) => return scan.unreadable(),
        }
    }
}

/// `fx`, the effects of `sql` read as PostgreSQL does by default, joined with those of its
/// other reading when a backslash in a plain string makes one (standard_conforming_strings
/// = off, where `'a\'; SET x = 1; --'` sets x): pgmux does not know the session's setting,
/// so what either reading does counts. A text that does not lex that way fails there.
pub(super) fn also_escaped(sql: &str, saw_backslash: bool, fx: Effects) -> Effects {
    if !saw_backslash {
        return fx;
    }
    let mut lexer = Lexer::new(sql, Backslash::Escape);
    let mut scan = Scan::default();
    let other = loop {
        match lexer.next() {
            Ok(Some(t)) => scan.token(t),
            Ok(None) => break scan.finish(),
            Err(_) => return fx,
        }
    };
    Effects {
        settings: fx.settings || other.settings,
        pin: fx.pin.or(other.pin),
        // what the readings disagree on is not done for the client: the server is cleaned
        discard_all: fx.discard_all && other.discard_all,
        custom_settings: fx.custom_settings || other.custom_settings,
        resets: fx.resets || other.resets,
        pgmux_reset: fx.pgmux_reset | other.pgmux_reset,
        unbatchable: fx.unbatchable || other.unbatchable,
        drops_all_statements: fx.drops_all_statements && other.drops_all_statements,
        may_drop_statements: fx.may_drop_statements
            || other.may_drop_statements
            || fx.drops_all_statements != other.drops_all_statements,
    }
}

/// The statement name `sql` deallocates when it is exactly one `DEALLOCATE [PREPARE] name`
/// (not `ALL`), as PostgreSQL reads the name: an unquoted one in lower case.
pub fn deallocated_name(sql: &str) -> Option<String> {
    let mut lexer = Lexer::new(sql, Backslash::Literal);
    let mut next = || lexer.next().ok().flatten();
    let mut tok = next();
    if !word(&tok, "deallocate") {
        return None;
    }
    tok = next();
    if word(&tok, "prepare") {
        tok = next();
    }
    let name = match tok? {
        Tok::Word(w) if !w.eq_ignore_ascii_case("all") => w.to_ascii_lowercase(),
        Tok::Quoted(q) => q.replace("\"\"", "\""),
        _ => return None,
    };
    let mut rest = next();
    while rest == Some(Tok::Semi) {
        rest = next();
    }
    rest.is_none().then_some(name)
}

/// `effects` fed one token at a time, so one lexer pass can also serve the fingerprint
/// (`router::fingerprint_and_effects`).
#[derive(Default)]
pub(super) struct Scan<'a> {
    fx: Effects,
    /// the first words of the current statement, enough for every rule below
    head: [Option<Tok<'a>>; HEAD],
    n: usize,
    declare_seen_with: bool,
    /// Tokens of `set_config('name',` seen so far (1: the function, 2: its parenthesis, 3:
    /// a literal name, which must be all of the first argument).
    set_config: u8,
    /// The statement is a SELECT (or WITH ... SELECT).
    selecting: bool,
    /// The last token was INTO in a SELECT: `SELECT ... INTO TEMP t` creates a table.
    select_into: bool,
    /// The statement sets search_path, where one naming pg_temp makes unqualified CREATEs
    /// make temporary objects: `SEARCH_PATH_SET` (any later word), or set_config's name
    /// seen (`SEARCH_PATH_NAME`) and then its comma (`SEARCH_PATH_VALUE`: the next token).
    search_path: u8,
    /// Scanning a DO block's body (`do_block_effects`), where EXECUTE runs dynamic SQL.
    in_block: bool,
    /// Statements ended so far (saturating).
    statements: u8,
}

impl<'a> Scan<'a> {
    #[inline(always)]
    pub(super) fn token(&mut self, tok: Tok<'a>) {
        if tok == Tok::Semi {
            self.end_statement();
            self.head = [None; HEAD];
            self.n = 0;
            self.declare_seen_with = false;
            self.selecting = false;
            self.select_into = false;
            self.search_path = 0;
            return;
        }
        if self.n < self.head.len() {
            self.head[self.n] = Some(tok);
        }
        self.n += 1;
        // before set_config_arg, which may mark the next tokens as search_path's
        if self.search_path != 0 {
            self.search_path_value(tok);
        }
        if self.set_config > 0 {
            self.set_config_arg(tok);
        }
        let Tok::Word(w) = tok else {
            if self.select_into
                && matches!(tok, Tok::Quoted(q) if q.eq_ignore_ascii_case("pg_temp"))
            {
                self.fx.pin.get_or_insert(PinReason::TempObject);
            }
            self.select_into = false;
            match tok {
                // a quoted function name is still the function
                Tok::Quoted(q) if is_session_advisory_lock(q) => {
                    self.fx.pin.get_or_insert(PinReason::AdvisoryLock);
                }
                Tok::Quoted(q) if q.eq_ignore_ascii_case("set_config") => {
                    self.fx.settings = true;
                    self.set_config = 1;
                }
                // a setting's name, quoted or not, is read without regard to case
                Tok::Quoted(q)
                    if q.eq_ignore_ascii_case("search_path") && word(&self.head[0], "set") =>
                {
                    self.search_path = SEARCH_PATH_SET;
                }
                // an anonymous block's body runs here: what it does counts as this statement's
                Tok::Str(body) if word(&self.head[0], "do") => self.merge(do_block_effects(body)),
                _ => {}
            }
            return;
        };
        // rules that look anywhere in the statement
        if w.eq_ignore_ascii_case("set_config") {
            self.fx.settings = true;
            self.set_config = 1;
        } else if is_session_advisory_lock(w) {
            self.fx.pin.get_or_insert(PinReason::AdvisoryLock);
        } else if word(&self.head[0], "declare") {
            if w.eq_ignore_ascii_case("with") {
                self.declare_seen_with = true;
            } else if self.declare_seen_with && w.eq_ignore_ascii_case("hold") {
                self.fx.pin.get_or_insert(PinReason::HoldCursor);
            } else {
                self.declare_seen_with = false;
            }
        } else if self.select_into
            && ["temp", "temporary", "pg_temp"]
                .iter()
                .any(|k| w.eq_ignore_ascii_case(k))
        {
            // SELECT ... INTO TEMP t, SELECT ... INTO pg_temp.t
            self.fx.pin.get_or_insert(PinReason::TempObject);
        } else if self.in_block && w.eq_ignore_ascii_case("execute") {
            self.fx.pin.get_or_insert(PinReason::DynamicSql);
            self.fx.may_drop_statements = true;
        } else if w.eq_ignore_ascii_case("search_path") && word(&self.head[0], "set") {
            self.search_path = SEARCH_PATH_SET;
        }
        if self.n == 1 {
            self.selecting = w.eq_ignore_ascii_case("select") || w.eq_ignore_ascii_case("with");
        }
        self.select_into = self.selecting && w.eq_ignore_ascii_case("into");
    }

    fn merge(&mut self, inner: Effects) {
        self.fx.settings |= inner.settings;
        self.fx.custom_settings |= inner.custom_settings;
        self.fx.may_drop_statements |= inner.may_drop_statements;
        if let Some(p) = inner.pin {
            self.fx.pin.get_or_insert(p);
        }
    }

    fn search_path_value(&mut self, tok: Tok<'a>) {
        match self.search_path {
            SEARCH_PATH_NAME if tok == Tok::Comma => return self.search_path = SEARCH_PATH_VALUE,
            SEARCH_PATH_NAME => {}
            _ if names_pg_temp(tok) => {
                self.fx.pin.get_or_insert(PinReason::TempObject);
            }
            _ => {}
        }
        if self.search_path != SEARCH_PATH_SET {
            self.search_path = 0;
        }
    }

    /// The setting a set_config call names: a custom one is read back by name, one pgmux
    /// cannot know (a computed name) keeps the server.
    fn set_config_arg(&mut self, tok: Tok<'a>) {
        match (self.set_config, tok) {
            (1, Tok::LParen) => return self.set_config = 2,
            (2, Tok::Str(name)) => {
                if name.eq_ignore_ascii_case("search_path") {
                    self.search_path = SEARCH_PATH_NAME;
                } else if name.contains('.') {
                    self.fx.custom_settings = true;
                } else if name.eq_ignore_ascii_case("session_authorization") {
                    self.fx.pin.get_or_insert(PinReason::Settings);
                }
                return self.set_config = 3;
            }
            (3, Tok::Comma) => {}
            // a name computed from the literal (`'myapp.' || $1`, a cast): not known
            (2 | 3, _) => {
                self.fx.pin.get_or_insert(PinReason::Settings);
            }
            _ => {}
        }
        self.set_config = 0;
    }

    fn end_statement(&mut self) {
        if self.n > 0 {
            self.statements = self.statements.saturating_add(1);
        }
        statement(&self.head, self.n, &mut self.fx);
    }

    pub(super) fn finish(mut self) -> Effects {
        self.end_statement();
        if self.fx.discard_all && self.statements > 1 {
            // refused, and the text's implicit transaction with it: nothing is dropped or
            // unpinned (what the other statements pinned is kept, as when in doubt)
            self.fx.discard_all = false;
            self.fx.drops_all_statements = false;
        }
        self.fx
    }

    /// An unterminated string or comment: when in doubt, keep the server.
    pub(super) fn unreadable(mut self) -> Effects {
        self.fx.pin = Some(PinReason::Unreadable);
        self.fx
    }
}

const SEARCH_PATH_SET: u8 = 1;
const SEARCH_PATH_NAME: u8 = 2;
const SEARCH_PATH_VALUE: u8 = 3;

/// PL/pgSQL words after which a new statement starts inside a DO block's body.
fn opens_statement(tok: Tok<'_>) -> bool {
    matches!(tok, Tok::Word(w) if ["begin", "then", "else", "loop", "declare"]
        .iter()
        .any(|k| w.eq_ignore_ascii_case(k)))
}

/// The effects of a DO block's body: its statements sit inside PL/pgSQL blocks (`BEGIN
/// CREATE TEMP TABLE ...`), so each block keyword also ends a statement.
fn do_block_effects(body: &str) -> Effects {
    let mut lexer = Lexer::new(body, Backslash::Literal);
    let mut scan = Scan {
        in_block: true,
        ..Scan::default()
    };
    loop {
        match lexer.next() {
            Ok(Some(tok)) => {
                scan.token(tok);
                if opens_statement(tok) {
                    scan.token(Tok::Semi);
                }
            }
            Ok(None) => return scan.finish(),
            Err(_) => return scan.unreadable(),
        }
    }
}

/// Words of a statement kept for the rules below (`SET SESSION pgmux . route = DEFAULT`).
const HEAD: usize = 7;

/// Rules decided by a statement's first words.
fn statement(head: &[Option<Tok<'_>>; HEAD], n: usize, fx: &mut Effects) {
    if n == 0 {
        return;
    }
    let w = |i: usize, k: &str| word(&head[i], k);
    if w(0, "begin") || (w(0, "start") && w(1, "transaction")) || w(0, "copy") {
        fx.unbatchable = true;
    } else if w(0, "deallocate") {
        fx.unbatchable = true;
        fx.may_drop_statements = true;
        let all = if w(1, "prepare") { 2 } else { 1 };
        fx.drops_all_statements |= w(all, "all");
    } else if w(0, "set") {
        // SET LOCAL, SET TRANSACTION and SET CONSTRAINTS end with the transaction
        if !(w(1, "local") || w(1, "transaction") || w(1, "constraints")) {
            fx.settings = true;
            let at = if w(1, "session") { 2 } else { 1 };
            if w(at, "authorization") {
                // the session's user itself: DISCARD ALL (at the client's end) undoes it
                fx.pin.get_or_insert(PinReason::Settings);
            }
            fx.custom_settings |= custom_name(head, at).is_some();
            let assigns = matches!(head[at + 1], Some(Tok::Op("="))) || w(at + 1, "to");
            fx.resets |= assigns && w(at + 2, "default");
            if let Some((bit, next)) = pgmux_name(head, at) {
                let assigns = matches!(head[next], Some(Tok::Op("="))) || w(next, "to");
                if assigns && head.get(next + 1).is_some_and(|t| word(t, "default")) {
                    fx.pgmux_reset |= bit;
                }
            }
        }
    } else if w(0, "reset") {
        fx.settings = true;
        fx.resets = true;
        fx.custom_settings |= custom_name(head, 1).is_some();
        if w(1, "all") {
            fx.pgmux_reset = PGMUX_ROUTE | PGMUX_MIN_LSN;
        } else if let Some((bit, _)) = pgmux_name(head, 1) {
            fx.pgmux_reset |= bit;
        }
    } else if w(0, "discard") {
        fx.settings = true;
        if w(1, "all") {
            fx.pgmux_reset = PGMUX_ROUTE | PGMUX_MIN_LSN;
            fx.discard_all = true;
            fx.drops_all_statements = true;
            fx.may_drop_statements = true;
        }
    } else if w(0, "prepare") && !w(1, "transaction") {
        fx.pin.get_or_insert(PinReason::Prepare);
    } else if w(0, "listen") {
        fx.pin.get_or_insert(PinReason::Listen);
    } else if w(0, "create") && creates_temp(head) {
        fx.pin.get_or_insert(PinReason::TempObject);
    }
}

/// A custom setting named at `head[i]` (`myapp.tenant`, `"myapp.tenant"`), in lower case
/// unless quoted (as PostgreSQL reads it).
fn custom_name(head: &[Option<Tok<'_>>], i: usize) -> Option<String> {
    match (head.get(i)?, head.get(i + 1), head.get(i + 2)) {
        (
            Some(Tok::Word(a) | Tok::Quoted(a)),
            Some(Some(Tok::Dot)),
            Some(Some(Tok::Word(b) | Tok::Quoted(b))),
        ) => Some(format!(
            "{}.{}",
            a.to_ascii_lowercase(),
            b.to_ascii_lowercase()
        )),
        (Some(Tok::Quoted(q)), _, _) if q.contains('.') => Some(q.to_ascii_lowercase()),
        _ => None,
    }
}

/// The custom settings `sql` names (see [`Effects::custom_settings`]): by SET and RESET
/// (not SET LOCAL), and by set_config with a literal name.
pub fn custom_setting_names(sql: &str) -> Vec<String> {
    let mut names = Vec::new();
    collect_custom_names(sql, false, Backslash::Literal, &mut names);
    if sql.contains('\\') {
        // the other reading's too (`also_escaped`)
        collect_custom_names(sql, false, Backslash::Escape, &mut names);
    }
    names.sort();
    names.dedup();
    names
}

/// `custom_setting_names` of `sql`; `block`: a DO block's body (see `do_block_effects`).
fn collect_custom_names(sql: &str, block: bool, mode: Backslash, names: &mut Vec<String>) {
    let mut lexer = Lexer::new(sql, mode);
    let mut head: [Option<Tok<'_>>; HEAD] = [None; HEAD];
    let (mut n, mut prev, mut prev2) = (0, None, None);
    while let Ok(Some(tok)) = lexer.next() {
        if tok == Tok::Semi || (block && opens_statement(tok)) {
            names.extend(set_or_reset_custom(&head));
            (head, n) = ([None; HEAD], 0);
            continue;
        }
        if let (Tok::Str(name), Some(Tok::LParen), Some(Tok::Word(f) | Tok::Quoted(f))) =
            (tok, prev, prev2)
        {
            if f.eq_ignore_ascii_case("set_config") && name.contains('.') {
                names.push(name.to_ascii_lowercase());
            }
        }
        if let Tok::Str(body) = tok {
            if word(&head[0], "do") {
                collect_custom_names(body, true, mode, names);
            }
        }
        if n < HEAD {
            head[n] = Some(tok);
        }
        n += 1;
        (prev2, prev) = (prev, Some(tok));
    }
    names.extend(set_or_reset_custom(&head));
}

/// The custom setting a `SET [SESSION] name` or `RESET name` statement names.
fn set_or_reset_custom(head: &[Option<Tok<'_>>; HEAD]) -> Option<String> {
    let w = |i: usize, k: &str| word(&head[i], k);
    let at = if w(0, "set") && !w(1, "local") {
        if w(1, "session") {
            2
        } else {
            1
        }
    } else if w(0, "reset") {
        1
    } else {
        return None;
    };
    custom_name(&head[..], at)
}

/// A pgmux setting named at `head[i]` (`pgmux.route`, `"pgmux.min_lsn"`): its bit and the
/// index after the name.
fn pgmux_name(head: &[Option<Tok<'_>>; HEAD], i: usize) -> Option<(u8, usize)> {
    let (name, next) = match head.get(i)? {
        Some(Tok::Word(p)) if p.eq_ignore_ascii_case("pgmux") => {
            if head.get(i + 1)? != &Some(Tok::Dot) {
                return None;
            }
            match head.get(i + 2)? {
                Some(Tok::Word(n) | Tok::Quoted(n)) => (*n, i + 3),
                _ => return None,
            }
        }
        Some(Tok::Quoted(q)) if q.get(..6)?.eq_ignore_ascii_case("pgmux.") => (&q[6..], i + 1),
        _ => return None,
    };
    let bit = if name.eq_ignore_ascii_case("route") {
        PGMUX_ROUTE
    } else if name.eq_ignore_ascii_case("min_lsn") {
        PGMUX_MIN_LSN
    } else {
        return None;
    };
    Some((bit, next.min(HEAD - 1)))
}

/// CREATE [GLOBAL|LOCAL] TEMP|TEMPORARY ..., CREATE [OR REPLACE] TEMP VIEW ...
fn creates_temp(head: &[Option<Tok<'_>>; HEAD]) -> bool {
    let in_pg_temp = |w: &[Option<Tok<'_>>]| {
        matches!(w[0], Some(Tok::Word(s) | Tok::Quoted(s)) if s.eq_ignore_ascii_case("pg_temp"))
            && w[1] == Some(Tok::Dot)
    };
    head[1..]
        .iter()
        .any(|t| word(t, "temp") || word(t, "temporary"))
        || head[1..].windows(2).any(in_pg_temp)
}

/// A search_path value that names pg_temp (`pg_temp`, `"pg_temp"`, `'pg_temp, public'`).
fn names_pg_temp(tok: Tok<'_>) -> bool {
    let (Tok::Word(s) | Tok::Quoted(s) | Tok::Str(s)) = tok else {
        return false;
    };
    s.as_bytes()
        .windows(7)
        .any(|w| w.eq_ignore_ascii_case(b"pg_temp"))
}

/// pg_advisory_lock, pg_try_advisory_lock and their _shared forms; the _xact_ ones end
/// with the transaction and do not pin.
fn is_session_advisory_lock(w: &str) -> bool {
    let b = w.as_bytes();
    let starts = |p: &str| b.len() >= p.len() && b[..p.len()].eq_ignore_ascii_case(p.as_bytes());
    (starts("pg_advisory_lock") || starts("pg_try_advisory_lock"))
        && !b.windows(4).any(|x| x.eq_ignore_ascii_case(b"xact"))
}

fn word(t: &Option<Tok<'_>>, k: &str) -> bool {
    matches!(t, Some(Tok::Word(w)) if w.eq_ignore_ascii_case(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(sql: &str) -> Option<PinReason> {
        effects(sql).pin
    }

    #[test]
    fn settings_changes() {
        assert!(effects("SET search_path = a, b").settings);
        assert!(effects("set session statement_timeout = 5").settings);
        assert!(effects("RESET ALL").settings);
        assert!(effects("select set_config('a.b', '1', false)").settings);
        assert!(!effects("SET LOCAL statement_timeout = 5").settings);
        assert!(!effects("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").settings);
        assert!(!effects("SELECT 'SET x = 1'").settings);
        assert!(!effects("SELECT 1 -- SET x = 1").settings);
        assert!(effects("BEGIN; SET x.y = 1; COMMIT").settings);
    }

    #[test]
    fn pins() {
        assert_eq!(pin("LISTEN chan"), Some(PinReason::Listen));
        assert_eq!(pin("PREPARE p AS SELECT 1"), Some(PinReason::Prepare));
        assert_eq!(pin("PREPARE TRANSACTION 'x'"), None);
        assert_eq!(
            pin("CREATE TEMP TABLE t(a int)"),
            Some(PinReason::TempObject)
        );
        assert_eq!(
            pin("create global temporary table t(a int)"),
            Some(PinReason::TempObject)
        );
        assert_eq!(pin("CREATE TABLE t(a int)"), None);
        assert_eq!(
            pin("DECLARE c CURSOR WITH HOLD FOR SELECT 1"),
            Some(PinReason::HoldCursor)
        );
        assert_eq!(pin("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1"), None);
        assert_eq!(pin("DECLARE c CURSOR FOR SELECT 1"), None);
        assert_eq!(
            pin("SELECT pg_advisory_lock(1)"),
            Some(PinReason::AdvisoryLock)
        );
        assert_eq!(
            pin("SELECT pg_try_advisory_lock_shared(1)"),
            Some(PinReason::AdvisoryLock)
        );
        assert_eq!(pin("SELECT pg_advisory_xact_lock(1)"), None);
        assert_eq!(pin("SELECT $$ LISTEN x $$"), None);
        assert_eq!(pin("SELECT 'unterminated"), Some(PinReason::Unreadable));
    }

    #[test]
    fn pgmux_resets() {
        let r = |sql: &str| effects(sql).pgmux_reset;
        assert_eq!(r("RESET pgmux.route"), PGMUX_ROUTE);
        assert_eq!(r("reset \"pgmux.min_lsn\""), PGMUX_MIN_LSN);
        assert_eq!(r("SET pgmux.route TO DEFAULT"), PGMUX_ROUTE);
        assert_eq!(r("SET SESSION pgmux . min_lsn = default"), PGMUX_MIN_LSN);
        assert_eq!(r("RESET ALL"), PGMUX_ROUTE | PGMUX_MIN_LSN);
        assert_eq!(r("BEGIN; DISCARD ALL; COMMIT"), PGMUX_ROUTE | PGMUX_MIN_LSN);
        assert_eq!(r("SET pgmux.route = replica"), 0);
        assert_eq!(r("RESET pgmux.colour"), 0);
        assert_eq!(r("SET LOCAL pgmux.route TO DEFAULT"), 0);
        assert_eq!(r("SELECT 'RESET pgmux.route'"), 0);
        assert!(effects("SET pgmux.route = replica").settings);
    }

    #[test]
    fn deallocated_names_as_postgresql_reads_them() {
        assert_eq!(deallocated_name("DEALLOCATE s1").as_deref(), Some("s1"));
        assert_eq!(
            deallocated_name("deallocate PREPARE S1 ;").as_deref(),
            Some("s1")
        );
        assert_eq!(
            deallocated_name("/* c */ DEALLOCATE \"Pdo\"\"x\"").as_deref(),
            Some("Pdo\"x")
        );
        for not in [
            "DEALLOCATE ALL",
            "DEALLOCATE PREPARE ALL",
            "DEALLOCATE",
            "DEALLOCATE a; SELECT 1",
            "DEALLOCATE a b",
            "SELECT 'DEALLOCATE a'",
            "DEALLOCATE 'a",
        ] {
            assert_eq!(deallocated_name(not), None, "{not}");
        }
    }

    #[test]
    fn quoted_names_and_computed_setting_names() {
        let fx = effects("select \"set_config\"('work_mem', '9MB', false)");
        assert!(fx.settings && fx.pin.is_none());
        let sql = "select pg_catalog.\"set_config\"('myapp.x', 'v', false)";
        assert!(effects(sql).custom_settings);
        assert_eq!(custom_setting_names(sql), ["myapp.x"]);
        for sql in [
            "SET \"myapp\".\"qa\" = '1'",
            "SET \"myapp\".qa TO '1'",
            "RESET myapp.\"qa\"",
        ] {
            assert!(effects(sql).custom_settings, "{sql}");
            assert_eq!(custom_setting_names(sql), ["myapp.qa"], "{sql}");
        }
        assert_eq!(
            pin("SET \"search_path\" = pg_temp, public"),
            Some(PinReason::TempObject)
        );
        assert_eq!(
            pin("SET \"SEARCH_PATH\" TO 'pg_temp'"),
            Some(PinReason::TempObject)
        );
        for sql in [
            "select set_config('myapp.' || 'x', 'v', false)",
            "select set_config('myapp.' || $1, 'v', false)",
            "select \"set_config\"('myapp.x'::text, 'v', false)",
        ] {
            assert_eq!(pin(sql), Some(PinReason::Settings), "{sql}");
        }
        // a literal name, then its value: nothing to pin
        assert_eq!(pin("select set_config('myapp.x', 'a' || 'b', false)"), None);
    }

    #[test]
    fn a_line_comment_ends_at_a_carriage_return_and_backslashes_read_both_ways() {
        // PostgreSQL ends `--` comments at \r as at \n
        assert!(effects("SELECT 1; -- note\rSET work_mem = '4MB'").settings);
        assert!(effects("SELECT 1; -- note\rBEGIN").unbatchable);
        assert_eq!(pin("SELECT 1; -- x\rLISTEN c"), Some(PinReason::Listen));
        // with standard_conforming_strings = off the SET and LISTEN are outside the string
        let sql = r"SELECT 'a\''; SET work_mem = '1111kB'; SELECT 1; --'";
        assert!(effects(sql).settings, "{sql}");
        assert_eq!(pin(r"SELECT 'a\''; LISTEN c; --'"), Some(PinReason::Listen));
        assert!(effects(r"SELECT 'a\''; BEGIN; --'").unbatchable);
        let sql = r"SELECT 'a\''; SET myapp.x = '1'; --'";
        assert_eq!(custom_setting_names(sql), ["myapp.x"]);
        // a backslash that changes nothing changes nothing
        assert!(!effects(r"SELECT * FROM t WHERE x ~ '\d+'").any());
        // an identifier in Unicode escapes may name anything
        assert_eq!(
            pin(r#"SELECT U&"\0070g_advisory_lock"(1)"#),
            Some(PinReason::Unreadable)
        );
    }

    #[test]
    fn custom_settings_are_named_for_the_read_back() {
        for sql in [
            "SET myapp.tenant = '42'",
            "set session MyApp.Tenant to 42",
            "SET \"myapp.tenant\" = 1",
            "RESET myapp.tenant",
            "SELECT set_config('myapp.tenant', '42', false)",
            "select pg_catalog.set_config('MyApp.tenant', $1, false), 1",
        ] {
            assert!(effects(sql).custom_settings, "{sql}");
            assert_eq!(custom_setting_names(sql), ["myapp.tenant"], "{sql}");
        }
        assert_eq!(
            custom_setting_names(
                "SET a.x = 1; SET LOCAL b.y = 2; SELECT set_config('c.z', 'v', false)"
            ),
            ["a.x", "c.z"]
        );
        for sql in [
            "SET search_path = x",
            "SET LOCAL myapp.tenant = 1",
            "SELECT set_config('search_path', 'x', false)",
            "SELECT 'set myapp.x = 1'",
        ] {
            assert!(!effects(sql).custom_settings, "{sql}");
        }
        assert_eq!(
            pin("SELECT set_config($1, 'x', false)"),
            Some(PinReason::Settings)
        );
        assert_eq!(
            pin("SELECT set_config(name, v, false) FROM t"),
            Some(PinReason::Settings)
        );
        assert_eq!(
            pin("SET SESSION AUTHORIZATION bob"),
            Some(PinReason::Settings)
        );
        assert_eq!(pin("SELECT set_config('role', 'r1', false)"), None);
    }

    #[test]
    fn temp_objects_and_locks_written_other_ways_pin() {
        for sql in [
            "SELECT 1 AS x INTO TEMP tmp_si",
            "select * into temporary table t2 from t",
            "CREATE TABLE pg_temp.x (a int)",
            "create view \"pg_temp\".v as select 1",
            "DO $$ BEGIN CREATE TEMP TABLE d (a int); END $$",
        ] {
            assert_eq!(pin(sql), Some(PinReason::TempObject), "{sql}");
        }
        assert_eq!(
            pin("select \"pg_advisory_lock\"(14)"),
            Some(PinReason::AdvisoryLock)
        );
        assert_eq!(
            pin("DO $$ BEGIN PERFORM pg_advisory_lock(1); END $$"),
            Some(PinReason::AdvisoryLock)
        );
        let block = "DO $$ BEGIN SET myapp.x = 1; PERFORM set_config('b.y', '1', false); END $$";
        assert!(effects(block).custom_settings);
        assert_eq!(custom_setting_names(block), ["b.y", "myapp.x"]);
        for sql in [
            "INSERT INTO temp VALUES (1)",
            "SELECT a INTO x FROM t",
            "CREATE TABLE t (pg_temp int)",
            "DO $$ BEGIN INSERT INTO t VALUES (1); END $$",
            "SELECT 'DO $$ create temp table x $$'",
        ] {
            assert_eq!(pin(sql), None, "{sql}");
        }
    }

    #[test]
    fn temp_objects_made_through_search_path_pin() {
        for sql in [
            "SET search_path = pg_temp, public",
            "set session search_path to \"pg_temp\"",
            "SET LOCAL search_path = public, pg_temp",
            "SET search_path = 'pg_temp,public'; CREATE TABLE t (a int)",
            "SELECT set_config('search_path', 'pg_temp, public', false)",
            "SELECT 1 AS x INTO pg_temp.t",
            "select 1 into \"pg_temp\".t",
            "DO $$ BEGIN SET search_path = pg_temp; CREATE TABLE t (a int); END $$",
        ] {
            assert_eq!(pin(sql), Some(PinReason::TempObject), "{sql}");
        }
        for sql in [
            "SET search_path = public, app",
            "SELECT set_config('search_path', 'public', false), 'pg_temp'",
            "SET search_path = public; SELECT 'pg_temp'",
            "SELECT a INTO t FROM pg_temp_x",
            "SHOW search_path",
        ] {
            assert_eq!(pin(sql), None, "{sql}");
        }
    }

    #[test]
    fn dynamic_sql_in_a_do_block_pins_and_may_drop_statements() {
        let fx = effects("DO $$ BEGIN EXECUTE 'SELECT pg_advisory_lock(' || 1 || ')'; END $$");
        assert_eq!(fx.pin, Some(PinReason::DynamicSql));
        assert!(fx.may_drop_statements);
        let fx = effects("do language plpgsql $b$ begin execute format('x'); end $b$");
        assert_eq!(fx.pin, Some(PinReason::DynamicSql));
        assert_eq!(pin("EXECUTE p(1)"), None);
        assert_eq!(pin("DO $$ BEGIN PERFORM 'execute'; END $$"), None);
    }

    #[test]
    fn deallocations_may_drop_pgmuxs_statements() {
        for sql in ["DEALLOCATE ALL", "deallocate prepare all", "DISCARD ALL"] {
            let fx = effects(sql);
            assert!(fx.drops_all_statements && fx.may_drop_statements, "{sql}");
        }
        for sql in ["DEALLOCATE pgmux_3", "select 1; DEALLOCATE s1"] {
            let fx = effects(sql);
            assert!(!fx.drops_all_statements && fx.may_drop_statements, "{sql}");
        }
        for sql in [
            "SELECT 'DEALLOCATE ALL'",
            "DISCARD PLANS",
            "PREPARE p AS SELECT 1",
        ] {
            assert!(!effects(sql).may_drop_statements, "{sql}");
        }
    }

    #[test]
    fn resets_are_seen() {
        for sql in [
            "RESET ALL",
            "reset work_mem",
            "SET work_mem TO DEFAULT",
            "set session application_name = default",
        ] {
            assert!(effects(sql).resets, "{sql}");
        }
        for sql in [
            "SET work_mem = '4MB'",
            "SET LOCAL work_mem TO DEFAULT",
            "SELECT 'RESET ALL'",
        ] {
            assert!(!effects(sql).resets, "{sql}");
        }
    }

    #[test]
    fn discard_all() {
        let d = effects("DISCARD ALL");
        assert!(d.discard_all && d.settings);
        assert!(!effects("DISCARD PLANS").discard_all);
        assert!(effects("discard all;").discard_all, "one statement");
        // PostgreSQL refuses it among other statements: nothing is discarded or unpinned
        for sql in ["LISTEN a; DISCARD ALL", "DISCARD ALL; LISTEN a"] {
            let fx = effects(sql);
            assert_eq!(fx.pin, Some(PinReason::Listen), "{sql}");
            assert!(!fx.discard_all && !fx.drops_all_statements, "{sql}");
            assert!(fx.may_drop_statements, "{sql}");
        }
        assert!(!effects("select 1; discard all").discard_all);
    }
}
