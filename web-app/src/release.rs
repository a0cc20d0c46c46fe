//! Releases: versioned directories of site files with a manifest, verified before they are
//! served, and switched atomically.
//!
//! Layout (`--releases DIR`):
//!
//! ```text
//! DIR/
//!   current -> 1.1.0            symlink to the active release (relative or absolute)
//!   1.0.0/
//!     MANIFEST.toml             version + sha256 and size of every other file
//!     index.html ...
//!   1.1.0/ ...
//! ```
//!
//! `MANIFEST.toml`:
//!
//! ```toml
//! version = "1.1.0"
//! [files]
//! "index.html" = { size = 120, sha256 = "9f86d0..." }
//! "css/site.css" = { size = 48, sha256 = "2c26b4..." }
//! ```
//!
//! A release is accepted only if every file listed is present with its size and sha256, no
//! other file is present, and it contains no symlink (so nothing served can point out of it).
//! The verified release is served from its resolved directory (not through `current`), so
//! moving the symlink changes nothing until the node reloads (SIGHUP) and verifies the new one.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File name of the manifest at the top of a release directory.
pub const MANIFEST: &str = "MANIFEST.toml";
/// Name of the symlink to the active release in a releases directory.
pub const CURRENT: &str = "current";
/// Files up to this size are kept in memory (with a gzip variant when compressible).
pub const CACHE_MAX_FILE: u64 = 256 * 1024;
/// At most this much file data is kept in memory per release.
pub const CACHE_MAX_TOTAL: u64 = 64 * 1024 * 1024;

/// One file's entry in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub size: u64,
    pub sha256: String,
}

/// The manifest of a release: its version and every file (relative, `/`-separated path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: String,
    pub files: BTreeMap<String, FileEntry>,
}

/// Why a release was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{dir}: no {MANIFEST}", dir = .dir.display())]
    MissingManifest { dir: PathBuf },
    #[error("{path}: invalid manifest: {source}", path = .path.display())]
    InvalidManifest { path: PathBuf, source: toml::de::Error },
    #[error("{dir}: files do not match the manifest: {}", .problems.join("; "), dir = .dir.display())]
    Mismatch { dir: PathBuf, problems: Vec<String> },
    #[error("{path}: {source}", path = .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReleaseError + '_ {
    move |source| ReleaseError::Io { path: path.to_owned(), source }
}

/// A file kept in memory, with what its response headers need.
#[derive(Debug, Clone)]
pub struct CachedFile {
    pub body: Bytes,
    /// gzip-compressed body (precompressed `.gz` file of the release, or compressed at load).
    pub gzip: Option<Bytes>,
    /// brotli-compressed body (only from a precompressed `.br` file of the release).
    pub br: Option<Bytes>,
    pub content_type: &'static str,
    /// Strong validator, quoted (`"<sha256 prefix>"`).
    pub etag: String,
    /// HTTP date of the file's modification time.
    pub last_modified: String,
    pub modified: SystemTime,
}

/// The outcome of verifying a release: its manifest and the files small enough to cache.
#[derive(Debug)]
pub struct Verified {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub cache: HashMap<String, CachedFile>,
}

/// Content types worth compressing on the fly.
pub fn compressible(content_type: &str) -> bool {
    content_type.starts_with("text/")
        || matches!(
            content_type,
            "application/javascript" | "application/json" | "application/xml" | "image/svg+xml" | "application/wasm"
        )
}

/// Content type of `path` by extension (what tower-http's `ServeDir` answers too).
pub fn content_type(path: &str) -> &'static str {
    mime_guess::from_path(path).first_raw().unwrap_or("application/octet-stream")
}

/// Quoted strong ETag derived from a file's sha256 (hex).
pub fn etag_from_sha256(sha256: &str) -> String {
    format!("\"{}\"", &sha256[..sha256.len().min(32)])
}

