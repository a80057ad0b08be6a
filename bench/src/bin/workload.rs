//! `workload`: the processes the benchmarks measure, which write log text to their stdout and
//! report their own timings. Started by the benchmarks, not by hand.

use std::{
    io::Write as _,
    os::fd::{AsFd as _, BorrowedFd},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail, ensure};
use bench::{
    collector::unix_secs,
    cpu::{secs, self_cpu},
    lines::{FILLER_SPAN, HEADER, filler, filler_source, put_digits, unix_ns},
    text::generate,
};
use clap::{Parser, Subcommand};
use nix::{
    errno::Errno,
    sys::resource::{UsageWho, getrusage},
};

/// Bytes of distinct log text `gen-output` cycles through.
const PATTERN: usize = 8 << 20;

#[derive(Debug, Parser)]
#[command(name = "workload")]
struct Cli {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// The entrypoint benchmark's child: writes log lines in fixed-size writes.
    GenOutput(GenArgs),
    /// The collector benchmark's writer: fixed-size write(2) calls on stdout.
    WriteLoop(WriteLoopArgs),
    /// The peer benchmark's workload: timestamped lines on stdout, one write each.
    PeerWriter(PeerWriterArgs),
    /// Runs a command (stdio inherited) and reports its wall time, CPU time and peak RSS, from
    /// getrusage of this process's only child: what the kubectl-relay benchmark measures with.
    Rusage(RusageArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().workload {
        Workload::GenOutput(a) => gen_output(a),
        Workload::WriteLoop(a) => write_loop(a),
        Workload::PeerWriter(a) => peer_writer(a),
        Workload::Rusage(a) => rusage(a),
    }
}

#[derive(Debug, clap::Args)]
struct RusageArgs {
    /// File that receives "WALL_SECONDS USER_SECONDS SYSTEM_SECONDS MAX_RSS_KIB EXIT_CODE".
    #[arg(long)]
    report: PathBuf,
    /// The command is killed (and this fails) when it runs longer than this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<std::ffi::OsString>,
}

/// Runs `command` to its end (within the timeout) and writes its report. The command is this
/// process's only child, so getrusage(RUSAGE_CHILDREN) after it was waited for is its own usage.
fn rusage(args: RusageArgs) -> anyhow::Result<()> {
    let RusageArgs {
        report,
        timeout_secs,
        command,
    } = args;
    let (program, rest) = command.split_first().context("no command")?;
    let start = Instant::now();
    let mut child = std::process::Command::new(program)
        .args(rest)
        .spawn()
        .with_context(|| format!("cannot start {program:?}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(Duration::from_secs(timeout_secs)) {
        Ok(status) => status.context("waiting for the command")?,
        Err(_) => {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = rx.recv();
            bail!("{program:?} did not end within {timeout_secs} s");
        }
    };
    let wall = start.elapsed().as_secs_f64();
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN)?;
    let (user, sys) = (secs(usage.user_time()), secs(usage.system_time()));
    // ru_maxrss is in KiB on Linux.
    let rss = usage.max_rss();
    let code = status.code().unwrap_or(-1);
    std::fs::write(report, format!("{wall} {user} {sys} {rss} {code}\n"))?;
    Ok(())
}

#[derive(Debug, clap::Args)]
struct GenArgs {
    /// Bytes to write.
    #[arg(long)]
    bytes: u64,
    /// Bytes per write.
    #[arg(long)]
    write_size: usize,
    /// File that receives "WRITE_WALL_SECONDS TOTAL_CPU_SECONDS" when done.
    #[arg(long)]
    report: PathBuf,
    /// Pace in MB/s (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate_mb: u64,
}

/// Writes `bytes` of log lines to stdout in `write_size` writes, timing only the writing.
fn gen_output(args: GenArgs) -> anyhow::Result<()> {
    let GenArgs {
        bytes,
        write_size,
        report,
        rate_mb,
    } = args;
    ensure!(write_size > 0, "--write-size must be positive");
    let pattern = generate(PATTERN)?;
    let mut out = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    let start = Instant::now();
    let (mut written, mut at) = (0u64, 0usize);
    while written < bytes {
        let n = write_size
            .min((bytes - written) as usize)
            .min(pattern.len() - at);
        out.write_all(&pattern[at..at + n])?;
        written += n as u64;
        at = (at + n) % pattern.len();
        if rate_mb > 0 {
            // Ahead of the pace: wait until the clock catches up.
            let due = Duration::from_secs_f64(written as f64 / (rate_mb as f64 * 1e6));
            if let Some(ahead) = due.checked_sub(start.elapsed())
                && ahead > Duration::from_millis(1)
            {
                std::thread::sleep(ahead);
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    // All of this process's CPU (generating the text too): the caller subtracts it from the CPU
    // of all its children to get the reader's.
    let cpu = self_cpu()?;
    std::fs::write(report, format!("{wall} {cpu}\n"))?;
    Ok(())
}

#[derive(Debug, clap::Args)]
struct WriteLoopArgs {
    /// Writes to make.
    #[arg(long)]
    count: u64,
    /// Bytes per write.
    #[arg(long)]
    size: usize,
    /// cgroup v2 directory to move this process into before writing.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Pace in MB/s (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate_mb: u64,
    /// File that receives "WALL_SECONDS CPU_SECONDS START_UNIX_SECONDS" of the write loop.
    #[arg(long)]
    report: PathBuf,
}

/// Writes `count` slices of `size` bytes of log text to stdout, one write(2) each (stdout is a
/// pipe: a blocking pipe write completes whole), timing only the loop.
fn write_loop(args: WriteLoopArgs) -> anyhow::Result<()> {
    let WriteLoopArgs {
        count,
        size,
        cgroup,
        rate_mb,
        report,
    } = args;
    ensure!(size > 0, "--size must be positive");
    if let Some(dir) = &cgroup {
        std::fs::write(
            dir.join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .with_context(|| format!("cannot move into cgroup {}", dir.display()))?;
    }
    // Distinct log text, so what the collector compresses looks like a real program's output.
    let span = (4 * size).max(64 << 10);
    let pattern = generate(span + size)?;
    // fd 1 itself, not a duplicate: the collector captures writes to fds 1 and 2 only.
    let stdout = std::io::stdout();
    let out = stdout.as_fd();
    let started = unix_secs(SystemTime::now());
    let cpu0 = self_cpu()?;
    let start = Instant::now();
    let mut at = 0;
    for i in 1..=count {
        write_all(out, &pattern[at..at + size])?;
        at = (at + size) % span;
        if rate_mb > 0 {
            // Ahead of the pace: wait until the clock catches up.
            let due = Duration::from_secs_f64((i * size as u64) as f64 / (rate_mb as f64 * 1e6));
            if let Some(ahead) = due.checked_sub(start.elapsed())
                && ahead > Duration::from_millis(1)
            {
                std::thread::sleep(ahead);
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = self_cpu()? - cpu0;
    std::fs::write(&report, format!("{wall} {cpu} {started}\n"))
        .with_context(|| format!("cannot write {}", report.display()))?;
    Ok(())
}

#[derive(Debug, clap::Args)]
struct PeerWriterArgs {
    /// Bytes to write (whole lines: rounded down).
    #[arg(long)]
    bytes: u64,
    /// Bytes per line, newline included; one write(2) each.
    #[arg(long, default_value_t = 512)]
    line_bytes: usize,
    /// Pace in MB/s (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate_mb: u64,
    /// File that receives "BYTES LINES WALL_S USER_S SYS_S START_UNIX_NS".
    #[arg(long)]
    report: PathBuf,
}

/// Writes `bytes` of lines to fd 1, one write(2) per line, at the pace.
fn peer_writer(args: PeerWriterArgs) -> anyhow::Result<()> {
    let PeerWriterArgs {
        bytes,
        line_bytes,
        rate_mb,
        report,
    } = args;
    ensure!(
        (HEADER + 2..FILLER_SPAN / 2).contains(&line_bytes),
        "--line-bytes must be between {} and {}",
        HEADER + 2,
        FILLER_SPAN / 2
    );
    let source = filler_source()?;
    let lines = bytes / line_bytes as u64;
    let stdout = std::io::stdout();
    let out = stdout.as_fd();
    let mut line = vec![b' '; line_bytes];
    line[line_bytes - 1] = b'\n';
    let started = unix_ns();
    let start = Instant::now();
    for seq in 0..lines {
        put_digits(&mut line[..10], seq);
        put_digits(&mut line[11..30], unix_ns());
        line[HEADER..line_bytes - 1].copy_from_slice(filler(&source, seq, line_bytes - 1 - HEADER));
        write_all(out, &line)?;
        if rate_mb > 0 {
            let due = Duration::from_secs_f64(
                ((seq + 1) * line_bytes as u64) as f64 / (rate_mb as f64 * 1e6),
            );
            if let Some(ahead) = due.checked_sub(start.elapsed())
                && ahead > Duration::from_millis(1)
            {
                std::thread::sleep(ahead);
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    std::fs::write(
        &report,
        format!(
            "{} {lines} {wall} {} {} {started}\n",
            lines * line_bytes as u64,
            secs(usage.user_time()),
            secs(usage.system_time())
        ),
    )
    .with_context(|| format!("cannot write {}", report.display()))?;
    Ok(())
}

/// write(2) until all of `buf` is written (one call, to a blocking pipe).
fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> anyhow::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(0) => bail!("stdout took no bytes"),
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e).context("write to stdout"),
        }
    }
    Ok(())
}
