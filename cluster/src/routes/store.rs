//! Route objects as they arrive (from a file of Kubernetes documents or
//! from the API's watches), each object's last good translation, and the
//! table assembled from them.
//!
//! An object that does not translate keeps its previous good version in
//! force (and says why); one bad object never takes the others down.
//! Conflicts are resolved as Istio and the Gateway API do, and reported:
//! the oldest VirtualService for a host wins; when HTTPRoutes attach to a
//! Service its VirtualServices are ignored (the Gateway API is the newer,
//! more specific configuration); the oldest DestinationRule for a host
//! defines its subsets.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{
    httproute::{self, HttpRoute, Parent},
    virtualservice::{self, DestinationRule, VirtualService},
    Action, Match, RequestView, RouteError, Rule, Subset, Target,
};
use crate::kube::model::Change;

pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
pub const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";

/// A route object's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    HttpRoute,
    VirtualService,
    DestinationRule,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::HttpRoute, Kind::VirtualService, Kind::DestinationRule];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::HttpRoute => "HTTPRoute",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
        }
    }

    pub fn group(self) -> &'static str {
        match self {
            Kind::HttpRoute => GATEWAY_GROUP,
            _ => ISTIO_NETWORKING_GROUP,
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::HttpRoute => "httproutes",
            Kind::VirtualService => "virtualservices",
            Kind::DestinationRule => "destinationrules",
        }
    }

    /// The versions read, preferred first (one schema in each).
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            Kind::HttpRoute => &["v1", "v1beta1"],
            _ => &["v1", "v1beta1", "v1alpha3"],
        }
    }

    /// The kind of a document, `Ok(None)` when it is no route object.
    fn of(api_version: &str, kind: &str) -> Result<Option<Kind>, String> {
        let Some(k) = Kind::ALL.into_iter().find(|k| k.as_str() == kind) else {
            return Ok(None);
        };
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        if group != k.group() {
            // Another API's kind of the same name (not ours).
            return Ok(None);
        }
        if !k.versions().contains(&version) {
            return Err(format!(
                "apiVersion {api_version} is not read; use {}",
                k.versions()
                    .iter()
                    .map(|v| format!("{group}/{v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(Some(k))
    }
}

/// Which object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// One Kubernetes document, as written (`apiVersion`, `kind`, `metadata`,
/// `spec`), from a file or the API.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Document {
    #[serde(rename = "apiVersion", default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: Meta,
    #[serde(default)]
    pub spec: serde_json::Value,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
    pub creation_timestamp: Option<String>,
}

impl Document {
    /// Every document of a multi-document YAML text (`---` separated);
    /// empty documents are skipped.
    pub fn parse_all(text: &str) -> Result<Vec<Document>, String> {
        let mut out = Vec::new();
        for (i, d) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let v = serde_yaml::Value::deserialize(d).map_err(|e| format!("document {}: {e}", i + 1))?;
            if v.is_null() {
                continue;
            }
            let doc: Document = serde_yaml::from_value(v).map_err(|e| format!("document {}: {e}", i + 1))?;
            out.push(doc);
        }
        Ok(out)
    }

    /// Its key, `Ok(None)` for documents that are no route objects.
    pub fn key(&self) -> Result<Option<ObjectKey>, String> {
        let Some(kind) = Kind::of(&self.api_version, &self.kind)? else {
            return Ok(None);
        };
        if self.metadata.name.is_empty() {
            return Err(format!("a {} without metadata.name", kind.as_str()));
        }
        Ok(Some(ObjectKey {
            kind,
            namespace: self.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            name: self.metadata.name.clone(),
        }))
    }
}

/// A translated object.
#[derive(Debug)]
enum Translated {
    Http(HttpRoute),
    /// `None`: a VirtualService for ingress gateways only.
    Virtual(Option<VirtualService>),
    Subsets(DestinationRule),
}

fn translate(key: &ObjectKey, spec: &serde_json::Value) -> Result<Translated, RouteError> {
    let object = key.to_string();
    let spec = if spec.is_null() {
        &serde_json::Value::Object(Default::default())
    } else {
        spec
    };
    fn typed<T: serde::de::DeserializeOwned>(object: &str, v: &serde_json::Value) -> Result<T, RouteError> {
        serde_path_to_error::deserialize(v).map_err(|e| RouteError {
            object: object.to_string(),
            field: format!("spec.{}", e.path()),
            message: e.inner().to_string(),
        })
    }
    match key.kind {
        Kind::HttpRoute => httproute::translate(&object, &key.namespace, typed(&object, spec)?).map(Translated::Http),
        Kind::VirtualService => {
            virtualservice::translate(&object, &key.namespace, typed(&object, spec)?).map(Translated::Virtual)
        }
        Kind::DestinationRule => {
            virtualservice::translate_destination_rule(&object, &key.namespace, typed(&object, spec)?)
                .map(Translated::Subsets)
        }
    }
}

struct Stored {
    created: Option<String>,
    /// When it was first seen (orders objects without a timestamp, e.g.
    /// in a file).
    seq: u64,
    spec: serde_json::Value,
    good: Option<Arc<Translated>>,
    error: Option<RouteError>,
}

/// What one change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accepted(ObjectKey),
    /// Not translated; `kept`: its previous good version stays in force.
    Rejected {
        key: ObjectKey,
        error: RouteError,
        kept: bool,
    },
    Removed(ObjectKey),
    /// The same spec as before (a re-list, the file saved again).
    Unchanged(ObjectKey),
    /// A document that cannot even be keyed (no name, unread version).
    Invalid(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Accepted(k) => write!(f, "{k} accepted"),
            Outcome::Rejected { error, kept: true, .. } => write!(f, "{error}; its previous version stays in force"),
            Outcome::Rejected { error, kept: false, .. } => write!(f, "{error}; not applied"),
            Outcome::Removed(k) => write!(f, "{k} removed"),
            Outcome::Unchanged(k) => write!(f, "{k} unchanged"),
            Outcome::Invalid(m) => write!(f, "{m}; ignored"),
        }
    }
}

