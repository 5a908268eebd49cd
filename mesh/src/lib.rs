//! Shared by the agent and the waypoint, one implementation each: mesh
//! identity (SPIFFE IDs, workload keys and certificates), the mesh CA
//! speaking Istio's certificate API, mutual TLS, HBONE, and zero-copy
//! passthrough.
pub mod ca;
pub mod hbone;
pub mod identity;
pub mod pool;
pub mod splice;
pub mod tls;
