//! Persisted vSwitch controller counters: the API server saves its controller's snapshot
//! every few seconds and restores it at start, so traffic totals survive a server restart
//! (the snapshot format belongs to the `net` crate; here it is opaque bytes).

use bytes::Bytes;

use crate::records::keys;
use crate::{Control, ControlError};

impl Control {
    /// The last saved snapshot of `server`'s controller of `domain`, if any.
    pub async fn traffic_snapshot(
        &self,
        domain: &str,
        server: &str,
    ) -> Result<Option<Bytes>, ControlError> {
        Ok(self
            .store()
            .get(&keys::traffic(domain, server))
            .await?
            .map(|kv| kv.value))
    }

    /// Replaces the saved snapshot (a single writer per key: the server itself).
    pub async fn save_traffic_snapshot(
        &self,
        domain: &str,
        server: &str,
        snapshot: Bytes,
    ) -> Result<(), ControlError> {
        self.store()
            .put(&keys::traffic(domain, server), snapshot)
            .await?;
        Ok(())
    }
}