/// Walks `dir` (not following symlinks) and returns its regular files as relative
/// `/`-separated paths, the manifest excluded. Symlinks and other special files are errors.
fn walk(dir: &Path) -> Result<Vec<String>, ReleaseError> {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    let mut stack = vec![(dir.to_owned(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        for entry in fs::read_dir(&path).map_err(io_err(&path))? {
            let entry = entry.map_err(io_err(&path))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                problems.push(format!("non-UTF-8 file name in {}", path.display()));
                continue;
            };
            let rel_name = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
            let kind = entry.file_type().map_err(io_err(&entry.path()))?;
            if kind.is_symlink() {
                problems.push(format!("symlink {rel_name} (not allowed in a release)"));
            } else if kind.is_dir() {
                stack.push((entry.path(), rel_name));
            } else if kind.is_file() {
                if rel_name != MANIFEST {
                    files.push(rel_name);
                }
            } else {
                problems.push(format!("special file {rel_name}"));
            }
        }
    }
    if !problems.is_empty() {
        return Err(ReleaseError::Mismatch { dir: dir.to_owned(), problems });
    }
    files.sort();
    Ok(files)
}

/// sha256 and size of a file, and its contents when it is at most `keep_up_to` bytes.
fn hash_file(path: &Path, keep_up_to: u64) -> Result<(String, u64, Option<Vec<u8>>), ReleaseError> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut kept = Vec::new();
    let mut size: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        if size <= keep_up_to {
            kept.extend_from_slice(&buf[..n]);
        }
    }
    let keep = (size <= keep_up_to).then_some(kept);
    Ok((hex::encode(hasher.finalize()), size, keep))
}

/// Writes a release: copies the files of `from` (a plain directory, no symlinks) to
/// `out/<version>/` and writes its manifest there. Refuses to overwrite an existing release.
pub fn create(from: &Path, version: &str, out: &Path) -> Result<PathBuf, ReleaseError> {
    validate_version(version)?;
    let files = walk(from)?;
    let dest = out.join(version);
    if dest.exists() {
        return Err(ReleaseError::Invalid(format!("{} already exists: releases are immutable, pick a new version", dest.display())));
    }
    fs::create_dir_all(out).map_err(io_err(out))?;
    // Build aside, then rename into place, so a half-written release is never visible.
    let staging = out.join(format!(".{version}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let result = (|| {
        let mut manifest = Manifest { version: version.to_owned(), files: BTreeMap::new() };
        for rel in &files {
            let src = from.join(rel);
            let dst = staging.join(rel);
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            fs::copy(&src, &dst).map_err(io_err(&src))?;
            let (sha256, size, _) = hash_file(&dst, 0)?;
            manifest.files.insert(rel.clone(), FileEntry { size, sha256 });
        }
        let text = toml::to_string(&manifest).map_err(|e| ReleaseError::Invalid(format!("encoding the manifest: {e}")))?;
        let path = staging.join(MANIFEST);
        let mut file = fs::File::create(&path).map_err(io_err(&path))?;
        file.write_all(text.as_bytes()).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
        fs::rename(&staging, &dest).map_err(io_err(&dest))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result.map(|()| dest)
}

/// A version becomes a directory name: keep it to a safe alphabet.
pub fn validate_version(version: &str) -> Result<(), ReleaseError> {
    let ok = !version.is_empty()
        && version.len() <= 64
        && version != CURRENT
        && !version.starts_with('.')
        && version.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'));
    if ok {
        Ok(())
    } else {
        Err(ReleaseError::Invalid(format!(
            "invalid version {version:?}: use 1-64 characters of [A-Za-z0-9._+-], not starting with '.', not \"current\""
        )))
    }
}

/// Reads and parses `dir/MANIFEST.toml`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ReleaseError> {
    let path = dir.join(MANIFEST);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ReleaseError::MissingManifest { dir: dir.to_owned() })
        }
        Err(e) => return Err(ReleaseError::Io { path, source: e }),
    };
    let manifest: Manifest = toml::from_str(&text).map_err(|source| ReleaseError::InvalidManifest { path: path.clone(), source })?;
    validate_version(&manifest.version)?;
    Ok(manifest)
}

