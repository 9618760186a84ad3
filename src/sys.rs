// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Thin, checked wrappers for the host-file syscalls that `prepare` and `guard` share:
//! inode attribute flags, fallocate modes, file leases and who else has a file open;
//! and the descriptors a thread waits on (signalfd, the flush rate limit's timerfd).
//!
//! Owns: the raw constants and unsafe calls. Never decides policy, and never writes
//! file data (fallocate calls here only allocate, zero ranges that already read as
//! zeros, or unshare; callers choose the ranges).

use std::{
    fs::{self, File},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
};

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};

// linux/fs.h inode flags (FS_IOC_GETFLAGS / FS_IOC_SETFLAGS take an int).
pub const FS_IMMUTABLE_FL: libc::c_int = 0x0000_0010;
pub const FS_NOCOW_FL: libc::c_int = 0x0080_0000;
// linux/falloc.h
pub const FALLOC_FL_KEEP_SIZE: libc::c_int = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: libc::c_int = 0x02;
pub const FALLOC_FL_UNSHARE_RANGE: libc::c_int = 0x40;
/// Linux 6.17: allocate written, zeroed extents (the device zeroes them).
pub const FALLOC_FL_WRITE_ZEROES: libc::c_int = 0x80;
// linux/fcntl.h (not in the libc crate for x86_64 glibc)
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

#[repr(C)]
struct FOwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The inode flags (`lsattr`) of the file.
pub fn get_flags(file: &File) -> io::Result<libc::c_int> {
    Ok(rustix::fs::ioctl_getflags(file)?.bits() as libc::c_int)
}

/// Sets or clears `flag` in the inode flags, leaving the others as they are.
pub fn set_flag(file: &File, flag: libc::c_int, on: bool) -> io::Result<()> {
    let old = get_flags(file)?;
    let new = if on { old | flag } else { old & !flag };
    if new == old {
        return Ok(());
    }
    rustix::fs::ioctl_setflags(file, rustix::fs::IFlags::from_bits_retain(new as u32))?;
    Ok(())
}

/// fallocate(2) with `mode` over `[offset, offset + len)`.
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let mode = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
    loop {
        match rustix::fs::fallocate(file, mode, offset, len) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return Ok(r?),
        }
    }
}

/// Starts writeback of `[offset, offset + len)` and, with `wait`, waits for it (and
/// for writeback already under way there). Data only: no metadata is committed.
pub fn writeback(file: &File, offset: u64, len: u64, wait: bool) -> io::Result<()> {
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, flags) })?;
    Ok(())
}

/// The kind of lease to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseKind {
    /// Broken by any other open or a truncate; needs the file open only by us.
    Write,
    /// Broken by an open for writing or a truncate; needs no writer at all (so only
    /// for a read-only descriptor).
    Read,
}

impl LeaseKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Read => "read",
        }
    }
}

/// Routes lease-break notifications for `file` to thread `tid` as signal `sig`
/// (a realtime signal the thread blocks and waits for).
pub fn route_lease_signal(file: &File, sig: libc::c_int, tid: libc::pid_t) -> io::Result<()> {
    let owner = FOwnerEx {
        kind: F_OWNER_TID,
        pid: tid,
    };
    // SAFETY: valid fd and pointer to a properly laid out `struct f_owner_ex`.
    check(unsafe { libc::fcntl(file.as_raw_fd(), F_SETOWN_EX, &owner as *const FOwnerEx) })?;
    // SAFETY: plain fcntl on a valid fd.
    check(unsafe { libc::fcntl(file.as_raw_fd(), F_SETSIG, sig) })?;
    Ok(())
}

/// Takes a lease on the open file description. EAGAIN: another open (or, for a read
/// lease, a writer) exists; EINVAL: the filesystem has no leases; EACCES: not the
/// owner and no CAP_LEASE.
pub fn take_lease(file: &File, kind: LeaseKind) -> io::Result<()> {
    let arg = match kind {
        LeaseKind::Write => libc::F_WRLCK,
        LeaseKind::Read => libc::F_RDLCK,
    };
    // SAFETY: plain fcntl on a valid fd.
    check(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, arg) })?;
    Ok(())
}

/// Gives the lease up (lets a blocked opener go on). Harmless without a lease.
pub fn release_lease(file: &File) -> io::Result<()> {
    // SAFETY: plain fcntl on a valid fd.
    check(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) })?;
    Ok(())
}

