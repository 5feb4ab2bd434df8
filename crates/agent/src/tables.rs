//! Resource tables of this host (docs/SHM.md): the agent is the *element* of each
//! table the server lists for this host. It creates the table ([`shm::Element`]),
//! serves devices on a Unix socket in the data dir, and reports each table's devices,
//! grants, entry versions and audit back to the server when they change.
//!
//! What survives an agent restart: the spec (`{id}.spec.json`, so the table comes back
//! before the server answers) and the entries' contents as of the last snapshot
//! (`{id}.contents`, written after every tick in which a version changed, and at
//! shutdown). Not the versions (the restored entries get new ones), the devices (they
//! see the element gone and connect again), the grants or the audit.
//!
//! Tasks: one, `run`, the only owner of the tables; it takes `Cmd`s from the
//! reconciler (sync, shutdown) and from the VM tasks (a VM's windows on the tables it
//! names: `attach_vm`, `detach_vm`), and ticks every `TICK` to report and snapshot.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use client::Client;
use model::resource_tables::{
    EntryVersion, ResourceTable, ResourceTableReport, TableAuditKind, TableAuditRecord,
    TableDevice, TableGrant, TableTotals, MAX_REPORTED_AUDIT, MAX_REPORTED_DEVICES,
    MAX_REPORTED_ENTRIES,
};
use model::{Name, ResourceTableId, TenantId};
use tokio::sync::{mpsc, oneshot};

/// Subdirectory of the data dir with the tables' sockets, specs and contents.
pub const TABLES_DIR: &str = "resource-tables";

/// How often changed state is reported and contents snapshotted.
const TICK: Duration = Duration::from_millis(500);

/// Fallback re-list when no push arrives.
const RELIST: Duration = Duration::from_secs(30);

/// What the reconciler asks of the tables task.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// List this host's tables at the server and converge to them.
    Sync,
    /// Snapshot every table's contents and stop.
    Shutdown(tokio::sync::oneshot::Sender<()>),
    /// Make a VM a device of the tables it names: one window each.
    AttachVm {
        /// The VM's tenant: only its own tables are looked at.
        tenant: TenantId,
        /// The VM's name (the device's `vm` in the reports).
        vm: String,
        /// The tables, in the VM's order.
        tables: Vec<Name>,
        /// Where the windows' sockets go.
        run_dir: PathBuf,
        /// The windows, or why not (then none is left open).
        reply: oneshot::Sender<Result<Vec<VmWindow>, TableAttachError>>,
    },
    /// Close windows of a VM (its QEMU stopped, or never started).
    DetachVm(Vec<(ResourceTableId, shm::DeviceId)>),
}

/// A VM's window on one table.
#[derive(Debug, Clone)]
pub(crate) struct VmWindow {
    /// The table.
    pub(crate) table: ResourceTableId,
    /// The VM's device id at the table's element.
    pub(crate) device: shm::DeviceId,
    /// What the QEMU driver gets.
    pub(crate) attach: compute::TableAttach,
}

/// Why a VM cannot be made a device of its tables (the VM does not start).
#[derive(Debug, thiserror::Error)]
pub enum TableAttachError {
    /// The VM's tenant has no table of that name on this host.
    #[error("no resource table {table} of the vm's tenant on this host")]
    NoSuchTable {
        /// The name.
        table: Name,
    },
    /// The agent could not create the table.
    #[error("resource table {table} is not served here: {reason}")]
    NotServed {
        /// The name.
        table: Name,
        /// Why.
        reason: String,
    },
    /// The window could not be made.
    #[error("cannot open the vm's window on resource table {table}")]
    Window {
        /// The name.
        table: Name,
        /// Why.
        #[source]
        source: shm::Error,
    },
    /// The tables task has ended (the agent shuts down).
    #[error("the resource tables task has ended")]
    Gone,
}

