//! This host's side of a live migration with cache rebuild.
//!
//! Source: uploads its cache snapshot (heat map, access pattern, which blocks it holds)
//! while the migration is `pending`; when the destination is `ready` it moves the VM's
//! memory with QEMU's live migration and reports `warming` (the switch-over); then it
//! keeps serving its cache to the destination (`peer-ID` export) until the migration
//! is over. After a crash the restarted agent reopens and verifies that cache and
//! serves it again on the same port, so the destination still fetches from it.
//!
//! Destination: with the snapshot, opens its own cache for the VM with the source's
//! cache as peer (misses go to the peer, the origin only for blocks the peer lacks),
//! plans the fetch order (`heat+pattern` by default), exports the disk and starts QEMU
//! waiting for the stream (`ready`). At switch-over it starts the background rebuild;
//! guest misses go first. It reports progress, and `completed` when the plan is done;
//! then, for [`model::WARMUP_REPORT_MS`], the cache's hits and misses (the curve's tail).

use std::str::FromStr;
use std::sync::Arc;

use cache::{
    prepare_destination, BlockIdx, BlockSize, BlockSource, Generation, MigrationSnapshot,
    PeerNbdSource, Rebuild, SourceError, Strategy,
};
use model::api::{Assignment, MigrationReport};
use model::{CacheProgress, Migration, MigrationId, MigrationState, QemuMigrationStats};
use nbd::{NbdAddr, ReconnectPolicy};

use crate::disks::peer_export;
use crate::local;
use crate::phase::{side, MigLocal, Side, VmPhase};
use crate::vm::VmTask;

