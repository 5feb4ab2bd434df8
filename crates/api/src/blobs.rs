//! The image store: content-addressed files (kernels, initrds, disk templates) kept
//! under the server's data directory, named by their SHA-256.
//!
//! Images name their files only by digest, never by a host path, so no request can
//! make a host open a file of its choosing. Files enter the store in two ways:
//! streamed uploads (hashed while they are written, size-limited) and, for an
//! admin, imports from the one directory the server was configured to allow
//! (canonicalized, symlinks resolved, confined to it).
//!
//! Crash safety: a file is written under `tmp/`, fsynced, then renamed onto its
//! digest and the directory fsynced, so a digest's file is always whole. Which
//! tenant may use a digest is a store record written after the file is in place;
//! a crash in between leaves an unreferenced file that the next upload reuses.
//! `tmp/` is emptied on start.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use model::BlobDigest;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Default largest blob: 8 GiB (a disk template of a large guest).
pub const DEFAULT_MAX_BLOB_BYTES: u64 = 8 << 30;

/// Where and how the image store keeps its files.
#[derive(Debug, Clone)]
pub struct BlobConfig {
    /// The store's directory (`<data-dir>/blobs` for `vinfra server`).
    pub dir: PathBuf,
    /// The one directory an admin may import files from; `None`: imports are off.
    pub import_dir: Option<PathBuf>,
    /// Largest blob accepted, bytes.
    pub max_bytes: u64,
}

