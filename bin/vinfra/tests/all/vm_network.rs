//! VM NICs: two real guests on one vinfra network on two hosts exchange packets, keep
//! doing so across a live migration, and leave no tap or bridge behind.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::{cli, cluster, path_in, spawn_agent, wait_host_up};

fn bridge_ports(br: &str) -> Vec<String> {
    std::fs::read_dir(Path::new("/sys/class/net").join(br).join("brif"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn count(console: &str, needle: &str) -> usize {
    console.lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test]
async fn guests_on_one_network_ping_across_hosts_and_a_migration() {
    test_utils::require_tool("ip", "install iproute2 (scripts/setup.sh)").unwrap();
    let (s, token_file) = cluster().await;
    let admin = s.admin();
    let (dir_a, dir_b) = (path_in(&s, "ha"), path_in(&s, "hb"));
    let _agent_a = spawn_agent(&s, "host-a", &dir_a, &token_file);
    let _agent_b = spawn_agent(&s, "host-b", &dir_b, &token_file);
    wait_host_up(&s, "host-a").await;
    wait_host_up(&s, "host-b").await;
    let t = s.admin_token();
    let logs = || {
        format!(
            "{}\n{}",
            test_utils::log_tail(&dir_a.join("agent.log"), 20),
            test_utils::log_tail(&dir_b.join("agent.log"), 20)
        )
    };

    let (ok, out, err) = cli(
        &s,
        &t,
        &["network", "create", "blue", "--cidr", "10.70.0.0/24"],
    );
    assert!(ok, "{out}{err}");
    let net = admin.get_network("blue").await.unwrap();
    let br = agent::netdev::bridge_name(net.id);

    let (ok, out, err) = cli(
        &s,
        &t,
        &["vm", "create", "a", "--host", "host-a", "--nic", "blue"],
    );
    assert!(ok, "vm a: {out}{err}\n{}", logs());
    assert!(out.contains("blue:10.70.0.1"), "{out}");
    let (ok, out, err) = cli(
        &s,
        &t,
        &[
            "vm",
            "create",
            "b",
            "--host",
            "host-b",
            "--nic",
            "blue=10.70.0.9",
            "--kernel-args",
            "vinfra.ping=10.70.0.1",
        ],
    );
    assert!(ok, "vm b: {out}{err}\n{}", logs());
    assert!(out.contains("blue:10.70.0.9"), "{out}");
    let a = admin.get_vm("a").await.unwrap();

    // Inside the guests: the interface has the MAC and address IPAM gave.
    if test_utils::wait_for(Duration::from_secs(60), || async {
        admin
            .console("a")
            .await
            .unwrap_or_default()
            .contains(&format!("mac={} ip=10.70.0.1/24", a.nics[0].mac))
    })
    .await
    .is_err()
    {
        let c = admin.console("a").await.unwrap_or_default();
        panic!("a's NIC: {c}\n{}", logs());
    }
    // b reaches a across the two hosts' taps on the network's bridge.
    if test_utils::wait_for(Duration::from_secs(60), || async {
        count(
            &admin.console("b").await.unwrap_or_default(),
            "PING 10.70.0.1 ok",
        ) >= 3
    })
    .await
    .is_err()
    {
        let c = admin.console("b").await.unwrap_or_default();
        panic!("b pings a: {c}\n{}", logs());
    }
    assert_eq!(bridge_ports(&br).len(), 2, "{:?}", bridge_ports(&br));

    // Live migration keeps the NIC: b keeps reaching a, now on host-b.
    let (ok, out, err) = cli(&s, &t, &["vm", "migrate", "a", "--to", "host-b"]);
    assert!(ok, "migrate: {out}{err}\n{}", logs());
    let before = count(&admin.console("b").await.unwrap(), "PING 10.70.0.1 ok");
    if test_utils::wait_for(Duration::from_secs(60), || async {
        count(
            &admin.console("b").await.unwrap_or_default(),
            "PING 10.70.0.1 ok",
        ) >= before + 3
    })
    .await
    .is_err()
    {
        let c = admin.console("b").await.unwrap_or_default();
        panic!("b pings a after migration: {c}\n{}", logs());
    }
    // The source's tap went with the source QEMU.
    test_utils::wait_until(Duration::from_secs(20), || bridge_ports(&br).len() == 2)
        .await
        .unwrap_or_else(|_| panic!("ports after migration: {:?}", bridge_ports(&br)));

    for vm in ["a", "b"] {
        let (ok, out, err) = cli(&s, &t, &["vm", "delete", vm]);
        assert!(ok, "{out}{err}");
    }
    test_utils::wait_until(Duration::from_secs(20), || {
        !Path::new("/sys/class/net").join(&br).exists()
    })
    .await
    .expect("the bridge goes with the network's last tap");
    let (ok, out, err) = cli(&s, &t, &["network", "delete", "blue"]);
    assert!(ok, "{out}{err}");
}

/// Two "machines" (network namespaces made here, joined by a bridge standing for the data
/// network) each run one agent with `--uplink-ip`: their bridges for a network are joined
/// by VXLAN, and a guest on one machine pings a guest on the other.
#[tokio::test]
async fn guests_on_two_machines_reach_each_other_over_vxlan() {
    let (two, s) = TwoMachines::start(&[251, 0]).await;
    let (machines, dirs) = (&two.machines, &two.dirs);
    let admin = s.admin();
    let t = s.admin_token();
    let (ok, out, err) = cli(
        &s,
        &t,
        &["network", "create", "blue", "--cidr", "10.70.0.0/24"],
    );
    assert!(ok, "{out}{err}");
    let br = agent::netdev::bridge_name(admin.get_network("blue").await.unwrap().id);
    let (ok, out, err) = cli(
        &s,
        &t,
        &["vm", "create", "a", "--host", "host-a", "--nic", "blue"],
    );
    assert!(ok, "vm a: {out}{err}");
    let (ok, out, err) = cli(
        &s,
        &t,
        &[
            "vm",
            "create",
            "b",
            "--host",
            "host-b",
            "--nic",
            "blue",
            "--kernel-args",
            "vinfra.ping=10.70.0.1",
        ],
    );
    assert!(ok, "vm b: {out}{err}");
    if test_utils::wait_for(Duration::from_secs(60), || async {
        count(
            &admin.console("b").await.unwrap_or_default(),
            "PING 10.70.0.1 ok",
        ) >= 3
    })
    .await
    .is_err()
    {
        let c = admin.console("b").await.unwrap_or_default();
        panic!(
            "b pings a across machines: {c}\n{}\n{}",
            test_utils::log_tail(&dirs[0].join("agent.log"), 20),
            test_utils::log_tail(&dirs[1].join("agent.log"), 20)
        );
    }
    // Each machine has its own bridge for the network, none is on this one, and each
    // bridge's VXLAN port floods to the other machine.
    assert!(!Path::new("/sys/class/net").join(&br).exists());
    for (i, m) in machines.iter().enumerate() {
        let out = Command::new("ip")
            .args(["-n", &m.name, "-br", "link", "show", "master", &br])
            .output()
            .unwrap();
        let ports = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(ports.contains("vvx") && ports.contains("vtp"), "{ports}");
        let fdb = Command::new("ip")
            .args(["netns", "exec", &m.name, "bridge", "fdb", "show"])
            .output()
            .unwrap();
        let peer = format!("dst 10.251.0.{}", 3 - i);
        assert!(
            String::from_utf8_lossy(&fdb.stdout).contains(&peer),
            "machine {i}: no {peer}"
        );
    }
    for vm in ["a", "b"] {
        let (ok, out, err) = cli(&s, &t, &["vm", "delete", vm]);
        assert!(ok, "{out}{err}");
    }
    // The bridge and its VXLAN port go with the network's last VM on each machine.
    for m in machines {
        let gone = || {
            Command::new("ip")
                .args(["-n", &m.name, "link", "show", &br])
                .output()
                .is_ok_and(|o| !o.status.success())
        };
        test_utils::wait_until(Duration::from_secs(20), gone)
            .await
            .unwrap_or_else(|_| panic!("bridge {br} left in {}", m.name));
    }
}

/// Two "machines": network namespaces made here, joined by a bridge that stands for
/// the data network (10.<a>.<b>.0/24; this namespace is .1, where the server listens, so
/// it serves HTTPS and the agents join with join tokens), one agent in each
/// (`host-a` at .2, `host-b` at .3) with its uplink there.
pub(crate) struct TwoMachines {
    // Fields drop in this order: the agents end before their namespaces go.
    _agents: Vec<test_utils::ChildGuard>,
    pub machines: [crate::netns::Netns; 2],
    pub dirs: [std::path::PathBuf; 2],
    _fabric: DeleteLink,
}

impl TwoMachines {
    /// `subnet`: the data network's second and third octets, distinct per test.
    pub(crate) async fn start(subnet: &[u8; 2]) -> (TwoMachines, crate::harness::Server) {
        use crate::harness::{cluster_with, spawn_agent_in, Server};
        use crate::netns::{ip, Netns};
        test_utils::require_tool("bridge", "install iproute2 (scripts/setup.sh)").unwrap();
        let pid = std::process::id();
        let net = format!("10.{}.{}", subnet[0], subnet[1]);
        let fabric = format!("vfab{}{pid}", subnet[1]);
        ip(&["link", "add", &fabric, "type", "bridge"]);
        let fabric_guard = DeleteLink(fabric.clone());
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &fabric]);
        ip(&["link", "set", &fabric, "up"]);
        let machines = [Netns::new("m1"), Netns::new("m2")];
        for (i, m) in machines.iter().enumerate() {
            let outside = format!("vfm{i}{}{pid}", subnet[1]);
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", "up0", "netns", &m.name,
            ]);
            ip(&["link", "set", &outside, "master", &fabric, "up"]);
            ip(&[
                "-n",
                &m.name,
                "addr",
                "add",
                &format!("{net}.{}/24", i + 2),
                "dev",
                "up0",
            ]);
            ip(&["-n", &m.name, "link", "set", "up0", "up"]);
        }
        let (s, token_file) = cluster_with(Server::start_on(&format!("{net}.1"))).await;
        let dirs = [path_in(&s, "m1"), path_in(&s, "m2")];
        let agents = ["host-a", "host-b"]
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let uplink = format!("{net}.{}", i + 2);
                spawn_agent_in(
                    &s,
                    h,
                    &dirs[i],
                    &token_file,
                    &[],
                    Some(&machines[i].name),
                    &["--uplink-ip", &uplink],
                )
            })
            .collect();
        wait_host_up(&s, "host-a").await;
        wait_host_up(&s, "host-b").await;
        (
            TwoMachines {
                machines,
                dirs,
                _agents: agents,
                _fabric: fabric_guard,
            },
            s,
        )
    }
}

/// Deletes a link of this namespace on drop.
struct DeleteLink(String);

impl Drop for DeleteLink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}
