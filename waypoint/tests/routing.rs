//! Routing rules black-box, each test in a network namespace of its own,
//! through real HBONE and TLS into the real waypoint and out to HBONE
//! "pods" in front of the echo backend: HTTPRoute and VirtualService
//! matching and precedence, weighted splits, redirects, rewrites, header
//! changes, timeouts, retries, faults, mirrors, and bad configuration.
//! Every case runs over one HTTP/1.1 keep-alive connection and over one
//! h2 connection, so balancing and retries are per request.
//!
//! Pods: web-a (127.0.0.2, track a) and web-b (127.0.0.3, track b) behind
//! Service `web` (the one the client calls) and behind Services `web-a` and
//! `web-b` (one pod each) that routes send to.
mod common;

use common::*;
use waypoint::config::LimitArgs;

const WEB_A_VIP: &str = "10.96.0.21";
const WEB_B_VIP: &str = "10.96.0.22";
/// Enough samples that the bounds below are ±4 standard deviations or more.
const N: usize = 400;

/// The cluster with per-pod Services; `more` edits it further.
fn routing_cluster(c: &mut LocalConfig) {
    for p in &mut c.pods {
        let track = match &*p.name {
            "web-a" => "a",
            "web-b" => "b",
            _ => continue,
        };
        std::sync::Arc::make_mut(&mut p.labels).insert("track".into(), track.into());
    }
    for (name, vip, track) in [("web-a", WEB_A_VIP, "a"), ("web-b", WEB_B_VIP, "b")] {
        c.services.push(ServiceSpec {
            name: name.into(),
            namespace: "default".into(),
            hostname: None,
            vips: vec![vip.parse().unwrap()],
            ports: vec![port(80, None)],
            selector: std::sync::Arc::new(
                BTreeMap::from([("app".into(), "web".into()), ("track".into(), track.into())]).into(),
            ),
            endpoints: None,
            load_balancing: Default::default(),
            subject_alt_names: vec![],
            labels: Default::default(),
        });
    }
}

async fn world(tag: &str) -> World {
    World::with(tag, LimitArgs::default(), routing_cluster).await
}

/// A GET with headers.
fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "web.default.svc.cluster.local");
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Full::default()).unwrap()
}

/// The pod that answered (or the status when it was not 200).
async fn who(c: &mut Client, r: Request<Full<Bytes>>) -> String {
    let resp = c.send(r).await;
    if resp.status() != StatusCode::OK {
        return resp.status().as_u16().to_string();
    }
    json(resp).await.1.pod
}

/// Runs `case` over one HTTP/1.1 connection, then one h2 connection.
async fn both<F, Fut>(w: &World, mut case: F)
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for h2 in [false, true] {
        case(Client::open(w, &vip(80), h2).await).await;
    }
}

fn count(v: &[String], what: &str) -> usize {
    v.iter().filter(|x| *x == what).count()
}

const SPLIT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /split}}]
    backendRefs: [{name: web-a, port: 80, weight: 3}, {name: web-b, port: 80, weight: 1}]
  - matches: [{path: {type: PathPrefix, value: /invalid}}]
    backendRefs: [{name: web-a, port: 80}, {name: web-a, kind: ConfigMap, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /zero}}]
    backendRefs: [{name: web-a, port: 80, weight: 0}, {name: web-b, port: 80, weight: 0}]
"#;

const CANARY: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - route:
    - {destination: {host: web, subset: a}, weight: 90}
    - {destination: {host: web, subset: b}, weight: 10}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  subsets:
  - {name: a, labels: {track: a}}
  - {name: b, labels: {track: b}}
"#;

