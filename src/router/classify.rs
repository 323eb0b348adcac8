//! The statement classifier: decides from a query's text whether a replica may run it.
//!
//! A hand-written lexer (comments, nested comments, string literals, `E''` strings, quoted
//! identifiers and dollar-quoted bodies are skipped exactly as PostgreSQL's lexer skips them)
//! feeds one pass over the tokens that looks at each statement's leading words and a handful of
//! write markers anywhere in it. No SQL grammar, no allocation: it runs on every statement a
//! client sends. When in doubt the answer is [`Class::Write`], which sends the statement to the
//! primary: a wrong "write" costs some replica capacity, a wrong "read" costs an error.
//!
//! The rules, in full, are in docs/routing.md.

use super::lsn::Lsn;

/// What a query string needs from the server that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Only reads: any up-to-date replica may run it.
    Read,
    /// Writes, may write, or could not be understood: the primary.
    Write,
    /// `BEGIN` / `START TRANSACTION` that may write: the whole transaction on the primary.
    Begin,
    /// `BEGIN READ ONLY` / `START TRANSACTION READ ONLY`: the whole transaction may run on one
    /// replica (PostgreSQL itself refuses any write inside it).
    BeginReadOnly,
    /// `COMMIT`, `ROLLBACK`, `SAVEPOINT`, `RELEASE`...: belongs on the server of the transaction
    /// in progress; outside a transaction PostgreSQL only warns, so any server will do.
    Transaction,
    /// Changes session state that outlives the statement (`SET`, `RESET`, `DISCARD`, `PREPARE`,
    /// `LISTEN`...): the primary, where the session's writes go too.
    Session,
    /// pgmux's own command (`SET pgmux.route`, `SET pgmux.min_lsn`): pgmux answers it and no
    /// server ever sees it.
    Pgmux(Command),
}

/// A `SET`/`RESET` of one of pgmux's own settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `SET pgmux.route = primary|replica|auto`.
    Route(Route),
    /// `SET pgmux.min_lsn = '0/16B3748'`.
    MinLsn(Option<Lsn>),
    /// `RESET pgmux.route` or `SET pgmux.route = DEFAULT`: back to the connection's startup
    /// value (`options=-c pgmux.route=...`), as PostgreSQL's RESET goes back to it.
    ResetRoute,
    /// `RESET pgmux.min_lsn` or `= DEFAULT`: back to the startup value.
    ResetMinLsn,
    /// A pgmux setting used wrongly; the text is the error message for the client.
    Invalid(&'static str),
}

/// Where a connection's statements go, as set by `pgmux.route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Primary,
    Replica,
    /// By classification (the default).
    Auto,
}

/// A routing hint from a comment in the statement: `/* pgmux:primary */`, `/* pgmux:replica */`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Primary,
    Replica,
}

/// The classifier's answer: the class and the hint, if the text carried one. The hint is
/// reported, not applied: what it may override is the router's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    pub class: Class,
    pub hint: Option<Hint>,
}

/// Functions that write, or hold state on the server that ran them, whatever statement calls
/// them. Matched by name without schema, in any case.
const WRITE_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    // Session state of sequences: only defined where nextval ran.
    "currval",
    "lastval",
    "txid_current",
    "txid_current_if_assigned",
    "set_config",
    "pg_notify",
    "loread",
    "lowrite",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_cancel_backend",
    "pg_terminate_backend",
    "pg_logical_emit_message",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_replication_slot_advance",
    "pg_import_system_collations",
    "pg_reload_conf",
    // index maintenance that writes; a standby refuses it (55000)
    "brin_summarize_new_values",
    "brin_summarize_range",
    "brin_desummarize_range",
    "gin_clean_pending_list",
    // on a replica it would promote that replica; the primary refuses it harmlessly
    "pg_promote",
];

fn starts_with_ignore_case(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// Prefixes of function families that write or take session-level locks.
const WRITE_FUNCTION_PREFIXES: &[&str] = &[
    "pg_advisory_",
    "pg_try_advisory_",
    "pg_current_xact_id",
    "pg_current_wal_",
    "lo_",
    // consuming a slot's changes, replication origins: catalog writes
    "pg_logical_slot_",
    "pg_replication_origin_",
    // dblink_exec and friends run arbitrary SQL somewhere else, possibly a write.
    "dblink",
];

/// First letters (both cases) of the built-in names: most function calls in reads (`count`,
/// `now`, `coalesce`...) are told apart from all of them by one lookup.
const BUILTIN_FIRST_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < WRITE_FUNCTIONS.len() + WRITE_FUNCTION_PREFIXES.len() {
        let name = if i < WRITE_FUNCTIONS.len() {
            WRITE_FUNCTIONS[i]
        } else {
            WRITE_FUNCTION_PREFIXES[i - WRITE_FUNCTIONS.len()]
        };
        let b = name.as_bytes()[0];
        table[b.to_ascii_lowercase() as usize] = true;
        table[b.to_ascii_uppercase() as usize] = true;
        i += 1;
    }
    table
};

