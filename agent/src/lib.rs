//! The per-node mesh agent (our ztunnel): eBPF in-pod capture, HBONE mTLS
//! with SPIFFE identities, L4 policy and Istio metrics. `main.rs` parses the
//! command line (`cli`); `app` wires the pieces.
pub mod admin;
pub mod app;
pub mod ca;
pub mod capture;
pub mod cli;
pub mod config;
pub mod discover;
pub mod inpod;
pub mod k8s;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod rtnl;

// Shared with the waypoint: the cluster model and workload certificates.
pub use cluster::{cidr, rbac, state};
pub use mesh::certs as identity;
