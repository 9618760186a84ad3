// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A disk that fails writes under a served file, on this host, in seconds: a loop
//! device over a full tmpfs whose pages under the file's extents were punched out.
//!
//! Owns that fixture (always torn down), `prepare` through the binary and the
//! physical offset of a file byte, and what the tests around it share (a mapped
//! frontend, a store and a flush, `health`). Never touches anything outside its temp dirs.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::Duration,
};

use vhost_device_pmem::{
    blockmap::{self, Extent},
    sys,
};

use crate::{
    daemon::{self, Daemon},
    frontend::TestFrontend,
    root::{attach_loop, run},
};

pub const MIB: u64 = 1 << 20;
/// The tmpfs that plays the disk's media, and the loop device's backing image on it.
/// The image is written in full, so every block ext4 may write (journal, inode
/// tables, bitmaps) has its tmpfs page; only the served file's blocks are punched.
pub const TMPFS_SIZE: u64 = 96 * MIB;
pub const IMAGE_SIZE: u64 = 64 * MIB;
/// tmpfs (the media) → image file → loop device → ext4 → the served file. Drop
/// unmounts, detaches and deletes, whatever state construction reached.
pub struct FailingDisk {
    dir: tempfile::TempDir,
    tmpfs_mounted: bool,
    loopdev: Option<String>,
    ext4_mounted: bool,
}

impl FailingDisk {
    /// Builds the stack. `Err` is a missing capability (tmpfs or loop device);
    /// anything else that goes wrong panics.
    pub fn new() -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("vdp-failing-disk-")
            .tempdir()
            .unwrap();
        let mut d = Self {
            dir,
            tmpfs_mounted: false,
            loopdev: None,
            ext4_mounted: false,
        };
        let media = d.media();
        fs::create_dir(&media).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={TMPFS_SIZE},mode=0700"),
                "vdp-failing-disk",
                media.to_str().unwrap(),
            ],
        )
        .map_err(|e| format!("a tmpfs mount ({e})"))?;
        d.tmpfs_mounted = true;

        // Every byte written: the image takes its full size on the tmpfs.
        let image = d.image();
        let mut f = File::create(&image).unwrap();
        let chunk = vec![0u8; MIB as usize];
        for _ in 0..IMAGE_SIZE / MIB {
            f.write_all(&chunk).unwrap();
        }
        drop(f);
        let dev = attach_loop(&image)?;
        d.loopdev = Some(dev.clone());
        // 4 KiB blocks (the page size); nodiscard keeps the image's pages.
        run(
            "mkfs.ext4",
            &["-q", "-F", "-b", "4096", "-E", "nodiscard", &dev],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mnt = d.mnt();
        fs::create_dir(&mnt).unwrap();
        run("mount", &[&dev, mnt.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e}"));
        d.ext4_mounted = true;
        Ok(d)
    }

    fn media(&self) -> PathBuf {
        self.dir.path().join("media")
    }

    fn image(&self) -> PathBuf {
        self.media().join("image")
    }

    fn filler(&self) -> PathBuf {
        self.media().join("filler")
    }

    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    pub fn device(&self) -> &str {
        self.loopdev.as_deref().unwrap()
    }

    /// Takes the media away under `extents`: their pages are punched out of the
    /// image (the loop device has offset 0, so a physical offset on it is the offset
    /// in the image), then the tmpfs is filled, so writing them back needs a page
    /// the tmpfs cannot give. Returns the filler's size.
    pub fn fail_writes_to(&self, extents: &[Extent]) -> u64 {
        let image = OpenOptions::new().write(true).open(self.image()).unwrap();
        for e in extents {
            sys::fallocate(
                &image,
                sys::FALLOC_FL_PUNCH_HOLE | sys::FALLOC_FL_KEEP_SIZE,
                e.physical,
                e.length,
            )
            .unwrap();
        }
        drop(image);
        let mut filler = File::create(self.filler()).unwrap();
        let chunk = vec![0x5au8; MIB as usize];
        let mut written = 0u64;
        loop {
            match filler.write(&chunk) {
                Ok(0) => panic!("the tmpfs took a zero-length write"),
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        written
    }

    /// The media comes back: the filler goes, the tmpfs has pages to give again.
    pub fn recover(&self) {
        fs::remove_file(self.filler()).unwrap();
    }

    /// What the media holds at `physical`, read with O_DIRECT from the loop device
    /// (past every page cache above the loop device).
    pub fn read_media(&self, physical: u64, len: usize) -> Vec<u8> {
        let dev = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(self.device())
            .unwrap();
        // O_DIRECT wants a block-aligned buffer.
        let mut buf = vec![0u8; len + 4096];
        let skip = buf.as_ptr().align_offset(4096);
        dev.read_exact_at(&mut buf[skip..skip + len], physical)
            .unwrap();
        buf[skip..skip + len].to_vec()
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let umount = |m: &Path| {
            let m = m.to_str().unwrap();
            if run("umount", &[m]).is_err() {
                thread::sleep(Duration::from_millis(500));
                if let Err(e) = run("umount", &[m]) {
                    eprintln!("umount {m} failed ({e}); detaching lazily");
                    let _ = run("umount", &["-l", m]);
                }
            }
        };
        if self.ext4_mounted {
            umount(&self.mnt());
        }
        if let Some(dev) = &self.loopdev {
            let _ = run("losetup", &["-d", dev]);
        }
        if self.tmpfs_mounted {
            umount(&self.media());
        }
    }
}

pub fn prepare(path: &Path, size: u64) {
    let out = Command::new(daemon::BIN)
        .args(["prepare", path.to_str().unwrap(), "--size"])
        .arg(size.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prepare: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The physical offset (on the loop device) of byte `offset` of the file.
pub fn physical(extents: &[Extent], offset: u64) -> u64 {
    blockmap::physical_offset(extents, offset)
        .unwrap_or_else(|| panic!("no extent holds {offset:#x}: {extents:?}"))
}

/// A frontend that went through init and start, with the region mapped.
pub fn mapped(d: &Daemon) -> TestFrontend {
    let mut fe = TestFrontend::connect_started(&d.socket)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    fe.map_region(0).unwrap();
    fe
}

/// One store through the mapping, then one flush request: its status.
pub fn write_and_flush(fe: &mut TestFrontend, d: &Daemon, offset: u64, data: &[u8]) -> u32 {
    fe.write_pmem(offset, data).unwrap();
    let st = fe
        .flush(1)
        .unwrap_or_else(|e| panic!("flush: {e}\n{}", d.log_text()));
    st[0]
}

/// `vhost-device-pmem health --file F --state-dir D [extra]`.
pub fn health(file: &Path, state_dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--state-dir", state_dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    health_of(file, &args)
}

/// `vhost-device-pmem health --file F [args]`.
pub fn health_of(file: &Path, args: &[&str]) -> Output {
    Command::new(daemon::BIN)
        .args(["health", "--file", file.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
