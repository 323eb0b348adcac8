//! Authenticating clients (trust, md5, SCRAM-SHA-256 with pgmux as the SCRAM server) and the
//! stored secrets both sides use. pgmux's own login to servers lives in `server`.

pub mod channel_binding;
pub mod hba;
pub mod lookup;
pub mod password;
pub mod scram;
pub mod scram_client;

use crate::config::AuthType;
use crate::protocol::messages;
use bytes::BytesMut;
use password::{ScramVerifier, Secret};
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest authentication message accepted from a client.
const MAX_AUTH_MESSAGE: usize = 8192;
/// Iterations for verifiers pgmux derives from plain-text passwords (PostgreSQL's default).
const SCRAM_ITERATIONS: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong password, unknown user, or a secret that cannot serve the method.
    #[error("password authentication failed")]
    Failed,
    #[error("client closed the connection during authentication")]
    Closed,
    #[error("protocol violation during authentication: {0}")]
    Protocol(String),
    #[error("i/o error during authentication: {0}")]
    Io(#[from] std::io::Error),
}

/// SCRAM verifiers derived from plain-text passwords, so the PBKDF2 cost is paid once.
#[derive(Default)]
pub struct VerifierCache {
    map: Mutex<HashMap<(String, String), ScramVerifier>>,
}

impl VerifierCache {
    fn verifier(&self, user: &str, secret: &Secret) -> Option<ScramVerifier> {
        let pw = match secret {
            Secret::Scram(v) | Secret::ScramKeys { verifier: v, .. } => return Some(v.clone()),
            Secret::Md5(_) => return None,
            Secret::Plain(pw) => pw,
        };
        let key = (user.to_string(), pw.clone());
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let v = map.entry(key).or_insert_with(|| {
            let salt: [u8; 16] = rand::random();
            ScramVerifier::from_password(pw, &salt, SCRAM_ITERATIONS)
        });
        Some(v.clone())
    }
}

/// What a successful exchange taught pgmux: with a SCRAM verifier, the client's ClientKey,
/// which logs in to servers as this user without the password.
#[derive(Debug, Default)]
pub struct Proven {
    pub client_key: Option<[u8; 32]>,
}

impl Proven {
    /// The secret that logs in to servers as this user, when the exchange taught one that the
    /// stored `secret` alone is not (a SCRAM verifier cannot answer a server's SCRAM).
    pub fn server_secret(&self, secret: Option<&Secret>) -> Option<Secret> {
        match (secret, self.client_key) {
            (Some(Secret::Scram(v)), Some(client_key)) => Some(Secret::ScramKeys {
                verifier: v.clone(),
                client_key,
            }),
            _ => None,
        }
    }
}

/// Runs the exchange that `method` calls for. `secret` is None for an unknown user or one
/// without a password, whose exchange looks like any other and then fails. On Ok the caller
/// sends AuthenticationOk.
///
/// `tls_end_point`: on a TLS connection, the tls-server-end-point hash of pgmux's
/// certificate, which makes SCRAM offer channel binding (SCRAM-SHA-256-PLUS).
pub async fn authenticate<S>(
    stream: &mut S,
    method: AuthType,
    user: &str,
    known: bool,
    secret: Option<&Secret>,
    cache: &VerifierCache,
    tls_end_point: Option<&[u8]>,
) -> Result<Proven, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match (method, secret) {
        (AuthType::Trust, _) if known => Ok(Proven::default()),
        (AuthType::Trust, _) => Err(AuthError::Failed),
        // as PostgreSQL does: md5 with a SCRAM secret runs SCRAM
        (AuthType::Md5, Some(Secret::Scram(_) | Secret::ScramKeys { .. }))
        | (AuthType::ScramSha256, _) => {
            let verifier = secret.and_then(|s| cache.verifier(user, s));
            let known = secret.is_some();
            let client_key = scram_exchange(stream, user, verifier, known, tls_end_point).await?;
            Ok(Proven {
                client_key: Some(client_key),
            })
        }
        (AuthType::Md5, _) => {
            md5_exchange(stream, user, secret).await?;
            Ok(Proven::default())
        }
    }
}

