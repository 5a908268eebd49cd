//! HTTP routing rules: the one typed route model that Gateway API
//! `HTTPRoute` (`httproute`) and Istio `VirtualService` + `DestinationRule`
//! subsets (`virtualservice`) translate into, the matching of a request
//! against it, and the table a waypoint consults (`store`: documents from a
//! file or the API, each object's last good translation, conflicts).
//!
//! Where the two APIs differ the model holds both meanings (a prefix match
//! by path segment or by string, redirect default 302 or 301) and each
//! translation picks its own; the data path does not know which API a rule
//! came from.
pub mod httproute;
pub mod store;
pub mod virtualservice;

use std::{collections::BTreeMap, fmt, time::Duration};

use http::{HeaderName, HeaderValue, Method};
use regex::Regex;

pub use store::{Document, Lookup, ObjectKey, RouteStore, RouteTable};

/// The cluster's DNS suffix for Service hostnames.
pub const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// Why an object does not translate: the object and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct RouteError {
    /// `HTTPRoute default/web`.
    pub object: String,
    /// `spec.rules[0].matches[1].path.value`.
    pub field: String,
    pub message: String,
}

/// Builds [`RouteError`]s for one object.
#[derive(Clone)]
pub(crate) struct Errs<'a>(pub &'a str);

impl Errs<'_> {
    pub fn at(&self, field: impl Into<String>, message: impl Into<String>) -> RouteError {
        RouteError {
            object: self.0.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// One compiled rule: what to do with a request it matched.
#[derive(Debug, Clone)]
pub struct Rule {
    /// For logs: `HTTPRoute default/web rule 0`.
    pub name: String,
    pub action: Action,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub mirrors: Vec<Mirror>,
    /// The whole exchange, every try included (`None`: no limit).
    pub timeout: Option<Duration>,
    pub retry: Retry,
    pub fault: Fault,
}

#[derive(Debug, Clone)]
pub enum Action {
    /// To one of the backends, by weight.
    Forward {
        backends: Vec<Backend>,
        rewrite: Rewrite,
    },
    Redirect(Redirect),
    /// Answered by the waypoint itself.
    Respond {
        status: u16,
        body: String,
    },
}

/// A weighted destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub weight: u32,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A Service by hostname; `port: None` means the port the request came
    /// on (or the Service's only port); `subset` narrows its endpoints to
    /// pods with these labels.
    Service {
        host: String,
        port: Option<u16>,
        subset: Option<Subset>,
    },
    /// A backend that cannot be used: its share is answered with `status`
    /// (HTTPRoute: 500 for an invalid backendRef).
    Invalid { status: u16, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Host and path rewrites before forwarding.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rewrite {
    pub host: Option<String>,
    pub path: Option<PathRewrite>,
}

#[derive(Debug, Clone)]
pub enum PathRewrite {
    Full(String),
    /// Replace what the rule's path prefix matched (HTTPRoute
    /// ReplacePrefixMatch; VirtualService `rewrite.uri` after a prefix
    /// match).
    Prefix(String),
    /// VirtualService `uriRegexRewrite`.
    Regex {
        pattern: Regex,
        replacement: String,
    },
}

impl PartialEq for PathRewrite {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Full(a), Self::Full(b)) | (Self::Prefix(a), Self::Prefix(b)) => a == b,
            (
                Self::Regex {
                    pattern: p1,
                    replacement: r1,
                },
                Self::Regex {
                    pattern: p2,
                    replacement: r2,
                },
            ) => p1.as_str() == p2.as_str() && r1 == r2,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathRewrite>,
    pub status: u16,
}

/// Header changes: `set` replaces, `add` appends to an existing value
/// (`a,b`), `remove` deletes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, h: &mut http::HeaderMap) {
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            let joined = h
                .get_all(n)
                .iter()
                .chain(std::iter::once(v))
                .map(|v| v.as_bytes())
                .collect::<Vec<_>>()
                .join(&b","[..]);
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                h.insert(n.clone(), v);
            }
        }
        for n in &self.remove {
            h.remove(n);
        }
    }
}

/// A copy of the request sent elsewhere, its answer ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub target: Target,
    /// 0..=100; each request draws on its own.
    pub percent: f64,
}

/// Envoy's retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Retries after the first try (0: none).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    /// The base of the jittered exponential backoff, and its floor: no
    /// retry starts sooner than `floor` after the previous try ended.
    pub base: Duration,
    pub floor: Duration,
}

pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
pub const MAX_BACKOFF: Duration = Duration::from_millis(250);

impl Retry {
    pub fn none() -> Self {
        Self {
            attempts: 0,
            ..Self::istio_default()
        }
    }

    /// Istio's policy for a route that sets none: 2 retries on
    /// connect-failure, refused-stream, unavailable, cancelled and 503.
    pub fn istio_default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            on: RetryOn::istio_default(),
            base: DEFAULT_BACKOFF_BASE,
            floor: Duration::ZERO,
        }
    }

    /// Envoy's wait before retry `n` (1-based): uniform in
    /// `[0, (2^n - 1) x base]`, capped at 250 ms (or the floor when that is
    /// higher), never below the floor.
    pub fn backoff(&self, n: u32, unit: f64) -> Duration {
        let span = self.base.as_secs_f64() * ((1u64 << n.min(16)) - 1) as f64;
        let cap = MAX_BACKOFF.max(self.floor).as_secs_f64();
        Duration::from_secs_f64((span * unit.clamp(0.0, 1.0)).min(cap)).max(self.floor)
    }
}

/// Envoy's `retry_on` conditions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`: any 5xx, no response, connect failure, refused stream.
    pub five_xx: bool,
    /// `gateway-error`: 502, 503, 504.
    pub gateway_error: bool,
    /// `reset`: the upstream went away before responding.
    pub reset: bool,
    pub connect_failure: bool,
    /// `retriable-4xx`: 409.
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    /// `retriable-status-codes` and bare codes.
    pub codes: Vec<u16>,
    /// gRPC statuses: `cancelled` 1, `deadline-exceeded` 4,
    /// `resource-exhausted` 8, `internal` 13, `unavailable` 14.
    pub grpc: Vec<u32>,
}

/// How one try went, as retry conditions see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    Response {
        status: u16,
        grpc: Option<u32>,
    },
    ConnectFailure,
    RefusedStream,
    Reset,
    /// The per-try timeout passed.
    Timeout,
}

impl RetryOn {
    pub fn istio_default() -> Self {
        Self {
            connect_failure: true,
            refused_stream: true,
            codes: vec![503],
            grpc: vec![1, 14],
            ..Self::default()
        }
    }

    /// Parses Envoy's comma-separated list (VirtualService `retryOn`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut on = Self::default();
        for c in s.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match c {
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway_error = true,
                "reset" | "reset-before-request" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "refused-stream" => on.refused_stream = true,
                // The codes come from the policy; Istio's default is 503.
                "retriable-status-codes" => {
                    if !on.codes.contains(&503) {
                        on.codes.push(503)
                    }
                }
                "cancelled" => on.grpc.push(1),
                "deadline-exceeded" => on.grpc.push(4),
                "resource-exhausted" => on.grpc.push(8),
                "internal" => on.grpc.push(13),
                "unavailable" => on.grpc.push(14),
                code => match code.parse::<u16>() {
                    Ok(n) if (100..600).contains(&n) => on.codes.push(n),
                    _ => {
                        return Err(format!(
                            "unknown retry condition {code:?} (one of 5xx, gateway-error, reset, connect-failure, \
                             retriable-4xx, refused-stream, retriable-status-codes, cancelled, deadline-exceeded, \
                             resource-exhausted, internal, unavailable, or an HTTP status code)"
                        ))
                    }
                },
            }
        }
        Ok(on)
    }

    pub fn retries(&self, o: TryOutcome) -> bool {
        match o {
            TryOutcome::ConnectFailure => self.connect_failure || self.five_xx || self.gateway_error,
            TryOutcome::RefusedStream => self.refused_stream || self.five_xx,
            TryOutcome::Reset => self.reset || self.five_xx,
            TryOutcome::Timeout => self.five_xx || self.gateway_error || self.reset,
            TryOutcome::Response { status, grpc } => {
                (self.five_xx && (500..600).contains(&status))
                    || (self.gateway_error && matches!(status, 502..=504))
                    || (self.retriable_4xx && status == 409)
                    || self.codes.contains(&status)
                    || grpc.is_some_and(|g| self.grpc.contains(&g))
            }
        }
    }
}

/// Injected faults; each fires on its own draw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(Abort, f64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    Grpc(u32),
}