#[test]
fn weighted_splits_converge_to_the_weights() {
    in_netns(|| async {
        let mut w = world("split").await;
        w.set_routes(SPLIT);
        both(&w, |mut c| async move {
            let mut got = Vec::new();
            for _ in 0..N {
                got.push(who(&mut c, get("/split")).await);
            }
            let a = count(&got, "web-a");
            assert_eq!(a + count(&got, "web-b"), N, "{}: {got:?}", c.name());
            // 3:1 -> 300 of 400, sd 8.7.
            assert!((255..=345).contains(&a), "{}: web-a got {a} of {N}", c.name());
            // An invalid backend answers 500 for its share (1:1).
            let mut got = Vec::new();
            for _ in 0..N {
                got.push(who(&mut c, get("/invalid")).await);
            }
            let errors = count(&got, "500");
            assert_eq!(errors + count(&got, "web-a"), N, "{got:?}");
            assert!((150..=250).contains(&errors), "{}: {errors} of {N} were 500", c.name());
            // Every weight 0: 500.
            assert_eq!(who(&mut c, get("/zero")).await, "500");
        })
        .await;
        // VirtualService 90/10 over DestinationRule subsets.
        w.set_routes(CANARY);
        both(&w, |mut c| async move {
            let mut got = Vec::new();
            for _ in 0..N {
                got.push(who(&mut c, get("/")).await);
            }
            let b = count(&got, "web-b");
            assert_eq!(b + count(&got, "web-a"), N, "{got:?}");
            // 10 % -> 40 of 400, sd 6.
            assert!((16..=64).contains(&b), "{}: web-b got {b} of {N}", c.name());
        })
        .await;
    });
}

const PRECEDENCE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: newer, namespace: default, creationTimestamp: "2024-06-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /p}}]
    backendRefs: [{name: web-a, port: 80}]
  - matches: [{path: {type: Exact, value: /p/exact}}]
    backendRefs: [{name: web-a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /p}, method: POST}]
    backendRefs: [{name: web-a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /p}, headers: [{name: x-track, value: a}]}]
    backendRefs: [{name: web-a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /q}, queryParams: [{name: v, type: RegularExpression, value: "a[0-9]+"}]}]
    backendRefs: [{name: web-a, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: older, namespace: default, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /p/longer}}]
    backendRefs: [{name: web-a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /p}}]
    backendRefs: [{name: web-b, port: 80}]
"#;

const FIRST_MATCH: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web.default.svc.cluster.local]
  http:
  - match: [{headers: {x-canary: {}}, withoutHeaders: {x-opt-out: {exact: "yes"}}}]
    route: [{destination: {host: web-b}}]
  - match: [{uri: {regex: "/r/[0-9]+"}, method: {exact: GET}}, {queryParams: {v: {prefix: b}}}]
    route: [{destination: {host: web-b}}]
  - match: [{authority: {prefix: other.example}}]
    route: [{destination: {host: web-b}}]
  - match: [{port: 81}]
    route: [{destination: {host: web-b}}]
  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: web-a}}]
"#;

