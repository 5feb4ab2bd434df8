//! Migration cache snapshots (the source's heat map, access pattern and block list, for
//! the destination to plan its rebuild from), kept in the store.
//!
//! The source agent uploads the snapshot to whichever server it talks to, and the
//! destination agent downloads it from whichever server it talks to: with several servers
//! on one etcd those need not be the same, and a server may restart in between. So the
//! snapshot is not held in a server's memory: an upload is written to the store as it
//! arrives, in chunks of [`CHUNK`] bytes (etcd takes at most 1.5 MiB per request by
//! default), and a download reads it back chunk by chunk; neither holds the whole
//! snapshot.
//!
//! Layout, under [`PREFIX`] (outside `/vinfra/`, so that the push hubs' watch of
//! `/vinfra/` does not carry megabytes of snapshot to every server):
//! `{PREFIX}{migration}/head` says which upload is whole (`current`) and lists every
//! upload ever begun (`uploads`); `{PREFIX}{migration}/{upload}/{i:06}` are the chunks.
//! An upload is recorded in the head before its first chunk and made current after its
//! last, so a reader never sees a partial upload, and a pre-copy's second upload replaces
//! the first for later readers while a reader of the first still finds its chunks. Every
//! upload's chunks go when the migration ends (its final report), or at once when the
//! upload itself fails; an upload cut by a server crash is found through the head then.

use bytes::{Bytes, BytesMut};
use model::{MigrationId, MigrationState};
use serde::{Deserialize, Serialize};
use store::StoreError;

use crate::records::{get_json, to_bytes, CAS_ATTEMPTS};
use crate::{Control, ControlError, Scope};

/// Where snapshots live (see the module doc for why not under `/vinfra/`).
pub const PREFIX: &str = "/vinfra-snapshots/migrations/";
/// Bytes per chunk: well under etcd's default request limit (1.5 MiB).
pub const CHUNK: usize = 512 * 1024;
/// Largest snapshot accepted: the heat map and pattern are bounded by the cache's
/// capacity (a few MiB for a 1 GiB cache of 64 KiB blocks).
pub const MAX_SNAPSHOT: usize = 64 << 20;

fn head_key(m: MigrationId) -> String {
    format!("{PREFIX}{m}/head")
}

fn chunk_key(m: MigrationId, upload: uuid::Uuid, i: u32) -> String {
    format!("{PREFIX}{m}/{upload}/{i:06}")
}

/// Which upload of a migration's snapshot is whole, and every upload begun.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Head {
    current: Option<Whole>,
    uploads: Vec<uuid::Uuid>,
}

/// A whole upload.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Whole {
    upload: uuid::Uuid,
    chunks: u32,
    bytes: u64,
}

/// Why a snapshot cannot be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The migration has ended: nobody will read it.
    #[error("migration {migration} is {}", .state.as_str())]
    Finished {
        /// The migration.
        migration: MigrationId,
        /// Its state.
        state: MigrationState,
    },
    /// Over [`MAX_SNAPSHOT`].
    #[error("snapshot: exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// No snapshot was uploaded yet.
    #[error("snapshot of migration {0} not found")]
    NotUploaded(MigrationId),
    /// A chunk of a whole upload is missing (the migration ended while it was read).
    #[error("snapshot of migration {migration}: chunk {chunk} is gone (the migration ended?)")]
    ChunkGone {
        /// The migration.
        migration: MigrationId,
        /// The chunk.
        chunk: u32,
    },
    /// The store, or no such migration.
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl From<StoreError> for SnapshotError {
    fn from(e: StoreError) -> Self {
        SnapshotError::Control(e.into())
    }
}

/// An upload being written: feed it with [`SnapshotUpload::write`], end it with
/// [`SnapshotUpload::finish`], or drop it after [`SnapshotUpload::abandon`].
#[derive(Debug)]
pub struct SnapshotUpload {
    control: Control,
    migration: MigrationId,
    upload: uuid::Uuid,
    buf: BytesMut,
    chunks: u32,
    bytes: u64,
}

/// A whole snapshot to read, chunk by chunk.
#[derive(Debug, Clone)]
pub struct SnapshotRead {
    control: Control,
    migration: MigrationId,
    whole: Whole,
}

impl Control {
    /// Reads-modifies-writes a migration's snapshot head (created on first use).
    async fn update_head(
        &self,
        m: MigrationId,
        mut change: impl FnMut(&mut Head),
    ) -> Result<Head, ControlError> {
        let key = head_key(m);
        for _ in 0..CAS_ATTEMPTS {
            let (mut head, rev) = match get_json::<Head>(self.store(), &key).await? {
                Some((h, rev)) => (h, Some(rev)),
                None => (Head::default(), None),
            };
            change(&mut head);
            match self.store().cas(&key, rev, to_bytes(&head)?).await {
                Ok(_) => return Ok(head),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("snapshot of migration {m}"),
        })
    }

