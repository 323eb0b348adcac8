//! Stored user secrets (plain text, PostgreSQL md5 hashes, SCRAM-SHA-256
//! verifiers): parsing them from pgmux's config, deriving SCRAM verifiers the
//! way PostgreSQL does, and the MD5 challenge/response helpers. No I/O.

use std::borrow::Cow;
use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use md5::{Digest as _, Md5};
use sha2::Sha256;

use super::scram::{hmac_sha256, sha256};

const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";
const MD5_PREFIX: &str = "md5";

/// A user's secret as written in pgmux's config: plain text, `"md5"` + 32 hex
/// (md5(password || username)), or a SCRAM verifier
/// `"SCRAM-SHA-256$<iter>:<salt b64>$<StoredKey b64>:<ServerKey b64>"`.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Plain(String),
    /// The md5(password || user) digest.
    Md5([u8; 16]),
    Scram(ScramVerifier),
    /// A verifier with the ClientKey a client proved it holds: enough to log in to a server
    /// by SCRAM without the password. Never parsed from a config, only learned.
    ScramKeys {
        verifier: ScramVerifier,
        client_key: [u8; 32],
    },
}

// Hand-written so that a stray `{:?}` in a log line never prints a password.
impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Secret::Plain(<redacted>)"),
            Secret::Md5(_) => f.write_str("Secret::Md5(<redacted>)"),
            Secret::Scram(v) => f.debug_tuple("Secret::Scram").field(v).finish(),
            Secret::ScramKeys { .. } => f.write_str("Secret::ScramKeys(<redacted>)"),
        }
    }
}

impl Secret {
    /// Anything that is not a well-formed md5 hash or SCRAM verifier is taken
    /// as a plain-text password, which is how PostgreSQL classifies
    /// `rolpassword` too.
    pub fn parse(s: &str) -> Secret {
        if let Some(digest) = parse_md5_hash(s) {
            return Secret::Md5(digest);
        }
        match ScramVerifier::parse(s) {
            Some(v) => Secret::Scram(v),
            None => Secret::Plain(s.to_owned()),
        }
    }
}

/// PostgreSQL accepts only lowercase hex here; an uppercase one is a plain
/// password to it, so it is to us as well.
fn parse_md5_hash(s: &str) -> Option<[u8; 16]> {
    let hex = s.strip_prefix(MD5_PREFIX)?;
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        let [hi, lo] = pair else { return None };
        *byte = (lower_hex_value(*hi)? << 4) | lower_hex_value(*lo)?;
    }
    Some(out)
}

fn lower_hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn to_lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        for nibble in [b >> 4, b & 0x0f] {
            s.push(char::from(DIGITS[usize::from(nibble)]));
        }
    }
    s
}

/// A SCRAM-SHA-256 verifier, as stored in PostgreSQL's `pg_authid.rolpassword`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Parses PostgreSQL's text format. Iterations must be a positive decimal
    /// number, the salt non-empty, and both keys exactly 32 bytes.
    pub fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix(SCRAM_PREFIX)?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored_key, server_key) = keys.split_once(':')?;
        if iterations.is_empty() || !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let iterations = iterations.parse().ok().filter(|&i| i > 0)?;
        let salt = STANDARD.decode(salt).ok().filter(|s| !s.is_empty())?;
        Some(ScramVerifier {
            iterations,
            salt,
            stored_key: decode_key(stored_key)?,
            server_key: decode_key(server_key)?,
        })
    }

    /// Derives the verifier PostgreSQL would store for `password`. The
    /// password goes through [`saslprep`] first (see its limits). An
    /// iteration count of 0 is treated as 1, since 0 is not a valid verifier.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        let iterations = iterations.max(1);
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac_sha256(&salted, &[b"Client Key"]);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac_sha256(&salted, &[b"Server Key"]),
        }
    }
}

