// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Who connected: the peer of the connection that vhost-user-backend accepted on
//! the listener, by its credentials (SO_PEERCRED) and its command name.
//!
//! Owns: finding the accepted connection among the process's descriptors. Never
//! reads from or writes to a connection.
//!
//! vhost-user-backend accepts the connection itself and keeps its descriptor to
//! itself; the accepted socket is still one of this process's descriptors, though,
//! and it is the only connected socket whose local address is the listener's
//! (control and agent clients have their sockets' addresses), so it is found by
//! that: a few cheap calls on each descriptor number, once per connection.

use std::{
    fs,
    os::fd::{AsFd, BorrowedFd, RawFd},
};

use rustix::net::{getsockname, sockopt, SocketAddrAny};

use crate::{report::VmmIdentity, util::rfc3339_now};

/// Descriptor numbers looked at, at most (the limit systemd sets by default is
/// 1024; a daemon serving one file holds a few dozen).
const MAX_FD: RawFd = 4096;

/// The peer of the connection accepted on `listener`, if one can be found.
pub fn accepted_peer(listener: BorrowedFd<'_>) -> Option<VmmIdentity> {
    let ours = getsockname(listener).ok()?;
    let listener_fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    (0..MAX_FD).filter(|&fd| fd != listener_fd).find_map(|fd| {
        // SAFETY: the number is only used for the calls below while this
        // function runs; a descriptor closed meanwhile makes them fail (EBADF),
        // and a reused number is checked like any other.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        peer_of(fd, &ours)
    })
}

/// The credentials of `fd`'s peer if `fd` is a connected socket whose local
/// address is `ours`.
fn peer_of(fd: BorrowedFd<'_>, ours: &SocketAddrAny) -> Option<VmmIdentity> {
    if sockopt::socket_acceptconn(fd).ok()? {
        return None;
    }
    if getsockname(fd).ok()? != *ours {
        return None;
    }
    let cred = sockopt::socket_peercred(fd).ok()?;
    let pid = cred.pid.as_raw_nonzero().get().unsigned_abs();
    Some(VmmIdentity {
        pid: Some(pid),
        uid: Some(cred.uid.as_raw()),
        comm: fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|c| c.trim_end().to_string()),
        since: rfc3339_now(),
    })
}

/// Same as [`accepted_peer`], for a listener held by value.
pub fn accepted_peer_of(listener: &impl AsFd) -> Option<VmmIdentity> {
    accepted_peer(listener.as_fd())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::{UnixListener, UnixStream};

    use super::*;

    #[test]
    fn the_accepted_connection_is_found_and_other_sockets_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vhost-user.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Another listener with a connection: not ours.
        let other = UnixListener::bind(dir.path().join("control.sock")).unwrap();
        let _c1 = UnixStream::connect(dir.path().join("control.sock")).unwrap();
        let _a1 = other.accept().unwrap();
        assert_eq!(accepted_peer_of(&listener), None, "nothing accepted yet");
        let _client = UnixStream::connect(&path).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let peer = accepted_peer_of(&listener).expect("the accepted connection");
        assert_eq!(peer.pid, Some(std::process::id()));
        assert_eq!(peer.uid, Some(rustix::process::getuid().as_raw()));
        let comm = fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(peer.comm.as_deref(), Some(comm.trim_end()));
        drop(_accepted);
        assert_eq!(accepted_peer_of(&listener), None, "the connection is gone");
    }
}