#[test]
fn matches_and_precedence() {
    in_netns(|| async {
        let mut w = world("match").await;
        w.set_routes(PRECEDENCE);
        both(&w, |mut c| async move {
            let mut r = async |m: &str, u: &str, h: &[(&str, &str)]| who(&mut c, req(m, u, h)).await;
            // Exact beats prefixes; the longest prefix wins across routes.
            assert_eq!(r("GET", "/p/exact", &[]).await, "web-a");
            assert_eq!(r("GET", "/p/longer/x", &[]).await, "web-a");
            // Same prefix: a method match, then a header match, then the
            // older route (which sends /p to web-b, the newer to web-a).
            assert_eq!(r("POST", "/p/x", &[]).await, "web-a");
            assert_eq!(r("GET", "/p/x", &[("x-track", "a")]).await, "web-a");
            assert_eq!(r("GET", "/p/x", &[]).await, "web-b");
            // Path elements, not string prefixes: /pq matches nothing.
            assert_eq!(r("GET", "/pq", &[]).await, "404");
            assert_eq!(r("GET", "/q?v=a12", &[]).await, "web-a");
            assert_eq!(r("GET", "/q?v=b12", &[]).await, "404");
        })
        .await;
        let line = loop {
            let l = w.access_line().await;
            if l["response_code"] == 404 {
                break l;
            }
        };
        assert_eq!(line["response_flags"], "NR", "{line}");

        w.set_routes(FIRST_MATCH);
        both(&w, |mut c| async move {
            let mut r = async |m: &str, u: &str, h: &[(&str, &str)]| who(&mut c, req(m, u, h)).await;
            assert_eq!(r("GET", "/", &[("x-canary", "")]).await, "web-b");
            assert_eq!(r("GET", "/", &[("x-canary", ""), ("x-opt-out", "yes")]).await, "web-a");
            assert_eq!(r("GET", "/r/42", &[]).await, "web-b");
            assert_eq!(r("POST", "/r/42", &[]).await, "web-a");
            assert_eq!(r("POST", "/x?v=beta", &[]).await, "web-b");
            assert_eq!(r("GET", "/x?v=alpha", &[]).await, "web-a");
        })
        .await;
        // Port and authority matches: port 81 is the same Service.
        for h2 in [false, true] {
            let mut c = Client::open(&w, &vip(81), h2).await;
            assert_eq!(who(&mut c, get("/")).await, "web-b");
            let mut c = Client::open(&w, &vip(80), h2).await;
            let r = Request::get("/")
                .header("host", "other.example:80")
                .body(Full::default())
                .unwrap();
            assert_eq!(who(&mut c, r).await, "web-b");
        }
    });
}

const REWRITES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: filters, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /redirect}}]
    filters:
    - {type: RequestRedirect, requestRedirect: {hostname: example.org, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}
  - matches: [{path: {type: PathPrefix, value: /secure}}]
    filters:
    - {type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}
  - matches: [{path: {type: PathPrefix, value: /port}}]
    filters:
    - {type: RequestRedirect, requestRedirect: {port: 8443, path: {type: ReplaceFullPath, replaceFullPath: /full}}}
  - matches: [{path: {type: PathPrefix, value: /rewrite}}]
    filters:
    - {type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}
    backendRefs: [{name: web-a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /headers}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-set, value: set}]
        add: [{name: x-add, value: added}]
        remove: [x-remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-resp, value: r}]
    backendRefs: [{name: web-a, port: 80}]
"#;

const VS_REWRITES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /moved, authority: elsewhere.example}
  - match: [{uri: {prefix: /api}}]
    rewrite: {uri: /v2}
    headers:
      request: {set: {x-set: vs}, add: {x-add: more}, remove: [x-remove]}
      response: {add: {x-resp: vs}}
    route: [{destination: {host: web-b}}]
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: "short and stout"}}
"#;

#[test]
fn redirects_rewrites_and_header_modifiers() {
    in_netns(|| async {
        let mut w = world("rewrite").await;
        w.set_routes(REWRITES);
        both(&w, |mut c| async move {
            let location = |r: &Response<Incoming>| r.headers()["location"].to_str().unwrap().to_string();
            let r = c.send(get("/redirect/x?q=1")).await;
            assert_eq!(r.status(), StatusCode::FOUND);
            assert_eq!(location(&r), "http://example.org/new/x?q=1");
            let r = c.send(get("/secure/y")).await;
            assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
            assert_eq!(location(&r), "https://web.default.svc.cluster.local/secure/y");
            let r = c.send(get("/port/z")).await;
            assert_eq!(location(&r), "http://web.default.svc.cluster.local:8443/full");
            let (s, e) = json(c.send(get("/rewrite/deep/path?x=1")).await).await;
            assert_eq!(
                (s, e.pod.as_str(), e.path.as_str(), e.query.as_str()),
                (StatusCode::OK, "web-a", "/deep/path", "x=1")
            );
            assert_eq!(e.host, "rewritten.example");
            let r = c
                .send(req(
                    "GET",
                    "/headers",
                    &[("x-add", "first"), ("x-remove", "gone"), ("x-set", "old")],
                ))
                .await;
            assert_eq!(r.headers()["x-resp"], "r");
            let (_, e) = json(r).await;
            assert_eq!(e.header("x-set"), Some("set"));
            // `add` appends: two values arrive joined by a comma.
            assert_eq!(e.headers["x-add"], ["first,added"]);
            assert_eq!(e.header("x-remove"), None);
        })
        .await;
        w.set_routes(VS_REWRITES);
        both(&w, |mut c| async move {
            let r = c.send(get("/old/thing?k=v")).await;
            assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
            assert_eq!(r.headers()["location"], "http://elsewhere.example/moved?k=v");
            let r = c
                .send(req("GET", "/api/users", &[("x-add", "one"), ("x-remove", "x")]))
                .await;
            assert_eq!(r.headers()["x-resp"], "vs");
            let (_, e) = json(r).await;
            assert_eq!((e.pod.as_str(), e.path.as_str()), ("web-b", "/v2/users"));
            assert_eq!(
                (e.header("x-set"), e.headers["x-add"].as_slice(), e.header("x-remove")),
                (Some("vs"), &["one,more".to_string()][..], None)
            );
            let (s, body) = text(c.send(get("/teapot")).await).await;
            assert_eq!((s.as_u16(), body.as_str()), (418, "short and stout"));
        })
        .await;
    });
}

const TIMEOUTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: timeouts, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /whole}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: web-a, port: 80}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-b, namespace: default}
spec:
  hosts: [web-b]
  http:
  - timeout: 3s
    retries: {attempts: 2, perTryTimeout: 200ms, retryOn: gateway-error}
    route: [{destination: {host: web-b}}]
"#;

#[test]
fn request_and_per_try_timeouts_are_measured() {
    in_netns(|| async {
        let mut w = world("timeout").await;
        w.set_routes(TIMEOUTS);
        for h2 in [false, true] {
            let mut c = Client::open(&w, &vip(80), h2).await;
            // The whole exchange: 504 after 300 ms, not the backend's 2 s.
            let start = Instant::now();
            let r = c.send(get("/whole?delay=2000")).await;
            let took = start.elapsed();
            assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
            assert!(
                took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
                "{took:?}"
            );
            // Still usable after a timeout.
            assert_eq!(who(&mut c, get("/whole")).await, "web-a");
            // Per try: three tries of 200 ms each, every one counted at the
            // backend, then 504.
            let mut c = Client::open(&w, &format!("{WEB_B_VIP}:80"), h2).await;
            let key = format!("pertry-{h2}");
            let start = Instant::now();
            let r = c.send(get(&format!("/?delay=1000&key={key}"))).await;
            let took = start.elapsed();
            assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
            assert!(
                took >= Duration::from_millis(600) && took < Duration::from_millis(2000),
                "{took:?}"
            );
            wait_until("three tries reached the backend", || w.counters.hits(&key) == 3).await;
        }
        let line = loop {
            let l = w.access_line().await;
            if l["response_code"] == 504 {
                break l;
            }
        };
        assert_eq!(line["response_flags"], "UT", "{line}");
    });
}

const RETRIES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: retries, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - retry: {attempts: 3, codes: [500], backoff: 100ms}
    backendRefs: [{name: web, port: 80}]
"#;

