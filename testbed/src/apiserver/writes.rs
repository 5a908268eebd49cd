//! Writes as controllers make them, with the behaviour of kube-apiserver
//! (and its garbage collector) that a controller relies on:
//!
//! * server-side apply: the applied configuration is merged into the stored
//!   object (objects key by key, `conditions` lists by `type` as their
//!   schemas declare, other lists replaced whole; real SSA also merges
//!   keyed lists such as `containers` by name), and what the same field
//!   manager applied last time but not now is removed. An apply that
//!   changes nothing changes nothing: no new resourceVersion, no event
//!   (a controller that re-applies on every event would otherwise loop).
//!   Conflicts between managers are not detected (callers use `force`).
//! * `metadata.generation`: 1 on create, +1 when `spec` changes.
//! * the `status` subresource: object writes keep `status`, `/status`
//!   writes change only `status`.
//! * Services get a cluster IP from 10.96.0.0/16 when created by apply; a
//!   (Cluster)RoleBinding's roleRef cannot change (422, as kube-apiserver).
//! * authorization as kube-apiserver does it: an apply that creates is also
//!   checked as `create`; a (Cluster)RoleBinding write by someone who does
//!   not hold the role's permissions needs `bind` on that role (the
//!   stand-in records both, so RBAC can be compared with them).
//! * deletion with ownerReferences: the garbage collector deletes an
//!   object's dependents (namespaced dependents in the owner's namespace; a
//!   cluster-scoped object that names a namespaced owner is never collected,
//!   as kube's GC treats that reference as unresolvable) once none of their
//!   owners is left: after the owner (Background, the default), before it
//!   (Foreground), or not at all, removing the reference (Orphan).
use std::collections::HashMap;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::{json_reply, record_change, status, Body, Change, Db, Recorded, Res, Shared, Target, RESOURCES};

/// (plural, namespace, name, field manager, status subresource).
pub(super) type AppliedKey = (&'static str, String, String, String, bool);

/// A delete's `propagationPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

impl Propagation {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "Background" => Some(Self::Background),
            "Foreground" => Some(Self::Foreground),
            "Orphan" => Some(Self::Orphan),
            _ => None,
        }
    }
}

