//! Label maps as the mesh keeps them: one per distinct set of labels,
//! shared by every pod (and the records, specs and workloads of each) that
//! carries it.
//!
//! A `BTreeMap` was the obvious type, but its smallest node holds eleven
//! entries: a map of two labels took a 544-byte node (640 with the
//! allocator's rounding), a tenth of what the agent kept per pod of the
//! cluster. A [`LabelMap`] is the pairs in one sorted slice.
use std::{collections::BTreeMap, fmt, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A label map, shared between the copies of a pod ((de)serialized as a
/// plain map).
pub type Labels = Arc<LabelMap>;

/// Labels sorted by key, each key once: the read side of a `BTreeMap`
/// (lookups by binary search; a pod has a handful of labels).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelMap(Box<[(String, String)]>);

impl LabelMap {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// In key order, as a `BTreeMap` iterates.
    pub fn iter(&self) -> <&Self as IntoIterator>::IntoIter {
        self.into_iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every label of `selector` is here with the same value (an
    /// empty selector selects everything).
    pub fn has_all<'a>(&self, selector: impl IntoIterator<Item = (&'a String, &'a String)>) -> bool {
        selector.into_iter().all(|(k, v)| self.get(k) == Some(v))
    }

    /// Sets `key` (a copy of the pairs: maps are built once and shared, so
    /// this is for the rare edit, through `Arc::make_mut`).
    pub fn insert(&mut self, key: String, value: String) {
        match self.find(&key) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => {
                let mut pairs = std::mem::take(&mut self.0).into_vec();
                pairs.insert(i, (key, value));
                self.0 = pairs.into_boxed_slice();
            }
        }
    }

    /// Only the labels whose key `keep` accepts, as a `BTreeMap` (what the
    /// specs of namespaces and Services hold).
    pub fn to_map_of(&self, keep: impl Fn(&str) -> bool) -> BTreeMap<String, String> {
        self.0.iter().filter(|(k, _)| keep(k)).cloned().collect()
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }
}

/// Reads a label from either kind of map: the shared [`LabelMap`] of pods
/// and selectors, or the `BTreeMap` of a namespace or a Service's spec.
pub trait LabelGet {
    fn label(&self, key: &str) -> Option<&String>;
}

impl LabelGet for LabelMap {
    fn label(&self, key: &str) -> Option<&String> {
        self.get(key)
    }
}

impl LabelGet for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&String> {
        self.get(key)
    }
}

impl From<BTreeMap<String, String>> for LabelMap {
    fn from(map: BTreeMap<String, String>) -> Self {
        // Sorted and unique already.
        Self(map.into_iter().collect())
    }
}

impl FromIterator<(String, String)> for LabelMap {
    /// The last value of a key repeated wins, as inserting into a map.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        iter.into_iter().collect::<BTreeMap<_, _>>().into()
    }
}

impl<'a> IntoIterator for &'a LabelMap {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (String, String)>, fn(&'a (String, String)) -> Self::Item>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl std::ops::Index<&str> for LabelMap {
    type Output = String;
    fn index(&self, key: &str) -> &String {
        self.get(key).unwrap_or_else(|| panic!("no label {key}"))
    }
}

impl PartialEq<BTreeMap<String, String>> for LabelMap {
    fn eq(&self, other: &BTreeMap<String, String>) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl fmt::Debug for LabelMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for LabelMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for LabelMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(d).map(Self::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn reads_as_the_map_it_was_made_from() {
        let m = map(&[("version", "v1"), ("app", "a"), ("tier", "web")]);
        let l = LabelMap::from(m.clone());
        assert_eq!(l, m);
        assert_eq!(l.get("app").map(String::as_str), Some("a"));
        assert_eq!(l["tier"], "web");
        assert!(l.get("ap").is_none() && l.get("zz").is_none() && !l.contains_key(""));
        assert!(l.iter().eq(m.iter()), "in key order");
        assert_eq!((l.len(), l.is_empty()), (3, false));
        assert!(LabelMap::default().is_empty());
        // The last of a repeated key wins.
        let l: LabelMap = [("a".into(), "1".into()), ("a".into(), "2".into())]
            .into_iter()
            .collect();
        assert_eq!(l, map(&[("a", "2")]));
    }

    #[test]
    fn insert_keeps_the_keys_sorted() {
        let mut l = LabelMap::from(map(&[("b", "1")]));
        l.insert("c".into(), "3".into());
        l.insert("a".into(), "0".into());
        l.insert("b".into(), "2".into());
        assert_eq!(l, map(&[("a", "0"), ("b", "2"), ("c", "3")]));
        assert_eq!(l.to_map_of(|k| k != "b"), map(&[("a", "0"), ("c", "3")]));
    }

    #[test]
    fn has_all_is_a_subset_test() {
        let l = LabelMap::from(map(&[("app", "web"), ("tier", "front")]));
        assert!(l.has_all(&map(&[])));
        assert!(l.has_all(&map(&[("app", "web")])));
        assert!(l.has_all(&LabelMap::from(map(&[("tier", "front"), ("app", "web")]))));
        assert!(!l.has_all(&map(&[("app", "api")])));
        assert!(!l.has_all(&map(&[("app", "web"), ("zone", "a")])));
    }

    #[test]
    fn serialized_as_a_plain_map() {
        let l: LabelMap = serde_json::from_str(r#"{"b": "2", "a": "1"}"#).unwrap();
        assert_eq!(l, map(&[("a", "1"), ("b", "2")]));
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"{"a":"1","b":"2"}"#);
        assert_eq!(format!("{l:?}"), r#"{"a": "1", "b": "2"}"#);
    }

    #[test]
    fn two_labels_take_a_fraction_of_a_btree_node() {
        // The pairs' slice (two of 48 bytes) instead of an 11-entry node.
        assert_eq!(std::mem::size_of::<LabelMap>(), 16);
        assert_eq!(std::mem::size_of::<(String, String)>() * 2, 96);
    }
}
