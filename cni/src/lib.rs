//! `mesh-cni`: the chained CNI plugin that tells the node's mesh agent about pod sandboxes.
//!
//! The library part is only [`proto`], the wire protocol between the plugin (client) and the
//! agent (server), so both sides share one definition. The plugin and its installer live in the
//! `mesh-cni` binary.

pub mod proto;
