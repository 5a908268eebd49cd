//! Istio `VirtualService` http routes and `DestinationRule` subsets
//! (`networking.istio.io` `v1`, `v1beta1`, `v1alpha3`: one schema) into
//! the route model. The first matching rule wins, in the order written.
//!
//! As Istio: hosts and destination hosts are qualified in the object's
//! namespace; a VirtualService whose `gateways` does not include `mesh`
//! is for ingress gateways and ignored here; redirects default to 301;
//! `timeout` is off unless set; `retries` unset means Istio's default
//! policy, `retryOn` unset means Istio's default conditions; a fault
//! without `percentage` never fires. Subsets are label selectors (their
//! traffic policies are not read yet); a subset no DestinationRule defines
//! answers 503 with flag NC, as Envoy does for a missing cluster.
use std::{collections::BTreeMap, time::Duration};

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;

use super::{
    full_regex, qualify, Abort, Action, Backend, Errs, Fault, HeaderOps, Match, Mirror, PathMatch, PathRewrite,
    Redirect, Retry, RetryOn, Rewrite, RouteError, Rule, StringMatch, Subset, Target,
};

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    http: Vec<HttpRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpRoute {
    name: Option<String>,
    #[serde(default, rename = "match")]
    matches: Vec<MatchSpec>,
    #[serde(default)]
    route: Vec<Destination>,
    redirect: Option<RedirectSpec>,
    direct_response: Option<DirectResponse>,
    rewrite: Option<RewriteSpec>,
    timeout: Option<String>,
    retries: Option<Retries>,
    fault: Option<FaultSpec>,
    mirror: Option<DestinationRef>,
    mirror_percentage: Option<Percent>,
    mirror_percent: Option<u32>,
    #[serde(default)]
    mirrors: Vec<MirrorSpec>,
    headers: Option<Headers>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MatchSpec {
    uri: Option<StringMatchSpec>,
    method: Option<StringMatchSpec>,
    authority: Option<StringMatchSpec>,
    #[serde(default)]
    headers: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    without_headers: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    query_params: BTreeMap<String, StringMatchSpec>,
    port: Option<u16>,
    #[serde(default)]
    gateways: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct StringMatchSpec {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Destination {
    destination: DestinationRef,
    weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct DestinationRef {
    host: String,
    subset: Option<String>,
    port: Option<PortSelector>,
}

#[derive(Debug, Deserialize)]
struct PortSelector {
    number: u16,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RedirectSpec {
    uri: Option<String>,
    authority: Option<String>,
    port: Option<u16>,
    scheme: Option<String>,
    redirect_code: Option<u16>,
}

#[derive(Debug, Deserialize)]
struct DirectResponse {
    status: u16,
    body: Option<DirectBody>,
}

#[derive(Debug, Deserialize)]
struct DirectBody {
    string: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RewriteSpec {
    uri: Option<String>,
    authority: Option<String>,
    uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegexRewrite {
    #[serde(rename = "match")]
    pattern: String,
    rewrite: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Retries {
    attempts: Option<u32>,
    per_try_timeout: Option<String>,
    retry_on: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FaultSpec {
    delay: Option<DelaySpec>,
    abort: Option<AbortSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DelaySpec {
    fixed_delay: Option<String>,
    percentage: Option<Percent>,
    /// Deprecated integer form.
    percent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AbortSpec {
    http_status: Option<u16>,
    grpc_status: Option<String>,
    percentage: Option<Percent>,
}

#[derive(Debug, Deserialize)]
struct Percent {
    #[serde(default)]
    value: f64,
}

#[derive(Debug, Deserialize)]
struct MirrorSpec {
    destination: DestinationRef,
    percentage: Option<Percent>,
}

#[derive(Debug, Default, Deserialize)]
struct Headers {
    request: Option<HeaderOpsSpec>,
    response: Option<HeaderOpsSpec>,
}

#[derive(Debug, Default, Deserialize)]
struct HeaderOpsSpec {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

/// One translated VirtualService.
#[derive(Debug, Clone)]
pub struct VirtualService {
    /// Qualified hostnames.
    pub hosts: Vec<String>,
    /// Rules in order with their matches (empty: matches everything).
    pub rules: Vec<(Vec<Match>, std::sync::Arc<Rule>)>,
}

/// Translates one VirtualService's `spec`; `None` when it is not for the
/// mesh (its `gateways` name only ingress gateways).
pub fn translate(object: &str, namespace: &str, spec: Spec) -> Result<Option<VirtualService>, RouteError> {
    let e = Errs(object);
    if !spec.gateways.is_empty() && !spec.gateways.iter().any(|g| g == "mesh") {
        return Ok(None);
    }
    if spec.hosts.is_empty() {
        return Err(e.at("spec.hosts", "no host: name the Service(s) these routes are for"));
    }
    let hosts = spec.hosts.iter().map(|h| qualify(h, namespace)).collect();
    let mut rules = Vec::new();
    for (i, r) in spec.http.into_iter().enumerate() {
        let at = format!("spec.http[{i}]");
        // A match for ingress gateways only is not for the mesh.
        let for_mesh: Vec<&MatchSpec> = r
            .matches
            .iter()
            .filter(|m| m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"))
            .collect();
        if !r.matches.is_empty() && for_mesh.is_empty() {
            continue;
        }
        let mut matches = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            if m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh") {
                matches.push(translate_match(&e, &format!("{at}.match[{j}]"), m)?);
            }
        }
        let name = format!("{object} http[{}]", r.name.clone().unwrap_or_else(|| i.to_string()));
        let rule = translate_rule(&e, &at, namespace, &matches, r, name)?;
        rules.push((matches, std::sync::Arc::new(rule)));
    }
    Ok(Some(VirtualService { hosts, rules }))
}

fn string_match(e: &Errs, at: &str, s: &StringMatchSpec) -> Result<StringMatch, RouteError> {
    match (&s.exact, &s.prefix, &s.regex) {
        (Some(x), None, None) => Ok(StringMatch::Exact(x.clone())),
        (None, Some(p), None) => Ok(StringMatch::Prefix(p.clone())),
        (None, None, Some(r)) => full_regex(r)
            .map(StringMatch::Regex)
            .map_err(|m| e.at(format!("{at}.regex"), m)),
        // `{}`: the header is present, whatever its value.
        (None, None, None) => Ok(StringMatch::Present),
        _ => Err(e.at(at, "give one of exact, prefix or regex")),
    }
}

fn translate_match(e: &Errs, at: &str, m: &MatchSpec) -> Result<Match, RouteError> {
    let path = match &m.uri {
        None => None,
        Some(u) => Some(match string_match(e, &format!("{at}.uri"), u)? {
            StringMatch::Exact(p) => PathMatch::Exact(p),
            StringMatch::Prefix(p) => PathMatch::Prefix {
                prefix: p,
                segments: false,
            },
            StringMatch::Regex(r) => PathMatch::Regex(r),
            StringMatch::Present => return Err(e.at(format!("{at}.uri"), "give one of exact, prefix or regex")),
        }),
    };
    let names =
        |field: &str, map: &BTreeMap<String, StringMatchSpec>| -> Result<Vec<(HeaderName, StringMatch)>, RouteError> {
            map.iter()
                .map(|(n, s)| {
                    let at = format!("{at}.{field}.{n}");
                    let name = HeaderName::from_bytes(n.as_bytes())
                        .map_err(|_| e.at(&at, format!("{n:?} is no valid header name")))?;
                    Ok((name, string_match(e, &at, s)?))
                })
                .collect()
        };
    let method = m
        .method
        .as_ref()
        .map(|s| string_match(e, &format!("{at}.method"), s))
        .transpose()?;
    if let Some(StringMatch::Exact(x)) = &method {
        Method::from_bytes(x.as_bytes())
            .map_err(|_| e.at(format!("{at}.method.exact"), format!("{x:?} is no HTTP method")))?;
    }
    Ok(Match {
        path,
        method,
        authority: m
            .authority
            .as_ref()
            .map(|s| string_match(e, &format!("{at}.authority"), s))
            .transpose()?,
        headers: names("headers", &m.headers)?,
        without_headers: names("withoutHeaders", &m.without_headers)?,
        query: m
            .query_params
            .iter()
            .map(|(n, s)| Ok((n.clone(), string_match(e, &format!("{at}.queryParams.{n}"), s)?)))
            .collect::<Result<_, RouteError>>()?,
        port: m.port,
    })
}

fn target(namespace: &str, d: &DestinationRef) -> Target {
    Target::Service {
        host: qualify(&d.host, namespace),
        port: d.port.as_ref().map(|p| p.number),
        subset: d.subset.as_ref().map(|s| Subset {
            name: s.clone(),
            labels: BTreeMap::new(),
        }),
    }
}

fn percent(e: &Errs, at: String, p: Option<&Percent>) -> Result<Option<f64>, RouteError> {
    match p {
        Some(p) if !(0.0..=100.0).contains(&p.value) => Err(e.at(at, format!("{} is not within 0..100", p.value))),
        Some(p) => Ok(Some(p.value)),
        None => Ok(None),
    }
}

fn translate_rule(
    e: &Errs,
    at: &str,
    namespace: &str,
    matches: &[Match],
    r: HttpRoute,
    name: String,
) -> Result<Rule, RouteError> {
    let rewrite = match &r.rewrite {
        None => Rewrite::default(),
        Some(w) => {
            // After a prefix match `uri` replaces the prefix; otherwise the path.
            let prefix_matched = !matches.is_empty()
                && matches
                    .iter()
                    .all(|m| m.path.as_ref().is_some_and(|p| p.prefix().is_some()));
            let path = match (&w.uri, &w.uri_regex_rewrite) {
                (Some(_), Some(_)) => {
                    return Err(e.at(format!("{at}.rewrite"), "give uri or uriRegexRewrite, not both"))
                }
                (Some(u), None) if prefix_matched => Some(PathRewrite::Prefix(u.clone())),
                (Some(u), None) => Some(PathRewrite::Full(u.clone())),
                (None, Some(x)) => Some(PathRewrite::Regex {
                    pattern: regex::Regex::new(&x.pattern)
                        .map_err(|m| e.at(format!("{at}.rewrite.uriRegexRewrite.match"), m.to_string()))?,
                    replacement: x.rewrite.replace("\\", "$"),
                }),
                (None, None) => None,
            };
            Rewrite {
                host: w.authority.clone(),
                path,
            }
        }
    };
    let action = match (&r.redirect, &r.direct_response, r.route.is_empty()) {
        (Some(d), None, true) => Action::Redirect(Redirect {
            scheme: d.scheme.clone(),
            host: d.authority.clone(),
            port: d.port,
            path: d.uri.clone().map(PathRewrite::Full),
            status: match d.redirect_code.unwrap_or(301) {
                s @ (301 | 302 | 303 | 307 | 308) => s,
                s => {
                    return Err(e.at(
                        format!("{at}.redirect.redirectCode"),
                        format!("{s} is no redirect status"),
                    ))
                }
            },
        }),
        (None, Some(d), true) => {
            if !(200..600).contains(&d.status) {
                return Err(e.at(
                    format!("{at}.directResponse.status"),
                    format!("{} is no HTTP status", d.status),
                ));
            }
            Action::Respond {
                status: d.status,
                body: d.body.as_ref().and_then(|b| b.string.clone()).unwrap_or_default(),
            }
        }
        (None, None, false) => {
            // One destination takes everything; several without any weight
            // share evenly.
            let unweighted = if r.route.len() == 1 || r.route.iter().all(|d| d.weight.is_none()) {
                1
            } else {
                0
            };
            Action::Forward {
                backends: r
                    .route
                    .iter()
                    .map(|d| Backend {
                        weight: d.weight.unwrap_or(unweighted),
                        target: target(namespace, &d.destination),
                    })
                    .collect(),
                rewrite,
            }
        }
        (None, None, true) => return Err(e.at(at, "a route needs one of route, redirect or directResponse")),
        _ => return Err(e.at(at, "give only one of route, redirect or directResponse")),
    };
    let duration = |field: String, s: &Option<String>| -> Result<Option<Duration>, RouteError> {
        s.as_deref()
            .map(|s| super::store::parse_duration(s).map_err(|m| e.at(field, m)))
            .transpose()
            .map(|d| d.filter(|d| !d.is_zero()))
    };
    let timeout = duration(format!("{at}.timeout"), &r.timeout)?;
    let retry = match &r.retries {
        None => Retry::istio_default(),
        Some(x) => Retry {
            attempts: x.attempts.unwrap_or(Retry::istio_default().attempts),
            per_try_timeout: duration(format!("{at}.retries.perTryTimeout"), &x.per_try_timeout)?,
            on: match &x.retry_on {
                Some(s) => RetryOn::parse(s).map_err(|m| e.at(format!("{at}.retries.retryOn"), m))?,
                None => RetryOn::istio_default(),
            },
            ..Retry::istio_default()
        },
    };
    let mut fault = Fault::default();
    if let Some(f) = &r.fault {
        if let Some(d) = &f.delay {
            let at = format!("{at}.fault.delay");
            let delay = duration(format!("{at}.fixedDelay"), &d.fixed_delay)?
                .ok_or_else(|| e.at(format!("{at}.fixedDelay"), "a delay needs fixedDelay"))?;
            let p = percent(e, format!("{at}.percentage.value"), d.percentage.as_ref())?
                .or(d.percent.map(|p| p.min(100) as f64));
            fault.delay = p.map(|p| (delay, p));
        }
        if let Some(a) = &f.abort {
            let at = format!("{at}.fault.abort");
            let abort = match (a.http_status, &a.grpc_status) {
                (Some(s), None) if (200..600).contains(&s) => Abort::Http(s),
                (Some(s), None) => return Err(e.at(format!("{at}.httpStatus"), format!("{s} is no HTTP status"))),
                (None, Some(g)) => Abort::Grpc(
                    grpc_code(g)
                        .ok_or_else(|| e.at(format!("{at}.grpcStatus"), format!("{g:?} is no gRPC status name")))?,
                ),
                _ => return Err(e.at(at, "an abort needs one of httpStatus or grpcStatus")),
            };
            fault.abort = percent(e, format!("{at}.percentage.value"), a.percentage.as_ref())?.map(|p| (abort, p));
        }
    }
    let mut mirrors = Vec::new();
    if let Some(m) = &r.mirror {
        let p = percent(e, format!("{at}.mirrorPercentage.value"), r.mirror_percentage.as_ref())?
            .or(r.mirror_percent.map(|p| p.min(100) as f64))
            .unwrap_or(100.0);
        mirrors.push(Mirror {
            target: target(namespace, m),
            percent: p,
        });
    }
    for (i, m) in r.mirrors.iter().enumerate() {
        mirrors.push(Mirror {
            target: target(namespace, &m.destination),
            percent: percent(e, format!("{at}.mirrors[{i}].percentage.value"), m.percentage.as_ref())?.unwrap_or(100.0),
        });
    }
    let ops = |field: &str, o: Option<&HeaderOpsSpec>| -> Result<HeaderOps, RouteError> {
        let Some(o) = o else { return Ok(HeaderOps::default()) };
        let pair = |kind: &str, (n, v): (&String, &String)| -> Result<(HeaderName, HeaderValue), RouteError> {
            let at = format!("{at}.headers.{field}.{kind}.{n}");
            Ok((
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| e.at(&at, format!("{n:?} is no valid header name")))?,
                HeaderValue::from_str(v).map_err(|_| e.at(&at, format!("{v:?} is no valid header value")))?,
            ))
        };
        Ok(HeaderOps {
            set: o.set.iter().map(|p| pair("set", p)).collect::<Result<_, _>>()?,
            add: o.add.iter().map(|p| pair("add", p)).collect::<Result<_, _>>()?,
            remove: o
                .remove
                .iter()
                .map(|n| {
                    HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                        e.at(
                            format!("{at}.headers.{field}.remove"),
                            format!("{n:?} is no valid header name"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        })
    };
    let headers = r.headers.as_ref();
    Ok(Rule {
        name,
        action,
        request_headers: ops("request", headers.and_then(|h| h.request.as_ref()))?,
        response_headers: ops("response", headers.and_then(|h| h.response.as_ref()))?,
        mirrors,
        timeout,
        retry,
        fault,
    })
}

fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as u32)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrSpec {
    host: String,
    #[serde(default)]
    subsets: Vec<SubsetSpec>,
}

#[derive(Debug, Deserialize)]
struct SubsetSpec {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// One translated DestinationRule: the subsets of a host.
#[derive(Debug, Clone)]
pub struct DestinationRule {
    pub host: String,
    pub subsets: Vec<Subset>,
}

pub fn translate_destination_rule(object: &str, namespace: &str, spec: DrSpec) -> Result<DestinationRule, RouteError> {
    let e = Errs(object);
    if spec.host.is_empty() {
        return Err(e.at("spec.host", "missing: name the Service the subsets are of"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        if !seen.insert(&s.name) {
            return Err(e.at(
                format!("spec.subsets[{i}].name"),
                format!("subset {:?} is defined twice", s.name),
            ));
        }
    }
    Ok(DestinationRule {
        host: qualify(&spec.host, namespace),
        subsets: spec
            .subsets
            .into_iter()
            .map(|s| Subset {
                name: s.name,
                labels: s.labels,
            })
            .collect(),
    })
}
