//! Transaction-mode rewriting of the extended protocol so named prepared statements survive
//! moving between servers. A client's Parse is renamed to pgmux's shared name (or dropped
//! and answered by pgmux when the server already has the statement); Bind and Describe are
//! renamed, with a Parse sent first where the server lacks the statement; Close of a
//! statement is answered by pgmux (other clients may share it). The client's unnamed
//! statement is followed too: a Bind or Describe of it on a server that has not seen the
//! client's Parse of it gets that Parse first (or a Close, when the client has none), so it
//! never runs another client's unnamed statement. To put pgmux's answers, and
//! remove the server's answers to pgmux's own messages, at the right place in the response
//! stream, every request that gets an answer is queued here and matched against what the
//! server sends back.

use super::channel::Channel;
use crate::params::Params;
use crate::prepared::{self, ClientStatements, Held, Registry, ServerStatements, StmtDef};
use crate::router::effects::Effects;
use crate::stats::{BINDS, CLIENT_PARSES, SERVER_PARSES};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::Arc;

const PARSE_COMPLETE: &[u8] = &[b'1', 0, 0, 0, 4];
const CLOSE_COMPLETE: &[u8] = &[b'3', 0, 0, 0, 4];
/// Close of the unnamed statement: PostgreSQL answers CloseComplete whether or not it has one.
const CLOSE_UNNAMED: &[u8] = &[b'C', 0, 0, 0, 6, b'S', 0];
const READY_IDLE: &[u8] = &[b'Z', 0, 0, 0, 5, b'I'];
const READY_IN_TRANSACTION: &[u8] = &[b'Z', 0, 0, 0, 5, b'T'];
const DEALLOCATE_COMPLETE: &[u8] = b"C\0\0\0\x0fDEALLOCATE\0";

/// An answer the server owes, oldest first.
#[derive(Debug, Clone)]
enum Expect {
    /// ParseComplete. `def` is the statement the Parse prepares (None: unnamed or malformed);
    /// `ours`: pgmux sent it, so its answer is not the client's.
    Parse {
        def: Option<Arc<StmtDef>>,
        ours: bool,
        /// The client's name for it (its own Parse): a Parse the server refuses or skips
        /// defines no name, as on PostgreSQL.
        name: Option<Box<[u8]>>,
    },
    /// ParseComplete that pgmux answers (the server already has the statement) for the
    /// client's `name`, unless an error before it makes the server skip to Sync.
    ParseAnswered {
        name: Box<[u8]>,
        def: Arc<StmtDef>,
    },
    /// ParseComplete of the probe sent for the client's `name` inside a failed transaction
    /// ([`prepared::probe_messages`]): the server's verdict is the client's.
    ParseProbe {
        name: Box<[u8]>,
        def: Arc<StmtDef>,
    },
    /// `stmt`: pgmux's id of the named statement bound (0: unnamed or unknown to pgmux).
    Bind {
        stmt: u64,
    },
    Describe,
    Execute,
    Close {
        ours: bool,
    },
    /// Sync (or a unit sent before the tracker was made): answered by ReadyForQuery.
    Ready,
    /// Query or FunctionCall: answered by ReadyForQuery, unless an error in an
    /// extended-protocol message before it makes the server skip it on its way to the Sync.
    QueryReady,
    /// CloseComplete that pgmux answers for the client's Close of `name` (`def` before it)
    /// once everything before it is answered, unless an error before it makes the server
    /// skip to Sync: then the name stays.
    Closed {
        name: Box<[u8]>,
        def: Option<Arc<StmtDef>>,
    },
    /// A Parse of a name the client already uses, sent on so that the server refuses it
    /// (and skips to Sync as PostgreSQL would); its error is replaced by `error`, which names
    /// the client's statement rather than pgmux's.
    Duplicate {
        error: Bytes,
    },
}

/// A client statement name and what it meant before it changed.
type NameChange = (Box<[u8]>, Option<Arc<StmtDef>>);

/// Where a client message is sent: the server's state and the client's settings.
#[derive(Clone, Copy)]
pub struct Where<'a> {
    /// The server's last ReadyForQuery said its transaction failed.
    pub aborted: bool,
    /// The client's settings as its transaction began (its `search_path` keys statements,
    /// `prepared::Registry`).
    pub wants: &'a Params,
}