/// Every route object's last good translation.
pub struct RouteStore {
    /// The waypoint's own Gateway (`namespace`, `name`): routes attached to
    /// it apply to every service it carries.
    gateway: Option<(String, String)>,
    objects: BTreeMap<ObjectKey, Stored>,
    seq: u64,
}

impl RouteStore {
    pub fn new(gateway: Option<(String, String)>) -> Self {
        Self {
            gateway,
            objects: BTreeMap::new(),
            seq: 0,
        }
    }

    /// One object created or changed.
    pub fn upsert(&mut self, doc: Document) -> Outcome {
        let key = match doc.key() {
            Ok(Some(k)) => k,
            Ok(None) => return Outcome::Invalid(format!("{} {} is no route object", doc.kind, doc.metadata.name)),
            Err(e) => return Outcome::Invalid(e),
        };
        if let Some(s) = self.objects.get(&key) {
            if s.spec == doc.spec && (s.good.is_some() || s.error.is_some()) {
                return Outcome::Unchanged(key);
            }
        }
        self.seq += 1;
        let seq = self.seq;
        let result = translate(&key, &doc.spec);
        let s = self.objects.entry(key.clone()).or_insert_with(|| Stored {
            created: doc.metadata.creation_timestamp.clone(),
            seq,
            spec: serde_json::Value::Null,
            good: None,
            error: None,
        });
        s.spec = doc.spec;
        match result {
            Ok(t) => {
                s.good = Some(Arc::new(t));
                s.error = None;
                Outcome::Accepted(key)
            }
            Err(error) => {
                s.error = Some(error.clone());
                Outcome::Rejected {
                    key,
                    error,
                    kept: s.good.is_some(),
                }
            }
        }
    }

    pub fn delete(&mut self, key: &ObjectKey) -> Option<Outcome> {
        self.objects.remove(key).map(|_| Outcome::Removed(key.clone()))
    }

    /// The complete set of objects of `kinds` (a re-list, or the file read
    /// again): the others of those kinds are removed.
    pub fn replace(&mut self, kinds: &[Kind], docs: Vec<Document>) -> Vec<Outcome> {
        let mut out = Vec::new();
        let mut present = std::collections::BTreeSet::new();
        for d in docs {
            match d.key() {
                // Other kinds in the same file are not ours.
                Ok(None) => continue,
                Ok(Some(k)) => {
                    present.insert(k);
                }
                Err(_) => {}
            }
            match self.upsert(d) {
                Outcome::Unchanged(_) => {}
                o => out.push(o),
            }
        }
        let gone: Vec<ObjectKey> = self
            .objects
            .keys()
            .filter(|k| kinds.contains(&k.kind) && !present.contains(*k))
            .cloned()
            .collect();
        out.extend(gone.iter().filter_map(|k| self.delete(k)));
        out
    }

