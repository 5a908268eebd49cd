//! Checks of the Kubernetes manifests in `deploy/` (no cluster, no root):
//!
//! * every YAML document parses into its typed k8s-openapi object and survives
//!   parse -> serialize unchanged, so a typoed or misplaced field (which the
//!   typed object silently drops) fails here and not on a cluster;
//! * `kubectl kustomize` renders the base and the examples, and the rendered
//!   objects pass the same check;
//! * RBAC is exactly what the agent, the CA, the CNI plugin and the waypoint
//!   controller need ([`rbac_rules`]), and waypoints get one fixed read-only role;
//! * the DaemonSet keeps what the agent's handover and CA authentication rely on;
//! * a few API-server validation rules that a typed parse cannot see.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use e2e::{deploy_dir, kustomize, yaml_documents};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, Namespace, PodTemplateSpec, Secret, Service, ServiceAccount, Volume},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
    serde::{de::DeserializeOwned, Serialize},
    Resource,
};
use serde_json::Value;

const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "ambient-mesh");
const MESH_NS: &str = "mesh-system";
/// What the base names its one image (kustomization.yaml's `images:`), the
/// name `cargo xtask image` gives it.
const IMAGE: &str = "localhost/ambient-mesh:0.1.0";
/// The fixed role the waypoint controller binds every waypoint to.
const WAYPOINT_ROLE: &str = "ambient-mesh-waypoint";

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

/// Every `*.yaml`/`*.yml` under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// A kustomization or a kustomize transformer configuration: not a manifest.
fn is_kustomize_file(path: &Path) -> bool {
    matches!(
        path.file_name().and_then(|n| n.to_str()),
        Some("kustomization.yaml" | "kustomization.yml" | "Kustomization" | "kustomizeconfig.yaml")
    )
}

/// (file, document) for every manifest under deploy/, kustomize's own files excluded.
fn source_documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for path in yaml_files(&deploy_dir()).into_iter().filter(|p| !is_kustomize_file(p)) {
        let name = path.strip_prefix(deploy_dir()).unwrap().display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, doc) in yaml_documents(&text, &name).into_iter().enumerate() {
            docs.push((format!("deploy/{name} #{i}"), doc));
        }
    }
    assert!(!docs.is_empty(), "no manifests found under {}", deploy_dir().display());
    docs
}

/// The rendered base (`kubectl kustomize deploy/`), rendered once per test binary.
fn rendered_base() -> &'static [Value] {
    static R: OnceLock<Vec<Value>> = OnceLock::new();
    R.get_or_init(|| kustomize(&deploy_dir()))
}

fn rendered_examples() -> &'static [Value] {
    static R: OnceLock<Vec<Value>> = OnceLock::new();
    R.get_or_init(|| kustomize(&deploy_dir().join("examples")))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn describe(doc: &Value) -> String {
    format!("{} {}", str_at(doc, "/kind"), str_at(doc, "/metadata/name"))
}

/// The one rendered object of this type and name.
fn find<T: Resource + DeserializeOwned>(docs: &[Value], name: &str) -> T {
    let mut hits = docs
        .iter()
        .filter(|d| str_at(d, "/apiVersion") == T::API_VERSION && str_at(d, "/kind") == T::KIND)
        .filter(|d| str_at(d, "/metadata/name") == name);
    let doc = hits
        .next()
        .unwrap_or_else(|| panic!("no {} {name} in the rendered manifests", T::KIND));
    assert!(hits.next().is_none(), "two {} {name}", T::KIND);
    serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{} {name}: {e}", T::KIND))
}

fn all<T: Resource + DeserializeOwned>(docs: &[Value]) -> Vec<T> {
    docs.iter()
        .filter(|d| str_at(d, "/apiVersion") == T::API_VERSION && str_at(d, "/kind") == T::KIND)
        .map(|d| serde_json::from_value(d.clone()).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------
// The round trip
// ---------------------------------------------------------------------------

/// Where `original` and `reparsed` differ, one line per JSON path.
///
/// No normalization is applied, on purpose: k8s-openapi keeps every value as
/// written where Kubernetes would accept two spellings. `IntOrString`
/// (targetPort, maxSurge, probe ports) serializes back as the int or string it
/// was parsed from, and `Quantity` ("50m", "32Mi") is a string newtype that is
/// never canonicalized. A YAML int where Kubernetes wants a string (or the
/// reverse) is not a difference but a parse error. What remains are fields the
/// typed object does not know: it drops them (unknown keys are ignored on
/// deserialization), and they show up here as "only in the manifest".
fn json_diff(path: &str, original: &Value, reparsed: &Value, out: &mut Vec<String>) {
    match (original, reparsed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(vb) => json_diff(&p, va, vb, out),
                    None => out.push(format!("{p}: only in the manifest (unknown or misplaced field?)")),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{k}: only after the round trip"));
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                json_diff(&format!("{path}[{i}]"), va, vb, out);
            }
            if a.len() != b.len() {
                out.push(format!(
                    "{path}: {} items in the manifest, {} after the round trip",
                    a.len(),
                    b.len()
                ));
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} in the manifest, {b} after the round trip")),
    }
}

type Reparse = fn(&Value) -> Result<Value, String>;

/// Deserialize into `T` and serialize back.
fn reparse<T: Resource + DeserializeOwned + Serialize>(doc: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(doc.clone())
        .map_err(|e| format!("does not parse as {} {}: {e}", T::API_VERSION, T::KIND))?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

fn kind<T: Resource + DeserializeOwned + Serialize>() -> (&'static str, &'static str, Reparse) {
    (T::API_VERSION, T::KIND, reparse::<T>)
}

/// The kinds deploy/ may contain. A new kind must be added here (or to the
/// hand-written checks) before it can be shipped.
fn known_kinds() -> Vec<(&'static str, &'static str, Reparse)> {
    vec![
        kind::<Namespace>(),
        kind::<ServiceAccount>(),
        kind::<ClusterRole>(),
        kind::<ClusterRoleBinding>(),
        kind::<Role>(),
        kind::<RoleBinding>(),
        kind::<Deployment>(),
        kind::<DaemonSet>(),
        kind::<Service>(),
        kind::<ConfigMap>(),
        kind::<Secret>(),
    ]
}

/// Ok if `doc` is a known kind and survives the typed round trip unchanged;
/// otherwise every problem, with its JSON path.
fn check_document(doc: &Value) -> Result<(), Vec<String>> {
    let (api_version, kind) = (str_at(doc, "/apiVersion"), str_at(doc, "/kind"));
    if kind == "AuthorizationPolicy" {
        return check_authorization_policy(doc);
    }
    let Some((_, _, reparse)) = known_kinds()
        .into_iter()
        .find(|(a, k, _)| (*a, *k) == (api_version, kind))
    else {
        return Err(vec![format!("$: unknown apiVersion/kind {api_version:?}/{kind:?}")]);
    };
    let reparsed = reparse(doc).map_err(|e| vec![format!("$: {e}")])?;
    let mut diffs = Vec::new();
    json_diff("$", doc, &reparsed, &mut diffs);
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs)
    }
}

