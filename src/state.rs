// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The state directory: what the daemon keeps about one backing file across restarts
//! (its bad ranges, its health record), how those files are named, which file they
//! belong to, and how they are replaced.
//!
//! Owns: naming by canonical path, the file identity checked at load (a record of
//! another file is set aside, never applied), and exclusive, atomic, fsynced writes.
//! Never reads or writes the backing file's data.

use std::{
    ffi::c_long,
    fs::{self, File},
    io::{self, Write},
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use log::{info, warn};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Who a record belongs to. Device and inode numbers alone are no identity (device
/// numbers change across reboots, inode numbers are reused), so the filesystem's id
/// and the inode's generation and birth time come with them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// The filesystem id (`f_fsid`; derived from the filesystem UUID on ext4, XFS
    /// and btrfs), hex.
    pub fsid: String,
    pub inode: u64,
    /// The inode's generation (FS_IOC_GETVERSION), where the filesystem has one.
    pub generation: Option<u64>,
    /// Birth time in nanoseconds since the epoch, where the filesystem records one.
    pub birth_ns: Option<i128>,
    /// Size when the record was written. A file that grew is the same file (prepare
    /// extends files); one that shrank is not treated as the same.
    pub size: u64,
}

impl FileIdentity {
    pub fn of(file: &File) -> io::Result<Self> {
        let meta = file.metadata()?;
        let fsid = rustix::fs::fstatvfs(file.as_fd())?.f_fsid;
        let birth_ns = rustix::fs::statx(
            file.as_fd(),
            "",
            rustix::fs::AtFlags::EMPTY_PATH,
            rustix::fs::StatxFlags::BTIME,
        )
        .ok()
        .filter(|s| s.stx_mask & rustix::fs::StatxFlags::BTIME.bits() != 0)
        .map(|s| i128::from(s.stx_btime.tv_sec) * 1_000_000_000 + i128::from(s.stx_btime.tv_nsec));
        Ok(Self {
            fsid: format!("{fsid:016x}"),
            inode: meta.ino(),
            generation: inode_generation(file),
            birth_ns,
            size: meta.len(),
        })
    }

    /// Whether a record written for `recorded` applies to the file with this identity.
    pub fn matches(&self, recorded: &FileIdentity) -> bool {
        self.fsid == recorded.fsid
            && self.inode == recorded.inode
            && (self.generation.is_none()
                || recorded.generation.is_none()
                || self.generation == recorded.generation)
            && (self.birth_ns.is_none()
                || recorded.birth_ns.is_none()
                || self.birth_ns == recorded.birth_ns)
            && self.size >= recorded.size
    }
}

/// FS_IOC_GETVERSION: the inode generation (ext4, XFS, btrfs); `None` where the
/// filesystem has none (tmpfs answers ENOTTY).
fn inode_generation(file: &File) -> Option<u64> {
    // The opcode is declared with a `long` (that size is part of the number), but
    // ext4, XFS and btrfs write a 32-bit `int`: read exactly that, or the upper half
    // would be whatever was in the buffer and no record would ever match again.
    const FS_IOC_GETVERSION: rustix::ioctl::Opcode = rustix::ioctl::opcode::read::<c_long>(b'v', 1);
    // SAFETY: FS_IOC_GETVERSION writes one 32-bit generation into the getter's buffer.
    let v = unsafe {
        rustix::ioctl::ioctl(
            file.as_fd(),
            rustix::ioctl::Getter::<FS_IOC_GETVERSION, u32>::new(),
        )
    };
    v.ok().map(u64::from)
}

/// One record as stored: whose it is, then its own fields.
#[derive(Serialize, Deserialize)]
struct Stored<T> {
    /// The backing file's canonical path when the record was written (for people).
    file: String,
    /// Absent in records written by 0.1, which are trusted by their name alone.
    #[serde(default)]
    identity: Option<FileIdentity>,
    #[serde(flatten)]
    data: T,
}

/// The kinds of record kept per backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The persistent set of bad ranges.
    BadRanges,
    /// A latched sync failure (see `durability`).
    Health,
}

impl Kind {
    fn suffix(self) -> &'static str {
        match self {
            Self::BadRanges => "badblocks.json",
            Self::Health => "health.json",
        }
    }
}

/// The state files of one backing file.
#[derive(Clone, Debug)]
pub struct StateFiles {
    dir: PathBuf,
    stem: String,
    backing: PathBuf,
    identity: Option<FileIdentity>,
    /// In a state directory, 0.1 named records after the file's base name only.
    legacy_stem: Option<String>,
}

