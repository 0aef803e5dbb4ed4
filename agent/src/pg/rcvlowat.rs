//! `SO_RCVLOWAT` on the replication socket, so a stream coalescing small XLogData
//! messages ([`super::conn::PgConnection::coalesce_reads`]) is not woken by each one.
//!
//! While less than the mark is waiting, Linux's TCP (4.18 and later) does not wake a
//! waiting `epoll` for new data (`tcp_data_ready` in net/ipv4/tcp_input.c), except under
//! memory pressure, when the receive window is down to about one segment, and for FIN or
//! errors; lowering the mark signals readiness at once if data is waiting
//! (`tcp_set_rcvlowat` in net/ipv4/tcp.c). A non-blocking `recv` returns whatever is there
//! whatever the mark. Setting the mark also grows the receive buffer to about twice the
//! mark when it is smaller (never shrinks it). See socket(7).
//!
//! Neither `socket2`, `nix` nor `rustix` exposes this option, hence the one `setsockopt`
//! statement below, the only `unsafe` in the agent (tests also read the mark back).

use std::os::fd::{AsFd, AsRawFd};

/// Sets the socket's receive low-water mark to `bytes` (at least 1).
pub fn set(socket: impl AsFd, bytes: usize) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes.max(1)).unwrap_or(libc::c_int::MAX);
    let fd = socket.as_fd();
    // SAFETY: `fd` is an open descriptor borrowed for the whole call, and setsockopt reads
    // exactly `size_of::<c_int>()` bytes from `&value`, a live local of that type.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The socket's receive low-water mark (to test that naps raise and lower it).
#[cfg(test)]
pub fn get(socket: impl AsFd) -> std::io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let fd = socket.as_fd();
    // SAFETY: `fd` is open for the call; getsockopt writes at most `len` bytes (the size of
    // `value`, a live local) and stores the written length in `len`.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(usize::try_from(value).unwrap_or(0))
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the running kernel behaves as described above: Linux 4.18 or later. Older ones
/// wake readers for every segment anyway and do not signal readiness when the mark is
/// lowered, which could leave waiting WAL unread.
pub fn usable() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").is_ok_and(|r| release_at_least(&r, 4, 18))
}

fn release_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_are_compared_by_major_and_minor() {
        assert!(release_at_least("6.18.44-fc-v1098\n", 4, 18));
        assert!(release_at_least("4.18.0-553.el8_10.x86_64", 4, 18));
        assert!(release_at_least("5.4.0", 4, 18));
        assert!(!release_at_least("4.17.19", 4, 18));
        assert!(!release_at_least("3.10.0-1160.el7.x86_64", 4, 18));
        assert!(!release_at_least("", 4, 18));
        assert!(!release_at_least("garbage", 4, 18));
    }
}
