//! `cargo xtask fuzz [--time SECS] [--seed N] [--fresh] [TARGET...]`:
//! builds every fuzz target of `fuzz/` once (cargo-fuzz, nightly), then
//! runs each for a fixed time from a copy of its checked-in seeds; a crash
//! fails the run with the panic, the input (printed: a CI machine is gone
//! once it fails) and the command that replays it.
//!
//! `cargo xtask test` runs every target as CI must: `--seed` fixed and
//! `--fresh` (from the checked-in seeds only, in a corpus of its own, not
//! what earlier runs found), so a commit's CI run draws the same inputs on
//! every machine (a slower one stops sooner in the sequence; as far as the
//! targets are deterministic), and a finding replays with the same command
//! here. Exploring for new findings is `cargo xtask fuzz` without them
//! (libFuzzer picks a seed per run; the working corpus is kept).
//!
//! Build choices (README "Fuzzing"): no sanitizer (the targets and the code
//! they reach are safe Rust: ASan finds memory errors, not panics, and
//! doubles the build), 16 codegen units (the default single unit makes the
//! cold build much longer for no difference a 30 s run can see), release
//! with debug assertions (cargo-fuzz's default). Everything lives under
//! `target/fuzz` (its own flags rebuild every dependency anyway, so it
//! cannot share the workspace's builds; reruns are incremental).
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{apt_install, root, run, setup};

/// Pinned: cargo-fuzz 0.13.2 installs with the image's stable 1.95 from
/// its own Cargo.lock and drives the image's nightly; libfuzzer-sys is
/// pinned in fuzz/Cargo.toml (with fuzz/Cargo.lock).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Seconds per target when not told (`--time`).
const DEFAULT_SECS: u64 = 30;
/// One input taking longer than this is a finding (a hang).
const INPUT_TIMEOUT_SECS: u64 = 10;
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// The seed CI's runs use (any fixed value does; changing it changes what
/// CI explores).
const CI_SEED: u32 = 1;

/// How the targets run.
struct Opts {
    secs: u64,
    seed: Option<u32>,
    /// Start from the checked-in seeds only.
    fresh: bool,
    wanted: Vec<String>,
}

/// `cargo xtask fuzz ARGS`.
pub fn fuzz(args: &[String]) -> Result<()> {
    fuzz_with(parse_args(args)?)
}

/// Every target as CI runs it (`cargo xtask test`): the fixed seed, from
/// the checked-in seeds only, for the default time.
pub fn ci() -> Result<()> {
    fuzz_with(Opts {
        secs: DEFAULT_SECS,
        seed: Some(CI_SEED),
        fresh: true,
        wanted: Vec::new(),
    })
}

fn fuzz_with(opts: Opts) -> Result<()> {
    setup()?;
    // libfuzzer-sys compiles libFuzzer (C++).
    apt_install(&["g++"])?;
    let targets = targets(&opts.wanted)?;
    let tool = install()?;
    check_fmt()?;
    let started = Instant::now();
    run(&mut cargo_fuzz(&tool, "build"))?;
    eprintln!("fuzz: build took {:.0?}", started.elapsed());
    let mut failed = Vec::new();
    for t in &targets {
        if let Err(e) = run_target(t, &opts) {
            eprintln!("fuzz: {t} FAILED: {e:#}");
            failed.push(t.clone());
        }
    }
    println!("fuzz: {} passed, {} failed", targets.len() - failed.len(), failed.len());
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

fn parse_args(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        secs: DEFAULT_SECS,
        seed: None,
        fresh: false,
        wanted: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => {
                let v = it.next().context("--time needs a number of seconds")?;
                o.secs = v
                    .parse()
                    .with_context(|| format!("--time {v}: not a number of seconds"))?;
            }
            "--seed" => {
                let v = it.next().context("--seed needs a number")?;
                let n: u32 = v.parse().with_context(|| format!("--seed {v}: not a number"))?;
                // libFuzzer reads 0 as "pick one".
                if n == 0 {
                    bail!("--seed 0 means a random seed to libFuzzer: give 1 or more, or leave --seed out");
                }
                o.seed = Some(n);
            }
            "--fresh" => o.fresh = true,
            t if t.starts_with("--") => bail!("unknown option {t}: fuzz takes --time, --seed, --fresh"),
            t => o.wanted.push(t.to_string()),
        }
    }
    Ok(o)
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

/// Everything the runs write: builds, working corpora, crashes, logs.
fn work_dir() -> PathBuf {
    root().join("target/fuzz")
}

/// The targets asked for (all of `fuzz/fuzz_targets` when none).
fn targets(wanted: &[String]) -> Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut all: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".rs").map(str::to_string))
        .collect();
    all.sort();
    if wanted.is_empty() {
        return Ok(all);
    }
    for w in wanted {
        if !all.contains(w) {
            bail!("no fuzz target `{w}`; there are: {}", all.join(", "));
        }
    }
    Ok(wanted.to_vec())
}

/// cargo-fuzz, pinned, into `target/tools` (idempotent).
fn install() -> Result<PathBuf> {
    let tools = root().join("target/tools");
    let bin = tools.join("bin/cargo-fuzz");
    let installed = Command::new(&bin).arg("--version").output();
    if !installed.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)) {
        run(crate::cargo()
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
                "--root",
            ])
            .arg(&tools))?;
    }
    Ok(bin)
}

/// The fuzz crate is a workspace of its own: the workspace's fmt check
/// does not see it.
fn check_fmt() -> Result<()> {
    run(crate::cargo()
        .args(["fmt", "--all", "--manifest-path"])
        .arg(fuzz_dir().join("Cargo.toml"))
        .args(["--", "--check"]))
}

