//! The calibration cache on disk: one JSON file per compute device, so that `Auto` measures a
//! device once per machine (and build), not once per process.
//!
//! Where: [`ENV_CACHE_DIR`] if set, else `$XDG_CACHE_HOME/burn-offload`, else
//! `$HOME/.cache/burn-offload` (on Windows `%LOCALAPPDATA%\burn-offload`); with none of them
//! there is no disk cache. [`ENV_DISABLE_CALIBRATION_CACHE`] switches it off (nothing is read
//! or written). [`calibration_cache_dir`] says which directory is in use,
//! [`calibration_cache_file`] which file a device's entry is in, and
//! [`clear_calibration_cache`] removes a device's entries.
//!
//! An entry holds the [`Calibration`] and the key it was measured under ([`CacheKey`]): the
//! entry format, this crate's version, the device's type and id, the build profile (a debug
//! build's CPU kernels are 10 to 60 times slower), whether host memory was pinned, and the
//! device's [`fingerprint`](crate::inner::TargetDevice::fingerprint) (CPU model and threads;
//! GPU name and driver). The file's name holds the device, the profile and the pinning;
//! reading an entry checks every field of its key against the current one, so a new driver,
//! a different GPU at the same index or a new version of this crate measures again and
//! rewrites the file. A missing, unreadable, corrupt or stale file is never an error: it is
//! logged (at debug or info level) and replaced by a new measurement; a file that cannot be
//! written is logged as a warning. Files are written to a temporary name and renamed, so
//! processes measuring the same device at once leave one whole entry.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::Calibration;
use crate::inner::TargetDevice;

/// Environment variable: the directory of the calibration cache, used as it is (created when
/// needed). Unset or empty: the user's cache directory (see the [module docs](self)).
pub const ENV_CACHE_DIR: &str = "BURN_OFFLOAD_CACHE_DIR";

/// Environment switch: `1` (or `true`, `yes`, `on`) keeps `Auto`'s calibration off the disk:
/// each process measures its devices again, and no file is read or written. Spelled and parsed
/// as the other switches ([`crate::mode::parse_env_flag`]); an unrecognised value counts as
/// unset (the cache stays on) and is logged once.
pub const ENV_DISABLE_CALIBRATION_CACHE: &str = "BURN_OFFLOAD_DISABLE_CALIBRATION_CACHE";

/// Version of the entry format (the JSON layout and what the measurement does); a new one
/// makes every older entry stale.
const FORMAT_VERSION: u32 = 1;

/// The name of the cache's subdirectory in the user's cache directory.
const SUBDIR: &str = "burn-offload";

/// What an entry was measured under; an entry is used only where all of it equals the current
/// key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    /// Version of the entry format.
    pub format: u32,
    /// This crate's version.
    pub crate_version: String,
    /// The device's Rust type, e.g. `burn_ndarray::backend::NdArrayDevice`.
    pub target: String,
    /// The device, as `Debug` prints it, e.g. `Cuda(CudaDevice { index: 0 })`.
    pub device: String,
    /// The device's id: type and index.
    pub device_id: [u16; 2],
    /// `debug` or `release` (whether debug assertions are on).
    pub profile: String,
    /// Whether host memory was pinned for the measurement.
    pub pinned: bool,
    /// What the target says about the hardware and its driver
    /// ([`TargetDevice::fingerprint`]).
    pub fingerprint: String,
}

impl CacheKey {
    /// The key of `device` with host memory pinned if `pin`, in this build.
    pub fn new<D: TargetDevice>(device: &D, pin: bool) -> Self {
        let id = device.to_id();
        Self {
            format: FORMAT_VERSION,
            crate_version: env!("CARGO_PKG_VERSION").to_string(),
            target: std::any::type_name::<D>().to_string(),
            device: format!("{device:?}"),
            device_id: [id.type_id, id.index_id],
            profile: profile().to_string(),
            pinned: pin,
            fingerprint: device.fingerprint(),
        }
    }
}

/// One file of the cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    key: CacheKey,
    calibration: Calibration,
}

/// The build profile that rates depend on.
fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// Whether [`ENV_DISABLE_CALIBRATION_CACHE`] switches the disk cache off.
fn disabled() -> bool {
    let Some(value) = std::env::var_os(ENV_DISABLE_CALIBRATION_CACHE) else {
        return false;
    };
    let value = value.to_string_lossy();
    match crate::mode::parse_env_flag(&value) {
        Some(off) => off,
        None => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            if !value.trim().is_empty() {
                WARNED.call_once(|| {
                    log::warn!(
                        "{ENV_DISABLE_CALIBRATION_CACHE}={value:?} is not recognised, so it is \
                         treated as unset (the calibration cache stays on); set it to 1, true, \
                         yes or on to switch the cache off, or 0, false, no or off (any case)"
                    )
                });
            }
            false
        }
    }
}

