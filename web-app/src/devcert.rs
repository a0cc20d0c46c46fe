//! Development certificates: a local CA and node certificates it signs, written as PEM files,
//! so that `curl --cacert ca.pem https://<name>/` trusts the node. For demos and tests only:
//! the CA key is written next to the certificates, unencrypted.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The files [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct DevCerts {
    /// The CA certificate to trust (`curl --cacert`).
    pub ca_cert: PathBuf,
    /// The CA private key (to sign more node certificates later).
    pub ca_key: PathBuf,
    /// The node's certificate chain: node certificate, then the CA (`--tls-cert`).
    pub cert: PathBuf,
    /// The node's private key (`--tls-key`).
    pub key: PathBuf,
}

/// Generates a CA and one node certificate valid for `names` (each a DNS name or an IP
/// address), and writes `ca.pem`, `ca-key.pem`, `node.pem` and `node-key.pem` into `dir`
/// (created if needed; keys mode 0600). Certificates are valid from now for 30 days.
pub fn generate(dir: &Path, names: &[&str]) -> anyhow::Result<DevCerts> {
    if names.is_empty() {
        anyhow::bail!("a node certificate needs at least one DNS name or IP address");
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let now = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(secs);
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name = name("xdp-web-stack development CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    // A day of slack for clocks that differ a little.
    ca.not_before = now - Duration::from_secs(86_400);
    ca.not_after = now + Duration::from_secs(30 * 86_400);
    let ca_cert = ca.self_signed(&ca_key).context("self-signing the CA")?;

    let mut node = CertificateParams::default();
    node.distinguished_name = name(names[0]);
    node.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(
                (*n).try_into().with_context(|| format!("{n:?} is neither an IP address nor a DNS name"))?,
            )),
        })
        .collect::<anyhow::Result<_>>()?;
    node.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    node.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    node.use_authority_key_identifier_extension = true;
    node.not_before = now - Duration::from_secs(86_400);
    node.not_after = now + Duration::from_secs(30 * 86_400);
    let node_key = KeyPair::generate().context("generating the node key")?;
    let node_cert = node.signed_by(&node_key, &ca_cert, &ca_key).context("signing the node certificate")?;

    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let certs = DevCerts {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca-key.pem"),
        cert: dir.join("node.pem"),
        key: dir.join("node-key.pem"),
    };
    write(&certs.ca_cert, &ca_cert.pem(), 0o644)?;
    write(&certs.ca_key, &ca_key.serialize_pem(), 0o600)?;
    write(&certs.cert, &format!("{}{}", node_cert.pem(), ca_cert.pem()), 0o644)?;
    write(&certs.key, &node_key.serialize_pem(), 0o600)?;
    Ok(certs)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn write(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))
}
