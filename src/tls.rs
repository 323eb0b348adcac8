//! TLS on both sides (issue 7), with rustls and its ring provider.
//!
//! Clients: the first bytes of a connection decide how it opens ([`open`]): an SSLRequest is
//! answered `S` and the handshake follows (unless bytes were pipelined behind the request, the
//! CVE-2021-23222 class), a TLS ClientHello straight away (PostgreSQL 17's
//! `sslnegotiation=direct`, ALPN `postgresql`) is served as is, anything else is plain. The
//! client's stream is then a [`ClientStream`], an enum so plain clients pay one branch per
//! poll and no dynamic dispatch.
//!
//! Servers: [`connect_server`] sends SSLRequest and upgrades per `server_tls_sslmode`, with
//! libpq's meanings (prefer falls back to plain, require encrypts without checking the
//! certificate, verify-ca checks the chain, verify-full the chain and the host name).
//!
//! The TLS settings are loaded (certificate files read, rustls configs built) whenever a
//! configuration is parsed, so a bad file fails `--check` and a reload. The server side's
//! config is process-wide ([`install`]) because every server connection, pooled or made by
//! the topology monitor, must follow the configuration in force.

use crate::config::General;
use crate::endpoint::{ClientAddr, ClientSocket};
use crate::protocol::startup::{self, Initial, StartupError};
use crate::protocol::PgError;
use arc_swap::ArcSwapOption;
use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_rustls::rustls::{
    self,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    server::WebPkiClientVerifier,
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// ALPN protocol name PostgreSQL 17 requires for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";
/// The first byte of a TLS handshake record: a client opening with TLS directly.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Bound on writing a refusal to a client that may have stopped reading.
const REFUSAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// `client_tls_sslmode`, PgBouncer's names: allow and prefer both accept TLS when the client
/// asks; require refuses clients that do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientSslMode {
    Disable,
    Allow,
    Prefer,
    Require,
}

/// `server_tls_sslmode`, with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerSslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Setup(String),
    #[error("server does not support SSL, but server_tls_sslmode requires it")]
    ServerRefusedSsl,
    #[error("server answered SSLRequest with byte {0:#04x}")]
    BadSslResponse(u8),
    #[error("TLS handshake with server failed: {0}")]
    Handshake(io::Error),
    #[error("i/o error before the TLS handshake: {0}")]
    Io(#[from] io::Error),
}

/// The TLS and hba settings of one configuration, loaded and ready.
#[derive(Clone, Default)]
pub struct Security {
    pub client: Option<Arc<ClientTls>>,
    pub server: Option<Arc<ServerTls>>,
    pub hba: Option<Arc<crate::auth::hba::Hba>>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("client", &self.client.as_ref().map(|c| c.mode))
            .field("server", &self.server.as_ref().map(|s| s.mode))
            .field("hba", &self.hba.is_some())
            .finish()
    }
}

pub struct ClientTls {
    pub mode: ClientSslMode,
    acceptor: TlsAcceptor,
    /// Checks a client's certificate chain against client_tls_ca_file once the handshake is
    /// done (the handshake itself lets any certificate through: [`ClientCerts`]).
    client_certs: Option<Arc<dyn ClientCertVerifier>>,
    /// SCRAM channel binding data of our certificate (tls-server-end-point), if it has one.
    end_point: EndPoint,
}

pub struct ServerTls {
    pub mode: ServerSslMode,
    connector: TlsConnector,
}

impl Security {
    /// Reads the certificate, key, CA and hba files the settings name.
    pub fn load(g: &General) -> Result<Security, String> {
        let client = match g.client_tls_sslmode {
            ClientSslMode::Disable => None,
            mode => {
                let (acceptor, client_certs, end_point) =
                    client_acceptor(g).map_err(|e| format!("client TLS: {e}"))?;
                Some(Arc::new(ClientTls {
                    mode,
                    acceptor,
                    client_certs,
                    end_point,
                }))
            }
        };
        let server = match g.server_tls_sslmode {
            ServerSslMode::Disable => None,
            mode => Some(Arc::new(ServerTls {
                mode,
                connector: server_connector(g, mode).map_err(|e| format!("server TLS: {e}"))?,
            })),
        };
        let hba = match g.auth_hba_file.as_str() {
            "" => None,
            path => Some(Arc::new(crate::auth::hba::Hba::load(path)?)),
        };
        Ok(Security {
            client,
            server,
            hba,
        })
    }

