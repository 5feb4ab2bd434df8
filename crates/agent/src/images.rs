//! Image files on this host: the kernels, initrds and disk templates of the images
//! its VMs boot, fetched from the control plane's image store by digest and kept
//! under `<data_dir>/images/<hex digest>`.
//!
//! A file is there only once its bytes hashed to its digest (the client writes a
//! temporary file and renames it after checking), so its presence is its proof and
//! a restart does not hash it again. Images name no host path: an image record from
//! before the image store is refused with the reason.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use client::Client;
use model::{BlobDigest, Image, ValidationError};

/// Subdirectory of the data dir holding the image files.
pub const IMAGES_DIR: &str = "images";

/// Why an image's files are not here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The image names something other than image-store blobs (a host path).
    #[error("image {image} cannot boot")]
    NotFromStore {
        /// The image.
        image: String,
        /// Which field and why.
        #[source]
        why: ValidationError,
    },
    /// The blob could not be fetched (or hashed wrong).
    #[error("cannot fetch {digest} of image {image}")]
    Fetch {
        /// The image.
        image: String,
        /// The blob.
        digest: BlobDigest,
        /// The cause.
        #[source]
        err: client::ClientError,
    },
}

/// Local paths of an image's files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImagePaths {
    /// Kernel for direct kernel boot.
    pub kernel: Option<PathBuf>,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Disk template each VM's disk is cloned from.
    pub disk_template: Option<PathBuf>,
}

/// The image files of this host.
#[derive(Debug, Clone)]
pub struct ImageFiles {
    dir: PathBuf,
    client: Client,
    /// One fetch per digest at a time: VM tasks start in parallel, and two VMs of one
    /// image must not write the same temporary file at once.
    fetching: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl ImageFiles {
    /// Files under `<data_dir>/images`, fetched with `client`.
    pub fn new(data_dir: &Path, client: Client) -> Self {
        Self {
            dir: data_dir.join(IMAGES_DIR),
            client,
            fetching: Arc::default(),
        }
    }

    /// The local paths of `image`'s files, fetching the ones not here yet.
    pub async fn paths(&self, image: &Image) -> Result<ImagePaths, ImageError> {
        let blobs = image.blobs().map_err(|why| ImageError::NotFromStore {
            image: image.name.to_string(),
            why,
        })?;
        Ok(ImagePaths {
            kernel: self.fetch(image, blobs.kernel.as_ref()).await?,
            initrd: self.fetch(image, blobs.initrd.as_ref()).await?,
            disk_template: self.fetch(image, blobs.disk_template.as_ref()).await?,
        })
    }

    async fn fetch(
        &self,
        image: &Image,
        digest: Option<&BlobDigest>,
    ) -> Result<Option<PathBuf>, ImageError> {
        let Some(digest) = digest else {
            return Ok(None);
        };
        let path = self.dir.join(digest.hex());
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(Some(path));
        }
        let lock = {
            let mut m = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(digest.hex().to_owned()).or_default().clone()
        };
        let _one_at_a_time = lock.lock().await;
        // Another task may have fetched it while this one waited.
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(Some(path));
        }
        let fail = |err| ImageError::Fetch {
            image: image.name.to_string(),
            digest: digest.clone(),
            err,
        };
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| fail(client::ClientError::from_io("create", &self.dir, e)))?;
        let size = self
            .client
            .download_blob(digest, &path)
            .await
            .map_err(fail)?;
        tracing::info!(image = %image.name, %digest, size, "image file fetched");
        Ok(Some(path))
    }
}