/// `security.istio.io` has no k8s-openapi type: check the shape by hand, with
/// the same strictness (every key must be one Istio's v1 API defines).
fn check_authorization_policy(doc: &Value) -> Result<(), Vec<String>> {
    let mut errs = Vec::new();
    let e = &mut errs;
    keys(doc, "$", &["apiVersion", "kind", "metadata", "spec"], e);
    if !matches!(
        str_at(doc, "/apiVersion"),
        "security.istio.io/v1" | "security.istio.io/v1beta1"
    ) {
        e.push(format!(
            "$.apiVersion: {:?} is not security.istio.io/v1",
            str_at(doc, "/apiVersion")
        ));
    }
    // metadata is an ordinary ObjectMeta: round-trip it.
    let metadata = doc.get("metadata").cloned().unwrap_or(Value::Null);
    match serde_json::from_value::<ObjectMeta>(metadata.clone()) {
        Ok(m) => {
            json_diff("$.metadata", &metadata, &serde_json::to_value(&m).unwrap(), e);
            if m.name.is_none() || m.namespace.is_none() {
                e.push("$.metadata: needs name and namespace".into());
            }
        }
        Err(err) => e.push(format!("$.metadata: {err}")),
    }
    let Some(spec) = doc.get("spec") else {
        e.push("$.spec: missing".into());
        return Err(errs);
    };
    keys(
        spec,
        "$.spec",
        &["selector", "targetRef", "targetRefs", "action", "provider", "rules"],
        e,
    );
    if let Some(sel) = spec.get("selector") {
        keys(sel, "$.spec.selector", &["matchLabels"], e);
        string_map(sel.get("matchLabels"), "$.spec.selector.matchLabels", e);
    }
    if let Some(action) = spec.get("action") {
        if !matches!(action.as_str(), Some("ALLOW" | "DENY" | "AUDIT" | "CUSTOM")) {
            e.push(format!("$.spec.action: {action} is not ALLOW, DENY, AUDIT or CUSTOM"));
        }
    }
    for (i, rule) in list(spec.get("rules"), "$.spec.rules", e).iter().enumerate() {
        let p = format!("$.spec.rules[{i}]");
        keys(rule, &p, &["from", "to", "when"], e);
        for (j, from) in list(rule.get("from"), &format!("{p}.from"), e).iter().enumerate() {
            let p = format!("{p}.from[{j}]");
            keys(from, &p, &["source"], e);
            const SOURCE: &[&str] = &[
                "principals",
                "notPrincipals",
                "requestPrincipals",
                "notRequestPrincipals",
                "namespaces",
                "notNamespaces",
                "serviceAccounts",
                "notServiceAccounts",
                "ipBlocks",
                "notIpBlocks",
                "remoteIpBlocks",
                "notRemoteIpBlocks",
            ];
            string_lists(from.get("source"), &format!("{p}.source"), SOURCE, e);
        }
        for (j, to) in list(rule.get("to"), &format!("{p}.to"), e).iter().enumerate() {
            let p = format!("{p}.to[{j}]");
            keys(to, &p, &["operation"], e);
            const OPERATION: &[&str] = &[
                "hosts",
                "notHosts",
                "ports",
                "notPorts",
                "methods",
                "notMethods",
                "paths",
                "notPaths",
            ];
            let op = to.get("operation");
            string_lists(op, &format!("{p}.operation"), OPERATION, e);
            for field in ["ports", "notPorts"] {
                for port in op
                    .and_then(|o| o.get(field))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if port.as_str().and_then(|s| s.parse::<u16>().ok()).is_none() {
                        e.push(format!("{p}.operation.{field}: {port} is not a port number string"));
                    }
                }
            }
        }
        for (j, when) in list(rule.get("when"), &format!("{p}.when"), e).iter().enumerate() {
            let p = format!("{p}.when[{j}]");
            keys(when, &p, &["key", "values", "notValues"], e);
            if !when.get("key").is_some_and(Value::is_string) {
                e.push(format!("{p}.key: missing or not a string"));
            }
            for field in ["values", "notValues"] {
                if let Some(v) = when.get(field) {
                    if serde_json::from_value::<Vec<String>>(v.clone()).is_err() {
                        e.push(format!("{p}.{field}: expected a list of strings, got {v}"));
                    }
                }
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

fn keys(v: &Value, path: &str, allowed: &[&str], errs: &mut Vec<String>) {
    match v.as_object() {
        Some(m) => errs.extend(
            m.keys()
                .filter(|k| !allowed.contains(&k.as_str()))
                .map(|k| format!("{path}.{k}: unknown field (expected one of {allowed:?})")),
        ),
        None => errs.push(format!("{path}: expected an object, got {v}")),
    }
}

fn list<'a>(v: Option<&'a Value>, path: &str, errs: &mut Vec<String>) -> &'a [Value] {
    match v {
        None => &[],
        Some(Value::Array(a)) => a,
        Some(other) => {
            errs.push(format!("{path}: expected a list, got {other}"));
            &[]
        }
    }
}

fn string_map(v: Option<&Value>, path: &str, errs: &mut Vec<String>) {
    if let Some(v) = v {
        if serde_json::from_value::<BTreeMap<String, String>>(v.clone()).is_err() {
            errs.push(format!("{path}: expected a map of strings, got {v}"));
        }
    }
}

/// `v` is an object whose keys are in `allowed` and whose values are lists of strings.
fn string_lists(v: Option<&Value>, path: &str, allowed: &[&str], errs: &mut Vec<String>) {
    let Some(v) = v else { return };
    keys(v, path, allowed, errs);
    for (k, item) in v.as_object().into_iter().flatten() {
        if serde_json::from_value::<Vec<String>>(item.clone()).is_err() {
            errs.push(format!("{path}.{k}: expected a list of strings, got {item}"));
        }
    }
}

fn assert_all_round_trip<'a>(docs: impl IntoIterator<Item = (String, &'a Value)>) {
    let mut failures = Vec::new();
    let mut n = 0;
    for (origin, doc) in docs {
        n += 1;
        if let Err(diffs) = check_document(doc) {
            failures.push(format!("{origin} ({}):\n  {}", describe(doc), diffs.join("\n  ")));
        }
    }
    assert!(n > 0, "no documents");
    assert!(
        failures.is_empty(),
        "manifests that do not round-trip:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// RBAC
// ---------------------------------------------------------------------------

/// The ClusterRole `role_name` of the rendered base (`kubectl kustomize
/// deploy/`), expanded to one (api group, resource, verb) per permission.
/// Panics on a rule this expansion would misstate (resourceNames,
/// nonResourceURLs, aggregation, `*`).
pub fn rbac_rules(role_name: &str) -> BTreeSet<(String, String, String)> {
    rbac_rules_named(role_name)
        .into_iter()
        .map(|(g, r, v, names)| {
            assert!(
                names.is_empty(),
                "ClusterRole {role_name}: resourceNames {names:?} on {r} {v}"
            );
            (g, r, v)
        })
        .collect()
}

/// [`rbac_rules`] with each permission's resourceNames (empty: all).
pub fn rbac_rules_named(role_name: &str) -> BTreeSet<(String, String, String, Vec<String>)> {
    let role: ClusterRole = find(rendered_base(), role_name);
    assert!(
        role.aggregation_rule.is_none(),
        "ClusterRole {role_name}: aggregationRule"
    );
    let mut out = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        let names = rule.resource_names.clone().unwrap_or_default();
        assert!(
            rule.non_resource_urls.is_none(),
            "ClusterRole {role_name}: nonResourceURLs in {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for s in [group, resource, verb] {
                        assert!(!s.contains('*'), "ClusterRole {role_name}: wildcard {s:?}");
                    }
                    out.insert((group.clone(), resource.clone(), verb.clone(), names.clone()));
                }
            }
        }
    }
    out
}

