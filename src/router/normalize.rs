//! Statement normalization for SHOW QUERIES: the same statement with different constants is
//! one statement. Runs the classifier's lexer (strings, comments and dollar quotes skipped as
//! PostgreSQL skips them) and turns its tokens into pieces:
//!
//! - numbers, string literals (`''`, `E''`, `U&''`, `$$ $$`) and parameters (`$1`) become
//!   placeholders, numbered `$1`, `$2`... in order of appearance, so `SELECT 5` (simple query)
//!   and `SELECT $1` (extended protocol) are one statement;
//! - `IN (` followed only by constants and commas becomes `IN ($1, ...)` whatever its length;
//! - comments, runs of whitespace and trailing semicolons go; words compare without case.
//!
//! [`fingerprint`] hashes the pieces without allocating: it runs once per statement executed.
//! [`normalize`] builds the text and is only called for a statement not seen before.

use super::classify::{Backslash, Lexer, Tok};

/// Longest normalized text kept, in bytes; longer text is cut at a char boundary, so memory
/// per statement is bounded whatever the client sends.
pub const MAX_TEXT: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece<'a> {
    /// An unquoted word: compared without case, shown as written.
    Word(&'a str),
    /// Anything else shown as written and compared exactly.
    Text(&'a str),
    /// A constant or parameter.
    Const,
    /// The constants of an `IN (...)` list.
    List,
}

/// Where the pieces go: the hasher or the text builder.
trait Out<'a> {
    /// `space`: whitespace or a comment preceded the piece in the source.
    fn piece(&mut self, space: bool, p: Piece<'a>);
}

/// The state of an `IN (` list being read: constants are held back until it is known whether
/// the list holds nothing else.
#[derive(Clone, Copy)]
enum List {
    None,
    AfterIn,
    Open {
        consts: u32,
        after_const: bool,
        space: bool,
    },
}

fn flush<'a>(list: List, out: &mut impl Out<'a>) {
    let List::Open {
        consts,
        after_const,
        space,
    } = list
    else {
        return;
    };
    out.piece(space, Piece::Text("("));
    for i in 0..consts {
        if i > 0 {
            out.piece(false, Piece::Text(","));
        }
        out.piece(i > 0, Piece::Const);
    }
    if consts > 0 && !after_const {
        out.piece(false, Piece::Text(","));
    }
}

fn is_const(t: &Tok<'_>) -> bool {
    matches!(t, Tok::Num | Tok::Str(_) | Tok::Param)
}

/// Offset of `part` (a slice of `whole`) in `whole`.
fn offset(whole: &str, part: &str) -> usize {
    part.as_ptr() as usize - whole.as_ptr() as usize
}

fn walk<'a>(sql: &'a str, out: &mut impl Out<'a>) {
    let mut lx = Lexer::new(sql, Backslash::Literal);
    let mut w = Walk::default();
    loop {
        let before = lx.pos();
        match lx.next() {
            Ok(Some(tok)) => w.token(sql, before, lx.pos(), tok, out),
            Ok(None) => return w.finish(out),
            Err(_) => return w.unterminated(sql, before, out),
        }
    }
}

/// The walk's state between tokens, so that one lexer pass can also serve the session-state
/// scan (`router::fingerprint_and_effects`).
pub(super) struct Walk {
    list: List,
    /// semicolons held back: trailing ones do not make a different statement
    semis: u32,
}

impl Default for Walk {
    fn default() -> Self {
        Walk {
            list: List::None,
            semis: 0,
        }
    }
}

