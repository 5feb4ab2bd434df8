//! End-to-end tests of the `vinfra` binary: real server and agent processes, real
//! stores (redb, etcd), real QEMU.

mod agent_restart;
mod api_process;
mod bench_control;
mod bench_push;
mod bench_shm;
mod bench_terminal;
mod browser;
mod crash;
mod fencing;
mod ha;
mod harness;
mod maintenance;
mod migration;
mod migration_pgbench;
// The libvirtd fixture and namespaces of the nfv tests, shared rather than copied.
#[allow(dead_code)]
#[path = "../../../../crates/nfv/tests/all/libvirtd.rs"]
mod libvirtd;
#[allow(dead_code)]
#[path = "../../../../crates/nfv/tests/all/netns.rs"]
mod netns;
#[path = "../../../../crates/net/tests/all/nfcapd.rs"]
mod nfcapd;
mod ns;
mod ns_libvirt;
mod readme;
mod redundancy;
mod resource_tables;
mod slices;
mod terminals;
mod tls;
mod tokens;
mod traffic;
mod ui;
mod ui_qemu;
mod ui_v2x;
mod up_sim;
mod v2x;
mod vm_lifecycle;
mod vm_network;
mod vm_tables;
mod vm_traffic;