/// When a rule applies. Every present condition must hold.
#[derive(Debug, Clone, Default)]
pub struct Match {
    pub path: Option<PathMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: Vec<(HeaderName, StringMatch)>,
    pub without_headers: Vec<(HeaderName, StringMatch)>,
    pub query: Vec<(String, StringMatch)>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// `segments`: HTTPRoute's PathPrefix (whole path elements: `/foo`
    /// matches `/foo/bar`, not `/foobar`); else a string prefix.
    Prefix {
        prefix: String,
        segments: bool,
    },
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// Anchored: the whole value must match (as RE2 in Envoy).
    Regex(Regex),
    Present,
}

/// A regular expression that must match the whole input.
pub fn full_regex(re: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("invalid regular expression {re:?}: {e}"))
}

impl StringMatch {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(e) => v == e,
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(v),
            StringMatch::Present => true,
        }
    }
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(e) => path == e,
            PathMatch::Prefix {
                prefix,
                segments: false,
            } => path.starts_with(prefix.as_str()),
            PathMatch::Prefix { prefix, segments: true } => {
                let p = prefix.trim_end_matches('/');
                p.is_empty() || (path.starts_with(p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
            PathMatch::Regex(r) => r.is_match(path),
        }
    }

    /// The prefix a [`PathRewrite::Prefix`] replaces.
    pub fn prefix(&self) -> Option<&str> {
        match self {
            PathMatch::Prefix { prefix, .. } => Some(prefix),
            _ => None,
        }
    }
}

/// What matching looks at in a request.
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authority: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The port the request came for (the CONNECT authority's).
    pub port: u16,
}

impl<'a> RequestView<'a> {
    /// The view of `req`, whose authority (URI's or `Host`) is `authority`,
    /// come for `port`.
    pub fn of<B>(req: &'a http::Request<B>, authority: &'a str, port: u16) -> Self {
        RequestView {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            authority,
            headers: req.headers(),
            port,
        }
    }
}

impl Match {
    pub fn matches(&self, r: &RequestView) -> bool {
        let header = |n: &HeaderName, m: &StringMatch| {
            r.headers
                .get_all(n)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
        };
        self.path.as_ref().is_none_or(|p| p.matches(r.path))
            && self.method.as_ref().is_none_or(|m| m.matches(r.method.as_str()))
            && self.authority.as_ref().is_none_or(|m| m.matches(r.authority))
            && self.port.is_none_or(|p| p == r.port)
            && self.headers.iter().all(|(n, m)| header(n, m))
            && !self.without_headers.iter().any(|(n, m)| header(n, m))
            && self
                .query
                .iter()
                .all(|(n, m)| query_values(r.query, n).any(|v| m.matches(&v)))
    }
}

