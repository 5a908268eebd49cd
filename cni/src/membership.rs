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
    /// Its `istio.io/dataplane-mode` label (the only one the rule reads).
    pub dataplane_mode: Option<&'a str>,
    pub host_network: bool,
    /// Its containers all ended ([`finished`] of `status.phase`).
    pub finished: bool,
    /// The pod carries the gateway-name label of a waypoint Gateway (only
    /// the agent, which watches Gateways, can tell; the waypoint controller
    /// also labels them `istio.io/dataplane-mode=none`).
    pub waypoint: bool,
}

/// A pod whose containers all ended (its IP may already be reused).
pub fn finished(phase: Option<&str>) -> bool {
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// Whether the pod belongs in the mesh, its namespace's
/// `istio.io/dataplane-mode` label given.
pub fn membership(pod: PodFacts, ns_mode: Option<&str>) -> Membership {
    if pod.host_network {
        return Membership::HostNetwork;
    }
    if pod.finished {
        return Membership::Finished;
    }
    if pod.waypoint {
        return Membership::Waypoint;
    }
    match pod.dataplane_mode {
        Some("none") => Membership::OptedOut,
        Some("ambient") => Membership::Ambient,
        _ if ns_mode == Some("ambient") => Membership::Ambient,
        _ => Membership::NotLabelled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_label_wins_over_the_namespace() {
        let (ambient, none, plain) = (Some("ambient"), Some("none"), None);
        let pod = |mode| PodFacts {
            dataplane_mode: mode,
            ..Default::default()
        };
        assert_eq!(membership(pod(ambient), plain), Membership::Ambient);
        assert_eq!(membership(pod(ambient), Some("other")), Membership::Ambient);
        assert_eq!(membership(pod(none), ambient), Membership::OptedOut);
        assert_eq!(membership(pod(plain), ambient), Membership::Ambient);
        assert_eq!(membership(pod(plain), plain), Membership::NotLabelled);
        assert_eq!(membership(pod(Some("other")), plain), Membership::NotLabelled);
        assert_eq!(membership(PodFacts::default(), None), Membership::NotLabelled);
    }

    #[test]
    fn host_network_and_finished_pods_are_never_in() {
        let ambient = Some("ambient");
        let facts = PodFacts {
            dataplane_mode: ambient,
            host_network: true,
            ..Default::default()
        };
        assert_eq!(membership(facts, ambient), Membership::HostNetwork);
        for phase in ["Succeeded", "Failed"] {
            let facts = PodFacts {
                dataplane_mode: ambient,
                finished: finished(Some(phase)),
                ..Default::default()
            };
            assert_eq!(membership(facts, ambient), Membership::Finished);
        }
        for phase in [None, Some("Pending"), Some("Running"), Some("Unknown")] {
            assert!(!finished(phase), "{phase:?}");
        }
    }

    #[test]
    fn waypoint_pods_are_never_in_even_when_labelled_ambient() {
        let ambient = Some("ambient");
        let facts = PodFacts {
            dataplane_mode: ambient,
            waypoint: true,
            ..Default::default()
        };
        assert_eq!(membership(facts, ambient), Membership::Waypoint);
    }
}
