//! L7 authorization: AuthorizationPolicies attached by `targetRefs` to
//! Services or a waypoint's Gateway, judged by that waypoint on every
//! request with the client's verified identity (never a header). Pure, so
//! `kubectl weft policy check` runs the waypoint's own decision.
//!
//! A request is normalised before it is matched, as mature meshes do:
//! percent-encoded unreserved characters decoded, `.` and `..` segments
//! resolved, repeated slashes merged, the fragment dropped; a path that
//! cannot be normalised safely (bad or NUL escapes, encoded `/` or `\`) is
//! refused (400) rather than judged. Hosts are compared without case, port
//! or trailing dot. DENY wins; when ALLOW policies apply, one must match.

use std::borrow::Cow;
use std::net::IpAddr;

use http::HeaderMap;

use crate::identity::Identity;
use crate::model::{Cidr, ModelError};
use crate::pb::weft::v1 as pb;

/// A value pattern: exact, `prefix*`, `*suffix` or `*`.
#[derive(Debug, Clone, PartialEq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    fn parse(s: &str, lowercase: bool) -> Pattern {
        let s = if lowercase {
            s.to_ascii_lowercase()
        } else {
            s.to_owned()
        };
        if s == "*" {
            Pattern::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Pattern::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            Pattern::Suffix(p.to_owned())
        } else {
            Pattern::Exact(s)
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(s) => v.ends_with(s.as_str()),
        }
    }
}

#[derive(Debug)]
struct Rule {
    principals: Vec<Identity>,
    namespaces: Vec<String>,
    cidrs: Vec<Cidr>,
    ports: Vec<u16>,
    methods: Vec<String>,
    paths: Vec<Pattern>,
    hosts: Vec<Pattern>,
    headers: Vec<(http::HeaderName, Pattern)>,
}

/// One policy, checked and compiled.
#[derive(Debug)]
pub struct RequestPolicy {
    /// `<namespace>/<name>`.
    pub key: String,
    pub spec: pb::RequestPolicy,
    rules: Vec<Rule>,
}

impl PartialEq for RequestPolicy {
    fn eq(&self, o: &Self) -> bool {
        self.key == o.key && self.spec == o.spec
    }
}

fn bad(object: &str, reason: String) -> ModelError {
    ModelError::Invalid {
        object: object.to_owned(),
        field: "rules",
        reason,
    }
}

/// Checks and compiles one policy as the config stream carries it.
pub fn compile(spec: pb::RequestPolicy, object: &str) -> Result<RequestPolicy, ModelError> {
    if pb::Action::try_from(spec.action).is_err() {
        return Err(bad(object, format!("unknown action {}", spec.action)));
    }
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule(r).map_err(|e| bad(object, format!("rules[{i}]: {e}"))))
        .collect::<Result<_, _>>()?;
    Ok(RequestPolicy {
        key: format!("{}/{}", spec.namespace, spec.name),
        spec,
        rules,
    })
}

