//! The installer role: puts the plugin binary and its conflist entry on the node, keeps them
//! there while running, and removes them when the last installer (holder) goes away.
//!
//! Holders make rolling updates safe: the new DaemonSet pod registers itself before the old one
//! is told to stop, so the old one sees another holder and leaves everything in place, while
//! deleting the DaemonSet stops the last holder, which cleans up. Every change to the conf dir
//! happens under an exclusive `flock` on the conf dir itself.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

/// The plugin's `type` in CNI configs, and its file name in the bin dir.
pub const PLUGIN_TYPE: &str = "mesh-cni";
/// Suffix of a single-plugin config this installer converted to a conflist.
pub const ORIG_SUFFIX: &str = ".mesh-cni-orig";
/// The plugin's kubeconfig in the conf dir (no config extension: runtimes never load it).
pub const KUBECONFIG_FILE: &str = "mesh-cni-kubeconfig";
/// Directory (inside the conf dir) with one file per running installer.
pub const HOLDERS_DIR: &str = ".mesh-cni-holders";
/// File extensions the container runtimes (libcni) load configs from.
const CONF_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Invalid(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn log(line: impl AsRef<str>) {
    eprintln!("mesh-cni: {}", line.as_ref());
}

/// Writes `path` atomically: a temporary file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} has no file name", path.display())))?;
    // Hidden and without a .conf/.conflist/.json extension: runtimes never load it.
    let tmp = dir.join(format!(
        ".{}.mesh-cni-tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map_err(io_err(path))
}

fn file_mode(path: &Path) -> u32 {
    fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644)
}

fn to_pretty(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).expect("a Value always serializes");
    out.push(b'\n');
    out
}

/// Copies the plugin executable `src` to `<bin_dir>/mesh-cni`, mode 0755, atomically.
pub fn install_binary(src: &Path, bin_dir: &Path) -> Result<PathBuf> {
    let data = fs::read(src).map_err(io_err(src))?;
    let dest = bin_dir.join(PLUGIN_TYPE);
    write_atomic(&dest, &data, 0o755)?;
    log(format!("installed {} ({} bytes)", dest.display(), data.len()));
    Ok(dest)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn plugins_mut(list: &mut Value) -> Result<&mut Vec<Value>, String> {
    list.get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| "no \"plugins\" list".to_owned())
}

/// True when the conflist's last plugin is this one.
pub fn has_entry_last(list: &Value) -> bool {
    list.get("plugins")
        .and_then(Value::as_array)
        .and_then(|p| p.last())
        .is_some_and(is_ours)
}

/// Makes `{"type":"mesh-cni","socket":socket,"kubeconfig":...}` the last plugin of a conflist,
/// replacing any existing entry (whose other fields are kept). Returns whether the list changed.
pub fn insert_entry(list: &mut Value, socket: &str, kubeconfig: Option<&str>) -> Result<bool, String> {
    let plugins = plugins_mut(list)?;
    let before = plugins.clone();
    let mut entry = plugins
        .iter()
        .find(|p| is_ours(p))
        .cloned()
        .unwrap_or_else(|| json!({"type": PLUGIN_TYPE}));
    entry["socket"] = Value::String(socket.to_owned());
    match (kubeconfig, entry.as_object_mut()) {
        (Some(k), _) => entry["kubeconfig"] = Value::String(k.to_owned()),
        (None, Some(e)) => {
            e.remove("kubeconfig");
        }
        (None, None) => {}
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry);
    Ok(*plugins != before)
}

/// Removes every entry of this plugin from a conflist. Returns whether the list changed.
pub fn remove_entry(list: &mut Value) -> Result<bool, String> {
    let plugins = plugins_mut(list)?;
    let n = plugins.len();
    plugins.retain(|p| !is_ours(p));
    Ok(plugins.len() != n)
}

/// Wraps a single-plugin config into a conflist with the same version and name.
pub fn conf_to_conflist(conf: &Value) -> Value {
    let mut list = serde_json::Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = conf.get(key) {
            list.insert(key.into(), v.clone());
        }
    }
    list.insert("plugins".into(), Value::Array(vec![conf.clone()]));
    Value::Object(list)
}

