//! The model as config-stream resources (`weft.v1.Workload`, `Service`,
//! `Authorization`) and back. The controller encodes what it knows; a proxy
//! decodes what it receives and validates it through the same [`Model`]
//! rules a static file goes through.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use prost::Message;

use std::sync::Arc;

use crate::model::{
    self, Action, Model, ModelError, Policy, PolicySpec, PortSpec, RuleSpec, ServiceDef,
    ServiceSpec, Workload, WorkloadSpec,
};
use crate::pb::weft::v1 as pb;

pub const WORKLOAD: &str = "type.googleapis.com/weft.v1.Workload";
pub const SERVICE: &str = "type.googleapis.com/weft.v1.Service";
pub const AUTHORIZATION: &str = "type.googleapis.com/weft.v1.Authorization";
/// Every type a ztunnel subscribes to.
pub const ZTUNNEL_TYPES: [&str; 3] = [WORKLOAD, SERVICE, AUTHORIZATION];

/// One named, versioned resource ready for the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    /// Content hash: equal versions mean equal bytes.
    pub version: String,
    pub body: prost_types::Any,
}

fn resource(type_url: &str, name: String, msg: &impl Message) -> Resource {
    let value = msg.encode_to_vec();
    Resource {
        version: format!("{:016x}", fnv1a(&value)),
        name,
        body: prost_types::Any {
            type_url: type_url.to_owned(),
            value,
        },
    }
}

// Versions need only be stable and change with content; FNV-1a is enough.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes).ok()?,
        ))),
        _ => None,
    }
}

/// The model as resources, by type URL, keyed by name.
/// Resources by type URL, keyed by name; shared so that an unchanged
/// resource is carried from one version to the next without a copy.
pub type Resources = BTreeMap<&'static str, BTreeMap<String, Arc<Resource>>>;

pub fn encode(model: &Model) -> Resources {
    encode_reusing(model, &Model::default(), &BTreeMap::new())
}

/// [`encode`], reusing the encoding of every workload equal to one in
/// `previous` (encoded as `previous_resources`): comparing is several times
/// cheaper than encoding, and a change usually leaves all but one alone.
pub fn encode_reusing(
    model: &Model,
    previous: &Model,
    previous_resources: &Resources,
) -> Resources {
    let mut out = Resources::new();
    let reusable = previous_resources.get(WORKLOAD);
    for w in &model.workloads {
        let same = previous.workload_by_key(&w.key).is_some_and(|p| **p == **w);
        if let Some(r) = reusable.and_then(|r| r.get(&w.key)).filter(|_| same) {
            out.entry(WORKLOAD)
                .or_default()
                .insert(w.key.clone(), r.clone());
            continue;
        }
        let msg = pb::Workload {
            uid: w.key.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.identity.service_account().to_owned(),
            trust_domain: w.identity.trust_domain().to_owned(),
            node: w.node.clone(),
            addresses: w.addresses.iter().map(ip_bytes).collect(),
            meshed: w.meshed,
            ready: true,
            services: w.services.clone(),
            waypoint: String::new(),
            labels: w.labels.clone().into_iter().collect(),
        };
        out.entry(WORKLOAD).or_default().insert(
            w.key.clone(),
            Arc::new(resource(WORKLOAD, w.key.clone(), &msg)),
        );
    }
    for s in &model.services {
        let (namespace, name) = s.key.split_once('/').unwrap_or(("default", &s.key));
        let msg = pb::Service {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            hostname: model::service_host(&s.key),
            addresses: s.addresses.iter().map(ip_bytes).collect(),
            ports: s
                .ports
                .iter()
                .map(|(port, target)| pb::ServicePort {
                    port: u32::from(*port),
                    target_port: u32::from(*target),
                    app_protocol: String::new(),
                })
                .collect(),
            waypoint: String::new(),
        };
        out.entry(SERVICE).or_default().insert(
            s.key.clone(),
            Arc::new(resource(SERVICE, s.key.clone(), &msg)),
        );
    }
    for p in &model.policies {
        let (_, name) = p.key.split_once('/').unwrap_or(("", &p.key));
        let msg = pb::Authorization {
            name: name.to_owned(),
            namespace: p.namespace.clone(),
            scope: if p.selector.is_empty() {
                pb::Scope::Namespace
            } else {
                pb::Scope::WorkloadSelector
            } as i32,
            action: match p.action {
                Action::Allow => pb::Action::Allow,
                Action::Deny => pb::Action::Deny,
            } as i32,
            selector: p.selector.clone().into_iter().collect(),
            rules: p
                .rules
                .iter()
                .map(|r| pb::Rule {
                    matches: vec![pb::Match {
                        principals: r.principals.iter().map(|i| i.to_string()).collect(),
                        namespaces: r.namespaces.clone(),
                        source_ips: r
                            .ip_blocks
                            .iter()
                            .map(|c| pb::Cidr {
                                address: ip_bytes(&c.addr()),
                                prefix_len: u32::from(c.prefix()),
                            })
                            .collect(),
                        destination_ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
                        ..Default::default()
                    }],
                })
                .collect(),
        };
        out.entry(AUTHORIZATION).or_default().insert(
            p.key.clone(),
            Arc::new(resource(AUTHORIZATION, p.key.clone(), &msg)),
        );
    }
    out
}

