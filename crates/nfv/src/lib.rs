//! Network functions for vinfra: VNF/NS descriptors, multi-site network services (NS
//! orchestration through generic commands), and link establishment between VNF connection
//! points.
//!
//! Layers, pure first:
//! - [`descriptor`]: VNFD/NSD YAML modelled on ETSI NFV SOL001 (TOSCA), validated with every
//!   error reported at its path in the file. No I/O except the `load_*` helpers.
//! - [`plan`]: NS → per-site lists of [`plan::GenericCommand`]s, with IP address management.
//!   Pure: no clock, no sockets.
//! - [`driver`]: the [`driver::SiteDriver`] trait, one implementation per cloud-management
//!   software (`openstack`, `kubernetes`, `libvirt`, and `vinfra` itself), a light `process`
//!   site (processes in network namespaces) and a simulated `sim` site, and the conformance
//!   suite they all pass.
//! - [`link`]: the link-establishment procedure and the per-VNF link agent (sockets in
//!   network namespaces).
//! - [`ns`]: the executor: sites and VNFs in parallel, rollback on failure, terminate.
//! - [`bench`](mod@bench): `vinfra bench ns` over simulated sites ([`driver::sim`]).
//!
//! Of the vinfra crates it depends on `model` (the link request and reply on the wire, the
//! REST bodies) and `client` (the `vinfra` site driver drives a vinfra control plane over its
//! REST API, like any other cloud's). The API server (descriptors, NS instances) and the CLI
//! call into it; it never calls the `api` crate. It owns no long-lived tasks except those of a [`link::LinkAgent`], which stop
//! when the agent is dropped.
#![warn(missing_docs)]

pub mod bench;
pub mod descriptor;
pub mod driver;
pub mod link;
pub mod ns;
pub mod plan;
pub mod scale;