/// The files a runtime would load from `conf_dir`, in the order it tries them.
fn config_files(conf_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(conf_dir).map_err(io_err(conf_dir))? {
        let entry = entry.map_err(io_err(conf_dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if !name.starts_with('.') && CONF_EXTENSIONS.contains(&ext) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    let data = fs::read(path).map_err(io_err(path))?;
    match serde_json::from_slice::<Value>(&data) {
        Ok(v) if v.is_object() => Ok(Some(v)),
        Ok(_) => Ok(None),
        Err(e) => {
            log(format!("skipping {}: not valid JSON: {e}", path.display()));
            Ok(None)
        }
    }
}

fn is_conflist(v: &Value) -> bool {
    v.get("plugins").is_some_and(Value::is_array)
}

fn is_single_conf(v: &Value) -> bool {
    !is_conflist(v) && v.get("type").is_some_and(Value::is_string)
}

/// The conflist a single-plugin config `file` is converted to: same stem, `.conflist`.
fn converted_path(file: &Path) -> PathBuf {
    file.with_extension("conflist")
}

fn orig_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(ORIG_SUFFIX);
    file.with_file_name(name)
}

/// Puts the entry into the config the runtime uses (the lexically first `*.conf`, `*.conflist`
/// or `*.json`), converting a single-plugin config to a conflist. With `replace` false, an entry
/// already last (whatever its socket, e.g. a newer installer's) is left alone. Returns the
/// conflist, or `None` if the dir has no CNI config yet.
pub fn ensure_entry(conf_dir: &Path, socket: &str, kubeconfig: Option<&str>, replace: bool) -> Result<Option<PathBuf>> {
    for file in config_files(conf_dir)? {
        let Some(mut value) = read_json(&file)? else { continue };
        if is_conflist(&value) {
            if !replace && has_entry_last(&value) {
                return Ok(Some(file));
            }
            let changed = insert_entry(&mut value, socket, kubeconfig).map_err(Error::Invalid)?;
            if changed {
                write_atomic(&file, &to_pretty(&value), file_mode(&file))?;
                log(format!(
                    "added {PLUGIN_TYPE} (socket {socket}) as the last plugin of {}",
                    file.display()
                ));
            } else {
                log(format!(
                    "{} already ends with {PLUGIN_TYPE} (socket {socket})",
                    file.display()
                ));
            }
            return Ok(Some(file));
        }
        if is_single_conf(&value) {
            let mut list = conf_to_conflist(&value);
            insert_entry(&mut list, socket, kubeconfig).map_err(Error::Invalid)?;
            let dest = converted_path(&file);
            write_atomic(&dest, &to_pretty(&list), file_mode(&file))?;
            let orig = orig_path(&file);
            fs::rename(&file, &orig).map_err(io_err(&file))?;
            log(format!(
                "converted {} to {} with {PLUGIN_TYPE} (socket {socket}) last; original kept as {}",
                file.display(),
                dest.display(),
                orig.display()
            ));
            return Ok(Some(dest));
        }
        log(format!("skipping {}: not a CNI network configuration", file.display()));
    }
    Ok(None)
}

/// Removes the entry from every conflist in `conf_dir` and restores converted configs.
pub fn remove_entries(conf_dir: &Path) -> Result<()> {
    // Converted configs first: bring the original back, then drop our conflist.
    let mut origs: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(io_err(conf_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(ORIG_SUFFIX))
        })
        .collect();
    origs.sort();
    for orig in origs {
        let name = orig.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let file = orig.with_file_name(&name[..name.len() - ORIG_SUFFIX.len()]);
        if file.exists() {
            // The main CNI rewrote its config meanwhile: that one is current.
            fs::remove_file(&orig).map_err(io_err(&orig))?;
            log(format!("removed stale {} ({} exists)", orig.display(), file.display()));
        } else {
            fs::rename(&orig, &file).map_err(io_err(&orig))?;
            log(format!("restored {} from {}", file.display(), orig.display()));
        }
        let conflist = converted_path(&file);
        if conflist != file
            && read_json(&conflist)
                .ok()
                .flatten()
                .is_some_and(|v| v["plugins"].as_array().is_some_and(|p| p.iter().any(is_ours)))
        {
            fs::remove_file(&conflist).map_err(io_err(&conflist))?;
            log(format!(
                "removed {} (converted from {})",
                conflist.display(),
                file.display()
            ));
        }
    }
    for file in config_files(conf_dir)? {
        let Some(mut value) = read_json(&file)? else { continue };
        if is_conflist(&value) && remove_entry(&mut value).map_err(Error::Invalid)? {
            write_atomic(&file, &to_pretty(&value), file_mode(&file))?;
            log(format!("removed {PLUGIN_TYPE} from {}", file.display()));
        }
    }
    Ok(())
}

/// Checks a holder ID is usable as a file name.
pub fn validate_holder(holder: &str) -> Result<()> {
    if holder.is_empty() || holder.starts_with('.') || holder.contains(['/', '\0']) {
        return Err(Error::Invalid(format!(
            "invalid holder ID {holder:?}: must be a non-empty file name not starting with '.'"
        )));
    }
    Ok(())
}

fn holders_dir(conf_dir: &Path) -> PathBuf {
    conf_dir.join(HOLDERS_DIR)
}

/// Records `holder` as a running installer.
pub fn register_holder(conf_dir: &Path, holder: &str) -> Result<()> {
    validate_holder(holder)?;
    let dir = holders_dir(conf_dir);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let path = dir.join(holder);
    fs::write(&path, format!("{}\n", std::process::id())).map_err(io_err(&path))?;
    log(format!("registered holder {holder} ({})", path.display()));
    Ok(())
}

fn holder_exists(conf_dir: &Path, holder: &str) -> bool {
    holders_dir(conf_dir).join(holder).exists()
}

/// The registered holders, sorted.
pub fn holders(conf_dir: &Path) -> Result<Vec<String>> {
    let dir = holders_dir(conf_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    out.sort();
    Ok(out)
}

/// An exclusive `flock` on the conf dir, released on drop.
pub struct DirLock(#[allow(dead_code)] File);

pub fn lock(conf_dir: &Path) -> Result<DirLock> {
    let f = File::open(conf_dir).map_err(io_err(conf_dir))?;
    loop {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(DirLock(f));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io_err(conf_dir)(e));
        }
    }
}

/// Unregisters `holder`; if it was the last, removes the entry (restoring converted configs) and
/// the plugin binary. Returns whether it cleaned up.
pub fn release(conf_dir: &Path, bin_dir: &Path, holder: &str) -> Result<bool> {
    validate_holder(holder)?;
    let _lock = lock(conf_dir)?;
    let path = holders_dir(conf_dir).join(holder);
    match fs::remove_file(&path) {
        Ok(()) => log(format!("unregistered holder {holder}")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => log(format!("holder {holder} was not registered")),
        Err(e) => return Err(io_err(&path)(e)),
    }
    let others = holders(conf_dir)?;
    if !others.is_empty() {
        log(format!(
            "other holders remain ({}): leaving {PLUGIN_TYPE} installed",
            others.join(", ")
        ));
        return Ok(false);
    }
    remove_entries(conf_dir)?;
    let kubeconfig = conf_dir.join(KUBECONFIG_FILE);
    match fs::remove_file(&kubeconfig) {
        Ok(()) => log(format!("removed {}", kubeconfig.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&kubeconfig)(e)),
    }
    let bin = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&bin) {
        Ok(()) => log(format!("removed {}", bin.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&bin)(e)),
    }
    let dir = holders_dir(conf_dir);
    if fs::remove_dir(&dir).is_ok() {
        log(format!("removed {}", dir.display()));
    }
    Ok(true)
}

/// Parsed `install` / `uninstall` arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub uninstall: bool,
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub socket: String,
    pub holder: String,
    pub once: bool,
    pub interval: Duration,
    pub kubeconfig: Option<KubeconfigSource>,
}

