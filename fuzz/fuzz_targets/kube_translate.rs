//! The Kubernetes translation (`cluster::kube`): Namespaces, Pods,
//! Services, EndpointSlices, Gateways, AuthorizationPolicies and
//! PeerAuthentications, as YAML documents the API would serve, into the
//! model the agent enforces. Properties:
//! * the model is one the enrolment file's checks accept (the agent reads
//!   both the same way), and it survives YAML and back;
//! * the incremental model (one watch event at a time, as the agent keeps
//!   it) equals a translation from scratch, also after deletions.
//!
//! Not covered: the watches themselves (kube-rs) and the API's own
//! validation (a real API server refuses some of what this accepts, so the
//! model must hold up without it).
#![no_main]

use std::{collections::HashMap, net::IpAddr, path::PathBuf, sync::Arc};

use cluster::{
    config::LocalConfig,
    kube::{
        crd,
        model::{Change, Inputs, Local, Location, Model},
        records::{GatewayRecord, NamespaceRecord, PodRecord, PolicyRecord, ServiceRecord, SliceRecord},
    },
};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

const NODE: &str = "node1";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Some(input) = inputs(text) else { return };
    let scratch = translate(&Model::from_inputs(&input));
    let yaml = serde_yaml::to_string(&scratch).expect("a model serializes");
    let parsed = LocalConfig::parse(std::path::Path::new("translated.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("the translated model fails the enrolment checks: {e}\n{yaml}"));
    assert_eq!(parsed, scratch, "{yaml}");

    let mut model = Model::default();
    upsert_all(&mut model, &input);
    assert_eq!(translate(&model), scratch, "incremental != from scratch");

    // Delete every other object of each kind; a model of the rest agrees.
    let rest = Inputs {
        namespaces: odd(&input.namespaces),
        pods: odd(&input.pods),
        services: odd(&input.services),
        slices: odd(&input.slices),
        authorization_policies: odd(&input.authorization_policies),
        peer_authentications: odd(&input.peer_authentications),
        gateways: odd(&input.gateways),
    };
    delete_even(&mut model, &input);
    assert_eq!(
        translate(&model),
        translate(&Model::from_inputs(&rest)),
        "after deletions"
    );
});

/// The documents, by kind; `None` when the text is no YAML at all.
fn inputs(text: &str) -> Option<Inputs> {
    let mut input = Inputs::default();
    let mut seen = std::collections::HashSet::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let mut v = serde_yaml::Value::deserialize(doc).ok()?;
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string();
        if !as_the_api_stores_it(&kind, &mut v) {
            continue;
        }
        // One object per key, as the API has it (a later document would
        // be an update, which the deletions below would not undo).
        let meta = |f: &str| {
            v.get("metadata")
                .and_then(|m| m.get(f))
                .and_then(|n| n.as_str())
                .map(str::to_string)
        };
        let key = (kind.clone(), meta("namespace").unwrap_or_default(), meta("name"));
        if !seen.insert(key) {
            continue;
        }
        // A document the API would not serve as that kind is skipped.
        let _ = match kind.as_str() {
            "Namespace" => typed(v).map(|o| input.namespaces.push(o)),
            "Pod" => typed(v).map(|o| input.pods.push(o)),
            "Service" => typed(v).map(|o| input.services.push(o)),
            "EndpointSlice" => typed(v).map(|o| input.slices.push(o)),
            "AuthorizationPolicy" => typed(v).map(|o| input.authorization_policies.push(o)),
            "PeerAuthentication" => typed(v).map(|o| input.peer_authentications.push(o)),
            "Gateway" => typed(v).map(|o| input.gateways.push(o)),
            _ => None,
        };
    }
    Some(input)
}

/// What the API server guarantees for every object it serves: names
/// (of the object, its namespace, a pod's node and service account) are
/// DNS-1123, and a namespaced object has its namespace. Objects the API
/// would refuse are skipped; the rest of each object is left to the fuzzer.
fn as_the_api_stores_it(kind: &str, v: &mut serde_yaml::Value) -> bool {
    let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_mapping_mut()) else {
        return false;
    };
    if kind == "Namespace" {
        meta.remove("namespace");
    } else if meta.get("namespace").is_none() {
        meta.insert("namespace".into(), "default".into());
    }
    let named =
        |v: Option<&serde_yaml::Value>| v.is_none_or(|n| n.as_str().is_some_and(cluster::kube::model::valid_name));
    let spec = v.get("spec");
    named(v["metadata"].get("name"))
        && named(v["metadata"].get("namespace"))
        && named(spec.and_then(|s| s.get("nodeName")))
        && named(spec.and_then(|s| s.get("serviceAccountName")))
}

