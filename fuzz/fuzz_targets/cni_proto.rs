//! The CNI plugin <-> agent socket protocol (`mesh_cni::proto`): the
//! agent's reading of a request line and the plugin's reading of a reply
//! line, each round-tripping through its encoding.
//!
//! Not covered: the socket I/O around them (a bounded line read), the
//! agent's handling of a decoded request (it needs the pod store), and the
//! plugin binary's reading of the runtime's input (`CNI_ARGS`, the network
//! configuration: unit-tested in cni/src/plugin.rs, not in the library).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_cni::proto::{decode_reply, decode_request, Reply, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_request(data) {
        let mut line = serde_json::to_vec(&req).expect("a Request serializes");
        line.push(b'\n');
        let again: Request = decode_request(&line).expect("its own line decodes");
        assert_eq!(again, req);
    }
    if let Ok(reply) = decode_reply(data) {
        let line = serde_json::to_vec(&reply).expect("a Reply serializes");
        let again: Reply = decode_reply(&line).expect("its own line decodes");
        assert_eq!(again, reply);
    }
});