fn perms(list: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    list.iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect()
}

#[test]
fn rbac_is_least_privilege() {
    let agent = rbac_rules("mesh-agent");
    let odd: Vec<_> = agent.iter().filter(|(_, _, v)| v != "list" && v != "watch").collect();
    assert!(odd.is_empty(), "mesh-agent may only list and watch, has {odd:?}");
    let mut expected = Vec::new();
    for (g, r) in [
        ("", "namespaces"),
        ("", "pods"),
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "peerauthentications"),
        ("gateway.networking.k8s.io", "gateways"),
    ] {
        expected.push((g, r, "list"));
        expected.push((g, r, "watch"));
    }
    assert_eq!(agent, perms(&expected), "ClusterRole mesh-agent");

    let ca = rbac_rules("mesh-ca");
    let expected = [
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("gateway.networking.k8s.io", "gateways", "get"),
    ];
    assert_eq!(ca, perms(&expected), "ClusterRole mesh-ca");

    // The CNI plugin's token lives on the node's disk: get only, of the pod
    // it sets up and that pod's namespace.
    let cni = rbac_rules("mesh-cni");
    let expected = [("", "pods", "get"), ("", "namespaces", "get")];
    assert_eq!(cni, perms(&expected), "ClusterRole mesh-cni");

    // The waypoint controller: watches Gateways and what it makes of them,
    // applies (patch; create when the apply creates), deletes only the
    // bindings no Gateway can own, and may bind only the waypoints' role;
    // for binding status it reads what binding reads and patches the
    // status of Services and Namespaces.
    // The controller e2e test compares the same role with its requests.
    let controller = rbac_rules_named("mesh-waypoint-controller");
    let mut expected = vec![
        ("gateway.networking.k8s.io", "gateways", "list"),
        ("gateway.networking.k8s.io", "gateways", "watch"),
        ("gateway.networking.k8s.io", "gateways/status", "patch"),
        ("rbac.authorization.k8s.io", "clusterrolebindings", "delete"),
        ("", "services/status", "patch"),
        ("", "namespaces/status", "patch"),
    ];
    for (g, r) in [("", "namespaces"), ("", "pods"), ("discovery.k8s.io", "endpointslices")] {
        expected.push((g, r, "list"));
        expected.push((g, r, "watch"));
    }
    for (g, r) in [
        ("", "serviceaccounts"),
        ("", "services"),
        ("", "configmaps"),
        ("apps", "deployments"),
        ("policy", "poddisruptionbudgets"),
        ("rbac.authorization.k8s.io", "clusterrolebindings"),
    ] {
        for v in ["list", "watch", "create", "patch"] {
            expected.push((g, r, v));
        }
    }
    let mut expected: BTreeSet<_> = expected
        .into_iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string(), Vec::new()))
        .collect();
    expected.insert((
        "rbac.authorization.k8s.io".into(),
        "clusterroles".into(),
        "bind".into(),
        vec![WAYPOINT_ROLE.into()],
    ));
    assert_eq!(controller, expected, "ClusterRole mesh-waypoint-controller");

    // What every waypoint may read: list and watch only, bound per waypoint
    // by the controller (no static binding).
    let waypoint = rbac_rules(WAYPOINT_ROLE);
    let mut expected = Vec::new();
    for (g, r) in [
        ("", "namespaces"),
        ("", "pods"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("gateway.networking.k8s.io", "gateways"),
        ("gateway.networking.k8s.io", "httproutes"),
        ("networking.istio.io", "virtualservices"),
        ("networking.istio.io", "destinationrules"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "peerauthentications"),
    ] {
        expected.push((g, r, "list"));
        expected.push((g, r, "watch"));
    }
    assert_eq!(waypoint, perms(&expected), "ClusterRole {WAYPOINT_ROLE}");

    // Each role is bound to its own service account and nothing else.
    for name in ["mesh-agent", "mesh-ca", "mesh-cni", "mesh-waypoint-controller"] {
        let binding: ClusterRoleBinding = find(rendered_base(), name);
        assert_eq!(
            (
                binding.role_ref.api_group.as_str(),
                binding.role_ref.kind.as_str(),
                binding.role_ref.name.as_str()
            ),
            ("rbac.authorization.k8s.io", "ClusterRole", name)
        );
        let subjects: Vec<_> = binding
            .subjects
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.kind, s.name, s.namespace.unwrap_or_default()))
            .collect();
        assert_eq!(
            subjects,
            [("ServiceAccount".into(), name.into(), MESH_NS.into())],
            "{name}"
        );
        let _: ServiceAccount = find(rendered_base(), name);
    }
    assert_eq!(
        all::<ClusterRoleBinding>(rendered_base()).len(),
        4,
        "unexpected ClusterRoleBindings"
    );
    assert!(all::<Role>(rendered_base()).is_empty() && all::<RoleBinding>(rendered_base()).is_empty());
}

