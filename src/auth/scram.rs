//! The server half of SCRAM-SHA-256 (RFC 5802 / RFC 7677) as PostgreSQL
//! speaks it inside its SASL messages: pgmux verifying a client against a
//! stored verifier. A pure state machine over message bodies; no I/O.

use std::fmt;
use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};

use super::password::{ct_eq, ScramVerifier};

/// The mechanism without channel binding; over TLS pgmux offers `SCRAM-SHA-256-PLUS` too
/// (see `channel_binding`).
pub const MECHANISM: &str = "SCRAM-SHA-256";

/// Real SCRAM messages are ~100 bytes; anything this large is an attack or a
/// bug, and refusing it bounds the work and memory an exchange can cost.
pub const MAX_MESSAGE_LEN: usize = 4096;

/// Same sizes PostgreSQL uses, so an exchange for an unknown user (fake salt)
/// cannot be told apart from a real one by its shape.
const SERVER_NONCE_LEN: usize = 18;
const FAKE_SALT_LEN: usize = 16;
const FAKE_ITERATIONS: u32 = 4096;

/// `InvalidProof` means the client spoke the protocol but did not know the
/// password (PostgreSQL answers SQLSTATE 28P01, "password authentication
/// failed"); every other variant is a protocol violation (08P01).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("SCRAM message longer than {MAX_MESSAGE_LEN} bytes")]
    TooLong,
    #[error("SCRAM channel binding is not supported")]
    ChannelBindingUnsupported,
    /// The client's flag contradicts the mechanism it chose, or claims the server cannot
    /// bind when it offered to (a downgrade).
    #[error("SCRAM channel binding negotiation error")]
    ChannelBindingNegotiation,
    #[error("SCRAM authorization identity is not supported")]
    AuthzidUnsupported,
    #[error("SCRAM mandatory extension is not supported")]
    ExtensionUnsupported,
    #[error("SCRAM channel binding does not match the client-first-message")]
    ChannelBindingMismatch,
    #[error("SCRAM nonce does not match")]
    NonceMismatch,
    #[error("SCRAM proof is invalid")]
    InvalidProof,
    #[error("SCRAM message received out of order")]
    OutOfOrder,
}

/// Channel binding as negotiated by the mechanism the client chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// Only SCRAM-SHA-256 was offered (no TLS, or a certificate with no usable hash).
    NotOffered,
    /// SCRAM-SHA-256-PLUS was offered, the client chose SCRAM-SHA-256.
    Offered,
    /// The client chose SCRAM-SHA-256-PLUS; the tls-server-end-point hash of our certificate.
    Selected(Vec<u8>),
}

/// One SCRAM exchange with one client. Call [`ScramServer::client_first`],
/// then [`ScramServer::client_final`]. A malformed or wrong message kills the
/// exchange; a call out of order (`OutOfOrder`) leaves it as it was.
pub struct ScramServer {
    verifier: ScramVerifier,
    binding: Binding,
    /// Set for unknown users: the exchange runs normally but can never pass.
    doomed: bool,
    state: State,
}

enum State {
    AwaitingClientFirst,
    AwaitingClientFinal(Exchange),
    Succeeded { client_key: [u8; 32] },
    Failed,
}

/// What client-final must be checked against and signed over.
struct Exchange {
    client_first_bare: Vec<u8>,
    server_first: Vec<u8>,
    expected_cbind: String,
    nonce: Vec<u8>,
}

// Hand-written so that keys never reach a log line.
impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::AwaitingClientFirst => "AwaitingClientFirst",
            State::AwaitingClientFinal(_) => "AwaitingClientFinal",
            State::Succeeded { .. } => "Succeeded",
            State::Failed => "Failed",
        };
        f.debug_struct("ScramServer")
            .field("state", &state)
            .finish()
    }
}

