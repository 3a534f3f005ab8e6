//! weft-ztunnel: the per-node proxy. Enrolled pods' TCP traffic is captured
//! by nftables inside each pod's namespace and carried between nodes over
//! HBONE; the receiving side authorizes by SPIFFE identity.

pub mod app;
pub mod capture;
pub mod cni;
pub mod cni_install;
pub mod enroll;
pub mod error;
pub mod handover;
pub mod inbound;
pub mod netns;
pub mod node;
pub mod outbound;
pub mod pods;
pub mod socks5;
pub mod telemetry;
