//! Multi-operator C-V2X on MEC: one service per operator, with
//!
//! - the **V2X API** ([`function::V2xFunction::provision`], `revoke`): the operator's
//!   subscription data per device (allowed V2X services, PLMNs, validity);
//! - the **V2X application function** ([`function::V2xFunction::authorize`]): a device's
//!   authorization request answered with configuration parameters
//!   ([`types::ConfigurationParameters`], TS 24.588 shape), and the links it then opens on
//!   the PC5 gate ([`gate::Pc5Gate`], nftables, closed by default);
//! - the **ETSI GS MEC 030 VIS** (`/vis/v2`, [`vis::Vis`]);
//! - the **relay** through both operators' MECs ([`relay`]);
//! - the **link protocol** between devices over PC5 ([`pc5`]: direct communication request,
//!   security mode command/complete, accept, then integrity-protected messages) and the
//!   emulated vehicle ([`device`]);
//! - the two-operator **lab** in network namespaces ([`lab`]).

pub mod bench;
pub mod device;
pub mod function;
pub mod gate;
pub mod http;
pub mod httpc;
pub mod journal;
pub mod lab;
pub mod mec;
pub mod netns;
pub mod pc5;
pub mod relay;
pub mod schema;
pub mod serve;
pub mod types;
pub mod vis;
pub mod ws;