    /// client_tls_sslmode = require: a client that did not ask for TLS is refused.
    pub fn client_requires_tls(&self) -> bool {
        self.client
            .as_ref()
            .is_some_and(|c| c.mode == ClientSslMode::Require)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |e: rustls::pki_types::pem::Error| TlsError::File {
        path: path.to_string(),
        message: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(file_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_err)?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.to_string(),
            message: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_string(),
        message: e.to_string(),
    })
}

fn read_roots(path: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(path)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Setup(format!("{path}: {e}")))?;
    }
    Ok(roots)
}

fn setup(e: impl std::fmt::Display) -> TlsError {
    TlsError::Setup(e.to_string())
}

/// A certificate's tls-server-end-point hash, when it has one (SCRAM channel binding).
pub type EndPoint = Option<Arc<[u8]>>;

type ClientAcceptor = (TlsAcceptor, Option<Arc<dyn ClientCertVerifier>>, EndPoint);

fn client_acceptor(g: &General) -> Result<ClientAcceptor, TlsError> {
    if g.client_tls_cert_file.is_empty() || g.client_tls_key_file.is_empty() {
        return Err(setup(
            "client_tls_sslmode other than disable needs client_tls_cert_file and client_tls_key_file",
        ));
    }
    let certs = read_certs(&g.client_tls_cert_file)?;
    let end_point = certs
        .first()
        .and_then(|c| crate::auth::channel_binding::end_point_hash(c))
        .map(Arc::from);
    let key = read_key(&g.client_tls_key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(setup)?;
    let (builder, client_certs) = if g.client_tls_ca_file.is_empty() {
        (builder.with_no_client_auth(), None)
    } else {
        // Certificates are asked for, not demanded: only the hba method `cert` needs one.
        let chain: Arc<dyn ClientCertVerifier> = WebPkiClientVerifier::builder_with_provider(
            Arc::new(read_roots(&g.client_tls_ca_file)?),
            provider(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(setup)?;
        let lenient = Arc::new(ClientCerts {
            chain: chain.clone(),
        });
        (builder.with_client_cert_verifier(lenient), Some(chain))
    };
    let mut config = builder.with_single_cert(certs, key).map_err(setup)?;
    // Required for direct TLS; clients negotiating with SSLRequest may send it or not, and
    // rustls only refuses a client that offers ALPN without "postgresql".
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), client_certs, end_point))
}