pub struct Tracker {
    expect: VecDeque<Expect>,
    pub stmts: ClientStatements,
    registry: &'static Registry,
    max_prepared: usize,
    /// Statements used since this server clock tick belong to the batch being sent.
    batch_tick: u64,
    /// While a replica read may be replayed (`relay::retry`): each change to the client's
    /// names since it was armed, with what the name meant before, so a replay finds the
    /// names as they were and does not take its own Parse for a duplicate.
    journal: Option<Vec<NameChange>>,
    /// Custom settings named by the statements just passed (`note_custom_settings`).
    pub custom_settings: Vec<String>,
    /// Named Parses and Binds since the relay last took them, for SHOW STATS
    /// (`stats::CLIENT_PARSES`...).
    pub counts: [u32; 3],
    /// The attached server's unnamed statement is the client's (`stmts.unnamed()`, none if
    /// None). PostgreSQL keeps a session's unnamed statement until its next unnamed Parse
    /// or simple Query, and drivers use it across a Sync (pgx without a statement cache
    /// parses and describes in one unit, then binds in the next); in transaction mode the
    /// server may meanwhile serve other clients, whose unnamed statements replace it there.
    unnamed_here: bool,
    /// What the unnamed statement of `unnamed_here` does to the session, from its Parse: a
    /// Bind of it notes the same again without lexing its text each time.
    unnamed_fx: Effects,
    /// The server failed a request and skips what the client sends until its next Sync,
    /// which had not arrived: those messages get no answer (`failed`).
    skipping: bool,
    /// Queries and FunctionCalls the server skipped after an error, for the relay to take
    /// off what it is owed (`take_skipped`).
    skipped: u32,
}

/// The message types the tracker must read whole on the client side.
pub fn inspects_client(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'D' | b'C')
}

/// The client message types that need a tracker (`Relay::tracker`, made at the first):
/// those that define, use or drop statements, and an Execute, whose answer it counts.
/// Queries, Syncs and FunctionCalls before the first are counted when it is made.
pub fn needs_tracker(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'D' | b'C' | b'E')
}

/// A simple Query that may drop pgmux's statements on the server
/// (`Effects::may_drop_statements`), as it is sent: one that drops them all (`DEALLOCATE
/// ALL`, `DISCARD ALL`) empties the server and the client's names now, so the requests
/// behind it in the same write see it done, as on PostgreSQL. Should the server refuse it,
/// or drop only some, the server is `unsure` and deallocates everything before its next
/// client. A DISCARD ALL sent in a transaction block (`in_block`) is refused: the client's
/// names stay.
pub fn query_drops(
    tracker: Option<&mut Tracker>,
    fx: Effects,
    in_block: bool,
    server: &mut ServerStatements,
) {
    server.unsure = true;
    if fx.drops_all_statements && !(fx.discard_all && in_block) {
        server.clear();
        if let Some(t) = tracker {
            t.forget_all_names();
        }
    }
}

/// A CommandComplete while statements are tracked: DEALLOCATE ALL or DISCARD ALL run by an
/// Execute (a simple Query's was followed when it was sent, `query_drops`) emptied the
/// server (whose statements other clients prepared too) and the client's names. Read from
/// the command tag, so a refused command changes nothing.
pub fn command_complete(tracker: Option<&mut Tracker>, tag: &[u8], server: &mut ServerStatements) {
    if tag == b"DEALLOCATE ALL\0" || tag == b"DISCARD ALL\0" {
        if let Some(t) = tracker.filter(|t| matches!(t.expect.front(), Some(Expect::Execute))) {
            server.clear();
            t.forget_all_names();
        }
    }
}

/// The message types the tracker must read whole on the server side.
pub fn inspects_server(tag: u8) -> bool {
    matches!(tag, b'1' | b'3' | b'E')
}

crate::spares_of!(Expect);

impl Drop for Tracker {
    fn drop(&mut self) {
        crate::spares::give(std::mem::take(&mut self.expect));
    }
}

impl Tracker {
    pub fn new(registry: &'static Registry, max_prepared: usize) -> Tracker {
        Tracker {
            expect: crate::spares::take(),
            stmts: ClientStatements::default(),
            registry,
            max_prepared,
            batch_tick: 0,
            journal: None,
            custom_settings: Vec::new(),
            counts: [0; 3],
            unnamed_here: false,
            unnamed_fx: Effects::default(),
            skipping: false,
            skipped: 0,
        }
    }

    /// The client's unnamed statement is gone, on the attached server as on PostgreSQL
    /// (`here`), or only for the client (the server still has it).
    fn drop_unnamed(&mut self, here: bool) {
        self.stmts.drop_unnamed();
        self.unnamed_here = here;
        self.unnamed_fx = Effects::default();
    }

    /// Gives the memory of its (empty) queue of answers back while its client idles.
    pub fn shed(&mut self) {
        crate::spares::give(std::mem::take(&mut self.expect));
    }

    /// Its client is back: a queue of answers from the spares, as a new tracker's (an empty
    /// one would be grown by the first request).
    pub fn unshed(&mut self) {
        if self.expect.capacity() == 0 {
            self.expect = crate::spares::take();
        }
    }

