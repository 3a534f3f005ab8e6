//! Gateway API filters as functions over a request or response: header
//! modifiers, redirects, URL rewrites and fault decisions.

use http::header::{HeaderName, HeaderValue, LOCATION};
use http::{HeaderMap, StatusCode, Uri};
use weft_proto::pb::weft::v1 as pb;

/// Applies a RequestHeaderModifier or ResponseHeaderModifier: set
/// replaces, add appends, remove deletes (names are case-insensitive).
pub fn modify_headers(headers: &mut HeaderMap, m: &pb::HeaderModifier) {
    let pair = |nv: &pb::NameValue| {
        let name = HeaderName::from_bytes(nv.name.as_bytes()).ok()?;
        let value = HeaderValue::from_str(&nv.value).ok()?;
        Some((name, value))
    };
    for (name, value) in m.set.iter().filter_map(pair) {
        headers.insert(name, value);
    }
    for (name, value) in m.add.iter().filter_map(pair) {
        headers.append(name, value);
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

/// The path with the matched prefix replaced (`ReplacePrefixMatch`), or
/// `full` (`ReplaceFullPath`); `None`: unchanged.
fn new_path(
    path: &str,
    full: Option<&String>,
    prefix: Option<&String>,
    matched_prefix: Option<&str>,
) -> Option<String> {
    if let Some(full) = full {
        return Some(full.clone());
    }
    let replacement = prefix?;
    let matched = matched_prefix.unwrap_or("/").trim_end_matches('/');
    let rest = path.strip_prefix(matched).unwrap_or(path);
    let joined = match (replacement.ends_with('/'), rest.starts_with('/')) {
        (true, true) => format!("{}{}", replacement.trim_end_matches('/'), rest),
        (false, false) if !rest.is_empty() => format!("{replacement}/{rest}"),
        _ => format!("{replacement}{rest}"),
    };
    Some(if joined.is_empty() {
        "/".into()
    } else {
        joined
    })
}

/// `uri` with its path replaced (the query kept); `None` when `path`
/// cannot be a URI's path.
pub fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// A URLRewrite: the request's path (and `host`) as the backend sees them.
pub fn rewrite(
    uri: &mut Uri,
    headers: &mut HeaderMap,
    r: &pb::Rewrite,
    matched_prefix: Option<&str>,
) {
    let full = r.path_full.as_ref();
    let prefix = r.path_prefix.as_ref();
    if let Some(path) = new_path(uri.path(), full, prefix, matched_prefix) {
        // A rewrite the URI cannot carry leaves the path as it was.
        if let Some(rewritten) = with_path(uri, &path) {
            *uri = rewritten;
        }
    }
    if !r.hostname.is_empty()
        && let Ok(v) = HeaderValue::from_str(&r.hostname)
    {
        headers.insert(http::header::HOST, v);
    }
}

/// A RequestRedirect: the status and `location` to answer with.
pub fn redirect(
    uri: &Uri,
    host: &str,
    r: &pb::Redirect,
    matched_prefix: Option<&str>,
) -> (StatusCode, HeaderValue) {
    let scheme = if r.scheme.is_empty() {
        "http"
    } else {
        &r.scheme
    };
    let (req_host, req_port) = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, p.parse().ok()),
        _ => (host, None),
    };
    let hostname = if r.hostname.is_empty() {
        req_host
    } else {
        &r.hostname
    };
    // The port: as asked, else the request's unless the scheme changed;
    // a scheme's well-known port is left out (Gateway API).
    let port = match (r.port, r.scheme.is_empty()) {
        (0, true) => req_port,
        (0, false) => None,
        (p, _) => u16::try_from(p).ok(),
    };
    let default_port = if scheme == "https" { 443 } else { 80 };
    let port = port
        .filter(|p| *p != default_port)
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let path = new_path(
        uri.path(),
        r.path_full.as_ref(),
        r.path_prefix.as_ref(),
        matched_prefix,
    )
    .unwrap_or_else(|| uri.path().to_owned());
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let location = format!("{scheme}://{hostname}{port}{path}{query}");
    let status = StatusCode::from_u16(r.status as u16)
        .ok()
        .filter(|s| s.is_redirection())
        .unwrap_or(StatusCode::FOUND);
    let value = HeaderValue::from_str(&location).unwrap_or(HeaderValue::from_static("/"));
    (status, value)
}

/// The `location` header's name, for callers building the response.
pub const REDIRECT_HEADER: HeaderName = LOCATION;

/// Whether a draw in 0..100 falls within `percent`.
pub fn hit(percent: u32, draw: u32) -> bool {
    draw < percent.min(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrites_keep_the_rest_of_the_path() {
        let p = |path: &str, with: &str, matched: &str| {
            new_path(path, None, Some(&with.to_owned()), Some(matched)).expect("rewritten")
        };
        assert_eq!(p("/v2/orders", "/api", "/v2"), "/api/orders");
        assert_eq!(p("/v2/orders", "/", "/v2"), "/orders");
        assert_eq!(p("/v2", "/", "/v2"), "/");
        assert_eq!(p("/v2/", "/api/", "/v2/"), "/api/");
        assert_eq!(p("/v2/x", "/api/", "/v2"), "/api/x");
        assert_eq!(
            new_path("/a", Some(&"/b".into()), None, None).as_deref(),
            Some("/b")
        );
    }

    #[test]
    fn redirects_say_where() {
        let uri: Uri = "/old/x?q=1".parse().expect("uri");
        let r = pb::Redirect {
            scheme: "https".into(),
            hostname: "example.com".into(),
            path_prefix: Some("/new".into()),
            status: 301,
            ..Default::default()
        };
        let (status, loc) = redirect(&uri, "api:8080", &r, Some("/old"));
        assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(loc, "https://example.com/new/x?q=1");
        let port_only = pb::Redirect {
            port: 8443,
            ..Default::default()
        };
        let (status, loc) = redirect(&uri, "api", &port_only, None);
        assert_eq!(status, StatusCode::FOUND);
        assert_eq!(loc, "http://api:8443/old/x?q=1");
    }

    #[test]
    fn header_modifiers_set_add_remove() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        let m = pb::HeaderModifier {
            set: vec![pb::NameValue {
                name: "X-A".into(),
                value: "2".into(),
            }],
            add: vec![pb::NameValue {
                name: "x-b".into(),
                value: "3".into(),
            }],
            remove: vec!["X-Gone".into()],
        };
        modify_headers(&mut h, &m);
        assert_eq!(h["x-a"], "2");
        assert_eq!(h["x-b"], "3");
        assert!(!h.contains_key("x-gone"));
    }
}