/// Where the plugin's API credentials come from: the installer pod's own service account
/// (`mesh-cni`: get pods and namespaces, nothing else).
#[derive(Debug, Clone, PartialEq)]
pub struct KubeconfigSource {
    /// The projected token the kubelet refreshes; re-read every interval.
    pub token: PathBuf,
    /// The API server's CA bundle (if the file exists).
    pub ca: PathBuf,
    pub server: String,
    /// The conf dir as the runtime on the node sees it (the kubeconfig path in the entry).
    pub host_conf_dir: PathBuf,
}

impl KubeconfigSource {
    /// The kubeconfig's path for the plugin, which runs on the node.
    pub fn host_path(&self) -> String {
        self.host_conf_dir.join(KUBECONFIG_FILE).display().to_string()
    }

    /// The kubeconfig text (JSON, which is YAML): server, CA, and the token inline.
    fn render(&self) -> Result<Vec<u8>> {
        let token = fs::read_to_string(&self.token).map_err(io_err(&self.token))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::Invalid(format!("{} is empty", self.token.display())));
        }
        let mut cluster = json!({"server": self.server});
        match fs::read(&self.ca) {
            Ok(pem) => cluster["certificate-authority-data"] = json!(base64(&pem)),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.server.starts_with("https:") => {}
            Err(e) => return Err(io_err(&self.ca)(e)),
        }
        let config = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "local", "cluster": cluster}],
            "users": [{"name": PLUGIN_TYPE, "user": {"token": token}}],
            "contexts": [{"name": PLUGIN_TYPE, "context": {"cluster": "local", "user": PLUGIN_TYPE}}],
            "current-context": PLUGIN_TYPE,
        });
        Ok(to_pretty(&config))
    }
}