// ---------------------------------------------------------------------------
// Round-trip tests
// ---------------------------------------------------------------------------

#[test]
fn source_manifests_round_trip() {
    let docs = source_documents();
    assert_all_round_trip(docs.iter().map(|(o, d)| (o.clone(), d)));
}

#[test]
fn rendered_base_round_trips() {
    assert_all_round_trip(rendered_base().iter().map(|d| ("kubectl kustomize deploy/".into(), d)));
}

#[test]
fn rendered_examples_round_trip() {
    assert_all_round_trip(
        rendered_examples()
            .iter()
            .map(|d| ("kubectl kustomize deploy/examples".into(), d)),
    );
}

fn agent_daemonset_doc() -> Value {
    source_documents()
        .into_iter()
        .map(|(_, d)| d)
        .find(|d| str_at(d, "/kind") == "DaemonSet")
        .expect("a DaemonSet under deploy/")
}

#[test]
fn round_trip_catches_a_typo() {
    let mut doc = agent_daemonset_doc();
    check_document(&doc).expect("the unmodified DaemonSet round-trips");
    let container = doc
        .pointer_mut("/spec/template/spec/containers/0")
        .unwrap()
        .as_object_mut()
        .unwrap();
    container.insert("imagePullPolicyy".into(), "Always".into());
    let diffs = check_document(&doc).expect_err("a typoed field must fail");
    assert_eq!(
        diffs,
        ["$.spec.template.spec.containers[0].imagePullPolicyy: only in the manifest (unknown or misplaced field?)"]
    );

    // A field at the wrong level is dropped just like a typo.
    let mut doc = agent_daemonset_doc();
    let spec = doc.pointer_mut("/spec").unwrap().as_object_mut().unwrap();
    spec.insert("hostPID".into(), true.into());
    let diffs = check_document(&doc).expect_err("a misplaced field must fail");
    assert!(
        diffs
            .iter()
            .any(|d| d.starts_with("$.spec.hostPID: only in the manifest")),
        "{diffs:?}"
    );

    // A wrong type is a parse error.
    let mut doc = agent_daemonset_doc();
    *doc.pointer_mut("/spec/template/spec/hostPID").unwrap() = "yes".into();
    let diffs = check_document(&doc).expect_err("a string for a bool must fail");
    assert!(diffs[0].contains("does not parse as apps/v1 DaemonSet"), "{diffs:?}");

    // An unknown kind is refused, not skipped.
    let mut doc = agent_daemonset_doc();
    doc["kind"] = "DaemonSett".into();
    assert!(check_document(&doc).unwrap_err()[0].contains("unknown apiVersion/kind"));
}

#[test]
fn authorization_policy_check_catches_a_typo() {
    let policy = rendered_examples()
        .iter()
        .find(|d| str_at(d, "/kind") == "AuthorizationPolicy")
        .expect("an AuthorizationPolicy in deploy/examples")
        .clone();
    check_document(&policy).expect("the unmodified policy passes");

    let mut doc = policy.clone();
    let source = doc
        .pointer_mut("/spec/rules/0/from/0/source")
        .unwrap()
        .as_object_mut()
        .unwrap();
    let principals = source.remove("principals").unwrap();
    source.insert("principal".into(), principals);
    let diffs = check_document(&doc).unwrap_err();
    assert!(
        diffs[0].starts_with("$.spec.rules[0].from[0].source.principal: unknown field"),
        "{diffs:?}"
    );

    let mut doc = policy.clone();
    doc["metadata"]["lables"] = serde_json::json!({"a": "b"});
    let diffs = check_document(&doc).unwrap_err();
    assert!(
        diffs[0].starts_with("$.metadata.lables: only in the manifest"),
        "{diffs:?}"
    );

    let mut doc = policy;
    doc["spec"]["rules"][0]["to"][0]["operation"]["ports"] = serde_json::json!([80]);
    assert!(!check_document(&doc).unwrap_err().is_empty(), "an int port must fail");
}