/// Asks the tables task for windows of VM `vm` (of `tenant`) on `tables`, their sockets
/// in `run_dir`. Nothing to ask without tables.
pub(crate) async fn attach_vm(
    tx: &mpsc::Sender<Cmd>,
    tenant: TenantId,
    vm: &str,
    tables: &[Name],
    run_dir: &Path,
) -> Result<Vec<VmWindow>, TableAttachError> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let (reply, answer) = oneshot::channel();
    tx.send(Cmd::AttachVm {
        tenant,
        vm: vm.to_owned(),
        tables: tables.to_vec(),
        run_dir: run_dir.to_owned(),
        reply,
    })
    .await
    .map_err(|_| TableAttachError::Gone)?;
    answer.await.map_err(|_| TableAttachError::Gone)?
}

/// Closes a VM's windows (those its QEMU still holds detach it as a device).
pub(crate) async fn detach_vm(tx: &mpsc::Sender<Cmd>, windows: Vec<VmWindow>) {
    if windows.is_empty() {
        return;
    }
    let ids = windows.into_iter().map(|w| (w.table, w.device)).collect();
    // The task gone (the agent stops): the elements went with it.
    let _ = tx.send(Cmd::DetachVm(ids)).await;
}

/// Where table `id`'s device socket is.
pub fn socket_path(data_dir: &Path, id: ResourceTableId) -> PathBuf {
    sock_path(&data_dir.join(TABLES_DIR), id)
}

fn sock_path(dir: &Path, id: ResourceTableId) -> PathBuf {
    dir.join(format!("{id}.sock"))
}

fn spec_path(dir: &Path, id: ResourceTableId) -> PathBuf {
    dir.join(format!("{id}.spec.json"))
}

fn contents_path(dir: &Path, id: ResourceTableId) -> PathBuf {
    dir.join(format!("{id}.contents"))
}

/// One table this agent serves.
struct Served {
    spec: ResourceTable,
    element: Result<Arc<shm::Element>, String>,
    /// The last report the server accepted (`reported_at` zeroed).
    reported: Option<ResourceTableReport>,
    /// The versions at the last snapshot.
    snapshot: Vec<u64>,
}

/// The tables task: serves tables until `Cmd::Shutdown` or its sender is dropped.
pub(crate) async fn run(
    client: Client,
    host: String,
    data_dir: PathBuf,
    mut rx: mpsc::Receiver<Cmd>,
) {
    let dir = data_dir.join(TABLES_DIR);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::error!(dir = %dir.display(), error = %e, "cannot create the resource tables dir; none served");
    }
    let mut tables: BTreeMap<ResourceTableId, Served> = BTreeMap::new();
    // The tables of the last run come back at once, before the server answers.
    for spec in local_specs(&dir) {
        start(&mut tables, &dir, spec).await;
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut relist = tokio::time::Instant::now();
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Cmd::Sync) => {
                    sync(&client, &host, &dir, &mut tables).await;
                    relist = tokio::time::Instant::now() + RELIST;
                }
                Some(Cmd::Shutdown(done)) => {
                    snapshot_all(&dir, &mut tables, true).await;
                    let _ = done.send(());
                    return;
                }
                Some(Cmd::AttachVm { tenant, vm, tables: names, run_dir, reply }) => {
                    // A table created just before the VM may not be served yet: list
                    // once before refusing.
                    if !all_served(&tables, tenant, &names) {
                        sync(&client, &host, &dir, &mut tables).await;
                    }
                    let _ = reply.send(attach(&tables, tenant, &vm, &names, &run_dir));
                }
                Some(Cmd::DetachVm(windows)) => detach(&tables, &windows),
                None => {
                    snapshot_all(&dir, &mut tables, true).await;
                    return;
                }
            },
            _ = tick.tick() => {
                if tokio::time::Instant::now() >= relist {
                    sync(&client, &host, &dir, &mut tables).await;
                    relist = tokio::time::Instant::now() + RELIST;
                }
                snapshot_all(&dir, &mut tables, false).await;
                report_all(&client, &host, &dir, &mut tables).await;
            }
        }
    }
}

