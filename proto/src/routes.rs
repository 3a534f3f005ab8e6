//! Route selection: which rule of which HTTPRoute or GRPCRoute serves a
//! request, by the Gateway API's rules. Pure and shared, so the waypoint
//! and `kubectl weft` explain a decision with the same code.
//!
//! - The routes of a Service are its producer routes (in its namespace)
//!   unless the client's namespace has consumer routes for it (GAMMA): a
//!   namespace's own routes then decide for its clients, and only for them.
//! - Among all matches of all rules, the most specific wins: an exact path,
//!   then the longest prefix, then a regex path, then the prefix `/` (or no
//!   path match); then a method match; then
//!   the most header matches, then the most query matches. Ties go to the
//!   oldest route, then the `<namespace>/<name>` first in order, then the
//!   first rule and match as written.
//! - GRPCRoute: service and method both given, then service only, then
//!   method only; then the most header matches.
//! - Regexes are anchored (whole value) and compiled with size limits.

use std::cmp::Reverse;
use std::sync::Arc;

use regex::{Regex, RegexBuilder};

use crate::model::{Model, Route};
use crate::pb::weft::v1 as pb;
use pb::string_match::Kind as MatchKind;

/// Largest compiled regex (bytes): a route cannot make a proxy's matcher huge.
const REGEX_SIZE_LIMIT: usize = 64 * 1024;
const REGEX_NEST_LIMIT: u32 = 32;

fn regex(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .nest_limit(REGEX_NEST_LIMIT)
        .build()
        .map_err(|e| format!("regex {pattern:?}: {e}"))
}

/// A string matcher, regexes compiled.
#[derive(Debug, Clone)]
enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl Matcher {
    fn compile(m: &pb::StringMatch) -> Result<Matcher, String> {
        Ok(match m.kind() {
            MatchKind::Exact => Matcher::Exact(m.value.clone()),
            MatchKind::Prefix => Matcher::Prefix(m.value.clone()),
            MatchKind::Regex => Matcher::Regex(regex(&m.value)?),
        })
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Matcher::Exact(s) => v == s,
            Matcher::Regex(r) => r.is_match(v),
            Matcher::Prefix(p) => path_prefix(p, v),
        }
    }
}

/// Gateway API path prefixes match whole segments: `/v2` matches `/v2`
/// and `/v2/x`, never `/v2x`.
fn path_prefix(prefix: &str, path: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    match path.strip_prefix(p) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || p.is_empty(),
        None => false,
    }
}

/// One `matches` entry of a rule, compiled.
#[derive(Debug, Clone)]
struct CompiledMatch {
    path: Option<Matcher>,
    method: Option<String>,
    headers: Vec<(http::HeaderName, Matcher)>,
    query: Vec<(String, Matcher)>,
    grpc: Option<(Option<Matcher>, Option<Matcher>)>,
    /// Sort key: larger is more specific.
    specificity: (u8, usize, bool, usize, usize),
}

impl CompiledMatch {
    fn compile(m: &pb::RouteMatch) -> Result<CompiledMatch, String> {
        let path = m.path.as_ref().map(Matcher::compile).transpose()?;
        let headers = m
            .headers
            .iter()
            .map(|h| {
                let name = http::HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| format!("header name {:?} is not valid", h.name))?;
                let value =
                    Matcher::compile(h.value.as_ref().unwrap_or(&pb::StringMatch::default()))?;
                Ok((name, value))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let query = m
            .query
            .iter()
            .map(|q| {
                let v = Matcher::compile(q.value.as_ref().unwrap_or(&pb::StringMatch::default()))?;
                Ok((q.name.clone(), v))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let svc = m.grpc_service.as_ref().map(Matcher::compile).transpose()?;
        let method = m.grpc_method.as_ref().map(Matcher::compile).transpose()?;
        let grpc_rank = match (&svc, &method) {
            (Some(_), Some(_)) => 3,
            (Some(_), None) => 2,
            (None, Some(_)) => 1,
            (None, None) => 0,
        };
        // A regex ranks below every prefix but "/" (which no path match is).
        let (kind_rank, prefix_len) = match &path {
            Some(Matcher::Exact(_)) => (3, 0),
            Some(Matcher::Prefix(p)) => (2, p.trim_end_matches('/').len() + 1),
            Some(Matcher::Regex(_)) => (2, 1),
            None => (2, 0),
        };
        Ok(CompiledMatch {
            specificity: (
                kind_rank.max(grpc_rank),
                prefix_len,
                !m.method.is_empty(),
                headers.len(),
                query.len(),
            ),
            grpc: (grpc_rank > 0).then_some((svc, method)),
            method: (!m.method.is_empty()).then(|| m.method.clone()),
            path,
            headers,
            query,
        })
    }

    fn matches(&self, req: &Request<'_>) -> bool {
        if let Some(p) = &self.path
            && !p.matches(req.path)
        {
            return false;
        }
        if self.method.as_deref().is_some_and(|m| m != req.method) {
            return false;
        }
        if let Some((svc, method)) = &self.grpc {
            // A gRPC call's path is /<package.Service>/<Method>.
            let mut parts = req.path.trim_start_matches('/').splitn(2, '/');
            let (s, m) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if svc.as_ref().is_some_and(|x| !x.matches(s))
                || method.as_ref().is_some_and(|x| !x.matches(m))
            {
                return false;
            }
        }
        let header_ok = |(name, m): &(http::HeaderName, Matcher)| {
            req.headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
        };
        let query_ok = |(name, m): &(String, Matcher)| {
            // The first value of a repeated parameter, as the spec allows.
            query_pairs(req.query)
                .find(|(k, _)| k == name)
                .is_some_and(|(_, v)| m.matches(v))
        };
        self.headers.iter().all(header_ok) && self.query.iter().all(query_ok)
    }
}

fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// A route's rules compiled: per rule, its matches.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    rules: Vec<Vec<CompiledMatch>>,
}

/// Checks that every matcher of `route` compiles (and returns them).
pub fn compile(route: &pb::Route) -> Result<Compiled, String> {
    let rules = route
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let ms: Result<Vec<_>, String> = if rule.matches.is_empty() {
                Ok(vec![CompiledMatch::compile(&pb::RouteMatch::default())?])
            } else {
                rule.matches.iter().map(CompiledMatch::compile).collect()
            };
            ms.map_err(|e| format!("rules[{i}]: {e}"))
        })
        .collect::<Result<_, _>>()?;
    Ok(Compiled { rules })
}

