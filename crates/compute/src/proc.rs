//! Small helpers about host processes we may not be the parent of (adopted QEMUs).

use std::time::{Duration, Instant};

/// Whether `pid` exists and is not a zombie (a zombie has exited; only its parent's
/// `wait` is missing).
pub(crate) fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Format: "pid (comm) S ...": comm may contain spaces and parens, so split at the last ')'.
    match stat.rfind(')').and_then(|i| stat.get(i + 2..)) {
        Some(rest) => !matches!(rest.chars().next(), Some('Z' | 'X')),
        None => false,
    }
}

/// CPU time `pid` has used (user + system, from `/proc/<pid>/stat`'s `utime` and
/// `stime`, in clock ticks), or `None` if it is gone.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm) ": state is field 3, utime 14, stime 15 (proc(5)).
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut f = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    let ticks = utime.saturating_add(stime);
    Some(Duration::from_millis(ticks.saturating_mul(1000) / hz))
}

/// The process's argv, or `None` if it is gone.
pub(crate) fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// Sends SIGKILL. A process that is already gone is not an error.
pub(crate) fn kill9(pid: u32) -> std::io::Result<()> {
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    match rustix::process::kill_process(p, rustix::process::Signal::KILL) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::SRCH => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// SIGKILLs every live `qemu-system-*` process whose command line mentions `dir` (its
/// run dir, console log or QMP socket is under it); returns how many. The last resort of
/// a supervisor that owns `dir`: VMs outlive their agents by design, so whoever removes
/// a whole data dir (`vinfra up` on exit, a test fixture) must end them.
pub fn kill_qemus_under(dir: &std::path::Path) -> usize {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some(argv) = cmdline(pid) else { continue };
        let is_qemu = argv.first().is_some_and(|a0| {
            a0.rsplit('/')
                .next()
                .is_some_and(|b| b.starts_with("qemu-system"))
        });
        if is_qemu && alive(pid) && argv.iter().any(|a| a.contains(&needle)) && kill9(pid).is_ok() {
            n += 1;
        }
    }
    n
}

/// Polls until `pid` is gone or the deadline passes; returns whether it is gone.
pub(crate) async fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_has_a_cmdline() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(!cmdline(me).unwrap().is_empty());
        // Pid numbers are capped well below this (pid_max <= 2^22).
        assert!(!alive(u32::MAX - 1));
        assert!(cmdline(u32::MAX - 1).is_none());
    }
}
