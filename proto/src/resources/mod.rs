//! The model as config-stream resources, and back: one generic path for
//! every kind of resource weft serves.
//!
//! A kind is one [`Kind`] definition (type URL, protobuf message, the
//! model's object, key, encode, decode-and-validate, who receives it) in
//! [`kinds`]; [`KINDS`] is the table the stream's two ends dispatch on.
//! Encoding a model, the delta between two encodings and applying a
//! received response are written once, here, for all of them. Adding a
//! kind is one definition, one protobuf message and one row in [`KINDS`];
//! the round-trip and delta tests below run over every row.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost::Message;

use crate::model::{Changes, Model, ModelError};

mod kinds;
pub use kinds::{
    AuthorizationKind, BackendKind, RequestPolicyKind, RouteKind, ServiceKind, WaypointKind,
    WorkloadKind,
};

pub const WORKLOAD: &str = WorkloadKind::TYPE_URL;
pub const SERVICE: &str = ServiceKind::TYPE_URL;
pub const AUTHORIZATION: &str = AuthorizationKind::TYPE_URL;
pub const WAYPOINT: &str = WaypointKind::TYPE_URL;
pub const ROUTE: &str = RouteKind::TYPE_URL;
pub const BACKEND: &str = BackendKind::TYPE_URL;
pub const REQUEST_POLICY: &str = RequestPolicyKind::TYPE_URL;

/// Every kind weft serves, and the generic operations on it.
pub static KINDS: [KindDef; 7] = [
    KindDef::of::<WorkloadKind>(),
    KindDef::of::<ServiceKind>(),
    KindDef::of::<AuthorizationKind>(),
    KindDef::of::<WaypointKind>(),
    KindDef::of::<RouteKind>(),
    KindDef::of::<BackendKind>(),
    KindDef::of::<RequestPolicyKind>(),
];

/// Every type a ztunnel subscribes to.
pub const ZTUNNEL_TYPES: [&str; 4] = [WORKLOAD, SERVICE, AUTHORIZATION, WAYPOINT];

/// Every type a waypoint subscribes to.
pub const WAYPOINT_TYPES: [&str; 6] = [WORKLOAD, SERVICE, WAYPOINT, ROUTE, BACKEND, REQUEST_POLICY];

/// The kind served under `type_url`; `None` for a type weft does not
/// serve, which both ends refuse rather than read as another kind.
pub fn kind(type_url: &str) -> Option<&'static KindDef> {
    KINDS.iter().find(|k| k.type_url == type_url)
}

/// Which proxies receive a kind's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Every subscriber gets all of them (a ztunnel may dial any workload).
    Everyone,
    /// Only the node whose workloads a resource concerns (a ztunnel enforces
    /// inbound policy only): the controller filters by name.
    SelectedNodes,
}

/// One kind of resource: everything the stream needs to know about it.
pub trait Kind: 'static {
    const TYPE_URL: &'static str;
    const AUDIENCE: Audience = Audience::Everyone;
    type Message: Message + Default;
    /// How a model holds one (what is encoded).
    type Stored;
    /// What decoding gives and a [`Changes`] carries.
    type Object;

    fn stored(model: &Model) -> &[Arc<Self::Stored>];
    fn key(stored: &Self::Stored) -> &str;
    /// Whether `stored` is equal to its namesake in `previous`, so its
    /// encoding may be reused; kinds that are cheap to encode never are.
    fn unchanged(_previous: &Model, _stored: &Self::Stored) -> bool {
        false
    }
    fn encode(stored: &Self::Stored) -> Self::Message;
    /// Decodes and validates one resource named `name` on its own.
    fn decode(
        name: &str,
        msg: Self::Message,
        trust_domain: &str,
    ) -> Result<Self::Object, ModelError>;
    /// Where a change to this kind goes.
    fn changes(changes: &mut Changes) -> &mut Vec<(String, Option<Arc<Self::Object>>)>;
}

/// A [`Kind`] as a table row: its type URL and its generic operations.
pub struct KindDef {
    pub type_url: &'static str,
    pub audience: Audience,
    encode: fn(&Model, &Model, Option<&Named>) -> Named,
    decode: fn(&str, &prost_types::Any, &str, &mut Changes) -> Result<(), ModelError>,
    remove: fn(String, &mut Changes),
}

