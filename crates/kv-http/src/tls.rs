//! TLS (issue 14) for kv-node and kv-proxy, both sides: the port's
//! acceptor and the clients that talk to nodes, on rustls (tokio-rustls,
//! the `ring` provider; PEM read with `rustls-pki-types`' `PemObject`).
//!
//! * **Flags** ([`TlsArgs`]): `--tls-cert`/`--tls-key` (PEM; the chain,
//!   leaf first, and its private key) make the port speak TLS, HTTP/1.1
//!   inside (ALPN `http/1.1`). `--tls-ca` (PEM) is what the process's own
//!   clients verify servers against (a node's peers and forwards, the
//!   proxy's nodes, kv-bench's targets): with it, they speak TLS to every
//!   address they are given. Each has an environment variable (`KV_TLS_CERT`,
//!   `KV_TLS_KEY`, `KV_TLS_CA`).
//! * **Mutual TLS between nodes.** A process with a certificate *and* a CA
//!   presents its certificate as a client too, and its port asks every
//!   client for one, verified against the CA, but does not require it: an
//!   external client (curl with `--cacert` only) still connects. What a
//!   connection proved is [`ClientCert`], handed to the service with the
//!   connection; kv-node refuses node-to-node paths (`/-/raft/...`,
//!   `/-/meta/...`, forwarded requests) with 403 on a connection without a
//!   verified client certificate ([`ClientCert::require`]). The cluster
//!   token, when set, is checked on top (a certificate signed by the CA
//!   alone does not open the keys to a client without the token).
//! * **Reload.** [`Tls::reload`] (on SIGHUP, [`reload_on_sighup`]) reads the
//!   files again and swaps the configurations; each new handshake reads the
//!   current one, and established connections keep theirs, so none is
//!   dropped. A file that does not load keeps the old configuration, and
//!   the error is logged.
//! * **Plain HTTP on a TLS port** is recognised from its first byte (a TLS
//!   handshake record starts with 0x16, an HTTP method with a letter): it is
//!   answered with a 400 JSON in plain text and closed. The handshake, like a
//!   request head, must finish within the header timeout.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::error::ApiError;

/// The first byte of a TLS record carrying a handshake message.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The flags, shared by kv-node, kv-proxy (flattened into theirs) and
/// kv-bench (`--tls-ca` only).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Serve TLS on the port with this certificate chain (PEM, leaf first);
    /// needs --tls-key. With --tls-ca too, it is also this process's client
    /// certificate to its peers (mutual TLS between nodes).
    #[arg(long, env = "KV_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "KV_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,

    /// The CA (PEM) this process's clients verify servers against, speaking
    /// TLS to every node they talk to; with --tls-cert, the port also asks
    /// clients for a certificate signed by it (required on node-to-node
    /// paths, optional elsewhere).
    #[arg(long, env = "KV_TLS_CA", value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS settings, or `None` when no flag is given (plain HTTP).
    pub fn load(&self) -> Result<Option<Arc<Tls>>, TlsError> {
        if self.tls_cert.is_none() && self.tls_key.is_none() && self.tls_ca.is_none() {
            return Ok(None);
        }
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            (Some(_), None) => return Err(TlsError::Half("--tls-cert", "--tls-key")),
            (None, Some(_)) => return Err(TlsError::Half("--tls-key", "--tls-cert")),
        };
        let files = Files {
            identity,
            ca: self.tls_ca.clone(),
        };
        let configs = files.load()?;
        Ok(Some(Arc::new(Tls {
            files,
            configs: RwLock::new(Arc::new(configs)),
        })))
    }
}

/// Why the TLS settings do not load (refusing the start, or a reload).
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("{0} needs {1}")]
    Half(&'static str, &'static str),
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{what}: {error}")]
    Rustls { what: &'static str, error: String },
}

/// The files the configurations are built from.
#[derive(Debug, Clone)]
struct Files {
    identity: Option<(PathBuf, PathBuf)>,
    ca: Option<PathBuf>,
}

