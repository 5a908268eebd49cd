//! The few BPF syscalls aya 0.14 keeps private: which program a pinned link
//! runs, what that program is (tag, maps, load time), swapping it atomically
//! (`BPF_LINK_UPDATE` with `BPF_F_REPLACE`), and deleting a key from a map of
//! any value size. The structs below are the `union bpf_attr` members of
//! each command (kernel ABI, `include/uapi/linux/bpf.h`); the info structs
//! come from aya-obj's generated bindings.
use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya_obj::generated::{
    bpf_attach_type, bpf_cmd, bpf_link_info, bpf_prog_info, BPF_ANY, BPF_EXIST, BPF_F_REPLACE, BPF_NOEXIST,
};

/// `bpf(cmd, attr, sizeof attr)`; the kernel zero-extends a short attr.
fn sys_bpf<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for `cmd`
    // and its exact size is passed; pointers inside it outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut T,
            size_of::<T>() as libc::c_ulong,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned_fd(r: i64) -> OwnedFd {
    // SAFETY: the syscall returned a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(r as i32) }
}

#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    /// Explicit: the kernel refuses non-zero bytes past the last field.
    _pad: u32,
}

/// An fd on the object pinned at `path` (link, map or program).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr).map(owned_fd)
}

#[repr(C)]
struct GetFdById {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// An fd on the loaded program with this id (ENOENT once it is freed).
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    sys_bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &mut attr).map(owned_fd)
}

#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn info_by_fd<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: info as *mut T as u64,
    };
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// What identifies a loaded program's behaviour, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgInfo {
    pub id: u32,
    pub name: String,
    /// The kernel's hash of the instructions (map references zeroed).
    pub tag: [u8; 8],
    /// The maps the program uses, sorted: the maps a program reads and
    /// writes are part of what it does, and the tag does not cover them.
    pub map_ids: Vec<u32>,
    /// Nanoseconds since boot: orders the programs of racing agents.
    pub load_time: u64,
    /// Size of the instructions as the verifier left them (dead code removed).
    pub xlated_len: u32,
}

impl ProgInfo {
    /// Same instructions on the same maps: swapping one for the other
    /// would change nothing.
    pub fn same_behaviour(&self, other: &ProgInfo) -> bool {
        self.tag == other.tag && self.map_ids == other.map_ids
    }

    pub fn tag_hex(&self) -> String {
        self.tag.iter().map(|b| format!("{b:02x}")).collect()
    }
}

pub fn prog_info(fd: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    // SAFETY: a plain-integer C struct; all zeroes is valid.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    info_by_fd(fd, &mut info)?;
    let mut map_ids = vec![0u32; info.nr_map_ids as usize];
    if !map_ids.is_empty() {
        // SAFETY: as above.
        let mut again: bpf_prog_info = unsafe { std::mem::zeroed() };
        again.nr_map_ids = map_ids.len() as u32;
        again.map_ids = map_ids.as_mut_ptr() as u64;
        info_by_fd(fd, &mut again)?;
        map_ids.truncate(again.nr_map_ids as usize);
    }
    map_ids.sort_unstable();
    let name: Vec<u8> = info.name.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
    Ok(ProgInfo {
        id: info.id,
        name: String::from_utf8_lossy(&name).into_owned(),
        tag: info.tag,
        map_ids,
        load_time: info.load_time,
        xlated_len: info.xlated_prog_len,
    })
}

/// The id of the program a link runs now.
pub fn link_prog_id(link: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: a plain-integer C struct (with a union of integers); zeroes are valid.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    info_by_fd(link, &mut info)?;
    Ok(info.prog_id)
}

/// The link's id.
pub fn link_id(link: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: as in link_prog_id.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    info_by_fd(link, &mut info)?;
    Ok(info.id)
}

#[repr(C)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Makes `link` run `new` instead of `old`, atomically (the kernel swaps
/// the program under RCU: every connect sees one of the two). Fails with
/// EPERM when `old` is no longer the attached program, i.e. someone else
/// replaced it since we looked: a compare-and-swap.
pub fn link_update(link: BorrowedFd<'_>, new: BorrowedFd<'_>, old: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old.as_raw_fd() as u32,
    };
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

#[repr(C)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Pins the object behind `fd` (a link made by [`sockmap_link_create`]) at `path`.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjPin {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    sys_bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(drop)
}

#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// Which sockmap hook a link runs its program on.
#[derive(Debug, Clone, Copy)]
pub enum SockmapHook {
    /// sk_msg, on each sendmsg of the map's sockets.
    Msg,
    /// sk_skb verdict, on each segment the map's sockets receive.
    SkbVerdict,
}

/// A bpf_link running the program `prog` at `hook` on every socket of the
/// sockmap or sockhash `map` (Linux 6.10+; older kernels answer EINVAL).
/// Unlike BPF_PROG_ATTACH to a map, such a link can be pinned and swapped
/// atomically with BPF_LINK_UPDATE, like every other hook of ours.
pub fn sockmap_link_create(prog: BorrowedFd<'_>, map: BorrowedFd<'_>, hook: SockmapHook) -> io::Result<OwnedFd> {
    let attach_type = match hook {
        SockmapHook::Msg => bpf_attach_type::BPF_SK_MSG_VERDICT,
        SockmapHook::SkbVerdict => bpf_attach_type::BPF_SK_SKB_VERDICT,
    };
    let mut attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: map.as_raw_fd() as u32,
        attach_type: attach_type as u32,
        flags: 0,
    };
    sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map(owned_fd)
}