    /// Nothing owed: safe to hand the server back.
    pub fn is_settled(&self) -> bool {
        self.expect.is_empty() && !self.skipping
    }

    /// The server failed an extended-protocol message and skips what the client sends
    /// until a Sync that has not come yet: it must not go back to the pool before that.
    pub fn is_skipping(&self) -> bool {
        self.skipping
    }

    /// Queries and FunctionCalls found skipped since the last call, whose ReadyForQuery
    /// will never come.
    pub fn take_skipped(&mut self) -> u32 {
        std::mem::take(&mut self.skipped)
    }

    /// A new server: anything owed by the last one is gone with it.
    pub fn attach(&mut self, server: &ServerStatements) {
        self.expect.clear();
        self.unnamed_here = false;
        self.skipping = false;
        self.skipped = 0;
        self.batch_tick = server.now();
    }

    /// The unit about to be sent may be replayed: record name changes from here on.
    pub fn begin_journal(&mut self) {
        match &mut self.journal {
            Some(j) => j.clear(),
            None => self.journal = Some(Vec::new()),
        }
    }

    /// The unit will not be replayed: name changes are final.
    #[inline]
    pub fn end_journal(&mut self) {
        if self.journal.is_some() {
            self.journal = None;
        }
    }

    /// The unit is replayed: the client's names go back to what they were when it was armed.
    pub fn roll_back(&mut self) {
        for (name, before) in self.journal.take().into_iter().flatten().rev() {
            match before {
                Some(def) => self.stmts.insert(&name, def),
                None => self.stmts.remove(&name),
            };
        }
    }

    fn name_changed(&mut self, name: &[u8], before: Option<Arc<StmtDef>>) {
        if let Some(j) = &mut self.journal {
            j.push((name.into(), before));
        }
    }

    /// Custom settings a statement names, for the relay to read back (`Effects::custom_settings`).
    fn note_custom_settings(&mut self, def: &StmtDef) {
        if def.effects.custom_settings {
            let text = prepared::query_text(&def.body);
            self.custom_settings
                .extend(crate::router::effects::custom_setting_names(text));
        }
    }

    /// A client message the tracker does not read whole.
    pub fn client_passed(&mut self, tag: u8, server: &ServerStatements) {
        if self.skipping && tag != b'S' {
            // PostgreSQL ignores every message until the Sync
            return;
        }
        match tag {
            b'E' => self.expect.push_back(Expect::Execute),
            b'Q' => {
                // a simple Query drops the unnamed statement, on PostgreSQL as here
                self.drop_unnamed(true);
                self.expect.push_back(Expect::QueryReady);
            }
            b'F' => self.expect.push_back(Expect::QueryReady),
            b'S' => {
                self.expect.push_back(Expect::Ready);
                self.batch_tick = server.now();
                self.skipping = false;
            }
            _ => {}
        }
    }

    /// A whole Parse, Bind, Describe or Close at `c2s.buf[start..c2s.scanned]`, or the head
    /// of a large Bind there (its names; the rest streams after).
    pub fn client_message(
        &mut self,
        tag: u8,
        start: usize,
        c2s: &mut Channel,
        s2c: &mut Channel,
        server: &mut ServerStatements,
        at: Where,
    ) -> Effects {
        let end = c2s.scanned;
        let body = &c2s.buf[start + 5..end];
        let fx = match tag {
            // the unnamed statement's Parse goes as it is: its body needs no copy
            b'P' => match prepared::split_parse(body) {
                Some((name, _)) if !name.is_empty() => {
                    self.on_parse(body.to_vec(), start, end, c2s, server, at)
                }
                Some((_, rest)) => {
                    self.stmts.set_unnamed(&c2s.buf[start..end]);
                    self.unnamed_here = true;
                    self.on_unnamed_parse(prepared::query_text(rest))
                }
                None => self.on_unnamed_parse(""),
            },
            b'B' => self.on_bind(start, end, c2s, server),
            b'D' => {
                self.on_describe(start, end, c2s, server);
                Effects::default()
            }
            b'C' => {
                self.on_close(start, end, c2s);
                Effects::default()
            }
            _ => Effects::default(),
        };
        if self.skipping {
            // the server skips this message and whatever pgmux sent for it: no answer is
            // owed, and a statement it would have prepared or defined is not there
            self.failed(server);
        }
        self.answer_ready(s2c);
        fx
    }

    fn on_unnamed_parse(&mut self, text: &str) -> Effects {
        self.expect.push_back(Expect::Parse {
            def: None,
            ours: false,
            name: None,
        });
        // `Keys::parse` lexed the same text just before, through the memo
        self.unnamed_fx = effects_noted(text, &mut self.custom_settings);
        self.unnamed_fx
    }

