//! Polling a configuration file for changes, one implementation for the
//! agent's enrolment file and the waypoint's enrolment and routes files.
//!
//! A change is taken only when two reads one poll apart agree: a file
//! caught mid-write by a writer that truncates and then writes (an editor,
//! `echo >`, `cp`) is never applied. An empty read taken at face value
//! would unenroll every pod or drop every route. Kubernetes ConfigMap
//! volumes swap files atomically and are not delayed by more than a poll.
use std::path::{Path, PathBuf};

/// One watched file: the text last taken and a change not settled yet.
#[derive(Debug)]
pub struct FileWatch {
    path: PathBuf,
    seen: String,
    pending: Option<String>,
}

impl FileWatch {
    /// Reads `path` once: its text is taken as it is (see [`Self::text`]).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self::new(path, std::fs::read_to_string(path)?))
    }

    fn new(path: &Path, seen: String) -> Self {
        Self {
            path: path.to_owned(),
            seen,
            pending: None,
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

    /// Reads the file once: `Ok(Some(text))` when it holds a change two
    /// consecutive reads agree on (taken: the next poll reports it no
    /// more), `Ok(None)` otherwise.
    pub fn poll(&mut self) -> std::io::Result<Option<&str>> {
        let text = std::fs::read_to_string(&self.path)?;
        Ok(self.settle(text).then_some(self.seen.as_str()))
    }

    fn settle(&mut self, text: String) -> bool {
        if text == self.seen {
            self.pending = None;
            return false;
        }
        if self.pending.as_ref() != Some(&text) {
            self.pending = Some(text);
            return false;
        }
        self.pending = None;
        self.seen = text;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_taken_only_when_two_reads_agree() {
        let mut f = FileWatch::new(Path::new("mesh.yaml"), "pods: [a]".into());
        assert!(!f.settle("pods: [a]".into()), "unchanged");
        // A writer that truncates then writes: the empty read is never taken.
        assert!(!f.settle(String::new()));
        assert!(!f.settle("pods: [b]".into()));
        assert!(f.settle("pods: [b]".into()));
        assert_eq!(f.seen, "pods: [b]");
        assert!(!f.settle("pods: [b]".into()), "taken once");
        // A change that reverts before it settles is dropped.
        assert!(!f.settle("pods: []".into()));
        assert!(!f.settle("pods: [b]".into()));
        assert!(!f.settle("pods: []".into()));
        assert_eq!(f.seen, "pods: [b]");
    }

    #[test]
    fn poll_reads_the_file_and_reports_errors() {
        let dir = std::env::temp_dir().join(format!("filewatch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("routes.yaml");
        std::fs::write(&path, "a").unwrap();
        let mut f = FileWatch::open(&path).unwrap();
        assert_eq!(f.text(), "a");
        assert_eq!(f.poll().unwrap(), None);
        std::fs::write(&path, "b").unwrap();
        assert_eq!(f.poll().unwrap(), None);
        assert_eq!(f.poll().unwrap(), Some("b"));
        std::fs::remove_file(&path).unwrap();
        assert!(f.poll().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