type Key = (&'static str, String, String);

/// Stores `v` under `key` with a new resourceVersion (and generation), and
/// tells the watches.
pub(super) fn store(
    db: &mut Db,
    live: &broadcast::Sender<Change>,
    res: &'static Res,
    key: Key,
    mut v: Value,
    old: Option<Value>,
) {
    db.rv += 1;
    let generation = match &old {
        Some(o) => {
            let g = o["metadata"]["generation"].as_u64().unwrap_or(1);
            if o.get("spec") != v.get("spec") {
                g + 1
            } else {
                g
            }
        }
        None => v["metadata"]["generation"].as_u64().unwrap_or(1),
    };
    v["metadata"]["resourceVersion"] = json!(db.rv.to_string());
    v["metadata"]["generation"] = json!(generation);
    let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
    db.objects.insert(key, v.clone());
    record_change(db, live, res, kind, v, old);
}

/// `PATCH`: server-side apply of an object or its status.
pub(super) fn patch(
    shared: &Shared,
    t: &Target,
    q: &HashMap<String, String>,
    content_type: &str,
    body: &Bytes,
    recorded: &Recorded,
) -> (Response<Body>, bool) {
    let fail = |r: Response<Body>| (r, false);
    if !content_type.starts_with("application/apply-patch") {
        return fail(status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!("the stand-in supports server-side apply only, not {content_type:?}"),
        ));
    }
    let Some(name) = t.name.clone() else {
        return fail(status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "patch needs a name",
        ));
    };
    let Some(manager) = q.get("fieldManager").filter(|m| !m.is_empty()).cloned() else {
        return fail(status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    };
    let applied: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return fail(status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the applied configuration is not an object",
            ))
        }
        Err(e) => return fail(status(StatusCode::BAD_REQUEST, "BadRequest", &format!("not JSON: {e}"))),
    };
    let res = t.res;
    let ns = if res.namespaced {
        t.namespace.clone().unwrap_or_default()
    } else {
        String::new()
    };
    if let Err(e) = check_identity(&applied, res, &ns, &name) {
        return fail(status(StatusCode::BAD_REQUEST, "BadRequest", &e));
    }
    let key: Key = (res.plural, ns.clone(), name.clone());
    let mut db = shared.db.lock().unwrap();
    let existing = db.objects.get(&key).cloned();
    if existing.is_none() {
        if t.status {
            return fail(status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{name}\" not found", res.plural),
            ));
        }
        // An apply that creates is authorized as create too.
        let mut create = recorded.clone();
        create.verb = "create".into();
        shared.log.lock().unwrap().push(create);
    }
    let akey: AppliedKey = (res.plural, ns, name, manager, t.status);
    let previous = db.applied.get(&akey).cloned();
    let mut next = existing.clone().unwrap_or_else(|| json!({}));
    let mine = if t.status {
        let mine = json!({"status": applied.get("status").cloned().unwrap_or(json!({}))});
        let mut st = json!({"status": next.get("status").cloned().unwrap_or(json!({}))});
        if let Some(prev) = &previous {
            prune(&mut st, prev, &mine);
        }
        merge(&mut st, &mine);
        next["status"] = st["status"].take();
        mine
    } else {
        let mut mine = applied;
        if res.status {
            if let Some(m) = mine.as_object_mut() {
                m.remove("status");
            }
        }
        if let Some(prev) = &previous {
            prune(&mut next, prev, &mine);
        }
        merge(&mut next, &mine);
        mine
    };
    if res.plural.ends_with("rolebindings") && existing.as_ref().map(|e| &e["roleRef"]) != Some(&next["roleRef"]) {
        if existing.is_some() {
            // kube-apiserver's validation: a binding's role never changes.
            let r = status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                &format!(
                    "{} \"{}\" is invalid: roleRef: Invalid value: cannot change roleRef",
                    res.kind, key.2
                ),
            );
            return fail(r);
        }
        record_bind(shared, recorded, &next["roleRef"]);
    }
    db.applied.insert(akey, mine);
    if existing.as_ref() == Some(&next) {
        return (json_reply(StatusCode::OK, &res.present(next)), false);
    }
    let code = if existing.is_none() {
        initialize(&mut db, res, &mut next);
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    store(&mut db, &shared.live, res, key.clone(), next, existing);
    let stored = db.objects.get(&key).cloned().unwrap_or_default();
    (json_reply(code, &res.present(stored)), true)
}

/// The applied configuration names the object the path names.
fn check_identity(applied: &Value, res: &Res, ns: &str, name: &str) -> Result<(), String> {
    let (av, kind) = (applied["apiVersion"].as_str(), applied["kind"].as_str());
    if av != Some(&res.api_version()) || kind != Some(res.kind) {
        return Err(format!(
            "the applied configuration is {av:?} {kind:?}, the path {} {}",
            res.api_version(),
            res.kind
        ));
    }
    if applied["metadata"]["name"].as_str() != Some(name) {
        return Err(format!("metadata.name must be {name:?}"));
    }
    match applied["metadata"]["namespace"].as_str() {
        Some(n) if res.namespaced && n != ns => Err(format!("metadata.namespace must be {ns:?}")),
        _ => Ok(()),
    }
}

/// What the API server fills in on create.
fn initialize(db: &mut Db, res: &Res, v: &mut Value) {
    let uid = format!("00000000-0000-4000-9000-{:012}", db.rv + 1);
    v["metadata"]["uid"] = json!(uid);
    if res.namespaced && v["metadata"]["namespace"].is_null() {
        v["metadata"]["namespace"] = json!("default");
    }
    if res.plural == "services" {
        let ty = v["spec"]["type"].as_str().unwrap_or("ClusterIP");
        if matches!(ty, "ClusterIP" | "NodePort" | "LoadBalancer") && v["spec"]["clusterIP"].is_null() {
            db.cluster_ips += 1;
            let ip = format!("10.96.{}.{}", db.cluster_ips / 250, db.cluster_ips % 250 + 1);
            v["spec"]["clusterIP"] = json!(ip);
            v["spec"]["clusterIPs"] = json!([ip]);
        }
    }
}

