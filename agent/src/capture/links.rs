//! Pinned links and the program each one runs.
//!
//! A link is a slot (one cgroup hook, or sk_lookup in one pod netns); the
//! pin keeps it attached without any agent. A starting agent does not make
//! new links where pinned ones exist: it swaps its own program into them
//! with `BPF_LINK_UPDATE` + `BPF_F_REPLACE`, which the kernel does under RCU
//! (every connect runs either the old or the new program: no window without
//! capture) and only if the program named as old is still the attached one
//! (a compare-and-swap).
//!
//! When to swap: only when the attached program behaves differently (kernel
//! tag *or* the maps it uses differ; the tag hashes the instructions with
//! map references zeroed, so a program that reads `STATS_V2` instead of
//! `STATS` has the same tag), and only when ours was loaded later. Load time
//! orders agents: the newest agent's programs win, whichever release it is,
//! so an upgrade and a downgrade work the same way, and a draining agent
//! that enrolls one more pod never rolls a newer agent's program back. An
//! agent that loses the compare-and-swap (EPERM: another agent swapped since
//! we looked) reads the link again and converges; it never fails for it.
use std::{
    io,
    os::fd::{AsFd, BorrowedFd},
    path::Path,
};

use aya::programs::links::FdLink;
use serde::Serialize;

use super::{sys, CaptureError};

/// Compare-and-swap attempts before giving up on a link that keeps
/// changing under us (two agents take a handful at most).
const MAX_TRIES: usize = 8;

/// What [`converge`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Converged {
    /// No link was pinned: ours is attached and pinned now.
    Attached,
    /// The attached program already behaves as ours.
    Kept,
    /// Ours replaced the program with this id.
    Replaced { old: u32 },
    /// A program loaded after ours (a newer agent) runs there: left alone.
    Newer { attached: u32 },
}

fn io_err<'a>(what: &'a str, pin: &'a Path) -> impl FnOnce(io::Error) -> CaptureError + 'a {
    move |e| CaptureError::Bpf {
        what: format!("{what} {}", pin.display()),
        message: e.to_string(),
    }
}

/// Makes the link pinned at `pin` run `prog` (see the module doc for when it
/// does not); attaches and pins a new link through `attach` when none is
/// pinned there.
pub fn converge(
    pin: &Path,
    prog: BorrowedFd<'_>,
    attach: &mut dyn FnMut() -> Result<FdLink, CaptureError>,
) -> Result<Converged, CaptureError> {
    let ours = sys::prog_info(prog).map_err(io_err("read our program for", pin))?;
    for _ in 0..MAX_TRIES {
        let link = match sys::obj_get(pin) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let link = attach()?;
                match link.pin(pin) {
                    Ok(_) => return Ok(Converged::Attached),
                    // Another agent pinned a link first: dropping ours
                    // detaches it; converge on theirs.
                    Err(_) if pin.exists() => continue,
                    Err(e) => return Err(io_err("pin", pin)(io::Error::other(e))),
                }
            }
            Err(e) => return Err(io_err("open pinned link", pin)(e)),
        };
        let current = sys::link_prog_id(link.as_fd()).map_err(io_err("read pinned link", pin))?;
        if current == ours.id {
            return Ok(Converged::Kept);
        }
        let old_fd = match sys::prog_fd_by_id(current) {
            Ok(fd) => fd,
            // Swapped and freed since we read the link: look again.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(io_err("open the program attached at", pin)(e)),
        };
        let old = sys::prog_info(old_fd.as_fd()).map_err(io_err("read the program attached at", pin))?;
        if old.same_behaviour(&ours) {
            return Ok(Converged::Kept);
        }
        if old.load_time > ours.load_time {
            return Ok(Converged::Newer { attached: old.id });
        }
        match sys::link_update(link.as_fd(), prog, old_fd.as_fd()) {
            Ok(()) => return Ok(Converged::Replaced { old: old.id }),
            // The attached program is no longer `old`: another agent won
            // the compare-and-swap. Read again.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => continue,
            // The hook is gone (cgroup removed, netns destroyed): the pin
            // holds a defunct link. Drop it and attach afresh.
            Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {
                let _ = std::fs::remove_file(pin);
                continue;
            }
            Err(e) => return Err(io_err("replace the program of", pin)(e)),
        }
    }
    Err(CaptureError::Bpf {
        what: format!("link {}", pin.display()),
        message: format!("its program kept changing under us ({MAX_TRIES} tries): is another agent with the same --pin-name restarting in a loop?"),
    })
}

/// A pinned link as `agent status` shows it: which program runs in each slot.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub pin: String,
    pub link_id: u32,
    pub prog_id: u32,
    pub prog_name: String,
    pub prog_tag: String,
    /// The maps the program uses, by name: the map layout in force.
    pub maps: Vec<String>,
}

/// Reads the link pinned at `path`; `None` when it is not a live link.
pub fn status(path: &Path) -> Option<LinkStatus> {
    let link = sys::obj_get(path).ok()?;
    let link_id = sys::link_id(link.as_fd()).ok()?;
    let prog_id = sys::link_prog_id(link.as_fd()).ok()?;
    let prog = sys::prog_fd_by_id(prog_id).ok()?;
    let info = sys::prog_info(prog.as_fd()).ok()?;
    let mut maps: Vec<String> = info
        .map_ids
        .iter()
        .filter_map(|id| aya::maps::MapInfo::from_id(*id).ok())
        .filter_map(|m| m.name_as_str().map(str::to_string))
        .collect();
    maps.sort();
    Some(LinkStatus {
        pin: path.file_name()?.to_string_lossy().into_owned(),
        link_id,
        prog_id,
        prog_name: info.name.clone(),
        prog_tag: info.tag_hex(),
        maps,
    })
}

/// The ids of every map used by the programs attached at the links pinned
/// in `dir`.
pub fn maps_in_use(dir: &Path) -> std::collections::HashSet<u32> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Default::default();
    };
    entries
        .filter_map(|e| {
            let link = sys::obj_get(&e.ok()?.path()).ok()?;
            let prog = sys::prog_fd_by_id(sys::link_prog_id(link.as_fd()).ok()?).ok()?;
            sys::prog_info(prog.as_fd()).ok()
        })
        .flat_map(|info| info.map_ids)
        .collect()
}