/// Why a blob could not be stored or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// The body (or imported file) is over the limit.
    #[error("blob: exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit, bytes.
        limit: u64,
    },
    /// The client said which digest to expect and the content hashed otherwise.
    #[error("expect: the upload hashed to {got}, not {expected}")]
    DigestMismatch {
        /// What the client announced.
        expected: BlobDigest,
        /// What the bytes hash to.
        got: BlobDigest,
    },
    /// The server has no import directory.
    #[error("path: this server imports no files (start it with --image-import-dir)")]
    ImportOff,
    /// The import path is not a usable relative path.
    #[error("path: {reason}, got {path:?}")]
    BadImportPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The import path resolves outside the import directory (`..`, a symlink).
    #[error("path: {path:?} resolves outside the import directory")]
    OutsideImportDir {
        /// The path as given.
        path: String,
    },
    /// The import path names nothing, or not a regular file.
    #[error("path: {path:?} is not a regular file in the import directory")]
    NotAFile {
        /// The path as given.
        path: String,
    },
    /// The request body broke off.
    #[error("body: the upload broke off")]
    Body(#[source] axum::Error),
    /// A file operation in the store failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A blocking task died.
    #[error("a blocking task failed")]
    Join(#[from] tokio::task::JoinError),
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BlobError {
    let path = path.to_owned();
    move |source| BlobError::Io {
        action,
        path,
        source,
    }
}

/// The image store's files.
#[derive(Debug)]
pub struct BlobFiles {
    cfg: BlobConfig,
}

/// A stored file: its digest and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Content address.
    pub digest: BlobDigest,
    /// Bytes.
    pub size: u64,
}

impl BlobFiles {
    /// Opens (creating) the store's directory and empties its `tmp/`, where only
    /// uploads cut short by a crash can be.
    pub fn open(cfg: BlobConfig) -> Result<Self, BlobError> {
        let tmp = cfg.dir.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io("empty", &tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
        Ok(Self { cfg })
    }

    /// The file of `digest` (which may not exist).
    pub fn path(&self, digest: &BlobDigest) -> PathBuf {
        self.cfg.dir.join(digest.hex())
    }

    /// The largest blob accepted, bytes.
    pub fn max_bytes(&self) -> u64 {
        self.cfg.max_bytes
    }

    fn tmp_path(&self) -> Result<PathBuf, BlobError> {
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(|e| BlobError::Io {
            action: "name a temporary file in",
            path: self.cfg.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(self
            .cfg
            .dir
            .join("tmp")
            .join(format!("{:016x}.part", u64::from_le_bytes(raw))))
    }

    /// Streams `body` into the store, hashing as it goes. Refused, leaving nothing
    /// behind, when it grows past the limit or hashes to other than `expect`.
    pub async fn put_stream<S>(
        &self,
        body: S,
        expect: Option<&BlobDigest>,
    ) -> Result<Stored, BlobError>
    where
        S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
    {
        let tmp = self.tmp_path()?;
        let result = self.write_tmp(&tmp, body).await;
        let (digest, size) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        if let Some(expected) = expect {
            if *expected != digest {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(BlobError::DigestMismatch {
                    expected: expected.clone(),
                    got: digest,
                });
            }
        }
        self.install(&tmp, &digest).await?;
        Ok(Stored { digest, size })
    }

    async fn write_tmp<S>(&self, tmp: &Path, mut body: S) -> Result<(BlobDigest, u64), BlobError>
    where
        S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
    {
        // Buffered: each write to a tokio file is a trip to a blocking thread, and the
        // body arrives in chunks of a few KiB.
        let mut file = tokio::io::BufWriter::with_capacity(
            1 << 20,
            tokio::fs::File::create(tmp)
                .await
                .map_err(io("create", tmp))?,
        );
        let mut hash = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(BlobError::Body)?;
            size = size.saturating_add(chunk.len() as u64);
            if size > self.cfg.max_bytes {
                return Err(BlobError::TooLarge {
                    limit: self.cfg.max_bytes,
                });
            }
            hash.update(&chunk);
            file.write_all(&chunk).await.map_err(io("write", tmp))?;
        }
        file.flush().await.map_err(io("write", tmp))?;
        file.get_ref().sync_all().await.map_err(io("sync", tmp))?;
        Ok((BlobDigest::from_sha256(hash.finalize().into()), size))
    }

    /// Renames a finished temporary file onto its digest (an existing file of that
    /// digest has the same bytes and stays) and makes the rename durable.
    async fn install(&self, tmp: &Path, digest: &BlobDigest) -> Result<(), BlobError> {
        let dest = self.path(digest);
        if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            let _ = tokio::fs::remove_file(tmp).await;
            return Ok(());
        }
        tokio::fs::rename(tmp, &dest)
            .await
            .map_err(io("rename into", &dest))?;
        let dir = self.cfg.dir.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io("sync", &dir))
        })
        .await??;
        Ok(())
    }

    /// Copies `rel` from the import directory into the store. `rel` is relative to
    /// that directory; after resolving every symlink and `..` it must still be inside
    /// it, and be a regular file within the size limit.
    pub async fn import(&self, rel: &str) -> Result<Stored, BlobError> {
        let Some(root) = self.cfg.import_dir.clone() else {
            return Err(BlobError::ImportOff);
        };
        let source = confine(&root, rel)?;
        let tmp = self.tmp_path()?;
        let limit = self.cfg.max_bytes;
        let rel_owned = rel.to_owned();
        let tmp2 = tmp.clone();
        let copied =
            tokio::task::spawn_blocking(move || copy_hashing(&source, &tmp2, limit, &rel_owned))
                .await?;
        let (digest, size) = match copied {
            Ok(v) => v,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        self.install(&tmp, &digest).await?;
        Ok(Stored { digest, size })
    }

    /// Opens a stored blob for reading, with its size.
    pub async fn open_read(
        &self,
        digest: &BlobDigest,
    ) -> Result<(tokio::fs::File, u64), BlobError> {
        let path = self.path(digest);
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(io("open", &path))?;
        let size = file.metadata().await.map_err(io("stat", &path))?.len();
        Ok((file, size))
    }
}

/// Resolves `rel` under `root`, refusing anything that ends up outside it. Both
/// sides are canonicalized, so a symlink inside `root` pointing out is refused too.
fn confine(root: &Path, rel: &str) -> Result<PathBuf, BlobError> {
    let bad = |reason| BlobError::BadImportPath {
        path: rel.chars().take(200).collect(),
        reason,
    };
    if rel.is_empty() || rel.len() > 4096 {
        return Err(bad("must be 1 to 4096 bytes"));
    }
    if rel.contains('\0') {
        return Err(bad("must not contain NUL"));
    }
    let p = Path::new(rel);
    let joined = if p.is_absolute() {
        p.to_owned()
    } else {
        root.join(p)
    };
    let root = root.canonicalize().map_err(io("resolve", root))?;
    let not_file = || BlobError::NotAFile {
        path: rel.to_owned(),
    };
    let resolved = joined.canonicalize().map_err(|_| not_file())?;
    if !resolved.starts_with(&root) {
        return Err(BlobError::OutsideImportDir {
            path: rel.to_owned(),
        });
    }
    let meta = std::fs::metadata(&resolved).map_err(|_| not_file())?;
    if !meta.is_file() {
        return Err(not_file());
    }
    Ok(resolved)
}

