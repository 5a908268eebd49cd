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

/// A new, not yet pinned link: one aya made, or one made with a raw
/// BPF_LINK_CREATE (aya 0.14 has no link for sk_msg on a map).
pub trait NewLink {
    fn pin_at(self, pin: &Path) -> Result<(), CaptureError>;
}

impl NewLink for FdLink {
    fn pin_at(self, pin: &Path) -> Result<(), CaptureError> {
        self.pin(pin)
            .map(drop)
            .map_err(|e| io_err("pin", pin)(io::Error::other(super::chain(&e))))
    }
}

impl NewLink for std::os::fd::OwnedFd {
    fn pin_at(self, pin: &Path) -> Result<(), CaptureError> {
        sys::obj_pin(self.as_fd(), pin).map_err(io_err("pin", pin))
    }
}

use super::{sys, CaptureError};

/// Compare-and-swap attempts before giving up on a link that keeps
/// changing under us (two agents take a handful at most).
const MAX_TRIES: usize = 8;

/// How [`converge`] replaces the program of a pinned link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    /// `BPF_LINK_UPDATE` with `BPF_F_REPLACE`: atomic, no moment without a
    /// program (cgroup, sk_lookup and sockmap links).
    InPlace,
    /// Unpin the old link, then attach and pin a new one: for links that
    /// cannot swap their program (tracing links). In between no program
    /// runs there.
    Reattach,
}

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
/// pinned there. `swap` says how a program is replaced.
pub fn converge<L: NewLink>(
    pin: &Path,
    prog: BorrowedFd<'_>,
    swap: Swap,
    attach: &mut dyn FnMut() -> Result<L, CaptureError>,
) -> Result<Converged, CaptureError> {
    let ours = sys::prog_info(prog).map_err(io_err("read our program for", pin))?;
    let mut replaced = None;
    for _ in 0..MAX_TRIES {
        let link = match sys::obj_get(pin) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let link = attach()?;
                match link.pin_at(pin) {
                    Ok(()) => {
                        return Ok(match replaced {
                            Some(old) => Converged::Replaced { old },
                            None => Converged::Attached,
                        })
                    }
                    // Another agent pinned a link first: dropping ours
                    // detaches it; converge on theirs.
                    Err(_) if pin.exists() => continue,
                    Err(e) => return Err(e),
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
        if swap == Swap::Reattach {
            // Unpinned, the old link detaches once no one holds it; ours
            // is attached on the next turn.
            drop(link);
            match std::fs::remove_file(pin) {
                Ok(()) => replaced = Some(old.id),
                // Another agent removed it first.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("detach", pin)(e)),
            }
            continue;
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

/// The id of the program the link pinned at `pin` runs now; `None` when
/// it is not a live link.
pub fn prog_of(pin: &Path) -> Option<u32> {
    let link = sys::obj_get(pin).ok()?;
    sys::link_prog_id(link.as_fd()).ok()
}

/// The ids of every map used by the programs attached at the links pinned
/// in `dir`.
pub fn maps_in_use(dir: &Path) -> std::collections::HashSet<u32> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Default::default();
    };
    entries
        .filter_map(|e| {
            let prog = sys::prog_fd_by_id(prog_of(&e.ok()?.path())?).ok()?;
            sys::prog_info(prog.as_fd()).ok()
        })
        .flat_map(|info| info.map_ids)
        .collect()
}

#[cfg(test)]
mod tests {
    //! Real programs, a real cgroup and real links: the kernel's
    //! compare-and-swap and our ordering of racing agents.
    use std::path::PathBuf;

    use agent_common::programs as progs;
    use aya::{
        programs::{CgroupAttachMode, CgroupSockAddr, ProgramFd},
        Ebpf, EbpfLoader,
    };

    use super::*;

    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

    /// A child cgroup and a pin directory of our own, removed on drop.
    struct Scratch {
        cgroup: PathBuf,
        pins: PathBuf,
    }

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let id = format!("mesh-{name}-{}", std::process::id());
            let cgroup = crate::capture::probe::cgroup2_mount().expect("cgroup v2").join(&id);
            let pins = PathBuf::from(agent_common_bpffs()).join(&id);
            std::fs::create_dir_all(&cgroup).unwrap();
            std::fs::create_dir_all(pins.join("maps")).unwrap();
            Scratch { cgroup, pins }
        }

        /// One "agent": the object loaded against our pinned maps.
        fn load(&self) -> (Ebpf, ProgramFd) {
            let level = 0u8;
            let mut ebpf = EbpfLoader::new()
                .default_map_pin_directory(self.pins.join("maps"))
                .override_global(aya_log::LEVEL, &level, true)
                .load(OBJECT)
                .expect("run `cargo xtask build-ebpf` before the unit tests");
            let prog: &mut CgroupSockAddr = ebpf.program_mut(progs::CONNECT4).unwrap().try_into().unwrap();
            prog.load().unwrap();
            let fd = prog.fd().unwrap().try_clone().unwrap();
            (ebpf, fd)
        }

        fn attach(&self, ebpf: &mut Ebpf) -> Result<FdLink, CaptureError> {
            let cg = std::fs::File::open(&self.cgroup).unwrap();
            let prog: &mut CgroupSockAddr = ebpf.program_mut(progs::CONNECT4).unwrap().try_into().unwrap();
            let id = prog.attach(&cg, CgroupAttachMode::Single).unwrap();
            Ok(FdLink::try_from(prog.take_link(id).unwrap()).unwrap())
        }

        fn attached(&self) -> u32 {
            let link = sys::obj_get(&self.pins.join("link")).unwrap();
            sys::link_prog_id(link.as_fd()).unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.pins);
            let _ = std::fs::remove_dir(&self.cgroup);
        }
    }

    fn agent_common_bpffs() -> &'static str {
        crate::capture::probe::ensure_bpffs(Path::new("/sys/fs/bpf")).unwrap();
        "/sys/fs/bpf"
    }

    fn id(fd: &ProgramFd) -> u32 {
        sys::prog_info(fd.as_fd()).unwrap().id
    }

    #[test]
    fn newer_agent_swaps_in_place_and_an_older_one_never_rolls_it_back() {
        let s = Scratch::new("links-order");
        let pin = s.pins.join("link");
        let (mut old, old_fd) = s.load();
        let (_new, new_fd) = s.load();

        let r = converge(&pin, old_fd.as_fd(), Swap::InPlace, &mut || s.attach(&mut old)).unwrap();
        assert_eq!((r, s.attached()), (Converged::Attached, id(&old_fd)));
        let link_before = sys::link_id(sys::obj_get(&pin).unwrap().as_fd()).unwrap();

        // The newer program replaces the older one in the same link.
        let r = converge::<FdLink>(&pin, new_fd.as_fd(), Swap::InPlace, &mut || panic!("a link is pinned")).unwrap();
        assert_eq!(r, Converged::Replaced { old: id(&old_fd) });
        assert_eq!(s.attached(), id(&new_fd));
        assert_eq!(sys::link_id(sys::obj_get(&pin).unwrap().as_fd()).unwrap(), link_before);

        // Converging again changes nothing; the older agent does not win it back.
        let r = converge::<FdLink>(&pin, new_fd.as_fd(), Swap::InPlace, &mut || panic!("a link is pinned")).unwrap();
        assert_eq!(r, Converged::Kept);
        let r = converge::<FdLink>(&pin, old_fd.as_fd(), Swap::InPlace, &mut || panic!("a link is pinned")).unwrap();
        assert_eq!(r, Converged::Newer { attached: id(&new_fd) });
        assert_eq!(s.attached(), id(&new_fd));
    }

    #[test]
    fn the_kernel_refuses_a_swap_whose_old_program_is_stale() {
        let s = Scratch::new("links-cas");
        let pin = s.pins.join("link");
        let (mut a, a_fd) = s.load();
        let (_b, b_fd) = s.load();
        let (_c, c_fd) = s.load();
        converge(&pin, a_fd.as_fd(), Swap::InPlace, &mut || s.attach(&mut a)).unwrap();
        let link = sys::obj_get(&pin).unwrap();
        // Two agents both read "a is attached"; b swaps first...
        sys::link_update(link.as_fd(), b_fd.as_fd(), a_fd.as_fd()).unwrap();
        // ...so c's swap, still naming a as the old program, is refused.
        let e = sys::link_update(link.as_fd(), c_fd.as_fd(), a_fd.as_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        assert_eq!(s.attached(), id(&b_fd));
        // The loser converges instead of failing: it reads again and swaps.
        let r = converge::<FdLink>(&pin, c_fd.as_fd(), Swap::InPlace, &mut || panic!("a link is pinned")).unwrap();
        assert_eq!(r, Converged::Replaced { old: id(&b_fd) });
    }

    #[test]
    fn racing_agents_on_a_fresh_slot_all_succeed_and_the_newest_program_stays() {
        let s = Scratch::new("links-race");
        let pin = s.pins.join("link");
        let mut agents: Vec<(Ebpf, ProgramFd)> = (0..4).map(|_| s.load()).collect();
        let newest = id(&agents.last().unwrap().1);
        // Several rounds, all agents released at once: some rounds see two
        // agents attach and pin the same slot at the same time.
        for round in 0..10 {
            let start = std::sync::Barrier::new(agents.len());
            std::thread::scope(|scope| {
                for (ebpf, fd) in agents.iter_mut() {
                    let (s, pin, start) = (&s, &pin, &start);
                    scope.spawn(move || {
                        start.wait();
                        converge(pin, fd.as_fd(), Swap::InPlace, &mut || s.attach(ebpf)).unwrap()
                    });
                }
            });
            assert_eq!(s.attached(), newest, "round {round}");
            // Exactly one link: a loser's link is detached when its pin fails.
            let out = std::process::Command::new("bpftool")
                .args(["-j", "cgroup", "show"])
                .arg(&s.cgroup)
                .output()
                .unwrap();
            let shown: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(shown.len(), 1, "round {round}: {shown:?}");
            std::fs::remove_file(&pin).unwrap();
        }
    }
}
