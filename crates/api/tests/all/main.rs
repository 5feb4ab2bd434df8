//! Integration tests of the API: the router without a socket, and one
//! round trip over TCP through the `client` crate.

mod contract;
mod harness;
mod images;
mod limits;
mod networks;
mod ns;
mod operations;
mod push;
mod resource_tables;
mod routes;
mod slices;
mod structure;
mod tcp;
mod tokens;
