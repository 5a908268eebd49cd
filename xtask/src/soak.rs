//! `cargo xtask soak [--quick] [mesh-soak flags]`: the soak run (not part
//! of CI): the image's release binaries as for `bench`, then `mesh-soak`,
//! which holds `/tmp/bench.lock` for a full run (benchmarks on the shared
//! machine wait for it) and writes `target/soak/soak.json`.
use std::process::Command;

use anyhow::Result;

use crate::{build_release, root, run, ship_dir};

pub fn soak(args: &[String]) -> Result<()> {
    build_release()?;
    run(Command::new(ship_dir().join("mesh-soak"))
        .args(args)
        .current_dir(root()))
}