fn rule(r: &pb::RequestRule) -> Result<Rule, String> {
    let principals = r
        .principals
        .iter()
        .map(|p| {
            p.parse::<Identity>()
                .map_err(|e| format!("principal {p}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let cidrs = r
        .source_ips
        .iter()
        .map(Cidr::from_pb)
        .collect::<Result<_, _>>()?;
    let ports = r
        .ports
        .iter()
        .map(|p| u16::try_from(*p).map_err(|_| format!("port {p} out of range")))
        .collect::<Result<_, _>>()?;
    let headers = r
        .headers
        .iter()
        .map(|h| {
            let name = http::HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("header name {:?}", h.name))?;
            Ok::<_, String>((name, Pattern::parse(&h.value, false)))
        })
        .collect::<Result<_, _>>()?;
    for p in &r.paths {
        if !(p.starts_with('/') || p.starts_with('*')) {
            return Err(format!("path {p:?} must start with / or *"));
        }
    }
    Ok(Rule {
        principals,
        namespaces: r.namespaces.clone(),
        cidrs,
        ports,
        methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
        paths: r.paths.iter().map(|p| Pattern::parse(p, false)).collect(),
        hosts: r.hosts.iter().map(|h| Pattern::parse(h, true)).collect(),
        headers,
    })
}

/// A request as it is judged: normalised (see [`normalize_path`],
/// [`normalize_host`]).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The client's verified identity (`None`: none was presented).
    pub identity: Option<&'a Identity>,
    pub ip: IpAddr,
    /// The destination port the client asked for.
    pub port: u16,
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// Which policy decided, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The deciding policy (`None`: no policy applies, or no ALLOW matched).
    pub policy: Option<String>,
    /// Its matching rule.
    pub rule: Option<usize>,
    pub reason: String,
}

impl RequestPolicy {
    /// Whether this policy judges requests to one of `services` arriving
    /// at `waypoint`.
    pub fn applies(&self, services: &[&str], waypoint: &str) -> bool {
        self.spec.waypoints.iter().any(|w| w == waypoint)
            || self
                .spec
                .services
                .iter()
                .any(|s| services.contains(&s.as_str()))
    }

    fn deny(&self) -> bool {
        self.spec.action == pb::Action::Deny as i32
    }

    /// The first rule `req` matches.
    fn matching(&self, req: &Request<'_>) -> Option<usize> {
        let deny = self.deny();
        self.rules.iter().position(|r| r.matches(req, deny))
    }
}

impl Rule {
    /// `deny`: a header that appears more than once matches when any
    /// value does (a DENY cannot be dodged by adding a value); for an
    /// ALLOW, every value must (one cannot be smuggled beside another).
    fn matches(&self, req: &Request<'_>, deny: bool) -> bool {
        let any_or_empty = |empty: bool, hit: bool| empty || hit;
        let id = req.identity;
        any_or_empty(
            self.principals.is_empty(),
            id.is_some_and(|i| self.principals.contains(i)),
        ) && any_or_empty(
            self.namespaces.is_empty(),
            id.is_some_and(|i| self.namespaces.iter().any(|n| n == i.namespace())),
        ) && any_or_empty(
            self.cidrs.is_empty(),
            self.cidrs.iter().any(|c| c.contains(req.ip)),
        ) && any_or_empty(self.ports.is_empty(), self.ports.contains(&req.port))
            && any_or_empty(
                self.methods.is_empty(),
                self.methods.iter().any(|m| m == req.method),
            )
            && any_or_empty(
                self.paths.is_empty(),
                self.paths.iter().any(|p| p.matches(req.path)),
            )
            && any_or_empty(
                self.hosts.is_empty(),
                self.hosts.iter().any(|h| h.matches(req.host)),
            )
            && self.headers.iter().all(|(name, p)| {
                let mut values = req.headers.get_all(name).iter().peekable();
                if values.peek().is_none() {
                    return false;
                }
                let mut ok = values.map(|v| v.to_str().is_ok_and(|v| p.matches(v)));
                if deny { ok.any(|b| b) } else { ok.all(|b| b) }
            })
    }
}

/// Judges `req` under the policies that apply: a matching DENY refuses;
/// if ALLOW policies apply, one must match; with none, the request passes.
pub fn judge<'p>(
    policies: impl IntoIterator<Item = &'p RequestPolicy>,
    req: &Request<'_>,
) -> Decision {
    let applicable: Vec<&RequestPolicy> = policies.into_iter().collect();
    let decided = |allowed, p: &RequestPolicy, rule, reason: String| Decision {
        allowed,
        policy: Some(p.key.clone()),
        rule: Some(rule),
        reason,
    };
    for p in applicable.iter().filter(|p| p.deny()) {
        if let Some(i) = p.matching(req) {
            return decided(false, p, i, format!("DENY policy {} rule {i}", p.key));
        }
    }
    let mut allows = applicable.iter().filter(|p| !p.deny()).peekable();
    if allows.peek().is_none() {
        return Decision {
            allowed: true,
            policy: None,
            rule: None,
            reason: "no policy applies".into(),
        };
    }
    for p in allows {
        if let Some(i) = p.matching(req) {
            return decided(true, p, i, format!("ALLOW policy {} rule {i}", p.key));
        }
    }
    Decision {
        allowed: false,
        policy: None,
        rule: None,
        reason: "no ALLOW policy matched".into(),
    }
}

/// [`judge`] with the policies of `policies` that apply to a request for
/// `services` arriving at `waypoint` (what the waypoint runs, and what
/// `kubectl weft policy check` asks of the controller).
pub fn judge_at(
    policies: &[std::sync::Arc<RequestPolicy>],
    (services, waypoint): (&[&str], &str),
    req: &Request<'_>,
) -> Decision {
    let applicable = policies
        .iter()
        .filter(|p| p.applies(services, waypoint))
        .map(|p| &**p);
    judge(applicable, req)
}

/// Why a path cannot be judged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} has a malformed percent-escape")]
    BadEscape(String),
    #[error("path {0:?} encodes a slash, a backslash or NUL")]
    Forbidden(String),
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The path a policy judges and the application receives: the fragment
/// dropped, unreserved escapes decoded (others kept, upper-cased), `.` and
/// `..` resolved (RFC 3986 §5.2.4), repeated slashes merged.
/// A path that is normal already (most are) is returned as it is.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if is_normal(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    resolve(raw).map(Cow::Owned)
}

/// [`normalize_path`] done in full.
fn resolve(raw: &str) -> Result<String, PathError> {
    let path = raw.split('#').next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute(raw.to_owned()));
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            decoded.push(bytes[i] as char);
            i += 1;
            continue;
        }
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
            return Err(PathError::BadEscape(raw.to_owned()));
        };
        if matches!(b, b'/' | b'\\' | 0) {
            return Err(PathError::Forbidden(raw.to_owned()));
        }
        if unreserved(b) {
            decoded.push(b as char);
        } else {
            decoded.push_str(&format!("%{b:02X}"));
        }
        i += 3;
    }
    if decoded.contains('\\') {
        return Err(PathError::Forbidden(raw.to_owned()));
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            // Repeated slashes merged; a trailing slash kept.
            "" if n != last => {}
            s => out.push(s),
        }
        if n == last && matches!(*seg, "." | "..") {
            out.push("");
        }
    }
    Ok(format!("/{}", out.join("/")))
}

