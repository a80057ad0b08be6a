//! Running the command: spawn, signal forwarding, reaping, shipping, exit status.

use std::{
    ffi::OsString,
    io::{self, IsTerminal},
    os::{
        fd::{AsFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::{Command, Stdio},
    sync::Arc,
    thread,
    time::Instant,
};

use client::{Client, ShipReport, Shipper, StreamSpec, Token};
use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        signal::{SigSet, SigmaskHow, Signal, kill, pthread_sigmask},
        signalfd::{SfdFlags, SignalFd},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::{Pid, getpid, pipe, write},
};

use crate::{
    args::Args,
    pump::{self, ExitTime},
};

/// Signals passed on to the command.
const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Niceness added to the shipping threads.
const SHIP_NICE: i32 = 10;

/// `si_code` of a signal the kernel raised itself (a terminal's ^C, a window resize).
const SI_KERNEL: i32 = 0x80;

/// Exit status of a command that could not be found, as a shell reports it.
pub const NOT_FOUND: u8 = 127;
/// Exit status of a command that was found but could not run.
pub const CANNOT_RUN: u8 = 126;

/// Prints one diagnostic line on this process's stderr.
macro_rules! say {
    ($($arg:tt)*) => { eprintln!("entrypoint: {}", format_args!($($arg)*)) };
}
pub(crate) use say;

fn spawn_status(cmd: &OsString, e: &io::Error) -> u8 {
    say!("{}: {e}", cmd.to_string_lossy());
    match e.kind() {
        io::ErrorKind::NotFound => NOT_FOUND,
        _ => CANNOT_RUN,
    }
}

/// Replaces this process with the command (when shipping cannot be set up: the workload comes
/// first).
pub fn exec_plain(command: &[OsString]) -> u8 {
    let Some((prog, rest)) = command.split_first() else {
        return 64;
    };
    let e = Command::new(prog).args(rest).exec();
    spawn_status(prog, &e)
}

/// Runs the command with its output shipped; returns the exit status to leave with.
pub fn run(args: &Args, url: &str) -> u8 {
    let token = args.token_file.clone().map_or(Token::None, Token::File);
    let client = match Client::new(url, token, args.ship.request_timeout) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            say!("{e}; running the command without shipping its output");
            return exec_plain(&args.command);
        }
    };
    let Some((prog, rest)) = args.command.split_first() else {
        return 64;
    };
    // Output is shipped redacted or not at all.
    let secrets = match redact::Secrets::from_process_env() {
        Ok(s) => Arc::new(s),
        Err(e) => {
            say!("{e}; running the command without shipping its output");
            return exec_plain(&args.command);
        }
    };

    // Signals wait in a signalfd: blocked here, before any thread starts, so every thread
    // inherits the mask. The command gets an empty mask back (std resets it before exec).
    let mut mask = SigSet::empty();
    for s in FORWARDED {
        mask.add(s);
    }
    mask.add(Signal::SIGCHLD);
    if let Err(e) = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&mask), None) {
        say!("cannot block signals ({e}); running the command without shipping its output");
        return exec_plain(&args.command);
    }
    let signals = match SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
    {
        Ok(s) => s,
        Err(e) => {
            let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&mask), None);
            say!("cannot watch signals ({e}); running the command without shipping its output");
            return exec_plain(&args.command);
        }
    };
    let pid1 = getpid() == Pid::from_raw(1);
    if !pid1 {
        // Orphans of the command are reparented to us and reaped below.
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }

    // With a terminal on stdin the command stays in our process group, which the terminal
    // treats as foreground; otherwise it gets its own group so signals reach all of it.
    let own_group = !io::stdin().is_terminal();
    let mut cmd = Command::new(prog);
    cmd.args(rest)
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if own_group {
        cmd.process_group(0);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return spawn_status(prog, &e),
    };
    let child_pid = Pid::from_raw(child.id() as i32);
    let outputs = (
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    );

    let exited = Arc::new(ExitTime::default());
    let cfg = args.ship_config();
    let out = Shipper::new(cfg.clone());
    let err = Shipper::new(cfg);
    for (name, fd, shipper) in [("stdout", outputs.0, &out), ("stderr", outputs.1, &err)] {
        let started = fd.map(|fd| {
            let (shipper, secrets) = (shipper.clone(), secrets.clone());
            pump::spawn(
                name,
                fd,
                shipper,
                secrets,
                exited.clone(),
                args.grace_period,
            )
        });
        if !matches!(started, Some(Ok(_))) {
            say!("cannot read the command's {name}");
            shipper.close(Instant::now());
        }
    }
    let (wake_rx, wake_tx) = match pipe() {
        Ok(p) => p,
        Err(e) => {
            say!("cannot create a pipe: {e}");
            return wait_plain(child_pid, own_group, &signals);
        }
    };
    let specs = (
        StreamSpec::named(args.stdout_stream.clone()),
        StreamSpec::named(args.stderr_stream.clone()),
    );
    let shipping = thread::Builder::new().name("ship".into()).spawn({
        let (out, err) = (out.clone(), err.clone());
        move || {
            let reports = ship(client, out, err, specs);
            // Wakes the supervisor; it also notices a closed pipe.
            let _ = write(&wake_tx, &[1]);
            reports
        }
    });
    let shipping = match shipping {
        Ok(h) => h,
        Err(e) => {
            say!("cannot start shipping: {e}");
            return wait_plain(child_pid, own_group, &signals);
        }
    };

    let mut status = None;
    loop {
        let timeout = if status.is_some() {
            PollTimeout::from(100u16)
        } else {
            PollTimeout::NONE
        };
        // Once the shipping thread ended its pipe stays readable: stop watching it then.
        let watched = if shipping.is_finished() { 1 } else { 2 };
        let mut fds = [
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake_rx.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds[..watched], timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                say!("poll failed: {e}");
                break;
            }
        }
        handle_signals(&signals, child_pid, own_group, &mut status);
        if status.is_some() {
            exited.set(Instant::now());
            if shipping.is_finished() {
                break;
            }
        }
    }
    match shipping.join() {
        Ok(Some((o, e))) => summarize(&[o, e]),
        Ok(None) => {}
        Err(_) => say!("shipping failed"),
    }
    status.unwrap_or(CANNOT_RUN)
}