/// The served table of `tenant` named `name`.
fn find<'a>(
    tables: &'a BTreeMap<ResourceTableId, Served>,
    tenant: TenantId,
    name: &Name,
) -> Option<&'a Served> {
    tables
        .values()
        .find(|t| t.spec.tenant == tenant && t.spec.name == *name)
}

fn all_served(
    tables: &BTreeMap<ResourceTableId, Served>,
    tenant: TenantId,
    names: &[Name],
) -> bool {
    names.iter().all(|n| find(tables, tenant, n).is_some())
}

/// Opens a window for VM `vm` on each table in `names` (all or none): the table's memfd
/// by this process's `/proc` path, and the window's socket `table-N.sock` in `run_dir`.
fn attach(
    tables: &BTreeMap<ResourceTableId, Served>,
    tenant: TenantId,
    vm: &str,
    names: &[Name],
    run_dir: &Path,
) -> Result<Vec<VmWindow>, TableAttachError> {
    let mut resolved = Vec::with_capacity(names.len());
    for name in names {
        let t = find(tables, tenant, name).ok_or_else(|| TableAttachError::NoSuchTable {
            table: name.clone(),
        })?;
        match &t.element {
            Ok(el) => resolved.push((name, t.spec.id, el)),
            Err(reason) => {
                return Err(TableAttachError::NotServed {
                    table: name.clone(),
                    reason: reason.clone(),
                })
            }
        }
    }
    let mut out: Vec<VmWindow> = Vec::with_capacity(resolved.len());
    for (i, (name, id, el)) in resolved.into_iter().enumerate() {
        let socket = run_dir.join(format!("table-{i}.sock"));
        match el.attach_guest(&socket, vm) {
            Ok(w) => {
                use std::os::fd::AsRawFd;
                tracing::info!(table = %name, %vm, device = w.device, "vm window on resource table opened");
                out.push(VmWindow {
                    table: id,
                    device: w.device,
                    attach: compute::TableAttach {
                        table: PathBuf::from(format!(
                            "/proc/{}/fd/{}",
                            std::process::id(),
                            el.table_fd().as_raw_fd()
                        )),
                        table_bytes: u64::try_from(el.table_file_bytes()).unwrap_or(u64::MAX),
                        window: w.socket,
                    },
                })
            }
            Err(source) => {
                let ids: Vec<_> = out.iter().map(|w| (w.table, w.device)).collect();
                detach(tables, &ids);
                return Err(TableAttachError::Window {
                    table: name.clone(),
                    source,
                });
            }
        }
    }
    Ok(out)
}

/// Closes windows; one whose table is gone, or whose VM already detached (its QEMU
/// exited), is nothing to close.
fn detach(
    tables: &BTreeMap<ResourceTableId, Served>,
    windows: &[(ResourceTableId, shm::DeviceId)],
) {
    for (id, device) in windows {
        let Some(Ok(el)) = tables.get(id).map(|t| &t.element) else {
            continue;
        };
        if let Err(e) = el.detach(*device) {
            tracing::debug!(table = %id, device, error = %model::error_chain(&e), "window already closed");
        }
    }
}

/// The specs saved by the last run.
fn local_specs(dir: &Path) -> Vec<ResourceTable> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        if !p.to_string_lossy().ends_with(".spec.json") {
            continue;
        }
        match std::fs::read(&p)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<ResourceTable>(&b).map_err(|e| e.to_string()))
        {
            Ok(spec) => out.push(spec),
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "ignoring an unreadable resource table spec")
            }
        }
    }
    out
}

/// Converges to the server's list of this host's tables.
async fn sync(
    client: &Client,
    host: &str,
    dir: &Path,
    tables: &mut BTreeMap<ResourceTableId, Served>,
) {
    let listed = match client.list_resource_tables(host).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %model::error_chain(&e), "cannot list resource tables");
            return;
        }
    };
    let wanted: BTreeMap<ResourceTableId, ResourceTable> = listed
        .into_iter()
        .map(|mut t| {
            t.state = None;
            (t.id, t)
        })
        .collect();
    let gone: Vec<ResourceTableId> = tables
        .keys()
        .filter(|id| !wanted.contains_key(id))
        .copied()
        .collect();
    for id in gone {
        remove(tables, dir, id);
    }
    for (id, spec) in wanted {
        if !tables.contains_key(&id) {
            start(tables, dir, spec).await;
        }
    }
}