impl StateFiles {
    /// Names the state files of `backing` (canonicalised here): next to it as
    /// `<name>.<kind>`, or in `state_dir` under its whole canonical path escaped
    /// (`/vm-a/disk.img` → `vm\x2da-disk.img.<kind>`), so two images with the same
    /// name in different directories never share a record. `file` is the open
    /// backing file, whose identity every record carries.
    pub fn new(backing: &Path, state_dir: Option<&Path>, file: Option<&File>) -> io::Result<Self> {
        let canonical = fs::canonicalize(backing)?;
        let (dir, stem) = match state_dir {
            Some(d) => (d.to_path_buf(), escape_path(&canonical)),
            None => (
                canonical
                    .parent()
                    .map_or_else(|| PathBuf::from("/"), Path::to_path_buf),
                canonical
                    .file_name()
                    .map_or_else(|| "backing".into(), |n| n.to_string_lossy().into_owned()),
            ),
        };
        let identity = file.map(FileIdentity::of).transpose()?;
        let legacy_stem = state_dir.and_then(|_| {
            canonical
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        });
        Ok(Self {
            dir,
            stem,
            backing: canonical,
            identity,
            legacy_stem,
        })
    }

    pub fn path(&self, kind: Kind) -> PathBuf {
        self.dir.join(format!("{}.{}", self.stem, kind.suffix()))
    }

    /// Loads a record. A missing file is `None`; a corrupt one is an error (nothing
    /// recorded may be forgotten silently); a record of another file (identity
    /// mismatch) is renamed aside with a warning and is `None`.
    pub fn load<T: DeserializeOwned>(&self, kind: Kind) -> io::Result<Option<T>> {
        let path = self.path(kind);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.load_legacy(kind),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        let stored: Stored<T> = serde_json::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        if let (Some(now), Some(then)) = (&self.identity, &stored.identity) {
            if !now.matches(then) {
                let aside = self.set_aside(&path)?;
                warn!(
                    "{} was written for another file at this path ({}: recorded {then:?}, now {now:?}); \
                     set aside as {} and not applied",
                    path.display(),
                    stored.file,
                    aside.display()
                );
                return Ok(None);
            }
        } else if stored.identity.is_none() {
            info!(
                "{} carries no file identity (written by an older version); trusted by its name",
                path.display()
            );
        }
        Ok(Some(stored.data))
    }