async fn md5_exchange<S>(
    stream: &mut S,
    user: &str,
    secret: Option<&Secret>,
) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let salt: [u8; 4] = rand::random();
    let mut out = BytesMut::new();
    messages::auth_md5(&mut out, salt);
    stream.write_all(&out).await?;
    let body = read_password_message(stream).await?;
    let response = body.strip_suffix(&[0]).unwrap_or(&body);
    match secret {
        Some(s) if password::md5_verify(s, user, salt, response) => Ok(()),
        _ => Err(AuthError::Failed),
    }
}

async fn scram_exchange<S>(
    stream: &mut S,
    user: &str,
    verifier: Option<ScramVerifier>,
    known: bool,
    tls_end_point: Option<&[u8]>,
) -> Result<[u8; 32], AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // a known user whose secret cannot do SCRAM (md5) still gets a normal-looking exchange
    let usable = verifier.is_some();
    let mut out = BytesMut::new();
    // as PostgreSQL lists them: the bound mechanism first
    let offered: &[&str] = match tls_end_point {
        Some(_) => &[channel_binding::MECHANISM_PLUS, scram::MECHANISM],
        None => &[scram::MECHANISM],
    };
    messages::auth_sasl(&mut out, offered);
    stream.write_all(&out).await?;

    let body = read_password_message(stream).await?;
    let (plus, data) = sasl_initial_data(&body, offered)?;
    let binding = match (plus, tls_end_point) {
        (true, Some(hash)) => scram::Binding::Selected(hash.to_vec()),
        (false, Some(_)) => scram::Binding::Offered,
        _ => scram::Binding::NotOffered,
    };
    let mut server = scram::ScramServer::new(verifier, user).with_binding(binding);
    let first = server.client_first(data).map_err(scram_error)?;
    out.clear();
    messages::auth_sasl_continue(&mut out, &first);
    stream.write_all(&out).await?;

    let body = read_password_message(stream).await?;
    let fin = server.client_final(&body).map_err(scram_error)?;
    let client_key = match server.client_key() {
        Some(k) if usable && known => k,
        _ => return Err(AuthError::Failed),
    };
    out.clear();
    messages::auth_sasl_final(&mut out, &fin);
    stream.write_all(&out).await?;
    Ok(client_key)
}

fn scram_error(e: scram::ScramError) -> AuthError {
    match e {
        scram::ScramError::InvalidProof => AuthError::Failed,
        other => AuthError::Protocol(other.to_string()),
    }
}

/// The data of a SASLInitialResponse, after checking the mechanism is one `offered`; true
/// when the client chose channel binding.
fn sasl_initial_data<'a>(
    mut body: &'a [u8],
    offered: &[&str],
) -> Result<(bool, &'a [u8]), AuthError> {
    let mech = messages::take_cstr(&mut body)
        .ok_or_else(|| AuthError::Protocol("malformed SASLInitialResponse".into()))?;
    if !offered.iter().any(|m| m.as_bytes() == mech) {
        return Err(AuthError::Protocol(
            "client selected an invalid SASL authentication mechanism".into(),
        ));
    }
    let plus = mech == channel_binding::MECHANISM_PLUS.as_bytes();
    let len = body
        .get(..4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| AuthError::Protocol("malformed SASLInitialResponse".into()))?;
    let data = &body[4..];
    if len < 0 || len as usize != data.len() {
        return Err(AuthError::Protocol("malformed SASLInitialResponse".into()));
    }
    Ok((plus, data))
}

/// Reads one 'p' message (password, SASL initial or SASL response) body.
async fn read_password_message<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, AuthError> {
    let mut head = [0u8; 5];
    match stream.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(AuthError::Closed),
        Err(e) => return Err(e.into()),
    }
    if head[0] != b'p' {
        return Err(AuthError::Protocol(format!(
            // a number, as PostgreSQL prints it: the byte itself may be a NUL
            "expected password response, got message type {}",
            head[0]
        )));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=MAX_AUTH_MESSAGE).contains(&len) {
        return Err(AuthError::Protocol(format!("invalid message length {len}")));
    }
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            AuthError::Closed
        } else {
            e.into()
        }
    })?;
    Ok(body)
}