/// Inserts `key` -> `value` (raw bytes) into `map`; EEXIST if the key is there.
pub fn map_insert(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    map_update_flags(map, key, value, BPF_NOEXIST)
}

/// Sets `key` -> `value` (raw bytes) in `map`, created or replaced.
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    map_update_flags(map, key, value, BPF_ANY)
}

/// Replaces the value of `key` (raw bytes) in `map`; ENOENT if the key is
/// not there (it is never created).
pub fn map_replace(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    map_update_flags(map, key, value, BPF_EXIST)
}

fn map_update_flags(map: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u32) -> io::Result<()> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: u64::from(flags),
    };
    sys_bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Reads the value of `key` (raw bytes) into `value`, which must be the
/// map's value size; ENOENT when the key is not there.
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_ELEM, &mut attr).map(drop)
}

/// The value of `key`, a `#[repr(C)]` value of the map's value size;
/// ENOENT when the key is not there.
pub fn map_get<K: aya::Pod, V: aya::Pod + Default>(map: BorrowedFd<'_>, key: &K) -> io::Result<V> {
    let mut value = V::default();
    // SAFETY: aya::Pod values are plain data, every bit pattern valid.
    let bytes = unsafe { std::slice::from_raw_parts_mut(std::ptr::from_mut(&mut value).cast::<u8>(), size_of::<V>()) };
    map_lookup(map, key_bytes(key), bytes)?;
    Ok(value)
}

/// Deletes `key` (raw bytes) whatever the map's value size; ENOENT is not an error.
pub fn map_delete(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: 0,
        flags: 0,
    };
    match sys_bpf(bpf_cmd::BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map(drop),
    }
}

/// How many keys a map holds, whatever its key and value types
/// (`BPF_MAP_GET_NEXT_KEY` from the start). At most `max_entries` are
/// counted: a hash walk restarts from its first key when the key it stands
/// on is deleted meanwhile, so a busy map could otherwise be walked forever
/// (and a walk that restarted counts some keys twice: a count of a map
/// that changes meanwhile is approximate).
pub fn map_key_count(map: BorrowedFd<'_>, key_size: usize, max_entries: usize) -> io::Result<usize> {
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    for n in 0..max_entries {
        let mut attr = MapElem {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            // No key (0) asks for the first one.
            key: if n == 0 { 0 } else { key.as_ptr() as u64 },
            value: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match sys_bpf(bpf_cmd::BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => std::mem::swap(&mut key, &mut next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e),
        }
    }
    Ok(max_entries)
}

/// A socket's cookie (`SO_COOKIE`): the key the programs give it
/// (`bpf_get_socket_cookie`), e.g. in SM_APP.
pub fn socket_cookie(fd: std::os::fd::RawFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a u64 out-parameter of the size passed.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// poll(2) on one fd for `events` (`libc::POLLIN`, ...), `timeout` at most
/// (`None`: return at once): the events it has now (POLLERR and POLLHUP
/// come unasked); 0 when none came in time.
pub fn poll(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    timeout: Option<std::time::Duration>,
) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = timeout.map_or(0, |t| t.as_millis().min(libc::c_int::MAX as u128) as libc::c_int);
    // SAFETY: one valid pollfd for the duration of the call.
    if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfd.revents)
}

/// The bytes of a `#[repr(C)]` key without padding holes (agent-common's).
pub fn key_bytes<K: aya::Pod>(key: &K) -> &[u8] {
    // SAFETY: aya::Pod types are plain data with explicit padding fields.
    unsafe { std::slice::from_raw_parts((key as *const K).cast::<u8>(), size_of::<K>()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_structs_match_the_kernel_abi() {
        // Offsets of union bpf_attr members (include/uapi/linux/bpf.h).
        assert_eq!(size_of::<ObjGet>(), 24);
        assert_eq!(size_of::<GetFdById>(), 12);
        assert_eq!(size_of::<InfoByFd>(), 16);
        assert_eq!(size_of::<LinkUpdate>(), 16);
        assert_eq!(size_of::<MapElem>(), 32);
        assert_eq!(size_of::<ObjPin>(), 24);
        assert_eq!(size_of::<LinkCreate>(), 16);
    }
}

#[cfg(test)]
mod kernel_tests {
    use std::{os::fd::AsFd, process::Command};

    use super::*;

    fn bpftool(args: &[&str]) -> std::process::Output {
        Command::new("bpftool")
            .args(args)
            .output()
            .expect("bpftool is installed by xtask setup")
    }

    #[test]
    fn map_delete_removes_a_key_of_a_pinned_map() {
        let scratch = crate::capture::TestPins::new("delete");
        let pin = scratch.0.join("map").to_str().unwrap().to_string();
        let out = bpftool(&[
            "map", "create", &pin, "type", "hash", "key", "8", "value", "4", "entries", "4", "name", "t",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let key = 42u64.to_ne_bytes().map(|b| b.to_string());
        let mut update = vec!["map", "update", "pinned", &pin, "key"];
        update.extend(key.iter().map(String::as_str));
        update.extend(["value", "1", "0", "0", "0"]);
        assert!(bpftool(&update).status.success());

        let fd = obj_get(Path::new(&pin)).unwrap();
        map_delete(fd.as_fd(), key_bytes(&42u64)).unwrap();
        // Deleting again is not an error (ENOENT).
        map_delete(fd.as_fd(), key_bytes(&42u64)).unwrap();
        let dump = bpftool(&["-j", "map", "dump", "pinned", &pin]);
        assert_eq!(String::from_utf8_lossy(&dump.stdout).trim(), "[]");
    }
}