/// Waits for the command without shipping (a resource was missing after it started).
fn wait_plain(child: Pid, own_group: bool, signals: &SignalFd) -> u8 {
    let mut status = None;
    while status.is_none() {
        let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::NONE);
        handle_signals(signals, child, own_group, &mut status);
    }
    status.unwrap_or(CANNOT_RUN)
}

/// Forwards pending signals and reaps exited children; sets `status` when the command exits.
fn handle_signals(signals: &SignalFd, child: Pid, own_group: bool, status: &mut Option<u8>) {
    while let Ok(Some(info)) = signals.read_signal() {
        let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
            continue;
        };
        if sig == Signal::SIGCHLD {
            continue;
        }
        // A terminal signals its whole foreground group, the command included: do not double it.
        if !own_group && info.ssi_code == SI_KERNEL {
            continue;
        }
        let target = if own_group {
            Pid::from_raw(-child.as_raw())
        } else {
            child
        };
        if kill(target, sig) == Err(Errno::ESRCH) && own_group {
            let _ = kill(child, sig);
        }
    }
    // Reap everything that exited: the command, and orphans we adopted as PID 1 or subreaper.
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => {
                *status = Some(u8::try_from(code & 0xff).unwrap_or(u8::MAX));
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                *status = Some(128u8.saturating_add(sig as i32 as u8));
            }
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Ships both streams on a small runtime of its own; `None` if it cannot start.
fn ship(
    client: Arc<Client>,
    out: Shipper,
    err: Shipper,
    (out_spec, err_spec): (StreamSpec, StreamSpec),
) -> Option<(ShipReport, ShipReport)> {
    // Shipping yields the CPU to the command: under contention it falls behind (and drops, with
    // markers) rather than slowing the workload. Threads it starts (gzip) inherit this.
    let _ = rustix::process::nice(SHIP_NICE);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .enable_io()
        .max_blocking_threads(2)
        .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            say!("cannot start shipping: {e}");
            return None;
        }
    };
    let reports = rt.block_on(async {
        tokio::join!(out.run(client.clone(), out_spec), err.run(client, err_spec))
    });
    // Every task is done; idle pooled connections need no orderly goodbye.
    rt.shutdown_background();
    Some(reports)
}

/// The bytes a stream reported as dropped, by reason: `buffer-full 120, gave-up 30`.
fn by_reason(r: &ShipReport) -> String {
    let each: Vec<String> = r
        .dropped_by_reason
        .iter()
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    each.join(", ")
}

/// One line per stream that lost or dropped bytes; the last line sums up what was lost.
fn summarize(reports: &[ShipReport]) {
    let mut lost = Vec::new();
    for r in reports {
        // Bytes given up on that the API stored all the same are not lost.
        let dropped = r.dropped - r.dropped_stored;
        if dropped > 0 {
            say!(
                "{}: {} of {} bytes dropped (reported to the metadata API: {})",
                r.name,
                dropped,
                r.written,
                by_reason(r)
            );
        }
        if r.lost() > 0 || (r.written > 0 && !r.final_declared) {
            lost.push(r);
        }
    }
    if lost.is_empty() {
        return;
    }
    let total: u64 = lost.iter().map(|r| r.lost()).sum();
    let each: Vec<String> = lost
        .iter()
        .map(|r| format!("{} {}", r.name, r.lost()))
        .collect();
    let why = lost
        .iter()
        .find_map(|r| r.last_error.as_deref())
        .unwrap_or("unknown error");
    say!(
        "lost {total} bytes not reported to the metadata API ({}): {why}",
        each.join(", ")
    );
}