/// Writes (0600: it holds a credential) or refreshes the plugin's kubeconfig; whether it changed.
pub fn write_kubeconfig(conf_dir: &Path, src: &KubeconfigSource) -> Result<bool> {
    let path = conf_dir.join(KUBECONFIG_FILE);
    let text = src.render()?;
    let mode_ok = fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o777 == 0o600);
    if mode_ok && fs::read(&path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    write_atomic(&path, &text, 0o600)?;
    log(format!("wrote {} (token from {})", path.display(), src.token.display()));
    Ok(true)
}

/// Standard base64 with padding (the kubeconfig's `*-data` fields).
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub const USAGE: &str = "\
usage: mesh-cni install --holder ID [--bin-dir DIR] [--conf-dir DIR] [--socket PATH] [--once] [--interval SECS]
                       [--kubeconfig-token FILE [--kubeconfig-ca FILE] [--api-server URL] [--host-conf-dir DIR]]
       mesh-cni uninstall --holder ID [--bin-dir DIR] [--conf-dir DIR]
       mesh-cni --version
  --bin-dir   CNI binary dir (default /opt/cni/bin)
  --conf-dir  CNI config dir (default /etc/cni/net.d)
  --socket    the agent's socket, written into the plugin entry (default /var/run/mesh/cni.sock)
  --holder    this installer's unique ID (e.g. its pod name)
  --once      install and exit; fail if there is no CNI config yet
  --interval  seconds between checks that the entry is still there (default 5)
  --kubeconfig-token  a service-account token: write the plugin's kubeconfig (conf dir, mode 0600,
              refreshed every interval) so that it can ask the API while the agent is down;
              without it, pods outside the excluded namespaces cannot start while the agent is down
  --kubeconfig-ca     the API server's CA (default: ca.crt beside the token)
  --api-server        default https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT
  --host-conf-dir     the conf dir's path on the node, for the entry (default /etc/cni/net.d)
Run by a container runtime (CNI_COMMAND set), it is the CNI plugin.";

