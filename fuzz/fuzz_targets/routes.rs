//! Routing rules (`cluster::routes`): HTTPRoute, VirtualService and
//! DestinationRule documents (`Document::parse_all`, the store's
//! translation and table), then route matching (`RouteTable::lookup`) and
//! the path rewrite of the rule found, for the request after a line
//! `=== request` (`METHOD target` and header lines; a few fixed requests
//! when there is none). Reapplying the same documents changes nothing.
#![no_main]

use cluster::routes::{
    qualify, rewrite_path,
    store::{Kind, Outcome},
    Action, Document, Lookup, RequestView, RouteStore,
};
use libfuzzer_sys::fuzz_target;

const FIXED: [&[u8]; 3] = [
    b"GET /api/x?a=1\nhost: web\nx-user: alice",
    b"POST /old/y\nhost: web-v.default.svc.cluster.local:8080\ncontent-type: application/grpc",
    b"GET /\nhost: other",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (yaml, request) = mesh_fuzz::split_at_line(text, "=== request");
    let Ok(mut docs) = Document::parse_all(yaml) else {
        return;
    };
    // One version per object (a file naming one twice is two versions).
    let mut keys = std::collections::HashSet::new();
    docs.reverse();
    docs.retain(|d| d.key().ok().flatten().is_none_or(|k| keys.insert(k)));
    docs.reverse();
    let mut store = RouteStore::new(Some(("default".into(), "waypoint".into())));
    store.replace(&Kind::ALL, docs.clone());
    for o in store.replace(&Kind::ALL, docs.clone()) {
        assert!(matches!(o, Outcome::Invalid(_)), "the same documents again: {o}");
    }
    let (table, _conflicts) = store.table();
    let hosts: Vec<String> = docs
        .iter()
        .map(|d| qualify(&d.metadata.name, d.metadata.namespace.as_deref().unwrap_or("default")))
        .chain(["web.default.svc.cluster.local".to_string()])
        .collect();
    let requests: Vec<http::Request<()>> = match request {
        Some(r) => mesh_fuzz::request(r.as_bytes()).into_iter().collect(),
        None => FIXED.iter().filter_map(|r| mesh_fuzz::request(r)).collect(),
    };
    for req in &requests {
        let authority = req
            .headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let view = RequestView {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            authority,
            headers: req.headers(),
            port: 80,
        };
        for host in &hosts {
            let Lookup::Found(e) = table.lookup(host, &view) else {
                continue;
            };
            let prefix = e.m.path.as_ref().and_then(|p| p.prefix());
            if let Action::Forward { rewrite, .. } = &e.rule.action {
                if let Some(rw) = &rewrite.path {
                    let _ = rewrite_path(rw, req.uri().path(), prefix);
                }
            }
        }
    }
});