#[test]
fn json_diff_reports_paths() {
    let a = serde_json::json!({"x": [1, {"y": "a"}], "z": true});
    let b = serde_json::json!({"x": [1, {"y": "b"}, 3], "w": 1});
    let mut d = Vec::new();
    json_diff("$", &a, &b, &mut d);
    assert_eq!(
        d,
        [
            r#"$.x[1].y: "a" in the manifest, "b" after the round trip"#,
            "$.x: 2 items in the manifest, 3 after the round trip",
            "$.z: only in the manifest (unknown or misplaced field?)",
            "$.w: only after the round trip",
        ]
    );
}

// ---------------------------------------------------------------------------
// Layout, labels, kustomizations
// ---------------------------------------------------------------------------

#[test]
fn every_object_is_labelled() {
    let source = source_documents();
    let rendered = rendered_base().iter().chain(rendered_examples());
    for doc in source.iter().map(|(_, d)| d).chain(rendered) {
        assert_eq!(
            doc.pointer("/metadata/labels")
                .and_then(|l| l.get(PART_OF.0))
                .and_then(Value::as_str),
            Some(PART_OF.1),
            "{} lacks the label {}={}",
            describe(doc),
            PART_OF.0,
            PART_OF.1
        );
    }
}

/// Each kustomization lists exactly the manifests next to it, so a new file
/// cannot be forgotten (and is then also covered by the rendered checks).
#[test]
fn kustomizations_list_every_manifest() {
    for sub in [".", "examples"] {
        let dir = deploy_dir().join(sub);
        let text = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
        let k: Value = serde_yaml::from_str(&text).unwrap();
        let listed: BTreeSet<String> = k["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        let present: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml") && !is_kustomize_file(p))
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(listed, present, "deploy/{sub}/kustomization.yaml resources");
    }
}

#[test]
fn base_holds_no_secret_and_no_examples() {
    for doc in rendered_base() {
        assert_ne!(str_at(doc, "/kind"), "Secret", "the CA Secret must not be in the base");
        assert_ne!(str_at(doc, "/kind"), "AuthorizationPolicy");
        let ns = str_at(doc, "/metadata/namespace");
        assert!(ns.is_empty() || ns == MESH_NS, "{} in namespace {ns}", describe(doc));
    }
    for doc in rendered_examples() {
        let ns = str_at(doc, "/metadata/namespace");
        assert!(
            ns == "demo" || describe(doc) == "Namespace demo",
            "{} in namespace {ns:?}",
            describe(doc)
        );
    }
    let demo: Namespace = find(rendered_examples(), "demo");
    assert_eq!(
        demo.metadata
            .labels
            .unwrap()
            .get("istio.io/dataplane-mode")
            .map(String::as_str),
        Some("ambient")
    );
    // The image override point: one entry names the image of every container.
    let k: Value =
        serde_yaml::from_str(&std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap()).unwrap();
    let images = k["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "one images: entry");
    assert_eq!(images[0]["name"], "ambient-mesh");
    assert_eq!(
        format!(
            "{}:{}",
            images[0]["newName"].as_str().unwrap(),
            images[0]["newTag"].as_str().unwrap()
        ),
        IMAGE
    );
}

// ---------------------------------------------------------------------------
// The image name
// ---------------------------------------------------------------------------

/// The waypoint controller's image for the waypoints (`--waypoint-image`).
fn waypoint_image(c: &Container) -> Option<&str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == "WAYPOINT_IMAGE")?
        .value
        .as_deref()
}

/// Every image that `docs` run: their containers' and the waypoints'.
fn images(docs: &[Value]) -> BTreeSet<String> {
    let templates = pod_templates(docs);
    let containers = templates.iter().flat_map(|(_, t)| containers(t));
    containers
        .flat_map(|c| c.image.as_deref().into_iter().chain(waypoint_image(c)))
        .map(str::to_string)
        .collect()
}

/// One `images:` entry names the image of every container and of the
/// waypoints, in the base and in an overlay that renames the image (the
/// overlay inherits kustomizeconfig.yaml, so WAYPOINT_IMAGE follows too).
#[test]
fn one_images_entry_names_every_image() {
    assert_eq!(images(rendered_base()), BTreeSet::from([IMAGE.to_string()]));
    assert!(
        !source_documents()
            .iter()
            .any(|(_, d)| serde_json::to_string(d).unwrap().contains(IMAGE)),
        "the manifests name the image `ambient-mesh` and leave the rest to the images: entry"
    );
    // A relative path: kustomize refuses an absolute one for a base.
    let root = deploy_dir().join("..");
    let overlay = Path::new("target/deploy-overlay-test");
    let _ = std::fs::remove_dir_all(root.join(overlay));
    std::fs::create_dir_all(root.join(overlay)).unwrap();
    let (name, tag) = IMAGE.rsplit_once(':').unwrap();
    std::fs::write(
        root.join(overlay).join("kustomization.yaml"),
        format!(
            "resources: [../../deploy]\nimages:\n  - name: {name}\n    newName: registry.example/mesh/ambient-mesh\n    newTag: \"{tag}-1\"\n"
        ),
    )
    .unwrap();
    let renamed = images(&kustomize(&root.join(overlay)));
    std::fs::remove_dir_all(root.join(overlay)).unwrap();
    assert_eq!(
        renamed,
        BTreeSet::from([format!("registry.example/mesh/ambient-mesh:{tag}-1")])
    );
}

// ---------------------------------------------------------------------------
// Pod templates: API-server rules and the properties the agent relies on
// ---------------------------------------------------------------------------