    fn on_parse(
        &mut self,
        body: Vec<u8>,
        start: usize,
        end: usize,
        c2s: &mut Channel,
        server: &mut ServerStatements,
        at: Where,
    ) -> Effects {
        let aborted = at.aborted;
        let Some((name, rest)) = prepared::split_parse(&body).filter(|(n, _)| !n.is_empty()) else {
            let text =
                prepared::split_parse(&body).map_or("", |(_, rest)| prepared::query_text(rest));
            return self.on_unnamed_parse(text);
        };
        if let Some(existing) = self.stmts.get(name).cloned() {
            self.refuse_duplicate(name, &existing, start, end, c2s, server);
            return Effects::default();
        }
        let def = self.registry.intern(rest, at.wants.get("search_path"));
        self.counts[CLIENT_PARSES] += 1;
        let before = self.stmts.insert(name, def.clone());
        self.name_changed(name, before);
        c2s.seal(start);
        c2s.skip(end - start);
        if self.holds_current(&def, c2s, server) {
            server.touch(&def);
            if aborted {
                // PostgreSQL refuses it (25P02) unless it ends the transaction: the server
                // decides, and the name stays free if it refuses
                let mut msg = BytesMut::new();
                prepared::probe_messages(&mut msg, &def);
                c2s.push(msg.freeze());
                self.expect.push_back(Expect::ParseProbe {
                    name: name.into(),
                    def: def.clone(),
                });
                self.expect.push_back(Expect::Close { ours: true });
            } else {
                self.expect.push_back(Expect::ParseAnswered {
                    name: name.into(),
                    def: def.clone(),
                });
            }
        } else {
            self.make_room(c2s, server);
            let mut msg = BytesMut::new();
            def.parse_message(&mut msg);
            c2s.push(msg.freeze());
            self.counts[SERVER_PARSES] += 1;
            server.touch(&def);
            self.expect.push_back(Expect::Parse {
                def: Some(def.clone()),
                ours: false,
                name: Some(name.into()),
            });
        }
        self.note_custom_settings(&def);
        def.effects
    }

    /// PostgreSQL refuses to redefine a named statement (42P05) and skips the rest of the
    /// batch. pgmux makes the server do exactly that by preparing the client's new text under
    /// pgmux's name of the existing statement, and tells the client in its own names.
    /// PostgreSQL checks the name only once the text has parsed: a text it refuses (a syntax
    /// error, an unknown table) gets that error instead, from the server as from PostgreSQL.
    fn refuse_duplicate(
        &mut self,
        name: &[u8],
        existing: &Arc<StmtDef>,
        start: usize,
        end: usize,
        c2s: &mut Channel,
        server: &mut ServerStatements,
    ) {
        let mut msg = BytesMut::new();
        let text = prepared::split_parse(&c2s.buf[start + 5..end]).map_or(&[][..], |(_, t)| t);
        crate::protocol::messages::message(&mut msg, b'P', |b| {
            prepared::put_server_name(b, existing.id);
            b.put_slice(text);
        });
        c2s.seal(start);
        c2s.skip(end - start);
        self.ensure_prepared(existing, c2s, server);
        c2s.push(msg.freeze());
        let mut error = BytesMut::new();
        crate::protocol::PgError::error(
            "42P05",
            format!(
                "prepared statement \"{}\" already exists",
                String::from_utf8_lossy(name)
            ),
        )
        .encode(&mut error);
        self.expect.push_back(Expect::Duplicate {
            error: error.freeze(),
        });
    }

    fn on_bind(
        &mut self,
        start: usize,
        end: usize,
        c2s: &mut Channel,
        server: &mut ServerStatements,
    ) -> Effects {
        let body = &c2s.buf[start + 5..end];
        let Some((portal, stmt, names_len)) = prepared::bind_names(body) else {
            self.expect.push_back(Expect::Bind { stmt: 0 });
            return Effects::default();
        };
        if stmt.is_empty() {
            let fx = self.ensure_unnamed(start, c2s);
            self.expect.push_back(Expect::Bind { stmt: 0 });
            return fx;
        }
        let Some(def) = self.stmts.get(stmt).cloned() else {
            self.expect.push_back(Expect::Bind { stmt: 0 });
            return Effects::default();
        };
        // the new start of the message: header, portal, pgmux's statement name
        let mut head = BytesMut::with_capacity(5 + portal.len() + 32);
        head.put_u8(b'B');
        head.put_u32(0);
        head.put_slice(portal);
        head.put_u8(0);
        prepared::put_server_name(&mut head, def.id);
        // from the header: a large Bind's body is not all here
        let len_field = &c2s.buf[start + 1..start + 5];
        let total = u32::from_be_bytes([len_field[0], len_field[1], len_field[2], len_field[3]]);
        let rest_len = total as usize + 1 - 5 - names_len;
        let len = (head.len() - 1 + rest_len) as u32;
        head[1..5].copy_from_slice(&len.to_be_bytes());
        c2s.seal(start);
        self.ensure_prepared(&def, c2s, server);
        c2s.push(head.freeze());
        c2s.skip(5 + names_len);
        self.expect.push_back(Expect::Bind { stmt: def.id });
        self.counts[BINDS] += 1;
        self.note_custom_settings(&def);
        def.effects
    }