impl ScramServer {
    /// `verifier`: the user's stored verifier, or `None` for an unknown user.
    /// Then the exchange still looks normal (a salt derived from the user
    /// name and a per-process key, 4096 iterations) and fails only at the
    /// proof with [`ScramError::InvalidProof`], so an attacker cannot tell
    /// unknown users from wrong passwords.
    pub fn new(verifier: Option<ScramVerifier>, user_for_fake_salt: &str) -> ScramServer {
        let doomed = verifier.is_none();
        let verifier = verifier.unwrap_or_else(|| fake_verifier(user_for_fake_salt));
        ScramServer {
            verifier,
            binding: Binding::NotOffered,
            doomed,
            state: State::AwaitingClientFirst,
        }
    }

    /// What was negotiated about channel binding before the exchange (default: not offered).
    pub fn with_binding(mut self, binding: Binding) -> ScramServer {
        self.binding = binding;
        self
    }

    /// Takes the client-first-message (the SASLInitialResponse data) and
    /// returns the server-first-message for AuthenticationSASLContinue.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, State::AwaitingClientFirst) {
            return Err(ScramError::OutOfOrder);
        }
        self.state = State::Failed;
        let first = parse_client_first(msg)?;
        let expected_cbind = self.expected_cbind(first.gs2_header)?;
        let mut nonce = first.client_nonce.to_vec();
        nonce.extend_from_slice(server_nonce().as_bytes());
        let server_first = self.server_first_message(&nonce);
        self.state = State::AwaitingClientFinal(Exchange {
            client_first_bare: first.bare.to_vec(),
            server_first: server_first.clone(),
            expected_cbind,
            nonce,
        });
        Ok(server_first)
    }

    /// The c= attribute the client-final-message must carry: base64 of the gs2 header, and
    /// of the certificate hash after it when the client bound the exchange.
    fn expected_cbind(&self, gs2_header: &[u8]) -> Result<String, ScramError> {
        let binds = gs2_header.starts_with(b"p=");
        match (&self.binding, gs2_header.first()) {
            (Binding::Selected(hash), Some(b'p')) => {
                let mut data = gs2_header.to_vec();
                data.extend_from_slice(hash);
                Ok(STANDARD.encode(data))
            }
            (Binding::Selected(_), _) => Err(ScramError::ChannelBindingNegotiation),
            // "y": the client could bind but thinks the server cannot, while it offered to
            (Binding::Offered, Some(b'y')) => Err(ScramError::ChannelBindingNegotiation),
            (_, _) if binds => Err(ScramError::ChannelBindingNegotiation),
            _ => Ok(STANDARD.encode(gs2_header)),
        }
    }

    fn server_first_message(&self, nonce: &[u8]) -> Vec<u8> {
        let mut msg = b"r=".to_vec();
        msg.extend_from_slice(nonce);
        let params = format!(
            ",s={},i={}",
            STANDARD.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        msg.extend_from_slice(params.as_bytes());
        msg
    }

    /// Takes the client-final-message (the SASLResponse data) and, if the
    /// proof is right, returns the server-final-message (`v=<signature>`)
    /// for AuthenticationSASLFinal.
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let exchange = match std::mem::replace(&mut self.state, State::Failed) {
            State::AwaitingClientFinal(exchange) => exchange,
            other => {
                // Only the caller misbehaved; keep the exchange as it was.
                self.state = other;
                return Err(ScramError::OutOfOrder);
            }
        };
        let fin = parse_client_final(msg)?;
        if fin.cbind != exchange.expected_cbind.as_bytes() {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if fin.nonce != exchange.nonce.as_slice() {
            return Err(ScramError::NonceMismatch);
        }
        let auth_message: [&[u8]; 5] = [
            &exchange.client_first_bare,
            b",",
            &exchange.server_first,
            b",",
            fin.without_proof,
        ];
        let client_key = self.check_proof(&auth_message, &fin.proof)?;
        self.state = State::Succeeded { client_key };
        let signature = hmac_sha256(&self.verifier.server_key, &auth_message);
        Ok(format!("v={}", STANDARD.encode(signature)).into_bytes())
    }

    /// Recovers ClientKey = proof XOR HMAC(StoredKey, AuthMessage) and checks
    /// SHA256(ClientKey) == StoredKey without early exit.
    fn check_proof(
        &self,
        auth_message: &[&[u8]],
        proof: &[u8; 32],
    ) -> Result<[u8; 32], ScramError> {
        let signature = hmac_sha256(&self.verifier.stored_key, auth_message);
        let mut client_key = *proof;
        for (k, s) in client_key.iter_mut().zip(signature) {
            *k ^= s;
        }
        let matches = ct_eq(&sha256(&client_key), &self.verifier.stored_key);
        if matches && !self.doomed {
            Ok(client_key)
        } else {
            Err(ScramError::InvalidProof)
        }
    }

    /// After a successful [`ScramServer::client_final`]: the client's
    /// ClientKey, which lets pgmux log in to servers on the client's behalf.
    pub fn client_key(&self) -> Option<[u8; 32]> {
        match self.state {
            State::Succeeded { client_key } => Some(client_key),
            _ => None,
        }
    }
}

