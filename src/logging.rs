//! Log output: the subscriber pgmux installs, and each client's log context (its address,
//! database and user on every line the client's task writes).
//!
//! The context is not a tracing span: a span lives in the subscriber's registry with its
//! fields formatted into a string, about 0.45 KiB per client, paid by every idle client at
//! log level `info`. Here the context is a small [`ClientTag`] inside the client's task,
//! made current on the polling thread for the length of each poll, and the line formatter
//! reads it from there. Lines keep the shape a span would have given them:
//! `client{client_addr=.. db=.. user=..}: ` in text, `"span"`/`"spans"` in JSON.

use crate::config::{Config, LogFormat};
use crate::endpoint::ClientAddr;
use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber: RUST_LOG if set, else the configured log_level, in the
/// configured format, to stderr.
pub fn init(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&config.pgmux.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // colour codes (in event fields) only for a terminal: log files and collectors get
        // plain text
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.pgmux.log_format {
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(Lines { json: true })
            .init(),
        LogFormat::Text => builder.event_format(Lines { json: false }).init(),
    }
}

/// Who a client is, for its log lines: the address from the start, database and user once
/// it has logged in.
pub struct ClientTag {
    addr: ClientAddr,
    names: OnceLock<Names>,
}

/// A database and user name in one shared string: a pool keeps one for its clients, so an
/// idle client's names cost a pointer.
#[derive(Clone, Debug)]
pub struct Names {
    both: Arc<str>,
    /// `both[..split]` is the database
    split: usize,
}

impl Names {
    pub fn new(db: &str, user: &str) -> Names {
        Names {
            both: [db, user].concat().into(),
            split: db.len(),
        }
    }

    pub fn db(&self) -> &str {
        &self.both[..self.split]
    }

    pub fn user(&self) -> &str {
        &self.both[self.split..]
    }
}

impl ClientTag {
    pub fn new(addr: ClientAddr) -> Self {
        ClientTag {
            addr,
            names: OnceLock::new(),
        }
    }

    fn names(&self) -> Option<(&str, &str)> {
        self.names.get().map(|n| (n.db(), n.user()))
    }
}

thread_local! {
    /// The tag of the client task being polled on this thread, or null.
    static CURRENT: Cell<*const ClientTag> = const { Cell::new(std::ptr::null()) };
}

/// Names the database and user of the client task being polled (the first call wins).
pub fn set_client_names(names: Names) {
    with_current(|tag| {
        if let Some(tag) = tag {
            let _ = tag.names.set(names);
        }
    });
}

fn with_current<R>(f: impl FnOnce(Option<&ClientTag>) -> R) -> R {
    let ptr = CURRENT.with(Cell::get);
    // SAFETY: CURRENT is non-null only while a `WithClient` is being polled or dropped on
    // this thread (Scope restores the previous value when that ends), and the tag lives
    // in that pinned `WithClient`.
    f(unsafe { ptr.as_ref() })
}

/// Makes a tag current until dropped, then restores whatever was current before.
struct Scope(*const ClientTag);

impl Scope {
    fn enter(tag: &ClientTag) -> Scope {
        Scope(CURRENT.with(|c| c.replace(tag)))
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

pin_project_lite::pin_project! {
    /// A client's task: its future, with its tag current whenever it runs or is dropped
    /// (a session cut short may log from its destructors).
    pub struct WithClient<F> {
        tag: ClientTag,
        #[pin]
        fut: ManuallyDrop<F>,
    }

    impl<F> PinnedDrop for WithClient<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let _scope = Scope::enter(this.tag);
            // SAFETY: dropped in place (pinned data may be), once: ManuallyDrop keeps the
            // field from being dropped again after this.
            unsafe { ManuallyDrop::drop(this.fut.get_unchecked_mut()) };
        }
    }
}

impl<F> WithClient<F> {
    pub fn new(tag: ClientTag, fut: F) -> Self {
        WithClient {
            tag,
            fut: ManuallyDrop::new(fut),
        }
    }
}

impl<F: Future> Future for WithClient<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _scope = Scope::enter(this.tag);
        // SAFETY: structural pinning through ManuallyDrop, which only wraps the future
        unsafe { this.fut.map_unchecked_mut(|f| &mut **f) }.poll(cx)
    }
}

/// pgmux's line format: tracing_subscriber's full text format or its JSON format, with the
/// current client's context where a span's would be.
struct Lines {
    json: bool,
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if self.json {
            json_line(ctx, w, event)
        } else {
            text_line(ctx, w, event)
        }
    }
}

fn text_line<S, N>(ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let meta = event.metadata();
    write_timestamp(&mut w)?;
    write!(w, " {:>5} ", meta.level())?;
    with_current(|tag| match tag {
        Some(tag) => {
            write!(w, "client{{client_addr={}", tag.addr)?;
            if let Some((db, user)) = tag.names() {
                write!(w, " db={db} user={user}")?;
            }
            w.write_str("}: ")
        }
        None => Ok(()),
    })?;
    // spans a library opens, if any
    if let Some(scope) = ctx.event_scope() {
        for span in scope.from_root() {
            w.write_str(span.name())?;
            let ext = span.extensions();
            if let Some(f) = ext.get::<FormattedFields<N>>().filter(|f| !f.is_empty()) {
                write!(w, "{{{f}}}")?;
            }
            w.write_str(": ")?;
        }
    }
    write!(w, "{}: ", meta.target())?;
    ctx.format_fields(w.by_ref(), event)?;
    writeln!(w)
}