/// A non-empty environment variable.
fn env_path(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

/// The user's cache directory: `%LOCALAPPDATA%` on Windows; elsewhere `$XDG_CACHE_HOME` where
/// it is an absolute path (the XDG rule), else `$HOME/.cache`.
fn user_cache_dir() -> Option<PathBuf> {
    if cfg!(windows) {
        return env_path("LOCALAPPDATA").map(PathBuf::from);
    }
    env_path("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| env_path("HOME").map(|home| PathBuf::from(home).join(".cache")))
}

/// The directory of the calibration cache: [`ENV_CACHE_DIR`] if set, else `burn-offload` in
/// the user's cache directory (`$XDG_CACHE_HOME`, `$HOME/.cache`, `%LOCALAPPDATA%`). `None`
/// where the cache is switched off ([`ENV_DISABLE_CALIBRATION_CACHE`]) or there is no such
/// directory. Read from the environment at each call; the directory may not exist yet.
pub fn calibration_cache_dir() -> Option<PathBuf> {
    if disabled() {
        return None;
    }
    env_path(ENV_CACHE_DIR)
        .map(PathBuf::from)
        .or_else(|| user_cache_dir().map(|dir| dir.join(SUBDIR)))
}

/// The CPU's model for a [fingerprint](crate::inner::TargetDevice::fingerprint): the first
/// `model name` (x86), `Hardware` or `Processor` line of `/proc/cpuinfo`, else its first `CPU
/// implementer` and `CPU part` (ARM), then the architecture; only the architecture where there
/// is no `/proc/cpuinfo`.
pub(crate) fn cpu_model() -> String {
    let arch = std::env::consts::ARCH;
    match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(info) => match cpuinfo_model(&info) {
            Some(model) => format!("{model} ({arch})"),
            None => arch.to_string(),
        },
        Err(_) => arch.to_string(),
    }
}

/// The model named by the text of a `/proc/cpuinfo` (see [`cpu_model`]).
fn cpuinfo_model(info: &str) -> Option<String> {
    let field = |name: &str| {
        info.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name && !value.trim().is_empty()).then(|| value.trim().to_string())
        })
    };
    ["model name", "Hardware", "Processor"]
        .into_iter()
        .find_map(field)
        .or_else(|| match (field("CPU implementer"), field("CPU part")) {
            (Some(implementer), Some(part)) => {
                Some(format!("CPU implementer {implementer}, part {part}"))
            }
            _ => None,
        })
}

/// `s` with every character but ASCII letters, digits, `_` and `-` replaced by `.` (a file
/// name's part that means the same everywhere).
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '.'
            }
        })
        .collect()
}

/// The start of the names of `device`'s files: `calibration-<type>-<type id>.<index>-`.
fn file_prefix<D: TargetDevice>(device: &D) -> String {
    let id = device.to_id();
    format!(
        "calibration-{}-{}.{}-",
        sanitize(std::any::type_name::<D>()),
        id.type_id,
        id.index_id
    )
}

/// The name of the file of `device`'s entry with host memory pinned if `pin`, in this build.
fn file_name<D: TargetDevice>(device: &D, pin: bool) -> String {
    format!(
        "{}{}-{}.json",
        file_prefix(device),
        profile(),
        if pin { "pinned" } else { "pageable" }
    )
}

/// The file that holds (or would hold) `device`'s calibration with host memory pinned if
/// `pin`, in this build (debug and release builds have an entry each), e.g.
/// `~/.cache/burn-offload/calibration-burn_ndarray..backend..NdArrayDevice-0.0-release-pinned.json`.
/// `None` where there is no disk cache ([`calibration_cache_dir`]).
pub fn calibration_cache_file<D: TargetDevice>(device: &D, pin: bool) -> Option<PathBuf> {
    calibration_cache_dir().map(|dir| dir.join(file_name(device, pin)))
}