/// kube-apiserver's RBAC escalation check: writing a binding to a role
/// whose permissions the writer does not hold needs `bind` on that role.
fn record_bind(shared: &Shared, recorded: &Recorded, role_ref: &Value) {
    let kind = role_ref["kind"].as_str().unwrap_or("");
    let name = role_ref["name"].as_str().unwrap_or("");
    let resource = if kind == "ClusterRole" { "clusterroles" } else { "roles" };
    let mut bind = recorded.clone();
    bind.verb = "bind".into();
    bind.group = "rbac.authorization.k8s.io".into();
    bind.resource = resource.into();
    bind.path = format!("{resource}/{name}");
    shared.log.lock().unwrap().push(bind);
}

/// The key of a list its schema declares `listType: map`: `conditions`
/// (metav1.Condition and the core types' conditions) by `type`. Each
/// manager then owns its own entries: two controllers writing conditions
/// of different types to one object keep each other's.
fn list_key(field: &str) -> Option<&'static str> {
    (field == "conditions").then_some("type")
}

/// Deep merge: objects key by key, keyed lists entry by entry, anything
/// else replaced.
fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, vb) in b {
                match (a.get_mut(k), vb, list_key(k)) {
                    (Some(va), _, _) if va.is_object() && vb.is_object() => merge(va, vb),
                    (Some(Value::Array(items)), Value::Array(new), Some(key)) => {
                        for n in new {
                            match items.iter_mut().find(|i| i.get(key) == n.get(key)) {
                                Some(i) => *i = n.clone(),
                                None => items.push(n.clone()),
                            }
                        }
                    }
                    _ => {
                        a.insert(k.clone(), vb.clone());
                    }
                }
            }
        }
        (into, from) => *into = from.clone(),
    }
}

/// Removes from `v` what `before` set and `now` no longer does (of a keyed
/// list, only the entries whose keys `before` had and `now` has not).
fn prune(v: &mut Value, before: &Value, now: &Value) {
    let (Some(obj), Some(before)) = (v.as_object_mut(), before.as_object()) else {
        return;
    };
    for (k, vb) in before {
        if let (Some(key), Some(Value::Array(items)), Some(old)) = (list_key(k), obj.get_mut(k), vb.as_array()) {
            let kept: Vec<&Value> = now.get(k).and_then(Value::as_array).into_iter().flatten().collect();
            let dropped = |i: &Value| {
                old.iter().any(|o| o.get(key) == i.get(key)) && !kept.iter().any(|n| n.get(key) == i.get(key))
            };
            items.retain(|i| !dropped(i));
            if items.is_empty() {
                obj.remove(k);
            }
            continue;
        }
        match now.get(k) {
            None => {
                obj.remove(k);
            }
            Some(vn) if vb.is_object() && vn.is_object() => {
                if let Some(child) = obj.get_mut(k) {
                    prune(child, vb, vn);
                }
            }
            Some(_) => {}
        }
    }
}

/// `DELETE` of one object.
pub(super) fn delete_request(
    shared: &Shared,
    t: &Target,
    q: &HashMap<String, String>,
    body: &Bytes,
) -> (Response<Body>, bool) {
    let Some(name) = t.name.clone() else {
        let r = status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the stand-in deletes one object at a time",
        );
        return (r, false);
    };
    let from_body = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|b| b["propagationPolicy"].as_str().map(str::to_string));
    let policy = q.get("propagationPolicy").cloned().or(from_body);
    let propagation = match policy.as_deref().map(Propagation::parse) {
        None => Propagation::Background,
        Some(Some(p)) => p,
        Some(None) => {
            let r = status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("unknown propagationPolicy {policy:?}"),
            );
            return (r, false);
        }
    };
    let ns = if t.res.namespaced {
        t.namespace.clone().unwrap_or_default()
    } else {
        String::new()
    };
    let mut db = shared.db.lock().unwrap();
    match delete(&mut db, &shared.live, t.res, &ns, &name, propagation) {
        Some(_) => (
            json_reply(
                StatusCode::OK,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                        "details": {"name": name, "kind": t.res.plural}}),
            ),
            true,
        ),
        None => (
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{name}\" not found", t.res.plural),
            ),
            false,
        ),
    }
}

