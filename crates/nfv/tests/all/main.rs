//! nfv integration tests: descriptors, drivers against real libvirtd and published-API fakes,
//! links between VNF connection points over real namespaces, and the NS lifecycle across two sites.

mod descriptors;
mod drivers;
mod fakes;
mod libvirtd;
mod lifecycle;
mod links;
mod netns;
mod scale;
mod vinfra_site;