/// Stops serving a deleted table and removes its files.
fn remove(tables: &mut BTreeMap<ResourceTableId, Served>, dir: &Path, id: ResourceTableId) {
    if let Some(t) = tables.remove(&id) {
        tracing::info!(table = %t.spec.name, %id, "resource table deleted; devices see the element gone");
    }
    for p in [
        spec_path(dir, id),
        contents_path(dir, id),
        sock_path(dir, id),
    ] {
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove a deleted table's file");
            }
        }
    }
}

/// Creates a table's element, restores its contents and saves its spec.
async fn start(tables: &mut BTreeMap<ResourceTableId, Served>, dir: &Path, spec: ResourceTable) {
    let id = spec.id;
    let dir2 = dir.to_owned();
    let spec2 = spec.clone();
    let started = tokio::task::spawn_blocking(move || start_blocking(&dir2, &spec2))
        .await
        .unwrap_or_else(|e| Err(format!("the start task failed: {e}")));
    match &started {
        Ok(_) => {
            tracing::info!(table = %spec.name, %id, entries = spec.entries, entry_size = spec.entry_size, "resource table served")
        }
        Err(e) => {
            tracing::error!(table = %spec.name, %id, error = %e, "cannot serve resource table")
        }
    }
    let snapshot = match &started {
        Ok(el) => el.versions(),
        Err(_) => Vec::new(),
    };
    tables.insert(
        id,
        Served {
            spec,
            element: started.map(Arc::new),
            reported: None,
            snapshot,
        },
    );
}

fn start_blocking(dir: &Path, spec: &ResourceTable) -> Result<shm::Element, String> {
    let json = serde_json::to_vec_pretty(spec).map_err(|e| e.to_string())?;
    write_atomic(&spec_path(dir, spec.id), &json)
        .map_err(|e| format!("cannot save the spec: {e}"))?;
    let mut cfg = shm::ElementConfig::new(sock_path(dir, spec.id), spec.entries, spec.entry_size);
    cfg.max_grant = Some(Duration::from_millis(spec.max_grant_ms));
    let el = shm::Element::start(cfg).map_err(|e| model::error_chain(&e))?;
    match restore(&contents_path(dir, spec.id), &el, spec) {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(table = %spec.name, entries = n, "resource table contents restored")
        }
        Err(e) => {
            tracing::warn!(table = %spec.name, error = %e, "resource table contents not restored; starting zeroed")
        }
    }
    Ok(el)
}

/// Writes every written entry of the last snapshot back; how many.
fn restore(path: &Path, el: &shm::Element, spec: &ResourceTable) -> Result<usize, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.to_string()),
    };
    let entries = shm::decode_snapshot(&bytes, spec.entries, spec.entry_size)
        .map_err(|e| model::error_chain(&e))?;
    let mut n = 0;
    for (entry, payload) in entries {
        el.write(entry, payload)
            .map_err(|e| model::error_chain(&e))?;
        n += 1;
    }
    Ok(n)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// Snapshots the contents of each table whose versions changed (every table when
/// `all`: at shutdown, a standing grant may have written without a version yet seen).
async fn snapshot_all(dir: &Path, tables: &mut BTreeMap<ResourceTableId, Served>, all: bool) {
    for t in tables.values_mut() {
        let Ok(el) = &t.element else { continue };
        let el = el.clone();
        let path = contents_path(dir, t.spec.id);
        let (entries, entry_size) = (t.spec.entries, t.spec.entry_size);
        let before = std::mem::take(&mut t.snapshot);
        let r = tokio::task::spawn_blocking(move || {
            let versions = el.versions();
            if !all && versions == before {
                return Ok((versions, false));
            }
            let mut written = Vec::new();
            for (e, v) in versions.iter().enumerate() {
                if *v == 0 {
                    continue;
                }
                let e = u32::try_from(e).map_err(|e| e.to_string())?;
                // A complete version only: an entry mid-write is read when done.
                let (_, bytes) = el.read(e).map_err(|e| model::error_chain(&e))?;
                written.push((e, bytes));
            }
            write_atomic(&path, &shm::encode_snapshot(entries, entry_size, &written))
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((versions, true))
        })
        .await;
        match r {
            Ok(Ok((versions, _))) => t.snapshot = versions,
            Ok(Err(e)) => {
                tracing::warn!(table = %t.spec.name, error = %e, "cannot snapshot a resource table")
            }
            Err(e) => tracing::warn!(table = %t.spec.name, error = %e, "snapshot task failed"),
        }
    }
}