fn server_connector(g: &General, mode: ServerSslMode) -> Result<TlsConnector, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(setup)?;
    let algorithms = provider().signature_verification_algorithms;
    let builder = match mode {
        ServerSslMode::VerifyCa | ServerSslMode::VerifyFull => {
            if g.server_tls_ca_file.is_empty() {
                return Err(setup(
                    "server_tls_sslmode verify-ca and verify-full need server_tls_ca_file",
                ));
            }
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(read_roots(&g.server_tls_ca_file)?),
                provider(),
            )
            .build()
            .map_err(setup)?;
            let verifier = ChainVerifier {
                inner: webpki,
                check_name: mode == ServerSslMode::VerifyFull,
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
        }
        // libpq's prefer and require encrypt without checking who is at the other end
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert { algorithms })),
    };
    let mut config = match (
        g.server_tls_cert_file.is_empty(),
        g.server_tls_key_file.is_empty(),
    ) {
        (true, true) => builder.with_no_client_auth(),
        (false, false) => builder
            .with_client_auth_cert(
                read_certs(&g.server_tls_cert_file)?,
                read_key(&g.server_tls_key_file)?,
            )
            .map_err(setup)?,
        _ => {
            return Err(setup(
                "server_tls_cert_file and server_tls_key_file go together",
            ))
        }
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// verify-ca and verify-full: the chain must lead to the CA file; the host name must match
/// only under verify-full.
#[derive(Debug)]
struct ChainVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // webpki checks the name only after the chain, so this error means a good chain
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client certificates in the handshake. libpq sends `~/.postgresql/postgresql.crt` whenever
/// it exists, whatever the hba method, and X.509 v1 certificates (what `openssl x509 -req`
/// makes without extensions) are common there; webpki cannot read v1 at all. Failing the
/// handshake would lock out users who need no certificate, so a certificate that does not
/// verify is let through here and checked again after the handshake ([`handshake`]): only one
/// that chains to client_tls_ca_file names the client for the `cert` method.
///
/// The handshake's signature, which proves the client holds the certificate's key, is still
/// checked; only for a certificate webpki cannot read is it skipped, and such a certificate
/// can never verify afterwards, so it never names anyone.
#[derive(Debug)]
struct ClientCerts {
    chain: Arc<dyn ClientCertVerifier>,
}

impl ClientCerts {
    fn signature(
        &self,
        cert: &CertificateDer<'_>,
        checked: Result<HandshakeSignatureValid, rustls::Error>,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match checked {
            Err(_) if webpki::EndEntityCert::try_from(cert).is_err() => {
                Ok(HandshakeSignatureValid::assertion())
            }
            r => r,
        }
    }
}

impl ClientCertVerifier for ClientCerts {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(cert, self.chain.verify_tls12_signature(message, cert, dss))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(cert, self.chain.verify_tls13_signature(message, cert, dss))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// prefer and require: any certificate, though the handshake's signatures are still checked
/// (they bind the session to the certificate's key) when webpki can read the certificate.
/// An X.509 v1 certificate (what `openssl x509 -req` makes, as in PostgreSQL's manual) it
/// cannot read: libpq connects to such a server under these modes, so pgmux does too. That
/// skipped check proves nothing these modes rely on: whoever is at the other end chose the
/// certificate, and SCRAM channel binding still compares its hash with the server's.
#[derive(Debug)]
struct AnyCert {
    algorithms: WebPkiSupportedAlgorithms,
}

/// Whether the check failed because the certificate is X.509 v1, which webpki cannot read.
fn unreadable(
    r: &Result<HandshakeSignatureValid, rustls::Error>,
    cert: &CertificateDer<'_>,
) -> bool {
    r.is_err()
        && matches!(
            webpki::EndEntityCert::try_from(cert),
            Err(webpki::Error::UnsupportedCertVersion)
        )
}

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms) {
            r if unreadable(&r, cert) => Ok(HandshakeSignatureValid::assertion()),
            r => r,
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms) {
            r if unreadable(&r, cert) => Ok(HandshakeSignatureValid::assertion()),
            r => r,
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------
// Clients

/// What the login needs to know about how a client reached pgmux.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: ClientAddr,
    pub tls: bool,
    /// The common name of the client's certificate, verified against client_tls_ca_file.
    pub cert_cn: Option<String>,
    /// Over TLS, the channel binding data SCRAM-SHA-256-PLUS binds to.
    pub tls_end_point: EndPoint,
}

/// A client connection: plain or TLS over TCP, or a Unix-domain socket.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Boxed: beside the other two it would cost every session 8 bytes of discriminant.
    Unix(Box<UnixStream>),
}

impl ClientStream {
    /// Resolves when the client has hung up: end of stream, or nothing but a Terminate
    /// (`said_bye`: the next bytes would start a message). Stays pending once it has sent
    /// anything else, which is served when the wait ends. For a client waiting for a
    /// server: one that left is taken out of the line instead of being handed a server.
    /// Under TLS and on a Unix socket only the end of stream is seen.
    pub async fn hangup(&self, said_bye: bool) {
        if let ClientStream::Tls(tls) = self {
            // boxed: only a TLS client's wait holds its timer
            return Box::pin(tls_hangup(tls.get_ref().0)).await;
        }
        let mut spoke = false;
        std::future::poll_fn(|cx| self.poll_hangup(cx, said_bye, &mut spoke)).await
    }