/// Removes `device`'s entries from the disk cache (pinned and pageable, debug and release
/// builds; leftovers of interrupted writes too), so that the next process that applies a
/// policy in `Auto` mode measures it again; the in-process calibration stays (see
/// [`clear_calibration`](super::clear_calibration)). Returns how many files were removed: 0
/// where there were none, or no disk cache. Errors are those of reading the directory and
/// removing a file (a directory that does not exist is not one).
pub fn clear_calibration_cache<D: TargetDevice>(device: &D) -> io::Result<usize> {
    let Some(dir) = calibration_cache_dir() else {
        return Ok(0);
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let prefix = file_prefix(device);
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// Whether every rate is a positive, finite number and the rows ascend (an entry edited by
/// hand, or written by a broken measurement, is measured again).
fn plausible(c: &Calibration) -> bool {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    positive(c.upload_bytes_per_s)
        && c.upload_latency_s.is_finite()
        && c.upload_latency_s >= 0.0
        && c.rows.iter().all(|r| {
            r.rows > 0 && positive(r.zero_copy_bytes_per_s) && positive(r.device_matmul_bytes_per_s)
        })
        && c.rows.windows(2).all(|w| w[0].rows < w[1].rows)
}

/// The entry in `path` if it was measured under `key`; `None` (logged) otherwise.
fn read_entry(path: &Path, key: &CacheKey) -> Option<Calibration> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            log::debug!("no calibration cached in {}", path.display());
            return None;
        }
        Err(e) => {
            log::info!(
                "calibration cache {}: unreadable ({e}), measuring",
                path.display()
            );
            return None;
        }
    };
    let entry: Entry = match serde_json::from_str(&text) {
        Ok(entry) => entry,
        Err(e) => {
            log::info!(
                "calibration cache {}: not a calibration entry ({e}), measuring again",
                path.display()
            );
            return None;
        }
    };
    if entry.key != *key {
        log::info!(
            "calibration cache {}: measured under {:?}, not under the current {:?}; measuring \
             again",
            path.display(),
            entry.key,
            key
        );
        return None;
    }
    if !plausible(&entry.calibration) {
        log::info!(
            "calibration cache {}: implausible rates, measuring again",
            path.display()
        );
        return None;
    }
    Some(entry.calibration)
}

/// `device`'s calibration from the disk cache, where an entry measured under the current key
/// is there (see the [module docs](self)); `None` (with the reason logged) otherwise.
pub(crate) fn load<D: TargetDevice>(device: &D, pin: bool) -> Option<(Calibration, PathBuf)> {
    let path = calibration_cache_file(device, pin)?;
    let calibration = read_entry(&path, &CacheKey::new(device, pin))?;
    Some((calibration, path))
}

/// Writes `calibration` to `path` through a temporary file in the same directory and a rename.
fn write_entry(path: &Path, entry: &Entry) -> io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::to_string_pretty(entry).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = PathBuf::from(tmp);
    let written = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Stores `calibration` as `device`'s entry (host memory pinned if `pin`) in the disk cache,
/// replacing any; nothing where there is no disk cache. A failure is logged as a warning and
/// otherwise ignored: the calibration is still used in this process.
pub(crate) fn store<D: TargetDevice>(device: &D, pin: bool, calibration: &Calibration) {
    let Some(path) = calibration_cache_file(device, pin) else {
        return;
    };
    let entry = Entry {
        key: CacheKey::new(device, pin),
        calibration: calibration.clone(),
    };
    match write_entry(&path, &entry) {
        Ok(()) => log::debug!("calibration of {device:?} cached in {}", path.display()),
        Err(e) => log::warn!(
            "could not cache the calibration of {device:?} in {} ({e}); the next process \
             measures it again",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_portable() {
        assert_eq!(
            sanitize("burn_ndarray::backend::NdArrayDevice"),
            "burn_ndarray..backend..NdArrayDevice"
        );
        assert_eq!(sanitize("a<b, c>/d\\e"), "a.b..c..d.e");
    }

    #[test]
    fn cpu_models_are_read_from_cpuinfo() {
        let x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) \
                   Processor\nflags\t\t: fpu\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) \
                   Processor\n";
        assert_eq!(
            cpuinfo_model(x86).as_deref(),
            Some("Intel(R) Xeon(R) Processor")
        );
        let arm = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: \
                   0xd0c\n";
        assert_eq!(
            cpuinfo_model(arm).as_deref(),
            Some("CPU implementer 0x41, part 0xd0c")
        );
        assert_eq!(cpuinfo_model("processor\t: 0\nmodel name\t:\n"), None);
        assert!(cpu_model().contains(std::env::consts::ARCH));
    }
}
