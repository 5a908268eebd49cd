//! Polling a configuration file for changes, one implementation for the
//! agent's enrolment file and the waypoint's enrolment and routes files.
//!
//! A change is taken only when two reads at least [`SETTLE`] apart agree:
//! a file caught mid-write by a writer that truncates and then writes (an
//! editor, `echo >`, `cp`) is never applied, even when the poller's ticks
//! bunch up after a stall. An empty file never replaces a non-empty one:
//! taken at face value it would unenroll every pod or drop every route,
//! and a writer stalled between its truncate and its write leaves exactly
//! that. Kubernetes ConfigMap volumes swap files atomically and are not
//! delayed by more than a poll.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a changed file must read the same before it is taken.
pub const SETTLE: Duration = Duration::from_millis(100);

/// One watched file: the text last taken and a change not settled yet.
#[derive(Debug)]
pub struct FileWatch {
    path: PathBuf,
    seen: String,
    /// A changed text and when it was first read.
    pending: Option<(String, Instant)>,
    /// An empty file was refused and reported; not again until it changes.
    refused_empty: bool,
}

/// What a poll found.
#[derive(Debug, PartialEq, Eq)]
pub enum Polled<'a> {
    /// Nothing to take (unchanged, or a change not settled yet).
    Nothing,
    /// A settled change: taken, the next poll reports it no more.
    Taken(&'a str),
    /// The file settled empty while the last text taken was not: refused
    /// (reported once per emptying), the last text stays in force.
    RefusedEmpty,
}

impl FileWatch {
    /// Reads `path` once: its text is taken as it is (see [`Self::text`]),
    /// even empty (nothing is in force yet that it could wipe out).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self::new(path, std::fs::read_to_string(path)?))
    }

    fn new(path: &Path, seen: String) -> Self {
        Self {
            path: path.to_owned(),
            seen,
            pending: None,
            refused_empty: false,
        }
    }

    /// The file watched.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The text last taken.
    pub fn text(&self) -> &str {
        &self.seen
    }

    /// Reads the file once and says whether it holds a settled change.
    pub fn poll(&mut self) -> std::io::Result<Polled<'_>> {
        let text = std::fs::read_to_string(&self.path)?;
        Ok(self.settle(text, Instant::now()))
    }

    fn settle(&mut self, text: String, now: Instant) -> Polled<'_> {
        if text == self.seen {
            self.pending = None;
            self.refused_empty = false;
            return Polled::Nothing;
        }
        match &self.pending {
            Some((p, since)) if *p == text && now.duration_since(*since) >= SETTLE => {}
            Some((p, _)) if *p == text => return Polled::Nothing,
            _ => {
                self.pending = Some((text, now));
                self.refused_empty = false;
                return Polled::Nothing;
            }
        }
        if text.trim().is_empty() && !self.seen.trim().is_empty() {
            if std::mem::replace(&mut self.refused_empty, true) {
                return Polled::Nothing;
            }
            return Polled::RefusedEmpty;
        }
        self.pending = None;
        self.seen = text;
        Polled::Taken(&self.seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settles `texts` read one after the other, `gap` apart.
    fn reads(f: &mut FileWatch, start: Instant, gap: Duration, texts: &[&str]) -> Vec<Option<String>> {
        let mut at = start;
        texts
            .iter()
            .map(|t| {
                at += gap;
                match f.settle(t.to_string(), at) {
                    Polled::Taken(t) => Some(t.to_owned()),
                    Polled::RefusedEmpty => Some("<refused>".to_owned()),
                    Polled::Nothing => None,
                }
            })
            .collect()
    }

    #[test]
    fn a_change_is_taken_only_when_two_reads_a_settle_apart_agree() {
        let mut f = FileWatch::new(Path::new("mesh.yaml"), "pods: [a]".into());
        let t0 = Instant::now();
        let took = reads(
            &mut f,
            t0,
            SETTLE,
            &["pods: [a]", "pods: [b]", "pods: [b]", "pods: [b]"],
        );
        assert_eq!(took, [None, None, Some("pods: [b]".into()), None], "taken once");
        // A writer that truncates then writes: the half-written read is never taken.
        let took = reads(&mut f, t0 + SETTLE * 10, SETTLE, &["pods:", "pods: [c]", "pods: [c]"]);
        assert_eq!(took, [None, None, Some("pods: [c]".into())]);
        // A change that reverts before it settles is dropped.
        let took = reads(&mut f, t0 + SETTLE * 20, SETTLE, &["pods: []", "pods: [c]", "pods: []"]);
        assert_eq!(took, [None, None, None]);
        assert_eq!(f.text(), "pods: [c]");
    }

    #[test]
    fn reads_bunched_up_after_a_stall_do_not_settle_a_change() {
        let mut f = FileWatch::new(Path::new("mesh.yaml"), "pods: [a]".into());
        let t0 = Instant::now();
        // Ticks that fire back to back read the same half-written file.
        let took = reads(&mut f, t0, Duration::from_micros(50), &["pods:", "pods:", "pods:"]);
        assert_eq!(took, [None, None, None]);
        let took = reads(&mut f, t0 + SETTLE, SETTLE, &["pods: [b]", "pods: [b]"]);
        assert_eq!(took, [None, Some("pods: [b]".into())]);
    }

    #[test]
    fn an_empty_file_never_replaces_a_non_empty_one_and_is_reported_once() {
        let mut f = FileWatch::new(Path::new("routes.yaml"), "kind: HTTPRoute".into());
        let t0 = Instant::now();
        let took = reads(&mut f, t0, SETTLE, &["", "\n", "\n", "\n", "\n"]);
        assert_eq!(took, [None, None, Some("<refused>".into()), None, None]);
        assert_eq!(f.text(), "kind: HTTPRoute");
        // A file that says it is empty on purpose is a change like any other.
        let took = reads(&mut f, t0 + SETTLE * 10, SETTLE, &["# no routes", "# no routes"]);
        assert_eq!(took, [None, Some("# no routes".into())]);
        // Emptied again: reported again.
        let took = reads(&mut f, t0 + SETTLE * 20, SETTLE, &["", ""]);
        assert_eq!(took, [None, Some("<refused>".into())]);
        // Nothing was in force: an empty file opens fine and may stay empty.
        let mut f = FileWatch::new(Path::new("mesh.yaml"), String::new());
        assert_eq!(reads(&mut f, t0, SETTLE, &["", ""]), [None, None]);
    }

    #[test]
    fn poll_reads_the_file_and_reports_errors() {
        let dir = std::env::temp_dir().join(format!("filewatch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("routes.yaml");
        std::fs::write(&path, "a").unwrap();
        let mut f = FileWatch::open(&path).unwrap();
        assert_eq!(f.text(), "a");
        assert_eq!(f.poll().unwrap(), Polled::Nothing);
        std::fs::write(&path, "b").unwrap();
        let written = Instant::now();
        let deadline = written + Duration::from_secs(5);
        while f.poll().unwrap() == Polled::Nothing {
            assert!(Instant::now() < deadline, "the change never settled");
        }
        assert!(written.elapsed() >= SETTLE, "taken before it settled");
        assert_eq!(f.text(), "b");
        std::fs::remove_file(&path).unwrap();
        assert!(f.poll().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