/// Base64 keeps it within RFC 5802 `printable` (no commas).
fn server_nonce() -> String {
    STANDARD.encode(rand::random::<[u8; SERVER_NONCE_LEN]>())
}

fn fake_verifier(user: &str) -> ScramVerifier {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    let key = KEY.get_or_init(rand::random);
    let digest = hmac_sha256(key, &[b"pgmux fake SCRAM salt", user.as_bytes()]);
    ScramVerifier {
        iterations: FAKE_ITERATIONS,
        salt: digest.iter().copied().take(FAKE_SALT_LEN).collect(),
        // Never consulted for success: `doomed` fails the proof regardless.
        stored_key: [0; 32],
        server_key: [0; 32],
    }
}

struct ClientFirst<'a> {
    gs2_header: &'static [u8],
    bare: &'a [u8],
    client_nonce: &'a [u8],
}

/// client-first-message = gs2-header client-first-message-bare, where
/// gs2-header = cbind-flag "," [authzid] "," and the bare part is
/// [m=...,] n=user,r=nonce[,extensions].
fn parse_client_first(msg: &[u8]) -> Result<ClientFirst<'_>, ScramError> {
    check_len(msg)?;
    let (flag, rest) = split_first_field(msg)?;
    let gs2_header: &'static [u8] = match flag {
        b"n" => b"n,,",
        // The client could bind but believes we cannot: a downgrade when -PLUS was offered,
        // which `expected_cbind` checks.
        b"y" => b"y,,",
        b"p=tls-server-end-point" => b"p=tls-server-end-point,,",
        [b'p', b'=', ..] => return Err(ScramError::ChannelBindingUnsupported),
        _ => return Err(ScramError::Malformed("invalid channel binding flag")),
    };
    let (authzid, bare) = split_first_field(rest)?;
    match authzid {
        [] => {}
        [b'a', b'=', ..] => return Err(ScramError::AuthzidUnsupported),
        _ => return Err(ScramError::Malformed("invalid authorization identity")),
    }
    let mut fields = bare.split(|&b| b == b',');
    let user = fields.next();
    if let Some([b'm', b'=', ..]) = user {
        return Err(ScramError::ExtensionUnsupported);
    }
    // PostgreSQL takes the user from the startup packet; clients send "n=".
    attribute(user, b'n', "missing user name")?;
    let client_nonce = attribute(fields.next(), b'r', "missing nonce")?;
    if client_nonce.is_empty() || !client_nonce.iter().all(|&b| is_printable(b)) {
        return Err(ScramError::Malformed("invalid nonce"));
    }
    check_extensions(fields)?;
    Ok(ClientFirst {
        gs2_header,
        bare,
        client_nonce,
    })
}

struct ClientFinal<'a> {
    without_proof: &'a [u8],
    cbind: &'a [u8],
    nonce: &'a [u8],
    proof: [u8; 32],
}

