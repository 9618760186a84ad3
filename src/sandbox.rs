// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seccomp sandbox: the system calls a serving daemon may make, as Rust code
//! (rust-vmm's `seccompiler`); the short list of calls that kill it; and the record
//! of every other unlisted call, which is answered ENOSYS and counted instead.
//!
//! Owns: the allow-list of each [`Profile`], the kill list, [`install`], the SIGSYS
//! handler and the denial count ([`denials`]). Never decides *when* to install (the
//! daemon does, after its start-up) and never makes a call it filters.

use std::{
    collections::BTreeMap,
    os::fd::{BorrowedFd, IntoRawFd},
    sync::{
        atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering},
        Arc, Once,
    },
};

use crate::{
    events::{EventHub, EventKind},
    service::{self, Services},
};
use log::warn;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

pub use crate::report::SeccompMode;

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
    #[error("seccomp: setting up the denial record: {0}")]
    Record(std::io::Error),
}

/// The filters a process under `enforce` or `log` has (`Seccomp_filters:` in
/// /proc/PID/status): clone3's ENOSYS, the kill list, the allow-list.
pub const FILTERS: usize = 3;

/// Enters the sandbox: under `enforce`, first the SIGSYS handler and the service
/// thread that reports denials (logs each call once, publishes a
/// [`EventKind::SandboxDenied`], counts it); then [`install`].
pub fn enter(
    mode: SeccompMode,
    profile: Profile,
    events: &Arc<EventHub>,
    services: &Arc<Services>,
) -> Result<(), SandboxError> {
    if mode == SeccompMode::Enforce {
        denial::start(events.clone(), services).map_err(SandboxError::Record)?;
    }
    install(mode, profile)?;
    #[cfg(debug_assertions)]
    test_hook(services).map_err(SandboxError::Record)?;
    Ok(())
}

/// Debug builds only (compiled out of release builds, so of the packages): with
/// `VDP_SANDBOX_TEST_HOOK` set, a service thread started once the filter is on
/// panics (`panic`), makes an unlisted call (`unlisted`: getppid) or one on the
/// kill list (`killed`: socket(AF_INET)), so the tests reach these paths in the
/// real binary (tests/sandbox_contexts.rs).
#[cfg(debug_assertions)]
fn test_hook(services: &Arc<Services>) -> std::io::Result<()> {
    let Ok(what) = std::env::var("VDP_SANDBOX_TEST_HOOK") else {
        return Ok(());
    };
    warn!("VDP_SANDBOX_TEST_HOOK={what}: a debug build's test hook runs");
    services.spawn(
        "sandbox-hook",
        |_| {},
        move || match what.as_str() {
            "panic" => panic!("forced by VDP_SANDBOX_TEST_HOOK=panic"),
            "unlisted" => {
                // SAFETY: a system call without arguments.
                let r = unsafe { libc::syscall(libc::SYS_getppid) };
                let e = std::io::Error::last_os_error();
                warn!("test hook: getppid returned {r} ({e})");
            }
            "killed" => {
                // SAFETY: a system call with integer arguments; the filter ends us.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                warn!("test hook: socket(AF_INET) returned {fd}");
            }
            other => warn!("test hook: unknown {other:?}"),
        },
    )
}

/// Unlisted calls answered ENOSYS since the filter went on (0 without a filter or
/// under `log`).
pub fn denials() -> u64 {
    denial::TOTAL.load(Ordering::Acquire)
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Installs the filters of `profile` on every thread of the process (TSYNC), so
/// the threads started before them are covered as well as those started later
/// (which inherit them). `Off` installs nothing. Also sets `no_new_privs`. Under
/// `enforce` an unlisted call raises SIGSYS (SECCOMP_RET_TRAP): give it a handler
/// first ([`enter`] does), or it kills as the kill list does.
pub fn install(mode: SeccompMode, profile: Profile) -> Result<(), SandboxError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let Programs {
        allow,
        kill,
        clone3,
    } = programs(mode, profile)?;
    // Stacked filters; the kernel applies the most severe answer of all: KILL
    // above TRAP above ERRNO above LOG and ALLOW. So a call on the kill list dies
    // whatever the allow-list says, and clone3 gets ENOSYS in both modes (the
    // allow-list lets it through). Each filter allows everything the next one's
    // installation makes (prctl, seccomp): clone3's and the kill list allow all
    // else, and the allow-list goes last, so it need not list those two calls.
    seccompiler::apply_filter_all_threads(&clone3)?;
    seccompiler::apply_filter_all_threads(&kill)?;
    seccompiler::apply_filter_all_threads(&allow)?;
    Ok(())
}

