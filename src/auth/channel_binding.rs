//! SCRAM channel binding of type tls-server-end-point (RFC 5929): the hash of the server's
//! TLS certificate, which both ends of a TLS connection can compute and a man in the middle
//! with another certificate cannot match. PostgreSQL offers SCRAM-SHA-256-PLUS with it; so
//! does pgmux to TLS clients, and pgmux uses it with servers that offer it.

use sha2::{Digest as _, Sha256, Sha384, Sha512};

/// The mechanism name with channel binding.
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only binding type PostgreSQL supports.
pub const TYPE: &str = "tls-server-end-point";

/// The certificate hash: the hash function of the certificate's signature algorithm, with
/// MD5 and SHA-1 raised to SHA-256 (RFC 5929 section 4.1). None for signature algorithms
/// that name no single hash (Ed25519, RSASSA-PSS), for which PostgreSQL offers no binding
/// either, and for anything that does not parse as a certificate.
pub fn end_point_hash(cert_der: &[u8]) -> Option<Vec<u8>> {
    let hash = match signature_oid(cert_der)? {
        // sha1/md5 WithRSAEncryption, ecdsa-with-SHA1, and the SHA-256 ones
        [.., 0x01, 0x01, 0x04 | 0x05 | 0x0b] | [.., 0x3d, 0x04, 0x01] | [.., 0x04, 0x03, 0x02] => {
            Sha256::digest(cert_der).to_vec()
        }
        [.., 0x01, 0x01, 0x0c] | [.., 0x04, 0x03, 0x03] => Sha384::digest(cert_der).to_vec(),
        [.., 0x01, 0x01, 0x0d] | [.., 0x04, 0x03, 0x04] => Sha512::digest(cert_der).to_vec(),
        _ => return None,
    };
    Some(hash)
}

/// The OID of Certificate.signatureAlgorithm, if it is one of the RSA PKCS#1
/// (1.2.840.113549.1.1.x) or ECDSA (1.2.840.10045.4.x) families.
fn signature_oid(der: &[u8]) -> Option<&[u8]> {
    use crate::tls::der_next;
    let (tag, cert, _) = der_next(der)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _tbs, rest) = der_next(cert)?;
    let (tag, alg, _) = der_next(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = der_next(alg)?;
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let known = (oid.len() == RSA.len() + 1 && oid.starts_with(RSA))
        || ((oid.len() == ECDSA.len() + 1 || oid.len() == ECDSA.len() + 2)
            && oid.starts_with(ECDSA));
    (tag == 0x06 && known).then_some(oid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn hash_follows_the_signature_algorithm() {
        let p256 = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(end_point_hash(&p256), Some(Sha256::digest(&p256).to_vec()));
        let p384 = cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(end_point_hash(&p384), Some(Sha384::digest(&p384).to_vec()));
        assert_eq!(end_point_hash(&cert(&rcgen::PKCS_ED25519)), None);
    }

    #[test]
    fn garbage_is_no_certificate() {
        for b in [&b""[..], b"\x30", b"\x30\x03\x02\x01\x00", b"\xff\xff\xff"] {
            assert_eq!(end_point_hash(b), None);
        }
    }
}
