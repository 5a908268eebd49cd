//! `mesh-cni`: the chained CNI plugin that tells the node's mesh agent about pod sandboxes.
//!
//! The library part is what the plugin and the agent must agree on: [`proto`], the wire
//! protocol between the plugin (client) and the agent (server), and [`membership`], the rule
//! that decides which pods are in the mesh. The plugin and its installer live in the `mesh-cni`
//! binary.

pub mod membership;
pub mod proto;