#[test]
fn retries_on_codes_respect_the_backoff_floor_and_change_endpoint() {
    in_netns(|| async {
        let mut w = world("retry").await;
        w.set_routes(RETRIES);
        for h2 in [false, true] {
            let mut c = Client::open(&w, &vip(80), h2).await;
            // Fails twice with 500, then succeeds: three tries, two backoffs
            // of at least 100 ms.
            let key = format!("codes-{h2}");
            let start = Instant::now();
            let (s, _) = text(c.send(get(&format!("/?fail=2&fail_status=500&key={key}"))).await).await;
            assert_eq!(s, StatusCode::OK);
            assert!(start.elapsed() >= Duration::from_millis(200), "{:?}", start.elapsed());
            assert_eq!(w.counters.hits(&key), 3);
            // Each retry goes to another endpoint than the try before.
            let pods = w.counters.pods(&key);
            assert!(pods.len() == 3 && pods[0] != pods[1] && pods[1] != pods[2], "{pods:?}");
            // Attempts run out: the last 500 is the answer, after 4 tries.
            let key = format!("exhausted-{h2}");
            let (s, _) = text(c.send(get(&format!("/?fail=10&fail_status=500&key={key}"))).await).await;
            assert_eq!((s, w.counters.hits(&key)), (StatusCode::INTERNAL_SERVER_ERROR, 4));
            // A status not listed is not retried.
            let key = format!("other-{h2}");
            let (s, _) = text(c.send(get(&format!("/?fail=1&fail_status=502&key={key}"))).await).await;
            assert_eq!((s, w.counters.hits(&key)), (StatusCode::BAD_GATEWAY, 1));
        }
        assert!(
            w.metrics_text().contains("waypoint_retries_total{reason=\"status\"}"),
            "{}",
            w.metrics_text()
        );
    });
}

#[test]
fn connection_errors_are_retried_on_another_endpoint_by_default() {
    in_netns(|| async {
        // A third endpoint whose agent is down (nothing listens there).
        let w = World::with("connfail", LimitArgs::default(), |c| {
            routing_cluster(c);
            c.pods.push(pod_spec("web-c", "127.0.0.4", "web-c", "web"));
        })
        .await;
        both(&w, |mut c| async move {
            for _ in 0..30 {
                let got = who(&mut c, get("/")).await;
                assert!(got == "web-a" || got == "web-b", "{}: {got}", c.name());
            }
        })
        .await;
        let m = w.metrics_text();
        assert!(m.contains("waypoint_retries_total{reason=\"connect_failure\"}"), "{m}");
    });
}

const FAULTS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 30}}}
    route: [{destination: {host: web}}]
  - match: [{uri: {prefix: /delay}}]
    fault: {delay: {fixedDelay: 20ms, percentage: {value: 50}}}
    route: [{destination: {host: web}}]
  - match: [{uri: {prefix: /unset}}]
    fault: {delay: {fixedDelay: 20ms}, abort: {httpStatus: 500}}
    route: [{destination: {host: web}}]
"#;

#[test]
fn fault_delays_and_aborts_fire_at_their_rates() {
    in_netns(|| async {
        let mut w = world("fault").await;
        w.set_routes(FAULTS);
        for h2 in [false, true] {
            let mut c = Client::open(&w, &vip(80), h2).await;
            let mut aborted = 0;
            for _ in 0..N {
                if who(&mut c, get("/abort")).await == "418" {
                    aborted += 1;
                }
            }
            // 30 % -> 120 of 400, sd 9.2.
            assert!((80..=160).contains(&aborted), "{aborted} of {N} aborted");
            let mut delayed = 0;
            for _ in 0..N {
                let start = Instant::now();
                assert!(who(&mut c, get("/delay")).await.starts_with("web-"));
                let flags = loop {
                    let l = w.access_line().await;
                    if l["path"] == "/delay" {
                        break l["response_flags"].as_str().unwrap().to_string();
                    }
                };
                if flags == "DI" {
                    assert!(start.elapsed() >= Duration::from_millis(20));
                    delayed += 1;
                }
            }
            // 50 % -> 200 of 400, sd 10.
            assert!((150..=250).contains(&delayed), "{delayed} of {N} delayed");
            // Faults without a percentage never fire.
            for _ in 0..50 {
                assert!(who(&mut c, get("/unset")).await.starts_with("web-"));
            }
        }
    });
}

/// A pod whose agent accepts the CONNECT and whose app never answers.
async fn hanging_pod(w: &World) {
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sink.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = sink.accept().await {
            held.push(s);
        }
    });
    hbone_pod(
        &w.pki,
        "127.0.0.5".parse().unwrap(),
        w.upstream_port,
        "hang",
        w.seen.clone(),
        addr,
    )
    .await
    .unwrap();
}