    fn on_describe(
        &mut self,
        start: usize,
        end: usize,
        c2s: &mut Channel,
        server: &mut ServerStatements,
    ) {
        let body = &c2s.buf[start + 5..end];
        let def = match prepared::target(body) {
            Some((b'S', name)) if !name.is_empty() => self.stmts.get(name).cloned(),
            Some((b'S', _)) => {
                self.ensure_unnamed(start, c2s);
                None
            }
            _ => None,
        };
        if let Some(def) = def {
            c2s.seal(start);
            c2s.skip(end - start);
            self.ensure_prepared(&def, c2s, server);
            let mut msg = BytesMut::new();
            crate::protocol::messages::message(&mut msg, b'D', |b| {
                b.put_u8(b'S');
                prepared::put_server_name(b, def.id);
            });
            c2s.push(msg.freeze());
        }
        self.expect.push_back(Expect::Describe);
    }

    fn on_close(&mut self, start: usize, end: usize, c2s: &mut Channel) {
        let body = &c2s.buf[start + 5..end];
        match prepared::target(body) {
            Some((b'S', name)) if !name.is_empty() => {
                // other clients may use the same server-side statement: it stays
                let name: Box<[u8]> = name.into();
                let before = self.stmts.remove(&name);
                self.name_changed(&name, before.clone());
                c2s.seal(start);
                c2s.skip(end - start);
                self.expect.push_back(Expect::Closed { name, def: before });
            }
            Some((b'S', _)) => {
                self.drop_unnamed(true);
                self.expect.push_back(Expect::Close { ours: false })
            }
            _ => self.expect.push_back(Expect::Close { ours: false }),
        }
    }

    /// Before a Bind or Describe of the unnamed statement at `c2s.buf[start..]`: unless the
    /// server has the client's own, it gets the client's last unnamed Parse again, or a
    /// Close of the unnamed statement when the client has none (the Bind then fails as it
    /// would on PostgreSQL, 26000, rather than run what another client left there).
    /// Returns the effects of the statement it binds: what it does to the session (a
    /// `set_config`) happens now, on this server, whether its Parse came in this unit or
    /// an earlier one (noted again: the same names, the same flags).
    fn ensure_unnamed(&mut self, start: usize, c2s: &mut Channel) -> Effects {
        if std::mem::replace(&mut self.unnamed_here, true) {
            if self.unnamed_fx.custom_settings {
                let text = self.stmts.unnamed_body().map_or("", prepared::query_text);
                effects_noted(text, &mut self.custom_settings);
            }
            return self.unnamed_fx;
        }
        c2s.seal(start);
        let Some(parse) = self.stmts.unnamed() else {
            c2s.push(Bytes::from_static(CLOSE_UNNAMED));
            self.expect.push_back(Expect::Close { ours: true });
            return Effects::default();
        };
        c2s.push(parse.clone());
        self.expect.push_back(Expect::Parse {
            def: None,
            ours: true,
            name: None,
        });
        let text = self.stmts.unnamed_body().map_or("", prepared::query_text);
        self.unnamed_fx = effects_noted(text, &mut self.custom_settings);
        self.unnamed_fx
    }

    /// Sends a Parse first if this server lacks the statement.
    fn ensure_prepared(
        &mut self,
        def: &Arc<StmtDef>,
        c2s: &mut Channel,
        server: &mut ServerStatements,
    ) {
        if self.holds_current(def, c2s, server) {
            server.touch(def);
            return;
        }
        self.make_room(c2s, server);
        let mut msg = BytesMut::new();
        def.parse_message(&mut msg);
        c2s.push(msg.freeze());
        self.counts[SERVER_PARSES] += 1;
        server.touch(def);
        self.expect.push_back(Expect::Parse {
            def: Some(def.clone()),
            ours: true,
            name: None,
        });
    }

    /// Whether the server holds `def` as it is now. One prepared before its plan was outdated
    /// is closed on the server first (and forgotten), so that it can be prepared again.
    fn holds_current(
        &mut self,
        def: &StmtDef,
        c2s: &mut Channel,
        server: &mut ServerStatements,
    ) -> bool {
        match server.holds(def) {
            Held::Current => true,
            Held::No => false,
            Held::Outdated => {
                server.forget(def.id);
                let mut msg = BytesMut::new();
                prepared::close_statement(&mut msg, def.id);
                c2s.push(msg.freeze());
                self.expect.push_back(Expect::Close { ours: true });
                false
            }
        }
    }