/// What a request is matched on. `path` is the path alone, normalised.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

/// The rule that serves a request.
#[derive(Debug, Clone)]
pub struct Selected {
    pub route: Arc<Route>,
    pub rule: usize,
}

impl Selected {
    pub fn rule(&self) -> &pb::RouteRule {
        &self.route.spec.rules[self.rule]
    }
}

/// Every match that may serve one Service port for one client namespace,
/// most specific first.
#[derive(Debug, Default)]
pub struct RouteTable {
    entries: Vec<(Arc<Route>, usize, usize)>,
}

impl RouteTable {
    /// The table for requests from `client_ns` to `service` on `port`.
    pub fn build(model: &Model, service: &str, port: u16, client_ns: &str) -> RouteTable {
        let service_ns = service.split_once('/').map_or("", |(ns, _)| ns);
        let attached = |r: &Route| {
            r.spec
                .parents
                .iter()
                .any(|p| p.service == service && (p.port == 0 || p.port == u32::from(port)))
        };
        let mine: Vec<&Arc<Route>> = model.routes.iter().filter(|r| attached(r)).collect();
        let consumer: Vec<&Arc<Route>> = mine
            .iter()
            .copied()
            .filter(|r| r.spec.namespace == client_ns && client_ns != service_ns)
            .collect();
        let chosen: Vec<&Arc<Route>> = if consumer.is_empty() {
            mine.into_iter()
                .filter(|r| r.spec.namespace == service_ns)
                .collect()
        } else {
            consumer
        };
        let mut entries: Vec<(Arc<Route>, usize, usize)> = chosen
            .into_iter()
            .flat_map(|r| {
                let rules = r.compiled.rules.iter().enumerate();
                rules.flat_map(move |(ri, ms)| (0..ms.len()).map(move |mi| (r.clone(), ri, mi)))
            })
            .collect();
        entries.sort_by_cached_key(|(r, ri, mi)| {
            let m = &r.compiled.rules[*ri][*mi];
            (
                Reverse(m.specificity),
                r.spec.created,
                format!("{}/{}", r.spec.namespace, r.spec.name),
                *ri,
                *mi,
            )
        });
        RouteTable { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The rule serving `req`, or `None` (the spec's 404).
    pub fn select(&self, req: &Request<'_>) -> Option<Selected> {
        self.entries
            .iter()
            .find(|(r, ri, mi)| r.compiled.rules[*ri][*mi].matches(req))
            .map(|(r, ri, _)| Selected {
                route: r.clone(),
                rule: *ri,
            })
    }
}

/// The backend a draw in `0..total weight` lands on; `None` when every
/// weight is zero (the spec's 500).
pub fn pick_backend(rule: &pb::RouteRule, draw: u64) -> Option<&pb::RouteBackend> {
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut at = draw % total;
    for b in &rule.backends {
        let w = u64::from(b.weight);
        if at < w {
            return Some(b);
        }
        at -= w;
    }
    None
}

#[cfg(test)]
mod tests;
