//! The cluster model shared by the agent and the waypoint, one
//! implementation each: the local enrolment file (`config`, polled by
//! `filewatch`), CIDRs, Istio
//! L4 authorization (`rbac`), shared label maps (`labels`) and the snapshot the data paths consult
//! (`state`: workloads, services, endpoints, policies) and waypoint binding
//! (`waypoint`), HTTP routing rules (`routes`: HTTPRoute and VirtualService
//! in one model), and the Kubernetes source that feeds it (`kube`: watches
//! and one incremental translation of the cluster). Nothing node-local
//! (network namespaces, cgroups) is decided here.
pub mod cidr;
pub mod config;
pub mod filewatch;
pub mod kube;
pub mod labels;
pub mod rbac;
pub mod routes;
pub mod state;
pub mod waypoint;