/// The configurations built from the files at one time.
#[derive(Debug)]
struct Configs {
    /// The port's, with a certificate.
    server: Option<Arc<ServerConfig>>,
    /// The clients', with a CA.
    client: Option<Arc<ClientConfig>>,
    /// Whether the port verifies client certificates (a CA and a cert).
    mutual: bool,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn rustls_error(what: &'static str) -> impl FnOnce(rustls::Error) -> TlsError {
    move |error| TlsError::Rustls {
        what,
        error: error.to_string(),
    }
}

fn read_error(path: &Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsError + '_ {
    move |error| TlsError::Read {
        path: path.to_path_buf(),
        error: error.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_error(path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error(path))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(read_error(path))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots
            .add(cert)
            .map_err(rustls_error("the CA certificate is not usable"))?;
    }
    Ok(Arc::new(roots))
}

impl Files {
    fn load(&self) -> Result<Configs, TlsError> {
        let roots = self.ca.as_deref().map(roots).transpose()?;
        let identity = match &self.identity {
            Some((cert, key)) => Some((certificates(cert)?, private_key(key)?)),
            None => None,
        };
        let server = match (&identity, &roots) {
            (None, _) => None,
            (Some((certs, key)), roots) => {
                let builder = ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(rustls_error("TLS versions"))?;
                let builder = match roots {
                    Some(roots) => {
                        let verifier =
                            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                                .allow_unauthenticated()
                                .build()
                                .map_err(|error| TlsError::Rustls {
                                    what: "client certificate verifier",
                                    error: error.to_string(),
                                })?;
                        builder.with_client_cert_verifier(verifier)
                    }
                    None => builder.with_no_client_auth(),
                };
                let mut config = builder
                    .with_single_cert(certs.clone(), key.clone_key())
                    .map_err(rustls_error(
                        "the certificate and key do not make a server identity",
                    ))?;
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(Arc::new(config))
            }
        };
        let client = match &roots {
            None => None,
            Some(roots) => {
                let builder = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(rustls_error("TLS versions"))?
                    .with_root_certificates(roots.clone());
                let mut config = match &identity {
                    Some((certs, key)) => builder
                        .with_client_auth_cert(certs.clone(), key.clone_key())
                        .map_err(rustls_error(
                            "the certificate and key do not make a client identity",
                        ))?,
                    None => builder.with_no_client_auth(),
                };
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(Arc::new(config))
            }
        };
        Ok(Configs {
            mutual: server.is_some() && roots.is_some(),
            server,
            client,
        })
    }
}

/// A process's TLS: the port's configuration and its clients', both
/// replaced whole by [`Tls::reload`].
#[derive(Debug)]
pub struct Tls {
    files: Files,
    configs: RwLock<Arc<Configs>>,
}

/// What a connection's client proved with its certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientCert {
    /// The port does not ask (plain HTTP, or TLS without `--tls-ca`).
    #[default]
    NotAsked,
    /// A certificate signed by the CA (rustls refuses the handshake for
    /// any other).
    Verified,
    /// Asked, and none was presented.
    Absent,
}

impl ClientCert {
    /// Refuses (403) a connection that was asked for a client certificate
    /// and presented none: node-to-node paths call this.
    pub fn require(self) -> Result<(), ApiError> {
        match self {
            ClientCert::NotAsked | ClientCert::Verified => Ok(()),
            ClientCert::Absent => Err(ApiError::ClientCertRequired(
                "node-to-node requests need a client certificate signed by the cluster's CA",
            )),
        }
    }
}

/// How a connection on a TLS port ended its handshake.
pub enum Accepted {
    /// TLS is up: serve HTTP on it.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, ClientCert),
    /// Not served: plain HTTP (answered 400 and closed), a failed or slow
    /// handshake (closed), logged at debug.
    Closed,
}

impl Tls {
    fn configs(&self) -> Arc<Configs> {
        Arc::clone(&self.configs.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The clients' configuration, when a CA is set.
    pub(crate) fn client_config(&self) -> Option<Arc<ClientConfig>> {
        self.configs().client.clone()
    }

    /// Whether the port speaks TLS (a certificate is set).
    pub fn serves(&self) -> bool {
        self.configs().server.is_some()
    }

    /// Whether the clients speak TLS (a CA is set).
    pub fn connects(&self) -> bool {
        self.configs().client.is_some()
    }

    /// What the start-up log line says of TLS.
    pub fn describe(&self) -> &'static str {
        let configs = self.configs();
        match (
            configs.server.is_some(),
            configs.mutual,
            configs.client.is_some(),
        ) {
            (true, true, _) => "TLS, client certificates verified (mutual TLS to peers)",
            (true, false, false) => "TLS",
            (true, false, true) => "TLS, TLS to peers",
            (false, _, _) => "plain HTTP, TLS to peers",
        }
    }

    /// Reads the files again and swaps the configurations in for new
    /// handshakes; on an error the old ones stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let configs = self.files.load()?;
        *self.configs.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(configs);
        Ok(())
    }

