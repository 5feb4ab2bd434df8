//! Block traces recorded from real applications in the Debian guest, for `vinfra bench
//! migrate-cache --recorded`: generated on first use and cached (never committed) under
//! `<cache>/traces/`:
//! - `boot-pgbench.csv`: the guest boots (systemd, PostgreSQL starting), initialises
//!   pgbench's tables and runs pgbench — the case where the blocks needed first after a
//!   move are not the hottest;
//! - `fio.csv`: fio's 4 KiB random 70/30 read/write job (zipf 1.1) inside the guest.
//!
//! Each is recorded by the agent's NBD server (`vinfra vm trace`) from the moment the VM
//! runs until its workload prints `GUEST: WORKLOAD DONE`, with a real `vinfra server` and
//! `vinfra agent` of this binary and QEMU (TCG). A trace is kept with a manifest naming the
//! image it came from; another image (a rebuilt guest) records again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use model::api::CreateVm;

use super::control::procs;

/// The recorded workloads: (file stem, kernel arguments).
const WORKLOADS: [(&str, &str); 2] = [
    (
        "boot-pgbench",
        "vinfra.workload=pgbench vinfra.pgbench_secs=60 vinfra.pgbench_clients=2",
    ),
    ("fio", "vinfra.workload=fio vinfra.fio_secs=60"),
];

/// Longest a recording may take (boot + workload under TCG on a loaded machine).
const RECORD_WAIT: Duration = Duration::from_secs(900);

/// The recorded traces, recording those missing or made from another image first.
pub async fn ensure_recorded(cache: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let image = crate::cmd::image::ensure(compute::GuestKind::Debian, cache).await?;
    let dir = cache.join("traces");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // The image's identity: its manifest (sizes and sha256 of every file) as built.
    let manifest = image
        .disk_template
        .parent()
        .map(|d| d.join("manifest.json"))
        .context("the image has no directory")?;
    let stamp = client::file_digest(&manifest).await?.to_string();
    let fresh = |stem: &str| {
        std::fs::read_to_string(dir.join(format!("{stem}.image"))).is_ok_and(|s| s.trim() == stamp)
            && dir.join(format!("{stem}.csv")).is_file()
    };
    let missing: Vec<(&str, &str)> = WORKLOADS
        .iter()
        .copied()
        .filter(|(s, _)| !fresh(s))
        .collect();
    if !missing.is_empty() {
        record(&image, &dir, &missing, &stamp).await?;
    }
    Ok(WORKLOADS
        .iter()
        .map(|(s, _)| dir.join(format!("{s}.csv")))
        .collect())
}

async fn record(
    image: &compute::GuestImage,
    out: &Path,
    workloads: &[(&str, &str)],
    stamp: &str,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let tmp = tempfile::Builder::new()
        .prefix("vrec")
        .tempdir_in("/tmp")
        .context("cannot make a work dir")?;
    let dir = tmp.path();
    let _reaper = super::migrate_vm::QemuReaper(dir.to_owned());
    let (server, admin, token_file) = super::migrate_vm::debian_server(&exe, dir, image).await?;
    let _agent = super::migrate_vm::spawn_agent(
        &exe,
        &server.url,
        "host-a",
        &dir.join("host-a"),
        &token_file,
        &dir.join("origin"),
        // A SAN as `migrate-vm` models it.
        &super::migrate_vm::AgentArgs {
            accel: "tcg",
            origin_rate_mbps: 100,
            origin_latency_ms: 1,
        },
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !admin
        .get_host("host-a")
        .await
        .is_ok_and(|h| h.state == model::HostState::Up)
    {
        if Instant::now() > deadline {
            bail!(
                "the agent did not register; its log:\n{}",
                procs::log_tail(&dir.join("host-a/agent.log"), 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (stem, args) in workloads {
        eprintln!("recording {stem} (the Debian guest under TCG: several minutes)");
        let name = stem.replace('+', "-");
        let vm = admin
            .create_vm(&CreateVm {
                name: name.clone(),
                image: "debian".into(),
                vcpus: 1,
                memory_mib: 256,
                host: Some("host-a".into()),
                kernel_args: Some((*args).to_owned()),
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot create the {stem} VM"))?;
        let id = vm.id.to_string();
        let deadline = Instant::now() + RECORD_WAIT;
        // From the moment it runs: QEMU boots the kernel from files, so the disk's
        // first request (the root mount) comes after this.
        loop {
            match admin.set_trace(&id, true).await {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("the VM did not start"),
            }
        }
        loop {
            let console = admin.console(&id).await.unwrap_or_default();
            if console.contains("GUEST: WORKLOAD DONE") {
                if console.contains("RESULT FAIL") {
                    bail!(
                        "the {stem} workload failed in the guest:\n{}",
                        tail(&console)
                    );
                }
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the {stem} workload did not finish in time:\n{}",
                    tail(&console)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        admin.set_trace(&id, false).await?;
        let digest = loop {
            if let Some(d) = admin.get_vm(&id).await?.trace.and_then(|t| t.blob) {
                break d;
            }
            if Instant::now() > deadline {
                bail!("the agent did not upload the {stem} trace");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let file = out.join(format!("{stem}.csv"));
        admin.download_blob(&digest, &file).await?;
        std::fs::write(out.join(format!("{stem}.image")), stamp)?;
        admin.delete_vm(&id).await?;
        eprintln!("recorded {}", file.display());
    }
    server.stop().await;
    Ok(())
}

fn tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