    /// `hangup` as a poll, so a wait can watch for it without allocating a future: `spoke`
    /// is set once the client has sent something else, and from then on this stays
    /// pending without looking again.
    fn poll_hangup(&self, cx: &mut Context<'_>, said_bye: bool, spoke: &mut bool) -> Poll<()> {
        const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];
        if *spoke {
            return Poll::Pending;
        }
        let mut b = [0u8; 5];
        let mut peek = |tcp: &TcpStream| {
            let mut rb = ReadBuf::new(&mut b);
            tcp.poll_peek(cx, &mut rb)
        };
        let left = match self {
            ClientStream::Plain(tcp) => match std::task::ready!(peek(tcp)) {
                Ok(0) | Err(_) => true,
                Ok(n) => said_bye && n == 5 && b == TERMINATE,
            },
            // `tls_hangup`
            ClientStream::Tls(_) => return Poll::Pending,
            ClientStream::Unix(unix) => loop {
                if std::task::ready!(unix.poll_read_ready(cx)).is_err() {
                    break true;
                }
                // (only the end of stream: peeked bytes come uninitialised-typed here)
                let peeked = unix.try_io(tokio::io::Interest::READABLE, || {
                    let mut raw = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                    socket2::SockRef::from(&**unix).peek(&mut raw)
                });
                match peeked {
                    Ok(n) => break n == 0,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => break true,
                }
            },
        };
        if left {
            return Poll::Ready(());
        }
        *spoke = true;
        Poll::Pending
    }
}

/// How often a TLS client with unread records is looked at while it waits (`tls_hangup`).
const TLS_HANGUP_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

/// A TLS client's end of stream. Its unread bytes are records only rustls can read: data, or
/// the close_notify a client sends just before it closes. While some wait in the socket its
/// end of stream (a FIN behind them) shows in the connection's state alone, which is looked
/// at every [`TLS_HANGUP_CHECK`].
async fn tls_hangup(tcp: &TcpStream) {
    let mut b = [0u8; 1];
    loop {
        match tcp.peek(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(_) if peer_closed(tcp) => return,
            Ok(_) => tokio::time::sleep(TLS_HANGUP_CHECK).await,
        }
    }
}

/// Whether the peer has closed its side of `tcp` (its FIN came), by the kernel's state of the
/// connection: CLOSE_WAIT.
#[cfg(target_os = "linux")]
fn peer_closed(tcp: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    const TCP_CLOSE_WAIT: u8 = 8;
    // SAFETY: tcp_info is plain integers, for which zeroes are valid, and the kernel writes
    // at most `len` bytes of it
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    rc == 0 && info.tcpi_state == TCP_CLOSE_WAIT
}

#[cfg(not(target_os = "linux"))]
fn peer_closed(_: &TcpStream) -> bool {
    false
}

/// A client whose encryption is settled, and the first packet it sent after that.
pub struct Opened {
    pub stream: ClientStream,
    pub first: Initial,
    pub peer: Peer,
}

/// Why a connection ended before its startup packet; anything the client should be told
/// has already been written.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Startup(#[from] StartupError),
    #[error("{0}")]
    Refused(String),
    #[error("authentication timeout")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    #[error("direct TLS connection without ALPN protocol \"postgresql\"")]
    NoAlpn,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl OpenError {
    /// Ends that say nothing about the client's intent (a probe that connects and leaves, a
    /// failed handshake) are not worth a warning.
    pub fn is_quiet(&self) -> bool {
        matches!(
            self,
            OpenError::Startup(StartupError::Closed | StartupError::Io(_))
                | OpenError::Io(_)
                | OpenError::Handshake(_)
        )
    }
}

