//! Istio's four TCP metrics, one implementation for the agent and the
//! waypoint (each with its own label set):
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total` (response direction, server -> client) and
//! `istio_tcp_received_bytes_total` (request direction, client -> server).
use std::{fmt::Debug, hash::Hash};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

#[derive(Clone, Debug)]
pub struct IstioTcp<L: Clone + Hash + Eq> {
    opened: Family<L, Counter>,
    closed: Family<L, Counter>,
    sent: Family<L, Counter>,
    received: Family<L, Counter>,
}

impl<L: Clone + Hash + Eq> Default for IstioTcp<L> {
    fn default() -> Self {
        Self {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
        }
    }
}

impl<L> IstioTcp<L>
where
    L: Clone + Hash + Eq + Debug + EncodeLabelSet + Send + Sync + 'static,
{
    /// Registers under `istio_` (the registry adds `_total` to counters).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("tcp_connections_opened", "TCP connections opened", m.opened.clone());
        istio.register("tcp_connections_closed", "TCP connections closed", m.closed.clone());
        istio.register(
            "tcp_sent_bytes",
            "Bytes sent during response (server to client)",
            m.sent.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Bytes received during request (client to server)",
            m.received.clone(),
        );
        m
    }

    pub fn opened(&self, l: &L) {
        self.opened.get_or_create(l).inc();
    }

    /// `request_bytes` client -> server, `response_bytes` server -> client.
    pub fn closed(&self, l: &L, request_bytes: u64, response_bytes: u64) {
        self.closed.get_or_create(l).inc();
        self.received.get_or_create(l).inc_by(request_bytes);
        self.sent.get_or_create(l).inc_by(response_bytes);
    }
}
