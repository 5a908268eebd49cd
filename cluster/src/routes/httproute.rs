//! Gateway API `HTTPRoute` (`gateway.networking.k8s.io/v1`, also the
//! same schema as `v1beta1`) into the route model. Attached GAMMA style to
//! a Service (`parentRefs: [{group: "", kind: Service, name}]`: its
//! traffic, `hostnames` ignored as GAMMA says), or to the waypoint Gateway
//! itself (every service it carries, narrowed by `hostnames`).
//!
//! Defaults as the spec gives them: a rule without matches matches
//! `PathPrefix /`; header and query matches are `Exact`; backendRef kind
//! `Service`, weight 1; redirect 302; a rule with neither backends nor a
//! redirect answers 500. Choices the spec leaves open: a RegularExpression
//! path ranks with prefixes by its length; `retry` without `codes` retries
//! Istio's default conditions; cross-namespace backends are invalid (500)
//! because ReferenceGrants are not read yet.
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;

use super::{
    full_regex, qualify, Action, Backend, Errs, HeaderOps, Match, Mirror, PathMatch, PathRewrite, Redirect, Retry,
    RetryOn, Rewrite, RouteError, Rule, StringMatch, Target,
};

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    parent_refs: Vec<ParentRef>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ParentRef {
    group: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: String,
    port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleSpec {
    #[serde(default)]
    matches: Vec<MatchSpec>,
    #[serde(default)]
    filters: Vec<Filter>,
    #[serde(default)]
    backend_refs: Vec<BackendRef>,
    timeouts: Option<Timeouts>,
    retry: Option<RetrySpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MatchSpec {
    path: Option<PathSpec>,
    #[serde(default)]
    headers: Vec<NameMatch>,
    #[serde(default)]
    query_params: Vec<NameMatch>,
    method: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PathSpec {
    #[serde(rename = "type", default = "path_prefix")]
    kind: String,
    #[serde(default = "slash")]
    value: String,
}

fn path_prefix() -> String {
    "PathPrefix".into()
}
fn slash() -> String {
    "/".into()
}

#[derive(Debug, Deserialize)]
struct NameMatch {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(rename = "type")]
    kind: String,
    request_header_modifier: Option<HeaderModifier>,
    response_header_modifier: Option<HeaderModifier>,
    request_redirect: Option<RedirectSpec>,
    #[serde(rename = "urlRewrite")]
    url_rewrite: Option<RewriteSpec>,
    request_mirror: Option<MirrorSpec>,
}

#[derive(Debug, Default, Deserialize)]
struct HeaderModifier {
    #[serde(default)]
    set: Vec<Header>,
    #[serde(default)]
    add: Vec<Header>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Header {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RedirectSpec {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<PathModifier>,
    port: Option<u16>,
    status_code: Option<u16>,
}

#[derive(Debug, Deserialize)]
struct RewriteSpec {
    hostname: Option<String>,
    path: Option<PathModifier>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PathModifier {
    #[serde(rename = "type")]
    kind: String,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MirrorSpec {
    backend_ref: BackendRef,
    percent: Option<u32>,
    fraction: Option<Fraction>,
}

#[derive(Debug, Deserialize)]
struct Fraction {
    numerator: u32,
    #[serde(default = "hundred")]
    denominator: u32,
}

fn hundred() -> u32 {
    100
}

#[derive(Debug, Deserialize)]
struct BackendRef {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u16>,
    weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Timeouts {
    request: Option<String>,
    backend_request: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RetrySpec {
    #[serde(default)]
    codes: Vec<u16>,
    attempts: Option<u32>,
    backoff: Option<String>,
}

/// Where a route attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parent {
    /// A Service (by hostname), optionally one port.
    Service { host: String, port: Option<u16> },
    /// A Gateway (the waypoint), for the route's hostnames.
    Gateway { namespace: String, name: String },
}

/// One translated HTTPRoute.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    pub parents: Vec<Parent>,
    pub hostnames: Vec<String>,
    /// Rules in order, each with its matches (never empty: a rule without
    /// matches gets `PathPrefix /`).
    pub rules: Vec<(Vec<Match>, std::sync::Arc<Rule>)>,
}

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Translates one HTTPRoute's `spec`.
pub fn translate(object: &str, namespace: &str, spec: Spec) -> Result<HttpRoute, RouteError> {
    let e = Errs(object);
    let mut parents = Vec::new();
    for (i, p) in spec.parent_refs.iter().enumerate() {
        let at = format!("spec.parentRefs[{i}]");
        let ns = p.namespace.clone().unwrap_or_else(|| namespace.to_string());
        let group = p.group.as_deref().unwrap_or(GATEWAY_GROUP);
        match (group, p.kind.as_deref().unwrap_or("Gateway")) {
            ("" | "core", "Service") => parents.push(Parent::Service {
                host: qualify(&p.name, &ns),
                port: p.port,
            }),
            (GATEWAY_GROUP, "Gateway") => parents.push(Parent::Gateway {
                namespace: ns,
                name: p.name.clone(),
            }),
            (g, k) => {
                return Err(e.at(
                    at,
                    format!("a parent of group {g:?} kind {k:?} is not supported (a Service, group \"\", or the waypoint Gateway)"),
                ))
            }
        }
    }
    if parents.is_empty() {
        return Err(e.at(
            "spec.parentRefs",
            "no parent: attach the route to a Service or the waypoint Gateway",
        ));
    }
    let mut rules = Vec::new();
    for (i, r) in spec.rules.into_iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        let matches = if r.matches.is_empty() {
            vec![Match {
                path: Some(PathMatch::Prefix {
                    prefix: "/".into(),
                    segments: true,
                }),
                ..Match::default()
            }]
        } else {
            r.matches
                .iter()
                .enumerate()
                .map(|(j, m)| translate_match(&e, &format!("{at}.matches[{j}]"), m))
                .collect::<Result<_, _>>()?
        };
        let rule = translate_rule(&e, &at, namespace, r, format!("{object} rule {i}"))?;
        rules.push((matches, std::sync::Arc::new(rule)));
    }
    Ok(HttpRoute {
        parents,
        hostnames: spec.hostnames,
        rules,
    })
}

fn translate_match(e: &Errs, at: &str, m: &MatchSpec) -> Result<Match, RouteError> {
    let path = match &m.path {
        None => Some(PathMatch::Prefix {
            prefix: "/".into(),
            segments: true,
        }),
        Some(p) => Some(match p.kind.as_str() {
            "Exact" => PathMatch::Exact(p.value.clone()),
            "PathPrefix" => PathMatch::Prefix {
                prefix: p.value.clone(),
                segments: true,
            },
            "RegularExpression" => {
                PathMatch::Regex(full_regex(&p.value).map_err(|m| e.at(format!("{at}.path.value"), m))?)
            }
            k => {
                return Err(e.at(
                    format!("{at}.path.type"),
                    format!("unknown path match type {k:?} (Exact, PathPrefix or RegularExpression)"),
                ))
            }
        }),
    };
    if let Some(PathMatch::Exact(v) | PathMatch::Prefix { prefix: v, .. }) = &path {
        if !v.starts_with('/') {
            return Err(e.at(format!("{at}.path.value"), format!("{v:?} must start with /")));
        }
    }
    let value = |at: String, n: &NameMatch| -> Result<StringMatch, RouteError> {
        match n.kind.as_deref().unwrap_or("Exact") {
            "Exact" => Ok(StringMatch::Exact(n.value.clone())),
            "RegularExpression" => full_regex(&n.value)
                .map(StringMatch::Regex)
                .map_err(|m| e.at(format!("{at}.value"), m)),
            k => Err(e.at(
                format!("{at}.type"),
                format!("unknown match type {k:?} (Exact or RegularExpression)"),
            )),
        }
    };
    let mut headers = Vec::new();
    for (k, h) in m.headers.iter().enumerate() {
        let at = format!("{at}.headers[{k}]");
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| e.at(format!("{at}.name"), format!("{:?} is no valid header name", h.name)))?;
        headers.push((name, value(at, h)?));
    }
    let mut query = Vec::new();
    for (k, q) in m.query_params.iter().enumerate() {
        query.push((q.name.clone(), value(format!("{at}.queryParams[{k}]"), q)?));
    }
    let method = match &m.method {
        Some(s) => {
            Method::from_bytes(s.as_bytes())
                .map_err(|_| e.at(format!("{at}.method"), format!("{s:?} is no HTTP method")))?;
            Some(StringMatch::Exact(s.clone()))
        }
        None => None,
    };
    Ok(Match {
        path,
        method,
        headers,
        query,
        ..Match::default()
    })
}

fn translate_rule(e: &Errs, at: &str, namespace: &str, r: RuleSpec, name: String) -> Result<Rule, RouteError> {
    let mut request_headers = HeaderOps::default();
    let mut response_headers = HeaderOps::default();
    let mut redirect = None;
    let mut rewrite = Rewrite::default();
    let mut mirrors = Vec::new();
    for (i, f) in r.filters.iter().enumerate() {
        let at = format!("{at}.filters[{i}]");
        let missing = |field: &str| e.at(format!("{at}.{field}"), format!("filter type {} needs {field}", f.kind));
        match f.kind.as_str() {
            "RequestHeaderModifier" => {
                let m = f.request_header_modifier.as_ref().ok_or_else(|| missing("requestHeaderModifier"))?;
                request_headers = header_ops(e, &format!("{at}.requestHeaderModifier"), m)?;
            }
            "ResponseHeaderModifier" => {
                let m = f.response_header_modifier.as_ref().ok_or_else(|| missing("responseHeaderModifier"))?;
                response_headers = header_ops(e, &format!("{at}.responseHeaderModifier"), m)?;
            }
            "RequestRedirect" => {
                let r = f.request_redirect.as_ref().ok_or_else(|| missing("requestRedirect"))?;
                let status = r.status_code.unwrap_or(302);
                if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                    return Err(e.at(format!("{at}.requestRedirect.statusCode"), format!("{status} is no redirect status (301, 302, 303, 307, 308)")));
                }
                if let Some(s) = &r.scheme {
                    if s != "http" && s != "https" {
                        return Err(e.at(format!("{at}.requestRedirect.scheme"), format!("{s:?}: http or https")));
                    }
                }
                redirect = Some(Redirect {
                    scheme: r.scheme.clone(),
                    host: r.hostname.clone(),
                    port: r.port,
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_modifier(e, &format!("{at}.requestRedirect.path"), p))
                        .transpose()?,
                    status,
                });
            }
            "URLRewrite" => {
                let r = f.url_rewrite.as_ref().ok_or_else(|| missing("urlRewrite"))?;
                rewrite = Rewrite {
                    host: r.hostname.clone(),
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_modifier(e, &format!("{at}.urlRewrite.path"), p))
                        .transpose()?,
                };
            }
            "RequestMirror" => {
                let m = f.request_mirror.as_ref().ok_or_else(|| missing("requestMirror"))?;
                let percent = match (m.percent, &m.fraction) {
                    (Some(p), _) => p.min(100) as f64,
                    (None, Some(f)) if f.denominator > 0 => (f.numerator as f64 * 100.0 / f.denominator as f64).min(100.0),
                    (None, Some(_)) => return Err(e.at(format!("{at}.requestMirror.fraction.denominator"), "must be above 0")),
                    (None, None) => 100.0,
                };
                mirrors.push(Mirror {
                    target: backend_target(namespace, &m.backend_ref),
                    percent,
                });
            }
            k => {
                return Err(e.at(
                    format!("{at}.type"),
                    format!("filter {k:?} is not supported (RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror)"),
                ))
            }
        }
    }
    let action = match redirect {
        Some(r) => {
            if rewrite != Rewrite::default() {
                return Err(e.at(
                    format!("{at}.filters"),
                    "RequestRedirect and URLRewrite cannot be used together",
                ));
            }
            Action::Redirect(r)
        }
        None if r.backend_refs.is_empty() => Action::Respond {
            status: 500,
            body: "no backend for this route".into(),
        },
        None => Action::Forward {
            backends: r
                .backend_refs
                .iter()
                .map(|b| Backend {
                    weight: b.weight.unwrap_or(1),
                    target: backend_target(namespace, b),
                })
                .collect(),
            rewrite,
        },
    };
    let duration = |field: String, s: &Option<String>| -> Result<Option<Duration>, RouteError> {
        s.as_deref()
            .map(|s| super::store::parse_duration(s).map_err(|m| e.at(field, m)))
            .transpose()
            // "0s" disables the timeout.
            .map(|d| d.filter(|d| !d.is_zero()))
    };
    let timeout = duration(
        format!("{at}.timeouts.request"),
        &r.timeouts.as_ref().and_then(|t| t.request.clone()),
    )?;
    let per_try = duration(
        format!("{at}.timeouts.backendRequest"),
        &r.timeouts.as_ref().and_then(|t| t.backend_request.clone()),
    )?;
    let mut retry = match &r.retry {
        None => Retry::istio_default(),
        Some(s) => {
            let floor = duration(format!("{at}.retry.backoff"), &s.backoff)?.unwrap_or_default();
            let mut on = RetryOn::istio_default();
            on.codes = s.codes.clone();
            Retry {
                attempts: s.attempts.unwrap_or(Retry::istio_default().attempts),
                per_try_timeout: None,
                on,
                base: if floor.is_zero() {
                    super::DEFAULT_BACKOFF_BASE
                } else {
                    floor
                },
                floor,
            }
        }
    };
    retry.per_try_timeout = per_try;
    if let (Some(t), Some(p)) = (timeout, per_try) {
        if p > t {
            return Err(e.at(
                format!("{at}.timeouts.backendRequest"),
                format!("{p:?} is longer than timeouts.request {t:?}"),
            ));
        }
    }
    Ok(Rule {
        name,
        action,
        request_headers,
        response_headers,
        mirrors,
        timeout,
        retry,
        fault: Default::default(),
    })
}

fn backend_target(namespace: &str, b: &BackendRef) -> Target {
    let invalid = |reason: String| Target::Invalid { status: 500, reason };
    match (b.group.as_deref().unwrap_or(""), b.kind.as_deref().unwrap_or("Service")) {
        ("" | "core", "Service") => {}
        (g, k) => {
            return invalid(format!(
                "backendRef {} of group {g:?} kind {k:?} is not a Service",
                b.name
            ))
        }
    }
    if b.namespace.as_deref().is_some_and(|ns| ns != namespace) {
        return invalid(format!(
            "backendRef {} is in another namespace and ReferenceGrants are not supported",
            b.name
        ));
    }
    let Some(port) = b.port else {
        return invalid(format!("backendRef {} has no port", b.name));
    };
    Target::Service {
        host: qualify(&b.name, namespace),
        port: Some(port),
        subset: None,
    }
}

fn path_modifier(e: &Errs, at: &str, p: &PathModifier) -> Result<PathRewrite, RouteError> {
    match (p.kind.as_str(), &p.replace_full_path, &p.replace_prefix_match) {
        ("ReplaceFullPath", Some(f), _) => Ok(PathRewrite::Full(f.clone())),
        ("ReplacePrefixMatch", _, Some(f)) => Ok(PathRewrite::Prefix(f.clone())),
        ("ReplaceFullPath", None, _) => Err(e.at(format!("{at}.replaceFullPath"), "missing")),
        ("ReplacePrefixMatch", _, None) => Err(e.at(format!("{at}.replacePrefixMatch"), "missing")),
        (k, _, _) => Err(e.at(
            format!("{at}.type"),
            format!("{k:?}: ReplaceFullPath or ReplacePrefixMatch"),
        )),
    }
}

fn header_ops(e: &Errs, at: &str, m: &HeaderModifier) -> Result<HeaderOps, RouteError> {
    let pair = |field: String, h: &Header| -> Result<(HeaderName, HeaderValue), RouteError> {
        let n = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| e.at(format!("{field}.name"), format!("{:?} is no valid header name", h.name)))?;
        let v = HeaderValue::from_str(&h.value).map_err(|_| {
            e.at(
                format!("{field}.value"),
                format!("{:?} is no valid header value", h.value),
            )
        })?;
        Ok((n, v))
    };
    Ok(HeaderOps {
        set: m
            .set
            .iter()
            .enumerate()
            .map(|(i, h)| pair(format!("{at}.set[{i}]"), h))
            .collect::<Result<_, _>>()?,
        add: m
            .add
            .iter()
            .enumerate()
            .map(|(i, h)| pair(format!("{at}.add[{i}]"), h))
            .collect::<Result<_, _>>()?,
        remove: m
            .remove
            .iter()
            .enumerate()
            .map(|(i, n)| {
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| e.at(format!("{at}.remove[{i}]"), format!("{n:?} is no valid header name")))
            })
            .collect::<Result<_, _>>()?,
    })
}

/// The rank of a match among every HTTPRoute rule of one parent (Gateway
/// API precedence: exact path, longest prefix, method, most headers, most
/// query params; the caller breaks ties by age, name and order).
pub fn precedence(
    m: &Match,
) -> (
    u8,
    std::cmp::Reverse<usize>,
    u8,
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<usize>,
) {
    let (kind, len) = match &m.path {
        Some(PathMatch::Exact(p)) => (0, p.len()),
        Some(PathMatch::Prefix { prefix, .. }) => (1, prefix.trim_end_matches('/').len() + 1),
        Some(PathMatch::Regex(r)) => (1, r.as_str().len().saturating_sub(6)),
        None => (1, 1),
    };
    (
        kind,
        std::cmp::Reverse(len),
        u8::from(m.method.is_none()),
        std::cmp::Reverse(m.headers.len()),
        std::cmp::Reverse(m.query.len()),
    )
}