/// Parses the arguments after the program name.
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut it = args.iter();
    let uninstall = match it.next().map(String::as_str) {
        Some("install") => false,
        Some("uninstall") => true,
        Some(other) => return Err(format!("unknown command {other:?}")),
        None => return Err("missing command".into()),
    };
    let mut opts = Options {
        uninstall,
        bin_dir: "/opt/cni/bin".into(),
        conf_dir: "/etc/cni/net.d".into(),
        socket: mesh_cni::proto::DEFAULT_SOCKET.into(),
        holder: String::new(),
        once: false,
        interval: Duration::from_secs(5),
        kubeconfig: None,
    };
    let (mut token, mut ca, mut server, mut host_conf_dir) = (None::<PathBuf>, None::<PathBuf>, None, None);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        if flag == "--once" && inline.is_none() {
            opts.once = true;
            continue;
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag {
            "--bin-dir" => opts.bin_dir = value()?.into(),
            "--conf-dir" => opts.conf_dir = value()?.into(),
            "--socket" => opts.socket = value()?,
            "--holder" => opts.holder = value()?,
            "--kubeconfig-token" => token = Some(value()?.into()),
            "--kubeconfig-ca" => ca = Some(value()?.into()),
            "--api-server" => server = Some(value()?),
            "--host-conf-dir" => host_conf_dir = Some(value()?.into()),
            "--interval" => {
                let v = value()?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0 && s.is_finite())
                    .ok_or_else(|| format!("bad --interval {v:?}"))?;
                opts.interval = Duration::from_secs_f64(secs);
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    if opts.holder.is_empty() {
        return Err("--holder is required".into());
    }
    match token {
        Some(token) => {
            let server = match server {
                Some(s) => s,
                None => in_cluster_server()?,
            };
            opts.kubeconfig = Some(KubeconfigSource {
                ca: ca.unwrap_or_else(|| token.with_file_name("ca.crt")),
                token,
                server,
                host_conf_dir: host_conf_dir.unwrap_or_else(|| "/etc/cni/net.d".into()),
            });
        }
        None if ca.is_some() || server.is_some() || host_conf_dir.is_some() => {
            return Err("--kubeconfig-ca, --api-server and --host-conf-dir need --kubeconfig-token".into())
        }
        None => {}
    }
    validate_holder(&opts.holder).map_err(|e| e.to_string())?;
    Ok(opts)
}

/// The API server as a pod sees it (the `kubernetes` Service).
fn in_cluster_server() -> Result<String, String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST")
        .map_err(|_| "--api-server is required outside a pod (no KUBERNETES_SERVICE_HOST)".to_string())?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    Ok(format!("https://{host}:{port}"))
}

/// The signals that stop the installer, blocked so they can be waited for synchronously.
struct Signals(libc::sigset_t);

impl Signals {
    /// Blocks SIGTERM and SIGINT for this (single-threaded) process.
    fn block() -> Self {
        // SAFETY: plain sigset manipulation on a zeroed set we own.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Signals(set)
        }
    }

    /// Waits up to `timeout` for one of the signals; returns it, or `None` on timeout.
    fn wait(&self, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as _,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        // SAFETY: valid set and timespec; no siginfo wanted.
        let sig = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
        (sig > 0).then_some(sig)
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}

/// `mesh-cni install|uninstall ...`; returns the exit status.
pub fn main(args: &[String]) -> i32 {
    let opts = match parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mesh-cni: {e}\n{USAGE}");
            return 2;
        }
    };
    let res = if opts.uninstall {
        release(&opts.conf_dir, &opts.bin_dir, &opts.holder).map(|_| 0)
    } else {
        install(&opts)
    };
    res.unwrap_or_else(|e| {
        log(format!("error: {e}"));
        1
    })
}