/// Deletes an object and collects its dependents; the deleted object.
pub(super) fn delete(
    db: &mut Db,
    live: &broadcast::Sender<Change>,
    res: &'static Res,
    ns: &str,
    name: &str,
    propagation: Propagation,
) -> Option<Value> {
    let key: Key = (res.plural, ns.to_string(), name.to_string());
    let object = db.objects.get(&key).cloned()?;
    let uid = object["metadata"]["uid"].as_str().unwrap_or_default().to_string();
    let dependents = if uid.is_empty() {
        Vec::new()
    } else {
        dependents_of(db, &uid, res.namespaced.then_some(ns))
    };
    if propagation == Propagation::Foreground {
        for (dres, dkey) in &dependents {
            if !has_other_live_owner(db, dkey, &uid) {
                delete(db, live, dres, &dkey.1, &dkey.2, Propagation::Foreground);
            }
        }
    }
    remove(db, live, res, &key);
    for (dres, dkey) in dependents {
        match propagation {
            Propagation::Foreground => {}
            Propagation::Background => {
                if !has_other_live_owner(db, &dkey, &uid) {
                    delete(db, live, dres, &dkey.1, &dkey.2, Propagation::Background);
                }
            }
            Propagation::Orphan => {
                let Some(old) = db.objects.get(&dkey).cloned() else {
                    continue;
                };
                let mut v = old.clone();
                if let Some(refs) = v["metadata"]["ownerReferences"].as_array_mut() {
                    refs.retain(|r| r["uid"].as_str() != Some(uid.as_str()));
                }
                store(db, live, dres, dkey, v, Some(old));
            }
        }
    }
    Some(object)
}

fn remove(db: &mut Db, live: &broadcast::Sender<Change>, res: &'static Res, key: &Key) {
    let Some(mut v) = db.objects.remove(key) else { return };
    db.applied
        .retain(|(plural, ns, name, _, _), _| (*plural, ns, name) != (key.0, &key.1, &key.2));
    db.rv += 1;
    v["metadata"]["resourceVersion"] = json!(db.rv.to_string());
    record_change(db, live, res, "DELETED", v, None);
}

/// Objects that name `uid` as an owner and that the GC would collect:
/// with a namespaced owner (`owner_ns`), namespaced objects of that namespace.
fn dependents_of(db: &Db, uid: &str, owner_ns: Option<&str>) -> Vec<(&'static Res, Key)> {
    db.objects
        .iter()
        .filter(|(_, v)| owner_uids(v).any(|u| u == uid))
        .filter_map(|((plural, ns, name), _)| {
            let res = RESOURCES.iter().find(|r| r.plural == *plural)?;
            let collectable = match owner_ns {
                Some(owner_ns) => res.namespaced && ns == owner_ns,
                None => true,
            };
            collectable.then(|| (res, (*plural, ns.clone(), name.clone())))
        })
        .collect()
}

