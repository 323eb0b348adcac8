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
use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::mem::ManuallyDrop;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
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
        .with_writer(std::io::stderr);
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
    addr: SocketAddr,
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
    pub fn new(addr: SocketAddr) -> Self {
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
    SystemTime.format_time(&mut w)?;
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
    let mut time = String::new();
    SystemTime.format_time(&mut Writer::new(&mut time))?;
    write!(w, "{{\"timestamp\":{},", json_str(&time))?;
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
        let tag = ClientTag::new("127.0.0.1:5000".parse().unwrap());
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
    fn a_scope_restores_what_was_current() {
        let a = ClientTag::new("127.0.0.1:1".parse().unwrap());
        let b = ClientTag::new("127.0.0.1:2".parse().unwrap());
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
