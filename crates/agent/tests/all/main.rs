//! Integration tests of the node agent on the sim compute driver: the real agent, disk
//! stack (NBD server, block caches) and API server (in-process, in-memory store), with
//! only the hypervisor simulated. No QEMU, no root; each test takes a few seconds. One
//! exception, `terminals_exact`: QEMUs that run a halting firmware, so that what reaches
//! their keyboard controllers is read exactly.

mod adoption;
mod failures;
mod harness;
mod lifecycle;
mod migration;
mod sessions;
mod terminals;
mod terminals_exact;
mod traces;