/// Reports each table whose state changed since its last accepted report.
async fn report_all(
    client: &Client,
    host: &str,
    dir: &Path,
    tables: &mut BTreeMap<ResourceTableId, Served>,
) {
    let mut deleted = Vec::new();
    for (id, t) in tables.iter_mut() {
        let report = build_report(&t.spec, &t.element, dir);
        if t.reported.as_ref() == Some(&report) {
            continue;
        }
        match client.report_resource_table(host, *id, &report).await {
            Ok(()) => t.reported = Some(report),
            // Deleted while we were not listening: stop serving it.
            Err(e) if e.status() == Some(404) => deleted.push(*id),
            Err(e) => {
                tracing::warn!(table = %t.spec.name, error = %model::error_chain(&e), "cannot report a resource table")
            }
        }
    }
    for id in deleted {
        remove(tables, dir, id);
    }
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What the server is told about one table.
fn build_report(
    spec: &ResourceTable,
    element: &Result<Arc<shm::Element>, String>,
    dir: &Path,
) -> ResourceTableReport {
    let socket = sock_path(dir, spec.id).display().to_string();
    let el = match element {
        Ok(el) => el,
        Err(e) => {
            return ResourceTableReport {
                socket,
                error: Some(e.chars().take(4096).collect()),
                ..ResourceTableReport::default()
            }
        }
    };
    let devices = el
        .devices()
        .into_iter()
        .take(MAX_REPORTED_DEVICES)
        .map(|d| TableDevice {
            id: d.id,
            pid: d.pid,
            grants: u32::try_from(d.grants).unwrap_or(u32::MAX),
            vm: d.guest,
        })
        .collect();
    let grants = el
        .grants()
        .into_iter()
        .take(MAX_REPORTED_DEVICES)
        .map(|g| TableGrant {
            entry: g.entry,
            device: g.device,
            version: g.version,
            granted_at: ms(g.granted_at),
            // Whole seconds: a report that changes every tick only by the countdown
            // would be sent every tick.
            expires_in_ms: g.expires_in.map(|d| d.as_secs() * 1000),
        })
        .collect();
    let all = el.versions();
    let written: Vec<EntryVersion> = all
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != 0)
        .filter_map(|(e, v)| {
            Some(EntryVersion {
                entry: u32::try_from(e).ok()?,
                version: *v,
            })
        })
        .collect();
    let written_entries = u32::try_from(written.len()).unwrap_or(u32::MAX);
    let audit_all = el.audit(0);
    let skip = audit_all.len().saturating_sub(MAX_REPORTED_AUDIT);
    let audit = audit_all.into_iter().skip(skip).map(audit_record).collect();
    let t = el.totals();
    ResourceTableReport {
        socket,
        error: None,
        devices,
        grants,
        versions: written.into_iter().take(MAX_REPORTED_ENTRIES).collect(),
        written_entries,
        audit,
        totals: TableTotals {
            grants: t.grants,
            revokes: t.revokes,
            refused: t.refused,
            refused_writes: t.refused_stores,
            rolled_back: t.rolled_back,
        },
        reported_at: 0,
    }
}