const MIRROR: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirror, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /copy}}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: web-b, port: 80}}}
    backendRefs: [{name: web-a, port: 80}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-a, namespace: default}
spec:
  hosts: [web-a]
  http:
  - mirror: {host: hang}
    mirrorPercentage: {value: 100}
    route: [{destination: {host: web-a}}]
"#;

#[test]
fn mirrors_arrive_and_a_hanging_mirror_never_slows_the_primary() {
    in_netns(|| async {
        let mut w = World::with("mirror", LimitArgs::default(), |c| {
            routing_cluster(c);
            let mut hang = pod_spec("hang", "127.0.0.5", "hang", "hang");
            hang.labels = std::sync::Arc::new(BTreeMap::from([("app".into(), "hang".into())]).into());
            c.pods.push(hang);
            c.services.push(ServiceSpec {
                name: "hang".into(),
                namespace: "default".into(),
                hostname: None,
                vips: vec!["10.96.0.23".parse().unwrap()],
                ports: vec![port(80, None)],
                selector: std::sync::Arc::new(BTreeMap::from([("app".into(), "hang".into())]).into()),
                endpoints: None,
                load_balancing: Default::default(),
                subject_alt_names: vec![],
                labels: Default::default(),
            });
        })
        .await;
        hanging_pod(&w).await;
        w.set_routes(MIRROR);
        for h2 in [false, true] {
            let mut c = Client::open(&w, &vip(80), h2).await;
            let key = format!("copy-{h2}");
            assert_eq!(who(&mut c, get(&format!("/copy?key={key}"))).await, "web-a");
            wait_until("the mirrored copy reached web-b", || w.counters.hits(&key) == 2).await;
            let hosts = w.counters.hosts(&key);
            assert!(
                hosts.contains(&"web.default.svc.cluster.local-shadow".to_string()),
                "{hosts:?}"
            );
            // The mirror of web-a never answers; web-a's answers are not held up.
            let mut c = Client::open(&w, &format!("{WEB_A_VIP}:80"), h2).await;
            for _ in 0..20 {
                let start = Instant::now();
                assert_eq!(who(&mut c, get("/")).await, "web-a");
                assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
            }
        }
        wait_until("the hanging mirrors were sent", || {
            w.seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(a, _)| a.ip().to_string() == "127.0.0.5")
                .count()
                >= 40
        })
        .await;
    });
}

#[test]
fn bad_config_keeps_the_last_good_routes() {
    in_netns(|| async {
        let mut w = world("badcfg").await;
        let good = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web}]\n  rules: [{backendRefs: [{name: web-b, port: 80}]}]\n";
        w.set_routes(good);
        let bad = good.replace("port: 80}]}]", "port: 80}], timeouts: {request: soon}}]");
        // A broken object: rejected, named with its field; the good
        // version routes on.
        w.routes.load_text(&bad).unwrap();
        // Not YAML at all: nothing changes.
        assert!(w.routes.load_text("kind: [").is_err());
        both(&w, |mut c| async move {
            for _ in 0..10 {
                assert_eq!(who(&mut c, get("/")).await, "web-b");
            }
        })
        .await;
        let m = w.metrics_text();
        assert!(m.contains("waypoint_route_objects_rejected 1"), "{m}");
        assert!(m.contains("waypoint_route_changes_total{result=\"rejected\"} 1"), "{m}");
        // Fixed: routes follow again; deleted: back to the Service itself.
        w.set_routes(&good.replace("web-b", "web-a"));
        let mut c = Client::open(&w, &vip(80), true).await;
        assert_eq!(who(&mut c, get("/")).await, "web-a");
        w.set_routes("");
        let mut got = std::collections::BTreeSet::new();
        for _ in 0..10 {
            got.insert(who(&mut c, get("/")).await);
        }
        assert_eq!(got.len(), 2, "both pods again: {got:?}");
        assert!(w.metrics_text().contains("waypoint_route_objects_rejected 0"));
    });
}