fn install(opts: &Options) -> Result<i32> {
    // Before anything else, so a SIGTERM during setup is handled, not fatal.
    let signals = (!opts.once).then(Signals::block);
    let exe = std::env::current_exe().map_err(io_err(Path::new("/proc/self/exe")))?;
    {
        let _lock = lock(&opts.conf_dir)?;
        // Holder first: an old installer stopping concurrently then sees us and keeps things.
        register_holder(&opts.conf_dir, &opts.holder)?;
        install_binary(&exe, &opts.bin_dir)?;
        if let Some(k) = &opts.kubeconfig {
            write_kubeconfig(&opts.conf_dir, k)?;
        }
    }
    let mut waiting_logged = false;
    loop {
        let found = {
            let _lock = lock(&opts.conf_dir)?;
            ensure_entry(&opts.conf_dir, &opts.socket, kubeconfig_path(opts).as_deref(), true)?
        };
        if found.is_some() {
            break;
        }
        let Some(signals) = &signals else {
            let err = Error::Invalid(format!(
                "no CNI config (*.conf, *.conflist, *.json) in {}: install the node's main CNI first",
                opts.conf_dir.display()
            ));
            release(&opts.conf_dir, &opts.bin_dir, &opts.holder)?;
            return Err(err);
        };
        if !waiting_logged {
            log(format!(
                "waiting for the main CNI to write its config in {}",
                opts.conf_dir.display()
            ));
            waiting_logged = true;
        }
        if let Some(sig) = signals.wait(Duration::from_secs(1)) {
            log(format!("{} while waiting: uninstalling", signal_name(sig)));
            release(&opts.conf_dir, &opts.bin_dir, &opts.holder)?;
            return Ok(0);
        }
    }
    let Some(signals) = signals else { return Ok(0) };
    log(format!(
        "installed; checking every {:?}, waiting for SIGTERM",
        opts.interval
    ));
    loop {
        if let Some(sig) = signals.wait(opts.interval) {
            log(format!("{}: uninstalling", signal_name(sig)));
            release(&opts.conf_dir, &opts.bin_dir, &opts.holder)?;
            return Ok(0);
        }
        if let Err(e) = recheck(opts, &exe) {
            log(format!("re-check failed (will retry): {e}"));
        }
    }
}

fn kubeconfig_path(opts: &Options) -> Option<String> {
    opts.kubeconfig.as_ref().map(KubeconfigSource::host_path)
}