fn audit_record(e: shm::AuditEvent) -> TableAuditRecord {
    let (kind, reason, holder) = match e.kind {
        shm::AuditKind::Attached => (TableAuditKind::Attached, None, None),
        shm::AuditKind::Detached { reason } => {
            (TableAuditKind::Detached, Some(reason.to_owned()), None)
        }
        shm::AuditKind::Granted => (TableAuditKind::Granted, None, None),
        shm::AuditKind::Revoked { reason } => (
            TableAuditKind::Revoked,
            Some(reason.as_str().to_owned()),
            None,
        ),
        shm::AuditKind::Refused { holder } => (TableAuditKind::Refused, None, Some(holder)),
        shm::AuditKind::RefusedStore => (TableAuditKind::RefusedWrite, None, None),
        shm::AuditKind::RolledBack => (TableAuditKind::RolledBack, None, None),
    };
    TableAuditRecord {
        seq: e.seq,
        at: ms(e.at),
        device: e.device,
        entry: e.entry,
        version: e.version,
        kind,
        reason,
        holder,
    }
}

// The API's limits must be shapes the element accepts, and VMs the driver starts.
const _: () = assert!(model::api::MAX_VM_TABLES == compute::MAX_VM_TABLES);
const _: () = assert!(model::resource_tables::MAX_TABLE_ENTRIES <= shm::MAX_ENTRIES);
const _: () = assert!(model::resource_tables::MAX_TABLE_ENTRY_SIZE <= shm::MAX_ENTRY_SIZE);

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tenant: TenantId, name: &str) -> ResourceTable {
        ResourceTable {
            id: ResourceTableId::new_random(),
            tenant,
            host: model::validate_name("host", "h").unwrap(),
            name: model::validate_name("name", name).unwrap(),
            entries: 4,
            entry_size: 248,
            max_grant_ms: 1000,
            created_at: 0,
            state: None,
        }
    }

    fn n(s: &str) -> Name {
        model::validate_name("t", s).unwrap()
    }

    /// A VM's tables resolve by its tenant and name; one missing (or another tenant's)
    /// opens no window at all; a window has its socket in the run dir and the table's
    /// memfd by this process's /proc path, and closing it removes the socket.
    #[tokio::test]
    async fn a_vms_windows_open_all_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        let (a, b) = (TenantId::new_random(), TenantId::new_random());
        let mut tables = BTreeMap::new();
        start(&mut tables, dir.path(), spec(a, "flows")).await;
        start(&mut tables, dir.path(), spec(b, "theirs")).await;
        let flows = *tables
            .keys()
            .find(|id| tables[*id].spec.tenant == a)
            .unwrap();

        for names in [vec![n("flows"), n("nope")], vec![n("flows"), n("theirs")]] {
            let e = attach(&tables, a, "vm-1", &names, &run).unwrap_err();
            assert!(
                matches!(&e, TableAttachError::NoSuchTable { table } if *table == names[1]),
                "{e}"
            );
            assert_eq!(
                std::fs::read_dir(&run).unwrap().count(),
                0,
                "a window left open"
            );
        }
        let w = attach(&tables, a, "vm-1", &[n("flows")], &run).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].table, flows);
        assert_eq!(w[0].attach.window, run.join("table-0.sock"));
        assert!(w[0].attach.window.exists());
        assert!(w[0]
            .attach
            .table
            .starts_with(format!("/proc/{}/fd/", std::process::id())));
        assert!(w[0].attach.table_bytes.is_power_of_two());
        // The path is the table itself: the same bytes the element wrote.
        let el = tables[&flows].element.as_ref().unwrap();
        let v = el.write(2, &[9u8; 248]).unwrap();
        assert!(v > 0);
        let mapped = std::fs::read(&w[0].attach.table).unwrap();
        assert_eq!(mapped.len() as u64, w[0].attach.table_bytes);
        detach(&tables, &[(w[0].table, w[0].device)]);
        assert!(!w[0].attach.window.exists());
        // A table the agent could not create is named with why.
        tables.get_mut(&flows).unwrap().element = Err("no memory".into());
        let e = attach(&tables, a, "vm-1", &[n("flows")], &run).unwrap_err();
        assert_eq!(
            e.to_string(),
            "resource table flows is not served here: no memory"
        );
    }
}