/// Settles encryption with a new client: SSLRequest and GSSENCRequest are answered (`S` when
/// client TLS is on), a direct TLS ClientHello is served, and the first packet that is
/// neither is returned with the stream it came on. A Unix-socket client gets no TLS (libpq
/// asks for none there; PostgreSQL offers none).
pub async fn open(
    security: &Security,
    socket: ClientSocket,
    addr: ClientAddr,
    deadline: Option<Instant>,
) -> Result<Opened, OpenError> {
    let mut peer = Peer {
        addr,
        tls: false,
        cert_cn: None,
        tls_end_point: None,
    };
    let mut tcp = match socket {
        ClientSocket::Tcp(tcp) => tcp,
        ClientSocket::Unix(unix) => return open_unix(unix, peer, deadline).await,
    };
    if let Some(tls) = &security.client {
        let mut b = [0u8; 1];
        let peeked = match within(deadline, tcp.peek(&mut b)).await {
            Ok(r) => r?,
            Err(_) => {
                refuse(&mut tcp, timeout_error()).await;
                return Err(OpenError::Timeout);
            }
        };
        if peeked == 1 && b[0] == TLS_HANDSHAKE_RECORD {
            let s = within(deadline, handshake(tls, tcp, &mut peer))
                .await
                .map_err(|_| OpenError::Timeout)??;
            if s.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
                return Err(OpenError::NoAlpn);
            }
            return after_handshake(s, peer, deadline).await;
        }
    }
    // one SSLRequest and one GSSENCRequest at most, as libpq may send both
    for _ in 0..2 {
        match read_first(&mut tcp, deadline).await? {
            Initial::SslRequest if security.client.is_some() => {
                if has_buffered(&tcp)? {
                    let error =
                        PgError::fatal("08P01", "received unencrypted data after SSL request");
                    refuse(&mut tcp, error.clone()).await;
                    return Err(OpenError::Refused(error.message));
                }
                tcp.write_all(b"S").await?;
                let tls = security.client.as_ref().expect("checked above");
                let s = within(deadline, handshake(tls, tcp, &mut peer))
                    .await
                    .map_err(|_| OpenError::Timeout)??;
                return after_handshake(s, peer, deadline).await;
            }
            Initial::SslRequest | Initial::GssEncRequest => tcp.write_all(b"N").await?,
            first => {
                return Ok(Opened {
                    stream: ClientStream::Plain(tcp),
                    first,
                    peer,
                })
            }
        }
    }
    let first = read_first(&mut tcp, deadline).await?;
    Ok(Opened {
        stream: ClientStream::Plain(tcp),
        first,
        peer,
    })
}

/// Answers `N` to a Unix-socket client's encryption requests (one of each at most, as on
/// TCP) and returns its first other packet.
async fn open_unix(
    mut unix: UnixStream,
    peer: Peer,
    deadline: Option<Instant>,
) -> Result<Opened, OpenError> {
    let mut requests = 0;
    let first = loop {
        match read_first(&mut unix, deadline).await? {
            Initial::SslRequest | Initial::GssEncRequest if requests < 2 => {
                requests += 1;
                unix.write_all(b"N").await?;
            }
            first => break first,
        }
    };
    Ok(Opened {
        stream: ClientStream::Unix(Box::new(unix)),
        first,
        peer,
    })
}

/// Reads an initial packet within the deadline; a malformed or late one gets its FATAL
/// (08P01, or 0A000 for another protocol version) here, since the caller has no stream left to
/// say it on.
async fn read_first<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    deadline: Option<Instant>,
) -> Result<Initial, OpenError> {
    match within(deadline, startup::read_initial(s)).await {
        Ok(Ok(i)) => Ok(i),
        Ok(Err(e @ (StartupError::Closed | StartupError::Io(_)))) => Err(e.into()),
        Ok(Err(e)) => {
            let error = PgError::fatal(e.sqlstate(), e.to_string());
            refuse(s, error).await;
            Err(e.into())
        }
        Err(_) => {
            refuse(s, timeout_error()).await;
            Err(OpenError::Timeout)
        }
    }
}

fn timeout_error() -> PgError {
    PgError::fatal("08P01", "authentication timeout")
}

/// Tells the client why it is closed, within a bound of its own (the deadline may be past).
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, error: PgError) {
    let mut out = BytesMut::new();
    error.encode(&mut out);
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        if s.write_all(&out).await.is_ok() {
            linger(s).await;
        }
    })
    .await;
}

async fn within<F: std::future::Future>(
    deadline: Option<Instant>,
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f).await,
        None => Ok(f.await),
    }
}

