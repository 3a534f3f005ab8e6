//! Why a proxied connection failed, typed, each with the response flag it
//! is logged and counted with (Envoy's flags, which Istio's dashboards
//! read): `NR` no route, `UH` no healthy upstream, `UF` upstream connection
//! failure, `UT` upstream timeout, `DENY` refused by policy (here or at the
//! destination), `DPE` passthrough denied.

use std::net::SocketAddr;

use weft_proto::hbone::HboneError;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0} is the capture port itself, not a destination")]
    Loop(SocketAddr),
    #[error("service {service} has no port {port}")]
    NoPort { service: String, port: u16 },
    #[error("service {0} has no ready endpoint")]
    NoHealthyUpstream(String),
    #[error("destination workload {0} has no address")]
    NoAddress(String),
    #[error("{0} is outside the mesh and passthrough is denied")]
    PassthroughDenied(SocketAddr),
    #[error("connect {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no certificate for the source yet: {0}")]
    NoCertificate(String),
    #[error(transparent)]
    Hbone(#[from] HboneError),
    #[error("copy ended: {0}")]
    Copy(std::io::Error),
    /// Bound traffic that cannot pass its waypoint is refused, never sent
    /// around it (fail closed).
    #[error("waypoint {waypoint} unavailable: {reason}; refused rather than sent around it")]
    WaypointUnavailable { waypoint: String, reason: String },
}

impl ConnError {
    /// The response flag this failure is logged and counted with.
    pub fn flag(&self) -> &'static str {
        match self {
            ConnError::Loop(_) | ConnError::NoPort { .. } | ConnError::NoAddress(_) => "NR",
            ConnError::NoHealthyUpstream(_) => "UH",
            ConnError::WaypointUnavailable { .. } => "UH",
            ConnError::PassthroughDenied(_) => "DPE",
            ConnError::Connect { .. } | ConnError::NoCertificate(_) | ConnError::Copy(_) => "UF",
            ConnError::Hbone(HboneError::Timeout(_)) => "UT",
            ConnError::Hbone(HboneError::Status(s))
                if *s == http::StatusCode::FORBIDDEN || *s == http::StatusCode::UNAUTHORIZED =>
            {
                "DENY"
            }
            ConnError::Hbone(_) => "UF",
        }
    }

    /// Nothing took the connection (gone, unreachable, 503): no byte of the
    /// client's was sent, so another endpoint of the same service may.
    pub fn endpoint_unavailable(&self) -> bool {
        match self {
            ConnError::Connect { .. } => true,
            ConnError::Hbone(e) => e.endpoint_unavailable(),
            _ => false,
        }
    }
}

/// Why the inbound side refused a CONNECT before answering it: the HTTP
/// status the client gets and the response flag it is logged with.
#[derive(Debug, thiserror::Error)]
pub enum InboundRefusal {
    #[error("refused: CONNECT to an address that is not this pod's")]
    NotThisPod,
    #[error("refused: CONNECT to a ztunnel port, not an application port")]
    ZtunnelPort,
    #[error("{0}")]
    Denied(String),
    #[error("application unreachable: {0}")]
    AppUnreachable(std::io::Error),
}

impl InboundRefusal {
    pub fn status(&self) -> http::StatusCode {
        match self {
            InboundRefusal::NotThisPod | InboundRefusal::ZtunnelPort => {
                http::StatusCode::BAD_REQUEST
            }
            InboundRefusal::Denied(_) => http::StatusCode::FORBIDDEN,
            InboundRefusal::AppUnreachable(_) => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn flag(&self) -> &'static str {
        match self {
            InboundRefusal::NotThisPod | InboundRefusal::ZtunnelPort => "NR",
            InboundRefusal::Denied(_) => "DENY",
            InboundRefusal::AppUnreachable(_) => "UF",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_flag() {
        let addr: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let cases = [
            (ConnError::Loop(addr), "NR"),
            (ConnError::NoHealthyUpstream("default/api".into()), "UH"),
            (
                ConnError::WaypointUnavailable {
                    waypoint: "default/wp".into(),
                    reason: "no ready instance".into(),
                },
                "UH",
            ),
            (ConnError::PassthroughDenied(addr), "DPE"),
            (
                ConnError::Connect {
                    addr,
                    source: refused,
                },
                "UF",
            ),
            (ConnError::Hbone(HboneError::Timeout("setup")), "UT"),
            (
                ConnError::Hbone(HboneError::Status(http::StatusCode::FORBIDDEN)),
                "DENY",
            ),
            (
                ConnError::Hbone(HboneError::Status(http::StatusCode::SERVICE_UNAVAILABLE)),
                "UF",
            ),
        ];
        for (e, flag) in cases {
            assert_eq!(e.flag(), flag, "{e}");
        }
        assert!(
            ConnError::Hbone(HboneError::Status(http::StatusCode::SERVICE_UNAVAILABLE))
                .endpoint_unavailable()
        );
        assert!(
            !ConnError::Hbone(HboneError::Status(http::StatusCode::FORBIDDEN))
                .endpoint_unavailable()
        );
    }
}
