//! The enrolment file (`cluster::config::LocalConfig::parse`: YAML, then
//! the semantic checks) and the model the agent and the waypoint build
//! from it (`cluster::state::State::update`). A file that parses
//! serializes to YAML that parses back to the same configuration.
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
});