    /// A record 0.1 wrote in the state directory under the file's base name: adopted
    /// only if the path it names is this file (it is then written under the new name
    /// at the next change), never for another image of the same name.
    fn load_legacy<T: DeserializeOwned>(&self, kind: Kind) -> io::Result<Option<T>> {
        let Some(stem) = &self.legacy_stem else {
            return Ok(None);
        };
        let path = self.dir.join(format!("{stem}.{}", kind.suffix()));
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(None);
        };
        let stored: Stored<T> = serde_json::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        let same = fs::canonicalize(&stored.file).is_ok_and(|p| p == self.backing);
        if !same {
            warn!(
                "{} (written by an older version, named after the base name only) belongs to {}, \
                 not {}: not applied",
                path.display(),
                stored.file,
                self.backing.display()
            );
            return Ok(None);
        }
        info!(
            "adopting {} (written by an older version) as {}",
            path.display(),
            self.path(kind).display()
        );
        Ok(Some(stored.data))
    }

    /// Replaces a record: a new temporary file in the same directory, created
    /// exclusively (never through an existing name or a symbolic link), written and
    /// fsynced, renamed over the old record, then the directory fsynced.
    pub fn save<T: Serialize>(&self, kind: Kind, data: &T) -> io::Result<()> {
        let path = self.path(kind);
        let stored = Stored {
            file: self.backing.display().to_string(),
            identity: self.identity.clone(),
            data,
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.{}.", self.stem, kind.suffix()))
            .suffix(".tmp")
            .tempfile_in(&self.dir)?;
        tmp.write_all(serde_json::to_string_pretty(&stored)?.as_bytes())?;
        tmp.write_all(b"\n")?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path).map_err(|e| e.error)?;
        File::open(&self.dir)?.sync_all()
    }

    /// Removes a record (and syncs the directory); a missing one is fine. Returns
    /// whether there was one.
    pub fn remove(&self, kind: Kind) -> io::Result<bool> {
        match fs::remove_file(self.path(kind)) {
            Ok(()) => {
                File::open(&self.dir)?.sync_all()?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn set_aside(&self, path: &Path) -> io::Result<PathBuf> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let aside = PathBuf::from(format!("{}.stale-{secs}", path.display()));
        fs::rename(path, &aside)?;
        Ok(aside)
    }
}

/// A path as one file name, the way systemd escapes paths: the leading `/` dropped,
/// `/` → `-`, and `-`, `\`, a leading `.` and any byte outside `[A-Za-z0-9:_.]`
/// as `\xNN`. Reversible, so distinct paths never share a name.
pub fn escape_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let bytes = bytes.strip_prefix(b"/").unwrap_or(bytes);
    let mut out = String::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b':' | b'_' | b'.' => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Rec {
        n: u32,
    }

    #[test]
    fn distinct_paths_get_distinct_names() {
        let a = escape_path(Path::new("/vm-a/disk.img"));
        let b = escape_path(Path::new("/vm/a-disk.img"));
        assert_eq!(a, "vm\\x2da-disk.img");
        assert_eq!(b, "vm-a\\x2ddisk.img");
        assert_ne!(a, b);
        assert_eq!(
            escape_path(Path::new("/.hidden/x y")),
            "\\x2ehidden-x\\x20y"
        );
    }

    #[test]
    fn two_images_with_one_name_in_one_state_dir_do_not_share_records() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        fs::create_dir(&state).unwrap();
        let mut files = Vec::new();
        for vm in ["vm-a", "vm-b"] {
            fs::create_dir(d.path().join(vm)).unwrap();
            let p = d.path().join(vm).join("disk.img");
            let f = File::create(&p).unwrap();
            files.push(StateFiles::new(&p, Some(&state), Some(&f)).unwrap());
        }
        files[0].save(Kind::BadRanges, &Rec { n: 1 }).unwrap();
        assert_eq!(
            files[0].load::<Rec>(Kind::BadRanges).unwrap(),
            Some(Rec { n: 1 })
        );
        assert_eq!(files[1].load::<Rec>(Kind::BadRanges).unwrap(), None);
        assert_ne!(
            files[0].path(Kind::BadRanges),
            files[1].path(Kind::BadRanges)
        );
        // Only the two records' files are there: no temporary files are left.
        assert_eq!(fs::read_dir(&state).unwrap().count(), 1);
    }

    #[test]
    fn a_base_name_record_of_0_1_is_adopted_only_by_the_file_it_names() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        fs::create_dir(&state).unwrap();
        let mut imgs = Vec::new();
        for vm in ["vm-a", "vm-b"] {
            fs::create_dir(d.path().join(vm)).unwrap();
            let p = d.path().join(vm).join("disk.img");
            File::create(&p).unwrap();
            imgs.push(p);
        }
        // 0.1: `<state>/disk.img.badblocks.json`, naming vm-a's image.
        fs::write(
            state.join("disk.img.badblocks.json"),
            format!(r#"{{"file":"{}","n":5}}"#, imgs[0].display()),
        )
        .unwrap();
        let of =
            |p: &Path| StateFiles::new(p, Some(&state), Some(&File::open(p).unwrap())).unwrap();
        assert_eq!(
            of(&imgs[0]).load::<Rec>(Kind::BadRanges).unwrap(),
            Some(Rec { n: 5 })
        );
        assert_eq!(of(&imgs[1]).load::<Rec>(Kind::BadRanges).unwrap(), None);
    }

    #[test]
    fn a_record_of_a_replaced_file_is_set_aside_not_applied() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.img");
        let f = File::create(&p).unwrap();
        let old = StateFiles::new(&p, None, Some(&f)).unwrap();
        old.save(Kind::Health, &Rec { n: 7 }).unwrap();
        drop(f);
        // A new file at the same path (another inode, at least another birth).
        let keep = File::create(d.path().join("keep")).unwrap();
        fs::remove_file(&p).unwrap();
        let f = File::create(&p).unwrap();
        drop(keep);
        let new = StateFiles::new(&p, None, Some(&f)).unwrap();
        assert_eq!(new.load::<Rec>(Kind::Health).unwrap(), None);
        assert!(!new.path(Kind::Health).exists());
        let aside: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("disk.img.health.json.stale-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        // The same file still matches its own record.
        new.save(Kind::Health, &Rec { n: 8 }).unwrap();
        assert_eq!(new.load::<Rec>(Kind::Health).unwrap(), Some(Rec { n: 8 }));
        assert!(new.remove(Kind::Health).unwrap());
        assert!(!new.remove(Kind::Health).unwrap());
    }

    #[test]
    fn a_corrupt_record_is_an_error_and_a_planted_link_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.img");
        let f = File::create(&p).unwrap();
        let s = StateFiles::new(&p, None, Some(&f)).unwrap();
        fs::write(s.path(Kind::Health), "{not json").unwrap();
        let e = s.load::<Rec>(Kind::Health).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // A symbolic link planted where a record goes is replaced, its target untouched.
        let target = d.path().join("victim");
        fs::write(&target, "precious").unwrap();
        fs::remove_file(s.path(Kind::Health)).unwrap();
        std::os::unix::fs::symlink(&target, s.path(Kind::Health)).unwrap();
        s.save(Kind::Health, &Rec { n: 1 }).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
        assert_eq!(s.load::<Rec>(Kind::Health).unwrap(), Some(Rec { n: 1 }));
    }
}