    /// Closes the least recently used statement when the server holds its quota.
    fn make_room(&mut self, c2s: &mut Channel, server: &mut ServerStatements) {
        if server.len() < self.max_prepared {
            return;
        }
        if let Some(old) = server.evictable(self.batch_tick) {
            server.forget(old);
            let mut msg = BytesMut::new();
            prepared::close_statement(&mut msg, old);
            c2s.push(msg.freeze());
            self.expect.push_back(Expect::Close { ours: true });
        }
    }

    /// A server message at `s2c.buf[start..s2c.scanned]` (whole if `inspects_server`).
    pub fn server_message(
        &mut self,
        tag: u8,
        start: usize,
        s2c: &mut Channel,
        server: &mut ServerStatements,
    ) {
        let Some(front) = self.expect.front() else {
            return;
        };
        let ours = match (tag, front) {
            (b'E', Expect::Ready | Expect::QueryReady) => return,
            (b'E', Expect::Duplicate { error }) => {
                let body = &s2c.buf[start + 5..s2c.scanned];
                // otherwise the text's own error, which names no statement
                if crate::protocol::messages::parse_error_fields(body).code == "42P05" {
                    let error = error.clone();
                    s2c.drop_scanned_from(start);
                    s2c.push(error);
                }
                return self.failed(server);
            }
            (b'E', Expect::Bind { stmt }) if *stmt != 0 => {
                let stmt = *stmt;
                let body = &s2c.buf[start + 5..s2c.scanned];
                if crate::protocol::messages::parse_error_fields(body).code == "0A000" {
                    self.outdated(stmt);
                }
                if let Some(error) = self.in_client_names(body, stmt) {
                    s2c.drop_scanned_from(start);
                    s2c.push(error);
                }
                return self.failed(server);
            }
            (
                b'E',
                Expect::Parse {
                    def: None,
                    ours: false,
                    ..
                },
            ) => {
                // PostgreSQL dropped the client's unnamed statement before it parsed the new
                // one, which failed: it has none now
                self.drop_unnamed(true);
                return self.failed(server);
            }
            (b'E', _) => return self.failed(server),
            (b'1', Expect::Parse { def, ours, .. }) => {
                if let Some(d) = def {
                    d.mark_validated();
                }
                *ours
            }
            (b'1', Expect::ParseProbe { .. }) => false,
            (b'3', Expect::Close { ours }) => *ours,
            (b'2', Expect::Bind { .. })
            | (b'T' | b'n', Expect::Describe)
            | (b'C' | b'I' | b's', Expect::Execute)
            | (b'Z', Expect::Ready | Expect::QueryReady) => false,
            _ => return,
        };
        self.expect.pop_front();
        if ours {
            s2c.drop_scanned_from(start);
        }
    }

    /// Without a server: a batch of nothing but Parses of statements some server already
    /// accepted, and a Sync, is answered by pgmux (so preparing never waits for a server
    /// that other clients hold). Returns whether the batch was consumed.
    pub fn answer_prepare_alone(
        &mut self,
        c2s: &mut Channel,
        s2c: &mut Channel,
        wants: &Params,
    ) -> bool {
        let mut at = 0;
        let mut parsed = Vec::new();
        loop {
            let Some(head) = c2s.buf.get(at..at + 5) else {
                return false;
            };
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if len < 4 {
                return false;
            }
            let Some(body) = c2s.buf.get(at + 5..at + 1 + len) else {
                return false;
            };
            match head[0] {
                b'P' => {
                    let Some((name, rest)) =
                        prepared::split_parse(body).filter(|(n, _)| !n.is_empty())
                    else {
                        return false;
                    };
                    let def = self.registry.intern(rest, wants.get("search_path"));
                    // a name in use is refused by a server (refuse_duplicate)
                    if !def.validated() || self.stmts.get(name).is_some() {
                        return false;
                    }
                    parsed.push((name.to_vec(), def));
                }
                b'S' if !parsed.is_empty() => {
                    at += 1 + len;
                    break;
                }
                _ => return false,
            }
            at += 1 + len;
        }
        for (name, def) in parsed {
            self.stmts.insert(&name, def);
            self.counts[CLIENT_PARSES] += 1;
            s2c.insert(Bytes::from_static(PARSE_COMPLETE));
        }
        s2c.insert(Bytes::from_static(READY_IDLE));
        c2s.consume_unscanned(at);
        true
    }