/// `cargo fuzz <cmd>` on the image's nightly, with the build choices above.
fn cargo_fuzz(tool: &Path, cmd: &str) -> Command {
    let mut c = Command::new(tool);
    c.current_dir(root())
        .args(["fuzz", cmd, "--fuzz-dir"])
        .arg(fuzz_dir())
        .arg("--target-dir")
        .arg(work_dir())
        .args(["--sanitizer", "none", "--codegen-units", "16"])
        // cargo-fuzz runs `cargo`: the rustup proxy, on nightly; the
        // workspace's own (stable) cargo and flags must not leak in.
        .env("RUSTUP_TOOLCHAIN", "nightly")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    // `cargo run` gives xtask its package's CARGO_PKG_* and
    // CARGO_MANIFEST_*; build scripts (ring's) rerun when those change, so
    // leaked they would rebuild half the tree between a run from xtask and
    // one from a shell.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let leaked = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
        ];
        if leaked.iter().any(|p| k.starts_with(p)) {
            c.env_remove(k);
        }
    }
    c
}

/// One target for `secs` seconds, from a working copy of its seeds (new
/// inputs it finds stay there, outside the repository). A `--fresh` run
/// works in a copy of its own, emptied first: the explorer's corpus stays.
fn run_target(t: &str, opts: &Opts) -> Result<()> {
    let seeds = fuzz_dir().join("corpus").join(t);
    let corpus = work_dir()
        .join(if opts.fresh { "fresh-corpus" } else { "corpus" })
        .join(t);
    if opts.fresh && corpus.exists() {
        std::fs::remove_dir_all(&corpus).with_context(|| format!("cannot empty {}", corpus.display()))?;
    }
    let artifacts = work_dir().join("artifacts").join(t);
    let log = work_dir().join("logs").join(format!("{t}.log"));
    for d in [&corpus, &artifacts, &log.parent().expect("a dir").to_path_buf()] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    copy_seeds(&seeds, &corpus)?;
    let bin = work_dir().join(TRIPLE).join("release").join(t);
    let mut c = Command::new(&bin);
    c.arg(&corpus)
        .arg(format!("-max_total_time={}", opts.secs))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .current_dir(root());
    if let Some(seed) = opts.seed {
        c.arg(format!("-seed={seed}"));
    }
    eprintln!("+ {c:?}");
    let out = c.output().with_context(|| format!("cannot run {}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stderr);
    std::fs::write(&log, text.as_bytes()).with_context(|| format!("cannot write {}", log.display()))?;
    eprintln!("fuzz: {t}: {} (log: {})", summary(&text), log.display());
    if out.status.success() {
        return Ok(());
    }
    // libFuzzer's verdict and stats; the panic itself is printed below.
    let tail: Vec<&str> = text.lines().rev().take(12).collect();
    for l in tail.iter().rev() {
        eprintln!("  {l}");
    }
    match text.lines().find_map(|l| l.split("Test unit written to ").nth(1)) {
        Some(unit) => {
            print_finding(&text, Path::new(unit));
            if let Some(seed) = opts.seed {
                // The same inputs in the same order, as far as this run got
                // (a time limit: a slower machine stops sooner).
                let fresh = if opts.fresh { " --fresh" } else { "" };
                eprintln!(
                    "  the same run again: cargo xtask fuzz --seed {seed}{fresh} --time {} {t}",
                    opts.secs
                );
            }
            bail!(
            "{t} crashed on {unit}\n  reproduce: {} {unit}\n  or: cargo +nightly fuzz run --fuzz-dir fuzz --sanitizer none {t} {unit}\n  then turn it into a unit test next to the code (README \"Fuzzing\")",
            bin.display()
            )
        }
        None => bail!("{t} exited with {} (log: {})", out.status, log.display()),
    }
}

/// Longest crashing input printed whole; a CI machine is gone once the run
/// fails, so the log must carry what replays the finding.
const MAX_PRINTED_INPUT: usize = 16 * 1024;

/// The panic message (libFuzzer's tail is mostly backtrace) and the input,
/// escaped as a Rust byte string literal (`b"..."` replays it exactly).
fn print_finding(log: &str, unit: &Path) {
    let panic: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("panicked at"))
        .take_while(|l| !l.starts_with("stack backtrace"))
        .take(40)
        .collect();
    for l in panic {
        eprintln!("  {l}");
    }
    match std::fs::read(unit) {
        Ok(bytes) if bytes.len() <= MAX_PRINTED_INPUT => {
            eprintln!("  input ({} bytes): b\"{}\"", bytes.len(), bytes.escape_ascii())
        }
        Ok(bytes) => eprintln!("  input: {} bytes, too long to print", bytes.len()),
        Err(e) => eprintln!("  input: cannot read {}: {e}", unit.display()),
    }
}

/// Adds the checked-in seeds the working corpus does not have yet.
fn copy_seeds(seeds: &Path, corpus: &Path) -> Result<()> {
    let entries = std::fs::read_dir(seeds).with_context(|| format!("no seed corpus at {}", seeds.display()))?;
    for e in entries {
        let e = e?;
        let to = corpus.join(e.file_name());
        if !to.exists() {
            std::fs::copy(e.path(), &to).with_context(|| format!("cannot copy {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Executions, their rate and the coverage reached (libFuzzer's last
/// status line and final stats).
fn summary(log: &str) -> String {
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map_or("?".to_string(), |v| v.trim().to_string())
    };
    let cov = log
        .lines()
        .rev()
        .find_map(|l| l.split(" cov: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("?");
    format!(
        "{} runs, {} exec/s, cov {cov}",
        stat("number_of_executed_units"),
        stat("average_exec_per_sec")
    )
}
