//! The image store: uploads and downloads of blobs, and images made of them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use model::api::{CreateImage, ImportBlob};
use model::{Blob, BlobDigest, Image, VmId};
use reqwest::Method;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Client, ClientError, NO_BODY};

/// Blobs can be gigabytes: their transfers get this long instead of the 30 s of
/// other calls.
const BLOB_TIMEOUT: Duration = Duration::from_secs(3600);

/// Bytes read from a file per chunk of an upload (and buffered per write of a download).
/// reqwest's body from a file reads 4 KiB at a time, each on a blocking thread: a 1.5 GiB
/// disk took 20 s to upload that way.
const UPLOAD_CHUNK: usize = 1 << 20;

/// A file as a stream of chunks of up to [`UPLOAD_CHUNK`] bytes.
fn file_chunks(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    futures_util::stream::try_unfold(file, |mut file| async move {
        let mut buf = bytes::BytesMut::with_capacity(UPLOAD_CHUNK);
        while buf.len() < UPLOAD_CHUNK {
            if file.read_buf(&mut buf).await? == 0 {
                break;
            }
        }
        Ok((!buf.is_empty()).then(|| (buf.freeze(), file)))
    })
}

/// The files of an image on this machine, for [`Client::upload_image`].
#[derive(Debug, Clone, Default)]
pub struct ImageFiles {
    /// Kernel for direct kernel boot.
    pub kernel: Option<PathBuf>,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Disk template.
    pub disk_template: Option<PathBuf>,
}

/// The SHA-256 digest of a local file (read on a blocking thread).
pub async fn file_digest(path: &Path) -> Result<BlobDigest, ClientError> {
    let p = path.to_owned();
    let res = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&p)?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(BlobDigest::from_sha256(hash.finalize().into()));
            }
            hash.update(&buf[..n]);
        }
    })
    .await
    .map_err(|e| ClientError::from_io("hash", path, std::io::Error::other(e)))?;
    res.map_err(|e| ClientError::from_io("hash", path, e))
}

impl Client {
    /// `POST /v1/blobs`: streams a local file into the image store. The digest is
    /// computed here first and sent as `expect`, so the server refuses a corrupted
    /// transfer.
    pub async fn upload_blob(&self, path: &Path) -> Result<Blob, ClientError> {
        let digest = file_digest(path).await?;
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| ClientError::from_io("open", path, e))?;
        let segments = ["v1", "blobs"];
        let mut url = self.url(&segments);
        url.set_query(Some(&format!("expect={digest}")));
        let res = self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .timeout(BLOB_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(file_chunks(file)))
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                method: Method::POST,
                path: segments.join("/"),
                source,
            })?;
        let res = Self::check(Method::POST, segments.join("/"), res).await?;
        self.decode(Method::POST, &segments, res).await
    }

    /// `PUT /v1/vms/{id}/trace/data` (agent): streams a stopped trace's file into the
    /// blob store for the VM's tenant.
    pub async fn upload_trace(&self, vm: VmId, host: &str, path: &Path) -> Result<(), ClientError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| ClientError::from_io("open", path, e))?;
        let id = vm.to_string();
        let segments = ["v1", "vms", id.as_str(), "trace", "data"];
        let mut url = self.url(&segments);
        url.query_pairs_mut().append_pair("host", host);
        let res = self
            .http
            .put(url)
            .bearer_auth(&self.token)
            .timeout(BLOB_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(file_chunks(file)))
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                method: Method::PUT,
                path: segments.join("/"),
                source,
            })?;
        Self::check(Method::PUT, segments.join("/"), res).await?;
        Ok(())
    }

    /// `POST /v1/blobs/import` (admin): a file from the server's import directory.
    pub async fn import_blob(&self, path: &str) -> Result<Blob, ClientError> {
        let body = ImportBlob {
            path: path.to_owned(),
        };
        self.json(Method::POST, &["v1", "blobs", "import"], Some(&body))
            .await
    }

    /// `GET /v1/blobs`.
    pub async fn list_blobs(&self) -> Result<Vec<Blob>, ClientError> {
        self.json(Method::GET, &["v1", "blobs"], NO_BODY).await
    }

    /// `GET /v1/blobs/{digest}` into `dest`, verifying the digest. `dest` is written
    /// whole or not at all (a temporary file beside it, renamed once verified).
    pub async fn download_blob(
        &self,
        digest: &BlobDigest,
        dest: &Path,
    ) -> Result<u64, ClientError> {
        let segments = ["v1", "blobs", digest.as_str()];
        let path = segments.join("/");
        let res = self
            .execute_any(&Method::GET, &path, |base| {
                self.http
                    .get(Self::join(base, &segments))
                    .bearer_auth(&self.token)
                    .timeout(BLOB_TIMEOUT)
            })
            .await?;
        let mut res = Self::check(Method::GET, path.clone(), res).await?;
        let tmp = dest.with_extension(format!("part-{}", std::process::id()));
        let result = async {
            // Buffered: the response arrives in chunks of a few KiB, and each write to a
            // tokio file is a trip to a blocking thread.
            let mut out = tokio::io::BufWriter::with_capacity(
                UPLOAD_CHUNK,
                tokio::fs::File::create(&tmp)
                    .await
                    .map_err(|e| ClientError::from_io("create", &tmp, e))?,
            );
            let mut hash = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = res.chunk().await.map_err(|source| ClientError::Transport {
                method: Method::GET,
                path: path.clone(),
                source,
            })? {
                hash.update(&chunk);
                size += chunk.len() as u64;
                out.write_all(&chunk)
                    .await
                    .map_err(|e| ClientError::from_io("write", &tmp, e))?;
            }
            out.flush()
                .await
                .map_err(|e| ClientError::from_io("write", &tmp, e))?;
            out.get_ref()
                .sync_all()
                .await
                .map_err(|e| ClientError::from_io("sync", &tmp, e))?;
            let got = BlobDigest::from_sha256(hash.finalize().into());
            if got != *digest {
                return Err(ClientError::DigestMismatch {
                    expected: digest.clone(),
                    got,
                });
            }
            tokio::fs::rename(&tmp, dest)
                .await
                .map_err(|e| ClientError::from_io("rename onto", dest, e))?;
            Ok(size)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Uploads an image's local files and creates the image from them: what
    /// `vinfra image upload` does.
    pub async fn upload_image(
        &self,
        files: &ImageFiles,
        mut req: CreateImage,
    ) -> Result<Image, ClientError> {
        for (path, field) in [
            (&files.kernel, &mut req.kernel),
            (&files.initrd, &mut req.initrd),
            (&files.disk_template, &mut req.disk_template),
        ] {
            if let Some(p) = path {
                *field = Some(self.upload_blob(p).await?.digest.to_string());
            }
        }
        self.create_image(&req).await
    }
}
