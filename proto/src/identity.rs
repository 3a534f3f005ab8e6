//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Parsing is strict on purpose: an identity arrives from certificates and
//! CSRs that anyone can craft, and two spellings of one identity would let a
//! policy written for one be bypassed by the other. So there is exactly one
//! accepted spelling: lowercase trust domain, no percent-encoding, no empty or
//! dot segments, no query or fragment, nothing after the service account.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID the SPIFFE spec allows (URI length limit).
const MAX_LEN: usize = 2048;
/// Longest trust domain the SPIFFE spec allows.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// The namespace and service account the controller runs as; proxies expect
/// this identity on the controller's port.
pub const CONTROLLER_NAMESPACE: &str = "weft-system";
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "weft-controller";

/// The controller's identity in `trust_domain`.
pub fn controller(trust_domain: &str) -> Result<Identity, IdentityError> {
    Identity::new(
        trust_domain,
        CONTROLLER_NAMESPACE,
        CONTROLLER_SERVICE_ACCOUNT,
    )
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is {0} bytes long; the limit is {MAX_LEN}")]
    TooLong(usize),
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    Scheme,
    #[error("SPIFFE ID has an empty trust domain")]
    EmptyTrustDomain,
    #[error("trust domain {0:?} is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong(String),
    #[error("trust domain {0:?} has a character outside lowercase letters, digits, '.', '-', '_'")]
    TrustDomainChar(String),
    #[error("SPIFFE ID path must be /ns/<namespace>/sa/<service-account>, found {0:?}")]
    Path(String),
    #[error(
        "{kind} {segment:?} is empty, \".\" or \"..\", or has a character outside letters, digits, '.', '-', '_'"
    )]
    Segment { kind: &'static str, segment: String },
}

/// A workload's identity. Construct with [`Identity::new`] or `parse()`; both
/// validate, so every `Identity` value is well formed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl Identity {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        check_trust_domain(trust_domain)?;
        check_segment("namespace", namespace)?;
        check_segment("service account", service_account)?;
        let id = Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let len = id.to_string().len();
        if len > MAX_LEN {
            return Err(IdentityError::TooLong(len));
        }
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(IdentityError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(IdentityError::TooLong(s.len()));
        }
        let rest = s.strip_prefix("spiffe://").ok_or(IdentityError::Scheme)?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        check_trust_domain(trust_domain)?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => Identity::new(trust_domain, ns, sa),
            _ => Err(IdentityError::Path(format!("/{path}"))),
        }
    }
}

fn check_trust_domain(td: &str) -> Result<(), IdentityError> {
    if td.is_empty() {
        return Err(IdentityError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdentityError::TrustDomainTooLong(td.to_owned()));
    }
    let ok = td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
    if !ok {
        return Err(IdentityError::TrustDomainChar(td.to_owned()));
    }
    Ok(())
}

fn check_segment(kind: &'static str, segment: &str) -> Result<(), IdentityError> {
    let ok = !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Segment {
            kind,
            segment: segment.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let s = "spiffe://cluster.local/ns/default/sa/web";
        let id: Identity = s.parse().expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), s);
        assert_eq!(Identity::new("cluster.local", "default", "web"), Ok(id));
    }

    #[test]
    fn names_the_fault() {
        let cases: &[(&str, IdentityError)] = &[
            ("", IdentityError::Empty),
            ("http://x/ns/a/sa/b", IdentityError::Scheme),
            ("spiffe:///ns/a/sa/b", IdentityError::EmptyTrustDomain),
            (
                "spiffe://Cluster.local/ns/a/sa/b",
                IdentityError::TrustDomainChar("Cluster.local".into()),
            ),
            (
                "spiffe://td/ns/a/sa/b/extra",
                IdentityError::Path("/ns/a/sa/b/extra".into()),
            ),
            ("spiffe://td", IdentityError::Path("/".into())),
            (
                "spiffe://td/sa/b/ns/a",
                IdentityError::Path("/sa/b/ns/a".into()),
            ),
            (
                "spiffe://td/ns//sa/b",
                IdentityError::Segment {
                    kind: "namespace",
                    segment: String::new(),
                },
            ),
            (
                "spiffe://td/ns/a/sa/..",
                IdentityError::Segment {
                    kind: "service account",
                    segment: "..".into(),
                },
            ),
            (
                "spiffe://td/ns/a%2f/sa/b",
                IdentityError::Segment {
                    kind: "namespace",
                    segment: "a%2f".into(),
                },
            ),
            (
                "spiffe://td/ns/a\0/sa/b",
                IdentityError::Segment {
                    kind: "namespace",
                    segment: "a\0".into(),
                },
            ),
            (
                "spiffe://td/ns/a/sa/b?x=1",
                IdentityError::Segment {
                    kind: "service account",
                    segment: "b?x=1".into(),
                },
            ),
            (
                "spiffe://td:443/ns/a/sa/b",
                IdentityError::TrustDomainChar("td:443".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Identity>().as_ref(), Err(want), "{input:?}");
            // Every error renders to a message a person can act on.
            assert!(!want.to_string().is_empty());
        }
    }

    #[test]
    fn rejects_oversized() {
        let long = format!("spiffe://td/ns/a/sa/{}", "x".repeat(MAX_LEN));
        assert!(matches!(
            long.parse::<Identity>(),
            Err(IdentityError::TooLong(_))
        ));
    }
}