    /// The TLS handshake of a new connection on the port, within `timeout`
    /// (plain HTTP answered 400 and closed; see the module docs).
    pub async fn accept(&self, mut stream: TcpStream, timeout: Duration) -> Accepted {
        let configs = self.configs();
        let Some(server) = configs.server.clone() else {
            return Accepted::Closed;
        };
        let handshake = async {
            let mut first = [0u8; 1];
            if stream.peek(&mut first).await? == 0 {
                return Ok(None);
            }
            if first[0] != TLS_HANDSHAKE_RECORD {
                refuse_plaintext(&mut stream).await;
                return Ok(None);
            }
            TlsAcceptor::from(server).accept(stream).await.map(Some)
        };
        match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(Some(tls))) => {
                let cert = match (configs.mutual, tls.get_ref().1.peer_certificates()) {
                    (false, _) => ClientCert::NotAsked,
                    (true, Some(_)) => ClientCert::Verified,
                    (true, None) => ClientCert::Absent,
                };
                Accepted::Tls(Box::new(tls), cert)
            }
            Ok(Ok(None)) => Accepted::Closed,
            Ok(Err(error)) => {
                log::debug!("TLS handshake failed: {error}");
                Accepted::Closed
            }
            Err(_) => {
                log::debug!("TLS handshake not done within {timeout:?}: closed");
                Accepted::Closed
            }
        }
    }

    /// Connects to `addr` (`host:port`), in TLS when a CA is set, verifying
    /// the server's certificate names `host`.
    pub async fn connect(tls: Option<&Tls>, addr: &str) -> io::Result<ClientStream> {
        let stream = TcpStream::connect(addr).await?;
        // Small request/response pairs: send each at once.
        let _ = stream.set_nodelay(true);
        let Some(client) = tls.and_then(|tls| tls.configs().client.clone()) else {
            return Ok(ClientStream::Plain(stream));
        };
        let name = server_name(addr)?;
        let tls = TlsConnector::from(client).connect(name, stream).await?;
        Ok(ClientStream::Tls(Box::new(tls)))
    }
}

/// The name a server at `addr` must prove it is: the host part (an IP
/// address or a DNS name).
pub(crate) fn server_name(addr: &str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(host_of(addr).to_owned())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))
}

/// `host` of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    addr.rsplit_once(':').map_or(addr, |(host, _)| host)
}

/// Answers plain HTTP on a TLS port with the JSON 400, and closes.
///
/// The request is drained (briefly) before the socket is dropped: closing a
/// socket with unread bytes makes the kernel send a reset, which can destroy
/// the answer before the client reads it.
async fn refuse_plaintext(stream: &mut TcpStream) {
    log::debug!("plain HTTP on the TLS port: answered 400 and closed");
    let answer = async {
        stream.write_all(&ApiError::TlsRequired.to_wire()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// Reloads `tls` on every SIGHUP, logging the outcome. The handler is
/// installed by this call (before the future is polled), so a SIGHUP after
/// it no longer ends the process. Spawn the future. Without TLS (`None`)
/// the handler is installed all the same: a `kill -HUP` sent to every kv
/// process of a deployment (the way certificates are reloaded) must not
/// stop the ones that serve plain HTTP; it is logged and ignored.
pub fn reload_on_sighup(
    tls: Option<Arc<Tls>>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let hangups = signal(SignalKind::hangup());
    async move {
        let mut hangups = match hangups {
            Ok(hangups) => hangups,
            Err(error) => {
                log::error!("cannot listen for SIGHUP (no TLS reloads): {error}");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            let Some(tls) = &tls else {
                log::info!("SIGHUP: no TLS certificates to reload (no --tls-cert or --tls-ca)");
                continue;
            };
            match tls.reload() {
                Ok(()) => log::info!("SIGHUP: TLS certificates reloaded ({})", tls.describe()),
                Err(error) => log::error!(
                    "SIGHUP: TLS certificates not reloaded, the previous ones stay: {error}"
                ),
            }
        }
    }
}

/// A client connection: plain TCP, or TLS over it.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl ClientStream {
    /// The server's certificate chain, leaf first (TLS only).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            ClientStream::Plain(_) => None,
            ClientStream::Tls(tls) => tls.get_ref().1.peer_certificates(),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            ClientStream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            ClientStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            ClientStream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            ClientStream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            ClientStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(stream) => stream.is_write_vectored(),
            ClientStream::Tls(stream) => stream.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn host_of_strips_the_port() {
        assert_eq!(host_of("127.0.0.1:7001"), "127.0.0.1");
        assert_eq!(host_of("node-1.example:443"), "node-1.example");
        assert_eq!(host_of("[::1]:7001"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[test]
    fn half_an_identity_is_refused() {
        let args = TlsArgs {
            tls_cert: Some("c.pem".into()),
            ..TlsArgs::default()
        };
        assert!(matches!(args.load(), Err(TlsError::Half(..))));
        assert!(matches!(TlsArgs::default().load(), Ok(None)));
        let missing = TlsArgs {
            tls_ca: Some("/nonexistent/ca.pem".into()),
            ..TlsArgs::default()
        };
        assert!(matches!(missing.load(), Err(TlsError::Read { .. })));
    }

    #[test]
    fn a_missing_client_certificate_is_refused_only_when_asked() {
        assert!(ClientCert::NotAsked.require().is_ok());
        assert!(ClientCert::Verified.require().is_ok());
        let refused = ClientCert::Absent.require().unwrap_err();
        assert_eq!(refused.status(), hyper::StatusCode::FORBIDDEN);
    }
}