    /// Without a server: a simple Query that only deallocates one of the client's statements
    /// (`DEALLOCATE name`, as PHP's PDO and Rails send) is answered by pgmux, since the
    /// server knows the statement under pgmux's name, and other clients may share it.
    /// The query is the message at `at` of the client's input: 0, or right behind a BEGIN
    /// pgmux answered (`relay::begin`), in whose transaction block (`in_block`) it is
    /// answered. Returns whether the query was consumed.
    pub fn answer_deallocate_alone(
        &mut self,
        c2s: &mut Channel,
        s2c: &mut Channel,
        at: usize,
        in_block: bool,
    ) -> bool {
        let Some(head) = c2s.buf.get(at..at + 6).filter(|h| h[0] == b'Q') else {
            return false;
        };
        // runs for every query that arrives between transactions: most are not one
        if !matches!(
            head[5],
            b'D' | b'd' | b'/' | b'-' | b' ' | b'\t' | b'\n' | b'\r'
        ) {
            return false;
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let Some(body) = c2s.buf.get(at + 5..at + 1 + len.max(4)) else {
            return false;
        };
        let Some(name) = crate::router::effects::deallocated_name(prepared::query_text(body))
        else {
            return false;
        };
        let Some(before) = self.stmts.remove(name.as_bytes()) else {
            return false;
        };
        self.name_changed(name.as_bytes(), Some(before));
        // a simple Query drops the unnamed statement on PostgreSQL (no server is attached)
        self.stmts.drop_unnamed();
        s2c.insert(Bytes::from_static(DEALLOCATE_COMPLETE));
        s2c.insert(Bytes::from_static(match in_block {
            true => READY_IN_TRANSACTION,
            false => READY_IDLE,
        }));
        c2s.remove_unscanned(at, 1 + len);
        true
    }

    /// `DEALLOCATE name` (at `c2s.buf[start..c2s.scanned]`) of one of the client's
    /// statements, with a server attached and nothing in flight: answered by pgmux, with
    /// the server's transaction status (`in_block`: in a transaction block, else idle).
    pub fn answer_deallocate(
        &mut self,
        name: &[u8],
        start: usize,
        c2s: &mut Channel,
        s2c: &mut Channel,
        in_block: bool,
    ) {
        let before = self.stmts.remove(name);
        self.name_changed(name, before);
        // a simple Query drops the unnamed statement on PostgreSQL; this one does not reach
        // the server, which must lose it before the client's next use of it
        self.drop_unnamed(false);
        let end = c2s.scanned;
        c2s.seal(start);
        c2s.skip(end - start);
        s2c.insert(Bytes::from_static(DEALLOCATE_COMPLETE));
        s2c.insert(Bytes::from_static(match in_block {
            true => READY_IN_TRANSACTION,
            false => READY_IDLE,
        }));
    }

    /// `DEALLOCATE ALL` or `DISCARD ALL`: the client's names are gone, as they would be on
    /// PostgreSQL (so it may prepare the same names again).
    pub fn forget_all_names(&mut self) {
        let names: Vec<Box<[u8]>> = self.stmts.names().collect();
        for name in names {
            let before = self.stmts.remove(&name);
            self.name_changed(&name, before);
        }
    }

    /// A unit sent before this tracker was made (`needs_tracker`) still owes its
    /// ReadyForQuery.
    pub fn owes_ready(&mut self) {
        self.expect.push_back(Expect::Ready);
    }

    /// The server entered COPY FROM STDIN and ignores the `n` Syncs that followed the
    /// Execute at the front: it owes nothing for them.
    pub fn syncs_ignored(&mut self, mut n: u32) {
        let mut i = 1;
        while n > 0 && i < self.expect.len() {
            if matches!(self.expect[i], Expect::Ready) {
                self.expect.remove(i);
                n -= 1;
            } else {
                i += 1;
            }
        }
    }

    /// An ErrorResponse (`body`) that names pgmux's statement `id` ("bind message supplies 0
    /// parameters, but prepared statement \"pgmux_7\" requires 1"), rewritten to name the
    /// client's statement as PostgreSQL would. None when it does not name it.
    fn in_client_names(&self, body: &[u8], id: u64) -> Option<Bytes> {
        let mut ours = BytesMut::new();
        ours.put_u8(b'"');
        prepared::put_server_name(&mut ours, id);
        let last = ours.len() - 1;
        ours[last] = b'"';
        let at = body.windows(ours.len()).position(|w| w == &ours[..])?;
        let name = self.stmts.name_of(id)?;
        let mut out = BytesMut::with_capacity(body.len() + name.len() + 5);
        out.put_u8(b'E');
        out.put_u32(0);
        out.put_slice(&body[..at + 1]);
        out.put_slice(name);
        out.put_slice(&body[at + ours.len() - 1..]);
        let len = (out.len() - 1) as u32;
        out[1..5].copy_from_slice(&len.to_be_bytes());
        Some(out.freeze())
    }

    /// The server would not run statement `id` as prepared ("cached plan must not change
    /// result type", 0A000, after a schema change): PostgreSQL's answer is to prepare it
    /// again, and a client doing so would only be given the same outdated server statement.
    /// So every server prepares it again before its next use.
    fn outdated(&self, id: u64) {
        if let Some(def) = self.stmts.find(id) {
            tracing::info!(
                statement = id,
                "a server outdated a prepared statement's plan: preparing it again on each server"
            );
            def.outdate();
        }
    }

    /// After an error the server skips to the next Sync: so do the expectations, and, until
    /// that Sync arrives, what the client sends meanwhile. Queries and FunctionCalls on the
    /// way are skipped too (PostgreSQL ignores every message but Sync): counted in `skipped`.
    fn failed(&mut self, server: &mut ServerStatements) {
        // statements whose Parse did not take effect: a skipped Close of one (the client
        // parsed, used and closed it in one go) leaves the name free, not defined by it.
        // By name and definition: definitions are shared by text, and a driver may close
        // one name and parse the same text under another in the same batch (asyncpg)
        let mut undone: Vec<(Box<[u8]>, Arc<StmtDef>)> = Vec::new();
        while let Some(front) = self.expect.front() {
            if matches!(front, Expect::Ready) {
                break;
            }
            match self.expect.pop_front() {
                Some(Expect::QueryReady) => self.skipped += 1,
                Some(Expect::Parse {
                    def: Some(d), name, ..
                }) => {
                    server.forget(d.id);
                    if let Some(name) = name {
                        self.undefine(&name, &d);
                        undone.push((name, d));
                    }
                }
                Some(Expect::ParseAnswered { name, def } | Expect::ParseProbe { name, def }) => {
                    self.undefine(&name, &def);
                    undone.push((name, def));
                }
                Some(Expect::Closed {
                    name,
                    def: Some(def),
                }) if !undone
                    .iter()
                    .any(|(n, u)| *n == name && Arc::ptr_eq(u, &def)) =>
                {
                    let before = self.stmts.insert(&name, def);
                    self.name_changed(&name, before);
                }
                _ => {}
            }
        }
        // nothing left up to a Sync: the client has not sent it yet
        self.skipping = self.expect.is_empty();
    }

    /// The client's Parse of `name` did not take effect: the name is free again.
    fn undefine(&mut self, name: &[u8], def: &Arc<StmtDef>) {
        if self.stmts.get(name).is_some_and(|d| Arc::ptr_eq(d, def)) {
            let before = self.stmts.remove(name);
            self.name_changed(name, before);
        }
    }

    /// Writes pgmux's own answers that are due, at a message boundary of the response stream.
    pub fn answer_ready(&mut self, s2c: &mut Channel) {
        // unscanned bytes past `scanned` can only be a message nobody asked for (a notice)
        if !s2c.scanner.at_boundary() {
            return;
        }
        loop {
            let msg = match self.expect.front() {
                Some(Expect::ParseAnswered { .. }) => PARSE_COMPLETE,
                Some(Expect::Closed { .. }) => CLOSE_COMPLETE,
                _ => break,
            };
            s2c.insert(Bytes::from_static(msg));
            self.expect.pop_front();
        }
    }
}

/// The effects of a statement's text, its custom settings noted in `custom` for the
/// read-back.
fn effects_noted(text: &str, custom: &mut Vec<String>) -> Effects {
    let fx = crate::router::memo::lexed(text).1;
    if fx.custom_settings {
        custom.extend(crate::router::effects::custom_setting_names(text));
    }
    fx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_finds_the_names_as_they_were_when_armed() {
        let registry: &'static Registry = Box::leak(Box::default());
        let (one, two) = (
            registry.intern(b"SELECT 1\0\0\0", None),
            registry.intern(b"SELECT 2\0\0\0", None),
        );
        let mut t = Tracker::new(registry, 10);
        t.stmts.insert(b"kept", one.clone());
        t.stmts.insert(b"closed", one.clone());
        t.begin_journal();
        let before = t.stmts.remove(b"closed");
        t.name_changed(b"closed", before);
        let before = t.stmts.insert(b"new", two.clone());
        t.name_changed(b"new", before);
        let before = t.stmts.insert(b"closed", two.clone());
        t.name_changed(b"closed", before);
        t.roll_back();
        assert_eq!(t.stmts.get(b"closed").map(|d| d.id), Some(one.id));
        assert!(t.stmts.get(b"new").is_none());
        assert_eq!(t.stmts.len(), 2);

        // once the unit may not be replayed, nothing is recorded or undone
        t.begin_journal();
        t.end_journal();
        let before = t.stmts.insert(b"final", two);
        t.name_changed(b"final", before);
        t.roll_back();
        assert!(t.stmts.get(b"final").is_some());
    }
}
