//! Istio's `security.istio.io` AuthorizationPolicy and PeerAuthentication
//! as the agent reads them, in `v1` or, on clusters with an older Istio,
//! `v1beta1` (the same schema; [`Version`] is the resources' dynamic type,
//! so one Rust type serves both). Only the fields ztunnel-style L4 enforcement
//! understands are typed; the rest is kept as raw JSON so it can be reported
//! (an ALLOW rule that needs HTTP attributes cannot be enforced at L4).
//!
//! Also the Gateway API Gateway (waypoints), `gateway.networking.k8s.io/v1`.
//!
//! `kube::Resource` is implemented by hand: the derive would pull a schema
//! generator into the agent for two small types.
use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "security.istio.io";
pub const VERSION: &str = "v1";
/// Versions the agent reads, preferred first (Istio 1.22 made v1 the
/// storage version; earlier releases serve v1beta1 only).
pub const VERSIONS: &[&str] = &[VERSION, "v1beta1"];

/// The API version a resource is read in (`v1` unless discovery says
/// otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version(pub &'static str);

impl Default for Version {
    fn default() -> Self {
        Version(VERSION)
    }
}

macro_rules! istio_resource {
    ($ty:ident, $spec:ident, $kind:literal, $plural:literal) => {
        impl $ty {
            pub const PLURAL: &'static str = $plural;

            /// A typed object with apiVersion/kind set (for tests and the stand-in API server).
            pub fn new(namespace: &str, name: &str, spec: $spec) -> Self {
                Self {
                    api_version: format!("{GROUP}/{VERSION}"),
                    kind: $kind.into(),
                    metadata: meta(namespace, name),
                    spec,
                }
            }

            /// The same object as `security.istio.io/<version>` (e.g. `v1beta1`).
            pub fn in_version(mut self, version: &str) -> Self {
                self.api_version = format!("{GROUP}/{version}");
                self
            }
        }
        impl kube::Resource for $ty {
            type DynamicType = Version;
            type Scope = kube::core::NamespaceResourceScope;
            fn kind(_: &Version) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &Version) -> Cow<'_, str> {
                GROUP.into()
            }
            fn version(v: &Version) -> Cow<'_, str> {
                v.0.into()
            }
            fn api_version(v: &Version) -> Cow<'_, str> {
                format!("{GROUP}/{}", v.0).into()
            }
            fn plural(_: &Version) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// `security.istio.io/v1` AuthorizationPolicy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}
istio_resource!(
    AuthorizationPolicy,
    AuthorizationPolicySpec,
    "AuthorizationPolicy",
    "authorizationpolicies"
);

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Policies bound to Gateways/Services are for waypoints, not the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<serde_json::Value>,
    /// ALLOW (default), DENY, AUDIT or CUSTOM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<From>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<To>,
    /// Conditions (`when`): evaluated by waypoints; at L4 see `model`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct From {
    #[serde(default)]
    pub source: Source,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// HTTP-only (JWT, X-Forwarded-For): kept to detect them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP-only: kept to detect them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

impl Source {
    pub fn has_l7(&self) -> bool {
        !(self.request_principals.is_empty()
            && self.not_request_principals.is_empty()
            && self.remote_ip_blocks.is_empty()
            && self.not_remote_ip_blocks.is_empty())
    }
}

impl Operation {
    pub fn has_l7(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }
}

/// `security.istio.io/v1` PeerAuthentication.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}
istio_resource!(
    PeerAuthentication,
    PeerAuthenticationSpec,
    "PeerAuthentication",
    "peerauthentications"
);

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_level_mtls: Option<BTreeMap<String, Mtls>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Mtls {
    /// UNSET, DISABLE, PERMISSIVE or STRICT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

pub use super::gateway::Gateway;
