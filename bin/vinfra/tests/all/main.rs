//! End-to-end tests of the `vinfra` binary: real server and agent processes, real
//! stores (redb, etcd), real QEMU.

mod api_process;
mod crash;
mod harness;
mod maintenance;
mod migration;
mod ns;
mod redundancy;
mod traffic;
mod vm_lifecycle;
mod vm_network;
