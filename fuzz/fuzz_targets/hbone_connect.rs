//! HBONE CONNECT, both ends of the header contract (mesh::hbone):
//! * server: a request as h2 delivers it (`METHOD target` and header
//!   lines) through `ConnectRequest::parse`, `authority_addr`,
//!   `forwarded_for`;
//! * client: `baggage` and `connect_request` built from the input's header
//!   values (pod labels, names: any text), then read back by the server
//!   side: the authority, `forwarded` and every baggage value survive.
//!
//! Not covered: h2 framing and HPACK (the h2 crate's own fuzzing) and TLS.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use mesh::{
    hbone::{self, ConnectHeaders, ConnectRequest},
    identity::SpiffeId,
};

const BAGGAGE_KEYS: [&str; 5] = [
    "k8s.cluster.name",
    "k8s.namespace.name",
    "k8s.deployment.name",
    "service.name",
    "service.version",
];

fuzz_target!(|data: &[u8]| {
    let peer = SpiffeId::new("cluster.local", "default", "client");
    let remote: SocketAddr = "10.0.0.9:40000".parse().unwrap();
    let server = mesh_fuzz::request(data).and_then(|r| {
        let (parts, ()) = r.into_parts();
        ConnectRequest::parse(peer.clone(), remote, parts).ok()
    });
    if let Some(r) = &server {
        let _ = (r.authority_addr(), r.forwarded_for(), r.forwarded());
    }
    // The client side, from whatever the input holds.
    let values: Vec<String> = data
        .split(|b| *b == b'\n')
        .skip(1)
        .filter_map(mesh_fuzz::header)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .chain(std::iter::repeat(String::new()))
        .take(5)
        .collect();
    let authority = server.as_ref().and_then(ConnectRequest::authority_addr);
    let authority = authority.unwrap_or_else(|| "10.96.0.10:80".parse().unwrap());
    let client_ip: IpAddr = server
        .as_ref()
        .and_then(ConnectRequest::forwarded_for)
        .unwrap_or_else(|| "10.0.0.2".parse().unwrap());
    round_trip(
        &ConnectHeaders {
            authority,
            client: SocketAddr::new(client_ip, 33000),
            baggage: hbone::baggage(&values[0], &values[1], &values[2], &values[3], &values[4]),
        },
        &values,
        peer,
        remote,
    );
});

/// What the client sends, the server reads back.
fn round_trip(h: &ConnectHeaders, values: &[String], peer: SpiffeId, remote: SocketAddr) {
    let req = hbone::connect_request(h).unwrap_or_else(|e| panic!("our own CONNECT for {h:?} is invalid: {e}"));
    let (parts, ()) = req.into_parts();
    let got = ConnectRequest::parse(peer, remote, parts).expect("a CONNECT");
    assert_eq!(got.authority_addr(), Some(h.authority), "{got:?}");
    assert_eq!(got.forwarded_for(), Some(h.client.ip()), "{got:?}");
    let baggage = got
        .headers
        .get("baggage")
        .expect("baggage sent")
        .to_str()
        .expect("ASCII");
    assert_eq!(baggage, h.baggage);
    let members: Vec<&str> = baggage.split(',').collect();
    assert_eq!(members.len(), BAGGAGE_KEYS.len(), "members of {baggage:?}");
    for ((member, key), value) in members.iter().zip(BAGGAGE_KEYS).zip(values) {
        let (k, v) = member.split_once('=').expect("key=value");
        assert_eq!(k, key);
        let decoded = percent_encoding::percent_decode_str(v).decode_utf8().expect("UTF-8");
        assert_eq!(&decoded, value, "{member}");
    }
}