    /// A watch's change to the objects of one kind.
    pub fn apply(&mut self, kind: Kind, change: Change<Document>) -> Vec<Outcome> {
        match change {
            Change::Relisted(docs) => self.replace(&[kind], docs),
            Change::Upsert(d) => vec![self.upsert(d)],
            Change::Delete(d) => match d.key() {
                Ok(Some(k)) => self.delete(&k).into_iter().collect(),
                _ => vec![],
            },
        }
    }

    /// Objects whose current version does not translate.
    pub fn errors(&self) -> impl Iterator<Item = &RouteError> {
        self.objects.values().filter_map(|s| s.error.as_ref())
    }

    /// The table of the good objects, and the conflicts found assembling it.
    pub fn table(&self) -> (RouteTable, Vec<String>) {
        let mut conflicts = Vec::new();
        let mut order: Vec<(&ObjectKey, &Stored, &Arc<Translated>)> = self
            .objects
            .iter()
            .filter_map(|(k, s)| Some((k, s, s.good.as_ref()?)))
            .collect();
        // Oldest first: by creation time, then first seen, then name.
        order.sort_by(|a, b| (&a.1.created, a.1.seq, a.0).cmp(&(&b.1.created, b.1.seq, b.0)));

        let mut subsets: HashMap<&str, (&ObjectKey, &DestinationRule)> = HashMap::new();
        for (k, _, t) in &order {
            if let Translated::Subsets(dr) = t.as_ref() {
                match subsets.get(dr.host.as_str()) {
                    Some((first, _)) => conflicts.push(format!(
                        "{k} ignored: {first} already defines the subsets of {}",
                        dr.host
                    )),
                    None => {
                        subsets.insert(&dr.host, (k, dr));
                    }
                }
            }
        }
        let resolve = |rule: &Arc<Rule>| -> Arc<Rule> { resolve_subsets(rule, &subsets) };

        let mut table = RouteTable::default();
        for (k, _, t) in &order {
            let Translated::Http(r) = t.as_ref() else { continue };
            table.objects += 1;
            for parent in &r.parents {
                let (list, port, hostnames) = match parent {
                    Parent::Service { host, port } => (table.services.entry(host.clone()).or_default(), *port, vec![]),
                    Parent::Gateway { namespace, name } => {
                        if self.gateway.as_ref() != Some(&(namespace.clone(), name.clone())) {
                            continue; // Another Gateway's route.
                        }
                        (&mut table.gateway, None, r.hostnames.clone())
                    }
                };
                for (matches, rule) in &r.rules {
                    for m in matches {
                        list.push(Entry {
                            port,
                            hostnames: hostnames.clone(),
                            m: m.clone(),
                            rule: rule.clone(),
                            source: (*k).clone(),
                        });
                    }
                }
            }
        }
        // Gateway API precedence; the stable sort keeps age, name and
        // rule order for ties.
        for list in table.services.values_mut().chain(std::iter::once(&mut table.gateway)) {
            list.sort_by_key(|e| httproute::precedence(&e.m));
        }

        let mut claimed: HashMap<String, ObjectKey> = HashMap::new();
        for (k, _, t) in &order {
            let Translated::Virtual(Some(vs)) = t.as_ref() else {
                continue;
            };
            table.objects += 1;
            for host in &vs.hosts {
                if let Some(first) = table
                    .services
                    .get(host)
                    .and_then(|l| l.first())
                    .filter(|e| e.source.kind == Kind::HttpRoute)
                {
                    conflicts.push(format!(
                        "{k} ignored for {host}: {} attaches to it (HTTPRoutes take precedence)",
                        first.source
                    ));
                    continue;
                }
                if let Some(first) = claimed.get(host) {
                    conflicts.push(format!("{k} ignored for {host}: {first} is older and routes it"));
                    continue;
                }
                claimed.insert(host.clone(), (*k).clone());
                let list = table.services.entry(host.clone()).or_default();
                for (matches, rule) in &vs.rules {
                    let rule = resolve(rule);
                    let matches = if matches.is_empty() {
                        vec![Match::default()]
                    } else {
                        matches.clone()
                    };
                    for m in matches {
                        list.push(Entry {
                            port: None,
                            hostnames: vec![],
                            m,
                            rule: rule.clone(),
                            source: (*k).clone(),
                        });
                    }
                }
            }
        }
        (table, conflicts)
    }
}