impl Walk {
    /// `tok` spans `sql[before..end]` (with the whitespace and comments before it).
    #[inline(always)]
    fn token<'a>(
        &mut self,
        sql: &'a str,
        before: usize,
        end: usize,
        tok: Tok<'a>,
        out: &mut impl Out<'a>,
    ) {
        let rest = &sql.as_bytes()[before..];
        let space = rest.first().is_some_and(u8::is_ascii_whitespace)
            || rest.starts_with(b"--")
            || rest.starts_with(b"/*");
        if tok == Tok::Semi {
            self.semis += 1;
            return;
        }
        if let List::Open {
            consts,
            after_const,
            space: open_space,
        } = self.list
        {
            if !after_const && is_const(&tok) {
                self.list = List::Open {
                    consts: consts + 1,
                    after_const: true,
                    space: open_space,
                };
                return;
            }
            if after_const && tok == Tok::Comma {
                self.list = List::Open {
                    consts,
                    after_const: false,
                    space: open_space,
                };
                return;
            }
            if after_const && tok == Tok::RParen {
                out.piece(open_space, Piece::Text("("));
                out.piece(false, Piece::List);
                out.piece(false, Piece::Text(")"));
                self.list = List::None;
                return;
            }
            flush(self.list, out);
            self.list = List::None;
        }
        let mut space = space;
        if self.semis > 0 {
            for _ in 0..std::mem::take(&mut self.semis) {
                out.piece(false, Piece::Text(";"));
            }
            // statements after the first read as separate ones however they were written
            space = true;
        }
        let piece = match tok {
            Tok::Word(w) => {
                self.list = if w.eq_ignore_ascii_case("in") {
                    List::AfterIn
                } else {
                    List::None
                };
                out.piece(space, Piece::Word(w));
                return;
            }
            Tok::LParen if matches!(self.list, List::AfterIn) => {
                self.list = List::Open {
                    consts: 0,
                    after_const: false,
                    space,
                };
                return;
            }
            Tok::Quoted(q) => Piece::Text(&sql[offset(sql, q) - 1..end]),
            Tok::Str(_) | Tok::Num | Tok::Param => Piece::Const,
            Tok::LParen => Piece::Text("("),
            Tok::RParen => Piece::Text(")"),
            Tok::Semi => Piece::Text(";"),
            Tok::Dot => Piece::Text("."),
            Tok::Comma => Piece::Text(","),
            Tok::Op(o) => Piece::Text(o),
            // one ASCII byte (see the lexer)
            Tok::Other => Piece::Text(&sql[end - 1..end]),
        };
        self.list = List::None;
        out.piece(space, piece);
    }

    fn finish<'a>(self, out: &mut impl Out<'a>) {
        flush(self.list, out);
    }

    /// An unterminated string or comment at `before`: the rest counts as written.
    fn unterminated<'a>(self, sql: &'a str, before: usize, out: &mut impl Out<'a>) {
        flush(self.list, out);
        out.piece(true, Piece::Text(sql[before..].trim()));
    }
}

/// `u8::to_ascii_lowercase` as one load: every byte of every word of every statement goes
/// through it.
const LOWER: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = (i as u8).to_ascii_lowercase();
        i += 1;
    }
    t
};

/// FNV-1a over the pieces, each closed by 0xFF (a byte UTF-8 text never contains).
struct Hasher {
    h: u64,
    pieces: u32,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher {
            h: 0xcbf2_9ce4_8422_2325,
            pieces: 0,
        }
    }
}

impl Hasher {
    /// 0 for text without any statement; never 0 otherwise.
    fn value(&self) -> u64 {
        match (self.pieces, self.h) {
            (0, _) => 0,
            (_, 0) => 1,
            (_, v) => v,
        }
    }

    fn byte(&mut self, b: u8) {
        self.h ^= b as u64;
        self.h = self.h.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

impl<'a> Out<'a> for Hasher {
    fn piece(&mut self, _space: bool, p: Piece<'a>) {
        self.pieces += 1;
        match p {
            Piece::Word(w) => w.bytes().for_each(|b| self.byte(LOWER[b as usize])),
            Piece::Text(t) => t.bytes().for_each(|b| self.byte(b)),
            Piece::Const => self.byte(b'$'),
            Piece::List => self.byte(b'L'),
        }
        self.byte(0xFF);
    }
}

/// A 64-bit hash of the statement's normalized form; 0 for text without any statement
/// (empty, only comments or semicolons), which is not recorded.
pub fn fingerprint(sql: &str) -> u64 {
    let mut h = Hasher::default();
    walk(sql, &mut h);
    h.value()
}

/// [`fingerprint`] and [`super::effects::effects`] of a query in one lexer pass: in
/// transaction mode every simple Query needs both.
pub fn fingerprint_and_effects(sql: &str) -> (u64, super::effects::Effects) {
    let mut lx = Lexer::new(sql, Backslash::Literal);
    let (mut walk, mut h, mut scan) = (
        Walk::default(),
        Hasher::default(),
        super::effects::Scan::default(),
    );
    loop {
        let before = lx.pos();
        match lx.next() {
            Ok(Some(tok)) => {
                walk.token(sql, before, lx.pos(), tok, &mut h);
                scan.token(tok);
            }
            Ok(None) => {
                walk.finish(&mut h);
                let fx = super::effects::also_escaped(sql, lx.saw_backslash(), scan.finish());
                return (h.value(), fx);
            }
            Err(_) => {
                walk.unterminated(sql, before, &mut h);
                return (h.value(), scan.unreadable());
            }
        }
    }
}

struct Text {
    s: String,
    consts: u32,
}

impl<'a> Out<'a> for Text {
    fn piece(&mut self, space: bool, p: Piece<'a>) {
        if self.s.len() > MAX_TEXT {
            return;
        }
        if space && !self.s.is_empty() {
            self.s.push(' ');
        }
        match p {
            Piece::Word(t) | Piece::Text(t) => self.s.push_str(t),
            Piece::Const | Piece::List => {
                self.consts += 1;
                self.s.push('$');
                self.s.push_str(&self.consts.to_string());
                if p == Piece::List {
                    self.s.push_str(", ...");
                }
            }
        }
    }
}

/// The statement's normalized text, at most [`MAX_TEXT`] bytes.
pub fn normalize(sql: &str) -> String {
    let mut t = Text {
        s: String::with_capacity(sql.len().min(MAX_TEXT) + 8),
        consts: 0,
    };
    walk(sql, &mut t);
    if t.s.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !t.s.is_char_boundary(cut) {
            cut -= 1;
        }
        t.s.truncate(cut);
    }
    t.s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: &str, b: &str) {
        assert_eq!(fingerprint(a), fingerprint(b), "{a:?} vs {b:?}");
    }