fn typed<T: serde::de::DeserializeOwned>(v: serde_yaml::Value) -> Option<Arc<T>> {
    serde_yaml::from_value(v).ok().map(Arc::new)
}

/// This node's view: every in-mesh pod of it is found (netns, cgroup).
fn translate(model: &Model) -> LocalConfig {
    let cni_ips = HashMap::new();
    let mut locate = |uid: &str, _: &[IpAddr]| {
        Some(Location {
            netns: PathBuf::from(format!("/run/netns/{uid}")),
            cgroup: PathBuf::from(format!("/sys/fs/cgroup/pods/{uid}")),
        })
    };
    let node_addresses = ["192.168.0.1".parse().unwrap()];
    let mut local = Local {
        node: NODE,
        own_uid: None,
        cni_ips: &cni_ips,
        locate: &mut locate,
        node_addresses: &node_addresses,
    };
    model.translate(Some(&mut local)).model
}

/// One watch event per object, kinds in the order `from_inputs` takes them.
fn upsert_all(m: &mut Model, i: &Inputs) {
    for o in &i.namespaces {
        if let Some(r) = NamespaceRecord::from_k8s(o) {
            m.apply_namespaces(Change::Upsert(r));
        }
    }
    for o in &i.gateways {
        if let Some(r) = GatewayRecord::from_k8s(o) {
            m.apply_gateways(Change::Upsert(r));
        }
    }
    for o in &i.pods {
        if let Some(r) = PodRecord::from_k8s(o) {
            m.apply_pods(Change::Upsert(r));
        }
    }
    for o in &i.slices {
        if let Some(r) = SliceRecord::from_k8s(o) {
            m.apply_slices(Change::Upsert(r));
        }
    }
    for o in &i.services {
        if let Some(r) = ServiceRecord::from_k8s(o) {
            m.apply_services(Change::Upsert(r));
        }
    }
    for o in &i.authorization_policies {
        if let Some(r) = authz(o) {
            m.apply_authorization_policies(Change::Upsert(r));
        }
    }
    for o in &i.peer_authentications {
        if let Some(r) = peer_auth(o) {
            m.apply_peer_authentications(Change::Upsert(r));
        }
    }
}

/// Deletes the objects `odd` leaves out (a delete carries the last state).
fn delete_even(m: &mut Model, i: &Inputs) {
    for o in evens(&i.namespaces) {
        if let Some(r) = NamespaceRecord::from_k8s(o) {
            m.apply_namespaces(Change::Delete(r));
        }
    }
    for o in evens(&i.gateways) {
        if let Some(r) = GatewayRecord::from_k8s(o) {
            m.apply_gateways(Change::Delete(r));
        }
    }
    for o in evens(&i.pods) {
        if let Some(r) = PodRecord::from_k8s(o) {
            m.apply_pods(Change::Delete(r));
        }
    }
    for o in evens(&i.slices) {
        if let Some(r) = SliceRecord::from_k8s(o) {
            m.apply_slices(Change::Delete(r));
        }
    }
    for o in evens(&i.services) {
        if let Some(r) = ServiceRecord::from_k8s(o) {
            m.apply_services(Change::Delete(r));
        }
    }
    for o in evens(&i.authorization_policies) {
        if let Some(r) = authz(o) {
            m.apply_authorization_policies(Change::Delete(r));
        }
    }
    for o in evens(&i.peer_authentications) {
        if let Some(r) = peer_auth(o) {
            m.apply_peer_authentications(Change::Delete(r));
        }
    }
}

fn authz(o: &crd::AuthorizationPolicy) -> Option<PolicyRecord<crd::AuthorizationPolicy>> {
    PolicyRecord::from_k8s(o.clone())
}

fn peer_auth(o: &crd::PeerAuthentication) -> Option<PolicyRecord<crd::PeerAuthentication>> {
    PolicyRecord::from_k8s(o.clone())
}

fn evens<T>(v: &[Arc<T>]) -> impl Iterator<Item = &T> {
    v.iter().step_by(2).map(|a| &**a)
}

fn odd<T>(v: &[Arc<T>]) -> Vec<Arc<T>> {
    v.iter().skip(1).step_by(2).cloned().collect()
}
