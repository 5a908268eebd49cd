//! The per-node mesh agent (our ztunnel): eBPF in-pod capture today, HBONE
//! mTLS next. `main.rs` is the command line; `app` wires the pieces.
pub mod admin;
pub mod app;
pub mod ca;
pub mod capture;
pub mod config;
pub mod discover;
pub mod identity;
pub mod inpod;
pub mod k8s;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod rbac;
pub mod rtnl;
pub mod state;