/// PostgreSQL's text format, so `ScramVerifier::parse(&v.to_string()) == Some(v)`.
impl fmt::Display for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCRAM_PREFIX}{}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key),
        )
    }
}

fn decode_key(b64: &str) -> Option<[u8; 32]> {
    // 32 bytes encode to 44 characters; refusing longer input up front keeps
    // a hostile config line from making us decode megabytes.
    if b64.len() != 44 {
        return None;
    }
    STANDARD.decode(b64).ok()?.try_into().ok()
}

/// SaltedPassword = Hi(SASLprep(password), salt, i) from RFC 5802.
pub fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let prepared = saslprep(password);
    pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(prepared.as_bytes(), salt, iterations.max(1))
}

/// SASLprep (RFC 4013) as PostgreSQL's `pg_saslprep` applies it, falling back
/// to the password as-is wherever PostgreSQL would.
///
/// Exact for ASCII passwords (used unchanged, as PostgreSQL does). For
/// non-ASCII ones this does the mapping step (non-ASCII spaces to U+0020,
/// "mapped to nothing" characters dropped) and the prohibited-character check,
/// but not NFKC normalization, the bidirectional check or the unassigned-code-
/// point check, which would need large Unicode tables. So a non-ASCII password
/// that NFKC would change (e.g. containing the ligature U+FB01) yields a
/// different verifier than PostgreSQL's; precomposed text such as "pässwörd"
/// is unaffected.
pub fn saslprep(password: &str) -> Cow<'_, str> {
    if password.is_ascii() {
        return Cow::Borrowed(password);
    }
    let mapped: String = password
        .chars()
        .filter_map(|c| {
            if is_non_ascii_space(c) {
                Some(' ')
            } else if is_mapped_to_nothing(c) {
                None
            } else {
                Some(c)
            }
        })
        .collect();
    // PostgreSQL refuses an empty result or a prohibited character by
    // reporting failure, and its callers then use the raw password.
    if mapped.is_empty() || mapped.chars().any(is_prohibited) {
        return Cow::Borrowed(password);
    }
    Cow::Owned(mapped)
}

