use http::{HeaderMap, Method};

use super::*;
use crate::routes::{Abort, PathRewrite, Retry, StringMatch};

const WEB: &str = "web.default.svc.cluster.local";

fn store(yaml: &str) -> (RouteStore, Vec<Outcome>) {
    let mut s = RouteStore::new(Some(("default".into(), "waypoint".into())));
    let out = s.replace(&Kind::ALL, Document::parse_all(yaml).unwrap());
    (s, out)
}

struct Req {
    method: Method,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    port: u16,
}

fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> Req {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let mut h = HeaderMap::new();
    for (n, v) in headers {
        h.append(http::HeaderName::from_bytes(n.as_bytes()).unwrap(), v.parse().unwrap());
    }
    Req {
        method: method.parse().unwrap(),
        path,
        query,
        headers: h,
        port: 80,
    }
}

/// The rule name a request gets (`None`: no match, "default": no routes).
fn route(t: &RouteTable, host: &str, r: &Req) -> String {
    let view = RequestView {
        method: &r.method,
        path: &r.path,
        query: r.query.as_deref(),
        authority: host,
        headers: &r.headers,
        port: r.port,
    };
    match t.lookup(host, &view) {
        Lookup::Default => "default".into(),
        Lookup::NoMatch => "none".into(),
        Lookup::Found(e) => e.rule.name.clone(),
    }
}

const HTTPROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a, namespace: default, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /foo}}]
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{path: {type: Exact, value: /foo/exact}}]
    backendRefs: [{name: web-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /foo}, method: POST}]
    backendRefs: [{name: web-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /foo}, headers: [{name: x-v, value: "2"}]}]
    backendRefs: [{name: web-v2, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b, namespace: default, creationTimestamp: "2023-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /foo/bar}}]
    backendRefs: [{name: web-v3, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /foo}}]
    backendRefs: [{name: web-v3, port: 80}]
  - matches: [{queryParams: [{name: q, type: RegularExpression, value: "x.*"}]}]
    backendRefs: [{name: web-v3, port: 80}]
"#;

#[test]
fn httproute_precedence_across_rules_and_routes() {
    let (s, out) = store(HTTPROUTES);
    assert!(out.iter().all(|o| matches!(o, Outcome::Accepted(_))), "{out:?}");
    let (t, conflicts) = s.table();
    assert!(conflicts.is_empty());
    let r = |m, p, h: &[(&str, &str)]| route(&t, WEB, &req(m, p, h));
    // Exact beats any prefix.
    assert_eq!(r("GET", "/foo/exact", &[]), "HTTPRoute default/a rule 1");
    // The longest prefix wins, across routes.
    assert_eq!(r("GET", "/foo/bar/baz", &[]), "HTTPRoute default/b rule 0");
    // Equal prefixes: a method match, then more header matches, then the
    // older route.
    assert_eq!(r("POST", "/foo/x", &[]), "HTTPRoute default/a rule 2");
    assert_eq!(r("GET", "/foo/x", &[("x-v", "2")]), "HTTPRoute default/a rule 3");
    assert_eq!(r("GET", "/foo/x", &[]), "HTTPRoute default/b rule 1");
    // Whole path elements only; then the catch-all with a query match.
    assert_eq!(r("GET", "/foobar?q=xyz", &[]), "HTTPRoute default/b rule 2");
    assert_eq!(r("GET", "/foobar?q=y", &[]), "none");
    // Another Service has no routes.
    assert_eq!(
        route(&t, "other.default.svc.cluster.local", &req("GET", "/", &[])),
        "default"
    );
    // Route a only attaches to port 80.
    let mut on81 = req("GET", "/foo/exact", &[]);
    on81.port = 81;
    assert_eq!(route(&t, WEB, &on81), "HTTPRoute default/b rule 1");
}

const VS: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - name: canary
    match:
    - headers: {x-canary: {}}
      withoutHeaders: {x-skip: {exact: "1"}}
    route: [{destination: {host: web, subset: v2}}]
  - match: [{uri: {prefix: /api}, method: {exact: GET}}]
    rewrite: {uri: /v1}
    route:
    - {destination: {host: web, subset: v1}, weight: 90}
    - {destination: {host: web, subset: v3}, weight: 10}
    retries: {attempts: 3, perTryTimeout: 0.5s, retryOn: "5xx,retriable-4xx"}
    timeout: 2s
    fault:
      abort: {httpStatus: 418, percentage: {value: 50}}
      delay: {fixedDelay: 100ms}
  - redirect: {uri: /moved, authority: elsewhere}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.default.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

#[test]
fn virtualservice_first_match_subsets_retries_faults() {
    let (s, out) = store(VS);
    assert!(out.iter().all(|o| matches!(o, Outcome::Accepted(_))), "{out:?}");
    let (t, _) = s.table();
    let r = |m, p, h: &[(&str, &str)]| route(&t, WEB, &req(m, p, h));
    assert_eq!(
        r("GET", "/api/x", &[("x-canary", "")]),
        "VirtualService default/web http[canary]"
    );
    assert_eq!(
        r("GET", "/api/x", &[("x-canary", ""), ("x-skip", "1")]),
        "VirtualService default/web http[1]"
    );
    assert_eq!(r("POST", "/api/x", &[]), "VirtualService default/web http[2]");
    let view_req = req("GET", "/api/x", &[]);
    let view = RequestView {
        method: &view_req.method,
        path: &view_req.path,
        query: None,
        authority: WEB,
        headers: &view_req.headers,
        port: 80,
    };
    let Lookup::Found(e) = t.lookup(WEB, &view) else {
        panic!()
    };
    let rule = &e.rule;
    let Action::Forward { backends, rewrite } = &rule.action else {
        panic!()
    };
    assert_eq!(backends[0].weight, 90);
    assert_eq!(
        backends[0].target,
        Target::Service {
            host: WEB.into(),
            port: None,
            subset: Some(Subset {
                name: "v1".into(),
                labels: [("version".to_string(), "v1".to_string())].into(),
            })
        }
    );
    // No DestinationRule defines v3: its share is answered 503.
    assert!(matches!(&backends[1].target, Target::Invalid { status: 503, reason } if reason.contains("v3")));
    assert_eq!(rewrite.path, Some(PathRewrite::Prefix("/v1".into())));
    assert_eq!(rule.retry.attempts, 3);
    assert_eq!(rule.retry.per_try_timeout, Some(Duration::from_millis(500)));
    assert!(rule.retry.on.five_xx && rule.retry.on.retriable_4xx && !rule.retry.on.connect_failure);
    assert_eq!(rule.timeout, Some(Duration::from_secs(2)));
    assert_eq!(rule.fault.abort, Some((Abort::Http(418), 50.0)));
    // A delay without a percentage never fires.
    assert_eq!(rule.fault.delay, None);
    let Lookup::Found(e) = t.lookup(
        WEB,
        &RequestView {
            method: &Method::DELETE,
            ..view
        },
    ) else {
        panic!()
    };
    let Action::Redirect(rd) = &e.rule.action else { panic!() };
    assert_eq!(rd.status, 301);
    assert_eq!(rd.host.as_deref(), Some("elsewhere"));
    // Unset retries are Istio's default.
    assert_eq!(e.rule.retry, Retry::istio_default());
    assert_eq!(e.rule.timeout, None);
}

#[test]
fn every_served_version_is_read_and_others_are_named() {
    for v in [
        "networking.istio.io/v1",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1alpha3",
    ] {
        let (_, out) = store(&format!(
            "apiVersion: {v}\nkind: VirtualService\nmetadata: {{name: x}}\nspec: {{hosts: [web], http: [{{route: [{{destination: {{host: web}}}}]}}]}}\n"
        ));
        assert!(matches!(&out[..], [Outcome::Accepted(_)]), "{v}: {out:?}");
    }
    let (_, out) = store("apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: x}\n");
    assert!(
        matches!(&out[..], [Outcome::Invalid(m)] if m.contains("networking.istio.io/v1alpha3")),
        "{out:?}"
    );
    // Other kinds in the same file are not route objects.
    let (_, out) = store("apiVersion: v1\nkind: Service\nmetadata: {name: web}\n");
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn errors_name_the_object_and_the_field_and_keep_the_last_good_version() {
    let good = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web}]\n  rules:\n  - backendRefs: [{name: web, port: 80}]\n";
    let (mut s, _) = store(good);
    let bad = [
        ("  rules:\n  - matches: [{path: {type: Regex, value: /x}}]\n", "spec.rules[0].matches[0].path.type"),
        ("  rules:\n  - matches: [{path: {type: RegularExpression, value: \"(\"}}]\n", "spec.rules[0].matches[0].path.value"),
        ("  rules:\n  - backendRefs: [{name: web, port: 99999}]\n", "spec.rules[0].backendRefs[0].port"),
        ("  rules:\n  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: \"bad header\", value: x}]}}]\n", "spec.rules[0].filters[0].requestHeaderModifier.set[0].name"),
        ("  rules:\n  - timeouts: {request: soon}\n    backendRefs: [{name: web, port: 80}]\n", "spec.rules[0].timeouts.request"),
    ];
    for (rules, field) in bad {
        let text = good.split("  rules:").next().unwrap().to_string() + rules;
        let out = s.replace(&Kind::ALL, Document::parse_all(&text).unwrap());
        match &out[..] {
            [Outcome::Rejected { error, kept: true, .. }] => {
                assert_eq!(error.object, "HTTPRoute default/r");
                assert_eq!(error.field, field, "{error}");
            }
            o => panic!("{field}: {o:?}"),
        }
        // The last good version still routes.
        let (t, _) = s.table();
        assert_eq!(route(&t, WEB, &req("GET", "/", &[])), "HTTPRoute default/r rule 0");
    }
    // Deleting it leaves no routes.
    let out = s.replace(&Kind::ALL, vec![]);
    assert!(matches!(&out[..], [Outcome::Removed(_)]));
    assert_eq!(route(&s.table().0, WEB, &req("GET", "/", &[])), "default");
}

