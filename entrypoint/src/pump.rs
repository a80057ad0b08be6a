//! Draining the command's stdout and stderr pipes into shippers.
//!
//! Each pipe has its own thread that does nothing but read: the command never waits on the
//! network, only on this thread being scheduled. The pipe is enlarged so bursts fit while it runs.
//!
//! Secret values are redacted on this thread, before the bytes reach the shipper: nothing
//! unredacted is ever buffered for shipping. Whenever the pipe is empty the redactor's hold-back
//! is flushed, except for a tail that may be the start of a value (see the `redact` crate).

use std::{
    fs::File,
    io::{self, Read},
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, OnceLock},
    thread,
    time::{Duration, Instant},
};

use client::Shipper;
use nix::{
    fcntl::{FcntlArg, OFlag, fcntl},
    poll::{PollFd, PollFlags, PollTimeout, poll},
};
use redact::{Redactor, Secrets};

/// Pipe capacity asked for (the default system-wide cap for unprivileged users).
const PIPE_SIZE: i32 = 1 << 20;
/// Bytes read per `read`.
const READ_SIZE: usize = 128 << 10;
/// After the command exits, a pipe still held open (by a process it left behind) is read until
/// it has been quiet this long.
const QUIET: Duration = Duration::from_millis(100);
/// A wakeup that found less than this means small writes: nap between rounds instead.
const SMALL_ROUND: usize = 16 << 10;
/// A nap after which this much waited means the command writes fast: wake per write again.
const FAST_ROUND: usize = 512 << 10;
/// Pause between read rounds while output trickles in.
const NAP: Duration = Duration::from_millis(1);
/// Empty naps before the reader blocks until the next write.
const IDLE_NAPS: u32 = 10;
/// How often an idle reader checks whether the command exited.
const IDLE_CHECK: Duration = Duration::from_millis(250);

/// When the command exited, set once by the supervisor.
#[derive(Debug, Default)]
pub struct ExitTime(OnceLock<Instant>);

impl ExitTime {
    pub fn set(&self, at: Instant) {
        let _ = self.0.set(at);
    }

    pub fn get(&self) -> Option<Instant> {
        self.0.get().copied()
    }
}

/// Starts a thread that reads `fd` into `shipper`, redacting `secrets`, until end of file (or,
/// once the command exited, until the pipe is quiet or half the grace period is gone), then
/// closes the shipper.
pub fn spawn(
    name: &str,
    fd: OwnedFd,
    shipper: Shipper,
    secrets: Arc<Secrets>,
    exited: Arc<ExitTime>,
    grace: Duration,
) -> io::Result<thread::JoinHandle<()>> {
    // Best effort: a bigger pipe absorbs bursts; a smaller one is still correct.
    let _ = fcntl(fd.as_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
    fcntl(
        fd.as_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(io::Error::from)?;
    thread::Builder::new()
        .name(format!("read-{name}"))
        .spawn(move || {
            let mut redactor = Redactor::new(secrets);
            drain(File::from(fd), &shipper, &mut redactor, &exited, grace);
            redactor.finish(|b| {
                shipper.write(b);
            });
            let deadline = exited.get().unwrap_or_else(Instant::now) + grace;
            shipper.close(deadline);
        })
}

fn drain(
    mut pipe: File,
    shipper: &Shipper,
    redactor: &mut Redactor,
    exited: &ExitTime,
    grace: Duration,
) {
    let mut ship = |b: &[u8]| {
        shipper.write(b);
    };
    let mut buf = vec![0; READ_SIZE];
    let mut napping = false;
    let mut idle_naps = 0;
    loop {
        let mut got = 0;
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    redactor.feed(&buf[..n], &mut ship);
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if redactor.held() > 0 {
                        redactor.flush_idle(&mut ship);
                    }
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
        let exited_at = exited.get();
        if let Some(t) = exited_at
            && t.elapsed() >= grace / 2
        {
            return;
        }
        // A reader blocked in poll makes every write of the command wake it: a cross-CPU wakeup
        // the command pays per write. That is nothing for large writes but most of the cost of
        // small ones, so while rounds are small the reader naps instead and the large pipe
        // holds what arrives meanwhile. A nap that let the pipe fill a lot means the command
        // writes fast enough to block on it: back to waking per write. An idle command gets a
        // blocking wait too, so an idle reader costs nothing.
        if napping {
            if got >= FAST_ROUND {
                napping = false;
            } else if got > 0 {
                idle_naps = 0;
            } else {
                idle_naps += 1;
            }
        } else if got > 0 && got < SMALL_ROUND {
            napping = true;
            idle_naps = 0;
        }
        if napping && idle_naps < IDLE_NAPS {
            thread::sleep(NAP);
            continue;
        }
        napping = false;
        let wait = if exited_at.is_some() {
            QUIET
        } else {
            IDLE_CHECK
        };
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) if exited_at.is_some() => return,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}