fn bad(name: &str, reason: String) -> ModelError {
    ModelError::Invalid {
        object: name.to_owned(),
        field: "resource",
        reason,
    }
}

fn ips(name: &str, addrs: &[Vec<u8>]) -> Result<Vec<IpAddr>, ModelError> {
    addrs
        .iter()
        .map(|a| ip_from(a).ok_or_else(|| bad(name, "address is not 4 or 16 bytes".into())))
        .collect()
}

fn port(name: &str, p: u32) -> Result<u16, ModelError> {
    u16::try_from(p).map_err(|_| bad(name, format!("port {p} out of range")))
}

/// One received resource, decoded and validated on its own: what a proxy
/// keeps per name, so a change costs one decode, not the mesh's.
#[derive(Debug, Clone)]
pub enum Decoded {
    Workload(Arc<Workload>),
    Service(Arc<ServiceDef>),
    Policy(Arc<Policy>),
}

/// Decodes one resource of `type_url`; errors name the resource, so the
/// caller can NACK it and keep its last good model.
pub fn decode_one(
    type_url: &str,
    name: &str,
    any: &prost_types::Any,
    trust_domain: &str,
) -> Result<Decoded, ModelError> {
    if any.type_url != type_url {
        return Err(bad(
            name,
            format!("is a {}, not a {type_url}", any.type_url),
        ));
    }
    let value = any.value.as_slice();
    match type_url {
        WORKLOAD => {
            let w = pb::Workload::decode(value).map_err(|e| bad(name, e.to_string()))?;
            if !w.trust_domain.is_empty() && w.trust_domain != trust_domain {
                return Err(bad(
                    name,
                    format!(
                        "trust domain {} is not ours ({trust_domain})",
                        w.trust_domain
                    ),
                ));
            }
            let spec = WorkloadSpec {
                addresses: ips(name, &w.addresses)?,
                name: w.name,
                namespace: w.namespace,
                service_account: w.service_account,
                node: w.node,
                meshed: w.meshed,
                services: w.services,
                labels: w.labels.into_iter().collect(),
            };
            Ok(Decoded::Workload(Arc::new(model::workload(
                spec,
                trust_domain,
                name,
            )?)))
        }
        SERVICE => {
            let s = pb::Service::decode(value).map_err(|e| bad(name, e.to_string()))?;
            let ports = s
                .ports
                .iter()
                .map(|p| {
                    Ok(PortSpec {
                        port: port(name, p.port)?,
                        target_port: Some(port(name, p.target_port)?),
                    })
                })
                .collect::<Result<_, ModelError>>()?;
            let spec = ServiceSpec {
                addresses: ips(name, &s.addresses)?,
                name: s.name,
                namespace: s.namespace,
                ports,
            };
            Ok(Decoded::Service(Arc::new(model::service(spec, name)?)))
        }
        AUTHORIZATION => Ok(Decoded::Policy(Arc::new(decode_policy(name, value)?))),
        other => Err(bad(name, format!("{other} is not a type weft serves"))),
    }
}

