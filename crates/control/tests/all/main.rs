//! Integration tests of the control layer over the in-memory store: the operation
//! driver, its persisted drains, the operations view, and the push hub. Agents are
//! played by the test (their reports are the same calls the agent routes make).

mod concurrency;
mod drain;
mod ns_site;
mod push;
mod resource_tables;
mod slices;
mod snapshots;
mod takeover;
mod terminals;