impl KindDef {
    pub const fn of<K: Kind>() -> KindDef {
        KindDef {
            type_url: K::TYPE_URL,
            audience: K::AUDIENCE,
            encode: encode_kind::<K>,
            decode: decode_kind::<K>,
            remove: |name, changes| K::changes(changes).push((name, None)),
        }
    }

    /// Decodes one resource of this kind and stages it in `changes`; errors
    /// name the resource, so the caller can NACK it and keep its last good
    /// model.
    pub fn decode_into(
        &self,
        name: &str,
        any: &prost_types::Any,
        trust_domain: &str,
        changes: &mut Changes,
    ) -> Result<(), ModelError> {
        (self.decode)(name, any, trust_domain, changes)
    }

    /// Stages the removal of `name` in `changes`.
    pub fn remove_into(&self, name: String, changes: &mut Changes) {
        (self.remove)(name, changes)
    }
}

/// One named, versioned resource ready for the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    /// Content hash: equal versions mean equal bytes.
    pub version: String,
    pub body: prost_types::Any,
}

/// One kind's resources by name; shared so that an unchanged resource is
/// carried from one version to the next without a copy.
pub type Named = BTreeMap<String, Arc<Resource>>;
/// Resources by type URL, then by name.
pub type Resources = BTreeMap<&'static str, Named>;

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

pub fn encode(model: &Model) -> Resources {
    encode_reusing(model, &Model::default(), &BTreeMap::new())
}

/// [`encode`], reusing the encoding of every object equal to one in
/// `previous` (encoded as `previous_resources`): comparing is several times
/// cheaper than encoding, and a change usually leaves all but one alone.
pub fn encode_reusing(
    model: &Model,
    previous: &Model,
    previous_resources: &Resources,
) -> Resources {
    KINDS
        .iter()
        .map(|k| {
            let prev = previous_resources.get(k.type_url);
            (k.type_url, (k.encode)(model, previous, prev))
        })
        .filter(|(_, named)| !named.is_empty())
        .collect()
}

fn encode_kind<K: Kind>(model: &Model, previous: &Model, reusable: Option<&Named>) -> Named {
    K::stored(model)
        .iter()
        .map(|s| {
            let key = K::key(s);
            let reused = reusable
                .and_then(|r| r.get(key))
                .filter(|_| K::unchanged(previous, s));
            let r = match reused {
                Some(r) => r.clone(),
                None => Arc::new(resource(K::TYPE_URL, key.to_owned(), &K::encode(s))),
            };
            (key.to_owned(), r)
        })
        .collect()
}

fn decode_kind<K: Kind>(
    name: &str,
    any: &prost_types::Any,
    trust_domain: &str,
    changes: &mut Changes,
) -> Result<(), ModelError> {
    if any.type_url != K::TYPE_URL {
        return Err(bad(
            name,
            format!("is a {}, not a {}", any.type_url, K::TYPE_URL),
        ));
    }
    let msg = K::Message::decode(any.value.as_slice()).map_err(|e| bad(name, e.to_string()))?;
    let object = K::decode(name, msg, trust_domain)?;
    K::changes(changes).push((name.to_owned(), Some(Arc::new(object))));
    Ok(())
}

pub(crate) fn bad(name: &str, reason: String) -> ModelError {
    ModelError::Invalid {
        object: name.to_owned(),
        field: "resource",
        reason,
    }
}

/// What changed in one kind between two encodings: names changed or added,
/// and names removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KindDelta {
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

/// The difference between two encodings, per kind: what a proxy holding
/// `from` must be sent to hold `to`.
pub fn delta(from: &Resources, to: &Resources) -> HashMap<&'static str, KindDelta> {
    let empty = Named::new();
    KINDS
        .iter()
        .map(|k| {
            let old = from.get(k.type_url).unwrap_or(&empty);
            let new = to.get(k.type_url).unwrap_or(&empty);
            (k.type_url, delta_named(old, new))
        })
        .collect()
}

/// The difference between two versions of one kind's resources.
pub fn delta_named(old: &Named, new: &Named) -> KindDelta {
    KindDelta {
        changed: new
            .values()
            .filter(|r| old.get(&r.name).map(|o| &o.version) != Some(&r.version))
            .map(|r| r.name.clone())
            .collect(),
        removed: old
            .keys()
            .filter(|n| !new.contains_key(*n))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests;
