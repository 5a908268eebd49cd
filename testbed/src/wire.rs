//! tcpdump on the wire between the nodes (the wire netns's `br0`, which
//! every node's link crosses): what an on-path observer sees. The HBONE
//! test and the soak search its capture for a plaintext marker; the
//! sockmap test captures a pod's `lo` the same way.
use std::{
    fs::File,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, ChildStderr, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::Cluster;

/// How long tcpdump may take to say it listens.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The kernel buffer tcpdump asks for, in KiB: a soak's bulk transfer
/// must not overrun it (tcpdump reports drops; [`Capture::stop`] returns them).
const BUFFER_KIB: &str = "65536";

/// A running capture of every TCP packet on the wire, written to a pcap file.
pub struct Capture {
    child: Option<Child>,
    stderr: BufReader<ChildStderr>,
    file: PathBuf,
}

/// What tcpdump said when it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub captured: u64,
    pub dropped_by_kernel: u64,
}

impl Capture {
    /// Starts tcpdump in the cluster's wire netns writing to `file`; returns
    /// once it says it is listening.
    pub fn start(cluster: &Cluster, file: PathBuf) -> Result<Capture> {
        Self::start_in(cluster.wire_netns(), "br0", file)
    }

    /// Starts tcpdump on `iface` of the network namespace `netns` (e.g. a
    /// pod's `lo`) writing to `file`; returns once it says it is listening.
    pub fn start_in(netns: &str, iface: &str, file: PathBuf) -> Result<Capture> {
        let mut child = Command::new("ip")
            // --immediate-mode: each packet reaches tcpdump at once. Without
            // it a short capture's packets wait in a half-filled ring block
            // that is never handed over before SIGINT: "242 packets received
            // by filter, 0 captured", and an empty file that proves nothing.
            .args([
                "netns",
                "exec",
                netns,
                "tcpdump",
                "-i",
                iface,
                "-U",
                "-n",
                "--immediate-mode",
            ])
            .args(["-B", BUFFER_KIB, "-w"])
            .arg(&file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start tcpdump (cargo xtask setup installs it)")?;
        let mut stderr = BufReader::new(child.stderr.take().context("stderr not piped")?);
        // tcpdump says "listening on br0" once it captures.
        let mut line = String::new();
        let deadline = Instant::now() + START_TIMEOUT;
        while !line.contains("listening on") {
            line.clear();
            if stderr.read_line(&mut line)? == 0 || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("tcpdump did not start: {line}");
            }
        }
        Ok(Capture {
            child: Some(child),
            stderr,
            file,
        })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Stops tcpdump (SIGINT: it flushes the file and prints its counts).
    pub fn stop(&mut self) -> Result<Stats> {
        let Some(mut child) = self.child.take() else {
            bail!("the capture is already stopped")
        };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        crate::mesh::wait_bounded(&mut child, START_TIMEOUT)?;
        // Its last words are a few lines: they wait in the pipe.
        let mut rest = String::new();
        let _ = self.stderr.read_to_string(&mut rest);
        Ok(parse_stats(&rest))
    }

    /// Stops and returns the whole capture file (small captures only).
    pub fn stop_and_read(mut self) -> Result<Vec<u8>> {
        self.stop()?;
        Ok(std::fs::read(&self.file)?)
    }

    /// Packets of the capture file matching a tcpdump filter.
    pub fn count(file: &Path, filter: &str) -> Result<usize> {
        let out = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(file)
            .arg(filter)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// "N packets captured" and "N packets dropped by kernel" of tcpdump's last words.
fn parse_stats(text: &str) -> Stats {
    let number = |suffix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_suffix(suffix)?.trim().parse().ok())
            .unwrap_or(0)
    };
    Stats {
        captured: number("packets captured"),
        dropped_by_kernel: number("packets dropped by kernel"),
    }
}

/// How often `needle` occurs in `file`, read in chunks (captures of a soak
/// are gigabytes); an occurrence across a chunk boundary counts too.
pub fn occurrences(file: &Path, needle: &[u8]) -> Result<u64> {
    anyhow::ensure!(!needle.is_empty(), "an empty needle matches everywhere");
    let finder = memchr::memmem::Finder::new(needle);
    let mut f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut buf = vec![0u8; 8 << 20];
    // The last needle.len() - 1 bytes of a chunk are kept ahead of the next.
    let keep = needle.len() - 1;
    let (mut filled, mut count) = (0usize, 0u64);
    loop {
        let n = f.read(&mut buf[filled..])?;
        let end = filled + n;
        count += finder.find_iter(&buf[..end]).count() as u64;
        if n == 0 {
            return Ok(count);
        }
        let tail = end.saturating_sub(keep);
        buf.copy_within(tail..end, 0);
        filled = end - tail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occurrences_are_counted_once_each_even_across_chunk_boundaries() {
        let dir = std::env::temp_dir().join(format!("wire-occ-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cap");
        let needle = b"PLAINTEXT-MARKER";
        let mut data = vec![b'.'; 20 << 20];
        // One straddles the first 8 MiB chunk boundary, two more further on.
        for at in [(8 << 20) - 5, 9 << 20, (20 << 20) - needle.len()] {
            data[at..at + needle.len()].copy_from_slice(needle);
        }
        std::fs::write(&file, &data).unwrap();
        let n = occurrences(&file, needle).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn tcpdump_counts_are_read_from_its_last_words() {
        let s = parse_stats("12 packets captured\n14 packets received by filter\n2 packets dropped by kernel\n");
        assert_eq!(
            s,
            Stats {
                captured: 12,
                dropped_by_kernel: 2
            }
        );
    }
}
