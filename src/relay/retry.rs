//! Transparent retry of an autocommit read whose replica fails before any of its answer
//! reached the client. While armed (only for replica-routed autocommit reads: the router
//! decides), the relay keeps a copy of every client byte sent since the server was attached
//! and holds the server's answer back from the client until the unit's last ReadyForQuery.
//! If the server connection ends, breaks, or answers with an error that says the server (not
//! the request) failed, the session bans the host, drops the connection and puts the copy
//! back in front of the client's buffer, to be routed again as if it had just arrived.
//! Nothing is copied for any other traffic, and the copy lives only until the answer is
//! released.

use bytes::BytesMut;

/// Client bytes kept for one unit; a larger request is not retried.
pub const REQUEST_LIMIT: usize = 64 * 1024;
/// Server bytes held back for one unit; past this the answer streams on and the unit is no
/// longer retried (below the relay's 64 KiB high water, so reading never stalls).
pub const HOLD_LIMIT: usize = 32 * 1024;

#[derive(Default)]
pub struct Retry {
    armed: bool,
    /// The request was put back to be routed again (`take`, `route_again`).
    replayed: bool,
    /// The client's count of CancelRequests when the request began its wait for a server
    /// (`stats::ClientInfo::cancels`).
    cancels_at_send: u16,
    /// Every client byte since the server was attached (the buffered unit, then any more).
    request: BytesMut,
}

impl Retry {
    /// A replica was lent for an autocommit read: `pending` is the client's buffered input,
    /// none of it sent yet.
    pub fn arm(&mut self, pending: &[u8]) {
        if pending.len() > REQUEST_LIMIT {
            return;
        }
        self.request.clear();
        self.request.extend_from_slice(pending);
        self.armed = true;
    }

    /// The answer may reach the client now: the unit is no longer retried.
    pub fn disarm(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        self.request.clear();
        if self.request.capacity() > 4096 {
            self.request = BytesMut::new();
        }
    }

    /// Whether the server's answer is being held back.
    #[inline]
    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// More client bytes went into the relay's buffer while armed.
    pub fn client_bytes(&mut self, b: &[u8]) {
        if self.request.len() + b.len() > REQUEST_LIMIT {
            return self.disarm();
        }
        self.request.extend_from_slice(b);
    }

    /// The request kept, while armed.
    pub fn request(&self) -> Option<&[u8]> {
        self.armed.then_some(&self.request[..])
    }

    /// The request to send again, disarming.
    pub fn take(&mut self) -> Option<BytesMut> {
        if !self.armed {
            return None;
        }
        self.armed = false;
        self.replayed = true;
        Some(self.request.split())
    }

    /// The request's server failed before it was lent (its settings could not be brought in
    /// step): the request goes back to be routed again.
    pub fn route_again(&mut self) {
        self.replayed = true;
    }

    /// The request at the front of the client's input begins its wait for a server, and
    /// `cancels` is its client's count of CancelRequests now. True if it is one sent before
    /// whose client asked a cancel since: the cancel went to the server that failed, or
    /// came while the request went back, when the client had no server and was not waiting,
    /// so it was kept nowhere. Either way it was meant for this request, which is then
    /// answered as cancelled rather than run again.
    pub fn cancelled_since_sent(&mut self, cancels: u16) -> bool {
        let cancelled = std::mem::take(&mut self.replayed) && cancels != self.cancels_at_send;
        self.cancels_at_send = cancels;
        cancelled
    }
}

/// Whether an ErrorResponse body says the server failed rather than the request: admin or
/// crash shutdown, cannot connect now (57P01, 57P02, 57P03) or a connection exception (08),
/// except 08P01 (protocol violation), which a client's own malformed message causes: retrying
/// it would let one client ban every replica.
pub fn is_server_failure(body: &[u8]) -> bool {
    let code = crate::protocol::messages::parse_error_fields(body).code;
    matches!(code.as_str(), "57P01" | "57P02" | "57P03")
        || (code.starts_with("08") && code != "08P01")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PgError;

    fn body(code: &str) -> Vec<u8> {
        let mut out = BytesMut::new();
        PgError::fatal(code, "x").encode(&mut out);
        out[5..].to_vec()
    }

    #[test]
    fn server_failures_are_told_from_request_errors() {
        for c in ["57P01", "57P02", "57P03", "08006", "08000"] {
            assert!(is_server_failure(&body(c)), "{c}");
        }
        for c in ["42P01", "25006", "57014", "40001", "53300", "08P01"] {
            assert!(!is_server_failure(&body(c)), "{c}");
        }
        assert!(!is_server_failure(b""));
    }

    #[test]
    fn the_request_is_kept_until_disarmed_and_bounded() {
        let mut r = Retry::default();
        assert!(r.take().is_none());
        r.arm(b"Q1");
        r.client_bytes(b"Q2");
        assert!(r.is_armed());
        assert_eq!(&r.take().unwrap()[..], b"Q1Q2");
        assert!(!r.is_armed());
        r.arm(b"Q");
        r.disarm();
        assert!(r.take().is_none());
        r.arm(b"Q");
        r.client_bytes(&vec![0; REQUEST_LIMIT]);
        assert!(!r.is_armed(), "an oversized request is not kept");
        r.arm(&vec![0; REQUEST_LIMIT + 1]);
        assert!(!r.is_armed());
    }

    #[test]
    fn only_a_cancel_since_a_replayed_request_was_sent_cancels_it() {
        let mut r = Retry::default();
        assert!(!r.cancelled_since_sent(0), "a new request");
        assert!(
            !r.cancelled_since_sent(1),
            "a cancel before a new request is not for it"
        );
        r.arm(b"Q");
        r.take().unwrap();
        assert!(!r.cancelled_since_sent(1), "sent again, no cancel since");
        r.arm(b"Q");
        r.take().unwrap();
        assert!(
            r.cancelled_since_sent(2),
            "a cancel while it ran or went back"
        );
        assert!(!r.cancelled_since_sent(3), "the next request is a new one");
        r.route_again();
        assert!(
            r.cancelled_since_sent(4),
            "its server failed before it was lent"
        );
    }
}
