//! L4 authorization with Istio's semantics (`security.istio.io`
//! AuthorizationPolicy and PeerAuthentication, as ztunnel applies them):
//!
//! * Policies apply to a workload when they are global (root namespace, no
//!   selector), namespace-wide (its namespace, no selector), or select it by
//!   labels in its namespace.
//! * Any matching DENY denies; with no ALLOW policy the connection is
//!   allowed; otherwise some ALLOW policy must match.
//! * A policy matches when any rule matches; a rule when (no `from` or any
//!   source matches) and (no `to` or any operation matches); a source or
//!   operation when every field it sets matches. An ALLOW with no rules
//!   matches nothing (deny all); a DENY with no rules never matches.
//! * PeerAuthentication STRICT denies connections without an mTLS identity.
use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;

/// Policies in this namespace without a selector apply to the whole mesh.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Hash)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    /// `matchLabels` of the workloads it applies to; absent = all in scope.
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, Hash)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, Hash)]
#[serde(deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, Hash)]
#[serde(deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

/// Who is connecting. Principals are SPIFFE IDs without `spiffe://`
/// (`cluster.local/ns/default/sa/client`); `*`, `prefix*` and `*suffix` work.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, Hash)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<Cidr>,
    #[serde(default)]
    pub not_ip_blocks: Vec<Cidr>,
}

/// Where it connects to (ports as strings, as Istio writes them).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, Hash)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<Port>,
    #[serde(default)]
    pub not_ports: Vec<Port>,
}

/// A port written as a string or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Hash)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u16),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Port(n)),
            Raw::S(s) => s
                .parse()
                .map(Port)
                .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a port number (1-65535)"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    Strict,
    Permissive,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Hash)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
}

/// The destination workload a connection is for.
pub struct Target<'a> {
    pub namespace: &'a str,
    pub labels: &'a crate::labels::LabelMap,
}

/// What is known about a connection when it is authorized.
#[derive(Debug, Clone)]
pub struct Conn {
    /// The peer's SPIFFE ID; `None` for plaintext.
    pub principal: Option<mesh::identity::SpiffeId>,
    pub src_ip: IpAddr,
    pub dst_port: u16,
}

/// Why a connection is not allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

fn applies(ns: &str, selector: &Option<BTreeMap<String, String>>, t: &Target) -> bool {
    match selector {
        None => ns == ROOT_NAMESPACE || ns == t.namespace,
        Some(sel) => ns == t.namespace && t.labels.has_all(sel),
    }
}

/// The authorization decision for `conn` to `target`.
pub fn authorize(policies: &[AuthorizationPolicy], target: &Target, conn: &Conn) -> Result<(), Denied> {
    let scoped: Vec<&AuthorizationPolicy> = policies
        .iter()
        .filter(|p| applies(&p.namespace, &p.selector, target))
        .collect();
    if let Some(p) = scoped
        .iter()
        .find(|p| p.action == Action::Deny && p.rules.iter().any(|r| r.matches(conn)))
    {
        return Err(Denied(format!("denied by policy {}/{}", p.namespace, p.name)));
    }
    let allows: Vec<&&AuthorizationPolicy> = scoped.iter().filter(|p| p.action == Action::Allow).collect();
    if allows.is_empty() || allows.iter().any(|p| p.rules.iter().any(|r| r.matches(conn))) {
        return Ok(());
    }
    let names: Vec<String> = allows.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect();
    Err(Denied(format!(
        "no ALLOW policy matches (applicable: {})",
        names.join(", ")
    )))
}

/// The mTLS mode for `target`: the most specific PeerAuthentication wins
/// (selector, then namespace, then mesh-wide); PERMISSIVE by default.
pub fn mtls_mode(peer_auths: &[PeerAuthentication], target: &Target) -> MtlsMode {
    let rank = |p: &PeerAuthentication| match (&p.selector, p.namespace == target.namespace) {
        (Some(_), _) => 3,
        (None, true) => 2,
        (None, false) => 1,
    };
    peer_auths
        .iter()
        .filter(|p| applies(&p.namespace, &p.selector, target))
        .max_by_key(|p| rank(p))
        .map_or(MtlsMode::Permissive, |p| p.mode.clone())
}

impl Rule {
    fn matches(&self, c: &Conn) -> bool {
        (self.from.is_empty() || self.from.iter().any(|f| f.source.matches(c)))
            && (self.to.is_empty() || self.to.iter().any(|t| t.operation.matches(c)))
    }
}

impl Source {
    fn matches(&self, c: &Conn) -> bool {
        let principal = c
            .principal
            .as_ref()
            .map(|p| p.to_string().trim_start_matches("spiffe://").to_string());
        let ns = c.principal.as_ref().map(|p| &*p.namespace);
        let any = |pats: &[String], v: Option<&str>| v.is_some_and(|v| pats.iter().any(|p| glob(p, v)));
        let in_block = |blocks: &[Cidr]| blocks.iter().any(|b| b.contains(c.src_ip));
        (self.principals.is_empty() || any(&self.principals, principal.as_deref()))
            && !any(&self.not_principals, principal.as_deref())
            && (self.namespaces.is_empty() || any(&self.namespaces, ns))
            && !any(&self.not_namespaces, ns)
            && (self.ip_blocks.is_empty() || in_block(&self.ip_blocks))
            && !in_block(&self.not_ip_blocks)
    }
}

impl Operation {
    fn matches(&self, c: &Conn) -> bool {
        (self.ports.is_empty() || self.ports.contains(&Port(c.dst_port))) && !self.not_ports.contains(&Port(c.dst_port))
    }
}