/// client-final-message = c=cbind,r=nonce[,extensions],p=proof.
fn parse_client_final(msg: &[u8]) -> Result<ClientFinal<'_>, ScramError> {
    check_len(msg)?;
    let mut halves = msg.rsplitn(2, |&b| b == b',');
    let proof = attribute(halves.next(), b'p', "missing proof")?;
    let without_proof = halves
        .next()
        .ok_or(ScramError::Malformed("missing proof"))?;
    let mut fields = without_proof.split(|&b| b == b',');
    let cbind = attribute(fields.next(), b'c', "missing channel binding")?;
    let nonce = attribute(fields.next(), b'r', "missing nonce")?;
    check_extensions(fields)?;
    let proof = STANDARD
        .decode(proof)
        .ok()
        .and_then(|p| <[u8; 32]>::try_from(p).ok())
        .ok_or(ScramError::Malformed("invalid proof"))?;
    Ok(ClientFinal {
        without_proof,
        cbind,
        nonce,
        proof,
    })
}

fn check_len(msg: &[u8]) -> Result<(), ScramError> {
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(ScramError::TooLong);
    }
    Ok(())
}

/// Splits at the first comma; a message without one is truncated.
fn split_first_field(msg: &[u8]) -> Result<(&[u8], &[u8]), ScramError> {
    let mut parts = msg.splitn(2, |&b| b == b',');
    match (parts.next(), parts.next()) {
        (Some(field), Some(rest)) => Ok((field, rest)),
        _ => Err(ScramError::Malformed("truncated gs2 header")),
    }
}

/// The value of a `name=value` field, or `Malformed(missing)` if the field
/// is absent or has another name.
fn attribute<'a>(
    field: Option<&'a [u8]>,
    name: u8,
    missing: &'static str,
) -> Result<&'a [u8], ScramError> {
    match field {
        Some([n, b'=', value @ ..]) if *n == name => Ok(value),
        _ => Err(ScramError::Malformed(missing)),
    }
}

/// Optional extensions are ignored, as RFC 5802 and PostgreSQL do, but must
/// still be well-formed attributes; a stray `p=` means a misplaced proof.
fn check_extensions<'a>(fields: impl Iterator<Item = &'a [u8]>) -> Result<(), ScramError> {
    for field in fields {
        match field {
            [b'p', b'=', ..] => return Err(ScramError::Malformed("misplaced proof")),
            [n, b'=', ..] if n.is_ascii_alphabetic() => {}
            _ => return Err(ScramError::Malformed("invalid attribute")),
        }
    }
    Ok(())
}

