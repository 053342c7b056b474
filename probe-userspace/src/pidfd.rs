//! A process's exit as an event: a pidfd turns readable when the process it names exits,
//! and it names that process only, whatever later reuses its PID.

use std::os::fd::{FromRawFd as _, OwnedFd};

use tokio::io::{Interest, unix::AsyncFd};

/// Resolves when the process exits.
pub struct ExitWatch(AsyncFd<OwnedFd>);

impl ExitWatch {
    pub fn new(pid: u32) -> std::io::Result<Self> {
        // SAFETY: pidfd_open takes a PID and flags and returns a new fd or -1; no memory
        // is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd from pidfd_open, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the AsyncFd owns the pidfd, which stays open and unchanged until dropped.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map(Self)
            .map_err(|e| e.into_parts().1)
    }

    pub async fn exited(&self) -> std::io::Result<()> {
        self.0.readable().await.map(|_| ())
    }
}
