//! `vinfra up --driver sim --hosts 50`: fifty simulated hosts heartbeating against one
//! server, and 200 VMs created through the API spread over them.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use model::api::CreateVm;
use model::{HostState, ObservedState};

use crate::harness::VINFRA;

const HOSTS: usize = 50;
const VMS: usize = 200;

#[tokio::test]
async fn up_with_50_simulated_hosts_spreads_200_vms() {
    let dir = tempfile::Builder::new()
        .prefix("vu")
        .tempdir_in("/tmp")
        .unwrap();
    let data = dir.path().join(".vinfra");
    let [api, vswitch] = test_utils::free_tcp_ports::<2>();
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let t0 = Instant::now();
    let child = Command::new(VINFRA)
        .args(["up", "--driver", "sim", "--hosts", &HOSTS.to_string()])
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--vswitch-listen", &format!("127.0.0.1:{vswitch}")])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn vinfra up");
    let mut up = test_utils::ChildGuard::new(child);
    let up_log = || test_utils::log_tail(&dir.path().join("up.log"), 30);

    // `up` prints its banner once every host registered.
    let banner = test_utils::wait_until(Duration::from_secs(60), || {
        up_log().contains("vinfra is up")
    })
    .await;
    assert!(banner.is_ok(), "vinfra up did not come up:\n{}", up_log());
    let started = t0.elapsed();
    // The banner names the dashboard, which answers with its login page.
    let ui = format!("http://127.0.0.1:{api}/ui");
    assert!(
        up_log().contains(&format!("dashboard  {ui}")),
        "{}",
        up_log()
    );
    let login = reqwest::get(format!("{ui}/login")).await.unwrap();
    assert!(login.status().is_success());
    assert!(login.text().await.unwrap().contains("API token"));
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let admin = client::Client::new(&format!("http://127.0.0.1:{api}"), token.trim()).unwrap();
    let hosts = admin.list_hosts().await.unwrap();
    assert_eq!(hosts.len(), HOSTS);
    assert!(hosts
        .iter()
        .all(|h| h.state == HostState::Up && h.drivers == ["sim"] && h.vcpus >= 64));

    // 200 creates, eight at a time, as many users would. Concurrent creates race for
    // the same (emptiest) host; the server answers 409 "retry" when one lost too often,
    // and a client retries then.
    let t1 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let admin = admin.clone();
        tasks.push(tokio::spawn(async move {
            let mut retries = 0u32;
            for i in (w..VMS).step_by(8) {
                let req = CreateVm {
                    name: format!("vm{i:03}"),
                    image: "default".into(),
                    vcpus: 1,
                    memory_mib: 256,
                    host: None,
                    tenant: None,
                    redundant: false,
                    disk_gib: None,
                    nics: vec![],
                    kernel_args: None,
                    resource_tables: vec![],
                };
                loop {
                    match admin.create_vm(&req).await {
                        Ok(_) => break,
                        Err(e) if e.status() == Some(409) && retries < 100 => {
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("create {}: {e:?}", req.name),
                    }
                }
            }
            retries
        }));
    }
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    let created = t1.elapsed();
    let all_running = test_utils::wait_for(Duration::from_secs(90), || {
        let admin = admin.clone();
        async move {
            admin.list_vms().await.is_ok_and(|v| {
                v.len() == VMS && v.iter().all(|v| v.observed == ObservedState::Running)
            })
        }
    })
    .await;
    let vms = admin.list_vms().await.unwrap();
    assert!(
        all_running.is_ok(),
        "not all running: {:?}\n{}",
        vms.iter()
            .filter(|v| v.observed != ObservedState::Running)
            .map(|v| (v.name.as_str(), v.observed, v.error.clone()))
            .take(5)
            .collect::<Vec<_>>(),
        up_log()
    );
    let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &vms {
        *per_host.entry(v.host.as_str()).or_default() += 1;
    }
    assert_eq!(per_host.len(), HOSTS, "{per_host:?}");
    assert!(
        per_host.values().all(|n| *n == VMS / HOSTS),
        "the scheduler spreads identical hosts evenly: {per_host:?}"
    );
    eprintln!(
        "up with {HOSTS} sim hosts in {:.1} s; {VMS} creates in {:.1} s ({retries} retried \
         after 409); all running after {:.1} s",
        started.as_secs_f64(),
        created.as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
    // A guest's console as the default image prints it. `Running` means the hypervisor
    // runs the VM; `READY` follows after the simulated boot time, later still on a loaded
    // machine, so wait for it rather than expect it.
    let ready = test_utils::wait_for(Duration::from_secs(60), || {
        let admin = admin.clone();
        async move {
            admin
                .console("vm000")
                .await
                .is_ok_and(|c| c.contains("GUEST: READY"))
        }
    })
    .await;
    let console = admin.console("vm000").await.unwrap_or_default();
    assert!(ready.is_ok(), "vm000 never printed READY:\n{console}");

    // Ctrl-C: every agent stops its VMs and exits, then the server.
    let pid = up.id().unwrap();
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
    let exited = test_utils::wait_until(Duration::from_secs(60), || {
        up.std_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    })
    .await;
    assert!(exited.is_ok(), "vinfra up did not stop:\n{}", up_log());
}