    /// Begins an upload of migration `id`'s snapshot (the migration must not have ended).
    pub async fn begin_snapshot(&self, id: &str) -> Result<SnapshotUpload, SnapshotError> {
        let (m, _) = self.migration(Scope::All, id).await?;
        if m.state.is_final() {
            return Err(SnapshotError::Finished {
                migration: m.id,
                state: m.state,
            });
        }
        let upload = uuid::Uuid::new_v4();
        self.update_head(m.id, |h| h.uploads.push(upload)).await?;
        Ok(SnapshotUpload {
            control: self.clone(),
            migration: m.id,
            upload,
            buf: BytesMut::with_capacity(CHUNK),
            chunks: 0,
            bytes: 0,
        })
    }

    /// The whole snapshot of migration `id`, to read chunk by chunk.
    pub async fn snapshot(&self, id: &str) -> Result<SnapshotRead, SnapshotError> {
        let (m, _) = self.migration(Scope::All, id).await?;
        let whole = get_json::<Head>(self.store(), &head_key(m.id))
            .await?
            .and_then(|(h, _)| h.current)
            .ok_or(SnapshotError::NotUploaded(m.id))?;
        Ok(SnapshotRead {
            control: self.clone(),
            migration: m.id,
            whole,
        })
    }

    /// Removes every upload of migration `m`'s snapshot and its head (best effort: a
    /// failure is logged, and the keys stay until an operator removes them).
    pub(crate) async fn drop_snapshots(&self, m: MigrationId) {
        let head = match get_json::<Head>(self.store(), &head_key(m)).await {
            Ok(Some((h, _))) => h,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(migration = %m, error = %e, "cannot read the snapshot head");
                return;
            }
        };
        for upload in &head.uploads {
            if let Err(e) = self.drop_upload(m, *upload).await {
                tracing::warn!(migration = %m, error = %e, "cannot remove a snapshot upload");
                return;
            }
        }
        if let Err(e) = self.store().delete(&head_key(m)).await {
            tracing::warn!(migration = %m, error = %e, "cannot remove the snapshot head");
        }
    }

    /// Deletes an upload's chunks: they are numbered from 0 without gaps, so the first
    /// one absent is the end.
    async fn drop_upload(&self, m: MigrationId, upload: uuid::Uuid) -> Result<(), StoreError> {
        let mut i = 0;
        while self.store().delete(&chunk_key(m, upload, i)).await? {
            i += 1;
        }
        Ok(())
    }
}

impl SnapshotUpload {
    /// Adds `data`, writing every full chunk to the store.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), SnapshotError> {
        let total = self.bytes + (self.buf.len() + data.len()) as u64;
        if total > MAX_SNAPSHOT as u64 {
            return Err(SnapshotError::TooLarge {
                limit: MAX_SNAPSHOT,
            });
        }
        while !data.is_empty() {
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SnapshotError> {
        let chunk = self.buf.split().freeze();
        let n = chunk.len() as u64;
        self.control
            .store()
            .put(&chunk_key(self.migration, self.upload, self.chunks), chunk)
            .await?;
        self.chunks += 1;
        self.bytes += n;
        Ok(())
    }

    /// Writes the last chunk and makes this upload the one readers get.
    pub async fn finish(mut self) -> Result<u64, SnapshotError> {
        if !self.buf.is_empty() {
            self.flush().await?;
        }
        let whole = Whole {
            upload: self.upload,
            chunks: self.chunks,
            bytes: self.bytes,
        };
        self.control
            .update_head(self.migration, |h| h.current = Some(whole))
            .await?;
        tracing::info!(migration = %self.migration, bytes = self.bytes, chunks = self.chunks, "cache snapshot stored");
        Ok(self.bytes)
    }

    /// Removes what this upload wrote (it failed); it stays listed in the head, where
    /// the migration's end finds nothing more of it.
    pub async fn abandon(self) {
        if let Err(e) = self.control.drop_upload(self.migration, self.upload).await {
            tracing::warn!(migration = %self.migration, error = %e, "cannot remove a failed snapshot upload");
        }
    }
}

impl SnapshotRead {
    /// Its size, bytes.
    pub fn len(&self) -> u64 {
        self.whole.bytes
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.whole.bytes == 0
    }

    /// How many chunks it has.
    pub fn chunks(&self) -> u32 {
        self.whole.chunks
    }

    /// Chunk `i` (of [`SnapshotRead::chunks`]).
    pub async fn chunk(&self, i: u32) -> Result<Bytes, SnapshotError> {
        match self
            .control
            .store()
            .get(&chunk_key(self.migration, self.whole.upload, i))
            .await?
        {
            Some(kv) => Ok(kv.value),
            None => Err(SnapshotError::ChunkGone {
                migration: self.migration,
                chunk: i,
            }),
        }
    }
}