/// Nothing for [`normalize_path`] to do: absolute, and no fragment,
/// escape, backslash, empty segment or dot segment.
fn is_normal(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains(['#', '%', '\\'])
        && !path.contains("//")
        && !path.contains("/./")
        && !path.contains("/../")
        && !path.ends_with("/.")
        && !path.ends_with("/..")
}

/// A host as policies compare it: lower case, without port or trailing dot.
pub fn normalize_host(raw: &str) -> String {
    let host = raw.trim();
    let host = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':')
            .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            .map_or(host, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise_as_a_mesh_must_before_matching() {
        let n = normalize_path;
        for (raw, want) in [
            ("/admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/a/./b/../admin", "/a/admin"),
            ("//admin//x", "/admin/x"),
            ("/admin#frag", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/a/b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/", "/"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/x%20y", "/x%20y"),
            ("/a/..b/.c/...", "/a/..b/.c/..."),
            ("/a/.", "/a/"),
            ("/a//", "/a/"),
        ] {
            assert_eq!(n(raw).as_deref(), Ok(want), "{raw}");
        }
        // The shortcut for paths already normal agrees with the full
        // resolution wherever it is taken: every path of up to six
        // characters from those that matter.
        let mut level = vec![String::from("/")];
        let mut paths = level.clone();
        for _ in 0..5 {
            level = (level.iter())
                .flat_map(|p| ['/', '.', 'a', '%', '#', '\\'].map(|c| format!("{p}{c}")))
                .collect();
            paths.extend(level.iter().cloned());
        }
        for p in paths.iter().filter(|p| is_normal(p)) {
            assert_eq!(resolve(p).as_deref(), Ok(p.as_str()), "{p}: not normal");
        }
        for raw in [
            "/admin%2fx",
            "/a%5Cb",
            "/a%00",
            "/a%zz",
            "/a%4",
            "admin",
            "/a\\b",
        ] {
            assert!(n(raw).is_err(), "{raw} must not normalise");
        }
    }

    #[test]
    fn hosts_compare_without_case_port_or_dot() {
        assert_eq!(normalize_host("API.Shop.svc:8080"), "api.shop.svc");
        assert_eq!(normalize_host("api.shop.svc."), "api.shop.svc");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_host("10.0.0.1"), "10.0.0.1");
    }

    fn policy(action: pb::Action, rules: Vec<pb::RequestRule>) -> RequestPolicy {
        let spec = pb::RequestPolicy {
            name: format!("{action:?}").to_lowercase(),
            namespace: "shop".into(),
            action: action as i32,
            services: vec!["shop/api".into()],
            waypoints: vec![],
            rules,
        };
        compile(spec, "test").expect("valid")
    }

    #[test]
    fn deny_wins_allow_must_match_headers_judged_on_every_value() {
        let web: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().expect("id");
        let other: Identity = "spiffe://cluster.local/ns/shop/sa/other"
            .parse()
            .expect("id");
        let deny = policy(
            pb::Action::Deny,
            vec![pb::RequestRule {
                paths: vec!["/admin/*".into()],
                ..Default::default()
            }],
        );
        let allow = policy(
            pb::Action::Allow,
            vec![pb::RequestRule {
                principals: vec![web.to_string()],
                headers: vec![pb::NameValue {
                    name: "x-team".into(),
                    value: "shop".into(),
                }],
                ..Default::default()
            }],
        );
        let mut headers = HeaderMap::new();
        headers.append("x-team", "shop".parse().expect("value"));
        fn req<'a>(id: &'a Identity, path: &'a str, headers: &'a HeaderMap) -> Request<'a> {
            Request {
                identity: Some(id),
                ip: [10, 0, 0, 1].into(),
                port: 80,
                method: "GET",
                path,
                host: "api",
                headers,
            }
        }
        let both = [&deny, &allow];
        assert!(judge(both, &req(&web, "/items", &headers)).allowed);
        let d = judge(both, &req(&web, "/admin/x", &headers));
        assert_eq!((d.allowed, d.policy.as_deref()), (false, Some("shop/deny")));
        assert!(
            !judge(both, &req(&other, "/items", &headers)).allowed,
            "not the principal"
        );
        headers.append("x-team", "ops".parse().expect("value"));
        assert!(
            !judge(both, &req(&web, "/items", &headers)).allowed,
            "a second value must match an ALLOW too"
        );
        assert!(
            judge([], &req(&other, "/admin/x", &headers)).allowed,
            "no policy"
        );
        assert!(deny.applies(&["shop/api"], "shop/wp") && !deny.applies(&["shop/db"], "shop/wp"));
    }
}