fn decode_policy(name: &str, value: &[u8]) -> Result<Policy, ModelError> {
    let a = pb::Authorization::decode(value).map_err(|e| bad(name, e.to_string()))?;
    let mut rules = Vec::new();
    for m in a.rules.iter().flat_map(|r| r.matches.iter()) {
        if !(m.not_principals.is_empty()
            && m.not_namespaces.is_empty()
            && m.not_source_ips.is_empty()
            && m.not_destination_ports.is_empty())
        {
            return Err(bad(
                name,
                "not* matchers are not supported yet; refusing rather than guessing".into(),
            ));
        }
        let ip_blocks = m
            .source_ips
            .iter()
            .map(|c| {
                ip_from(&c.address)
                    .map(|ip| format!("{ip}/{}", c.prefix_len))
                    .ok_or_else(|| bad(name, "CIDR address is not 4 or 16 bytes".into()))
            })
            .collect::<Result<_, _>>()?;
        let ports = m
            .destination_ports
            .iter()
            .map(|p| port(name, *p))
            .collect::<Result<_, _>>()?;
        rules.push(RuleSpec {
            principals: m.principals.clone(),
            namespaces: m.namespaces.clone(),
            ip_blocks,
            ports,
        });
    }
    let action = match pb::Action::try_from(a.action) {
        Ok(pb::Action::Allow) => Action::Allow,
        Ok(pb::Action::Deny) => Action::Deny,
        Err(_) => return Err(bad(name, format!("unknown action {}", a.action))),
    };
    let spec = PolicySpec {
        name: a.name,
        namespace: a.namespace,
        action,
        selector: a.selector.into_iter().collect(),
        rules,
    };
    model::policy(spec, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole model from resources by type, decoded one by one: the oracle
    /// the tests compare against.
    fn decode(
        resources: &BTreeMap<String, BTreeMap<String, prost_types::Any>>,
        trust_domain: &str,
    ) -> Result<Model, ModelError> {
        let (mut workloads, mut services, mut policies) = (Vec::new(), Vec::new(), Vec::new());
        for (type_url, named) in resources {
            for (name, any) in named {
                match decode_one(type_url, name, any, trust_domain)? {
                    Decoded::Workload(w) => workloads.push(w),
                    Decoded::Service(s) => services.push(s),
                    Decoded::Policy(p) => policies.push(p),
                }
            }
        }
        Model::assemble(workloads, services.iter().map(|s| &**s), policies)
    }

    const YAML: &str = r#"
workloads:
  - {name: web, serviceAccount: web, node: a, addresses: [10.0.1.2], labels: {app: web}}
  - {name: api, serviceAccount: api, node: b, addresses: [10.0.2.2, "fd00::2"], services: [default/api]}
services:
  - {name: api, addresses: [10.96.0.10], ports: [{port: 80, targetPort: 8080}]}
policies:
  - {name: p, action: DENY, selector: {app: api}, rules: [{principals: ["spiffe://cluster.local/ns/default/sa/db"], ipBlocks: [10.0.0.0/8], ports: [8080]}]}
"#;

    fn by_type(model: &Model) -> BTreeMap<String, BTreeMap<String, prost_types::Any>> {
        encode(model)
            .into_iter()
            .map(|(t, rs)| {
                (
                    t.to_owned(),
                    rs.into_iter().map(|(n, r)| (n, r.body.clone())).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn round_trips_through_resources() {
        let model = Model::from_yaml(YAML, "cluster.local").expect("valid");
        let back = decode(&by_type(&model), "cluster.local").expect("decodes");
        // Re-encoding gives identical resources, versions included.
        assert_eq!(encode(&back), encode(&model));
        assert_eq!(back.workloads.len(), 2);
        assert_eq!(back.policies[0].rules[0].ports, vec![8080]);
    }

    #[test]
    fn versions_change_only_with_content() {
        let a = encode(&Model::from_yaml(YAML, "cluster.local").expect("valid"));
        let b = encode(
            &Model::from_yaml(&YAML.replace("10.0.1.2", "10.0.1.3"), "cluster.local")
                .expect("valid"),
        );
        assert_ne!(
            a[WORKLOAD]["default/web"].version,
            b[WORKLOAD]["default/web"].version
        );
        assert_eq!(
            a[WORKLOAD]["default/api"].version,
            b[WORKLOAD]["default/api"].version
        );
        assert_eq!(
            a[SERVICE]["default/api"].version,
            b[SERVICE]["default/api"].version
        );
    }

    #[test]
    fn malformed_resources_are_named() {
        let mut res = by_type(&Model::from_yaml(YAML, "cluster.local").expect("valid"));
        res.get_mut(WORKLOAD).expect("w").insert(
            "default/bad".into(),
            prost_types::Any {
                type_url: WORKLOAD.into(),
                value: vec![0xff, 0xff, 0xff],
            },
        );
        let err = decode(&res, "cluster.local")
            .expect_err("garbage")
            .to_string();
        assert!(err.contains("default/bad"), "{err}");
        let mut res = by_type(&Model::from_yaml(YAML, "cluster.local").expect("valid"));
        let foreign = pb::Workload {
            name: "x".into(),
            node: "a".into(),
            trust_domain: "evil.td".into(),
            addresses: vec![vec![1, 2, 3, 4]],
            ..Default::default()
        };
        res.get_mut(WORKLOAD).expect("w").insert(
            "default/x".into(),
            prost_types::Any {
                type_url: WORKLOAD.into(),
                value: foreign.encode_to_vec(),
            },
        );
        assert!(
            decode(&res, "cluster.local")
                .expect_err("foreign")
                .to_string()
                .contains("not ours")
        );
    }

    #[test]
    fn reusing_encodings_gives_the_same_resources() {
        let before = Model::from_yaml(YAML, "cluster.local").expect("valid");
        let after = Model::from_yaml(&YAML.replace("10.0.1.2", "10.0.1.7"), "cluster.local")
            .expect("valid");
        let reused = encode_reusing(&after, &before, &encode(&before));
        assert_eq!(reused, encode(&after));
        assert_ne!(
            reused[WORKLOAD]["default/web"],
            encode(&before)[WORKLOAD]["default/web"]
        );
    }
}
