//! The enrolment file (`cluster::config::LocalConfig::parse`: YAML, then
//! the semantic checks) and the model the agent and the waypoint build
//! from it (`cluster::state::State::update`). A file that parses
//! serializes to YAML that parses back to the same configuration, and an
//! update that reuses an earlier snapshot's copies equals a fresh one.
#![no_main]

use std::path::Path;

use cluster::{config::LocalConfig, state::State};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("enrolment.yaml");
    let cfg = match LocalConfig::parse(path, text) {
        Ok(cfg) => cfg,
        Err(e) => {
            // Errors are typed and name the file.
            assert!(e.to_string().contains("enrolment.yaml"), "{e}");
            return;
        }
    };
    let yaml = serde_yaml::to_string(&cfg).expect("a parsed configuration serializes");
    let again = LocalConfig::parse(path, &yaml).unwrap_or_else(|e| panic!("its own YAML does not parse: {e}\n{yaml}"));
    assert_eq!(cfg, again, "{yaml}");
    let state = State::default();
    state.update(&cfg, "cluster.local");
    for pod in &cfg.pods {
        let _ = cfg.pods_on(&pod.node).count();
        for ip in &pod.ips {
            let w = state.by_ip(*ip).expect("every pod address is a workload");
            assert_eq!(*w.key, *pod.key());
        }
    }
    // An update from an earlier snapshot (half the pods and services, in
    // reverse) shares what did not change, and builds exactly what a
    // fresh one builds.
    let mut earlier = cfg.clone();
    earlier.pods.reverse();
    earlier.pods.truncate(cfg.pods.len().div_ceil(2));
    earlier.services.reverse();
    earlier.services.truncate(cfg.services.len().div_ceil(2));
    let reused = State::default();
    reused.update(&earlier, "cluster.local");
    reused.update(&cfg, "cluster.local");
    let (fresh, reused) = (state.snapshot(), reused.snapshot());
    assert_eq!(fresh.workloads, reused.workloads);
    assert_eq!((&fresh.vips, &fresh.hosts), (&reused.vips, &reused.hosts));
    assert_eq!(fresh.services.len(), reused.services.len());
    for (f, r) in fresh.services.iter().zip(&reused.services) {
        assert_eq!(
            (&f.spec, &f.endpoints, &f.waypoint),
            (&r.spec, &r.endpoints, &r.waypoint)
        );
    }
});