/// The values of query parameter `name`, decoded as a form
/// (`application/x-www-form-urlencoded`: `+` and `%XX`).
fn query_values<'a>(query: Option<&'a str>, name: &'a str) -> impl Iterator<Item = String> + 'a {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(move |(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// A path after a rewrite of the part `matched` (a prefix match's prefix).
pub fn rewrite_path(rw: &PathRewrite, path: &str, matched: Option<&str>) -> String {
    match rw {
        PathRewrite::Full(p) => p.clone(),
        PathRewrite::Prefix(new) => {
            let old = matched.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(old).unwrap_or(path);
            let joined = if new.ends_with('/') && rest.starts_with('/') {
                format!("{new}{}", &rest[1..])
            } else if rest.is_empty() || rest.starts_with('/') || new.ends_with('/') {
                format!("{new}{rest}")
            } else {
                format!("{new}/{rest}")
            };
            if joined.is_empty() {
                "/".into()
            } else if !joined.starts_with('/') {
                format!("/{joined}")
            } else {
                joined
            }
        }
        PathRewrite::Regex { pattern, replacement } => pattern.replace_all(path, replacement.as_str()).into_owned(),
    }
}

/// `name.namespace.svc.cluster.local` for a name that may be short
/// (`reviews`), namespace-qualified (`reviews.prod`) or complete.
pub fn qualify(host: &str, namespace: &str) -> String {
    let host = host.trim_end_matches('.');
    match host.matches('.').count() {
        0 => format!("{host}.{namespace}.{CLUSTER_DOMAIN}"),
        1 => format!("{host}.{CLUSTER_DOMAIN}"),
        _ => host.to_string(),
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Service { host, port, subset } => {
                write!(f, "{host}")?;
                if let Some(p) = port {
                    write!(f, ":{p}")?;
                }
                if let Some(s) = subset {
                    write!(f, " subset {}", s.name)?;
                }
                Ok(())
            }
            Target::Invalid { reason, .. } => write!(f, "invalid backend ({reason})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_prefixes_match_whole_path_elements() {
        let p = |s: &str| PathMatch::Prefix {
            prefix: s.into(),
            segments: true,
        };
        assert!(p("/foo").matches("/foo"));
        assert!(p("/foo").matches("/foo/bar"));
        assert!(p("/foo/").matches("/foo/bar"));
        assert!(!p("/foo").matches("/foobar"));
        assert!(p("/").matches("/anything"));
        let s = PathMatch::Prefix {
            prefix: "/foo".into(),
            segments: false,
        };
        assert!(s.matches("/foobar"));
    }

    #[test]
    fn prefix_rewrites_keep_one_slash() {
        let rw = PathRewrite::Prefix("/".into());
        assert_eq!(rewrite_path(&rw, "/foo/bar", Some("/foo")), "/bar");
        assert_eq!(rewrite_path(&rw, "/foo", Some("/foo")), "/");
        let rw = PathRewrite::Prefix("/xyz".into());
        assert_eq!(rewrite_path(&rw, "/foo/bar", Some("/foo")), "/xyz/bar");
        assert_eq!(rewrite_path(&rw, "/foo", Some("/foo/")), "/xyz");
        let rw = PathRewrite::Prefix("/xyz/".into());
        assert_eq!(rewrite_path(&rw, "/foo/bar", Some("/foo")), "/xyz/bar");
    }

    #[test]
    fn backoff_is_jittered_exponential_capped_and_floored() {
        let r = Retry::istio_default();
        assert_eq!(r.backoff(1, 0.0), Duration::ZERO);
        assert_eq!(r.backoff(1, 1.0), Duration::from_millis(25));
        assert_eq!(r.backoff(2, 1.0), Duration::from_millis(75));
        assert_eq!(r.backoff(10, 1.0), MAX_BACKOFF);
        let floored = Retry {
            floor: Duration::from_millis(300),
            base: Duration::from_millis(300),
            ..r
        };
        assert_eq!(floored.backoff(1, 0.0), Duration::from_millis(300));
        assert!(floored.backoff(3, 1.0) <= Duration::from_millis(300));
    }

    #[test]
    fn retry_conditions_follow_envoy() {
        let on = RetryOn::parse("gateway-error, 418").unwrap();
        assert!(on.retries(TryOutcome::Response {
            status: 503,
            grpc: None
        }));
        assert!(on.retries(TryOutcome::Response {
            status: 418,
            grpc: None
        }));
        assert!(!on.retries(TryOutcome::Response {
            status: 500,
            grpc: None
        }));
        assert!(on.retries(TryOutcome::ConnectFailure));
        assert!(!on.retries(TryOutcome::Reset));
        let d = RetryOn::istio_default();
        assert!(d.retries(TryOutcome::Response {
            status: 200,
            grpc: Some(14)
        }));
        assert!(!d.retries(TryOutcome::Response {
            status: 500,
            grpc: None
        }));
        assert!(RetryOn::parse("5xx,bogus").unwrap_err().contains("bogus"));
    }

    #[test]
    fn header_add_joins_with_a_comma() {
        let mut h = http::HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("foo"));
        let ops = HeaderOps {
            add: vec![(HeaderName::from_static("x-a"), HeaderValue::from_static("bar"))],
            ..HeaderOps::default()
        };
        ops.apply(&mut h);
        assert_eq!(h["x-a"], "foo,bar");
    }

    #[test]
    fn query_values_are_decoded() {
        let v: Vec<String> = query_values(Some("a=1&b=x%20y&b=z+w"), "b").collect();
        assert_eq!(v, ["x y", "z w"]);
    }

    #[test]
    fn hosts_are_qualified_in_the_objects_namespace() {
        assert_eq!(qualify("reviews", "prod"), "reviews.prod.svc.cluster.local");
        assert_eq!(qualify("reviews.other", "prod"), "reviews.other.svc.cluster.local");
        assert_eq!(
            qualify("reviews.other.svc.cluster.local", "prod"),
            "reviews.other.svc.cluster.local"
        );
    }
}