fn pod_templates(docs: &[Value]) -> Vec<(String, PodTemplateSpec)> {
    let mut out = Vec::new();
    for d in all::<Deployment>(docs) {
        let spec = d.spec.unwrap();
        check_selector(&d.metadata, &spec.selector.match_labels, &spec.template);
        out.push((format!("Deployment {}", d.metadata.name.unwrap()), spec.template));
    }
    for d in all::<DaemonSet>(docs) {
        let spec = d.spec.unwrap();
        check_selector(&d.metadata, &spec.selector.match_labels, &spec.template);
        out.push((format!("DaemonSet {}", d.metadata.name.unwrap()), spec.template));
    }
    out
}

fn check_selector(meta: &ObjectMeta, selector: &Option<BTreeMap<String, String>>, template: &PodTemplateSpec) {
    let labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector = selector.clone().unwrap_or_default();
    assert!(!selector.is_empty(), "{:?}: empty selector", meta.name);
    for (k, v) in &selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "{:?}: the template does not match the selector",
            meta.name
        );
    }
}

fn containers(template: &PodTemplateSpec) -> Vec<&Container> {
    let spec = template.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect()
}

/// Rules the API server enforces that a typed parse cannot see; each of them
/// once made a manifest in this family unappliable.
#[test]
fn pod_templates_pass_api_server_rules() {
    let docs: Vec<Value> = rendered_base().iter().chain(rendered_examples()).cloned().collect();
    let templates = pod_templates(&docs);
    assert_eq!(
        templates.len(),
        6,
        "mesh-ca, mesh-agent, mesh-cni, mesh-waypoint-controller, httpbin, sleep"
    );
    let accounts: BTreeSet<(String, String)> = all::<ServiceAccount>(&docs)
        .into_iter()
        .map(|s| (s.metadata.namespace.unwrap(), s.metadata.name.unwrap()))
        .collect();
    for (what, template) in &templates {
        let spec = template.spec.as_ref().unwrap();
        let volumes: BTreeMap<&str, &Volume> = spec.volumes.iter().flatten().map(|v| (v.name.as_str(), v)).collect();
        assert_eq!(
            volumes.len(),
            spec.volumes.as_ref().map_or(0, Vec::len),
            "{what}: duplicate volume names"
        );
        for v in volumes.values() {
            let mode = v.secret.as_ref().and_then(|s| s.default_mode);
            let mode = mode.or(v.config_map.as_ref().and_then(|c| c.default_mode));
            assert!(
                mode.is_none_or(|m| (0..=0o777).contains(&m)),
                "{what}: volume {} mode {mode:?}",
                v.name
            );
        }
        if let Some(sa) = &spec.service_account_name {
            let ns = if what.starts_with("DaemonSet") || what.contains("mesh-") {
                MESH_NS
            } else {
                "demo"
            };
            assert!(
                accounts.contains(&(ns.into(), sa.clone())),
                "{what}: no ServiceAccount {ns}/{sa}"
            );
        }
        for c in containers(template) {
            let sc = c.security_context.clone().unwrap_or_default();
            let privileged = sc.privileged == Some(true);
            let added = sc.capabilities.as_ref().and_then(|c| c.add.clone()).unwrap_or_default();
            if sc.allow_privilege_escalation == Some(false) {
                assert!(
                    !privileged,
                    "{what}/{}: allowPrivilegeEscalation false with privileged",
                    c.name
                );
                assert!(
                    !added.iter().any(|a| a == "SYS_ADMIN" || a == "CAP_SYS_ADMIN"),
                    "{what}/{}: allowPrivilegeEscalation false with SYS_ADMIN is refused",
                    c.name
                );
            }
            for m in c.volume_mounts.iter().flatten() {
                assert!(
                    volumes.contains_key(m.name.as_str()),
                    "{what}/{}: no volume {}",
                    c.name,
                    m.name
                );
                if m.mount_propagation.as_deref() == Some("Bidirectional") {
                    assert!(
                        privileged,
                        "{what}/{}: Bidirectional propagation needs privileged",
                        c.name
                    );
                }
            }
        }
    }
}

fn arg_after<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args.get(i + 1).unwrap_or_else(|| panic!("{flag} without a value"))
}

fn cmdline(c: &Container) -> Vec<String> {
    c.command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect()
}