fn in_ranges(c: char, ranges: &[(u32, u32)]) -> bool {
    let c = u32::from(c);
    ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

/// RFC 3454 table C.1.2.
fn is_non_ascii_space(c: char) -> bool {
    const RANGES: &[(u32, u32)] = &[
        (0x00A0, 0x00A0),
        (0x1680, 0x1680),
        (0x2000, 0x200B),
        (0x202F, 0x202F),
        (0x205F, 0x205F),
        (0x3000, 0x3000),
    ];
    in_ranges(c, RANGES)
}

/// RFC 3454 table B.1.
fn is_mapped_to_nothing(c: char) -> bool {
    const RANGES: &[(u32, u32)] = &[
        (0x00AD, 0x00AD),
        (0x034F, 0x034F),
        (0x1806, 0x1806),
        (0x180B, 0x180D),
        (0x200B, 0x200D),
        (0x2060, 0x2060),
        (0xFE00, 0xFE0F),
        (0xFEFF, 0xFEFF),
    ];
    in_ranges(c, RANGES)
}

/// RFC 3454 tables C.2 to C.9 (C.1.2 is mapped away before this check, and
/// C.5 surrogates cannot occur in a Rust `str`).
fn is_prohibited(c: char) -> bool {
    const RANGES: &[(u32, u32)] = &[
        (0x0000, 0x001F),
        (0x007F, 0x009F),
        (0x0340, 0x0341),
        (0x06DD, 0x06DD),
        (0x070F, 0x070F),
        (0x180E, 0x180E),
        (0x200C, 0x200F),
        (0x2028, 0x202E),
        (0x2060, 0x2063),
        (0x206A, 0x206F),
        (0x2FF0, 0x2FFB),
        (0xE000, 0xF8FF),
        (0xFDD0, 0xFDEF),
        (0xFEFF, 0xFEFF),
        (0xFFF9, 0xFFFD),
        (0x1D173, 0x1D17A),
        (0xE0001, 0xE0001),
        (0xE0020, 0xE007F),
        (0xF0000, 0xFFFFD),
        (0x100000, 0x10FFFD),
    ];
    let is_noncharacter = u32::from(c) & 0xFFFE == 0xFFFE;
    is_noncharacter || in_ranges(c, RANGES)
}

/// md5(password || user): the digest behind PostgreSQL's stored `"md5..."` form.
pub fn md5_secret(password: &str, user: &str) -> [u8; 16] {
    let mut hasher = Md5::new();
    hasher.update(password.as_bytes());
    hasher.update(user.as_bytes());
    hasher.finalize().into()
}

/// The response a client sends to AuthenticationMD5Password:
/// `"md5" + hex(md5(hex(md5(password || user)) || salt))`.
pub fn md5_response(secret_digest: &[u8; 16], salt: [u8; 4]) -> String {
    let mut hasher = Md5::new();
    hasher.update(to_lower_hex(secret_digest).as_bytes());
    hasher.update(salt);
    format!("{MD5_PREFIX}{}", to_lower_hex(&hasher.finalize()))
}

/// Checks a client's md5 PasswordMessage (without the trailing NUL) against a
/// stored Md5 or Plain secret in constant time. A SCRAM verifier cannot
/// answer an md5 challenge, so it always yields `false`.
pub fn md5_verify(secret: &Secret, user: &str, salt: [u8; 4], client_response: &[u8]) -> bool {
    let digest = match secret {
        Secret::Plain(password) => md5_secret(password, user),
        Secret::Md5(digest) => *digest,
        Secret::Scram(_) | Secret::ScramKeys { .. } => return false,
    };
    ct_eq(md5_response(&digest, salt).as_bytes(), client_response)
}

/// Equality whose running time does not depend on where the inputs differ,
/// so comparing secrets leaks nothing but their lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    // Produced by PostgreSQL 15 (`create role u1 password 'secret'` with
    // password_encryption = 'scram-sha-256', then 'md5' for u2).
    const PG_SCRAM_SECRET: &str = "SCRAM-SHA-256$4096:XCPLV/X0iWTJRucpVmJtpA==$zv9wo/mOPM5RLKtGckQGBQMrH7pIxn7cJGZiFMTquIw=:gau0ra3j/yd/9ofFsMLGrRRnpVO3emFC9JVlxp2hv7I=";
    const PG_MD5_SECRET_U2: &str = "md54489eed4ef8fbc7dd325ec0f630f2af1";

    // PostgreSQL 15 verifiers for passwords that exercise SASLprep, written
    // with E'' escapes: (password as PostgreSQL received it, verifier).
    const PG_SASLPREP_CASES: &[(&str, &str)] = &[
        // ASCII with a control character: used as-is.
        ("bad\x01ctl", "SCRAM-SHA-256$4096:ivMS+jShSd0SbjUy9oKnfg==$8bWj51+ZoJBz99Kl93SiFuA2N8RjVm2gW2d9y4Kbpdk=:dunf052lCKRPFhsJgnLuCqALvEVlJUPVB1nuIsUOeUs="),
        // No-break space mapped to U+0020.
        ("a\u{00A0}b", "SCRAM-SHA-256$4096:oJE8Uj5XnId8LEzWbzYHoA==$BMYh/Jf9usXQu5EawFBjbxyRlMfU4O1IByzIhhXiXzI=:VgIlzsAEufPXLgfP+QE6o31Gq9Uf8tOXDtUlRnMj6vw="),
        // Private-use character is prohibited: raw password.
        ("x\u{E000}", "SCRAM-SHA-256$4096:gg3Mxsn3orz9RiNQR2QdKA==$/nfQQSNmv+st+BmivPeNRpHr/vSMWyDPlukm0mMgjtM=:zsBHw+WIIikrj0KSBNMPQUuUETnGyM75D+Ng6IDdMGM="),
        // Soft hyphens mapped to nothing.
        ("\u{00AD}a\u{00AD}", "SCRAM-SHA-256$4096:bGhVlvBt4zZIc4j0Nd4nZw==$EyMHXB/pdyDShJv64S/c9KxZ8b4ZjnX5pEnQZSJWpkA=:Fo5f0nzGVojs8AELlO2qJBvIOvTOvgVID27Rkny4I0c="),
        // Maps to the empty string, which PostgreSQL refuses: raw password.
        ("\u{00AD}", "SCRAM-SHA-256$4096:1QlXCd+DcZwq/Kljm84CUw==$95M8ROSm48KYa3zQjF6e9RC+sQeBNJQkzUF/JI9Wha4=:e+P1UqNHDqHzBA3WjNVrd+OoRXa8iJ9zSYF6KRNvDDM="),
    ];

    fn pg_verifier() -> ScramVerifier {
        ScramVerifier::parse(PG_SCRAM_SECRET).unwrap()
    }

    #[test]
    fn parses_postgres_scram_verifier() {
        let v = pg_verifier();
        assert_eq!(v.iterations, 4096);
        assert_eq!(v.salt, STANDARD.decode("XCPLV/X0iWTJRucpVmJtpA==").unwrap());
        assert_eq!(v.to_string(), PG_SCRAM_SECRET);
        assert!(matches!(Secret::parse(PG_SCRAM_SECRET), Secret::Scram(p) if p == v));
    }

    #[test]
    fn from_password_matches_postgres() {
        let v = pg_verifier();
        assert_eq!(
            ScramVerifier::from_password("secret", &v.salt, v.iterations),
            v
        );
        assert_ne!(
            ScramVerifier::from_password("Secret", &v.salt, v.iterations),
            v
        );
    }

    #[test]
    fn saslprep_matches_postgres() {
        for (password, secret) in PG_SASLPREP_CASES {
            let v = ScramVerifier::parse(secret).unwrap();
            let ours = ScramVerifier::from_password(password, &v.salt, v.iterations);
            assert_eq!(ours, v, "password {password:?}");
        }
    }

    #[test]
    fn md5_secret_matches_postgres() {
        let Secret::Md5(digest) = Secret::parse(PG_MD5_SECRET_U2) else {
            panic!("not parsed as md5");
        };
        assert_eq!(md5_secret("secret", "u2"), digest);
        assert_eq!(format!("md5{}", to_lower_hex(&digest)), PG_MD5_SECRET_U2);
    }

    #[test]
    fn md5_response_known_vectors() {
        // python3: 'md5' + md5(md5(b'secretu2').hexdigest().encode() + salt).hexdigest()
        let digest = md5_secret("secret", "u2");
        assert_eq!(
            md5_response(&digest, [1, 2, 3, 4]),
            "md59986aa6c74a137c8e6e8673d0d17c21c"
        );
        let digest = md5_secret("secret", "u1");
        assert_eq!(
            md5_response(&digest, [0xde, 0xad, 0xbe, 0xef]),
            "md5060e5c5192b4aec42fec1c26a60bf8cb"
        );
    }

    #[test]
    fn md5_verify_plain_and_hashed() {
        let salt = [1, 2, 3, 4];
        let good = b"md59986aa6c74a137c8e6e8673d0d17c21c";
        let hashed = Secret::parse(PG_MD5_SECRET_U2);
        let plain = Secret::parse("secret");
        for secret in [&hashed, &plain] {
            assert!(md5_verify(secret, "u2", salt, good));
            assert!(!md5_verify(secret, "u2", [1, 2, 3, 5], good));
            assert!(!md5_verify(
                secret,
                "u2",
                salt,
                b"md59986aa6c74a137c8e6e8673d0d17c21d"
            ));
            assert!(!md5_verify(secret, "u2", salt, b""));
            assert!(!md5_verify(secret, "u2", salt, &good[..34]));
        }
        assert!(!md5_verify(&plain, "u1", salt, good));
        assert!(!md5_verify(&Secret::Scram(pg_verifier()), "u2", salt, good));
    }

    #[test]
    fn secret_parse_falls_back_to_plain() {
        let plain = [
            "",
            "secret",
            "md5",
            "md54489EED4EF8FBC7DD325EC0F630F2AF1",
            "md54489eed4ef8fbc7dd325ec0f630f2af",
            "md54489eed4ef8fbc7dd325ec0f630f2af1a",
            "md54489eed4ef8fbc7dd325ec0f630f2afg",
            "md5é489eed4ef8fbc7dd325ec0f630f2af",
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096:XCPLV/X0iWTJRucpVmJtpA==$zv9wo/mOPM5RLKtGckQGBQMrH7pIxn7cJGZiFMTquIw=",
            "SCRAM-SHA-256$0:XCPLV/X0iWTJRucpVmJtpA==$zv9wo/mOPM5RLKtGckQGBQMrH7pIxn7cJGZiFMTquIw=:gau0ra3j/yd/9ofFsMLGrRRnpVO3emFC9JVlxp2hv7I=",
            "SCRAM-SHA-256$+4096:XCPLV/X0iWTJRucpVmJtpA==$zv9wo/mOPM5RLKtGckQGBQMrH7pIxn7cJGZiFMTquIw=:gau0ra3j/yd/9ofFsMLGrRRnpVO3emFC9JVlxp2hv7I=",
            "SCRAM-SHA-256$99999999999:XCPLV/X0iWTJRucpVmJtpA==$zv9wo/mOPM5RLKtGckQGBQMrH7pIxn7cJGZiFMTquIw=:gau0ra3j/yd/9ofFsMLGrRRnpVO3emFC9JVlxp2hv7I=",
            "SCRAM-SHA-256$4096:$zv9wo/mOPM5RLKtGckQGBQMrH7pIxn7cJGZiFMTquIw=:gau0ra3j/yd/9ofFsMLGrRRnpVO3emFC9JVlxp2hv7I=",
            "SCRAM-SHA-256$4096:!!!!$zv9wo/mOPM5RLKtGckQGBQMrH7pIxn7cJGZiFMTquIw=:gau0ra3j/yd/9ofFsMLGrRRnpVO3emFC9JVlxp2hv7I=",
            "SCRAM-SHA-256$4096:XCPLV/X0iWTJRucpVmJtpA==$zv9wo/mOPM5RLKtGckQGBQMrH7pIxn7cJGZiFMTquI==:gau0ra3j/yd/9ofFsMLGrRRnpVO3emFC9JVlxp2hv7I=",
            "SCRAM-SHA-1$4096:XCPLV/X0iWTJRucpVmJtpA==$zv9wo/mOPM5RLKtGckQGBQMrH7pIxn7cJGZiFMTquIw=:gau0ra3j/yd/9ofFsMLGrRRnpVO3emFC9JVlxp2hv7I=",
        ];
        for s in plain {
            assert!(
                matches!(Secret::parse(s), Secret::Plain(p) if p == s),
                "{s:?}"
            );
        }
    }

    #[test]
    fn verifier_round_trips_through_text() {
        let v = ScramVerifier::from_password("pässwörd", b"0123456789abcdef", 16);
        assert_eq!(ScramVerifier::parse(&v.to_string()), Some(v));
        assert_eq!(ScramVerifier::from_password("x", b"salt", 0).iterations, 1);
    }

    #[test]
    fn debug_does_not_leak_passwords() {
        let shown = format!(
            "{:?}{:?}",
            Secret::parse("hunter2"),
            Secret::parse(PG_MD5_SECRET_U2)
        );
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("4489eed4"));
    }

    #[test]
    fn ct_eq_basics() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
