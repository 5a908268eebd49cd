//! Shared by the agent and the waypoint, one implementation each: mesh
//! identity (SPIFFE IDs, workload keys and certificates), the mesh CA
//! speaking Istio's certificate API, mutual TLS, HBONE, and zero-copy
//! passthrough.
pub mod alloc;
pub mod ca;
pub mod certs;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod pool;
pub mod runtime;
pub mod splice;
pub mod tls;

/// `: cause: cause ...`, every source of `e` (a kernel errno under a BPF
/// error, a TLS alert under tonic's "transport error"): what the operator
/// needs to tell one failure from another.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}