/// The DaemonSet properties the agent depends on: handover (surge, no
/// unavailability, pins on the node's bpffs), reaching pods (hostPID), CA
/// authentication (projected token with audience mesh-ca), readiness.
#[test]
fn daemonset_keeps_what_the_agent_relies_on() {
    let ds: DaemonSet = find(rendered_base(), "mesh-agent");
    assert_eq!(ds.metadata.namespace.as_deref(), Some(MESH_NS));
    let spec = ds.spec.unwrap();
    let strategy = spec.update_strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.unwrap();
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)), "maxSurge");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)), "maxUnavailable");

    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_pid, Some(true), "hostPID");
    assert_ne!(pod.host_network, Some(true), "hostNetwork");
    assert_eq!(pod.service_account_name.as_deref(), Some("mesh-agent"));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(pod.termination_grace_period_seconds, Some(35));
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    assert!(tolerations
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
    let annotations = spec.template.metadata.as_ref().unwrap().annotations.clone().unwrap();
    assert_eq!(annotations["prometheus.io/port"], "15020");
    assert_eq!(annotations["prometheus.io/path"], "/stats/prometheus");

    for c in containers(&spec.template) {
        let sc = c.security_context.clone().unwrap();
        assert_ne!(sc.privileged, Some(true), "{}: privileged", c.name);
        let caps = sc.capabilities.unwrap();
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "{}: drop ALL", c.name);
        assert_eq!(c.image.as_deref(), Some(IMAGE), "{}", c.name);
        // Surge runs two agent pods per node: a hostPort would collide.
        assert!(
            c.ports.iter().flatten().all(|p| p.host_port.is_none()),
            "{}: hostPort",
            c.name
        );
    }

    let agent = pod
        .containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("container agent");
    let sc = agent.security_context.clone().unwrap();
    let caps: BTreeSet<String> = sc.capabilities.unwrap().add.unwrap().into_iter().collect();
    let expected = [
        "BPF",
        "NET_ADMIN",
        "SYS_ADMIN",
        "SYS_PTRACE",
        "SYS_RESOURCE",
        "NET_RAW",
        "PERFMON",
    ];
    assert_eq!(
        caps,
        expected.iter().map(|s| s.to_string()).collect(),
        "agent capabilities"
    );
    assert_eq!(sc.app_armor_profile.map(|p| p.type_).as_deref(), Some("Unconfined"));

    for (probe, what) in [
        (&agent.readiness_probe, "readiness"),
        (&agent.liveness_probe, "liveness"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .unwrap_or_else(|| panic!("{what} probe"));
        assert_eq!(get.port, IntOrString::Int(15021), "{what} probe port");
        assert_eq!(get.path.as_deref(), Some("/healthz/ready"), "{what} probe path");
    }
    let ports: BTreeSet<(String, i32)> = agent
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [("http-metrics".into(), 15020), ("http-ready".into(), 15021)].into()
    );

    let volumes: BTreeMap<&str, &Volume> = pod.volumes.iter().flatten().map(|v| (v.name.as_str(), v)).collect();
    let mount = |c: &Container, path: &str| {
        let m = c.volume_mounts.iter().flatten().find(|m| m.mount_path == path);
        let m = m
            .unwrap_or_else(|| panic!("{}: nothing mounted at {path}", c.name))
            .clone();
        (m.clone(), volumes[m.name.as_str()].clone())
    };

    // bpffs: the node's, so pins outlive the pod. HostToContainer rather than
    // the Bidirectional one might expect: the API server refuses Bidirectional
    // for a container that is not privileged (checked in
    // pod_templates_pass_api_server_rules), and the node's existing bpffs
    // mount is what the agent needs to see.
    let (m, v) = mount(agent, "/sys/fs/bpf");
    assert_eq!(v.host_path.as_ref().map(|h| h.path.as_str()), Some("/sys/fs/bpf"));
    assert_eq!(
        m.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "bpffs propagation"
    );
    assert_ne!(m.read_only, Some(true));
    let (m, v) = mount(agent, "/sys/fs/cgroup");
    assert_eq!(v.host_path.as_ref().map(|h| h.path.as_str()), Some("/sys/fs/cgroup"));
    assert_ne!(m.read_only, Some(true));

    // CA authentication: --ca-token is the projected token for audience mesh-ca.
    let args = cmdline(agent);
    let token = arg_after(&args, "--ca-token");
    let (dir, file) = token.rsplit_once('/').unwrap();
    let (m, v) = mount(agent, dir);
    assert_eq!(m.read_only, Some(true));
    let sources = v.projected.expect("the token volume is projected").sources.unwrap();
    let sat = sources
        .iter()
        .find_map(|s| s.service_account_token.clone())
        .expect("serviceAccountToken");
    assert_eq!(sat.audience.as_deref(), Some("mesh-ca"), "token audience");
    assert_eq!(sat.path, file);
    assert_eq!(sat.expiration_seconds, Some(3600));
    assert_eq!(
        arg_after(&args, "--ca-address"),
        "https://mesh-ca.mesh-system.svc:15012"
    );
    let root = arg_after(&args, "--ca-root");
    let (dir, file) = root.rsplit_once('/').unwrap();
    let (_, v) = mount(agent, dir);
    assert_eq!(v.config_map.map(|c| c.name), Some("mesh-ca-root".into()));
    assert_eq!(file, "root-cert.pem");

    // The CNI plugin reaches the agent through the node's /var/run/mesh.
    let socket = arg_after(&args, "--cni-socket");
    let (dir, _) = socket.rsplit_once('/').unwrap();
    let (_, v) = mount(agent, dir);
    assert_eq!(v.host_path.map(|h| h.path).as_deref(), Some(dir));
    assert!(
        containers(&spec.template).iter().all(|c| c.name != "install-cni"),
        "the installer runs in DaemonSet mesh-cni, with its own service account"
    );
}

/// The installer's DaemonSet: its own service account (whose token becomes
/// the plugin's kubeconfig), the agent's socket, the node's CNI dirs, safe
/// updates, no capability.
#[test]
fn cni_daemonset_gives_the_plugin_its_own_least_privilege_credentials() {
    let ds: DaemonSet = find(rendered_base(), "mesh-cni");
    assert_eq!(ds.metadata.namespace.as_deref(), Some(MESH_NS));
    let spec = ds.spec.unwrap();
    let rolling = spec.update_strategy.unwrap().rolling_update.unwrap();
    // The new installer registers before the old one leaves: the entry stays.
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)), "maxSurge");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)), "maxUnavailable");
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("mesh-cni"));
    assert_ne!(
        pod.automount_service_account_token,
        Some(false),
        "the token is the credential"
    );
    assert_ne!(pod.host_network, Some(true));
    assert_ne!(pod.host_pid, Some(true));
    let volumes: BTreeMap<&str, &Volume> = pod.volumes.iter().flatten().map(|v| (v.name.as_str(), v)).collect();
    let cni = containers(&spec.template)
        .into_iter()
        .find(|c| c.name == "install-cni")
        .expect("container install-cni");
    let args = cmdline(cni);
    let host_dir = |path: &str| {
        let m = cni.volume_mounts.iter().flatten().find(|m| m.mount_path == path);
        let m = m.unwrap_or_else(|| panic!("nothing mounted at {path}"));
        volumes[m.name.as_str()].host_path.as_ref().map(|h| h.path.clone())
    };
    assert_eq!(host_dir(arg_after(&args, "--bin-dir")).as_deref(), Some("/opt/cni/bin"));
    let conf = host_dir(arg_after(&args, "--conf-dir"));
    assert_eq!(
        conf.as_deref(),
        Some(arg_after(&args, "--host-conf-dir")),
        "the entry names the node's path"
    );
    assert_eq!(
        arg_after(&args, "--kubeconfig-token"),
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    );
    let agent: DaemonSet = find(rendered_base(), "mesh-agent");
    let agent_args = cmdline(&agent.spec.unwrap().template.spec.unwrap().containers[0]);
    assert_eq!(arg_after(&args, "--socket"), arg_after(&agent_args, "--cni-socket"));
    assert_eq!(arg_after(&args, "--holder"), "$(POD_UID)");
    let env = cni.env.iter().flatten().find(|e| e.name == "POD_UID").expect("POD_UID");
    let field = env
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(field, Some("metadata.uid"));
    let sc = cni.security_context.clone().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    assert!(caps.add.is_none_or(|a| a.is_empty()), "install-cni adds no capability");
    assert_eq!(cni.image.as_deref(), Some(IMAGE));
}