/// Classifies one query string (one or more statements, as a simple Query or a Parse carries
/// it). `write_functions` are the database's extra functions that write: a name, optionally
/// schema-qualified and quoted; calls match on the last name part in any case.
///
/// Several statements: the most demanding one decides (any write makes the string a write).
/// Unterminated comments, strings or identifiers and unbalanced parentheses give `Write`.
pub fn classify(sql: &str, write_functions: &[String]) -> Classified {
    let standard = analyze(sql, write_functions, Backslash::Literal);
    if !standard.saw_backslash {
        return standard.classified();
    }
    // A backslash in a plain '' string escapes the next character when the session runs with
    // standard_conforming_strings = off, and then the string ends elsewhere. We do not know the
    // session's setting, so read the text both ways and keep the more demanding answer.
    let escaped = analyze(sql, write_functions, Backslash::Escape);
    if escaped.unterminated {
        // Read that way the text does not even lex, so such a session gets a syntax error
        // wherever it is sent: only the standard reading can run.
        return standard.classified();
    }
    let class = if standard.class == escaped.class {
        standard.class
    } else if matches!(standard.class, Class::Pgmux(_)) || matches!(escaped.class, Class::Pgmux(_))
    {
        // two readings of a pgmux command disagree: not something to answer locally
        Class::Write
    } else if rank(standard.class) >= rank(escaped.class) {
        standard.class
    } else {
        escaped.class
    };
    let hint = merge_hints(standard.hint, escaped.hint);
    Classified { class, hint }
}

/// How demanding a class is, for combining statements. Among other statements a pgmux
/// command is session state the server runs (PostgreSQL takes `pgmux.*` as a placeholder
/// setting) and pgmux reads back.
fn rank(c: Class) -> u8 {
    match c {
        // below a read: a COMMIT or ROLLBACK from a client in no transaction reads
        // nothing, so a unit of nothing else may skip the read-your-writes floor
        Class::Transaction => 0,
        Class::Read => 1,
        Class::BeginReadOnly => 2,
        Class::Session | Class::Pgmux(_) => 3,
        Class::Begin => 4,
        Class::Write => 5,
    }
}