/// RFC 5802 `printable`: visible ASCII except the field separator.
fn is_printable(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

/// HMAC-SHA-256 over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    // A 32-byte key is shorter than SHA-256's 64-byte block, so HMAC zero-pads
    // it; padding it ourselves gives the identical MAC through the infallible
    // fixed-size constructor instead of one that returns a Result.
    let mut block = [0u8; 64];
    for (dst, src) in block.iter_mut().zip(key) {
        *dst = *src;
    }
    let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new(&block.into());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::super::password::{salted_password, ScramVerifier};
    use super::*;
    use hmac::Mac;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use rand::{Rng, SeedableRng};

    const PG_SCRAM_SECRET: &str = "SCRAM-SHA-256$4096:XCPLV/X0iWTJRucpVmJtpA==$zv9wo/mOPM5RLKtGckQGBQMrH7pIxn7cJGZiFMTquIw=:gau0ra3j/yd/9ofFsMLGrRRnpVO3emFC9JVlxp2hv7I=";

    fn pg_verifier() -> ScramVerifier {
        ScramVerifier::parse(PG_SCRAM_SECRET).unwrap()
    }

    fn scram_client_key(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
        hmac_sha256(
            &salted_password(password, salt, iterations),
            &[b"Client Key"],
        )
    }

    /// A cheap verifier for tests that run many exchanges.
    fn fast_verifier(password: &str) -> ScramVerifier {
        ScramVerifier::from_password(password, b"0123456789abcdef", 16)
    }

    struct Run {
        server: ScramServer,
        client: ScramSha256,
        server_first: Vec<u8>,
        client_final: Vec<u8>,
    }

    /// Runs the exchange up to (not including) the client-final check.
    fn start(password: &str, verifier: Option<ScramVerifier>, user: &str) -> Run {
        let mut server = ScramServer::new(verifier, user);
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let server_first = server.client_first(client.message()).unwrap();
        client.update(&server_first).unwrap();
        let client_final = client.message().to_vec();
        Run {
            server,
            client,
            server_first,
            client_final,
        }
    }

    fn first_attrs(server_first: &[u8]) -> (String, Vec<u8>, u32) {
        let text = std::str::from_utf8(server_first).unwrap();
        let parts: Vec<&str> = text.split(',').collect();
        assert_eq!(parts.len(), 3, "{text}");
        let salt = STANDARD
            .decode(parts[1].strip_prefix("s=").unwrap())
            .unwrap();
        let iterations = parts[2].strip_prefix("i=").unwrap().parse().unwrap();
        (
            parts[0].strip_prefix("r=").unwrap().to_owned(),
            salt,
            iterations,
        )
    }

    #[test]
    fn correct_password_succeeds_against_postgres_verifier() {
        let mut run = start("secret", Some(pg_verifier()), "u1");
        let server_final = run.server.client_final(&run.client_final).unwrap();
        assert!(server_final.starts_with(b"v="));
        run.client.finish(&server_final).unwrap();
        let v = pg_verifier();
        let expected = scram_client_key("secret", &v.salt, v.iterations);
        assert_eq!(run.server.client_key(), Some(expected));
    }

    #[test]
    fn non_ascii_passwords_match_client_saslprep() {
        for password in ["pässwörd", "a\u{00A0}b", "\u{00AD}x"] {
            let mut run = start(password, Some(fast_verifier(password)), "u");
            let server_final = run.server.client_final(&run.client_final).unwrap();
            run.client.finish(&server_final).unwrap();
        }
    }

    #[test]
    fn server_first_has_postgres_shape() {
        let run = start("secret", Some(pg_verifier()), "u1");
        let (nonce, salt, iterations) = first_attrs(&run.server_first);
        assert_eq!(salt, pg_verifier().salt);
        assert_eq!(iterations, 4096);
        // The client nonce is 24 characters; ours adds 24 more.
        assert_eq!(nonce.len(), 48);
        assert!(nonce.bytes().all(is_printable));
    }

    #[test]
    fn y_flag_is_accepted() {
        let v = fast_verifier("pw");
        let mut server = ScramServer::new(Some(v.clone()), "u");
        let first = server.client_first(b"y,,n=,r=abc").unwrap();
        let (nonce, ..) = first_attrs(&first);
        let without_proof = format!("c=eSws,r={nonce}");
        let proof = client_proof("pw", &v, b"n=,r=abc", &first, without_proof.as_bytes());
        let msg = format!("{without_proof},p={}", STANDARD.encode(proof));
        assert!(server.client_final(msg.as_bytes()).is_ok());
        assert!(server.client_key().is_some());
    }

    /// Test-side client proof, to build client-final messages by hand.
    fn client_proof(
        password: &str,
        v: &ScramVerifier,
        bare: &[u8],
        server_first: &[u8],
        without_proof: &[u8],
    ) -> [u8; 32] {
        let client_key = scram_client_key(password, &v.salt, v.iterations);
        let auth: [&[u8]; 5] = [bare, b",", server_first, b",", without_proof];
        let sig = hmac_sha256(&sha256(&client_key), &auth);
        let mut proof = client_key;
        proof.iter_mut().zip(sig).for_each(|(p, s)| *p ^= s);
        proof
    }

    #[test]
    fn wrong_password_fails_with_invalid_proof() {
        let mut run = start("Secret", Some(pg_verifier()), "u1");
        let err = run.server.client_final(&run.client_final).unwrap_err();
        assert_eq!(err, ScramError::InvalidProof);
        assert_eq!(run.server.client_key(), None);
    }

    #[test]
    fn unknown_user_looks_normal_then_fails() {
        let mut run = start("secret", None, "nobody");
        let (nonce, salt, iterations) = first_attrs(&run.server_first);
        assert_eq!(nonce.len(), 48);
        assert_eq!(salt.len(), FAKE_SALT_LEN);
        assert_eq!(iterations, 4096);
        let err = run.server.client_final(&run.client_final).unwrap_err();
        assert_eq!(err, ScramError::InvalidProof);
        assert_eq!(run.server.client_key(), None);
    }

    #[test]
    fn fake_salt_is_stable_per_user() {
        let salt = |user: &str| fake_verifier(user).salt;
        assert_eq!(salt("bob"), salt("bob"));
        assert_ne!(salt("bob"), salt("alice"));
    }

    #[test]
    fn unknown_user_fails_even_with_matching_keys() {
        // The fake verifier's keys are zero; a proof can't hit them, but
        // `doomed` must hold even if one did, so force it.
        let v = fast_verifier("pw");
        let mut server = ScramServer::new(Some(v.clone()), "u");
        server.doomed = true;
        let first = server.client_first(b"n,,n=,r=abc").unwrap();
        let (nonce, ..) = first_attrs(&first);
        let without_proof = format!("c=biws,r={nonce}");
        let proof = client_proof("pw", &v, b"n=,r=abc", &first, without_proof.as_bytes());
        let msg = format!("{without_proof},p={}", STANDARD.encode(proof));
        assert_eq!(
            server.client_final(msg.as_bytes()),
            Err(ScramError::InvalidProof)
        );
    }

    fn first_err(msg: &[u8]) -> ScramError {
        let mut server = ScramServer::new(Some(fast_verifier("pw")), "u");
        server.client_first(msg).unwrap_err()
    }

    #[test]
    fn malformed_client_first_is_rejected() {
        use ScramError::*;
        let long = [b"n,,n=,r=".as_slice(), &[b'a'; MAX_MESSAGE_LEN]].concat();
        let cases: &[(&[u8], ScramError)] = &[
            (b"", Malformed("truncated gs2 header")),
            (b"garbage", Malformed("truncated gs2 header")),
            (b"n", Malformed("truncated gs2 header")),
            (b"n,", Malformed("truncated gs2 header")),
            (b"n,,", Malformed("missing user name")),
            (b"n,,n=", Malformed("missing nonce")),
            (b"n,,n=,", Malformed("missing nonce")),
            (b"n,,n=,r=", Malformed("invalid nonce")),
            (b"n,,n=,r=a\x7fb", Malformed("invalid nonce")),
            (b"n,,n=,r=a b", Malformed("invalid nonce")),
            (b"n,,r=abc", Malformed("missing user name")),
            (b"n,,n=,x=abc", Malformed("missing nonce")),
            (b"n,,n=,r=abc,", Malformed("invalid attribute")),
            (b"n,,n=,r=abc,1=x", Malformed("invalid attribute")),
            (b"x,,n=,r=abc", Malformed("invalid channel binding flag")),
            (b"N,,n=,r=abc", Malformed("invalid channel binding flag")),
            // binding data although -PLUS was not offered (here: no TLS)
            (
                b"p=tls-server-end-point,,n=,r=abc",
                ChannelBindingNegotiation,
            ),
            (b"p=tls-unique,,n=,r=abc", ChannelBindingUnsupported),
            (b"n,a=admin,n=,r=abc", AuthzidUnsupported),
            (b"n,x,n=,r=abc", Malformed("invalid authorization identity")),
            (b"n,,m=ext,n=,r=abc", ExtensionUnsupported),
            (&long, TooLong),
        ];
        for (msg, want) in cases {
            assert_eq!(&first_err(msg), want, "{}", String::from_utf8_lossy(msg));
        }
    }

    #[test]
    fn optional_extensions_are_ignored() {
        let mut server = ScramServer::new(Some(fast_verifier("pw")), "u");
        assert!(server.client_first(b"n,,n=someone,r=abc,x=ext").is_ok());
    }

    /// A server that has answered "n,,n=,r=abc", and its full nonce.
    fn after_first() -> (ScramServer, String) {
        let mut server = ScramServer::new(Some(fast_verifier("pw")), "u");
        let first = server.client_first(b"n,,n=,r=abc").unwrap();
        let (nonce, ..) = first_attrs(&first);
        (server, nonce)
    }

    #[test]
    fn malformed_client_final_is_rejected() {
        use ScramError::*;
        let (_, nonce) = after_first();
        let p = STANDARD.encode([7u8; 32]);
        let long = format!("c=biws,r={nonce},p={}", "A".repeat(MAX_MESSAGE_LEN));
        let cases: Vec<(String, ScramError)> = vec![
            (String::new(), Malformed("missing proof")),
            ("garbage".into(), Malformed("missing proof")),
            (format!("c=biws,r={nonce}"), Malformed("missing proof")),
            (format!("p={p}"), Malformed("missing proof")),
            (format!(",p={p}"), Malformed("missing channel binding")),
            (format!("c=biws,p={p}"), Malformed("missing nonce")),
            (
                format!("r={nonce},c=biws,p={p}"),
                Malformed("missing channel binding"),
            ),
            (
                format!("c=biws,r={nonce},p=!!!"),
                Malformed("invalid proof"),
            ),
            (format!("c=biws,r={nonce},p="), Malformed("invalid proof")),
            (
                format!("c=biws,r={nonce},p=AAAA"),
                Malformed("invalid proof"),
            ),
            (
                format!("c=biws,r={nonce},p={p},x=1"),
                Malformed("missing proof"),
            ),
            (
                format!("c=biws,r={nonce},p={p},p={p}"),
                Malformed("misplaced proof"),
            ),
            (
                format!("c=biws,r={nonce},,p={p}"),
                Malformed("invalid attribute"),
            ),
            (format!("c=eSws,r={nonce},p={p}"), ChannelBindingMismatch),
            (format!("c=,r={nonce},p={p}"), ChannelBindingMismatch),
            (format!("c=biws,r=abc,p={p}"), NonceMismatch),
            (format!("c=biws,r={nonce}x,p={p}"), NonceMismatch),
            (format!("c=biws,r={nonce},p={p}"), InvalidProof),
            (format!("c=biws,r={nonce},x=ext,p={p}"), InvalidProof),
            (long, TooLong),
        ];
        for (msg, want) in cases {
            let (mut server, _) = after_first();
            // The nonce differs per server; splice this server's in.
            let msg = msg.replace(&nonce, &after_nonce(&server));
            assert_eq!(server.client_final(msg.as_bytes()), Err(want), "{msg}");
            assert_eq!(server.client_key(), None);
        }
    }

    fn after_nonce(server: &ScramServer) -> String {
        match &server.state {
            State::AwaitingClientFinal(ex) => String::from_utf8(ex.nonce.clone()).unwrap(),
            _ => panic!("not awaiting client-final"),
        }
    }

    #[test]
    fn calls_out_of_order_fail() {
        let mut server = ScramServer::new(Some(fast_verifier("pw")), "u");
        assert_eq!(
            server.client_final(b"c=biws,r=a,p=b"),
            Err(ScramError::OutOfOrder)
        );
        assert!(server.client_first(b"n,,n=,r=abc").is_ok());
        assert_eq!(
            server.client_first(b"n,,n=,r=abc"),
            Err(ScramError::OutOfOrder)
        );

        // After a failure nothing more is accepted.
        let mut server = ScramServer::new(Some(fast_verifier("pw")), "u");
        assert!(server.client_first(b"bogus").is_err());
        assert_eq!(
            server.client_first(b"n,,n=,r=abc"),
            Err(ScramError::OutOfOrder)
        );

        // After success the key survives stray calls.
        let mut run = start("pw", Some(fast_verifier("pw")), "u");
        run.server.client_final(&run.client_final).unwrap();
        let key = run.server.client_key();
        assert!(key.is_some());
        assert_eq!(
            run.server.client_final(&run.client_final),
            Err(ScramError::OutOfOrder)
        );
        assert_eq!(
            run.server.client_first(b"n,,n=,r=abc"),
            Err(ScramError::OutOfOrder)
        );
        assert_eq!(run.server.client_key(), key);
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5c4a_3256);
        for _ in 0..2000 {
            let len = rng.gen_range(0..64);
            let mut msg: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if rng.gen_bool(0.5) {
                // Bias toward plausible prefixes so parsing goes deeper.
                let prefix: &[u8] =
                    [b"n,,n=,r=".as_slice(), b"c=biws,r=", b"y,,", b"n,,"][rng.gen_range(0..4)];
                msg.splice(0..0, prefix.iter().copied());
            }
            let mut fresh = ScramServer::new(None, "u");
            let _ = fresh.client_first(&msg);
            let (mut server, _) = after_first();
            assert!(server.client_final(&msg).is_err());
            assert!(server.client_key().is_none());
        }
    }

    #[test]
    fn mutated_client_final_always_fails() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut run = start("pw", Some(fast_verifier("pw")), "u");
            let mut msg = run.client_final.clone();
            let Some(byte) = msg.get_mut(rng.gen_range(0..run.client_final.len())) else {
                continue;
            };
            *byte ^= 1 << rng.gen_range(0..8);
            assert!(run.server.client_final(&msg).is_err());
            assert!(run.server.client_key().is_none());
        }
    }

    #[test]
    fn hmac_matches_variable_key_hmac() {
        let key = [0x42u8; 32];
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap();
        mac.update(b"Client Key");
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(hmac_sha256(&key, &[b"Client", b" Key"]), expected);
    }

    #[test]
    fn channel_binding_is_checked_against_the_negotiation() {
        let hash = vec![9u8; 32];
        let bound = |b: Binding| ScramServer::new(Some(pg_verifier()), "u").with_binding(b);
        // chose -PLUS: the flag must bind, with our hash in c=
        let mut server = bound(Binding::Selected(hash.clone()));
        let first = server
            .client_first(b"p=tls-server-end-point,,n=,r=abc")
            .unwrap();
        let nonce = attr_value(&first, "r=");
        let mut cbind = b"p=tls-server-end-point,,".to_vec();
        cbind.extend_from_slice(&hash);
        let wrong = format!(
            "c=cD10bHMtc2VydmVyLWVuZC1wb2ludCws,r={nonce},p={}",
            STANDARD.encode([0u8; 32])
        );
        assert_eq!(
            server.client_final(wrong.as_bytes()),
            Err(ScramError::ChannelBindingMismatch)
        );
        let mut server = bound(Binding::Selected(hash.clone()));
        let first = server
            .client_first(b"p=tls-server-end-point,,n=,r=abc")
            .unwrap();
        let nonce = attr_value(&first, "r=");
        let right = format!(
            "c={},r={nonce},p={}",
            STANDARD.encode(&cbind),
            STANDARD.encode([0u8; 32])
        );
        // the binding matches; only the (made-up) proof is wrong
        assert_eq!(
            server.client_final(right.as_bytes()),
            Err(ScramError::InvalidProof)
        );
        // chose -PLUS but did not bind, or bound without choosing it, or claimed we cannot bind
        for (b, msg) in [
            (Binding::Selected(hash.clone()), &b"n,,n=,r=abc"[..]),
            (Binding::NotOffered, b"p=tls-server-end-point,,n=,r=abc"),
            (Binding::Offered, b"p=tls-server-end-point,,n=,r=abc"),
            (Binding::Offered, b"y,,n=,r=abc"),
        ] {
            assert_eq!(
                bound(b).client_first(msg),
                Err(ScramError::ChannelBindingNegotiation)
            );
        }
        assert!(bound(Binding::Offered).client_first(b"n,,n=,r=abc").is_ok());
        assert_eq!(
            bound(Binding::Selected(hash)).client_first(b"p=tls-unique,,n=,r=abc"),
            Err(ScramError::ChannelBindingUnsupported)
        );
    }

    fn attr_value(msg: &[u8], name: &str) -> String {
        let text = std::str::from_utf8(msg).unwrap();
        text.split(',')
            .find_map(|f| f.strip_prefix(name))
            .unwrap()
            .to_string()
    }
}
