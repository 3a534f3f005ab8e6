//! weft's waypoint: the optional L7 hop for the Services and workloads
//! bound to it (`weft.dev/use-waypoint`).
//!
//! A source ztunnel tunnels a bound connection here over HBONE
//! (`:authority` = the original VIP:port or pod IP:port); the waypoint
//! speaks HTTP on the tunnel (HTTP/1.1 or HTTP/2, detected from the first
//! bytes), routes each request with the Gateway API routes the controller
//! sent it, and sends it on over a new HBONE tunnel under its own identity
//! to the chosen endpoint. Each request goes through a fixed list of phases
//! ([`proxy`]), so policy, limits and telemetry slot in as phases.
//!
//! - [`app`]: config stream, certificates, the HBONE listener, drain.
//! - [`proxy`]: the per-request phases.
//! - [`sniff`]: HTTP or opaque TCP, declared or judged by the first bytes.
//! - [`filters`]: Gateway API filters (headers, redirect, rewrite, faults).
//! - [`upstream`]: HTTP to an endpoint over HBONE, connections reused.
//! - [`telemetry`]: one record per request (log line, metrics), traces.
//! - [`resilience`]: circuit breaking and outlier detection per Service.

pub mod app;
pub mod filters;
pub mod proxy;
pub mod resilience;
pub mod sniff;
pub mod telemetry;
pub mod upstream;