/// Fills VirtualService subsets with their DestinationRule's labels.
fn resolve_subsets(rule: &Arc<Rule>, subsets: &HashMap<&str, (&ObjectKey, &DestinationRule)>) -> Arc<Rule> {
    let fix = |t: &Target| -> Target {
        match t {
            Target::Service {
                host,
                port,
                subset: Some(s),
            } => match subsets
                .get(host.as_str())
                .and_then(|(_, dr)| dr.subsets.iter().find(|x| x.name == s.name))
            {
                Some(found) => Target::Service {
                    host: host.clone(),
                    port: *port,
                    subset: Some(Subset {
                        name: s.name.clone(),
                        labels: found.labels.clone(),
                    }),
                },
                None => Target::Invalid {
                    status: 503,
                    reason: format!("no DestinationRule defines subset {} of {host}", s.name),
                },
            },
            t => t.clone(),
        }
    };
    let mut r = (**rule).clone();
    if let Action::Forward { backends, .. } = &mut r.action {
        for b in backends {
            b.target = fix(&b.target);
        }
    }
    for m in &mut r.mirrors {
        m.target = fix(&m.target);
    }
    Arc::new(r)
}

/// One rule's match in a service's ordered list.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Only requests for this Service port (HTTPRoute parentRef `port`).
    pub port: Option<u16>,
    /// Gateway-attached routes: the Service hostnames they apply to
    /// (empty: all).
    pub hostnames: Vec<String>,
    pub m: Match,
    pub rule: Arc<Rule>,
    pub source: ObjectKey,
}

/// The routes in force: per Service hostname, matches in precedence order.
#[derive(Debug, Default)]
pub struct RouteTable {
    services: HashMap<String, Vec<Entry>>,
    gateway: Vec<Entry>,
    /// Route objects in force.
    pub objects: usize,
}

/// What the table says about a request.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// No route is attached: the default (to the Service itself).
    Default,
    Found(&'a Entry),
    /// Routes are attached and none matches: 404.
    NoMatch,
}

fn hostname_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => pattern == host,
    }
}

impl RouteTable {
    /// The rule for a request to Service `host`.
    pub fn lookup(&self, host: &str, req: &RequestView) -> Lookup<'_> {
        let applies = |e: &&Entry| {
            e.port.is_none_or(|p| p == req.port)
                && (e.hostnames.is_empty() || e.hostnames.iter().any(|h| hostname_matches(h, host)))
        };
        let mut attached = false;
        for e in self
            .services
            .get(host)
            .into_iter()
            .flatten()
            .chain(&self.gateway)
            .filter(applies)
        {
            attached = true;
            if e.m.matches(req) {
                return Lookup::Found(e);
            }
        }
        if attached {
            Lookup::NoMatch
        } else {
            Lookup::Default
        }
    }

    /// Hostnames with routes (for logs).
    pub fn hosts(&self) -> usize {
        self.services.len()
    }
}

/// Durations as both APIs write them: Go/Gateway style (`1h2m3s`,
/// `500ms`) and protobuf style (`1.5s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Some(secs) = t
        .strip_suffix('s')
        .filter(|n| n.contains('.') && !n.ends_with(['m', 'u', 'n']))
    {
        if let Ok(f) = secs.parse::<f64>() {
            if f.is_finite() && f >= 0.0 {
                // Beyond what a Duration holds (about 5.8e11 years) is an
                // error, never a panic.
                return Duration::try_from_secs_f64(f)
                    .map_err(|_| format!("{s:?} is too long a duration (like 10s, 500ms, 1.5s or 1h30m)"));
            }
        }
    }
    humantime::parse_duration(t).map_err(|e| format!("{s:?} is no duration (like 10s, 500ms, 1.5s or 1h30m): {e}"))
}

#[cfg(test)]
mod tests;
