//! The client half of SCRAM-SHA-256 for logging in to a server without the password: with
//! the ClientKey pgmux recovered from a client's proof and the server's verifier (StoredKey,
//! ServerKey, salt, iterations), which is all RFC 5802 needs from a client. This is how a user
//! known only through auth_query (or by a SCRAM verifier in the config) reaches a server that
//! demands SCRAM. A pure state machine over message bodies; no I/O.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::password::{ct_eq, ScramVerifier};
use super::scram::{hmac_sha256, sha256};

const NONCE_LEN: usize = 18;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramClientError {
    #[error("malformed SCRAM message from server: {0}")]
    Malformed(&'static str),
    #[error("server's SCRAM nonce does not extend ours")]
    NonceMismatch,
    /// The role's password changed since pgmux learned the key: a client must log in again.
    #[error("server's SCRAM salt or iteration count differ from the stored secret's")]
    SecretMismatch,
    #[error("server's SCRAM signature is invalid")]
    BadServerSignature,
    #[error("SCRAM message received out of order")]
    OutOfOrder,
}

/// One exchange. `client_first`, then `server_first` (gives client-final), then `server_final`.
pub struct KeyedScramClient {
    verifier: ScramVerifier,
    client_key: [u8; 32],
    /// The server's tls-server-end-point hash when the exchange is bound (SCRAM-SHA-256-PLUS).
    binding: Option<Vec<u8>>,
    nonce: String,
    auth_message: Option<Vec<u8>>,
}

impl KeyedScramClient {
    pub fn new(
        verifier: ScramVerifier,
        client_key: [u8; 32],
        binding: Option<Vec<u8>>,
    ) -> KeyedScramClient {
        let raw: [u8; NONCE_LEN] = rand::random();
        KeyedScramClient {
            verifier,
            client_key,
            binding,
            nonce: STANDARD.encode(raw),
            auth_message: None,
        }
    }

    /// An empty user name: PostgreSQL takes the user from the startup packet, as libpq
    /// relies on.
    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.gs2_header(), self.client_first_bare()).into_bytes()
    }

    fn gs2_header(&self) -> &'static str {
        match self.binding {
            Some(_) => "p=tls-server-end-point,,",
            None => "n,,",
        }
    }

    /// c=: the gs2 header, and the certificate hash when bound.
    fn cbind(&self) -> String {
        let mut data = self.gs2_header().as_bytes().to_vec();
        if let Some(hash) = &self.binding {
            data.extend_from_slice(hash);
        }
        STANDARD.encode(data)
    }

    fn client_first_bare(&self) -> String {
        format!("n=,r={}", self.nonce)
    }

    /// Checks the server-first-message and returns the client-final-message with the proof.
    pub fn server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramClientError> {
        let text =
            std::str::from_utf8(msg).map_err(|_| ScramClientError::Malformed("not UTF-8"))?;
        let mut parts = text.split(',');
        let nonce = attr(parts.next(), 'r')?;
        let salt = attr(parts.next(), 's')?;
        let iterations = attr(parts.next(), 'i')?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramClientError::NonceMismatch);
        }
        let salt = STANDARD
            .decode(salt)
            .map_err(|_| ScramClientError::Malformed("salt is not base64"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| ScramClientError::Malformed("bad iteration count"))?;
        if salt != self.verifier.salt || iterations != self.verifier.iterations {
            return Err(ScramClientError::SecretMismatch);
        }
        let without_proof = format!("c={},r={nonce}", self.cbind());
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare());
        let signature = hmac_sha256(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let mut proof = self.client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        self.auth_message = Some(auth_message.into_bytes());
        Ok(format!("{without_proof},p={}", STANDARD.encode(proof)).into_bytes())
    }

    /// Checks the server's signature: a server that does not know the verifier cannot fake it.
    pub fn server_final(&self, msg: &[u8]) -> Result<(), ScramClientError> {
        let auth_message = self
            .auth_message
            .as_ref()
            .ok_or(ScramClientError::OutOfOrder)?;
        let text =
            std::str::from_utf8(msg).map_err(|_| ScramClientError::Malformed("not UTF-8"))?;
        let v = attr(text.split(',').next(), 'v')?;
        let got = STANDARD
            .decode(v)
            .map_err(|_| ScramClientError::Malformed("signature is not base64"))?;
        let expected = hmac_sha256(&self.verifier.server_key, &[auth_message]);
        if ct_eq(&got, &expected) {
            Ok(())
        } else {
            Err(ScramClientError::BadServerSignature)
        }
    }

    /// True when this key belongs to the verifier (SHA256(ClientKey) = StoredKey).
    pub fn key_matches(verifier: &ScramVerifier, client_key: &[u8; 32]) -> bool {
        ct_eq(&sha256(client_key), &verifier.stored_key)
    }
}

