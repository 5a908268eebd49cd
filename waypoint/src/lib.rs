//! The waypoint: an L7 proxy in front of the workloads bound to it. It
//! terminates HBONE from the agents (`:authority` = the original service
//! VIP:port or pod IP:port, TLS peer = the caller), proxies HTTP/1.1 and
//! h2 (gRPC included) request by request, or opaque TCP, and reaches the
//! chosen endpoint over its own pooled HBONE with its own identity.
//!
//! One module per concern: `config` (flags), `app` (wiring, runtimes,
//! signals), `inbound` (HBONE termination, per-CONNECT dispatch), `sniff`
//! (protocol detection), `route` (authority -> destination -> endpoint),
//! `routes` (the routing rules in force, from a file or the API), `http`
//! (the per-request proxy: rules, retries, timeouts, faults, mirrors, and
//! its hardening), `smuggling` (the
//! HTTP/1.1 framing guard), `upstream` (HBONE to endpoints), `tcp` (opaque
//! forwarding), `trace` (forwarding headers), `metrics`, `accesslog`,
//! `drain`; and `controller` (`waypoint controller` / `waypoint generate`:
//! Gateways to running waypoints).
pub mod accesslog;
pub mod app;
pub mod config;
pub mod controller;
pub mod drain;
pub mod http;
pub mod inbound;
pub mod metrics;
pub mod route;
pub mod routes;
pub mod smuggling;
pub mod sniff;
pub mod tcp;
pub mod trace;
pub mod upstream;

pub use inbound::{Certs, Waypoint};
