//! Start-up checks: is there a bpffs, a cgroup v2 directory, and do the
//! kernel's BPF program types exist? Each failure says what to do.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::programs::ProgramType;
use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, FsType, BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC, TMPFS_MAGIC},
};

use super::CaptureError;

fn fs_name(t: FsType) -> String {
    // nix's constants: the field's type differs between glibc (i64) and musl (u64).
    match t {
        BPF_FS_MAGIC => "bpffs".into(),
        CGROUP2_SUPER_MAGIC => "cgroup2".into(),
        CGROUP_SUPER_MAGIC => "cgroup (v1)".into(),
        TMPFS_MAGIC => "tmpfs".into(),
        FsType(other) => format!("a filesystem with magic {other:#x}"),
    }
}

/// Makes sure `path` is a bpffs: mounts one on an empty, unmounted directory
/// (as a node's /sys/fs/bpf often is), refuses anything else.
pub fn ensure_bpffs(path: &Path) -> Result<(), CaptureError> {
    if !path.exists() {
        std::fs::create_dir_all(path).map_err(|e| CaptureError::Bpffs {
            path: path.to_owned(),
            reason: format!("it does not exist and cannot be created ({e})"),
        })?;
    }
    let st = statfs(path).map_err(|e| CaptureError::Bpffs {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if st.filesystem_type() == BPF_FS_MAGIC {
        return Ok(());
    }
    if is_mount_point(path) {
        return Err(CaptureError::Bpffs {
            path: path.to_owned(),
            reason: format!("it is {}, not bpffs", fs_name(st.filesystem_type())),
        });
    }
    mount(Some("bpf"), path, Some("bpf"), MsFlags::empty(), None::<&str>).map_err(|e| CaptureError::Bpffs {
        path: path.to_owned(),
        reason: format!("no bpffs is mounted there and mounting one failed ({e})"),
    })?;
    tracing::info!(path = %path.display(), "mounted bpffs");
    Ok(())
}

fn is_mount_point(path: &Path) -> bool {
    let parent = path.parent().unwrap_or(Path::new("/"));
    match (std::fs::metadata(path), std::fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev() || a.ino() == b.ino(),
        _ => false,
    }
}

/// The cgroup programs only see sockets of processes in cgroup v2 directories
/// below the attach point, so that point must be on cgroup v2.
pub fn check_cgroup2(path: &Path) -> Result<(), CaptureError> {
    let mount = cgroup2_mount()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "nowhere (mount it with `mount -t cgroup2 none /sys/fs/cgroup`)".into());
    let st = statfs(path).map_err(|e| CaptureError::Cgroup2 {
        path: path.to_owned(),
        reason: format!("cannot read it ({e})"),
        mount: mount.clone(),
    })?;
    if st.filesystem_type() != CGROUP2_SUPER_MAGIC {
        return Err(CaptureError::Cgroup2 {
            path: path.to_owned(),
            reason: format!("it is on {}", fs_name(st.filesystem_type())),
            mount,
        });
    }
    Ok(())
}

/// Where cgroup v2 is mounted, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? == "cgroup2" {
            left.split_whitespace().nth(4).map(PathBuf::from)
        } else {
            None
        }
    })
}

/// Every BPF program type capture needs.
pub fn check_program_types() -> Result<(), CaptureError> {
    let needed = [
        (
            ProgramType::CgroupSockAddr,
            "cgroup sock_addr (connect4/6, getpeername4/6)",
            "5.8",
        ),
        (ProgramType::SockOps, "sockops", "5.15"),
        (ProgramType::SkLookup, "sk_lookup", "5.9"),
    ];
    for (ty, name, since) in needed {
        match aya::sys::is_program_supported(ty) {
            Ok(true) => {}
            Ok(false) => return Err(CaptureError::MissingProgramType { name, since }),
            Err(e) => {
                return Err(CaptureError::Kernel(format!(
                    "cannot probe for BPF program type {name}: {e}; the agent needs root or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN"
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_and_accepts_it() {
        let mount = cgroup2_mount().expect("this machine has cgroup v2");
        check_cgroup2(&mount).unwrap();
    }

    #[test]
    fn rejects_a_non_cgroup2_directory() {
        let e = check_cgroup2(Path::new("/proc")).unwrap_err().to_string();
        assert!(e.contains("not cgroup v2") && e.contains("--cgroup-parent"), "{e}");
    }

    #[test]
    fn this_kernel_has_every_program_type() {
        check_program_types().unwrap();
    }
}
