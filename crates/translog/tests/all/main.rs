//! The transparency log's integration tests: published known answers, tampering
//! and lying servers, two writers on one store, and kill -9 mid-append.

mod crash;
mod kat;
mod tamper;
mod writers;
