//! Integration tests of the node agent on the sim compute driver: the real agent, disk
//! stack (NBD server, block caches) and API server (in-process, in-memory store), with
//! only the hypervisor simulated. No QEMU, no root; each test takes a few seconds.

mod adoption;
mod failures;
mod harness;
mod lifecycle;
mod migration;
mod sessions;
mod terminals;
mod traces;
