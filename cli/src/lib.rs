//! The top of the house: `kubectl weft` (its commands in [`commands`]),
//! the local mesh demo, and the network-namespace topology that the demo,
//! the integration tests and the benches share ([`demo::topology`]). It
//! links the controller and the ztunnel; neither links it, and the
//! controller links no data-plane code.

pub mod cluster;
pub mod commands;
pub mod demo;