/// Verifies the release in `dir` against its manifest: every listed file present with its
/// size and sha256, nothing else, no symlinks. Keeps small files in memory for serving.
pub fn verify(dir: &Path) -> Result<Verified, ReleaseError> {
    let dir = fs::canonicalize(dir).map_err(io_err(dir))?;
    let manifest = read_manifest(&dir)?;
    let present = walk(&dir)?;
    let mut problems = Vec::new();
    for rel in &present {
        if !manifest.files.contains_key(rel) {
            problems.push(format!("extra file {rel}"));
        }
    }
    let mut cache = HashMap::new();
    let mut cached_total: u64 = 0;
    let mut contents: HashMap<String, (Vec<u8>, SystemTime)> = HashMap::new();
    for (rel, entry) in &manifest.files {
        if !present.contains(rel) {
            problems.push(format!("missing file {rel}"));
            continue;
        }
        let path = dir.join(rel);
        let keep = if cached_total + entry.size <= CACHE_MAX_TOTAL { CACHE_MAX_FILE } else { 0 };
        let (sha256, size, data) = hash_file(&path, keep)?;
        if size != entry.size {
            problems.push(format!("{rel}: size {size}, manifest says {}", entry.size));
        } else if !sha256.eq_ignore_ascii_case(&entry.sha256) {
            problems.push(format!("{rel}: sha256 {sha256}, manifest says {}", entry.sha256));
        } else if let Some(data) = data {
            cached_total += size;
            let modified = fs::metadata(&path).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            contents.insert(rel.clone(), (data, modified));
        }
    }
    if !problems.is_empty() {
        return Err(ReleaseError::Mismatch { dir, problems });
    }
    for (rel, (data, modified)) in &contents {
        // Precompressed variants are served as variants of their original, not on their own
        // (they stay reachable by name through ServeDir).
        let content_type = content_type(rel);
        let gzip = match contents.get(&format!("{rel}.gz")) {
            Some((gz, _)) => Some(Bytes::from(gz.clone())),
            None if compressible(content_type) && data.len() >= 256 => Some(Bytes::from(gzip(data))),
            None => None,
        };
        let br = contents.get(&format!("{rel}.br")).map(|(br, _)| Bytes::from(br.clone()));
        let entry = &manifest.files[rel];
        cache.insert(
            rel.clone(),
            CachedFile {
                body: Bytes::from(data.clone()),
                gzip,
                br,
                content_type,
                etag: etag_from_sha256(&entry.sha256),
                last_modified: httpdate::fmt_http_date(*modified),
                modified: *modified,
            },
        );
    }
    Ok(Verified { dir, manifest, cache })
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(data).expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

/// Resolves `releases/current` to the release directory it points to.
pub fn resolve_current(releases: &Path) -> Result<PathBuf, ReleaseError> {
    let link = releases.join(CURRENT);
    let target = fs::canonicalize(&link).map_err(io_err(&link))?;
    if !target.is_dir() {
        return Err(ReleaseError::Invalid(format!("{} does not point to a directory", link.display())));
    }
    Ok(target)
}

/// Points `releases/current` at `releases/<version>` atomically (a new symlink renamed over
/// the old one). The node serves it after its next reload (SIGHUP).
pub fn activate(releases: &Path, version: &str) -> Result<(), ReleaseError> {
    validate_version(version)?;
    let target = releases.join(version);
    if !target.is_dir() {
        return Err(ReleaseError::Invalid(format!("{} is not a release directory", target.display())));
    }
    let tmp = releases.join(format!(".{CURRENT}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).map_err(io_err(&tmp))?;
    fs::rename(&tmp, releases.join(CURRENT)).map_err(io_err(releases))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(dir: &Path) {
        fs::create_dir_all(dir.join("css")).unwrap();
        fs::write(dir.join("index.html"), "<!doctype html><title>t</title>\n".repeat(20)).unwrap();
        fs::write(dir.join("css/site.css"), "body{}\n").unwrap();
    }

    #[test]
    fn create_then_verify() {
        let tmp = tempfile::tempdir().unwrap();
        site(&tmp.path().join("site"));
        let out = tmp.path().join("releases");
        let dir = create(&tmp.path().join("site"), "1.0.0", &out).unwrap();
        let verified = verify(&dir).unwrap();
        assert_eq!(verified.manifest.version, "1.0.0");
        assert_eq!(verified.manifest.files.len(), 2);
        assert_eq!(verified.manifest.files["css/site.css"].size, 7);
        let index = &verified.cache["index.html"];
        assert_eq!(index.content_type, "text/html");
        assert!(index.gzip.as_ref().unwrap().len() < index.body.len());
        assert!(verified.cache["css/site.css"].gzip.is_none(), "too small to compress");
        // Same version twice is refused.
        assert!(create(&tmp.path().join("site"), "1.0.0", &out).is_err());
    }

    #[test]
    fn mismatches_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        site(&tmp.path().join("site"));
        let dir = create(&tmp.path().join("site"), "1", &tmp.path().join("r")).unwrap();
        fs::write(dir.join("css/site.css"), "body{x}\n").unwrap();
        fs::write(dir.join("extra.txt"), "x").unwrap();
        fs::remove_file(dir.join("index.html")).unwrap();
        let err = verify(&dir).unwrap_err().to_string();
        assert!(err.contains("extra file extra.txt"), "{err}");
        assert!(err.contains("missing file index.html"), "{err}");
        assert!(err.contains("css/site.css: size 8, manifest says 7"), "{err}");
    }

    #[test]
    fn same_size_corruption_and_symlinks_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        site(&tmp.path().join("site"));
        let dir = create(&tmp.path().join("site"), "1", &tmp.path().join("r")).unwrap();
        fs::write(dir.join("css/site.css"), "body{}!").unwrap();
        let err = verify(&dir).unwrap_err().to_string();
        assert!(err.contains("css/site.css: sha256"), "{err}");
        fs::write(dir.join("css/site.css"), "body{}\n").unwrap();
        verify(&dir).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("passwd")).unwrap();
        let err = verify(&dir).unwrap_err().to_string();
        assert!(err.contains("symlink passwd"), "{err}");
    }

    #[test]
    fn bad_manifests() {
        let tmp = tempfile::tempdir().unwrap();
        site(tmp.path());
        assert!(matches!(verify(tmp.path()), Err(ReleaseError::MissingManifest { .. })));
        fs::write(tmp.path().join(MANIFEST), "version = \"1\"\nfiles = 3\n").unwrap();
        assert!(matches!(verify(tmp.path()), Err(ReleaseError::InvalidManifest { .. })));
        fs::write(tmp.path().join(MANIFEST), "version = \"../x\"\n[files]\n").unwrap();
        assert!(verify(tmp.path()).unwrap_err().to_string().contains("invalid version"));
    }

    #[test]
    fn versions() {
        for ok in ["1", "1.2.3", "2026-11-26_a", "1.0.0+build.7"] {
            validate_version(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "..", "current", "x y", &"9".repeat(65)] {
            assert!(validate_version(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn activate_switches_the_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        site(&tmp.path().join("site"));
        let out = tmp.path().join("r");
        create(&tmp.path().join("site"), "1", &out).unwrap();
        create(&tmp.path().join("site"), "2", &out).unwrap();
        activate(&out, "1").unwrap();
        assert_eq!(resolve_current(&out).unwrap(), fs::canonicalize(out.join("1")).unwrap());
        activate(&out, "2").unwrap();
        assert_eq!(resolve_current(&out).unwrap(), fs::canonicalize(out.join("2")).unwrap());
        assert!(activate(&out, "3").is_err());
    }
}