fn owner_uids(v: &Value) -> impl Iterator<Item = &str> {
    v["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["uid"].as_str())
}

/// Whether the object at `key` has an owner other than `uid` that still exists.
fn has_other_live_owner(db: &Db, key: &Key, uid: &str) -> bool {
    let Some(v) = db.objects.get(key) else { return false };
    let live: Vec<&str> = db
        .objects
        .values()
        .filter_map(|o| o["metadata"]["uid"].as_str())
        .collect();
    owner_uids(v).any(|u| u != uid && live.contains(&u))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(plural: &str) -> &'static Res {
        RESOURCES.iter().find(|r| r.plural == plural).unwrap()
    }

    fn put(db: &mut Db, live: &broadcast::Sender<Change>, plural: &str, ns: &str, name: &str, owners: &[&str]) {
        let refs: Vec<Value> = owners.iter().map(|u| json!({"uid": u})).collect();
        let v =
            json!({"metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "ownerReferences": refs}});
        let r = res(plural);
        store(
            db,
            live,
            r,
            (
                r.plural,
                if r.namespaced { ns.into() } else { String::new() },
                name.into(),
            ),
            v,
            None,
        );
    }

    fn names(db: &Db) -> Vec<String> {
        db.objects.keys().map(|(_, _, n)| n.clone()).collect()
    }

    /// The garbage collector as kube's: namespaced dependents in the owner's
    /// namespace go (unless another owner is alive), a cluster-scoped
    /// dependent of a namespaced owner and one in another namespace stay;
    /// Orphan removes only the reference.
    #[test]
    fn deletion_collects_dependents_as_the_garbage_collector_does() {
        let (live, _) = broadcast::channel(64);
        for propagation in [Propagation::Background, Propagation::Foreground, Propagation::Orphan] {
            let mut db = Db::default();
            put(&mut db, &live, "gateways", "apps", "gw", &[]);
            put(&mut db, &live, "configmaps", "apps", "other-owner", &[]);
            put(&mut db, &live, "deployments", "apps", "dep", &["uid-gw"]);
            put(&mut db, &live, "pods", "apps", "grandchild", &["uid-dep"]);
            put(
                &mut db,
                &live,
                "services",
                "apps",
                "shared",
                &["uid-gw", "uid-other-owner"],
            );
            put(&mut db, &live, "services", "elsewhere", "foreign", &["uid-gw"]);
            put(&mut db, &live, "clusterrolebindings", "", "crb", &["uid-gw"]);
            assert!(delete(&mut db, &live, res("gateways"), "apps", "gw", propagation).is_some());
            let left = names(&db);
            let kept = ["other-owner", "shared", "foreign", "crb"];
            for k in kept {
                assert!(
                    left.contains(&k.to_string()),
                    "{propagation:?}: {k} must stay: {left:?}"
                );
            }
            let collected = !matches!(propagation, Propagation::Orphan);
            for k in ["dep", "grandchild"] {
                assert_eq!(
                    !left.contains(&k.to_string()),
                    collected,
                    "{propagation:?}: {k}: {left:?}"
                );
            }
            if !collected {
                let dep = &db.objects[&("deployments", "apps".to_string(), "dep".to_string())];
                assert_eq!(dep["metadata"]["ownerReferences"], json!([]), "orphaned");
            }
        }
    }

    /// Conditions are a keyed list (`listType: map`, key `type`): a
    /// manager's apply merges its entries with the other managers' and
    /// removes only its own that it stopped applying.
    #[test]
    fn conditions_merge_by_type_and_each_manager_prunes_only_its_own() {
        let cond = |t: &str, s: &str| json!({"type": t, "status": s});
        let mut stored = json!({"status": {"conditions": [cond("Other", "True"), cond("Mine", "False")]}});
        let mine = json!({"status": {"conditions": [cond("Mine", "True")]}});
        merge(&mut stored, &mine);
        assert_eq!(
            stored,
            json!({"status": {"conditions": [cond("Other", "True"), cond("Mine", "True")]}})
        );
        let none = json!({"status": {}});
        prune(&mut stored, &mine, &none);
        merge(&mut stored, &none);
        assert_eq!(stored, json!({"status": {"conditions": [cond("Other", "True")]}}));
        prune(
            &mut stored,
            &json!({"status": {"conditions": [cond("Other", "True")]}}),
            &none,
        );
        assert_eq!(stored, json!({"status": {}}), "an emptied list goes");
    }

    #[test]
    fn apply_merges_and_prunes_what_the_manager_dropped() {
        let mut stored = json!({"metadata": {"labels": {"a": "1", "b": "2", "other": "x"}}, "spec": {"replicas": 5}});
        let before = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"replicas": 2}});
        let now = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"replicas": 2}});
        prune(&mut stored, &before, &now);
        merge(&mut stored, &now);
        assert_eq!(
            stored,
            json!({"metadata": {"labels": {"a": "1", "other": "x"}}, "spec": {"replicas": 2}})
        );
    }
}