/// The BPF programs of one profile and mode.
pub struct Programs {
    /// Listed → allow; unlisted → TRAP (`enforce`: ENOSYS and a denial) or LOG.
    pub allow: BpfProgram,
    /// On the kill list → KILL_PROCESS (`enforce`) or LOG; anything else → allow.
    pub kill: BpfProgram,
    /// clone3 → ENOSYS (the C library falls back to clone); anything else → allow.
    pub clone3: BpfProgram,
}

/// The programs [`install`] installs.
pub fn programs(mode: SeccompMode, profile: Profile) -> Result<Programs, SandboxError> {
    let arch = target_arch()?;
    let (unlisted, killed) = match mode {
        SeccompMode::Log => (SeccompAction::Log, SeccompAction::Log),
        _ => (SeccompAction::Trap, SeccompAction::KillProcess),
    };
    let allow = SeccompFilter::new(rules(profile)?, unlisted, SeccompAction::Allow, arch)?;
    let kill = SeccompFilter::new(kill_rules()?, SeccompAction::Allow, killed, arch)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok(Programs {
        allow: allow.try_into()?,
        kill: kill.try_into()?,
        clone3: clone3.try_into()?,
    })
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
        // std's backtrace printer (RUST_BACKTRACE, a caught panic) asks for the
        // working directory to shorten the paths it prints. It reveals a name and
        // changes nothing; the daemon itself needs none (every path option is made
        // absolute at start-up).
        (libc::SYS_getcwd, any()),
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

/// The kill list: calls that no path of the daemon makes and that an attacker who
/// took over a thread would need, so they end the process (in both profiles):
///
/// - running other code: `execve`, `execveat`; `mmap`, `mprotect` and
///   `pkey_mprotect` with `PROT_EXEC` (nothing maps code after start-up);
/// - making or reaching into another process: `fork`, `vfork`, `clone` without
///   `CLONE_THREAD`, `ptrace`, `process_vm_readv`, `process_vm_writev`;
/// - leaving the host: `socket` of any family but `AF_UNIX`;
/// - changing the kernel or the mount and namespace view: `init_module`,
///   `finit_module`, `delete_module`, `kexec_load`, `kexec_file_load`, `bpf`,
///   `mount`, `umount2`, `pivot_root`, `chroot`, `setns`, `unshare`.
///
/// Every other unlisted call is answered ENOSYS and counted: a library may make a
/// call no test saw, and the guest must not lose its device for it.
pub fn kill_rules() -> Result<Rules, SandboxError> {
    let always = Vec::new;
    let exec = libc::PROT_EXEC as u64;
    let executable = || -> Result<Vec<SeccompRule>, SandboxError> {
        Ok(vec![when(&[(2, Op::MaskedEq(exec), exec)])?])
    };
    let mut r: Rules = [
        (libc::SYS_execve, always()),
        (libc::SYS_execveat, always()),
        (libc::SYS_mmap, executable()?),
        (libc::SYS_mprotect, executable()?),
        (libc::SYS_pkey_mprotect, executable()?),
        (
            libc::SYS_clone,
            vec![when(&[(0, Op::MaskedEq(libc::CLONE_THREAD as u64), 0)])?],
        ),
        (libc::SYS_ptrace, always()),
        (libc::SYS_process_vm_readv, always()),
        (libc::SYS_process_vm_writev, always()),
        (
            libc::SYS_socket,
            vec![when(&[(0, Op::Ne, libc::AF_UNIX as u64)])?],
        ),
        (libc::SYS_init_module, always()),
        (libc::SYS_finit_module, always()),
        (libc::SYS_delete_module, always()),
        (libc::SYS_kexec_load, always()),
        (libc::SYS_kexec_file_load, always()),
        (libc::SYS_bpf, always()),
        (libc::SYS_mount, always()),
        (libc::SYS_umount2, always()),
        (libc::SYS_pivot_root, always()),
        (libc::SYS_chroot, always()),
        (libc::SYS_setns, always()),
        (libc::SYS_unshare, always()),
    ]
    .into_iter()
    .collect();
    // aarch64 has neither (only clone).
    #[cfg(target_arch = "x86_64")]
    {
        r.insert(libc::SYS_fork, always());
        r.insert(libc::SYS_vfork, always());
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
    // The flush rate limit's timer (`--flush-rate-limit`): created before the
    // sandbox, armed and disarmed while serving.
    rules.insert(libc::SYS_timerfd_settime, any());
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

/// The record of denied calls: a SIGSYS handler (the kernel's answer to an
/// unlisted call under `enforce`, `SECCOMP_RET_TRAP`) that makes the call return
/// -ENOSYS and counts it, and a service thread that reports each call number once.
///
/// The handler runs on the thread that made the call, in the middle of whatever
/// it was doing (a lock may be held), so it only touches atomics and makes three
/// listed calls: `gettid`, `prctl(PR_GET_NAME)` and `write` to an eventfd. The reporter blocks on that
/// eventfd (and the services' stop descriptor) with no timeout: an idle daemon makes
/// no wake-ups for it.
mod denial {
    use super::*;

    /// Counters by call number; numbers at or past the last slot share it.
    const SLOTS: usize = 1024;
    static COUNTS: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
    /// The first thread that made each call, and its name (PR_GET_NAME: 16 bytes,
    /// taken in the handler, as the thread may be gone when the reporter looks).
    static FIRST_TID: [AtomicU32; SLOTS] = [const { AtomicU32::new(0) }; SLOTS];
    static FIRST_NAME: [[AtomicU64; 2]; SLOTS] =
        [const { [AtomicU64::new(0), AtomicU64::new(0)] }; SLOTS];
    pub(super) static TOTAL: AtomicU64 = AtomicU64::new(0);
    /// The eventfd the handler writes to; -1 until the reporter runs.
    static WAKE: AtomicI32 = AtomicI32::new(-1);
    static STARTED: Once = Once::new();

    /// `si_code` of a SIGSYS raised by a seccomp filter.
    const SYS_SECCOMP: i32 = 1;

    /// The kernel's siginfo of a SIGSYS (`_sigsys` of the union), as laid out on
    /// 64-bit Linux (x86_64 and aarch64 alike: three ints, padding, the union at 16).
    #[repr(C)]
    #[allow(dead_code)]
    struct SigsysInfo {
        signo: i32,
        errno: i32,
        code: i32,
        call_addr: *mut libc::c_void,
        syscall: i32,
        arch: u32,
    }

    /// Installs the handler and starts the reporter (once per process).
    pub(super) fn start(events: Arc<EventHub>, services: &Arc<Services>) -> std::io::Result<()> {
        let mut result = Ok(());
        STARTED.call_once(|| result = start_once(events, services));
        result
    }

    fn start_once(events: Arc<EventHub>, services: &Arc<Services>) -> std::io::Result<()> {
        use rustix::event::{eventfd, EventfdFlags};
        if cfg!(not(any(target_arch = "x86_64", target_arch = "aarch64"))) {
            return Err(std::io::Error::other(
                "no SIGSYS return register known for this architecture",
            ));
        }
        // Non-blocking: the handler never waits, whatever the counter holds.
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        // SAFETY: installing a handler that only touches atomics, gettid(2),
        // prctl(2) and write(2), async-signal-safe and allowed by every profile.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // The descriptor lives as long as the process (the handler may run until
        // the last thread exits).
        let fd = wake.into_raw_fd();
        WAKE.store(fd, Ordering::Release);
        let svc = services.clone();
        services.spawn(
            "sandbox-denials",
            |_| {},
            move || {
                // SAFETY: `fd` is never closed (see above).
                let wake = unsafe { BorrowedFd::borrow_raw(fd) };
                let mut reported = vec![false; SLOTS];
                while let Ok(true) = service::wait_readable(&svc, wake) {
                    let mut buf = [0u8; 8];
                    let _ = rustix::io::read(wake, &mut buf);
                    report_new(&mut reported, &events);
                }
            },
        )
    }

    /// Logs and publishes each call number denied since the last look, once.
    fn report_new(reported: &mut [bool], events: &EventHub) {
        for (slot, seen) in reported.iter_mut().enumerate() {
            let count = COUNTS[slot].load(Ordering::Acquire);
            if count == 0 || *seen {
                continue;
            }
            *seen = true;
            let number = slot as u32;
            let name = call_name(slot);
            let tid = FIRST_TID[slot].load(Ordering::Acquire);
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&FIRST_NAME[slot][0].load(Ordering::Acquire).to_ne_bytes());
            raw[8..].copy_from_slice(&FIRST_NAME[slot][1].load(Ordering::Acquire).to_ne_bytes());
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            let thread = match String::from_utf8_lossy(&raw[..end]) {
                name if name.is_empty() => format!("thread {tid}"),
                name => name.into_owned(),
            };
            warn!(
                "seccomp: denied system call {number} ({name}) on thread {thread:?}: answered \
                 ENOSYS, the daemon serves on (counted in status.sandbox_denials; logged once \
                 per call). A path needs a call the allow-list lacks: please report this line"
            );
            events.publish(EventKind::SandboxDenied {
                syscall: number,
                name: name.clone(),
                thread,
            });
        }
    }

    /// The name of call number `slot` on this architecture.
    pub(super) fn call_name(slot: usize) -> String {
        if slot == SLOTS - 1 {
            return format!("a call numbered {} or more", SLOTS - 1);
        }
        syscalls::Sysno::new(slot)
            .map(|s| s.name().to_string())
            .unwrap_or_else(|| "unknown".into())
    }

    extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers, laid out
        // as `SigsysInfo` for a SIGSYS.
        let info = unsafe { &*(info as *const SigsysInfo) };
        if info.code != SYS_SECCOMP {
            // Sent by a process (kill -SYS), not a filter: no call to answer.
            return;
        }
        // SAFETY: `ctx` is the interrupted thread's ucontext, restored on return.
        unsafe { set_return(ctx, -i64::from(libc::ENOSYS)) };
        let slot = usize::try_from(info.syscall).map_or(SLOTS - 1, |n| n.min(SLOTS - 1));
        COUNTS[slot].fetch_add(1, Ordering::AcqRel);
        if FIRST_TID[slot].load(Ordering::Acquire) == 0 {
            // SAFETY: gettid(2) cannot fail.
            let tid = unsafe { libc::gettid() } as u32;
            if FIRST_TID[slot]
                .compare_exchange(0, tid, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let mut name = [0u8; 16];
                // SAFETY: PR_GET_NAME writes at most 16 bytes to a local buffer; a
                // plain system call, allowed by every profile.
                unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
                let (mut a, mut b) = ([0u8; 8], [0u8; 8]);
                a.copy_from_slice(&name[..8]);
                b.copy_from_slice(&name[8..]);
                FIRST_NAME[slot][0].store(u64::from_ne_bytes(a), Ordering::Release);
                FIRST_NAME[slot][1].store(u64::from_ne_bytes(b), Ordering::Release);
            }
        }
        // Counted last: whoever sees the count sees the name.
        TOTAL.fetch_add(1, Ordering::AcqRel);
        let fd = WAKE.load(Ordering::Acquire);
        if fd >= 0 {
            // SAFETY: errno belongs to the interrupted code: saved and restored
            // around write(2), which is async-signal-safe (8 bytes from a local).
            unsafe {
                let errno = *libc::__errno_location();
                let one = 1u64;
                libc::write(fd, (&one as *const u64).cast(), 8);
                *libc::__errno_location() = errno;
            }
        }
    }

    /// Makes the trapped call return `ret` (a negative errno, as the kernel would).
    ///
    /// # Safety
    /// `ctx` is the ucontext of a SIGSYS handler raised by SECCOMP_RET_TRAP.
    #[cfg(target_arch = "x86_64")]
    unsafe fn set_return(ctx: *mut libc::c_void, ret: i64) {
        let uc = ctx as *mut libc::ucontext_t;
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = ret;
    }

    /// As above; on aarch64 the result is in x0.
    #[cfg(target_arch = "aarch64")]
    unsafe fn set_return(ctx: *mut libc::c_void, ret: i64) {
        let uc = ctx as *mut libc::ucontext_t;
        (*uc).uc_mcontext.regs[0] = ret as u64;
    }

    /// Never installed there (see `start_once`).
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    unsafe fn set_return(_ctx: *mut libc::c_void, _ret: i64) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_compiles_for_this_machine_in_both_modes() {
        for profile in [Profile::Serve, Profile::Nvdimm] {
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                let p = programs(mode, profile).unwrap();
                assert!(p.allow.len() > 100, "{profile:?}: {}", p.allow.len());
                assert!(p.kill.len() > 20, "{profile:?}: {}", p.kill.len());
                assert!(!p.clone3.is_empty());
            }
        }
    }

    #[test]
    fn the_kill_list_holds_what_only_an_attacker_calls_and_nothing_a_profile_needs() {
        let k = kill_rules().unwrap();
        for call in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_bpf,
            libc::SYS_mount,
        ] {
            assert_eq!(k[&call], vec![], "{call}: unconditional");
        }
        // Conditional: clone without CLONE_THREAD, socket of a family but AF_UNIX,
        // PROT_EXEC mappings.
        for call in [
            libc::SYS_clone,
            libc::SYS_socket,
            libc::SYS_mmap,
            libc::SYS_mprotect,
        ] {
            assert_eq!(k[&call].len(), 1, "{call}");
        }
        // A call a profile allows whatever its arguments is never killed.
        for profile in [Profile::Serve, Profile::Nvdimm] {
            let r = rules(profile).unwrap();
            for (call, allowed) in &r {
                if allowed.is_empty() {
                    assert!(
                        !k.contains_key(call),
                        "{profile:?}: {call} allowed and killed"
                    );
                }
            }
        }
        // The calls std's backtrace printer and the trap record make are listed.
        let r = rules(Profile::Serve).unwrap();
        for call in [libc::SYS_getcwd, libc::SYS_gettid, libc::SYS_write] {
            assert!(r.contains_key(&call), "{call}");
        }
    }

    #[test]
    fn denied_calls_are_named_by_this_architectures_numbers() {
        assert_eq!(denial::call_name(libc::SYS_getppid as usize), "getppid");
        assert_eq!(denial::call_name(libc::SYS_ioctl as usize), "ioctl");
        assert_eq!(denial::call_name(1023), "a call numbered 1023 or more");
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
