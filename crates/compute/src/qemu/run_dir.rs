//! The files of a VM's run dir: pidfile, record and log.

use std::path::Path;

use super::args::esc;
use super::{files, VmRecord};
use crate::{proc, ComputeError};

pub(super) fn read_pid(run_dir: &Path) -> Result<u32, ()> {
    std::fs::read_to_string(run_dir.join(files::PID))
        .map_err(drop)?
        .trim()
        .parse()
        .map_err(drop)
}

/// Whether `pid` is a live QEMU serving `qmp_path` (guards against recycled pids).
pub(super) fn owns_run_dir(pid: u32, qmp_path: &Path) -> bool {
    if !proc::alive(pid) {
        return false;
    }
    let needle = esc(&qmp_path.to_string_lossy());
    proc::cmdline(pid).is_some_and(|args| args.iter().any(|a| a.contains(&needle)))
}

pub(super) fn remove_if_exists(p: &Path) -> Result<(), ComputeError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(ComputeError::Io {
            action: "remove",
            path: p.to_owned(),
            err,
        }),
    }
}

pub(super) fn write_record(run_dir: &Path, rec: &VmRecord) -> Result<(), ComputeError> {
    let path = run_dir.join(files::RECORD);
    let tmp = run_dir.join(".vm.json.tmp");
    let body = serde_json::to_vec_pretty(rec).expect("VmRecord serializes");
    std::fs::write(&tmp, body)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|err| ComputeError::Io {
            action: "write",
            path,
            err,
        })
}

/// The last few lines of QEMU's log, on one line, for error messages.
pub(super) fn log_tail(path: &Path) -> String {
    let Ok(body) = std::fs::read(path) else {
        return String::new();
    };
    let start = body.len().saturating_sub(2048);
    let text = String::from_utf8_lossy(&body[start..]);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}