/// The hint of two readings of one text: the primary if either reading asks for it (the
/// safe side), a replica only if both do (a hint one reading finds inside a string is text
/// to the other, and a write sent to a replica fails).
fn merge_hints(a: Option<Hint>, b: Option<Hint>) -> Option<Hint> {
    match (a, b) {
        (Some(Hint::Primary), _) | (_, Some(Hint::Primary)) => Some(Hint::Primary),
        (Some(h), Some(g)) if h == g => Some(h),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Backslash {
    /// standard_conforming_strings = on (PostgreSQL's default): backslash is an ordinary
    /// character in '' strings.
    Literal,
    /// standard_conforming_strings = off: backslash escapes in '' strings.
    Escape,
}

struct Analysis {
    class: Class,
    hint: Option<Hint>,
    saw_backslash: bool,
    unterminated: bool,
}

impl Analysis {
    fn classified(&self) -> Classified {
        Classified {
            class: self.class,
            hint: self.hint,
        }
    }
}

fn analyze(sql: &str, write_functions: &[String], mode: Backslash) -> Analysis {
    let mut lx = Lexer::new(sql, mode);
    let mut stmt = Stmt::new(write_functions);
    let mut combined: Option<Class> = None;
    let mut statements = 0usize;
    let mut has_pgmux = false;
    let mut invalid = None;
    let mut failed = false;
    loop {
        let tok = match lx.next() {
            Ok(t) => t,
            Err(Unterminated) => {
                failed = true;
                break;
            }
        };
        let end = match tok {
            None => true,
            Some(Tok::Semi) if stmt.depth == 0 => true,
            Some(t) => {
                stmt.feed(t);
                false
            }
        };
        if end {
            if let Some(c) = stmt.finish() {
                statements += 1;
                has_pgmux |= matches!(c, Class::Pgmux(_));
                if let Class::Pgmux(Command::Invalid(m)) = c {
                    invalid.get_or_insert(m);
                }
                combined = Some(match combined {
                    None => c,
                    Some(prev) => combine(prev, c),
                });
            }
            if tok.is_none() {
                break;
            }
            stmt = Stmt::new(write_functions);
        }
    }
    let class = if failed {
        Class::Write
    } else if has_pgmux && statements > 1 {
        match (invalid, combined) {
            // refused before any of the string runs, as PostgreSQL refuses a bad value
            (Some(m), _) => Class::Pgmux(Command::Invalid(m)),
            (None, Some(Class::Pgmux(_))) => Class::Session,
            (None, c) => c.unwrap_or(Class::Session),
        }
    } else {
        // No statement at all (empty, only comments or semicolons): PostgreSQL answers
        // EmptyQueryResponse, which any server can.
        combined.unwrap_or(Class::Read)
    };
    Analysis {
        class,
        hint: lx.hint(),
        saw_backslash: lx.saw_backslash,
        unterminated: failed,
    }
}

fn combine(a: Class, b: Class) -> Class {
    if rank(a) >= rank(b) {
        a
    } else {
        b
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tok<'a> {
    /// An unquoted identifier or keyword, as written.
    Word(&'a str),
    /// A "quoted identifier": the text between the quotes.
    Quoted(&'a str),
    /// A string literal ('', E'', U&'', $$ $$): the text between the delimiters, unprocessed.
    Str(&'a str),
    Num,
    /// `$1`
    Param,
    LParen,
    RParen,
    Semi,
    Dot,
    Comma,
    Op(&'a str),
    Other,
}

#[derive(Debug)]
pub(super) struct Unterminated;

pub(super) struct Lexer<'a> {
    src: &'a str,
    pos: usize,
    mode: Backslash,
    saw_backslash: bool,
    hint_primary: bool,
    hint_replica: bool,
}

/// Byte classes, one table lookup per byte in the lexer's inner loops (the lexer runs over
/// every statement a client sends in transaction mode, for session state and SHOW QUERIES).
const SPACE: u8 = 1;
const IDENT_START: u8 = 2;
const IDENT_CHAR: u8 = 4;
const OP: u8 = 8;

const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let start = b.is_ascii_alphabetic() || b == b'_' || b >= 0x80;
        let mut c = 0;
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c) {
            c |= SPACE;
        }
        if start {
            c |= IDENT_START | IDENT_CHAR;
        }
        if b.is_ascii_digit() || b == b'$' {
            c |= IDENT_CHAR;
        }
        if matches!(
            b,
            b'+' | b'-'
                | b'*'
                | b'/'
                | b'<'
                | b'>'
                | b'='
                | b'~'
                | b'!'
                | b'@'
                | b'#'
                | b'%'
                | b'^'
                | b'&'
                | b'|'
                | b'`'
                | b'?'
        ) {
            c |= OP;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn is_space(b: u8) -> bool {
    CLASS[b as usize] & SPACE != 0
}

fn is_ident_start(b: u8) -> bool {
    CLASS[b as usize] & IDENT_START != 0
}

pub(super) fn is_ident_char(b: u8) -> bool {
    CLASS[b as usize] & IDENT_CHAR != 0
}

fn is_op_char(b: u8) -> bool {
    CLASS[b as usize] & OP != 0
}

impl<'a> Lexer<'a> {
    pub(super) fn new(src: &'a str, mode: Backslash) -> Lexer<'a> {
        Lexer {
            src,
            pos: 0,
            mode,
            saw_backslash: false,
            hint_primary: false,
            hint_replica: false,
        }
    }

    /// A backslash was seen in a plain '' string: the text reads otherwise under
    /// standard_conforming_strings = off.
    pub(super) fn saw_backslash(&self) -> bool {
        self.saw_backslash
    }

    /// Byte offset just past the last token returned (`router::normalize` needs spans).
    pub(super) fn pos(&self) -> usize {
        self.pos
    }

    fn hint(&self) -> Option<Hint> {
        if self.hint_primary {
            Some(Hint::Primary)
        } else if self.hint_replica {
            Some(Hint::Replica)
        } else {
            None
        }
    }

    fn bytes(&self) -> &'a [u8] {
        self.src.as_bytes()
    }

    fn peek(&self, at: usize) -> u8 {
        self.bytes().get(at).copied().unwrap_or(0)
    }

    // Inlined so tokens stay in registers: returned through memory, each one cost a
    // store-forwarding stall (measured with perf on benches/classify.rs).
    #[inline(always)]
    pub(super) fn next(&mut self) -> Result<Option<Tok<'a>>, Unterminated> {
        let b = self.bytes();
        loop {
            while self.pos < b.len() && is_space(b[self.pos]) {
                self.pos += 1;
            }
            if self.pos >= b.len() {
                return Ok(None);
            }
            let c = b[self.pos];
            let c1 = self.peek(self.pos + 1);
            match c {
                b'-' if c1 == b'-' => {
                    self.pos = b[self.pos..]
                        .iter()
                        // PostgreSQL ends a line comment at either newline byte
                        .position(|&x| x == b'\n' || x == b'\r')
                        .map_or(b.len(), |p| self.pos + p + 1);
                }
                b'/' if c1 == b'*' => self.block_comment()?,
                _ => return self.token(c, c1).map(Some),
            }
        }
    }

    #[inline(always)]
    fn token(&mut self, c: u8, c1: u8) -> Result<Tok<'a>, Unterminated> {
        let start = self.pos;
        let b = self.bytes();
        let single = |lx: &mut Self, t| {
            lx.pos += 1;
            Ok(t)
        };
        match c {
            b'(' => single(self, Tok::LParen),
            b')' => single(self, Tok::RParen),
            b';' => single(self, Tok::Semi),
            b',' => single(self, Tok::Comma),
            b'.' if c1.is_ascii_digit() => Ok(self.number()),
            b'.' => single(self, Tok::Dot),
            b'\'' => self.string(start + 1, self.mode == Backslash::Escape, true),
            b'"' => self.quoted(),
            b'$' if c1.is_ascii_digit() => {
                self.pos += 1;
                while self.pos < b.len() && b[self.pos].is_ascii_digit() {
                    self.pos += 1;
                }
                Ok(Tok::Param)
            }
            b'$' => self.dollar(),
            _ if c.is_ascii_digit() => Ok(self.number()),
            _ if is_ident_start(c) => {
                while self.pos < b.len() && is_ident_char(b[self.pos]) {
                    self.pos += 1;
                }
                let word = &self.src[start..self.pos];
                let next = self.peek(self.pos);
                if next == b'\'' && word.eq_ignore_ascii_case("e") {
                    // E'...': backslash escapes whatever standard_conforming_strings says.
                    return self.string(self.pos + 1, true, false);
                }
                if next == b'&'
                    && self.peek(self.pos + 1) == b'\''
                    && word.eq_ignore_ascii_case("u")
                {
                    // U&'...': backslash starts a Unicode escape, never escapes the quote.
                    return self.string(self.pos + 2, false, false);
                }
                if next == b'&' && self.peek(self.pos + 1) == b'"' && word.eq_ignore_ascii_case("u")
                {
                    // U&"...": an identifier in Unicode escapes (U&"\006Eextval" is nextval),
                    // which pgmux does not decode: read as text it cannot read, so the
                    // statement goes to the primary and pins its client
                    return Err(Unterminated);
                }
                Ok(Tok::Word(word))
            }
            _ if is_op_char(c) => {
                while self.pos < b.len() && is_op_char(b[self.pos]) {
                    // As in PostgreSQL, a comment start ends an operator.
                    let n = self.peek(self.pos + 1);
                    if self.pos > start
                        && ((b[self.pos] == b'-' && n == b'-')
                            || (b[self.pos] == b'/' && n == b'*'))
                    {
                        break;
                    }
                    self.pos += 1;
                }
                Ok(Tok::Op(&self.src[start..self.pos]))
            }
            // Only ASCII reaches here (every byte >= 0x80 starts an identifier), so one byte
            // keeps `pos` on a char boundary.
            _ => single(self, Tok::Other),
        }
    }

    fn number(&mut self) -> Tok<'a> {
        let b = self.bytes();
        while self.pos < b.len() && (b[self.pos].is_ascii_alphanumeric() || b[self.pos] == b'_')
            || (self.pos < b.len() && b[self.pos] == b'.' && self.peek(self.pos + 1) != b'.')
        {
            self.pos += 1;
        }
        Tok::Num
    }

    /// A '' string whose body starts at `body`. `escapes`: backslash escapes the next byte.
    /// `plain`: an ordinary '' string, whose meaning depends on standard_conforming_strings.
    fn string(&mut self, body: usize, escapes: bool, plain: bool) -> Result<Tok<'a>, Unterminated> {
        let b = self.bytes();
        let mut i = body;
        while i < b.len() {
            match b[i] {
                b'\\' if escapes => i += 2,
                b'\\' => {
                    if plain {
                        self.saw_backslash = true;
                    }
                    i += 1;
                }
                b'\'' if self.peek(i + 1) == b'\'' => i += 2,
                b'\'' => {
                    self.pos = i + 1;
                    return Ok(Tok::Str(&self.src[body..i]));
                }
                _ => i += 1,
            }
        }
        Err(Unterminated)
    }

    fn quoted(&mut self) -> Result<Tok<'a>, Unterminated> {
        let b = self.bytes();
        let body = self.pos + 1;
        let mut i = body;
        while i < b.len() {
            if b[i] == b'"' {
                if self.peek(i + 1) == b'"' {
                    i += 2;
                    continue;
                }
                self.pos = i + 1;
                return Ok(Tok::Quoted(&self.src[body..i]));
            }
            i += 1;
        }
        Err(Unterminated)
    }

    /// `$tag$ ... $tag$` (tag may be empty), or a lone `$`.
    fn dollar(&mut self) -> Result<Tok<'a>, Unterminated> {
        let b = self.bytes();
        let start = self.pos;
        let mut i = start + 1;
        // A tag is an identifier without '$'; it cannot start with a digit (that is `$1`).
        if i < b.len() && is_ident_start(b[i]) {
            while i < b.len() && is_ident_char(b[i]) && b[i] != b'$' {
                i += 1;
            }
        }
        if self.peek(i) != b'$' {
            self.pos = start + 1;
            return Ok(Tok::Other);
        }
        let delim = &self.src[start..=i];
        let body = i + 1;
        match self.src[body..].find(delim) {
            Some(p) => {
                self.pos = body + p + delim.len();
                Ok(Tok::Str(&self.src[body..body + p]))
            }
            None => Err(Unterminated),
        }
    }

    /// `/* ... */`, nested as PostgreSQL nests them; notes a routing hint inside.
    fn block_comment(&mut self) -> Result<(), Unterminated> {
        let b = self.bytes();
        let body = self.pos + 2;
        let mut i = body;
        let mut depth = 1u32;
        while i < b.len() {
            if b[i] == b'/' && self.peek(i + 1) == b'*' {
                depth += 1;
                i += 2;
            } else if b[i] == b'*' && self.peek(i + 1) == b'/' {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    self.pos = i;
                    self.note_hints(&b[body..i - 2]);
                    return Ok(());
                }
            } else {
                i += 1;
            }
        }
        Err(Unterminated)
    }

    fn note_hints(&mut self, text: &[u8]) {
        const TAG: &[u8] = b"pgmux:";
        let mut i = 0;
        while i + TAG.len() <= text.len() {
            if text[i..i + TAG.len()].eq_ignore_ascii_case(TAG)
                && (i == 0 || !is_ident_char(text[i - 1]))
            {
                let rest = &text[i + TAG.len()..];
                let word_len = rest.iter().take_while(|&&c| is_ident_char(c)).count();
                let word = &rest[..word_len];
                if word.eq_ignore_ascii_case(b"primary") {
                    self.hint_primary = true;
                } else if word.eq_ignore_ascii_case(b"replica") {
                    self.hint_replica = true;
                }
                i += TAG.len() + word_len;
            } else {
                i += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statements

/// Keywords the statement pass reacts to wherever they appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kw {
    Insert,
    Update,
    Delete,
    Merge,
    Into,
    For,
    Key,
    Share,
    Read,
    Only,
    Write,
    Serializable,
    Snapshot,
    From,
    To,
    Other,
}

fn keyword(w: &str) -> Kw {
    let is = |k: &str| w.eq_ignore_ascii_case(k);
    // Length first: most words are no keyword, and this rejects them in one comparison.
    match w.len() {
        2 if is("to") => Kw::To,
        3 if is("for") => Kw::For,
        3 if is("key") => Kw::Key,
        4 if is("into") => Kw::Into,
        4 if is("read") => Kw::Read,
        4 if is("only") => Kw::Only,
        4 if is("from") => Kw::From,
        5 if is("merge") => Kw::Merge,
        5 if is("share") => Kw::Share,
        5 if is("write") => Kw::Write,
        6 if is("insert") => Kw::Insert,
        6 if is("update") => Kw::Update,
        6 if is("delete") => Kw::Delete,
        8 if is("snapshot") => Kw::Snapshot,
        12 if is("serializable") => Kw::Serializable,
        _ => Kw::Other,
    }
}

/// Leading tokens kept per statement: enough for every form decided by its head
/// (`SET SESSION pgmux.route = 'replica'` is 7).
const HEAD: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing seen yet.
    Start,
    /// After EXPLAIN (and ANALYZE, VERBOSE): options or the explained statement come next.
    ExplainOpts,
    /// Just after a '(' following EXPLAIN: an option list, or a parenthesised SELECT.
    ExplainParen,
    /// Inside EXPLAIN's option list, until depth falls back to the given one.
    ExplainList(i32),
    /// The statement proper (the explained one, after an EXPLAIN prefix).
    Body,
}

struct Stmt<'a, 'w> {
    write_functions: &'w [String],
    phase: Phase,
    explain: bool,
    head: [Tok<'a>; HEAD],
    /// Tokens of the statement proper, which may exceed HEAD.
    len: usize,
    depth: i32,
    unbalanced: bool,
    last: Tok<'a>,
    /// Keywords of the last two tokens, newest first (`Kw::Other` for any other token).
    hist: [Kw; 2],
    /// Whether the statement needs the per-token markers below (see `push`).
    scan: bool,
    /// A DML keyword, a row-locking clause, INTO, or a write function: this cannot be a read.
    writes: bool,
    /// A call of a function that releases session state (`pg_advisory_unlock_all()`): the
    /// primary, where the session's locks are, but no write.
    releases: bool,
    read_only: bool,
    read_write: bool,
    serializable: bool,
    snapshot: bool,
    /// The first FROM or TO outside parentheses (COPY's direction).
    copy_dir: Option<Kw>,
}

impl<'a, 'w> Stmt<'a, 'w> {
    fn new(write_functions: &'w [String]) -> Self {
        Stmt {
            write_functions,
            phase: Phase::Start,
            explain: false,
            head: [Tok::Other; HEAD],
            len: 0,
            depth: 0,
            unbalanced: false,
            last: Tok::Other,
            hist: [Kw::Other; 2],
            scan: true,
            writes: false,
            releases: false,
            read_only: false,
            read_write: false,
            serializable: false,
            snapshot: false,
            copy_dir: None,
        }
    }

    #[inline(always)]
    fn push(&mut self, t: Tok<'a>) {
        if self.len == 0 {
            // Only these statements are decided by more than their leading words; for the rest
            // (INSERT, DDL...) the per-token work can stop here.
            self.scan = matches!(t, Tok::LParen)
                || [
                    "select", "with", "values", "table", "copy", "begin", "start", "set",
                ]
                .iter()
                .any(|k| word_is(t, k));
        }
        if self.len < HEAD {
            self.head[self.len] = t;
        }
        self.len += 1;
    }

    #[inline(always)]
    fn feed(&mut self, t: Tok<'a>) {
        match t {
            Tok::LParen => self.depth += 1,
            Tok::RParen => {
                self.depth -= 1;
                if self.depth < 0 {
                    self.unbalanced = true;
                }
            }
            _ => {}
        }
        self.head_phase(t);
        if !self.scan {
            return;
        }

        let kw = match t {
            Tok::Word(w) => keyword(w),
            _ => Kw::Other,
        };
        match kw {
            Kw::Insert | Kw::Update | Kw::Delete | Kw::Merge | Kw::Into => self.writes = true,
            // FOR SHARE, FOR KEY SHARE (FOR [NO KEY] UPDATE are caught by UPDATE).
            Kw::Share if self.hist[0] == Kw::For || self.hist == [Kw::Key, Kw::For] => {
                self.writes = true
            }
            Kw::Only if self.hist[0] == Kw::Read => self.read_only = true,
            Kw::Write if self.hist[0] == Kw::Read => self.read_write = true,
            Kw::Serializable => self.serializable = true,
            Kw::Snapshot => self.snapshot = true,
            Kw::From | Kw::To if self.depth == 0 && self.copy_dir.is_none() => {
                self.copy_dir = Some(kw)
            }
            _ => {}
        }
        if matches!(t, Tok::LParen) {
            if let Tok::Word(name) | Tok::Quoted(name) = self.last {
                if starts_with_ignore_case(name, "pg_advisory_unlock") {
                    self.releases = true;
                } else if self.is_write_function(name) {
                    self.writes = true;
                }
            }
        }
        self.hist = [kw, self.hist[0]];
        self.last = t;
    }

    #[inline(always)]
    fn head_phase(&mut self, t: Tok<'a>) {
        match self.phase {
            Phase::Start => {
                if word_is(t, "explain") {
                    self.explain = true;
                    self.phase = Phase::ExplainOpts;
                } else {
                    self.phase = Phase::Body;
                    self.push(t);
                }
            }
            Phase::ExplainOpts => {
                if word_is(t, "analyze") || word_is(t, "analyse") || word_is(t, "verbose") {
                } else if t == Tok::LParen {
                    self.phase = Phase::ExplainParen;
                } else {
                    self.phase = Phase::Body;
                    self.push(t);
                }
            }
            Phase::ExplainParen => {
                let select = t == Tok::LParen
                    || ["select", "with", "values", "table"]
                        .iter()
                        .any(|k| word_is(t, k));
                if select {
                    self.phase = Phase::Body;
                    self.push(Tok::LParen);
                    self.push(t);
                } else if self.depth == 0 {
                    // `EXPLAIN ()`: nothing inside; let the server say so.
                    self.phase = Phase::ExplainOpts;
                } else {
                    self.phase = Phase::ExplainList(self.depth - 1);
                }
            }
            Phase::ExplainList(outer) => {
                if self.depth == outer {
                    self.phase = Phase::ExplainOpts;
                }
            }
            Phase::Body => self.push(t),
        }
    }

    fn is_write_function(&self, name: &str) -> bool {
        let lower_eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        let has_prefix = |p: &str| starts_with_ignore_case(name, p);
        let builtin = name
            .as_bytes()
            .first()
            .is_some_and(|&b| BUILTIN_FIRST_BYTES[b as usize])
            && (WRITE_FUNCTIONS.iter().any(|f| lower_eq(f, name))
                || WRITE_FUNCTION_PREFIXES.iter().any(|p| has_prefix(p)));
        builtin
            || self
                .write_functions
                .iter()
                .any(|f| lower_eq(configured_name(f), name))
    }

    /// The statement's class; `None` for an empty statement.
    fn finish(&self) -> Option<Class> {
        if self.unbalanced || self.depth != 0 {
            return Some(Class::Write);
        }
        if self.len == 0 {
            // EXPLAIN with nothing to explain is an error; let the primary report it.
            return self.explain.then_some(Class::Write);
        }
        let class = self.decide();
        if self.explain {
            // EXPLAIN runs (with ANALYZE) or plans what it explains: a read only if that is.
            return Some(if class == Class::Read {
                Class::Read
            } else {
                Class::Write
            });
        }
        Some(class)
    }

    fn decide(&self) -> Class {
        let h = &self.head;
        let first = h[0];
        let w = |k: &str| word_is(first, k);
        let read_unless_writes = if self.writes {
            Class::Write
        } else if self.releases {
            Class::Session
        } else {
            Class::Read
        };
        if first == Tok::LParen || w("select") || w("with") || w("values") || w("table") {
            return read_unless_writes;
        }
        if w("show") {
            // EXPLAIN SHOW is a syntax error; let the primary report it.
            return if self.explain {
                Class::Write
            } else {
                Class::Read
            };
        }
        if w("copy") {
            return match self.copy_dir {
                Some(Kw::To) => read_unless_writes,
                _ => Class::Write,
            };
        }
        if w("begin") {
            return self.begin_class();
        }
        if w("start") {
            return if word_is(h[1], "transaction") {
                self.begin_class()
            } else {
                Class::Write
            };
        }
        if w("commit") || w("end") || w("rollback") || w("abort") {
            // COMMIT PREPARED / ROLLBACK PREPARED finish a two-phase transaction: primary work.
            return if word_is(h[1], "prepared") {
                Class::Write
            } else {
                Class::Transaction
            };
        }
        if w("savepoint") || w("release") {
            return Class::Transaction;
        }
        if w("prepare") {
            // PREPARE TRANSACTION is two-phase commit; PREPARE name AS ... is session state.
            return if word_is(h[1], "transaction") {
                Class::Write
            } else {
                Class::Session
            };
        }
        if w("set") {
            return self.set_class();
        }
        if w("reset") {
            return match pgmux_setting(h, 1) {
                Some((name, _)) => Class::Pgmux(reset_command(name)),
                None => Class::Session,
            };
        }
        // CLOSE from a client between transactions closes nothing but WITH HOLD cursors,
        // which are session state (CLOSE ALL: what pools send at every hand-back)
        if w("discard") || w("deallocate") || w("listen") || w("unlisten") || w("close") {
            return Class::Session;
        }
        // INSERT, UPDATE, DELETE, MERGE, DDL, CALL, DO, VACUUM, ANALYZE, LOCK, NOTIFY, EXECUTE,
        // cursors, anything new or unknown.
        Class::Write
    }

    fn begin_class(&self) -> Class {
        // A hot standby refuses SERIALIZABLE; READ WRITE cannot run there either.
        if self.read_only && !self.read_write && !self.serializable {
            Class::BeginReadOnly
        } else {
            Class::Begin
        }
    }

    fn set_class(&self) -> Class {
        let h = &self.head;
        let mut i = 1;
        if word_is(h[1], "local") {
            return match pgmux_setting(h, 2) {
                // PostgreSQL's own: it lasts for the transaction, whose server is already
                // chosen, so it routes nothing; outside a transaction the server warns
                Some(_) => Class::Session,
                // Lasts until the end of the transaction at most: nothing to route for.
                None => Class::Read,
            };
        }
        if word_is(h[1], "transaction") {
            // Only affects the transaction in progress (outside one it does nothing). A standby
            // refuses SERIALIZABLE, READ WRITE and imported snapshots from elsewhere.
            return if self.serializable || self.read_write || self.snapshot {
                Class::Write
            } else {
                Class::Read
            };
        }
        if word_is(h[1], "session") {
            i = 2;
        }
        let Some((name, next)) = pgmux_setting(h, i) else {
            return Class::Session;
        };
        let assigns = matches!(h[next], Tok::Op("=")) || word_is(h[next], "to");
        if !assigns || self.len != next + 2 {
            return Class::Pgmux(Command::Invalid("expected SET pgmux.<setting> = <value>"));
        }
        Class::Pgmux(set_command(name, h[next + 1]))
    }
}

/// The name a configured write function is called by: the part after the last '.', without
/// quotes.
fn configured_name(f: &str) -> &str {
    let last = match f.as_bytes().iter().rposition(|&b| b == b'.') {
        Some(dot) => &f[dot + 1..],
        None => f,
    };
    last.trim_matches('"')
}

fn word_is(t: Tok<'_>, k: &str) -> bool {
    matches!(t, Tok::Word(w) if w.eq_ignore_ascii_case(k))
}

/// A pgmux setting named at `head[i]`: `pgmux.name` or `"pgmux.name"`. Returns the part after
/// `pgmux.` and the index after the name.
fn pgmux_setting<'a>(head: &[Tok<'a>; HEAD], i: usize) -> Option<(&'a str, usize)> {
    match head.get(i)? {
        Tok::Word(w) if w.eq_ignore_ascii_case("pgmux") => {
            if head.get(i + 1) != Some(&Tok::Dot) {
                return None;
            }
            match head.get(i + 2)? {
                Tok::Word(n) | Tok::Quoted(n) => Some((n, i + 3)),
                _ => None,
            }
        }
        Tok::Quoted(q) => {
            let prefix = q.get(..6)?;
            prefix
                .eq_ignore_ascii_case("pgmux.")
                .then(|| (&q[6..], i + 1))
        }
        _ => None,
    }
}

