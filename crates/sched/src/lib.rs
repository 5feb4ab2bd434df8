//! Placement of VMs on redundant storage pairs with connectable, paired servers.
//!
//! One job: given an [`Inventory`] (storage resources, server resources, and the
//! connectivity table saying which server reaches which storage) and a [`Request`],
//! decide a [`Placement`] — first two storages that can be paired in a redundant
//! configuration (replication-capable with each other, distinct failure domains,
//! room for the disk), then for each a live server not in maintenance that reaches
//! it and fits, the two servers paired as primary and standby — or refuse with an
//! [`Explanation`] naming the failed constraint for the best candidates.
//!
//! It owns no state and does no I/O besides [`Inventory::load_file`]; no clock, no
//! randomness except the seeded generator used by [`bench`](mod@bench). Of the vinfra crates
//! it depends only on `model`, for that generator (`model::SplitMix64`) and the host and VM
//! records that [`place`] reads. Its callers are the control layer and the API server (placing a redundant VM, and `placement explain` over the storage inventory)
//! and the CLI's `vinfra bench placement`; it never calls them. The agent does not use it.
//!
//! - [`model`]: the inventory types, YAML/JSON loading with per-path errors.
//! - [`Planner`]: indexes built once per inventory snapshot; `place`, `explain`, `commit`.
//! - [`place`]: where a plain VM fits by capacity ([`usage`] counts what is reserved).
//! - [`takeover`]: the decision to restart a VM on its standby when the primary is down.
//! - [`baseline`]: the naive brute force, for tests and the benchmark.
//! - [`bench`](mod@bench): seeded random clusters and the side-by-side benchmark.
//!
//! See `docs/PLACEMENT.md` for the algorithm and the measured rates.

#![warn(missing_docs)]

pub mod baseline;
pub mod bench;
mod diagnose;
pub mod explain;
mod fit;
mod load;
pub mod model;
mod plan;
mod takeover;

pub use bench::{bench_placement, bench_table, format_table, BenchRow};
pub use explain::{CandidateReport, Explanation, Reason};
pub use fit::{place, usage, PlaceError, Usage};
pub use load::LoadError;
pub use model::{
    FailureDomain, FieldError, Inventory, InventoryError, Placement, Problem, Replica,
    ReplicationTag, Request, ServerName, ServerResource, StorageName, StorageResource,
};
pub use plan::{CommitError, Planner};
pub use takeover::{takeover, Takeover, TakeoverDecision};
