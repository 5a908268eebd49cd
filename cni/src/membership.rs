//! Who belongs in the mesh: one rule for the agent's model and for the CNI
//! plugin when it must decide without the agent (Istio ambient's rule, as
//! ztunnel and istio-cni apply it).
//!
//! A pod is in the mesh when its `istio.io/dataplane-mode` label is
//! `ambient`, or its namespace's is and the pod's is not `none`; never when
//! it uses the host network, has finished, or is a waypoint's pod (waypoints
//! terminate HBONE themselves; capturing them would loop). (The agent also
//! never enrolls its own pod; the plugin never sees it, its namespace being
//! excluded.)
use std::collections::BTreeMap;

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// Why a pod is or is not captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Ambient,
    NotLabelled,
    OptedOut,
    HostNetwork,
    Finished,
    /// A pod of a waypoint (its Gateway's gateway-name label).
    Waypoint,
}

/// What the rule reads of a pod.
#[derive(Debug, Clone, Copy, Default)]
pub struct PodFacts<'a> {
    pub labels: Option<&'a BTreeMap<String, String>>,
    pub host_network: bool,
    /// Its containers all ended ([`finished`] of `status.phase`).
    pub finished: bool,
    /// The pod carries the gateway-name label of a waypoint Gateway (only
    /// the agent, which watches Gateways, can tell; the waypoint controller
    /// also labels them `istio.io/dataplane-mode=none`).
    pub waypoint: bool,
}

/// Whether a namespace with these labels is enrolled.
pub fn namespace_is_ambient(labels: &BTreeMap<String, String>) -> bool {
    labels.get(DATAPLANE_MODE).map(String::as_str) == Some("ambient")
}

/// A pod whose containers all ended (its IP may already be reused).
pub fn finished(phase: Option<&str>) -> bool {
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// Whether the pod belongs in the mesh, its namespace's labels given.
pub fn membership(pod: PodFacts, ns_labels: Option<&BTreeMap<String, String>>) -> Membership {
    if pod.host_network {
        return Membership::HostNetwork;
    }
    if pod.finished {
        return Membership::Finished;
    }
    if pod.waypoint {
        return Membership::Waypoint;
    }
    match pod.labels.and_then(|l| l.get(DATAPLANE_MODE)).map(String::as_str) {
        Some("none") => Membership::OptedOut,
        Some("ambient") => Membership::Ambient,
        _ if ns_labels.is_some_and(namespace_is_ambient) => Membership::Ambient,
        _ => Membership::NotLabelled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(mode: Option<&str>) -> BTreeMap<String, String> {
        mode.map(|m| (DATAPLANE_MODE.to_string(), m.to_string()))
            .into_iter()
            .collect()
    }

    #[test]
    fn pod_label_wins_over_the_namespace() {
        let (ambient, none, plain) = (labels(Some("ambient")), labels(Some("none")), labels(None));
        let pod = |l| PodFacts {
            labels: Some(l),
            ..Default::default()
        };
        assert_eq!(membership(pod(&ambient), Some(&plain)), Membership::Ambient);
        assert_eq!(membership(pod(&ambient), None), Membership::Ambient);
        assert_eq!(membership(pod(&none), Some(&ambient)), Membership::OptedOut);
        assert_eq!(membership(pod(&plain), Some(&ambient)), Membership::Ambient);
        assert_eq!(membership(pod(&plain), Some(&plain)), Membership::NotLabelled);
        assert_eq!(membership(PodFacts::default(), None), Membership::NotLabelled);
    }

    #[test]
    fn host_network_and_finished_pods_are_never_in() {
        let ambient = labels(Some("ambient"));
        let facts = PodFacts {
            labels: Some(&ambient),
            host_network: true,
            ..Default::default()
        };
        assert_eq!(membership(facts, Some(&ambient)), Membership::HostNetwork);
        for phase in ["Succeeded", "Failed"] {
            let facts = PodFacts {
                labels: Some(&ambient),
                finished: finished(Some(phase)),
                ..Default::default()
            };
            assert_eq!(membership(facts, Some(&ambient)), Membership::Finished);
        }
        for phase in [None, Some("Pending"), Some("Running"), Some("Unknown")] {
            assert!(!finished(phase), "{phase:?}");
        }
    }

    #[test]
    fn waypoint_pods_are_never_in_even_when_labelled_ambient() {
        let ambient = labels(Some("ambient"));
        let facts = PodFacts {
            labels: Some(&ambient),
            waypoint: true,
            ..Default::default()
        };
        assert_eq!(membership(facts, Some(&ambient)), Membership::Waypoint);
    }
}
