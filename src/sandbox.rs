// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seccomp sandbox: the system calls a serving daemon may make, as Rust code
//! (rust-vmm's `seccompiler`), and installing that allow-list on every thread.
//!
//! Owns: the allow-list of each [`Profile`] and [`install`]. Never decides *when* to
//! install (the daemon does, after its start-up) and never makes a call it filters.

use std::collections::BTreeMap;

pub use crate::report::SeccompMode;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// Which code runs under the filter. Each profile is the [`common`] list plus its
/// own function ([`serve_rules`], [`nvdimm_rules`]), built from the shared parts
/// (unix sockets, syncs and state records, the guard's ioctls, fcntl commands).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// `serve` after its start-up: vhost-user connections, flushes, the guard,
    /// media errors, the control socket, metrics, the service manager, the exit.
    Serve,
    /// `nvdimm` after its start-up: the QMP session (connect, SO_PEERCRED), the
    /// mapping check, the guard with change notices, interval syncs, media errors,
    /// the control and agent sockets, QEMU's exit.
    Nvdimm,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("seccomp: this architecture ({0}) has no allow-list")]
    Arch(&'static str),
    #[error("seccomp: building the filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error(
        "seccomp: installing the filter: {0} (a service manager's system-call filter may \
         forbid seccomp(2): allow it, e.g. `SystemCallFilter=seccomp`, or run with \
         --seccomp off)"
    )]
    Install(#[from] seccompiler::Error),
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Installs the filter of `profile` on every thread of the process (TSYNC), so the
/// threads started before it are covered as well as those started later (which
/// inherit it). `Off` installs nothing. Also sets `no_new_privs`.
pub fn install(mode: SeccompMode, profile: Profile) -> Result<(), SandboxError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let (allow, clone3) = programs(mode, profile)?;
    // Two stacked filters; the kernel applies the most severe answer of all, and
    // ERRNO ranks above LOG and ALLOW (below KILL), so clone3 gets ENOSYS in both
    // modes (the allow-list lets it through). The clone3 filter goes first: it
    // allows everything else, so installing the allow-list (prctl, seccomp) runs
    // under it, and the allow-list need not list those two calls.
    seccompiler::apply_filter_all_threads(&clone3)?;
    seccompiler::apply_filter_all_threads(&allow)?;
    Ok(())
}

/// The two BPF programs: the allow-list, and the one that answers clone3 ENOSYS.
pub fn programs(
    mode: SeccompMode,
    profile: Profile,
) -> Result<(BpfProgram, BpfProgram), SandboxError> {
    let arch = target_arch()?;
    let unlisted = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let allow = SeccompFilter::new(rules(profile)?, unlisted, SeccompAction::Allow, arch)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok((allow.try_into()?, clone3.try_into()?))
}

fn target_arch() -> Result<TargetArch, SandboxError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SandboxError::Arch(std::env::consts::ARCH))
}

/// The allow-list of `profile`: system call number → rules (an empty list: any
/// arguments; otherwise the call is allowed when one rule's conditions all hold).
pub fn rules(profile: Profile) -> Result<Rules, SandboxError> {
    let mut r = common()?;
    match profile {
        Profile::Serve => r.extend(serve_rules()?),
        Profile::Nvdimm => r.extend(nvdimm_rules()?),
    }
    Ok(r)
}

