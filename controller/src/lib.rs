//! weft-controller: the certificate authority and (with later issues) the
//! config server, Kubernetes and file sources, REST API and CLI.

pub mod app;
pub mod ca;
pub mod ca_server;
pub mod cli;
pub mod demo;
pub mod nodes;
pub mod rest;
pub mod source;
pub mod tls_incoming;
pub mod xds;
