// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small ext4 of its own for a test's state directory: an image in a temporary
//! directory, a loop device, a mount; remounted read-only and back, or filled up.
//!
//! Owns that filesystem (always unmounted and detached on drop). Never touches
//! anything outside its temporary directory.

use std::{
    fs::{self, File},
    io::Write,
    path::PathBuf,
    thread,
    time::Duration,
};

use crate::root::{attach_loop, run};

/// ext4 on a loop device, mounted in a temporary directory.
pub struct LoopFs {
    dir: tempfile::TempDir,
    loopdev: Option<String>,
    mounted: bool,
}

impl LoopFs {
    /// An ext4 of `mib` MiB, no blocks reserved for root (so full means full for
    /// the daemon too). `Err`: no loop device.
    pub fn new(mib: u64) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("vdp-loopfs-")
            .tempdir()
            .unwrap();
        let mut fs = Self {
            dir,
            loopdev: None,
            mounted: false,
        };
        let image = fs.dir.path().join("image");
        File::create(&image).unwrap().set_len(mib << 20).unwrap();
        let dev = attach_loop(&image)?;
        fs.loopdev = Some(dev.clone());
        run("mkfs.ext4", &["-q", "-F", "-m", "0", "-b", "4096", &dev])
            .unwrap_or_else(|e| panic!("{e}"));
        let mnt = fs.mnt();
        fs::create_dir(&mnt).unwrap();
        run("mount", &[&dev, mnt.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e}"));
        fs.mounted = true;
        Ok(fs)
    }

    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn filler(&self) -> PathBuf {
        self.mnt().join("filler")
    }

    /// `mount -o remount,ro` (what ext4's errors=remount-ro does after an error).
    pub fn remount_ro(&self) {
        run("mount", &["-o", "remount,ro", self.mnt().to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn remount_rw(&self) {
        run("mount", &["-o", "remount,rw", self.mnt().to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Writes a filler file until the filesystem has no block left (synced), then
    /// checks that not even a small new file fits.
    pub fn fill(&self) {
        let mut f = File::create(self.filler()).unwrap();
        let chunk = vec![0xa5u8; 1 << 20];
        // Space the filesystem held back for delayed allocations comes free after a
        // sync: fill again until a sync frees nothing.
        for round in 0.. {
            let mut took = 0;
            for size in [1 << 20, 4096] {
                loop {
                    match f.write(&chunk[..size]) {
                        Ok(0) => panic!("a zero-length write"),
                        Ok(n) => took += n,
                        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                        Err(e) => panic!("filling {}: {e}", self.mnt().display()),
                    }
                }
            }
            f.sync_all().unwrap();
            if took == 0 {
                break;
            }
            assert!(round < 100, "{} never fills up", self.mnt().display());
        }
        let probe = self.mnt().join("probe");
        let r = File::create(&probe).and_then(|mut p| {
            p.write_all(&[1u8; 512])?;
            p.sync_all()
        });
        let _ = fs::remove_file(&probe);
        assert!(
            r.is_err(),
            "{} still takes a small file",
            self.mnt().display()
        );
    }

    /// Frees the space [`Self::fill`] took.
    pub fn free(&self) {
        fs::remove_file(self.filler()).unwrap();
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let m = self.mnt();
            let m = m.to_str().unwrap();
            if run("umount", &[m]).is_err() {
                thread::sleep(Duration::from_millis(500));
                if run("umount", &[m]).is_err() {
                    let _ = run("umount", &["-l", m]);
                }
            }
        }
        if let Some(dev) = &self.loopdev {
            let _ = run("losetup", &["-d", dev]);
        }
    }
}