/// Restores whatever someone removed: our holder file, the binary, the entry.
fn recheck(opts: &Options, exe: &Path) -> Result<()> {
    let _lock = lock(&opts.conf_dir)?;
    if !holder_exists(&opts.conf_dir, &opts.holder) {
        register_holder(&opts.conf_dir, &opts.holder)?;
    }
    // Only when missing: a newer installer's binary must not be swapped back for ours.
    if !opts.bin_dir.join(PLUGIN_TYPE).exists() {
        install_binary(exe, &opts.bin_dir)?;
    }
    // The kubelet refreshes the projected token well before it expires.
    if let Some(k) = &opts.kubeconfig {
        write_kubeconfig(&opts.conf_dir, k)?;
    }
    if ensure_entry(&opts.conf_dir, &opts.socket, kubeconfig_path(opts).as_deref(), false)?.is_none() {
        log(format!("no CNI config in {} any more", opts.conf_dir.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "mesh-cni-unit-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(p.join("bin")).unwrap();
            fs::create_dir_all(p.join("net.d")).unwrap();
            TempDir(p)
        }
        fn conf(&self) -> PathBuf {
            self.0.join("net.d")
        }
        fn bin(&self) -> PathBuf {
            self.0.join("bin")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const CONFLIST: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "1.0.0",
  "plugins": [
    {"type": "calico", "log_level": "info", "ipam": {"type": "calico-ipam"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ],
  "disableCheck": false
}"#;

    fn read(p: &Path) -> Value {
        serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
    }

    fn types(list: &Value) -> Vec<String> {
        list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn insert_preserves_order_and_is_idempotent() {
        let mut v: Value = serde_json::from_str(CONFLIST).unwrap();
        assert!(insert_entry(&mut v, "/run/a.sock", None).unwrap());
        assert_eq!(types(&v), ["calico", "portmap", "mesh-cni"]);
        assert_eq!(v["plugins"][2], json!({"type": "mesh-cni", "socket": "/run/a.sock"}));
        // Key order of the top level and of other plugins is kept.
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "cniVersion", "plugins", "disableCheck"]);
        let keys: Vec<&String> = v["plugins"][0].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["type", "log_level", "ipam"]);
        let once = v.clone();
        assert!(!insert_entry(&mut v, "/run/a.sock", None).unwrap());
        assert_eq!(v, once);

        // An existing entry, not last and with extra fields, moves last and gets the new socket.
        let mut v = json!({"plugins": [{"type": "mesh-cni", "socket": "/old", "timeoutSeconds": 3}, {"type": "x"}]});
        assert!(insert_entry(&mut v, "/new", None).unwrap());
        assert_eq!(
            v["plugins"],
            json!([{"type": "x"}, {"type": "mesh-cni", "socket": "/new", "timeoutSeconds": 3}])
        );
        assert!(remove_entry(&mut v).unwrap());
        assert_eq!(v["plugins"], json!([{"type": "x"}]));
        assert!(!remove_entry(&mut v).unwrap());
        assert!(insert_entry(&mut json!({"type": "bridge"}), "/s", None).is_err());
    }

    #[test]
    fn conflist_in_dir_and_removal() {
        let t = TempDir::new("list");
        let file = t.conf().join("10-calico.conflist");
        fs::write(&file, CONFLIST).unwrap();
        fs::write(
            t.conf().join("20-later.conflist"),
            r#"{"cniVersion":"1.0.0","name":"z","plugins":[{"type":"y"}]}"#,
        )
        .unwrap();
        fs::write(t.conf().join("README"), "not a config").unwrap();
        assert_eq!(ensure_entry(&t.conf(), "/s", None, true).unwrap(), Some(file.clone()));
        let v = read(&file);
        assert_eq!(types(&v), ["calico", "portmap", "mesh-cni"]);
        assert_eq!(v["disableCheck"], json!(false));
        let text = fs::read(&file).unwrap();
        ensure_entry(&t.conf(), "/s", None, true).unwrap();
        assert_eq!(fs::read(&file).unwrap(), text, "second run must not change the file");
        // Only the active (first) config is touched.
        assert_eq!(types(&read(&t.conf().join("20-later.conflist"))), ["y"]);
        remove_entries(&t.conf()).unwrap();
        assert_eq!(read(&file), serde_json::from_str::<Value>(CONFLIST).unwrap());
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(t.conf())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn conf_conversion_and_restore() {
        let t = TempDir::new("conf");
        let conf = t.conf().join("10-flannel.conf");
        let original = r#"{"name":"cbr0","cniVersion":"0.3.1","type":"flannel","delegate":{"isDefaultGateway":true}}"#;
        fs::write(&conf, original).unwrap();
        let list_path = t.conf().join("10-flannel.conflist");
        assert_eq!(
            ensure_entry(&t.conf(), "/s", None, true).unwrap(),
            Some(list_path.clone())
        );
        assert!(!conf.exists());
        assert_eq!(
            fs::read_to_string(t.conf().join("10-flannel.conf.mesh-cni-orig")).unwrap(),
            original
        );
        let list = read(&list_path);
        assert_eq!(list["name"], "cbr0");
        assert_eq!(list["cniVersion"], "0.3.1");
        assert_eq!(types(&list), ["flannel", "mesh-cni"]);
        assert_eq!(list["plugins"][0], serde_json::from_str::<Value>(original).unwrap());
        // Idempotent: the conflist is now the active config.
        assert_eq!(
            ensure_entry(&t.conf(), "/s", None, true).unwrap(),
            Some(list_path.clone())
        );

        remove_entries(&t.conf()).unwrap();
        assert_eq!(fs::read_to_string(&conf).unwrap(), original);
        assert!(!list_path.exists());
        assert!(!t.conf().join("10-flannel.conf.mesh-cni-orig").exists());
    }

    #[test]
    fn rewritten_conf_is_converted_again_and_kept_on_restore() {
        let t = TempDir::new("rewrite");
        let conf = t.conf().join("10-flannel.conf");
        fs::write(&conf, r#"{"cniVersion":"0.3.1","name":"a","type":"flannel"}"#).unwrap();
        ensure_entry(&t.conf(), "/s", None, true).unwrap();
        // The main CNI writes its .conf again: it sorts before our conflist, so it is active.
        let newer = r#"{"cniVersion":"0.3.1","name":"a","type":"flannel","mtu":1400}"#;
        fs::write(&conf, newer).unwrap();
        ensure_entry(&t.conf(), "/s", None, false).unwrap();
        assert!(!conf.exists());
        assert_eq!(read(&t.conf().join("10-flannel.conflist"))["plugins"][0]["mtu"], 1400);
        remove_entries(&t.conf()).unwrap();
        assert_eq!(fs::read_to_string(&conf).unwrap(), newer);
    }

    #[test]
    fn holders_keep_the_install_until_the_last_leaves() {
        let t = TempDir::new("holders");
        let file = t.conf().join("10-calico.conflist");
        fs::write(&file, CONFLIST).unwrap();
        let exe = t.0.join("plugin-src");
        fs::write(&exe, b"#!/bin/true\n").unwrap();
        for holder in ["agent-old", "agent-new"] {
            register_holder(&t.conf(), holder).unwrap();
            install_binary(&exe, &t.bin()).unwrap();
            ensure_entry(&t.conf(), "/s", None, true).unwrap();
        }
        let bin = t.bin().join("mesh-cni");
        assert_eq!(fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(holders(&t.conf()).unwrap(), ["agent-new", "agent-old"]);

        assert!(!release(&t.conf(), &t.bin(), "agent-old").unwrap());
        assert!(has_entry_last(&read(&file)));
        assert!(bin.exists());

        assert!(release(&t.conf(), &t.bin(), "agent-new").unwrap());
        assert_eq!(types(&read(&file)), ["calico", "portmap"]);
        assert!(!bin.exists());
        assert!(!t.conf().join(HOLDERS_DIR).exists());
        // Releasing again is harmless.
        assert!(release(&t.conf(), &t.bin(), "agent-new").unwrap());
    }

    #[test]
    fn args() {
        let a = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse_args(&a("install --bin-dir /b --conf-dir=/c --socket /s --holder h --once")).unwrap();
        assert_eq!((o.uninstall, o.once), (false, true));
        assert_eq!(
            (o.bin_dir, o.conf_dir, o.socket, o.holder),
            ("/b".into(), "/c".into(), "/s".into(), "h".into())
        );
        assert!(parse_args(&a("uninstall --holder h")).unwrap().uninstall);
        assert!(parse_args(&a("install")).is_err());
        assert!(parse_args(&a("install --holder ../x")).is_err());
        assert!(parse_args(&a("install --holder h --bogus")).is_err());
        assert!(parse_args(&a("install --holder")).is_err());
        assert!(parse_args(&a("frob --holder h")).is_err());
    }

    #[test]
    fn kubeconfig_args() {
        let a = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse_args(&a(
            "install --holder h --kubeconfig-token /sa/token --api-server https://10.96.0.1:443",
        ))
        .unwrap();
        let k = o.kubeconfig.unwrap();
        assert_eq!((&k.token, &k.ca), (&"/sa/token".into(), &"/sa/ca.crt".into()));
        assert_eq!(k.host_path(), "/etc/cni/net.d/mesh-cni-kubeconfig");
        assert!(parse_args(&a("install --holder h")).unwrap().kubeconfig.is_none());
        assert!(parse_args(&a("install --holder h --api-server https://x")).is_err());
        assert_eq!(
            [base64(b""), base64(b"a"), base64(b"ab"), base64(b"abc")],
            ["", "YQ==", "YWI=", "YWJj"]
        );
    }
}