/// A rule of conditions on 32-bit arguments (flags, commands, requests).
fn when(conds: &[(u8, Op, u64)]) -> Result<SeccompRule, SandboxError> {
    let c = conds
        .iter()
        .map(|(arg, op, v)| SeccompCondition::new(*arg, Len::Dword, op.clone(), *v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SeccompRule::new(c)?)
}

/// Argument `arg` equal to one of `values`: one rule each.
fn one_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, SandboxError> {
    values.iter().map(|v| when(&[(arg, Op::Eq, *v)])).collect()
}

/// Argument `arg` with none of the bits of `mask`.
fn without(arg: u8, mask: u64) -> Result<Vec<SeccompRule>, SandboxError> {
    Ok(vec![when(&[(arg, Op::MaskedEq(mask), 0)])?])
}

/// What any Rust thread of this program needs: memory, threads, signals, time,
/// descriptors, logging to stderr, exit.
fn common() -> Result<Rules, SandboxError> {
    let any = Vec::new;
    let prot_exec = libc::PROT_EXEC as u64;
    let mut r: Rules = [
        // Memory. Nothing is mapped or made executable after start-up: no PROT_EXEC.
        (libc::SYS_mmap, without(2, prot_exec)?),
        (libc::SYS_mprotect, without(2, prot_exec)?),
        (libc::SYS_munmap, any()),
        (libc::SYS_mremap, any()),
        (libc::SYS_madvise, any()),
        (libc::SYS_brk, any()),
        // Threads: clone only with CLONE_THREAD (no fork, no exec: nothing after
        // start-up starts a process). clone3 is listed here so the second filter
        // answers it ENOSYS, and the C library falls back to clone.
        (
            libc::SYS_clone,
            vec![when(&[(
                0,
                Op::MaskedEq(libc::CLONE_THREAD as u64),
                libc::CLONE_THREAD as u64,
            )])?],
        ),
        (libc::SYS_clone3, any()),
        (libc::SYS_set_robust_list, any()),
        (libc::SYS_rseq, any()),
        (libc::SYS_futex, any()),
        (libc::SYS_sched_yield, any()),
        (libc::SYS_sched_getaffinity, any()),
        (libc::SYS_gettid, any()),
        (libc::SYS_getpid, any()),
        (libc::SYS_exit, any()),
        (libc::SYS_exit_group, any()),
        // Thread names (std sets them with PR_SET_NAME); early memory-failure notice.
        (
            libc::SYS_prctl,
            one_of(
                0,
                &[
                    libc::PR_SET_NAME as u64,
                    libc::PR_GET_NAME as u64,
                    libc::PR_MCE_KILL as u64,
                ],
            )?,
        ),
        // Signals: the signal thread's sigwait, SIGBUS handling (with std's
        // alternate stacks), re-raising a fatal SIGBUS, the lease's SIGIO.
        (libc::SYS_rt_sigprocmask, any()),
        (libc::SYS_rt_sigaction, any()),
        (libc::SYS_rt_sigreturn, any()),
        (libc::SYS_rt_sigtimedwait, any()),
        (libc::SYS_sigaltstack, any()),
        (libc::SYS_tgkill, any()),
        // Time, randomness (hash map seeds).
        (libc::SYS_clock_gettime, any()),
        (libc::SYS_clock_nanosleep, any()),
        (libc::SYS_nanosleep, any()),
        // A sleep or wait with a timeout interrupted by a stop (SIGSTOP/SIGCONT, a
        // cgroup freeze, a debugger or strace attaching) resumes through it.
        (libc::SYS_restart_syscall, any()),
        (libc::SYS_getrandom, any()),
        // Descriptors and files.
        (libc::SYS_read, any()),
        (libc::SYS_write, any()),
        (libc::SYS_readv, any()),
        (libc::SYS_writev, any()),
        (libc::SYS_pread64, any()),
        (libc::SYS_pwrite64, any()),
        (libc::SYS_lseek, any()),
        (libc::SYS_close, any()),
        (libc::SYS_openat, any()),
        (libc::SYS_newfstatat, any()),
        (libc::SYS_fstat, any()),
        (libc::SYS_statx, any()),
        (libc::SYS_fstatfs, any()),
        (libc::SYS_getdents64, any()),
        (libc::SYS_readlinkat, any()),
        (libc::SYS_dup, any()),
        (libc::SYS_dup3, any()),
        (libc::SYS_pipe2, any()),
        (libc::SYS_eventfd2, any()),
        (libc::SYS_fcntl, fcntl(&[])?),
        // Waiting.
        (libc::SYS_ppoll, any()),
        (libc::SYS_epoll_create1, any()),
        (libc::SYS_epoll_ctl, any()),
        (libc::SYS_epoll_pwait, any()),
    ]
    .into_iter()
    .collect();
    // Calls x86_64 has and aarch64 does not (it has only the *at and p* forms).
    #[cfg(target_arch = "x86_64")]
    {
        r.insert(libc::SYS_poll, any());
        r.insert(libc::SYS_epoll_wait, any());
        r.insert(libc::SYS_open, any());
        r.insert(libc::SYS_stat, any());
        r.insert(libc::SYS_readlink, any());
        r.insert(libc::SYS_unlink, any());
        r.insert(libc::SYS_rename, any());
    }
    Ok(r)
}

/// The ioctl requests `serve` and `nvdimm` make after start-up, as the kernel sees them (the
/// low 32 bits).
pub mod ioctl {
    /// The block map (the guard's verification).
    pub const FS_IOC_FIEMAP: u64 = 0xC020_660B;
    /// Inode flags (the seal: chattr +i and its removal at exit).
    pub const FS_IOC_GETFLAGS: u64 = 0x8008_6601;
    pub const FS_IOC_SETFLAGS: u64 = 0x4008_6602;
    /// The inode generation (identity of the state files).
    pub const FS_IOC_GETVERSION: u64 = 0x8008_7601;
}

/// fcntl commands the `libc` crate does not name (Linux, every architecture).
const F_SETSIG: u64 = 10;
const F_SETOWN_EX: u64 = 15;

/// The fcntl commands every thread may use (descriptor and status flags, dup).
const COMMON_FCNTL: [u64; 5] = [
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_DUPFD_CLOEXEC as u64,
];

/// fcntl(2) with [`COMMON_FCNTL`] and `extra` commands: a profile's entry replaces
/// the common one.
fn fcntl(extra: &[u64]) -> Result<Vec<SeccompRule>, SandboxError> {
    let cmds: Vec<u64> = COMMON_FCNTL.iter().chain(extra).copied().collect();
    one_of(1, &cmds)
}

/// Unix sockets, already bound or to connect: serving connections (accept),
/// talking to a peer (connect, send, receive), the peer's credentials
/// (SO_PEERCRED), socket options. `socket(2)` for AF_UNIX only; no bind or listen
/// (every listening socket is bound during start-up).
fn unix_socket_rules() -> Result<Rules, SandboxError> {
    let any = Vec::new;
    let af_unix = libc::AF_UNIX as u64;
    Ok([
        (libc::SYS_socket, vec![when(&[(0, Op::Eq, af_unix)])?]),
        (libc::SYS_accept4, any()),
        (libc::SYS_accept, any()),
        (libc::SYS_connect, any()),
        (libc::SYS_sendmsg, any()),
        (libc::SYS_recvmsg, any()),
        (libc::SYS_sendto, any()),
        (libc::SYS_recvfrom, any()),
        (libc::SYS_shutdown, any()),
        (libc::SYS_getsockopt, any()),
        (libc::SYS_setsockopt, any()),
        (libc::SYS_getsockname, any()),
        (libc::SYS_getpeername, any()),
    ]
    .into_iter()
    .collect())
}

/// Durability of the file and of the state files: fdatasync/fsync of the file
/// (flushes, interval and final syncs), a state record's temporary file, rename
/// and directory fsync, a stale record's removal.
fn sync_and_state_rules() -> Rules {
    let any = Vec::new;
    let mut r: Rules = [
        (libc::SYS_fdatasync, any()),
        (libc::SYS_fsync, any()),
        (libc::SYS_renameat2, any()),
        (libc::SYS_unlinkat, any()),
        (libc::SYS_ftruncate, any()),
        (libc::SYS_fchmod, any()),
        (libc::SYS_umask, any()),
    ]
    .into_iter()
    .collect();
    #[cfg(target_arch = "x86_64")]
    r.insert(libc::SYS_renameat, any());
    r
}

/// The guard's ioctl requests: the block map, the seal; the inode generation of
/// state records.
fn guard_ioctl_rules() -> Result<Vec<SeccompRule>, SandboxError> {
    one_of(
        1,
        &[
            ioctl::FS_IOC_FIEMAP,
            ioctl::FS_IOC_GETFLAGS,
            ioctl::FS_IOC_SETFLAGS,
            ioctl::FS_IOC_GETVERSION,
        ],
    )
}

/// `serve`'s own calls, by what needs them.
fn serve_rules() -> Result<Rules, SandboxError> {
    let any = Vec::new;
    // vhost-user and the control, agent and notify sockets.
    let mut rules = unix_socket_rules()?;
    // Durability: the flush path (fdatasync/fsync/msync/sync_file_range), the
    // final syncs, the state files.
    rules.extend(sync_and_state_rules());
    rules.insert(libc::SYS_msync, any());
    // Guest memory: SET_MEM_TABLE and SHMEM_MAP map the VMM's descriptors
    // (mmap in the common list, without PROT_EXEC).
    rules.insert(libc::SYS_ioctl, guard_ioctl_rules()?);
    // The lease (F_SETLEASE, delivered as a real-time signal to the guard's
    // thread: F_SETSIG, F_SETOWN_EX) and the exclusive open-file lock.
    rules.insert(
        libc::SYS_fcntl,
        fcntl(&[
            libc::F_SETLEASE as u64,
            libc::F_GETLEASE as u64,
            F_SETSIG,
            F_SETOWN_EX,
            libc::F_OFD_SETLK as u64,
            libc::F_OFD_GETLK as u64,
        ])?,
    );
    // aarch64 has sync_file_range as number 84, which the `libc` crate does not name.
    #[cfg(target_arch = "x86_64")]
    rules.insert(libc::SYS_sync_file_range, any());
    #[cfg(target_arch = "aarch64")]
    rules.insert(84, any());
    Ok(rules)
}

/// `nvdimm`'s own calls after its start-up, by what needs them: the QMP session
/// (an AF_UNIX connect, line reads and writes with a read timeout, SO_PEERCRED),
/// the mapping check (reads of /proc/PID/smaps: the common open and read), the
/// guard (FIEMAP, the seal, inotify change notices: no lease, QEMU holds the file
/// open), the interval and final syncs, the state records, the control and agent
/// sockets, QEMU's exit (a stat of /proc/PID). No msync, no sync_file_range: the
/// export never maps the file for writing and never flushes a range.
fn nvdimm_rules() -> Result<Rules, SandboxError> {
    let any = Vec::new;
    let mut rules = unix_socket_rules()?;
    rules.extend(sync_and_state_rules());
    rules.insert(libc::SYS_ioctl, guard_ioctl_rules()?);
    rules.insert(libc::SYS_inotify_init1, any());
    rules.insert(libc::SYS_inotify_add_watch, any());
    rules.insert(libc::SYS_inotify_rm_watch, any());
    // The wait for QEMU's exit: a pidfd of the pid QMP's SO_PEERCRED named.
    rules.insert(libc::SYS_pidfd_open, any());
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_compiles_for_this_machine_in_both_modes() {
        for profile in [Profile::Serve, Profile::Nvdimm] {
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                let (allow, clone3) = programs(mode, profile).unwrap();
                assert!(allow.len() > 100, "{profile:?}: {}", allow.len());
                assert!(!clone3.is_empty());
            }
        }
    }

    #[test]
    fn serve_lists_the_flush_calls_and_refuses_foreign_sockets_and_exec() {
        let r = rules(Profile::Serve).unwrap();
        for call in [libc::SYS_fdatasync, libc::SYS_fsync, libc::SYS_msync] {
            assert!(r.contains_key(&call), "{call}");
        }
        for call in [libc::SYS_execve, libc::SYS_execveat, libc::SYS_ptrace] {
            assert!(!r.contains_key(&call), "{call}");
        }
        assert!(!r[&libc::SYS_socket].is_empty(), "socket has conditions");
        assert!(!r[&libc::SYS_clone].is_empty(), "clone has conditions");
    }

    #[test]
    fn nvdimm_lists_the_qmp_session_and_guard_calls_and_refuses_exec_and_inet() {
        let r = rules(Profile::Nvdimm).unwrap();
        // The QMP session: connect, line I/O with a read timeout, SO_PEERCRED; the
        // guard's change notices; the interval syncs and state records.
        for call in [
            libc::SYS_connect,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_openat,
            libc::SYS_inotify_init1,
            libc::SYS_inotify_add_watch,
            libc::SYS_inotify_rm_watch,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            libc::SYS_renameat2,
            libc::SYS_accept4,
            libc::SYS_statx,
        ] {
            assert!(r.contains_key(&call), "{call}");
        }
        // No exec, no tracing, no new listening sockets, no flush path of serve.
        for call in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_msync,
            libc::SYS_kill,
        ] {
            assert!(!r.contains_key(&call), "{call}");
        }
        // socket(2) only for AF_UNIX: exactly serve's single-condition rule.
        let af_unix = when(&[(0, Op::Eq, libc::AF_UNIX as u64)]).unwrap();
        assert_eq!(r[&libc::SYS_socket], vec![af_unix]);
        assert_eq!(r[&libc::SYS_ioctl], guard_ioctl_rules().unwrap());
        // fcntl: the common commands and nothing of the lease's.
        assert_eq!(r[&libc::SYS_fcntl], fcntl(&[]).unwrap());
        // Serve shares the socket and state parts, and keeps its lease and flush calls.
        let s = rules(Profile::Serve).unwrap();
        assert_eq!(s[&libc::SYS_socket], r[&libc::SYS_socket]);
        assert!(s.contains_key(&libc::SYS_msync));
        assert!(!s.contains_key(&libc::SYS_inotify_init1));
        assert_ne!(s[&libc::SYS_fcntl], r[&libc::SYS_fcntl]);
    }
}