fn json_line<S, N>(ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let meta = event.metadata();
    w.write_str("{\"timestamp\":\"")?;
    write_timestamp(&mut w)?;
    w.write_str("\",")?;
    write!(w, "\"level\":\"{}\",\"fields\":", meta.level())?;
    // JsonFields (installed with this format) writes the event's fields as an object
    ctx.format_fields(w.by_ref(), event)?;
    write!(w, ",\"target\":{}", json_str(meta.target()))?;
    let span = with_current(|tag| tag.map(span_json));
    if let Some(span) = span {
        write!(w, ",\"span\":{span},\"spans\":[{span}]")?;
    }
    writeln!(w, "}}")
}

/// Now, as tracing_subscriber writes it (RFC 3339, UTC, microseconds:
/// `2026-11-26T09:49:57.043902Z`). The date and time up to the second are formatted once a
/// second per thread: a client login writes two lines, and formatting every field of the
/// date each time was a twentieth of a login's cost.
fn write_timestamp(w: &mut Writer<'_>) -> fmt::Result {
    thread_local! {
        static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (cached, mut text) = SECOND.with(Cell::get);
    if cached != secs {
        text = second_text(secs);
        SECOND.with(|c| c.set((secs, text)));
    }
    // ASCII digits and separators only
    w.write_str(std::str::from_utf8(&text).unwrap_or("????-??-??T??:??:??"))?;
    write!(w, ".{:06}Z", now.subsec_micros())
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time (civil calendar, proleptic Gregorian).
fn second_text(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // days since 1970-01-01 to year, month, day (Howard Hinnant's civil_from_days)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut t = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (0..width).rev() {
            t[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, rem / 3_600);
    put(14, 2, rem % 3_600 / 60);
    put(17, 2, rem % 60);
    t
}

/// The client's context as the JSON object of a span named `client`.
fn span_json(tag: &ClientTag) -> String {
    let mut s = format!("{{\"client_addr\":\"{}\"", tag.addr);
    if let Some((db, user)) = tag.names() {
        let _ = write!(s, ",\"db\":{},\"user\":{}", json_str(db), json_str(user));
    }
    s.push_str(",\"name\":\"client\"}");
    s
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_back_into_database_and_user() {
        let tag = ClientTag::new(ClientAddr::from(
            "127.0.0.1:5000".parse::<std::net::SocketAddr>().unwrap(),
        ));
        assert_eq!(tag.names(), None);
        {
            let _s = Scope::enter(&tag);
            set_client_names(Names::new("app\"db", "bob"));
            set_client_names(Names::new("other", "ignored"));
        }
        assert_eq!(tag.names(), Some(("app\"db", "bob")));
        let span: serde_json::Value = serde_json::from_str(&span_json(&tag)).unwrap();
        assert_eq!(span["db"], "app\"db");
        assert_eq!(span["user"], "bob");
        assert_eq!(span["client_addr"], "127.0.0.1:5000");
        assert_eq!(span["name"], "client");
    }

    #[test]
    fn seconds_are_written_as_rfc3339() {
        // expected values from `date -u -d @SECS +%Y-%m-%dT%H:%M:%S`
        for (secs, text) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_700_000_000, "2023-11-14T22:13:20"),
            (1_795_000_000, "2026-11-18T11:06:40"),
            (4_102_444_799, "2099-12-31T23:59:59"),
        ] {
            assert_eq!(std::str::from_utf8(&second_text(secs)).unwrap(), text);
        }
    }

    #[test]
    fn timestamps_have_tracing_subscribers_shape() {
        let mut s = String::new();
        write_timestamp(&mut Writer::new(&mut s)).unwrap();
        let b = s.as_bytes();
        assert_eq!(b.len(), 27, "{s}");
        for (i, &c) in b.iter().enumerate() {
            let want_digit = !matches!(i, 4 | 7 | 10 | 13 | 16 | 19 | 26);
            assert_eq!(c.is_ascii_digit(), want_digit, "{s}");
        }
        assert!(
            s.ends_with('Z') && &s[19..20] == "." && &s[10..11] == "T",
            "{s}"
        );
    }

    #[test]
    fn a_scope_restores_what_was_current() {
        let a = ClientTag::new(ClientAddr::from(
            "127.0.0.1:1".parse::<std::net::SocketAddr>().unwrap(),
        ));
        let b = ClientTag::new(ClientAddr::from(
            "127.0.0.1:2".parse::<std::net::SocketAddr>().unwrap(),
        ));
        assert!(with_current(|t| t.is_none()));
        {
            let _sa = Scope::enter(&a);
            {
                let _sb = Scope::enter(&b);
                assert_eq!(with_current(|t| t.map(|t| t.addr.port())), Some(2));
            }
            assert_eq!(with_current(|t| t.map(|t| t.addr.port())), Some(1));
        }
        assert!(with_current(|t| t.is_none()));
    }
}