#[test]
fn ca_deployment_guards_the_root_key() {
    let d: Deployment = find(rendered_base(), "mesh-ca");
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("mesh-ca"));
    let c = &pod.containers[0];
    let args = cmdline(c);
    let dir = arg_after(&args, "--dir");
    let listen = arg_after(&args, "--listen");
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .expect("the CA directory is mounted");
    assert_eq!(m.read_only, Some(true));
    let v = pod.volumes.iter().flatten().find(|v| v.name == m.name).unwrap();
    let secret = v.secret.as_ref().expect("the CA directory is the Secret");
    assert_eq!(secret.secret_name.as_deref(), Some("mesh-ca"));
    assert_eq!(secret.default_mode, Some(0o400));
    let keys: BTreeSet<&str> = secret.items.iter().flatten().map(|i| i.key.as_str()).collect();
    let expected = [
        "root-cert.pem",
        "root-key.pem",
        "ca-server-cert.pem",
        "ca-server-key.pem",
        "trust-domain",
    ];
    assert_eq!(keys, expected.into());
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.run_as_user, Some(65532));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    assert!(caps.add.is_none_or(|a| a.is_empty()), "the CA adds no capability");

    let svc: Service = find(rendered_base(), "mesh-ca");
    let port = &svc.spec.unwrap().ports.unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("grpc-ca"), 15012));
    assert_eq!(listen.rsplit_once(':').unwrap().1, "15012");
}

/// The programs in the image accept the command lines the manifests give
/// them (clap rejects an unknown or misspelled flag before it reaches the
/// trailing `--help`). Needs the binaries built (`cargo xtask test` does).
#[test]
fn manifest_command_lines_are_accepted_by_the_binaries() {
    for (workload, container) in [
        ("DaemonSet/mesh-agent", "agent"),
        ("DaemonSet/mesh-cni", "install-cni"),
        ("Deployment/mesh-ca", "ca"),
        ("Deployment/mesh-waypoint-controller", "controller"),
    ] {
        let (kind, name) = workload.split_once('/').unwrap();
        let doc = rendered_base()
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{workload} not rendered"));
        let c = doc["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == container)
            .unwrap_or_else(|| panic!("{workload} has no container {container}"));
        let words: Vec<String> = c["command"]
            .as_array()
            .into_iter()
            .chain(c["args"].as_array())
            .flatten()
            .map(|w| w.as_str().unwrap().replace("$(POD_UID)", "uid-1"))
            .collect();
        let program = testbed::mesh::binary(&words[0]).expect("binaries built");
        if words[0] == "mesh-cni" {
            // The installer has no --help: check its flags by name instead.
            for flag in words.iter().filter(|w| w.starts_with("--")) {
                assert!(
                    [
                        "--bin-dir",
                        "--conf-dir",
                        "--host-conf-dir",
                        "--socket",
                        "--kubeconfig-token",
                        "--holder"
                    ]
                    .contains(&flag.as_str()),
                    "{workload}/{container}: unknown installer flag {flag}"
                );
            }
            continue;
        }
        let out = std::process::Command::new(&program)
            .args(&words[1..])
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{workload}/{container}: `{}` rejected: {}",
            words.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The waypoint controller: its own service account (never the CA's, so
/// the root key's holder cannot create Deployments), no access to the CA's
/// Secret, the mesh root it copies to waypoints, waypoints in the same image.
#[test]
fn waypoint_controller_runs_apart_from_the_ca() {
    let d: Deployment = find(rendered_base(), "mesh-waypoint-controller");
    assert_eq!(d.metadata.namespace.as_deref(), Some(MESH_NS));
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(1), "no leader election yet");
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("mesh-waypoint-controller"));
    assert!(
        pod.volumes.iter().flatten().all(|v| v.secret.is_none()),
        "the controller mounts no Secret"
    );
    let c = &pod.containers[0];
    let args = cmdline(c);
    assert_eq!(&args[..2], ["waypoint", "controller"]);
    assert_eq!(
        waypoint_image(c),
        c.image.as_deref(),
        "waypoints run the controller's image"
    );
    assert!(
        !args.iter().any(|a| a.starts_with("--waypoint-image")),
        "an argument would override WAYPOINT_IMAGE, which the images: entry sets"
    );
    let root = arg_after(&args, "--ca-root-file");
    let (dir, _) = root.rsplit_once('/').unwrap();
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .expect("the mesh root is mounted");
    let v = pod.volumes.iter().flatten().find(|v| v.name == m.name).unwrap();
    assert_eq!(v.config_map.as_ref().map(|c| c.name.as_str()), Some("mesh-ca-root"));
    // No --waypoint-cluster-role: the default is the role it may bind.
    assert!(!args.iter().any(|a| a.starts_with("--waypoint-cluster-role")));
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let _: ServiceAccount = find(rendered_base(), "mesh-waypoint-controller");
}