fn attr(field: Option<&str>, name: char) -> Result<&str, ScramClientError> {
    field
        .and_then(|f| f.strip_prefix(name))
        .and_then(|f| f.strip_prefix('='))
        .ok_or(ScramClientError::Malformed("missing attribute"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::password::salted_password;
    use crate::auth::scram::ScramServer;

    fn keys(password: &str) -> (ScramVerifier, [u8; 32]) {
        let salt = b"0123456789abcdef";
        let v = ScramVerifier::from_password(password, salt, 64);
        let client_key = hmac_sha256(&salted_password(password, salt, 64), &[b"Client Key"]);
        (v, client_key)
    }

    #[test]
    fn logs_in_to_a_scram_server_with_the_key_alone() {
        let (v, key) = keys("pa55");
        assert!(KeyedScramClient::key_matches(&v, &key));
        let mut server = ScramServer::new(Some(v.clone()), "u");
        let mut client = KeyedScramClient::new(v, key, None);
        let first = server.client_first(&client.client_first()).unwrap();
        let fin = client.server_first(&first).unwrap();
        let server_final = server.client_final(&fin).unwrap();
        assert_eq!(server.client_key(), Some(key));
        client.server_final(&server_final).unwrap();
    }

    #[test]
    fn a_bound_exchange_carries_the_certificate_hash() {
        use crate::auth::scram::Binding;
        let (v, key) = keys("pa55");
        let hash = vec![3u8; 32];
        let mut server =
            ScramServer::new(Some(v.clone()), "u").with_binding(Binding::Selected(hash.clone()));
        let mut client = KeyedScramClient::new(v.clone(), key, Some(hash));
        let first = server.client_first(&client.client_first()).unwrap();
        let fin = client.server_first(&first).unwrap();
        client
            .server_final(&server.client_final(&fin).unwrap())
            .unwrap();
        // another certificate (a man in the middle) does not match
        let mut server =
            ScramServer::new(Some(v.clone()), "u").with_binding(Binding::Selected(vec![4u8; 32]));
        let mut client = KeyedScramClient::new(v, key, Some(vec![3u8; 32]));
        let first = server.client_first(&client.client_first()).unwrap();
        let fin = client.server_first(&first).unwrap();
        assert!(server.client_final(&fin).is_err());
    }

    #[test]
    fn a_wrong_key_fails_the_server_check() {
        let (v, _) = keys("pa55");
        let mut server = ScramServer::new(Some(v.clone()), "u");
        let mut client = KeyedScramClient::new(v, [7; 32], None);
        let first = server.client_first(&client.client_first()).unwrap();
        let fin = client.server_first(&first).unwrap();
        assert!(server.client_final(&fin).is_err());
    }

    #[test]
    fn a_changed_password_is_reported_not_attempted() {
        let (old, key) = keys("old");
        let new = ScramVerifier::from_password("new", b"another-salt-123", 64);
        let mut server = ScramServer::new(Some(new), "u");
        let mut client = KeyedScramClient::new(old, key, None);
        let first = server.client_first(&client.client_first()).unwrap();
        assert_eq!(
            client.server_first(&first),
            Err(ScramClientError::SecretMismatch)
        );
    }

    #[test]
    fn a_forged_server_signature_is_refused() {
        let (v, key) = keys("pa55");
        let mut server = ScramServer::new(Some(v.clone()), "u");
        let mut client = KeyedScramClient::new(v, key, None);
        let first = server.client_first(&client.client_first()).unwrap();
        client.server_first(&first).unwrap();
        let forged = format!("v={}", STANDARD.encode([0u8; 32]));
        assert_eq!(
            client.server_final(forged.as_bytes()),
            Err(ScramClientError::BadServerSignature)
        );
        assert!(client.server_final(b"e=other-error").is_err());
    }

    #[test]
    fn malformed_server_first_is_refused_without_panic() {
        let (v, key) = keys("pa55");
        for msg in [
            &b""[..],
            b"r=",
            b"x=1,s=AA==,i=1",
            b"\xff\xfe",
            b"r=abc,s=AA==,i=1",
        ] {
            let mut client = KeyedScramClient::new(v.clone(), key, None);
            assert!(client.server_first(msg).is_err());
        }
        let client = KeyedScramClient::new(v, key, None);
        assert_eq!(
            client.server_final(b"v=AA=="),
            Err(ScramClientError::OutOfOrder)
        );
    }
}