/// The calling thread's kernel thread id.
pub fn gettid() -> libc::pid_t {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// A signal set holding just `sig`.
pub fn sigset_of(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks the signals of `set` in the calling thread (and threads it starts later).
pub fn block_signals(set: &libc::sigset_t) -> io::Result<()> {
    // SAFETY: valid set pointer, null old-set pointer.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Waits up to `timeout` for a signal of `set` (blocked in this thread); returns its
/// number and the fd it names (for lease and I/O signals), or None on timeout.
pub fn wait_signal(
    set: &libc::sigset_t,
    timeout: std::time::Duration,
) -> Option<(libc::c_int, libc::c_int)> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: siginfo_t is plain data, filled by the kernel.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid set, out-pointer and timeout for the duration of the call.
    let sig = unsafe { libc::sigtimedwait(set, &mut info, &ts) };
    if sig < 0 {
        return None;
    }
    // For SIGIO-style signals si_fd follows si_band (a long) in the union, which
    // starts after three ints (and padding) in siginfo_t on Linux.
    // SAFETY: reading plain integers inside the fully initialised siginfo_t.
    let fd = unsafe {
        let base = (&info as *const libc::siginfo_t).cast::<u8>();
        let union_off = if cfg!(target_pointer_width = "64") {
            16
        } else {
            12
        };
        let band = std::mem::size_of::<libc::c_long>();
        base.add(union_off + band)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    Some((sig, fd))
}

/// A descriptor that becomes readable while a signal of `set` (blocked in the
/// calling thread) is pending for the calling thread or the process: signalfd(2),
/// so one poll can wait for signals and descriptors together. Non-blocking.
pub fn signal_fd(set: &libc::sigset_t) -> io::Result<OwnedFd> {
    // SAFETY: valid set pointer; -1 asks for a new descriptor.
    let fd = check(unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes every signal pending on a [`signal_fd`] (as the calling thread sees it):
/// their numbers, in the order the kernel gives them.
pub fn take_signals(fd: &OwnedFd) -> Vec<libc::c_int> {
    let mut out = Vec::new();
    loop {
        // SAFETY: signalfd_siginfo is plain data, filled by the kernel.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: valid descriptor; the buffer is one signalfd_siginfo long.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n != size as isize {
            return out;
        }
        out.push(info.ssi_signo as libc::c_int);
    }
}

/// A one-shot monotonic timer as a descriptor (timerfd(2)), non-blocking: it
/// becomes readable when it expires, so an event loop waits for it like for any
/// other descriptor. Armed and disarmed through `&self` (timerfd_settime), so one
/// thread can wait on it while another disarms it.
#[derive(Debug)]
pub struct Timer {
    fd: OwnedFd,
}

impl Timer {
    pub fn new() -> io::Result<Self> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
        )?;
        Ok(Self { fd })
    }

    fn set(&self, after: std::time::Duration) -> io::Result<()> {
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let spec = Itimerspec {
            it_interval: zero,
            it_value: Timespec {
                tv_sec: i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: after.subsec_nanos().into(),
            },
        };
        timerfd_settime(&self.fd, TimerfdTimerFlags::empty(), &spec)?;
        Ok(())
    }

    /// Expires once, `after` from now (at least a nanosecond: a zero would disarm
    /// it), replacing any earlier setting.
    pub fn arm(&self, after: std::time::Duration) -> io::Result<()> {
        self.set(after.max(std::time::Duration::from_nanos(1)))
    }

    /// Will not expire (an expiry not yet read is dropped too).
    pub fn disarm(&self) -> io::Result<()> {
        self.set(std::time::Duration::ZERO)
    }

    /// Reads the expiry count, so the descriptor is no longer readable; 0 if it had
    /// not expired (never blocks).
    pub fn consume(&self) -> u64 {
        let mut n = [0u8; 8];
        match rustix::io::read(&self.fd, &mut n) {
            Ok(8) => u64::from_ne_bytes(n),
            _ => 0,
        }
    }

    pub fn as_raw_fd(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }
}

/// Other processes that hold `file` open (or mapped through an fd they still hold),
/// as "pid N (comm)". Best effort: processes we may not inspect are not listed.
pub fn other_openers(file: &File) -> Vec<String> {
    let Ok(me) = file.metadata() else {
        return Vec::new();
    };
    let own = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            fs::metadata(fd.path()).is_ok_and(|m| m.dev() == me.dev() && m.ino() == me.ino())
        });
        if holds {
            let comm = fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_lease_is_refused_while_another_open_exists_and_granted_after() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mine = File::options()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap();
        // NamedTempFile keeps its own descriptor open.
        let e = take_lease(&mine, LeaseKind::Write).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "{e}");
        let others = other_openers(&mine);
        assert!(others.is_empty(), "only this process holds it: {others:?}");
        let path = f.into_temp_path();
        take_lease(&mine, LeaseKind::Write).unwrap();
        release_lease(&mine).unwrap();
        drop(path);
    }

    #[test]
    fn flags_read_back() {
        let f = tempfile::tempfile().unwrap();
        // Not every filesystem has inode flags (tmpfs before 6.0 had none).
        if let Ok(flags) = get_flags(&f) {
            assert_eq!(flags & FS_IMMUTABLE_FL, 0);
        }
    }
}