fn copy_hashing(
    source: &Path,
    dest: &Path,
    limit: u64,
    rel: &str,
) -> Result<(BlobDigest, u64), BlobError> {
    use std::io::{Read, Write};
    let mut input = std::fs::File::open(source).map_err(|_| BlobError::NotAFile {
        path: rel.to_owned(),
    })?;
    let mut out = std::fs::File::create(dest).map_err(io("create", dest))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(io("read", source))?;
        if n == 0 {
            break;
        }
        size = size.saturating_add(n as u64);
        if size > limit {
            return Err(BlobError::TooLarge { limit });
        }
        hash.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io("write", dest))?;
    }
    out.sync_all().map_err(io("sync", dest))?;
    Ok((BlobDigest::from_sha256(hash.finalize().into()), size))
}

/// A stored blob's bytes as a body stream, 64 KiB at a time.
pub fn file_stream(
    file: tokio::fs::File,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 << 10];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path, import: Option<PathBuf>, max: u64) -> BlobFiles {
        BlobFiles::open(BlobConfig {
            dir: dir.join("blobs"),
            import_dir: import,
            max_bytes: max,
        })
        .unwrap()
    }

    fn body(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, axum::Error>> + Unpin {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn upload_hashes_limits_and_checks_the_expected_digest() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path(), None, 8);
        let got = s.put_stream(body(&[b"abc", b"def"]), None).await.unwrap();
        let want = BlobDigest::from_sha256(Sha256::digest(b"abcdef").into());
        assert_eq!(
            got,
            Stored {
                digest: want.clone(),
                size: 6
            }
        );
        assert_eq!(std::fs::read(s.path(&want)).unwrap(), b"abcdef");
        // Same bytes again: same digest, the file stays.
        s.put_stream(body(&[b"abcdef"]), Some(&want)).await.unwrap();

        let e = s
            .put_stream(body(&[b"12345", b"6789"]), None)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "blob: exceeds the limit of 8 bytes");
        let e = s
            .put_stream(body(&[b"xyz"]), Some(&want))
            .await
            .unwrap_err();
        assert!(matches!(e, BlobError::DigestMismatch { .. }), "{e}");
        // Nothing of the refused uploads is left.
        assert_eq!(
            std::fs::read_dir(d.path().join("blobs/tmp"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(
            std::fs::read_dir(d.path().join("blobs")).unwrap().count(),
            2
        );
    }

    #[tokio::test]
    async fn import_is_confined_to_its_directory() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("import");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/vmlinuz"), b"kernel").unwrap();
        std::fs::write(d.path().join("secret"), b"host file").unwrap();
        std::os::unix::fs::symlink(d.path().join("secret"), root.join("link")).unwrap();
        let s = store(d.path(), Some(root.clone()), 1 << 20);

        let ok = s.import("sub/vmlinuz").await.unwrap();
        assert_eq!(std::fs::read(s.path(&ok.digest)).unwrap(), b"kernel");
        // An absolute path inside the directory is fine too.
        let abs = root.join("sub/vmlinuz").display().to_string();
        assert_eq!(s.import(&abs).await.unwrap(), ok);

        for bad in ["../secret", "link", "/etc/passwd", "sub/../../secret"] {
            let e = s.import(bad).await.unwrap_err();
            assert!(
                matches!(e, BlobError::OutsideImportDir { .. }),
                "{bad}: {e}"
            );
        }
        for bad in ["sub", "missing", ""] {
            let e = s.import(bad).await.unwrap_err();
            assert!(
                matches!(
                    e,
                    BlobError::NotAFile { .. } | BlobError::BadImportPath { .. }
                ),
                "{bad}: {e}"
            );
        }
        let off = store(d.path(), None, 1 << 20);
        assert!(matches!(
            off.import("sub/vmlinuz").await,
            Err(BlobError::ImportOff)
        ));
    }
}
