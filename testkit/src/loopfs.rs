// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small real filesystem for root tests: mkfs on a loop device over a sparse image
//! of a chosen size, mounted under a temporary directory in /var/tmp. Dropping it
//! unmounts, detaches and deletes, whatever state construction reached.
//!
//!
//! Owns: that filesystem, torn down on drop. Never touches anything outside its
//! temporary directory.

use std::{
    fs::{self, File},
    path::PathBuf,
    thread,
    time::Duration,
};

use crate::root::{attach_loop, run};

pub struct LoopFs {
    dir: tempfile::TempDir,
    pub loopdev: Option<String>,
    mounted: bool,
}

impl LoopFs {
    /// `mkfs` (e.g. "mkfs.ext4") with `mkfs_args` before the device, on an image
    /// of `mib` MiB, mounted.
    pub fn new(mkfs: &str, mkfs_args: &[&str], mib: u64) -> LoopFs {
        let dir = tempfile::Builder::new()
            .prefix("vdp-loopfs-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let mut m = LoopFs {
            dir,
            loopdev: None,
            mounted: false,
        };
        let image = m.dir.path().join("image");
        File::create(&image).unwrap().set_len(mib << 20).unwrap();
        let dev = attach_loop(&image).unwrap_or_else(|e| panic!("losetup: {e}"));
        m.loopdev = Some(dev.clone());
        let mut args: Vec<&str> = mkfs_args.to_vec();
        args.push(&dev);
        run(mkfs, &args).unwrap_or_else(|e| panic!("{e}"));
        let mnt = m.mnt();
        fs::create_dir(&mnt).unwrap();
        run("mount", &[&dev, mnt.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e}"));
        m.mounted = true;
        m
    }

    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt().join(name)
    }

    /// Bytes available to unprivileged users (statvfs f_bavail).
    pub fn available(&self) -> u64 {
        let v = rustix::fs::statvfs(self.mnt()).unwrap();
        v.f_bavail * v.f_frsize
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let mnt = self.mnt();
        if self.mounted {
            let m = mnt.to_str().unwrap();
            if run("umount", &[m]).is_err() {
                thread::sleep(Duration::from_millis(500));
                if let Err(e) = run("umount", &[m]) {
                    eprintln!("umount {m} failed ({e}); detaching lazily");
                    let _ = run("umount", &["-l", m]);
                }
            }
        }
        if let Some(dev) = &self.loopdev {
            let _ = run("losetup", &["-d", dev]);
        }
    }
}
