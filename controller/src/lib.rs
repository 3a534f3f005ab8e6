//! weft-controller: the certificate authority, the config server (Delta
//! xDS), the Kubernetes and local-directory sources, and the REST API. The
//! control plane: it links the shared crate, never the data plane.

pub mod aggregated;
pub mod app;
pub mod ca;
pub mod ca_server;
pub mod kube_auth;
pub mod kube_ca;
pub mod leader;
pub mod nodes;
pub mod policy_check;
pub mod rest;
pub mod source;
pub mod state;
pub mod tls_incoming;
pub mod waypoint_deploy;
pub mod xds;