/// Errors of a migration step on this host.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Starting or using the VM's disk or hypervisor failed.
    #[error(transparent)]
    Start(#[from] local::StartError),
    /// The snapshot from the source cannot be read.
    #[error("the source's cache snapshot is not valid JSON")]
    Snapshot(#[source] serde_json::Error),
    /// The peer address is missing or not IP:PORT.
    #[error("migration {0} has no usable peer address")]
    NoPeer(MigrationId),
    /// The strategy is unknown to this agent.
    #[error("unknown fetch strategy {0:?}")]
    Strategy(String),
    /// The source's cache could not be reached.
    #[error("cannot reach the source's cache")]
    Peer(#[source] cache::SourceError),
    /// The source's cache is beyond loopback and this agent has no TLS for it.
    #[error("{0}")]
    PeerTls(String),
    /// The migration was interrupted in a way it cannot resume from.
    #[error("{0}")]
    Interrupted(&'static str),
    /// A blocking task died.
    #[error("a background task failed")]
    Join(#[from] tokio::task::JoinError),
    /// The API refused or failed.
    #[error("control plane request failed")]
    Api(#[from] client::ClientError),
    /// The hypervisor failed.
    #[error("the hypervisor failed")]
    Compute(#[from] compute::ComputeError),
    /// The cache could not start or finish a pre-copy.
    #[error("cache pre-copy failed")]
    Precopy(#[from] cache::CacheError),
}

impl VmTask {
    fn mig_report(&self, state: MigrationState) -> MigrationReport {
        MigrationReport {
            host: self.host.cfg.host_name.clone(),
            state,
            incoming_uri: None,
            qemu: None,
            progress: None,
            error: None,
            dirty: None,
        }
    }

    /// Sends a report on migration `id`, remembering the state once the server took it.
    async fn send_mig(&mut self, id: MigrationId, r: &MigrationReport) -> Result<(), MigrateError> {
        self.host.client.report_migration(id, r).await?;
        self.mig_reported = Some((id, r.state));
        Ok(())
    }

    /// Reports a failure; logs if even that fails (the next pass retries).
    async fn mig_fail(&mut self, m: &Migration, e: &(dyn std::error::Error + Send + Sync)) {
        let reason = model::error_chain(e);
        tracing::error!(migration = %m.id, vm = %m.vm_name, error = %reason, "migration failed");
        let mut r = self.mig_report(MigrationState::Failed);
        r.error = Some(reason);
        if let Err(e) = self.send_mig(m.id, &r).await {
            tracing::warn!(error = %e, "cannot report the migration failure");
        }
    }

    /// One step of this host's side of the VM's migration (the phase is
    /// `MigratingOut` or `MigratingIn` for it).
    pub(crate) async fn migration_step(&mut self, a: &Assignment) {
        let Some(m) = &a.migration else { return };
        let Some(side) = side(m, &self.host.cfg.host_name) else {
            return;
        };
        let result = match side {
            Side::Source => self.source_step(a, m).await,
            Side::Destination => self.dest_step(a, m).await,
        };
        match result {
            Ok(()) => {}
            // The control plane failed to answer (a 5xx while a store member dies, a
            // dropped connection): nothing is known to be wrong with the migration, and
            // every step is repeated from the state the next assignment shows, so this
            // one is tried again instead of failing the migration.
            Err(MigrateError::Api(e)) if e.status().is_none_or(|s| s >= 500) => {
                tracing::warn!(migration = %m.id, error = %model::error_chain(&e), "control plane unavailable for a migration step; retried next pass");
            }
            Err(e) => self.mig_fail(m, &e).await,
        }
    }

    async fn source_step(&mut self, a: &Assignment, m: &Migration) -> Result<(), MigrateError> {
        let id = a.vm.id;
        match m.state {
            MigrationState::Pending => {
                if self.phase.mig().is_some_and(|x| x.snapshot_sent) {
                    return Ok(());
                }
                if m.strategy == Strategy::FullCopy.name()
                    && self.phase.mig().is_some_and(|x| x.paused_at.is_none())
                {
                    // vSphere-style full copy: the whole cache crosses while the guest is
                    // paused, so no write on this side can make a copied block stale; the
                    // pause is the price, and it counts in the reported downtime.
                    self.host.driver.pause(&self.files.driver_id()).await?;
                    if let Some(x) = self.phase.mig_mut() {
                        x.paused_at = Some(std::time::Instant::now());
                    }
                }
                let cache = self.open_cache(a).await?;
                let precopy = m.precopy;
                let snap = tokio::task::spawn_blocking(move || {
                    // From the snapshot on, every write is on the dirty list: with
                    // pre-copy the destination drops those blocks at switch-over.
                    if precopy {
                        cache.track_writes();
                    }
                    cache.migration_snapshot()
                })
                .await?;
                let bytes = serde_json::to_vec(&snap).map_err(MigrateError::Snapshot)?;
                tracing::info!(migration = %m.id, blocks = snap.blocks.len(), bytes = bytes.len(), "uploading cache snapshot");
                self.host.client.put_migration_snapshot(m.id, bytes).await?;
                if let Some(x) = self.phase.mig_mut() {
                    x.snapshot_sent = true;
                }
                Ok(())
            }
            MigrationState::Ready | MigrationState::Migrating => {
                let away = self.phase.mig().is_some_and(|x| x.migrated_away);
                if !away {
                    if m.state == MigrationState::Migrating {
                        // We restarted in the middle of moving memory: whatever QEMU did,
                        // the destination cannot know; fail, the VM stays here.
                        return Err(MigrateError::Interrupted(
                            "the source agent restarted while QEMU was moving memory",
                        ));
                    }
                    let Some(uri) = m.incoming_uri.clone() else {
                        return Ok(());
                    };
                    let r = self.mig_report(MigrationState::Migrating);
                    self.send_mig(m.id, &r).await?;
                    let opts = compute::MigrateOptions {
                        downtime_limit_ms: Some(50),
                        max_bandwidth: Some(1 << 30),
                        tls: crate::migration_tls(&self.host.cfg, &uri, m.to_host.as_str())
                            .map_err(MigrateError::PeerTls)?,
                        ..Default::default()
                    };
                    let stats = self
                        .host
                        .driver
                        .migrate(&self.files.driver_id(), &uri, &opts)
                        .await?;
                    tracing::info!(migration = %m.id, total_ms = stats.total_time_ms, downtime_ms = stats.downtime_ms, "memory moved");
                    self.host.disks.unexport_guest(id);
                    if let Some(x) = self.phase.mig_mut() {
                        x.migrated_away = true;
                        // Guest-visible downtime: QEMU's, plus a full copy's pause.
                        let paused_ms = x.paused_at.map_or(0, |t| {
                            u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
                        });
                        x.qemu = Some(QemuMigrationStats {
                            total_ms: stats.total_time_ms,
                            downtime_ms: stats.downtime_ms.max(paused_ms),
                            ram_bytes: stats.ram_transferred_bytes,
                        });
                    }
                }
                let mut r = self.mig_report(MigrationState::Warming);
                r.qemu = self.phase.mig().and_then(|x| x.qemu.clone());
                if m.precopy {
                    r.dirty = Some(self.dirty_list());
                    // The cache as of switch-over, for the destination to plan again
                    // (replacing the first snapshot; sent again with a re-sent report).
                    if let Some(cache) = self.disk.cache.clone() {
                        let snap =
                            tokio::task::spawn_blocking(move || cache.migration_snapshot()).await?;
                        let bytes = serde_json::to_vec(&snap).map_err(MigrateError::Snapshot)?;
                        self.host.client.put_migration_snapshot(m.id, bytes).await?;
                    }
                }
                self.send_mig(m.id, &r).await?;
                Ok(())
            }
            MigrationState::Warming => {
                // Serve the cache to the destination; after a crash, reopen (verify) it.
                if self.disk.cache.is_none() {
                    let cache = self.open_cache(a).await?;
                    self.host.disks.export_peer(id, &cache);
                    tracing::info!(migration = %m.id, "serving the cache to the destination again");
                }
                if let Some(x) = self.phase.mig_mut() {
                    x.migrated_away = true;
                }
                Ok(())
            }
            MigrationState::Completed | MigrationState::Failed => Ok(()),
        }
    }

    /// Source, pre-copy, after QEMU's switch-over (the guest here can no longer write):
    /// the blocks written since the snapshot. Taken once and kept for a re-sent report;
    /// without the tracking (the cache was reopened) or over the size limit, a superset.
    fn dirty_list(&mut self) -> Vec<[u64; 2]> {
        if let Some(d) = self.phase.mig().and_then(|x| x.dirty.clone()) {
            return d;
        }
        let cache = self.disk.cache.clone();
        let mut dirty = match cache.as_ref().and_then(|c| c.take_dirty()) {
            Some(d) => d,
            // Every block: the destination then trusts nothing it copied early.
            None => vec![[
                0,
                cache
                    .as_ref()
                    .map_or(u64::MAX >> 1, |c| c.total_blocks().max(1)),
            ]],
        };
        if dirty.len() > model::api::MAX_DIRTY_RANGES {
            let first = dirty.first().map_or(0, |r| r[0]);
            let end = dirty.last().map_or(0, |r| r[0] + r[1]);
            dirty = vec![[first, end - first]];
        }
        if let Some(x) = self.phase.mig_mut() {
            x.dirty = Some(dirty.clone());
        }
        dirty
    }

    /// The VM's cache on this host, opened (after fetching its image's files) if needed.
    async fn open_cache(&mut self, a: &Assignment) -> Result<Arc<cache::BlockCache>, MigrateError> {
        let h = self.host.clone();
        let image = h
            .images
            .paths(&a.image)
            .await
            .map_err(local::StartError::from)?;
        Ok(local::ensure_cache(&h.disks, &self.files, a, &image, &mut self.disk).await?)
    }

    async fn dest_step(&mut self, a: &Assignment, m: &Migration) -> Result<(), MigrateError> {
        match m.state {
            MigrationState::Pending => {
                let uri = match self.phase.mig().and_then(|x| x.incoming_uri.clone()) {
                    Some(u) => u,
                    None => match self.prepare_incoming(a, m).await? {
                        Some(u) => u,
                        None => return Ok(()), // no snapshot yet
                    },
                };
                let mut r = self.mig_report(MigrationState::Ready);
                r.incoming_uri = Some(uri);
                self.send_mig(m.id, &r).await?;
                Ok(())
            }
            MigrationState::Ready | MigrationState::Migrating => Ok(()),
            MigrationState::Warming => {
                let resume = m.strategy == Strategy::FullCopy.name()
                    && self.phase.mig().is_some_and(|x| !x.resumed);
                if resume {
                    // The source was paused for the copy, so the guest arrived paused.
                    self.host.driver.resume(&self.files.driver_id()).await?;
                    if let Some(x) = self.phase.mig_mut() {
                        x.resumed = true;
                    }
                }
                let cache = self.disk.cache.clone();
                let pending = cache.as_ref().is_some_and(|c| c.precopy_pending());
                if pending {
                    // Pre-copy: the source's dirty list came with the switch-over; until it
                    // is applied the copied blocks are provisional (never served).
                    let Some(dirty) = m.dirty.clone() else {
                        return Ok(()); // not recorded yet: the next pass
                    };
                    if let Some(c) = cache.clone() {
                        let c2 = c.clone();
                        let dropped =
                            tokio::task::spawn_blocking(move || c2.apply_dirty(&dirty)).await??;
                        tracing::info!(migration = %m.id, dropped, "pre-copy: the source's dirty list applied");
                        if let Some(x) = self.phase.mig_mut() {
                            x.precopy_dropped = Some(dropped);
                        }
                        self.replan(m, &c).await?;
                    }
                }
                let Some(x) = self.phase.mig_mut() else {
                    return Ok(());
                };
                x.switched = true;
                if x.base.is_none() {
                    x.base = cache.as_ref().map(|c| c.stats());
                }
                if let Some(plan) = x.plan.take() {
                    if let Some(c) = &cache {
                        tracing::info!(migration = %m.id, planned = plan.blocks.len(), strategy = %m.strategy, "switched over: rebuilding the cache");
                        x.rebuild = Some(Rebuild::start(c.clone(), plan));
                    }
                }
                let finished = x.rebuild.as_ref().is_none_or(|r| r.is_finished());
                let progress = progress(x, cache.as_deref());
                let mut r = self.mig_report(if finished {
                    MigrationState::Completed
                } else {
                    MigrationState::Warming
                });
                r.progress = Some(progress);
                self.send_mig(m.id, &r).await?;
                if finished {
                    tracing::info!(migration = %m.id, "cache rebuilt: migration complete");
                    if let (Some(c), Some(p)) = (&cache, r.progress.take()) {
                        let base = self.phase.mig().and_then(|x| x.base).unwrap_or_default();
                        self.report_after_completion(m.id, p, base, c);
                    }
                    self.phase = VmPhase::Running;
                }
                Ok(())
            }
            MigrationState::Completed | MigrationState::Failed => Ok(()),
        }
    }

    /// After `completed`: reports the cache's hits and misses since switch-over once a
    /// second for [`model::WARMUP_REPORT_MS`] (state `completed`, progress only), so that
    /// the hit-ratio curve shows the cache serving the guest after the rebuild, which on
    /// a small disk ends before the guest has read much. Best effort, in a task of its
    /// own: it ends early when the VM's cache is closed (the VM deleted or gone), on a
    /// refusal, and with the agent process; a failed request only loses its sample.
    fn report_after_completion(
        &self,
        id: MigrationId,
        last: CacheProgress,
        base: cache::CacheStats,
        cache: &Arc<cache::BlockCache>,
    ) {
        let client = self.host.client.clone();
        let host = self.host.cfg.host_name.clone();
        let cache = Arc::downgrade(cache);
        tokio::spawn(async move {
            let every = std::time::Duration::from_millis(model::WARMUP_REPORT_EVERY_MS);
            for _ in 0..model::WARMUP_REPORT_MS / model::WARMUP_REPORT_EVERY_MS {
                tokio::time::sleep(every).await;
                let Some(c) = cache.upgrade() else { return };
                let mut p = last.clone();
                cache_figures(&mut p, &c.stats(), base);
                drop(c);
                let r = MigrationReport {
                    host: host.clone(),
                    state: MigrationState::Completed,
                    incoming_uri: None,
                    qemu: None,
                    progress: Some(p),
                    error: None,
                    dirty: None,
                };
                match client.report_migration(id, &r).await {
                    Ok(_) => {}
                    Err(e) if e.status().is_some_and(|s| s < 500) => {
                        tracing::debug!(migration = %id, error = %model::error_chain(&e), "figures after completion refused; stopping them");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(migration = %id, error = %model::error_chain(&e), "figures after completion not sent");
                    }
                }
            }
        });
    }

    /// The source's cache as a block source: its NBD peer export, asked only for the
    /// blocks `snap` lists.
    async fn peer_source(
        &self,
        m: &Migration,
        snap: &MigrationSnapshot,
    ) -> Result<Arc<dyn BlockSource>, MigrateError> {
        let h = &self.host;
        let peer_addr: std::net::SocketAddr = m
            .peer_nbd
            .as_deref()
            .and_then(|p| p.parse().ok())
            .ok_or(MigrateError::NoPeer(m.id))?;
        let block_size = BlockSize::new(snap.block_size).unwrap_or(BlockSize::DEFAULT);
        let have = snap.block_set();
        let export = peer_export(m.vm);
        let policy = ReconnectPolicy {
            tls: crate::peer_tls(&h.cfg, peer_addr, m.from_host.as_str())
                .map_err(MigrateError::PeerTls)?,
            ..ReconnectPolicy::default()
        };
        let peer = tokio::task::spawn_blocking(move || {
            PeerNbdSource::connect(NbdAddr::Tcp(peer_addr), &export, policy, have, block_size)
        })
        .await?
        .map_err(MigrateError::Peer)?;
        Ok(match peer_delay() {
            Some(delay) => Arc::new(SlowSource { inner: peer, delay }),
            None => Arc::new(peer),
        })
    }

    /// Pre-copy, at switch-over: the plan made when the migration started went stale
    /// while memory moved (the guest read blocks it does not know, and heat moved). With
    /// the source's snapshot as of switch-over, plan again; what is cached is skipped.
    /// Without that snapshot (a restarted server), the first rebuild goes on.
    async fn replan(
        &mut self,
        m: &Migration,
        cache: &Arc<cache::BlockCache>,
    ) -> Result<(), MigrateError> {
        let Some(bytes) = self.host.client.get_migration_snapshot(m.id).await? else {
            return Ok(());
        };
        let snap: MigrationSnapshot =
            serde_json::from_slice(&bytes).map_err(MigrateError::Snapshot)?;
        let strategy = Strategy::from_str(&m.strategy)
            .map_err(|_| MigrateError::Strategy(m.strategy.clone()))?;
        let peer = self.peer_source(m, &snap).await?;
        let old = self.phase.mig_mut().and_then(|x| x.rebuild.take());
        let c = cache.clone();
        let rebuild = tokio::task::spawn_blocking(move || {
            // Stops the first rebuild after the block in hand (dropping joins it).
            drop(old);
            let plan = prepare_destination(&c, &snap, peer, strategy);
            tracing::info!(
                planned = plan.blocks.len(),
                "pre-copy: planned again at switch-over"
            );
            Rebuild::start(c, plan)
        })
        .await?;
        if let Some(x) = self.phase.mig_mut() {
            x.rebuild = Some(rebuild);
        }
        Ok(())
    }

    /// Opens the destination cache with the source as peer, plans, exports the disk and
    /// starts QEMU waiting for the stream. `None` while the snapshot is not there yet.
    async fn prepare_incoming(
        &mut self,
        a: &Assignment,
        m: &Migration,
    ) -> Result<Option<String>, MigrateError> {
        let id = a.vm.id;
        let h = self.host.clone();
        let Some(bytes) = h.client.get_migration_snapshot(m.id).await? else {
            return Ok(None);
        };
        let snap: MigrationSnapshot =
            serde_json::from_slice(&bytes).map_err(MigrateError::Snapshot)?;
        let strategy = Strategy::from_str(&m.strategy)
            .map_err(|_| MigrateError::Strategy(m.strategy.clone()))?;
        let image = h
            .images
            .paths(&a.image)
            .await
            .map_err(local::StartError::from)?;
        let spec = local::vm_spec(&self.files, a, &image, h.cfg.accel, h.disks.addr())?;
        let cache = local::ensure_cache(&h.disks, &self.files, a, &image, &mut self.disk).await?;
        let peer = self.peer_source(m, &snap).await?;
        let c2 = cache.clone();
        let mut plan = Some(
            tokio::task::spawn_blocking(move || prepare_destination(&c2, &snap, peer, strategy))
                .await?,
        );
        if strategy == Strategy::FullCopy {
            // vSphere-style: the whole cache crosses before switch-over.
            if let Some(p) = plan.take() {
                let c3 = cache.clone();
                let done =
                    tokio::task::spawn_blocking(move || Rebuild::start(c3, p).join()).await?;
                tracing::info!(migration = %m.id, installed = done.installed, "full copy done before switch-over");
            }
        }
        let mut rebuild = None;
        if m.precopy && strategy.uses_peer() && strategy != Strategy::FullCopy {
            // Pre-copy: fetch while the memory moves; what arrives is provisional until
            // the source's dirty list (at switch-over) says which blocks it rewrote.
            if let Some(p) = plan.take() {
                let c3 = cache.clone();
                rebuild = Some(
                    tokio::task::spawn_blocking(move || {
                        c3.begin_precopy().map(|()| Rebuild::start(c3, p))
                    })
                    .await??,
                );
                tracing::info!(migration = %m.id, "pre-copy: rebuilding the cache while memory moves");
            }
        }
        h.plumbing()
            .plug(self.files.run_dir(), a.vm.name.as_str(), &a.vm.nics)
            .await
            .map_err(local::StartError::from)?;
        h.disks.export(id, &cache);
        // Another machine's QEMU reaches us on the data network, over TLS; hosts of
        // one machine stay on loopback.
        let (listen_ip, tls) = match (h.cfg.uplink_ip, crate::qemu_tls_dir(&h.cfg)) {
            (Some(ip), Some(dir)) => (
                std::net::IpAddr::V4(ip),
                Some(compute::MigrationTls {
                    dir,
                    peer_name: m.from_host.to_string(),
                }),
            ),
            _ => (std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), None),
        };
        let rt = h
            .driver
            .start_incoming(&spec, std::net::SocketAddr::new(listen_ip, 0), tls.as_ref())
            .await?;
        let Some(incoming) = rt.incoming else {
            return Err(MigrateError::Interrupted(
                "the destination QEMU reported no incoming address",
            ));
        };
        let uri = format!("tcp:{incoming}");
        if let Some(x) = self.phase.mig_mut() {
            x.plan = plan;
            x.rebuild = rebuild;
            x.incoming_uri = Some(uri.clone());
        }
        tracing::info!(migration = %m.id, %uri, "ready for the migration stream");
        Ok(Some(uri))
    }
}

fn progress(x: &MigLocal, cache: Option<&cache::BlockCache>) -> CacheProgress {
    let (planned, done, left) = match &x.rebuild {
        Some(r) => {
            let p = r.progress();
            (p.planned, p.done, p.left())
        }
        None => (0, 0, 0),
    };
    let mut out = CacheProgress {
        planned,
        done,
        left,
        precopy_dropped: x.precopy_dropped.unwrap_or(0),
        ..Default::default()
    };
    if let Some(c) = cache {
        cache_figures(&mut out, &c.stats(), x.base.unwrap_or_default());
    }
    out
}

/// The cache's byte counters and its guest hits and misses since `base` (switch-over).
fn cache_figures(out: &mut CacheProgress, s: &cache::CacheStats, base: cache::CacheStats) {
    out.peer_bytes = s.bytes_from_peer;
    out.origin_bytes = s.bytes_from_origin;
    out.hits = s.hits.saturating_sub(base.hits);
    out.misses = s.misses.saturating_sub(base.misses);
    let total = out.hits + out.misses;
    #[allow(clippy::cast_precision_loss)] // a ratio for display
    {
        out.hit_ratio = if total == 0 {
            0.0
        } else {
            out.hits as f64 / total as f64
        };
    }
}

/// Fail point for crash tests: `VINFRA_PEER_DELAY_MS` slows every block read from a
/// migration peer, so that a test can kill the source host in the middle of the
/// rebuild instead of racing a sub-second warm-up. Unset in production.
fn peer_delay() -> Option<std::time::Duration> {
    std::env::var("VINFRA_PEER_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis)
}

/// A peer slowed down by [`peer_delay`].
#[derive(Debug)]
struct SlowSource {
    inner: PeerNbdSource,
    delay: std::time::Duration,
}

impl BlockSource for SlowSource {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn read_block(&self, idx: BlockIdx, buf: &mut [u8]) -> Result<Option<Generation>, SourceError> {
        std::thread::sleep(self.delay);
        self.inner.read_block(idx, buf)
    }
}