    fn differ(a: &str, b: &str) {
        assert_ne!(fingerprint(a), fingerprint(b), "{a:?} vs {b:?}");
    }

    #[test]
    fn constants_become_numbered_placeholders() {
        let q = "SELECT * FROM t WHERE id = 5 AND name = 'bob'";
        assert_eq!(normalize(q), "SELECT * FROM t WHERE id = $1 AND name = $2");
        same(q, "select *  from t\n where id = 42 and name = E'al\\'ice'");
        same(q, "SELECT * FROM t WHERE id = $1 AND name = $$x$$");
        same("SELECT 1", "SELECT $1");
        assert_eq!(normalize("SELECT $2, $1"), "SELECT $1, $2");
        assert_eq!(normalize("SELECT '2020-01-01'::date"), "SELECT $1::date");
        assert_eq!(normalize("SELECT -1.5e3"), "SELECT -$1");
    }

    #[test]
    fn structure_still_tells_statements_apart() {
        differ("SELECT a FROM t", "SELECT b FROM t");
        differ("SELECT \"A\" FROM t", "SELECT \"a\" FROM t");
        differ("SELECT 1, 2", "SELECT 1");
        differ("SELECT f(1)", "SELECT f(1, 2)");
        assert_eq!(
            normalize("SELECT \"My Col\" FROM s.t"),
            "SELECT \"My Col\" FROM s.t"
        );
    }

    #[test]
    fn in_lists_of_constants_collapse() {
        let q = "SELECT * FROM t WHERE id IN (1, 2, 3)";
        assert_eq!(normalize(q), "SELECT * FROM t WHERE id IN ($1, ...)");
        same(q, "SELECT * FROM t WHERE id in (7)");
        same(q, "SELECT * FROM t WHERE id IN ($1,$2)");
        // not a list of constants: kept as written
        assert_eq!(
            normalize("SELECT 1 WHERE x IN (SELECT 2)"),
            "SELECT $1 WHERE x IN (SELECT $2)"
        );
        assert_eq!(
            normalize("SELECT 1 WHERE x IN (1, a)"),
            "SELECT $1 WHERE x IN ($2, a)"
        );
        assert_eq!(
            normalize("SELECT 1 WHERE x IN ()"),
            "SELECT $1 WHERE x IN ()"
        );
        differ(q, "SELECT * FROM t WHERE id IN (1, a)");
    }

    #[test]
    fn comments_whitespace_and_trailing_semicolons_go() {
        let q = "SELECT 1 -- one\n /* two */ ;";
        assert_eq!(normalize(q), "SELECT $1");
        same(q, "SELECT 1");
        assert_eq!(
            normalize("BEGIN; SELECT 1;COMMIT;"),
            "BEGIN; SELECT $1; COMMIT"
        );
        differ("BEGIN; SELECT 1", "BEGIN SELECT 1");
    }

    #[test]
    fn no_statement_has_no_fingerprint() {
        assert_eq!(fingerprint(""), 0);
        assert_eq!(fingerprint(" ;; -- nothing"), 0);
        assert_ne!(fingerprint("SELECT"), 0);
    }

    #[test]
    fn unterminated_text_and_long_text() {
        assert_eq!(normalize("SELECT 'oops"), "SELECT 'oops");
        differ("SELECT 'a", "SELECT 'b");
        let long = format!("SELECT {}", "éa, ".repeat(2000));
        let n = normalize(&long);
        assert!(n.len() <= MAX_TEXT && n.starts_with("SELECT éa, éa"));
    }
}
