//! The waypoint on loopback with real TLS, real HBONE and the real proxy
//! (the world is `common`): HTTP/1.1, h2, gRPC, WebSocket or raw bytes
//! inside HBONE CONNECTs; hardening, telemetry, drain and the binary.
mod common;

use std::collections::BTreeSet;

use common::*;
use serde::Deserialize;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keepalive_routes_each_request_and_adds_forwarding_headers() {
    let w = World::new("h1", LimitArgs::default()).await;
    let mut tx = h1(w.connect(&vip(80)).await.unwrap()).await;
    let mut pods = Vec::new();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for i in 0..4 {
        let mut req = get(&format!("/hello/{i}?x=1"));
        req.headers_mut().insert("traceparent", tp.parse().unwrap());
        let (status, e) = json(send(&mut tx, req).await.unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(
            (e.path.as_str(), e.query.as_str(), e.version.as_str()),
            (&*format!("/hello/{i}"), "x=1", "HTTP/1.1")
        );
        assert_eq!(e.host, "web.default.svc.cluster.local");
        assert_eq!(e.header("x-forwarded-for"), Some(CLIENT_IP));
        let sent = e.header("traceparent").unwrap();
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && !sent.contains("00f067aa0ba902b7"),
            "{sent}"
        );
        assert!(e.header("baggage").unwrap().contains("k8s.deployment.name=client"));
        pods.push(e.pod);
    }
    assert_eq!(
        pods,
        ["web-a", "web-b", "web-a", "web-b"],
        "one keep-alive connection, each request routed on its own"
    );
    // Upstream connections are kept: one CONNECT per pod, not per request.
    let seen = w.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for (authority, caller) in seen {
        assert_eq!(caller, WAYPOINT, "the waypoint's own identity upstream");
        assert_eq!(authority.port(), TARGET);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_routes_each_request_on_one_connection() {
    let w = World::new("h2", LimitArgs::default()).await;
    // Port 81 declares http: h2 prior knowledge is told by its preface.
    for p in [80, 81] {
        let mut tx = h2(w.connect(&vip(p)).await.unwrap()).await;
        let mut pods = Vec::new();
        for _ in 0..4 {
            let req = Request::get("http://web.default:80/x").body(Full::default()).unwrap();
            let (status, e) = json(send(&mut tx, req).await.unwrap()).await;
            assert_eq!(status, 200);
            assert_eq!(e.version, "HTTP/2.0", "h2 upstream for an h2 downstream");
            assert_eq!(e.host, "web.default:80");
            pods.push(e.pod);
        }
        pods.sort();
        assert_eq!(pods, ["web-a", "web-a", "web-b", "web-b"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_with_a_real_client_and_server_and_its_status_in_metrics() {
    let w = World::new("grpc", LimitArgs::default()).await;
    let mut client = testbed::echo::grpc_client(w.connect(&vip(83)).await.unwrap())
        .await
        .unwrap();
    let mut pods = Vec::new();
    for _ in 0..2 {
        let r = client
            .echo(testbed::echo::pb::EchoRequest {
                message: "hi".into(),
                fail_code: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.message, "hi");
        assert_eq!(r.metadata.get("x-forwarded-for").map(String::as_str), Some(CLIENT_IP));
        pods.push(r.pod);
    }
    pods.sort();
    assert_eq!(pods, ["web-a", "web-b"]);
    let e = client
        .echo(testbed::echo::pb::EchoRequest {
            message: "x".into(),
            fail_code: 14,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    let m = w.metrics_text();
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("request_protocol=\"grpc\"")
            && l.contains("grpc_response_status=\"14\"")),
        "{m}"
    );
    let ok: u64 = m
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("grpc_response_status=\"0\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(ok, 2, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    let w = World::new("ws", LimitArgs::default()).await;
    let mut tx = h1(w.connect(&vip(80)).await.unwrap()).await;
    let req = Request::get("/chat")
        .header("host", "web")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "13")
        .body(Full::default())
        .unwrap();
    let resp = send(&mut tx, req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers().get("upgrade").unwrap(), "websocket");
    let up = hyper::upgrade::on(resp).await.unwrap();
    let mut io = TokioIo::new(up);
    io.write_all(b"frames both ways").await.unwrap();
    let mut buf = [0u8; 16];
    tokio::time::timeout(WAIT, io.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"frames both ways");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_authority_is_503_on_connect_and_a_vanished_route_404_nr() {
    let mut w = World::new("unknown", LimitArgs::default()).await;
    for a in ["10.96.9.9:80", "10.96.0.10:9999"] {
        let e = w.connect(a).await.err().expect("refused");
        assert!(
            matches!(e, HboneError::Status { status, .. } if status == StatusCode::SERVICE_UNAVAILABLE),
            "{a}: {e}"
        );
    }
    assert!(w
        .metrics_text()
        .contains("waypoint_connect_refused_total{reason=\"unknown_authority\"} 2"));
    // The service disappears under an open connection: the next request
    // finds no route.
    let mut tx = h1(w.connect(&vip(80)).await.unwrap()).await;
    assert_eq!(text(send(&mut tx, get("/")).await.unwrap()).await.0, 200);
    let _ = w.access_line().await;
    w.state.update(&cluster(|c| c.services.clear()), TD);
    let (status, _) = text(send(&mut tx, get("/")).await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(w.access_line().await["response_flags"], "NR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ready_endpoint_is_503_uh() {
    let mut w = World::with("uh", LimitArgs::default(), |c| {
        for p in &mut c.pods {
            p.healthy = &*p.name == "client";
        }
    })
    .await;
    let mut tx = h1(w.connect(&vip(80)).await.unwrap()).await;
    let (status, body) = text(send(&mut tx, get("/")).await.unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let line = w.access_line().await;
    assert_eq!(
        (line["response_code"].as_u64(), line["response_flags"].as_str()),
        (Some(503), Some("UH"))
    );
    assert!(w.metrics_text().lines().any(|l| l.starts_with("istio_requests_total{")
        && l.contains("response_flags=\"UH\"")
        && l.contains("response_code=\"503\"")));
    // A gRPC client reads it as UNAVAILABLE.
    let mut client = testbed::echo::grpc_client(w.connect(&vip(83)).await.unwrap())
        .await
        .unwrap();
    let e = client
        .echo(testbed::echo::pb::EchoRequest {
            message: "x".into(),
            fail_code: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().contains("no healthy upstream"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_policy_applies_to_the_caller_not_the_waypoint() {
    let w = World::with("policy", LimitArgs::default(), |c| {
        c.authorization_policies = serde_yaml_policy();
    })
    .await;
    let mut tx = h1(w.connect(&vip(80)).await.unwrap()).await;
    let (status, body) = text(send(&mut tx, get("/")).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::FORBIDDEN, "RBAC: access denied"));
    assert!(w.seen.lock().unwrap().is_empty(), "nothing reached a pod");
}

/// DENY from the client's service account to the web pods.
fn serde_yaml_policy() -> Vec<cluster::rbac::AuthorizationPolicy> {
    let yaml = "authorizationPolicies:\n  - name: deny-client\n    namespace: default\n    action: DENY\n    rules:\n      - from:\n          - source:\n              principals: [\"cluster.local/ns/default/sa/client\"]\n";
    LocalConfig::parse(std::path::Path::new("p.yaml"), yaml)
        .unwrap()
        .authorization_policies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_declared_and_server_first_protocols_do_not_hang() {
    let limits = LimitArgs {
        sniff_timeout: Duration::from_millis(200),
        ..LimitArgs::default()
    };
    let mut w = World::new("tcp", limits).await;
    // Declared tcp: the bytes go through untouched (the echo happens to
    // speak HTTP, which the waypoint does not parse here).
    let mut t = w.connect(&vip(82)).await.unwrap();
    t.write_all(b"GET /raw HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, t.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("\"path\":\"/raw\"") && !out.contains("x-forwarded-for"),
        "{out}"
    );
    drop(t);
    assert_eq!(w.access_line().await["protocol"], "tcp");
    // Undeclared, and the client waits for the server to speak first: after
    // the sniff timeout it is opaque TCP (the echo then answers the bytes).
    let started = Instant::now();
    let before = w.seen.lock().unwrap().len();
    let mut t = w.connect(&vip(80)).await.unwrap();
    // The event: the waypoint gave up waiting and opened the upstream.
    wait_until("the upstream is opened without client bytes", || {
        w.seen.lock().unwrap().len() > before
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    t.write_all(b"GET /late HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .ok();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, t.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("\"path\":\"/late\"") && !out.contains("x-forwarded-for"),
        "forwarded as opaque bytes: {out}"
    );
    let m = w.metrics_text();
    let opened = m
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .expect(&m);
    assert!(
        opened.contains("reporter=\"waypoint\"")
            && opened.contains("request_protocol=\"tcp\"")
            && !opened.contains("response_code"),
        "Istio's TCP label set: {opened}"
    );
}

/// Sends raw HTTP/1.1 bytes on a fresh CONNECT and reads until the
/// waypoint closes (bounded).
async fn raw_h1(w: &World, authority: &str, bytes: &[u8]) -> String {
    let mut t = w.connect(authority).await.unwrap();
    t.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, t.read_to_end(&mut out))
        .await
        .expect("the waypoint closes the connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_count_and_size_limits() {
    let limits = LimitArgs {
        max_headers: 20,
        max_header_bytes: 8192,
        ..LimitArgs::default()
    };
    let w = World::new("limits", limits).await;
    let many: String = (0..30).map(|i| format!("x-h{i}: v\r\n")).collect();
    let out = raw_h1(
        &w,
        &vip(80),
        format!("GET / HTTP/1.1\r\nhost: web\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 431"), "too many headers (h1): {out}");
    let big = "a".repeat(10_000);
    let out = raw_h1(
        &w,
        &vip(80),
        format!("GET / HTTP/1.1\r\nhost: web\r\nx-big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 431"), "header block too large (h1): {out}");
    // Within the limits it works.
    let out = raw_h1(
        &w,
        &vip(80),
        b"GET /ok HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");

    let mut tx = h2(w.connect(&vip(80)).await.unwrap()).await;
    let mut req = Request::get("http://web/").body(Full::default()).unwrap();
    for i in 0..30 {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
            "v".parse().unwrap(),
        );
    }
    assert_eq!(
        send(&mut tx, req).await.unwrap().status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "too many headers (h2)"
    );
    let mut req = Request::get("http://web/").body(Full::default()).unwrap();
    req.headers_mut().insert("x-big", big.parse().unwrap());
    match send(&mut tx, req).await {
        Ok(r) => assert_eq!(
            r.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "header list too large (h2)"
        ),
        Err(e) => assert!(
            e.to_string().contains("refused") || e.to_string().contains("size") || e.is_closed(),
            "{e}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_smuggling_attempts_are_rejected_and_never_reach_a_pod() {
    let w = World::new("smuggle", LimitArgs::default()).await;
    let attempts: [&[u8]; 4] = [
        // CL.TE: a front end honouring Content-Length would pass "G..." on.
        b"POST / HTTP/1.1\r\nhost: web\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        // TE.CL, the other order.
        b"POST / HTTP/1.1\r\nhost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        // Duplicated Content-Length (same value: hyper alone folds it).
        b"POST / HTTP/1.1\r\nhost: web\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        // A list in one header.
        b"POST / HTTP/1.1\r\nhost: web\r\nContent-Length: 5, 5\r\n\r\nhello",
    ];
    for a in attempts {
        let out = raw_h1(&w, &vip(80), a).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{}: {out}", String::from_utf8_lossy(a));
        assert!(out.to_ascii_lowercase().contains("connection: close"), "{out}");
    }
    // Conflicting lengths: hyper rejects them itself.
    let out = raw_h1(
        &w,
        &vip(80),
        b"POST / HTTP/1.1\r\nhost: web\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(w.seen.lock().unwrap().is_empty(), "no attempt reached a pod");
    // A smuggled second request after a good first one on the same
    // connection: the first is served, the second rejected.
    let out = raw_h1(
        &w,
        &vip(80),
        b"POST /first HTTP/1.1\r\nhost: web\r\nContent-Length: 2\r\n\r\nokPOST /second HTTP/1.1\r\nhost: web\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("\"path\":\"/first\""),
        "{out}"
    );
    assert!(
        out.contains("HTTP/1.1 400") && !out.contains("\"path\":\"/second\""),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_and_idle_connections_are_timed_out() {
    let limits = LimitArgs {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(400),
        ..LimitArgs::default()
    };
    let w = World::new("slow", limits).await;
    // Headers that never finish.
    let started = Instant::now();
    let mut t = w.connect(&vip(81)).await.unwrap();
    t.write_all(b"GET / HTTP/1.1\r\nhost: web\r\nx-a: ").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, t.read_to_end(&mut out))
        .await
        .expect("closed by the header-read timeout")
        .ok();
    assert!(started.elapsed() >= Duration::from_millis(300));
    // An idle h2 connection (no requests in flight) is closed: GOAWAY.
    let t = w.connect(&vip(81)).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(t))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let (status, _) = json(
        send(&mut tx, Request::get("http://web/").body(Full::default()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    // A request longer than the idle timeout is not cut: it is in flight.
    let slow = Request::get("http://web/slow?delay=600").body(Full::default()).unwrap();
    let (status, _) = json(send(&mut tx, slow).await.unwrap()).await;
    assert_eq!(status, 200, "in-flight requests keep the connection");
    let started = Instant::now();
    tokio::time::timeout(WAIT, conn)
        .await
        .expect("the idle connection is closed")
        .unwrap()
        .ok();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

async fn read_frame(t: &mut Tunnel) -> Option<(u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    t.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    t.read_exact(&mut payload).await.ok()?;
    Some((
        head[3],
        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_announces_its_stream_limit_and_a_rapid_reset_flood_gets_goaway() {
    let w = World::new("reset", LimitArgs::default()).await;
    let mut t = w.connect(&vip(81)).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    t.write_all(&out).await.unwrap();
    let (kind, _, settings) = tokio::time::timeout(WAIT, read_frame(&mut t)).await.unwrap().unwrap();
    assert_eq!(kind, 4, "SETTINGS first");
    let max_streams = settings
        .chunks(6)
        .find(|s| u16::from_be_bytes([s[0], s[1]]) == 3)
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
    assert_eq!(max_streams, Some(100), "SETTINGS_MAX_CONCURRENT_STREAMS");
    // GET / (static table: :method GET, :scheme http, :path /), each
    // stream reset right away; 1000 pairs in one write.
    let mut flood = frame(4, 1, 0, &[]);
    for i in 0..1000u32 {
        let id = 1 + 2 * i;
        flood.extend(frame(1, 0x5, id, &[0x82, 0x86, 0x84]));
        flood.extend(frame(3, 0, id, &8u32.to_be_bytes()));
    }
    t.write_all(&flood).await.ok();
    let goaway = tokio::time::timeout(WAIT, async {
        while let Some((kind, _, payload)) = read_frame(&mut t).await {
            if kind == 7 {
                return Some(u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]));
            }
        }
        None
    })
    .await
    .expect("bounded");
    assert_eq!(goaway, Some(0xb), "GOAWAY ENHANCE_YOUR_CALM");
    let served = w.seen.lock().unwrap().len();
    assert!(served < 100, "the flood was cut short ({served} requests reached pods)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_in_flight_requests_finish_then_stops() {
    let w = World::new("drain", LimitArgs::default()).await;
    let mut slow = h1(w.connect(&vip(80)).await.unwrap()).await;
    let mut idle = h2(w.connect(&vip(81)).await.unwrap()).await;
    assert_eq!(
        json(
            send(&mut idle, Request::get("http://web/").body(Full::default()).unwrap())
                .await
                .unwrap()
        )
        .await
        .0,
        200
    );
    let in_flight = tokio::spawn(async move { json(send(&mut slow, get("/slow?delay=500")).await.unwrap()).await });
    wait_until("the slow request reaches a pod", || w.seen.lock().unwrap().len() == 2).await;
    let drained = tokio::spawn({
        let wp = w.wp.clone();
        async move { wp.shutdown(WAIT).await }
    });
    let (status, e) = in_flight.await.unwrap();
    assert_eq!(
        (status, e.path.as_str()),
        (StatusCode::OK, "/slow"),
        "the in-flight request finished"
    );
    assert!(
        drained.await.unwrap(),
        "every connection closed within the drain timeout"
    );
    assert!(
        TcpStream::connect(w.addr).await.is_err(),
        "no new connections after the drain"
    );
}

/// The series and labels Istio's Grafana dashboards (Mesh, Service,
/// Workload) and Kiali's graph and metrics pages query.
const GOLDEN_LABELS: &[&str] = &[
    "connection_security_policy",
    "destination_app",
    "destination_canonical_revision",
    "destination_canonical_service",
    "destination_cluster",
    "destination_principal",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_version",
    "destination_workload",
    "destination_workload_namespace",
    "grpc_response_status",
    "reporter",
    "request_protocol",
    "response_code",
    "response_flags",
    "source_app",
    "source_canonical_revision",
    "source_canonical_service",
    "source_cluster",
    "source_principal",
    "source_version",
    "source_workload",
    "source_workload_namespace",
];
const GOLDEN_SERIES: &[&str] = &[
    "istio_request_bytes_bucket",
    "istio_request_bytes_count",
    "istio_request_bytes_sum",
    "istio_request_duration_milliseconds_bucket",
    "istio_request_duration_milliseconds_count",
    "istio_request_duration_milliseconds_sum",
    "istio_requests_total",
    "istio_response_bytes_bucket",
    "istio_response_bytes_count",
    "istio_response_bytes_sum",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_golden_series_labels_buckets_and_access_log() {
    let mut w = World::new("golden", LimitArgs::default()).await;
    let mut tx = h1(w.connect(&vip(80)).await.unwrap()).await;
    let req = Request::post("/upload?x=1")
        .header("host", "web.default.svc.cluster.local")
        .header("user-agent", "golden/1")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .body(Full::new(Bytes::from_static(b"0123456789")))
        .unwrap();
    let (status, body) = text(send(&mut tx, req).await.unwrap()).await;
    assert_eq!(status, 200);
    let m = w.metrics_text();
    let mut series = std::collections::BTreeSet::new();
    for line in m
        .lines()
        .filter(|l| l.starts_with("istio_") && !l.starts_with("istio_tcp"))
    {
        let (name, rest) = line.split_once('{').unwrap();
        series.insert(name.to_string());
        let labels: std::collections::BTreeSet<&str> = rest
            .split("\",")
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim_start_matches(',')))
            .filter(|k| *k != "le")
            .collect();
        assert_eq!(labels, GOLDEN_LABELS.iter().copied().collect(), "{line}");
        assert!(
            line.contains("reporter=\"waypoint\"")
                && line.contains("response_code=\"200\"")
                && line.contains("destination_service=\"web.default.svc.cluster.local\""),
            "{line}"
        );
    }
    assert_eq!(series, GOLDEN_SERIES.iter().map(|s| s.to_string()).collect(), "{m}");
    let les: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("istio_request_duration_milliseconds_bucket"))
        .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(les.len(), 20, "Envoy's 19 default buckets and +Inf: {les:?}");
    assert_eq!((les[0], les[18]), ("0.5", "3600000.0"));
    let req_bytes = m.lines().find(|l| l.starts_with("istio_request_bytes_sum")).unwrap();
    assert!(req_bytes.ends_with(" 10.0"), "{req_bytes}");
    let resp_bytes = m.lines().find(|l| l.starts_with("istio_response_bytes_sum")).unwrap();
    assert!(resp_bytes.ends_with(&format!(" {}.0", body.len())), "{resp_bytes}");

    let line = w.access_line().await;
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/upload?x=1");
    assert_eq!(line["response_code"], 200);
    assert_eq!(line["response_flags"], "-");
    assert_eq!(line["bytes_received"], 10);
    assert_eq!(line["bytes_sent"].as_u64(), Some(body.len() as u64));
    assert_eq!(line["user_agent"], "golden/1");
    assert_eq!(line["source_principal"], CLIENT);
    assert_eq!(line["destination_service"], "web.default.svc.cluster.local");
    assert_eq!(line["connect_authority"], vip(80));
    assert!(line["upstream_host"].as_str().unwrap().ends_with(":8080"), "{line}");
    assert!(line["destination_principal"]
        .as_str()
        .unwrap()
        .starts_with("spiffe://cluster.local/ns/default/sa/web-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_until_one_closes() {
    let limits = LimitArgs {
        max_connections: 1,
        ..LimitArgs::default()
    };
    let w = World::new("cap", limits).await;
    let first = w.connect(&vip(80)).await.unwrap();
    let second = tokio::spawn({
        let (cfg, addr) = (
            tls::client_config(&w.pki.cert(CLIENT), &w.pki.roots, vec![WAYPOINT.parse().unwrap()]).unwrap(),
            w.addr,
        );
        async move {
            let headers = ConnectHeaders {
                authority: vip(80).parse().unwrap(),
                client: format!("{CLIENT_IP}:40001").parse().unwrap(),
                baggage: String::new(),
            };
            hbone::connect(TcpStream::connect(addr).await.unwrap(), cfg, &headers).await
        }
    });
    // The second is not served while the first holds the only slot (its
    // TLS handshake waits in the accept queue).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "a second connection was served over the cap");
    drop(first);
    let t = tokio::time::timeout(WAIT, second)
        .await
        .expect("served once the first closed")
        .unwrap();
    assert!(t.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_addressed_requests_go_to_that_pod_and_upstream_statuses_pass_through() {
    let mut w = World::new("pod", LimitArgs::default()).await;
    let mut tx = h1(w.connect(&format!("127.0.0.3:{TARGET}")).await.unwrap()).await;
    for _ in 0..3 {
        let (status, e) = json(send(&mut tx, get("/")).await.unwrap()).await;
        assert_eq!((status, e.pod.as_str()), (StatusCode::OK, "web-b"));
        let line = w.access_line().await;
        assert_eq!(line["destination_service"], "");
    }
    // The echo's /status/NNN comes back as it is, with no response flag
    // (the waypoint did not fail). A 503 is retried twice (Istio's default
    // policy, there being no route), then passed through as it is.
    let (status, _) = text(send(&mut tx, get("/status/418")).await.unwrap()).await;
    assert_eq!(status, StatusCode::IM_A_TEAPOT);
    let mut codes = Vec::new();
    for _ in 0..2 {
        codes.push(
            text(send(&mut tx, get("/?fail=3&key=t")).await.unwrap())
                .await
                .0
                .as_u16(),
        );
        codes.push(w.counters.hits("t") as u16);
    }
    assert_eq!(codes, [503, 3, 200, 4]);
    let m = w.metrics_text();
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("response_code=\"418\"")
            && l.contains("response_flags=\"-\"")
            && l.contains("destination_service=\"unknown\"")
            && l.contains("destination_principal=\"spiffe://cluster.local/ns/default/sa/web-b\"")),
        "{m}"
    );
}

/// The CA lets node1 have the waypoint's identity only.
struct OnlyTheWaypoint;

#[tonic::async_trait]
impl mesh::ca::Authorizer for OnlyTheWaypoint {
    async fn may_impersonate(&self, node: &str, id: &SpiffeId) -> Result<(), String> {
        (node == "node1" && id.to_string() == WAYPOINT)
            .then_some(())
            .ok_or_else(|| format!("{id} is not on {node}"))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on `addr`: the status code, if it answered.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    out.split(' ').nth(1)?.parse().ok()
}

/// The waypoint binary's addresses in a test.
struct Ports {
    listen: SocketAddr,
    metrics: SocketAddr,
    status: SocketAddr,
}

/// `waypoint run` as web-waypoint with node1's credential from `files`,
/// the CA at `ca_addr`, free loopback ports, and `mode` (the source flags).
fn waypoint_command(files: &CaFiles, ca_addr: SocketAddr, mode: &[&std::ffi::OsStr]) -> (std::process::Command, Ports) {
    let port = || format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ports = Ports {
        listen: port(),
        metrics: port(),
        status: port(),
    };
    let (cert, key) = files.node_credential("node1");
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_waypoint"));
    c.args(["run", "--namespace", "default", "--service-account", "web-waypoint"])
        .args(mode)
        .args(["--ca-address", &format!("https://{ca_addr}")])
        .arg("--ca-root")
        .arg(files.root_cert())
        .arg("--node-cert")
        .arg(cert)
        .arg("--node-key")
        .arg(key)
        .args([
            "--listen",
            &ports.listen.to_string(),
            "--metrics-addr",
            &ports.metrics.to_string(),
        ])
        .args(["--readiness-addr", &ports.status.to_string()]);
    (c, ports)
}

/// Removes a test's directory however the test ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills the child however the test ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_gets_its_identity_from_the_ca_serves_hbone_and_drains_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("waypoint-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _remove = RemoveOnDrop(dir.clone());
    let files = CaFiles::new(&dir.join("ca"));
    files.init(TD, &["node1".into()]).unwrap();
    let ca_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (stop_ca, ca_stopped) = tokio::sync::oneshot::channel::<()>();
    let ca = tokio::spawn({
        let files = CaFiles::new(&dir.join("ca"));
        async move {
            mesh::ca::serve(&files, ca_addr, OnlyTheWaypoint, Duration::from_secs(3600), async {
                let _ = ca_stopped.await;
            })
            .await
        }
    });
    let enrolment = dir.join("mesh.yaml");
    std::fs::write(
        &enrolment,
        "pods:\n  - {name: web-a, namespace: default, serviceAccount: web, node: node1, ips: [\"10.1.1.2\"], labels: {app: web}}\nservices:\n  - {name: web, namespace: default, vips: [\"10.96.0.10\"], ports: [{port: 80, targetPort: 8080, appProtocol: http}], selector: {app: web}}\n",
    )
    .unwrap();
    let (
        mut cmd,
        Ports {
            listen,
            metrics,
            status,
        },
    ) = waypoint_command(&files, ca_addr, &["--config".as_ref(), enrolment.as_os_str()]);
    let child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut child = Child(child);
    // Ready once the CA gave it its certificate.
    let deadline = Instant::now() + WAIT;
    while http_status(metrics, "/healthz/ready").await != Some(200) {
        assert!(Instant::now() < deadline, "the waypoint never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It speaks HBONE with the CA-issued identity; an unknown authority is 503.
    let roots = Roots::from_pem(&std::fs::read_to_string(files.root_cert()).unwrap()).unwrap();
    let client_id: SpiffeId = CLIENT.parse().unwrap();
    let signer = Signer::load(&files, Duration::from_secs(3600)).unwrap();
    let (k, csr) = new_csr(&client_id).unwrap();
    // The client's certificate from the same root.
    let chain = signer.sign(&csr, &client_id, Duration::from_secs(600)).unwrap();
    let client_cert = WorkloadCert::new(client_id.clone(), chain, k).unwrap();
    let cfg = tls::client_config(&client_cert, &roots, vec![WAYPOINT.parse().unwrap()]).unwrap();
    let headers = ConnectHeaders {
        authority: "10.96.9.9:80".parse().unwrap(),
        client: format!("{CLIENT_IP}:40000").parse().unwrap(),
        baggage: String::new(),
    };
    let e = hbone::connect(TcpStream::connect(listen).await.unwrap(), cfg, &headers)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(e, HboneError::Status { status, .. } if status == StatusCode::SERVICE_UNAVAILABLE),
        "{e}"
    );
    assert_eq!(http_status(metrics, "/metrics").await, Some(200));
    // The status port (what the kubelet probes) serves readiness only.
    assert_eq!(http_status(status, "/healthz/ready").await, Some(200));
    assert_eq!(http_status(status, "/metrics").await, Some(404));
    // SIGTERM: drains and exits 0.
    let pid = child.0.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || {
        let s = child.0.wait();
        let mut log = String::new();
        if let Some(mut e) = child.0.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut log).unwrap();
        }
        (s, log)
    });
    let (s, log) = tokio::time::timeout(WAIT, status)
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(s.unwrap().success(), "{log}");
    assert!(log.contains("waypoint starting") && log.contains("drained"), "{log}");
    let _ = stop_ca.send(());
    let _ = ca.await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `waypoint run --kubernetes`: the model comes from the API (the stand-in
/// API server) through the agents' translation (`cluster::kube`): not ready
/// until it has listed everything, then a request to the Service's VIP
/// reaches the pod its EndpointSlice names.
/// The routes file of the binary tests (applied unchanged to the API).
const ROUTES: &str = include_str!("routes.yaml");

/// The routes file's documents as the API objects `kubectl apply` makes.
fn route_objects(yaml: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// Asks through the waypoint until `path` is routed as `routes.yaml` says
/// (the routes may still be loading), then checks what the pod saw.
async fn routed_as_the_file_says(listen: SocketAddr, roots: &Roots, pki: &Pki) {
    let cfg = tls::client_config(&pki.cert(CLIENT), roots, vec![WAYPOINT.parse().unwrap()]).unwrap();
    for (vip, path, want_path, by) in [
        (VIP, "/api/users", "/v1/users", "httproute"),
        ("10.96.0.30", "/old/thing", "/new/thing", "virtualservice"),
    ] {
        let headers = ConnectHeaders {
            authority: format!("{vip}:80").parse().unwrap(),
            client: format!("{CLIENT_IP}:40000").parse().unwrap(),
            baggage: String::new(),
        };
        let t = hbone::connect(TcpStream::connect(listen).await.unwrap(), cfg.clone(), &headers)
            .await
            .expect("the VIP is known");
        let mut tx = h1(t).await;
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, e) = json(send(&mut tx, get(path)).await.unwrap()).await;
            assert_eq!(status, StatusCode::OK);
            if e.path == want_path {
                assert_eq!((e.pod.as_str(), e.header("x-routed-by")), ("web", Some(by)));
                break;
            }
            assert!(Instant::now() < deadline, "{path} never routed: the pod saw {e:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A metric's value from the waypoint's metrics endpoint.
async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
}

async fn wait_metric(addr: SocketAddr, name: &str, want: f64) {
    let deadline = Instant::now() + WAIT;
    while metric(addr, name).await != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{name} never became {want}: {:?}",
            metric(addr, name).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The binary with one routes file, twice: as `--routes` beside the
/// enrolment file, then applied to the stand-in API server under
/// `--kubernetes`. Both route the same way; in both a broken edit keeps
/// the last good routes; on the API it asks for exactly what the
/// waypoints' ClusterRole grants.
#[test]
fn the_binary_routes_by_one_routes_file_locally_and_through_the_api() {
    in_netns(|| async {
        one_routes_file().await;
    });
}

async fn one_routes_file() {
    let dir = std::env::temp_dir().join(format!("waypoint-routes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _remove = RemoveOnDrop(dir.clone());
    let files = CaFiles::new(&dir.join("ca"));
    files.init(TD, &["node1".into()]).unwrap();
    let pki = Pki {
        signer: Signer::load(&files, Duration::from_secs(3600)).unwrap(),
        roots: Roots::from_pem(&std::fs::read_to_string(files.root_cert()).unwrap()).unwrap(),
        dir: dir.join("pki"),
    };
    let ca_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ca = tokio::spawn({
        let files = CaFiles::new(&dir.join("ca"));
        async move {
            mesh::ca::serve(
                &files,
                ca_addr,
                OnlyTheWaypoint,
                Duration::from_secs(3600),
                std::future::pending(),
            )
            .await
        }
    });
    let _stop_ca = AbortOnDrop(ca);
    // Pod web-a (sa web) at 10.1.1.2 (on this namespace's loopback)
    // behind Services web and web-v.
    let added = std::process::Command::new("ip")
        .args(["addr", "add", "10.1.1.2/32", "dev", "lo"])
        .status()
        .unwrap();
    assert!(added.success());
    let seen = Seen::default();
    let pod_port = pod(&pki, "10.1.1.2".parse().unwrap(), 0, "web", seen.clone())
        .await
        .unwrap();
    let waypoint = |mode: &[&std::ffi::OsStr]| {
        let (mut cmd, p) = waypoint_command(&files, ca_addr, mode);
        let child = cmd
            .args(["--upstream-hbone-port", &pod_port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        (Child(child), p.listen, p.metrics)
    };
    let ready = async |metrics: SocketAddr| {
        let deadline = Instant::now() + WAIT;
        while http_status(metrics, "/healthz/ready").await != Some(200) {
            assert!(Instant::now() < deadline, "the waypoint never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // A broken edit: the VirtualService's rewrite becomes invalid.
    let broken = ROUTES.replace(
        "rewrite: {uri: /new}",
        "rewrite: {uri: /new, uriRegexRewrite: {match: a, rewrite: b}}",
    );
    assert_ne!(broken, ROUTES);

    // 1. Locally: the enrolment file and the routes file.
    let enrolment = dir.join("mesh.yaml");
    std::fs::write(
        &enrolment,
        "pods:\n  - {name: web-a, namespace: default, serviceAccount: web, node: node1, ips: [\"10.1.1.2\"], labels: {app: web}}\nservices:\n  - {name: web, namespace: default, vips: [\"10.96.0.10\"], ports: [{port: 80, targetPort: 8080, appProtocol: http}], selector: {app: web}}\n  - {name: web-v, namespace: default, vips: [\"10.96.0.30\"], ports: [{port: 80, targetPort: 8080, appProtocol: http}], selector: {app: web}}\n",
    )
    .unwrap();
    let routes = dir.join("routes.yaml");
    std::fs::write(&routes, ROUTES).unwrap();
    {
        let (_child, listen, metrics) = waypoint(&[
            "--config".as_ref(),
            enrolment.as_os_str(),
            "--routes".as_ref(),
            routes.as_os_str(),
        ]);
        ready(metrics).await;
        routed_as_the_file_says(listen, &pki.roots, &pki).await;
        assert_eq!(metric(metrics, "waypoint_route_objects").await, Some(2.0));
        std::fs::write(&routes, &broken).unwrap();
        wait_metric(metrics, "waypoint_route_objects_rejected", 1.0).await;
        routed_as_the_file_says(listen, &pki.roots, &pki).await;
    }

    // 2. On Kubernetes: the same documents applied to the API.
    let api = testbed::apiserver::ApiServer::on_loopback().unwrap();
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, "waypoint-token").unwrap();
    let mut objects = vec![
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-a", "namespace": "default", "uid": "u-web-a", "labels": {"app": "web"}},
            "spec": {"nodeName": "node1", "serviceAccountName": "web", "containers": [{"name": "web", "image": "web"}]},
            "status": {"phase": "Running", "podIP": "10.1.1.2", "podIPs": [{"ip": "10.1.1.2"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}}),
    ];
    for (name, vip) in [("web", VIP), ("web-v", "10.96.0.30")] {
        objects.push(serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": TARGET, "protocol": "TCP"}]}}));
        objects.push(serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "default", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.1.2"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "web-a", "namespace": "default"}}],
            "ports": [{"name": "http", "port": TARGET, "protocol": "TCP"}]}));
    }
    objects.extend(route_objects(ROUTES));
    for obj in &objects {
        api.apply(obj).unwrap();
    }
    let (_child, listen, metrics) =
        waypoint(&["--kubernetes".as_ref(), "--kubeconfig".as_ref(), kubeconfig.as_os_str()]);
    ready(metrics).await;
    routed_as_the_file_says(listen, &pki.roots, &pki).await;
    assert_eq!(
        seen.lock().unwrap().last().cloned(),
        Some((format!("10.1.1.2:{TARGET}").parse().unwrap(), WAYPOINT.to_string()))
    );
    for obj in route_objects(&broken) {
        api.apply(&obj).unwrap();
    }
    wait_metric(metrics, "waypoint_route_objects_rejected", 1.0).await;
    routed_as_the_file_says(listen, &pki.roots, &pki).await;
    // It asked for exactly what the waypoints' ClusterRole grants.
    let role = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/waypoint-controller.yaml"
    ))
    .unwrap();
    let granted: BTreeSet<(String, String, String)> = serde_yaml::Deserializer::from_str(&role)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "ambient-mesh-waypoint")
        .flat_map(|d| d["rules"].as_sequence().unwrap().clone())
        .flat_map(|r| {
            let strs = |k: &str| {
                r[k].as_sequence()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            };
            let (gs, rs, vs) = (strs("apiGroups"), strs("resources"), strs("verbs"));
            let mut out = Vec::new();
            for g in &gs {
                for r in &rs {
                    for v in &vs {
                        out.push((g.clone(), r.clone(), v.clone()));
                    }
                }
            }
            out
        })
        .collect();
    assert_eq!(api.verbs_seen_by("waypoint-token"), granted);
}

/// Aborts a task however the test ends.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_reuse_the_upstream_connection() {
    let w = World::new("reuse", LimitArgs::default()).await;
    let connects = || {
        w.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(a, _)| a.ip().to_string() == "127.0.0.3")
            .count()
    };
    for (h2, before) in [(false, 0), (true, 1)] {
        let t = w.connect(&format!("127.0.0.3:{TARGET}")).await.unwrap();
        let mut c = if h2 {
            Client::H2(self::h2(t).await)
        } else {
            Client::H1(h1(t).await)
        };
        for _ in 0..10 {
            let (status, e) = json(c.send(get("/")).await).await;
            assert_eq!((status, e.pod.as_str()), (StatusCode::OK, "web-b"));
        }
        // One CONNECT (one upstream HTTP connection) for ten requests.
        assert_eq!(connects(), before + 1, "{}", c.name());
    }
}