#[test]
fn the_retry_budget_caps_retries_in_flight() {
    in_netns(|| async {
        let mut w = world("budget").await;
        w.set_routes(RETRIES);
        // 20 requests at once on one h2 connection, every try failing after
        // 300 ms: without a budget 20 x 4 tries reach the backend; with it at
        // most max(3, 20 % of the active requests) retries are in flight.
        let tx = h2(w.connect(&vip(80)).await.unwrap()).await;
        let mut calls = Vec::new();
        for _ in 0..20 {
            let mut tx = tx.clone();
            calls.push(tokio::spawn(async move {
                Sender::send(&mut tx, get("/?fail=1000&fail_status=500&delay=300&key=budget"))
                    .await
                    .unwrap()
                    .status()
            }));
        }
        for c in calls {
            assert_eq!(c.await.unwrap(), StatusCode::INTERNAL_SERVER_ERROR);
        }
        let hits = w.counters.hits("budget");
        let m = w.metrics_text();
        let exhausted: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix("waypoint_retry_budget_exhausted_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!((20..=40).contains(&hits), "{hits} tries reached the backend");
        assert!(exhausted >= 10, "{exhausted} retries refused by the budget\n{m}");
    });
}

#[test]
fn only_bodies_within_the_replay_limit_are_retried() {
    in_netns(|| async {
        let w = world("replay").await;
        for h2 in [false, true] {
            let mut c = Client::open(&w, &vip(80), h2).await;
            let post = |key: &str, n: usize| {
                Request::post(format!("/?fail=1&key={key}"))
                    .header("host", "web.default.svc.cluster.local")
                    .body(Full::new(Bytes::from(vec![b'x'; n])))
                    .unwrap()
            };
            // 10 KB: kept while it streams, so the retry (Istio's default
            // policy retries a 503) sends it whole again.
            let key = format!("small-{h2}");
            let (s, e) = json(c.send(post(&key, 10 << 10)).await).await;
            assert_eq!((s, e.body_bytes, w.counters.hits(&key)), (StatusCode::OK, 10 << 10, 2));
            // 100 KB is over the 64 KiB limit: streamed once, not retried.
            let key = format!("big-{h2}");
            let (s, _) = text(c.send(post(&key, 100 << 10)).await).await;
            assert_eq!((s, w.counters.hits(&key)), (StatusCode::SERVICE_UNAVAILABLE, 1));
        }
    });
}

const GRPC: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /mesh.echo.Echo/}, headers: {x-fault: {exact: abort}}}]
    fault: {abort: {grpcStatus: RESOURCE_EXHAUSTED, percentage: {value: 100}}}
    route: [{destination: {host: web}}]
  - match: [{uri: {prefix: /mesh.echo.Echo/}}]
    route: [{destination: {host: web-b}}]
"#;

#[test]
fn grpc_calls_are_routed_aborted_and_retried() {
    in_netns(|| async {
        let mut w = world("grpc").await;
        w.set_routes(GRPC);
        let mut client = testbed::echo::grpc_client(w.connect(&vip(83)).await.unwrap())
            .await
            .unwrap();
        let call = |fault: bool, fail_code: i32| {
            let mut r = tonic::Request::new(testbed::echo::pb::EchoRequest {
                message: "hi".into(),
                fail_code,
            });
            if fault {
                r.metadata_mut().insert("x-fault", "abort".parse().unwrap());
            }
            r
        };
        for _ in 0..4 {
            assert_eq!(client.echo(call(false, 0)).await.unwrap().into_inner().pod, "web-b");
        }
        let e = client.echo(call(true, 0)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        let line = loop {
            let l = w.access_line().await;
            if l["response_flags"] == "FI" {
                break l;
            }
        };
        assert_eq!(line["grpc_status"], "8", "{line}");
        // UNAVAILABLE from the backend: Istio's default policy retries it twice.
        let e = client.echo(call(false, 14)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        let m = w.metrics_text();
        assert!(m.contains("waypoint_retries_total{reason=\"status\"} 2"), "{m}");
    });
}
