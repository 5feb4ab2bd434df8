//! Integration tests of the NBD server and client against real NBD programs
//! (qemu-img, qemu-io, qemu-nbd, nbdkit, nbdinfo, nbdcopy, fio) and hostile input.
//! Missing programs fail the test with a pointer to `scripts/setup.sh`.

mod hostile;
mod interop;
mod ours;
mod pooled;
mod real_clients;
mod tls;
mod util;
