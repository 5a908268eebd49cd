//! Cluster prefixes and name validation.
//!
//! A prefix looks like `mt<pid>_<nn><label>`:
//! - `mt`: fixed marker so [`crate::sweep_stale`] recognises our objects,
//! - `<pid>`: the creating process id in base 36 (lowercase),
//! - `_`: separator,
//! - `<nn>`: a per-process counter, base 36, always two characters,
//! - `<label>`: as much of the sanitised label (`[a-z0-9]`) as fits in [`MAX_PREFIX_LEN`].
//!
//! The prefix never contains `-`, so in `<prefix>-<node>` netns names and
//! `<prefix>-...` bpffs paths the prefix ends at the first `-`.

use anyhow::{bail, Result};
use std::collections::HashSet;

/// Marker every prefix starts with.
pub const PREFIX_MARKER: &str = "mt";
/// Maximum length of a cluster prefix.
pub const MAX_PREFIX_LEN: usize = 12;
/// Number of distinct counter values (two base-36 digits).
pub(crate) const COUNTER_SPACE: u32 = 36 * 36;

/// Names that node and pod names may not take (they would collide with
/// `<prefix>-wire` or the `agent` cgroup).
const RESERVED: &[&str] = &["wire", "agent"];
/// Longest node or pod name accepted.
const MAX_NAME_LEN: usize = 64;

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n == 0 {
        return "0".to_string();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// Build the prefix for process `pid`, counter value `n` and a human `label`.
pub(crate) fn make_prefix(pid: u32, n: u32, label: &str) -> String {
    let counter = base36(u64::from(n % COUNTER_SPACE));
    let mut p = format!("{PREFIX_MARKER}{}_{counter:0>2}", base36(u64::from(pid)));
    for c in label.chars().filter(char::is_ascii_alphanumeric) {
        if p.len() >= MAX_PREFIX_LEN {
            break;
        }
        p.push(c.to_ascii_lowercase());
    }
    p
}

/// If `name` is one of our objects (`<prefix>` or `<prefix>-<rest>`), return
/// the creating pid and the prefix.
pub(crate) fn parse_prefix(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix(PREFIX_MARKER)?;
    let (pid36, after) = rest.split_once('_')?;
    if pid36.is_empty() || pid36.len() > 7 || !pid36.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()) {
        return None;
    }
    let pid = u32::from_str_radix(pid36, 36).ok()?;
    if pid == 0 {
        return None;
    }
    let tail_end = after.find('-').unwrap_or(after.len());
    let tail = &after[..tail_end];
    // Counter (2 chars) + optional label, all [0-9a-z].
    if tail.len() < 2 || !tail.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()) {
        return None;
    }
    let prefix_len = PREFIX_MARKER.len() + pid36.len() + 1 + tail_end;
    if prefix_len > MAX_PREFIX_LEN {
        return None;
    }
    Some((pid, &name[..prefix_len]))
}

pub(crate) fn validate_name(kind: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        bail!("{kind} name {name:?} must be 1..={MAX_NAME_LEN} characters");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        bail!("{kind} name {name:?} must start with [A-Za-z0-9] and contain only [A-Za-z0-9._-]");
    }
    if RESERVED.contains(&name) {
        bail!("{kind} name {name:?} is reserved");
    }
    Ok(())
}

/// Check a spec before anything is created.
pub(crate) fn validate_spec(spec: &crate::ClusterSpec) -> Result<()> {
    if spec.nodes.is_empty() {
        bail!("cluster spec has no nodes");
    }
    if spec.nodes.len() > 254 {
        bail!("cluster spec has {} nodes; at most 254 are supported", spec.nodes.len());
    }
    let mut seen = HashSet::new();
    for node in &spec.nodes {
        validate_name("node", &node.name)?;
        if !seen.insert(node.name.as_str()) {
            bail!(
                "name {:?} is used more than once (node and pod names share one namespace)",
                node.name
            );
        }
        if node.pods.len() > 244 {
            bail!(
                "node {:?} has {} pods; at most 244 per node are supported",
                node.name,
                node.pods.len()
            );
        }
        for pod in &node.pods {
            validate_name("pod", pod)?;
            if !seen.insert(pod.as_str()) {
                bail!("name {pod:?} is used more than once (node and pod names share one namespace)");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClusterSpec, NodeSpec};

    #[test]
    fn prefix_roundtrip_and_length() {
        for pid in [1u32, 35, 36, 3538, 32768, 4_194_304] {
            for n in [0u32, 1, 35, 36, 1295, 1296, 5000] {
                for label in ["", "x", "conn", "Very-Long_Label!!", "é🙂ab"] {
                    let p = make_prefix(pid, n, label);
                    assert!(p.len() <= MAX_PREFIX_LEN, "{p}");
                    assert!(p.starts_with(PREFIX_MARKER));
                    assert!(!p.contains('-'));
                    assert_eq!(parse_prefix(&p), Some((pid, p.as_str())), "{p}");
                    let ns = format!("{p}-node-1");
                    assert_eq!(parse_prefix(&ns), Some((pid, p.as_str())), "{ns}");
                }
            }
        }
    }

    #[test]
    fn prefix_counter_is_fixed_width() {
        // Counter+label must not be ambiguous: counter 1 + label "a" vs counter "1a".
        assert_ne!(make_prefix(7, 1, "a"), make_prefix(7, 36 + 10, ""));
        assert_eq!(make_prefix(7, 1, "abcdef"), "mt7_01abcdef");
        assert_eq!(make_prefix(3538, 0, "Conn Test"), "mt2qa_00conn");
    }

    #[test]
    fn foreign_names_are_not_ours() {
        // Note: a foreign "mtu_test" parses (pid 30, counter "te", label "st");
        // sweep_stale therefore also requires `<cg2>/<prefix>` or
        // `<prefix>-wire` to exist before it removes anything of a prefix.
        for n in [
            "mt_00",
            "mtA_00x",
            "mt1_0",
            "cni-1234",
            "mt1x00",
            "m",
            "mt12_0-a",
            "mt1_00ABC",
        ] {
            assert_eq!(parse_prefix(n), None, "{n}");
        }
        assert_eq!(parse_prefix("mt1_00verylonglabel"), None);
    }

    #[test]
    fn spec_validation() {
        let ok = ClusterSpec::new(vec![
            NodeSpec::new("node1", &["a", "b"]),
            NodeSpec::new("node2", &["c"]),
        ]);
        validate_spec(&ok).unwrap();
        let dup = ClusterSpec::new(vec![NodeSpec::new("node1", &["a"]), NodeSpec::new("node2", &["a"])]);
        assert!(validate_spec(&dup).is_err());
        let dup_node_pod = ClusterSpec::new(vec![NodeSpec::new("x", &["x"])]);
        assert!(validate_spec(&dup_node_pod).is_err());
        assert!(validate_spec(&ClusterSpec::new(vec![NodeSpec::new("n", &["agent"])])).is_err());
        assert!(validate_spec(&ClusterSpec::new(vec![NodeSpec::new("wire", &[])])).is_err());
        assert!(validate_spec(&ClusterSpec::new(vec![NodeSpec::new("a/b", &[])])).is_err());
        assert!(validate_spec(&ClusterSpec::new(vec![])).is_err());
    }
}
