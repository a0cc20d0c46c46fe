//! HTTPS: rustls with the ring provider (no aws-lc, no OpenSSL), ALPN `h2` then `http/1.1`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// ALPN protocols offered, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Builds the server configuration from a PEM certificate chain (node certificate first) and
/// a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading --tls-cert {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing --tls-cert {} (PEM certificates expected)", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("--tls-cert {}: no PEM certificate in it", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading --tls-key {} (a PEM private key expected)", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not go together")?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    // Session resumption by ticket (rotated keys, as nginx's default), besides the in-memory
    // session cache: a returning client skips the full handshake.
    config.ticketer = rustls::crypto::ring::Ticketer::new().context("TLS session ticketer")?;
    Ok(Arc::new(config))
}