#[test]
fn conflicts_are_resolved_by_age_and_reported() {
    let yaml = format!(
        "{VS}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: later, namespace: default}}\nspec: {{hosts: [web.default.svc.cluster.local], http: [{{route: [{{destination: {{host: web}}}}]}}]}}\n"
    );
    let (s, _) = store(&yaml);
    let (t, conflicts) = s.table();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert!(
        conflicts[0].contains("VirtualService default/later ignored"),
        "{conflicts:?}"
    );
    assert_eq!(
        route(&t, WEB, &req("POST", "/", &[])),
        "VirtualService default/web http[2]"
    );
    // HTTPRoutes on the same Service take precedence over VirtualServices.
    let (s, _) = store(&format!("{yaml}---\n{HTTPROUTES}"));
    let (t, conflicts) = s.table();
    assert!(
        conflicts.iter().any(|c| c.contains("HTTPRoutes take precedence")),
        "{conflicts:?}"
    );
    assert_eq!(
        route(&t, WEB, &req("GET", "/foo/exact", &[])),
        "HTTPRoute default/a rule 1"
    );
}

#[test]
fn gateway_attached_routes_apply_to_their_hostnames() {
    let (s, _) = store(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: g}\nspec:\n  parentRefs: [{name: waypoint}]\n  hostnames: [\"*.default.svc.cluster.local\"]\n  rules:\n  - matches: [{path: {type: Exact, value: /only}}]\n    backendRefs: [{name: web, port: 80}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: other-gateway}\nspec:\n  parentRefs: [{name: some-ingress}]\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n",
    );
    let (t, _) = s.table();
    assert_eq!(route(&t, WEB, &req("GET", "/only", &[])), "HTTPRoute default/g rule 0");
    assert_eq!(route(&t, WEB, &req("GET", "/else", &[])), "none");
    assert_eq!(
        route(&t, "web.other.svc.cluster.local", &req("GET", "/only", &[])),
        "default"
    );
}

#[test]
fn httproute_filters_and_defaults() {
    let (s, out) = store(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: f}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /redirect}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: example.org, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {type: PathPrefix, value: /mirror}}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}, fraction: {numerator: 1, denominator: 4}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow2, port: 80}}}
    backendRefs: [{name: web, port: 80, weight: 0}, {name: web, kind: ConfigMap, port: 80}]
    timeouts: {request: 1s, backendRequest: 250ms}
    retry: {attempts: 4, codes: [500, 502], backoff: 100ms}
  - matches: [{path: {type: PathPrefix, value: /empty}}]
"#,
    );
    assert!(out.iter().all(|o| matches!(o, Outcome::Accepted(_))), "{out:?}");
    let (t, _) = s.table();
    let find = |p: &str| {
        let r = req("GET", p, &[]);
        let view = RequestView {
            method: &r.method,
            path: &r.path,
            query: None,
            authority: WEB,
            headers: &r.headers,
            port: 80,
        };
        match t.lookup(WEB, &view) {
            Lookup::Found(e) => e.rule.clone(),
            other => panic!("{other:?}"),
        }
    };
    let Action::Redirect(r) = &find("/redirect").action else {
        panic!()
    };
    assert_eq!(r.status, 302);
    assert_eq!(r.path, Some(PathRewrite::Prefix("/new".into())));
    let m = find("/mirror");
    assert_eq!(m.mirrors.len(), 2);
    assert_eq!(m.mirrors[0].percent, 25.0);
    assert_eq!(m.mirrors[1].percent, 100.0);
    let Action::Forward { backends, .. } = &m.action else {
        panic!()
    };
    assert_eq!(backends[0].weight, 0);
    assert!(matches!(&backends[1].target, Target::Invalid { status: 500, .. }));
    assert_eq!(m.timeout, Some(Duration::from_secs(1)));
    assert_eq!(m.retry.per_try_timeout, Some(Duration::from_millis(250)));
    assert_eq!((m.retry.attempts, m.retry.floor), (4, Duration::from_millis(100)));
    assert_eq!(m.retry.on.codes, [500, 502]);
    assert!(m.retry.on.connect_failure);
    // Neither backends nor a redirect: 500.
    assert!(matches!(find("/empty").action, Action::Respond { status: 500, .. }));
    // Match values that are regexes match whole values.
    let StringMatch::Regex(re) = crate::routes::full_regex("a.c").map(StringMatch::Regex).unwrap() else {
        panic!()
    };
    assert!(re.is_match("abc") && !re.is_match("xabcx"));
}

#[test]
fn durations_in_both_styles() {
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert!(parse_duration("soon").unwrap_err().contains("soon"));
    // Found by the fuzzer (routes): a panic in Duration::from_secs_f64.
    let long = "07777777777777777777777.5s";
    assert!(parse_duration(long).unwrap_err().contains("too long"));
}
