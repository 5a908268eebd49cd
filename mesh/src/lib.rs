//! Shared by the agent and the waypoint, one implementation each: mesh
//! identity (SPIFFE IDs, workload keys and certificates) and the mesh CA
//! speaking Istio's certificate API. TLS and HBONE join here next.
pub mod ca;
pub mod identity;