/// Istio's string match: exact, `*`, `prefix*` or `*suffix`.
fn glob(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else {
        pattern == value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::identity::SpiffeId;

    fn policies(yaml: &str) -> Vec<AuthorizationPolicy> {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn conn(principal: Option<(&str, &str)>, port: u16) -> Conn {
        Conn {
            principal: principal.map(|(ns, sa)| SpiffeId::new("cluster.local", ns, sa)),
            src_ip: "10.1.1.11".parse().unwrap(),
            dst_port: port,
        }
    }

    fn target() -> (crate::labels::LabelMap, &'static str) {
        (
            BTreeMap::from([("app".to_string(), "server".to_string())]).into(),
            "default",
        )
    }

    fn decide(p: &[AuthorizationPolicy], c: &Conn) -> Result<(), Denied> {
        let (labels, ns) = target();
        authorize(
            p,
            &Target {
                namespace: ns,
                labels: &labels,
            },
            c,
        )
    }

    #[test]
    fn no_policy_allows() {
        assert!(decide(&[], &conn(None, 80)).is_ok());
    }

    #[test]
    fn allow_by_principal_denies_everyone_else() {
        let p = policies(
            "- {name: a, namespace: default, selector: {app: server}, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]}]}",
        );
        assert!(decide(&p, &conn(Some(("default", "client")), 80)).is_ok());
        assert!(decide(&p, &conn(Some(("default", "other")), 80))
            .unwrap_err()
            .0
            .contains("no ALLOW policy matches"));
        assert_eq!(
            decide(&p, &conn(None, 80)).unwrap_err().0,
            "no ALLOW policy matches (applicable: default/a)",
            "plaintext has no principal"
        );
    }

    #[test]
    fn deny_by_namespace_scoped_to_a_port() {
        let p = policies(
            "- {name: d, namespace: default, action: DENY, rules: [{from: [{source: {namespaces: [default]}}], to: [{operation: {ports: [\"8080\"]}}]}]}",
        );
        assert!(decide(&p, &conn(Some(("default", "client")), 8080))
            .unwrap_err()
            .0
            .contains("default/d"));
        assert!(decide(&p, &conn(Some(("default", "client")), 9090)).is_ok());
        assert!(decide(&p, &conn(Some(("other", "client")), 8080)).is_ok());
    }

    #[test]
    fn allow_policies_that_match_nothing_deny_all() {
        let p = policies("- {name: nothing, namespace: default, action: ALLOW}");
        assert_eq!(
            decide(&p, &conn(Some(("default", "client")), 80)).unwrap_err().0,
            "no ALLOW policy matches (applicable: default/nothing)"
        );
    }

    #[test]
    fn scope_global_namespace_and_selector() {
        let deny_all = |ns: &str, sel: &str| {
            policies(&format!(
                "- {{name: x, namespace: {ns}, {sel} action: DENY, rules: [{{}}]}}"
            ))
        };
        let c = conn(Some(("default", "client")), 80);
        let denied_by = |p: &[AuthorizationPolicy]| decide(p, &c).unwrap_err().0;
        assert_eq!(
            denied_by(&deny_all(ROOT_NAMESPACE, "")),
            "denied by policy istio-system/x",
            "root namespace = global"
        );
        assert_eq!(denied_by(&deny_all("default", "")), "denied by policy default/x");
        assert!(decide(&deny_all("other", ""), &c).is_ok(), "another namespace");
        assert_eq!(
            denied_by(&deny_all("default", "selector: {app: server},")),
            "denied by policy default/x"
        );
        assert!(
            decide(&deny_all("default", "selector: {app: web},"), &c).is_ok(),
            "selector mismatch"
        );
    }

    #[test]
    fn not_forms_ip_blocks_and_globs() {
        let p = policies(
            "- {name: a, namespace: default, action: ALLOW, rules: [{from: [{source: {principals: [\"cluster.local/ns/default/*\"], notPrincipals: [\"*/sa/evil\"], notIpBlocks: [\"10.9.0.0/16\"]}}], to: [{operation: {notPorts: [22]}}]}]}",
        );
        assert!(decide(&p, &conn(Some(("default", "client")), 80)).is_ok());
        let no_match = |c: &Conn| decide(&p, c).unwrap_err().0 == "no ALLOW policy matches (applicable: default/a)";
        assert!(no_match(&conn(Some(("default", "evil")), 80)), "notPrincipals");
        assert!(no_match(&conn(Some(("default", "client")), 22)), "notPorts");
        let mut c = conn(Some(("default", "client")), 80);
        c.src_ip = "10.9.1.1".parse().unwrap();
        assert!(no_match(&c), "notIpBlocks");
    }

    #[test]
    fn mtls_mode_most_specific_wins() {
        let pa: Vec<PeerAuthentication> = serde_yaml::from_str(
            "- {name: mesh, namespace: istio-system, mode: STRICT}\n- {name: ns, namespace: default, mode: PERMISSIVE}\n",
        )
        .unwrap();
        let (labels, ns) = target();
        assert_eq!(
            mtls_mode(
                &pa,
                &Target {
                    namespace: ns,
                    labels: &labels
                }
            ),
            MtlsMode::Permissive
        );
        assert_eq!(
            mtls_mode(
                &pa[..1],
                &Target {
                    namespace: ns,
                    labels: &labels
                }
            ),
            MtlsMode::Strict
        );
        assert_eq!(
            mtls_mode(
                &[],
                &Target {
                    namespace: ns,
                    labels: &labels
                }
            ),
            MtlsMode::Permissive
        );
    }

    #[test]
    fn bad_ports_say_what_is_wrong() {
        let e = serde_yaml::from_str::<Vec<AuthorizationPolicy>>(
            "- {name: a, namespace: default, action: ALLOW, rules: [{to: [{operation: {ports: [\"http\"]}}]}]}",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`http` is not a port number"), "{e}");
    }
}