fn reset_command(name: &str) -> Command {
    if name.eq_ignore_ascii_case("route") {
        Command::ResetRoute
    } else if name.eq_ignore_ascii_case("min_lsn") {
        Command::ResetMinLsn
    } else {
        Command::Invalid("unknown pgmux setting; pgmux has route and min_lsn")
    }
}

fn set_command(name: &str, value: Tok<'_>) -> Command {
    let text = match value {
        Tok::Word(v) | Tok::Str(v) | Tok::Quoted(v) => Some(v),
        _ => None,
    };
    let is_default = matches!(value, Tok::Word(v) if v.eq_ignore_ascii_case("default"));
    if name.eq_ignore_ascii_case("route") {
        if is_default {
            return Command::ResetRoute;
        }
        let route = match text {
            Some(v) if v.eq_ignore_ascii_case("primary") => Some(Route::Primary),
            Some(v) if v.eq_ignore_ascii_case("replica") => Some(Route::Replica),
            Some(v) if v.eq_ignore_ascii_case("auto") => Some(Route::Auto),
            _ => None,
        };
        return route.map_or(
            Command::Invalid("pgmux.route must be primary, replica or auto"),
            Command::Route,
        );
    }
    if name.eq_ignore_ascii_case("min_lsn") {
        if is_default {
            return Command::ResetMinLsn;
        }
        return match value {
            Tok::Str(v) => match v.parse::<Lsn>() {
                Ok(lsn) => Command::MinLsn(Some(lsn)),
                Err(_) => Command::Invalid("pgmux.min_lsn must be an LSN such as '0/16B3748'"),
            },
            _ => Command::Invalid("pgmux.min_lsn must be a quoted LSN such as '0/16B3748'"),
        };
    }
    Command::Invalid("unknown pgmux setting; pgmux has route and min_lsn")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-class table says what PostgreSQL's scanner says of each byte.
    #[test]
    fn byte_classes_match_the_scanner_rules() {
        for b in 0..=255u8 {
            let start = b.is_ascii_alphabetic() || b == b'_' || b >= 0x80;
            assert_eq!(is_ident_start(b), start, "{b:#x}");
            assert_eq!(
                is_ident_char(b),
                start || b.is_ascii_digit() || b == b'$',
                "{b:#x}"
            );
            assert_eq!(is_op_char(b), b"+-*/<>=~!@#%^&|`?".contains(&b), "{b:#x}");
            assert_eq!(is_space(b), b" \t\n\r\x0c".contains(&b), "{b:#x}");
        }
    }

    fn toks(sql: &str) -> Vec<Tok<'_>> {
        let mut lx = Lexer::new(sql, Backslash::Literal);
        let mut v = Vec::new();
        while let Some(t) = lx.next().expect("lexes") {
            v.push(t);
        }
        v
    }

    fn class(sql: &str) -> Class {
        classify(sql, &[]).class
    }

    #[test]
    fn lexer_skips_comments_and_nested_comments() {
        assert_eq!(
            toks("a /* x /* nested */ still comment */ b -- line\n c"),
            vec![Tok::Word("a"), Tok::Word("b"), Tok::Word("c")]
        );
        assert_eq!(toks("a--b"), vec![Tok::Word("a")]);
        assert_eq!(
            toks("1 +-- comment\n2"),
            vec![Tok::Num, Tok::Op("+"), Tok::Num]
        );
        assert_eq!(
            toks("a */* c */ b"),
            vec![Tok::Word("a"), Tok::Op("*"), Tok::Word("b")]
        );
    }

    #[test]
    fn lexer_strings() {
        assert_eq!(toks("'it''s'"), vec![Tok::Str("it''s")]);
        assert_eq!(toks("E'a\\'b' c"), vec![Tok::Str("a\\'b"), Tok::Word("c")]);
        assert_eq!(toks("e'\\\\' c"), vec![Tok::Str("\\\\"), Tok::Word("c")]);
        assert_eq!(
            toks("U&'d\\0061t' x"),
            vec![Tok::Str("d\\0061t"), Tok::Word("x")]
        );
        // A word ending in e is no E-string prefix.
        assert_eq!(toks("type'x'"), vec![Tok::Word("type"), Tok::Str("x")]);
        assert_eq!(
            toks("B'101' X'ff'"),
            vec![
                Tok::Word("B"),
                Tok::Str("101"),
                Tok::Word("X"),
                Tok::Str("ff")
            ]
        );
    }

    #[test]
    fn lexer_quoted_identifiers() {
        assert_eq!(
            toks(r#""a ""b"" ; c".d"#),
            vec![Tok::Quoted(r#"a ""b"" ; c"#), Tok::Dot, Tok::Word("d")]
        );
    }

    #[test]
    fn lexer_dollar_quotes_and_params() {
        assert_eq!(
            toks("$$ ' \" $$ x"),
            vec![Tok::Str(" ' \" "), Tok::Word("x")]
        );
        assert_eq!(
            toks("$fn$ a $$ b $fn$ c"),
            vec![Tok::Str(" a $$ b "), Tok::Word("c")]
        );
        assert_eq!(toks("$1 $23"), vec![Tok::Param, Tok::Param]);
        // '$' inside an identifier is part of it, not a quote.
        assert_eq!(toks("a$b$ c"), vec![Tok::Word("a$b$"), Tok::Word("c")]);
        // A tag cannot start with a digit; `$1$` is a parameter and a lone '$'.
        assert_eq!(toks("$1$"), vec![Tok::Param, Tok::Other]);
    }

    #[test]
    fn lexer_reports_unterminated_input() {
        for sql in [
            "'abc",
            "\"abc",
            "/* abc",
            "/* /* */",
            "$$ abc",
            "$t$ abc $$",
            "E'\\'",
        ] {
            let mut lx = Lexer::new(sql, Backslash::Literal);
            let mut r = Ok(None);
            for _ in 0..10 {
                r = lx.next();
                if !matches!(r, Ok(Some(_))) {
                    break;
                }
            }
            assert!(r.is_err(), "{sql:?} was not reported unterminated");
            assert_eq!(class(sql), Class::Write, "{sql:?}");
        }
    }

    #[test]
    fn lexer_numbers_and_operators() {
        assert_eq!(
            toks("1.5e3 .5 1..2 a::int"),
            vec![
                Tok::Num,
                Tok::Num,
                Tok::Num,
                Tok::Dot,
                Tok::Num,
                Tok::Word("a"),
                Tok::Other,
                Tok::Other,
                Tok::Word("int")
            ]
        );
        assert_eq!(
            toks("a<>b"),
            vec![Tok::Word("a"), Tok::Op("<>"), Tok::Word("b")]
        );
    }

    #[test]
    fn lexer_keeps_multibyte_text_whole() {
        assert_eq!(
            toks("séléct 'ü' \"ß\" 名前"),
            vec![
                Tok::Word("séléct"),
                Tok::Str("ü"),
                Tok::Quoted("ß"),
                Tok::Word("名前")
            ]
        );
    }

    #[test]
    fn hints_in_comments() {
        let c = classify("/* pgmux:replica */ SELECT 1", &[]);
        assert_eq!(c.hint, Some(Hint::Replica));
        let c = classify("SELECT 1 /* app=x, PGMUX:Primary */", &[]);
        assert_eq!(c.hint, Some(Hint::Primary));
        // Both: the primary wins.
        let c = classify("/* pgmux:replica */ SELECT /* pgmux:primary */ 1", &[]);
        assert_eq!(c.hint, Some(Hint::Primary));
        // Not in strings, not as part of a longer word, not in a line comment.
        for sql in [
            "SELECT '/* pgmux:replica */'",
            "SELECT 1 /* xpgmux:replica */",
            "SELECT 1 /* pgmux:replicas */",
            "SELECT 1 -- pgmux:replica",
        ] {
            assert_eq!(classify(sql, &[]).hint, None, "{sql}");
        }
        // A hint inside a string when backslashes are literal (PostgreSQL's default) and
        // outside it when they escape: a replica hint only counts if both readings have it,
        // a primary hint if either does.
        let c = classify(
            r"INSERT INTO t SELECT 'a\' || ' /* pgmux:replica */ ' -- '",
            &[],
        );
        assert_eq!((c.class, c.hint), (Class::Write, None));
        let c = classify(r"SELECT 'a\' || ' /* pgmux:primary */ ' -- '", &[]);
        assert_eq!(c.hint, Some(Hint::Primary));
        let c = classify(r"/* pgmux:replica */ SELECT 'a\' || 'b'", &[]);
        assert_eq!(c.hint, Some(Hint::Replica));
    }

    #[test]
    fn unicode_escaped_identifiers_are_not_read() {
        assert_eq!(class(r#"SELECT U&"\006Eextval"('s')"#), Class::Write);
        assert_eq!(class(r#"SELECT u&"x" FROM t"#), Class::Write);
        // a U& string is read as a string
        assert_eq!(class(r"SELECT U&'d\0061t'"), Class::Read);
    }

    #[test]
    fn backslash_strings_are_read_both_ways() {
        // Either way a read: stays a read.
        assert_eq!(class(r"SELECT * FROM t WHERE x ~ '\d+'"), Class::Read);
        // With standard_conforming_strings = off the DELETE is outside any string.
        assert_eq!(class(r"SELECT 'a\', ' ; DELETE FROM t; --'"), Class::Write);
    }

    #[test]
    fn configured_names_lose_schema_and_quotes() {
        assert_eq!(configured_name("audit"), "audit");
        assert_eq!(configured_name("public.audit"), "audit");
        assert_eq!(configured_name("\"Sch\".\"Audit\""), "Audit");
    }

    #[test]
    fn explain_forms() {
        assert_eq!(class("EXPLAIN SELECT 1"), Class::Read);
        assert_eq!(class("EXPLAIN (SELECT 1)"), Class::Read);
        assert_eq!(class("EXPLAIN ((SELECT 1))"), Class::Read);
        assert_eq!(
            class("EXPLAIN (ANALYZE, FORMAT JSON, SETTINGS (x)) SELECT 1"),
            Class::Read
        );
        assert_eq!(class("EXPLAIN ANALYZE VERBOSE DELETE FROM t"), Class::Write);
        assert_eq!(class("EXPLAIN"), Class::Write);
        assert_eq!(class("EXPLAIN SHOW x"), Class::Write);
    }
}
