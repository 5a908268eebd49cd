//! While the agent is not reachable, the plugin asks the Kubernetes API whether a pod belongs in
//! the mesh (as istio-cni does), with read-only credentials the installer puts on the node
//! (`mesh-cni install --kubeconfig ...`: ServiceAccount `mesh-cni`, `get` on pods and
//! namespaces), and decides with the agent's own rule ([`mesh_cni::membership`]).
//!
//! It reuses the agent's client (kube-rs on rustls) on a current-thread runtime that lives for
//! this one call, so the workspace keeps a single HTTP/TLS stack.
use std::path::Path;
use std::time::Duration;

use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client};
use mesh_cni::membership::{self, Membership, PodFacts, DATAPLANE_MODE};

/// What the API says about a pod.
#[derive(Debug, PartialEq)]
pub struct Verdict {
    pub membership: Membership,
    /// Which label decided, for logs and the error the kubelet shows.
    pub why: String,
}

/// Gets the pod and its namespace, within `timeout`.
pub fn membership_of(
    kubeconfig: &Path,
    namespace: &str,
    name: &str,
    uid: &str,
    timeout: Duration,
) -> Result<Verdict, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async {
        tokio::time::timeout(timeout, lookup(kubeconfig, namespace, name, uid))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}s", timeout.as_secs_f32())))
    })
}

async fn lookup(kubeconfig: &Path, namespace: &str, name: &str, uid: &str) -> Result<Verdict, String> {
    let client = client(kubeconfig).await?;
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|e| format!("get pod {namespace}/{name}: {e}"))?;
    let found_uid = pod.metadata.uid.as_deref().unwrap_or_default();
    if !uid.is_empty() && found_uid != uid {
        return Err(format!(
            "the API's pod {namespace}/{name} has UID {found_uid}, the sandbox is for UID {uid} (re-created?)"
        ));
    }
    let ns = Api::<Namespace>::all(client)
        .get(namespace)
        .await
        .map_err(|e| format!("get namespace {namespace}: {e}"))?;
    Ok(verdict(&pod, &ns))
}

async fn client(kubeconfig: &Path) -> Result<Client, String> {
    let err = |e: &dyn std::fmt::Display| format!("kubeconfig {}: {e}", kubeconfig.display());
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| err(&e))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| err(&e))?;
    Client::try_from(config).map_err(|e| err(&e))
}

/// An object's `istio.io/dataplane-mode` label.
fn dataplane_mode(meta: &ObjectMeta) -> Option<&str> {
    meta.labels.as_ref()?.get(DATAPLANE_MODE).map(String::as_str)
}

fn verdict(pod: &Pod, ns: &Namespace) -> Verdict {
    let facts = PodFacts {
        dataplane_mode: dataplane_mode(&pod.metadata),
        host_network: pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false),
        finished: membership::finished(pod.status.as_ref().and_then(|s| s.phase.as_deref())),
        // Gateways are not readable here; the controller's waypoint pods
        // are labelled dataplane-mode=none, and anything else waits for the
        // agent, which knows.
        waypoint: false,
    };
    let m = membership::membership(facts, dataplane_mode(&ns.metadata));
    let pod_mode = facts.dataplane_mode;
    let ns_name = ns.metadata.name.as_deref().unwrap_or_default();
    let why = match (m, pod_mode) {
        (Membership::HostNetwork, _) => "the pod uses the host network".to_string(),
        (Membership::Finished, _) => "the pod has finished".to_string(),
        (Membership::Waypoint, _) => "the pod is a waypoint's".to_string(),
        (_, Some(mode)) => format!("the pod has label {DATAPLANE_MODE}={mode}"),
        (Membership::Ambient, None) => format!("namespace {ns_name} has label {DATAPLANE_MODE}=ambient"),
        _ => format!("neither the pod nor namespace {ns_name} has label {DATAPLANE_MODE}=ambient"),
    };
    Verdict { membership: m, why }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, mode: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            labels: mode.map(|m| [(DATAPLANE_MODE.to_string(), m.to_string())].into()),
            ..Default::default()
        }
    }

    #[test]
    fn verdict_names_the_deciding_label() {
        let pod = |mode| Pod {
            metadata: meta("p", mode),
            ..Default::default()
        };
        let ns = |mode| Namespace {
            metadata: meta("apps", mode),
            ..Default::default()
        };
        let v = verdict(&pod(Some("ambient")), &ns(None));
        assert_eq!(v.membership, Membership::Ambient);
        assert!(
            v.why.contains("pod has label istio.io/dataplane-mode=ambient"),
            "{}",
            v.why
        );
        let v = verdict(&pod(None), &ns(Some("ambient")));
        assert_eq!(v.membership, Membership::Ambient);
        assert!(v.why.contains("namespace apps has label"), "{}", v.why);
        let v = verdict(&pod(Some("none")), &ns(Some("ambient")));
        assert_eq!(v.membership, Membership::OptedOut);
        let v = verdict(&pod(None), &ns(None));
        assert_eq!(v.membership, Membership::NotLabelled);
        assert!(v.why.contains("neither"), "{}", v.why);
    }
}