/// True when the client sent more than its SSLRequest before our answer: those bytes would
/// be taken as if they had come through TLS (CVE-2021-23222).
fn has_buffered(tcp: &TcpStream) -> io::Result<bool> {
    let mut b = [0u8; 1];
    match tcp.try_read(&mut b) {
        Ok(n) => Ok(n > 0),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// Closes after a refusal without resetting: unread bytes at close would make the kernel send
/// RST, which can discard the error before the client reads it. Up to 64 KiB are drained,
/// within the caller's time bound.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    if s.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match s.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn handshake(
    tls: &ClientTls,
    tcp: TcpStream,
    peer: &mut Peer,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, OpenError> {
    let s = tls
        .acceptor
        .accept(tcp)
        .await
        .map_err(OpenError::Handshake)?;
    peer.tls = true;
    peer.tls_end_point = tls.end_point.clone();
    peer.cert_cn = match (s.get_ref().1.peer_certificates(), &tls.client_certs) {
        (Some([leaf, intermediates @ ..]), Some(chain)) => {
            match chain.verify_client_cert(leaf, intermediates, UnixTime::now()) {
                Ok(_) => subject_common_name(leaf),
                Err(e) => {
                    tracing::info!(peer = %peer.addr, "client certificate not accepted, ignored: {e}");
                    None
                }
            }
        }
        _ => None,
    };
    Ok(s)
}

async fn after_handshake(
    s: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
    deadline: Option<Instant>,
) -> Result<Opened, OpenError> {
    let mut stream = ClientStream::Tls(Box::new(s));
    let first = read_first(&mut stream, deadline).await?;
    Ok(Opened {
        stream,
        first,
        peer,
    })
}

macro_rules! either {
    ($self:expr, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Self::Plain($s) => $e,
            Self::Tls($s) => $e,
            Self::Unix($s) => $e,
        }
    };
}

macro_rules! stream_impls {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                either!(self, s => Pin::new(s).poll_read(cx, buf))
            }
        }

        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                either!(self, s => Pin::new(s).poll_write(cx, buf))
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                either!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Plain(s) => s.is_write_vectored(),
                    Self::Tls(s) => s.is_write_vectored(),
                    Self::Unix(s) => s.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                either!(self, s => Pin::new(s).poll_flush(cx))
            }

            fn poll_shutdown(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                either!(self, s => Pin::new(s).poll_shutdown(cx))
            }
        }
    };
}

stream_impls!(ClientStream);
stream_impls!(ServerStream);

// ---------------------------------------------------------------------------------------
// Servers

/// The server side's settings in force (see the module comment for why this is global).
static SERVER_TLS: ArcSwapOption<ServerTls> = ArcSwapOption::const_empty();

/// Puts a configuration's server TLS settings in force for new server connections.
pub fn install(security: &Security) {
    SERVER_TLS.store(security.server.clone());
}

