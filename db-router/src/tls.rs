//! TLS for client connections (rustls with the ring provider, as web-app's HTTPS).
//!
//! MySQL negotiates TLS inside its own handshake: the server advertises `CLIENT_SSL`, a client
//! that wants TLS answers with a short `SSLRequest` (its capabilities, `CLIENT_SSL` set, and
//! nothing else), starts the TLS handshake at once, and sends its real handshake response
//! over TLS. The client does not wait between the two, so the router may already hold the
//! start of the TLS handshake in its read buffer when it sees the request: [`Prefixed`]
//! hands those bytes to rustls before the socket's.
//!
//! [`BackendTls`] is the other direction: the router connecting to the servers over TLS
//! (`backend_tls_ca`), checking their certificates against a CA; MySQL's handshake is the
//! same with the roles swapped. The in-kernel paths, which read the MySQL protocol on the
//! socket, are off for TLS sessions, and entirely with TLS to the servers.

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, BytesMut};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig, RootCertStore, ServerConfig,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stream::Stream;

/// How long a client has for its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate the router presents, and where it came from.
#[derive(Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub config: Arc<ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("cert", &self.cert).field("key", &self.key).finish_non_exhaustive()
    }
}

/// Two configurations are the same when they name the same files.
impl PartialEq for Tls {
    fn eq(&self, other: &Self) -> bool {
        (&self.cert, &self.key) == (&other.cert, &other.key)
    }
}
impl Eq for Tls {}

impl Tls {
    /// Loads a PEM certificate chain (the router's certificate first) and its PEM private key
    /// (PKCS#8, PKCS#1 or SEC1). The error says which file and what is wrong with it.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| format!("cannot read {}: {e}", cert.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: not PEM certificates: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{}: no PEM certificate in it", cert.display()));
        }
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: no PEM private key read: {e}", key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS protocol versions: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| format!("{} and {} do not go together: {e}", cert.display(), key.display()))?;
        Ok(Tls { cert: cert.into(), key: key.into(), config: Arc::new(config) })
    }

    /// Runs the TLS handshake on `stream`, `early` being the bytes of it already read.
    pub async fn accept(&self, stream: Stream, early: BytesMut) -> io::Result<Stream> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config));
        let handshake = acceptor.accept(Prefixed { early, inner: stream });
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"))),
        }
    }
}

/// How the router checks the servers when it connects to them over TLS: against the CA
/// certificates in `ca`, for the name `server_name`, or else for the server's IP address
/// (the certificate must then carry it as a subject alternative name).
#[derive(Clone)]
pub struct BackendTls {
    pub ca: PathBuf,
    pub server_name: Option<String>,
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls").field("ca", &self.ca).field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl PartialEq for BackendTls {
    fn eq(&self, other: &Self) -> bool {
        (&self.ca, &self.server_name) == (&other.ca, &other.server_name)
    }
}
impl Eq for BackendTls {}

impl BackendTls {
    pub fn load(ca: &Path, server_name: Option<&str>) -> Result<BackendTls, String> {
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("cannot read {}: {e}", ca.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: not PEM certificates: {e}", ca.display()))?;
        for c in certs {
            roots.add(c).map_err(|e| format!("{}: not a usable CA certificate: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{}: no PEM certificate in it", ca.display()));
        }
        if let Some(n) = server_name {
            ServerName::try_from(n.to_string()).map_err(|e| format!("backend_tls_server_name {n:?}: {e}"))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS protocol versions: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(BackendTls { ca: ca.into(), server_name: server_name.map(str::to_string), config: Arc::new(config) })
    }

    /// Runs the TLS handshake with the server at `addr` on `stream`, checking its certificate.
    pub async fn connect(&self, stream: Stream, addr: std::net::SocketAddr) -> io::Result<Stream> {
        let name = match &self.server_name {
            Some(n) => ServerName::try_from(n.clone()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            None => ServerName::IpAddress(addr.ip().into()),
        };
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.config)).connect(name, stream).await?;
        Ok(Stream::TlsClient(Box::new(tls)))
    }
}

/// Whether a client's first answer is an `SSLRequest`: exactly the fixed part of a handshake
/// response (capabilities, maximum packet, collation, 23 reserved bytes) with `CLIENT_SSL`.
pub fn is_ssl_request(payload: &[u8]) -> bool {
    payload.len() == 32
        && u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) & mysql_common::constants::CapabilityFlags::CLIENT_SSL.bits() != 0
}

/// A connection whose first bytes were already read into `early`: reads return those first.
pub struct Prefixed {
    early: BytesMut,
    inner: Stream,
}

impl Prefixed {
    pub fn inner(&self) -> &Stream {
        &self.inner
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early[..n]);
            this.early.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_requests_are_told_from_handshake_responses() {
        let mut req = vec![0u8; 32];
        req[..4].copy_from_slice(&(mysql_common::constants::CapabilityFlags::CLIENT_SSL.bits() | 0x200).to_le_bytes());
        assert!(is_ssl_request(&req));
        assert!(!is_ssl_request(&req[..31]), "too short");
        let mut longer = req.clone();
        longer.extend_from_slice(b"app\0");
        assert!(!is_ssl_request(&longer), "a full handshake response");
        req[..4].copy_from_slice(&0x200u32.to_le_bytes());
        assert!(!is_ssl_request(&req), "no CLIENT_SSL");
    }

    #[test]
    fn load_names_the_file_that_is_wrong() {
        let dir = std::env::temp_dir().join(format!("dbr-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key, junk) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("junk.pem"));
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        std::fs::write(&junk, "not a certificate\n").unwrap();
        assert!(Tls::load(&cert, &key).is_ok());
        let e = Tls::load(&junk, &key).unwrap_err();
        assert!(e.contains("junk.pem") && e.contains("no PEM certificate"), "{e}");
        let e = Tls::load(&cert, &junk).unwrap_err();
        assert!(e.contains("junk.pem"), "{e}");
        let e = Tls::load(&dir.join("missing.pem"), &key).unwrap_err();
        assert!(e.contains("missing.pem") && e.contains("cannot read"), "{e}");
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&junk, other.key_pair.serialize_pem()).unwrap();
        let e = Tls::load(&cert, &junk).unwrap_err();
        assert!(e.contains("do not go together"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
