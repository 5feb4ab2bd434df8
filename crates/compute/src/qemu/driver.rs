//! [`ComputeDriver`] for [`QemuDriver`]: start, stop, status, adopt, migrate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::child::{qmp_set_events, watch_adopted};
use super::run_dir::{owns_run_dir, read_pid};
use super::{files, QemuDriver, Shared, Vm, VmRecord, QMP_TIMEOUT, RECORD_FORMAT};
use crate::qmp::{MigrationParameters, QmpClient};
use crate::{
    proc, ComputeDriver, ComputeError, MigrateOptions, MigrationStats, OpOutcome, VmRuntime,
    VmSpec, VmStatus,
};
use model::terminal_ops::Operation;

#[async_trait::async_trait]
impl ComputeDriver for QemuDriver {
    async fn pause(&self, id: &str) -> Result<(), ComputeError> {
        let qmp = self.qmp(id)?;
        qmp.stop().await.map_err(|err| ComputeError::Qmp {
            id: id.to_owned(),
            err,
        })
    }

    async fn resume(&self, id: &str) -> Result<(), ComputeError> {
        let qmp = self.qmp(id)?;
        qmp.cont().await.map_err(|err| ComputeError::Qmp {
            id: id.to_owned(),
            err,
        })
    }

    fn name(&self) -> &'static str {
        "qemu"
    }

    #[tracing::instrument(skip(self, op), fields(vm = %id, op = op.kind()))]
    async fn perform(&self, id: &str, op: &Operation) -> Result<OpOutcome, ComputeError> {
        let vm = self.get(id)?;
        let mut kbd = vm.ops.lock().await;
        crate::check_operation(id, op, vm.exited())?;
        super::terminal::perform(&vm.qmp, &mut kbd, id, &vm.run_dir, op).await
    }

    fn pidfile(&self, run_dir: &Path) -> PathBuf {
        run_dir.join(files::PID)
    }

    async fn start(&self, spec: &VmSpec) -> Result<VmRuntime, ComputeError> {
        self.launch(spec, None).await
    }

    #[tracing::instrument(skip(self), fields(vm = %id))]
    async fn stop(&self, id: &str) -> Result<VmStatus, ComputeError> {
        let vm = self.get(id)?;
        if let Some(st) = vm.exited() {
            return Ok(st);
        }
        vm.note("stopped by request");
        if let Err(e) = vm
            .qmp
            .execute_timeout("quit", None, self.quit_timeout)
            .await
        {
            tracing::debug!(error = %e, "quit not acknowledged");
        }
        if let Some(st) = vm.wait_exit(self.quit_timeout).await {
            tracing::info!(status = ?st, "vm stopped");
            return Ok(st);
        }
        tracing::warn!(pid = vm.pid, "qemu ignored quit, killing it");
        // An adopted pid could in theory have been recycled: only kill our QEMU.
        if !vm.adopted || owns_run_dir(vm.pid, &vm.run_dir.join(files::QMP)) {
            proc::kill9(vm.pid).map_err(|err| ComputeError::Io {
                action: "kill qemu of",
                path: vm.run_dir.clone(),
                err,
            })?;
        }
        vm.wait_exit(Duration::from_secs(10))
            .await
            .ok_or_else(|| ComputeError::Timeout {
                id: id.to_owned(),
                what: "qemu to exit after SIGKILL",
            })
    }

    async fn status(&self, id: &str) -> Result<VmStatus, ComputeError> {
        let vm = self.get(id)?;
        if let Some(st) = vm.exited() {
            return Ok(st);
        }
        match vm
            .qmp
            .execute_timeout("query-status", None, QMP_TIMEOUT)
            .await
        {
            Ok(v) => {
                let st: crate::qmp::RunStatus =
                    serde_json::from_value(v).map_err(|err| ComputeError::Qmp {
                        id: id.to_owned(),
                        err: crate::qmp::QmpError::Decode {
                            command: "query-status".into(),
                            err,
                        },
                    })?;
                Ok(if st.running {
                    VmStatus::Running
                } else {
                    VmStatus::Paused { state: st.status }
                })
            }
            // QEMU may be exiting: its watcher will say how.
            Err(err) => match vm.wait_exit(Duration::from_secs(3)).await {
                Some(st) => Ok(st),
                None => Err(ComputeError::Qmp {
                    id: id.to_owned(),
                    err,
                }),
            },
        }
    }

    fn cpu_time(&self, id: &str) -> Option<std::time::Duration> {
        let vm = self.get(id).ok()?;
        if vm.exited().is_some() {
            return None;
        }
        // The QEMU process's CPU time: its vCPU threads, device emulation and I/O
        // threads, i.e. what the VM costs its host.
        crate::proc::cpu_time(vm.pid)
    }

    fn console_path(&self, id: &str) -> Result<PathBuf, ComputeError> {
        Ok(self.get(id)?.run_dir.join(files::CONSOLE))
    }

    #[tracing::instrument(skip(self), fields(vm = %id))]
    async fn adopt(&self, id: &str, run_dir: &Path) -> Result<VmRuntime, ComputeError> {
        let _claim = self.reserve(id)?;
        let run_dir = std::path::absolute(run_dir).map_err(|err| ComputeError::Io {
            action: "resolve run dir",
            path: run_dir.to_owned(),
            err,
        })?;
        let fail = |reason: String| ComputeError::Adopt {
            id: id.to_owned(),
            run_dir: run_dir.clone(),
            reason,
        };
        let rec_path = run_dir.join(files::RECORD);
        let rec: VmRecord = std::fs::read(&rec_path)
            .map_err(|e| format!("cannot read {}: {e}", rec_path.display()))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| format!("bad {}: {e}", rec_path.display()))
            })
            .map_err(fail)?;
        if rec.format != RECORD_FORMAT || rec.id != id {
            return Err(fail(format!(
                "record is for vm {} (format {})",
                rec.id, rec.format
            )));
        }
        let qmp_path = run_dir.join(files::QMP);
        let pid = read_pid(&run_dir).unwrap_or(rec.pid);
        if !owns_run_dir(pid, &qmp_path) {
            return Err(fail(format!("qemu pid {pid} is not running")));
        }
        let qmp = QmpClient::connect(&qmp_path, QMP_TIMEOUT)
            .await
            .map_err(|e| fail(format!("qmp: {e}")))?;
        let events = qmp.subscribe();
        let (exit_tx, exit) = watch::channel(None);
        let shared = Arc::new(Shared::default());
        let watcher = tokio::spawn(watch_adopted(
            pid,
            qmp.clone(),
            events,
            shared.clone(),
            exit_tx,
        ));
        let vm = Arc::new(Vm {
            id: id.to_owned(),
            run_dir,
            pid,
            accel: rec.accel,
            incoming: None,
            adopted: true,
            qmp,
            exit,
            shared,
            watcher,
            ops: tokio::sync::Mutex::default(),
        });
        let rt = vm.runtime();
        self.vms
            .lock()
            .expect("vm table lock poisoned")
            .insert(id.to_owned(), vm);
        tracing::info!(pid, "vm adopted");
        Ok(rt)
    }

    async fn start_incoming(
        &self,
        spec: &VmSpec,
        listen: SocketAddr,
        tls: Option<&crate::MigrationTls>,
    ) -> Result<VmRuntime, ComputeError> {
        self.launch(spec, Some((listen, tls.cloned()))).await
    }

    #[tracing::instrument(skip(self, opts), fields(vm = %id, to = %to_uri))]
    async fn migrate(
        &self,
        id: &str,
        to_uri: &str,
        opts: &MigrateOptions,
    ) -> Result<MigrationStats, ComputeError> {
        let vm = self.get(id)?;
        let qmp_err = |err| ComputeError::Qmp {
            id: id.to_owned(),
            err,
        };
        qmp_set_events(&vm.qmp).await.map_err(qmp_err)?;
        if let Some(t) = &opts.tls {
            vm.qmp
                .add_tls_creds(crate::MIGRATION_TLS_ID, &t.dir, "client")
                .await
                .map_err(qmp_err)?;
        }
        let params = MigrationParameters {
            downtime_limit: opts.downtime_limit_ms,
            max_bandwidth: opts.max_bandwidth,
            tls_creds: opts
                .tls
                .as_ref()
                .map(|_| crate::MIGRATION_TLS_ID.to_owned()),
            tls_hostname: opts.tls.as_ref().map(|t| t.peer_name.clone()),
        };
        if params != MigrationParameters::default() {
            vm.qmp
                .migrate_set_parameters(&params)
                .await
                .map_err(qmp_err)?;
        }
        let mut events = vm.qmp.subscribe();
        let t0 = Instant::now();
        tracing::info!("migration started");
        vm.qmp.migrate(to_uri).await.map_err(qmp_err)?;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut polls = 0u32;
        let info = loop {
            tick.tick().await;
            polls += 1;
            let info = vm.qmp.query_migrate().await.map_err(qmp_err)?;
            match info.status.as_deref() {
                Some("completed") => break info,
                Some(s @ ("failed" | "cancelled")) => {
                    return Err(ComputeError::MigrationFailed {
                        id: id.to_owned(),
                        status: s.to_owned(),
                        desc: info.error_desc.unwrap_or_default(),
                    })
                }
                _ if t0.elapsed() > opts.timeout => {
                    if let Err(e) = vm.qmp.migrate_cancel().await {
                        tracing::warn!(error = %e, "migrate_cancel failed");
                    }
                    return Err(ComputeError::Timeout {
                        id: id.to_owned(),
                        what: "migration to complete",
                    });
                }
                _ => {}
            }
        };
        let wall_time = t0.elapsed();
        let mut source_stopped_at_us = None;
        while let Ok(ev) = events.try_recv() {
            if ev.name == "STOP" {
                source_stopped_at_us = ev.timestamp.map(|t| t.as_micros());
            }
        }
        let ram = info.ram.unwrap_or_default();
        let stats = MigrationStats {
            total_time_ms: info.total_time.unwrap_or_default(),
            downtime_ms: info.downtime.unwrap_or_default(),
            setup_time_ms: info.setup_time.unwrap_or_default(),
            ram_transferred_bytes: ram.transferred,
            ram_total_bytes: ram.total,
            dirty_sync_count: ram.dirty_sync_count,
            wall_time,
            source_stopped_at_us,
            polls,
        };
        tracing::info!(
            total_ms = stats.total_time_ms,
            downtime_ms = stats.downtime_ms,
            ram_bytes = stats.ram_transferred_bytes,
            "migration completed"
        );
        if opts.quit_source {
            vm.note(&format!("migrated to {to_uri}"));
            // The guest already runs on the destination: a source that will not quit is
            // a leftover paused process (status shows `postmigrate`), not a failed migration.
            if let Err(e) = self.stop(id).await {
                tracing::warn!(error = %e, "source qemu did not quit after migration");
            }
        }
        Ok(stats)
    }
}