/// A server connection: plain or TLS over TCP, or PostgreSQL's Unix-domain socket.
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl ServerStream {
    /// The local TCP address; None on a Unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            ServerStream::Plain(s) => s.local_addr().ok(),
            ServerStream::Tls(s) => s.get_ref().0.local_addr().ok(),
            ServerStream::Unix(_) => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ServerStream::Tls(_))
    }

    /// Over TLS, the tls-server-end-point hash of the server's certificate, for SCRAM
    /// channel binding.
    pub fn tls_end_point(&self) -> Option<Vec<u8>> {
        match self {
            ServerStream::Plain(_) | ServerStream::Unix(_) => None,
            ServerStream::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| crate::auth::channel_binding::end_point_hash(c)),
        }
    }

    /// True when the server closed the connection or sent something unprompted while it sat
    /// idle. Under TLS the bytes are only peeked: they are records rustls must decrypt, and
    /// any record at all on an idle connection (an alert, a FATAL error) means it is done.
    pub fn is_broken(&self) -> bool {
        match self {
            ServerStream::Plain(s) => {
                let mut b = [0u8; 1];
                !matches!(s.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            ServerStream::Unix(s) => {
                let mut b = [0u8; 1];
                !matches!(s.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            ServerStream::Tls(s) => {
                let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                let sock = socket2::SockRef::from(s.get_ref().0);
                // the socket is non-blocking (tokio's), so an empty one says WouldBlock
                !matches!(sock.peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Writes what the socket takes now, without waiting: a last message before the stream
    /// is dropped. Under TLS it is encrypted, followed by close_notify.
    pub fn write_now(&mut self, b: &[u8]) {
        match self {
            ServerStream::Plain(s) => {
                let _ = s.try_write(b);
            }
            ServerStream::Unix(s) => {
                let _ = s.try_write(b);
            }
            ServerStream::Tls(s) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let _ = Pin::new(&mut **s).poll_write(&mut cx, b);
                s.get_mut().1.send_close_notify();
                let _ = Pin::new(&mut **s).poll_flush(&mut cx);
            }
        }
    }
}

/// The host name a server certificate must carry under verify-full; an address is matched
/// against the certificate's IP addresses instead, as libpq does.
fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_string())
        .map_err(|e| TlsError::Setup(format!("server host {host:?}: {e}")))
}

/// Whether server_tls_sslmode is prefer: a connection whose TLS handshake or login fails is
/// made again in plain text, once, as libpq does (a server whose pg_hba.conf says
/// `hostnossl` for this user refuses the login over TLS).
pub fn server_tls_preferred() -> bool {
    SERVER_TLS
        .load()
        .as_ref()
        .is_some_and(|t| t.mode == ServerSslMode::Prefer)
}

/// Sends SSLRequest and upgrades the connection as server_tls_sslmode says; `plain` (the
/// retry of a preferred TLS connection that failed) skips it.
pub async fn connect_server(
    mut tcp: TcpStream,
    host: &str,
    plain: bool,
) -> Result<ServerStream, TlsError> {
    let tls = match SERVER_TLS.load_full() {
        Some(tls) if !plain => tls,
        _ => return Ok(ServerStream::Plain(tcp)),
    };
    tcp.write_all(&SSL_REQUEST).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {}
        b'N' if tls.mode == ServerSslMode::Prefer => return Ok(ServerStream::Plain(tcp)),
        b'N' => return Err(TlsError::ServerRefusedSsl),
        other => return Err(TlsError::BadSslResponse(other)),
    }
    let s = tls
        .connector
        .connect(server_name(host)?, tcp)
        .await
        .map_err(TlsError::Handshake)?;
    Ok(ServerStream::Tls(Box::new(s)))
}

// ---------------------------------------------------------------------------------------
// Certificates

/// The subject's common name (OID 2.5.4.3) of a DER certificate, which names the user for
/// the hba method `cert` as PostgreSQL's default `clientname=CN` does. A small DER walk, as
/// rustls parses certificates but does not expose their subject.
pub fn subject_common_name(der: &[u8]) -> Option<String> {
    let (tag, cert, _) = der_next(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = der_next(cert)?;
    if tag != 0x30 {
        return None;
    }
    let mut fields = Vec::with_capacity(7);
    let mut rest = tbs;
    while fields.len() < 7 && !rest.is_empty() {
        let (tag, content, r) = der_next(rest)?;
        fields.push((tag, content));
        rest = r;
    }
    // [0] version is optional; then serial, signature, issuer, validity, subject
    let skip = usize::from(fields.first()?.0 == 0xa0);
    let (tag, mut subject) = *fields.get(skip + 4)?;
    if tag != 0x30 {
        return None;
    }
    while !subject.is_empty() {
        let (_set, mut rdn, r) = der_next(subject)?;
        subject = r;
        while !rdn.is_empty() {
            let (_seq, attr, r) = der_next(rdn)?;
            rdn = r;
            let (tag, oid, value) = der_next(attr)?;
            if tag == 0x06 && oid == [0x55, 0x04, 0x03] {
                let (tag, v, _) = der_next(value)?;
                // UTF8String, PrintableString, TeletexString, IA5String
                if matches!(tag, 0x0c | 0x13 | 0x14 | 0x16) {
                    return String::from_utf8(v.to_vec()).ok();
                }
                return None;
            }
        }
    }
    None
}

/// One DER element: its tag, its content, and what follows it.
pub(crate) fn der_next(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, head) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    if end > b.len() {
        return None;
    }
    Some((tag, &b[head..end], &b[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_name_of_a_generated_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "pgmux tests");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cert_user");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            subject_common_name(cert.der()).as_deref(),
            Some("cert_user")
        );

        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(subject_common_name(cert.der()), None);
    }

    #[test]
    fn truncated_der_is_refused() {
        assert_eq!(der_next(&[0x30, 0x05, 1, 2]), None);
        assert_eq!(der_next(&[0x30, 0x81]), None);
        assert_eq!(subject_common_name(&[0x30, 0x00]), None);
        assert_eq!(subject_common_name(b""), None);
    }

    #[test]
    fn modes_parse_with_libpq_names() {
        #[derive(Deserialize)]
        struct T {
            c: ClientSslMode,
            s: ServerSslMode,
        }
        let t: T = toml::from_str("c = 'require'\ns = 'verify-full'").unwrap();
        assert_eq!(t.c, ClientSslMode::Require);
        assert_eq!(t.s, ServerSslMode::VerifyFull);
        assert!(toml::from_str::<T>("c = 'verify-full'\ns = 'allow'").is_err());
    }
}
