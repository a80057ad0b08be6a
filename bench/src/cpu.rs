//! CPU accounting: another process's CPU time from `/proc`, this process's and its children's
//! from getrusage, and the machine's load while a benchmark ran.

use std::process::Command;

use anyhow::Context;
use nix::sys::resource::{UsageWho, getrusage};

/// CPU seconds (user + system, all threads) the process has used so far.
pub fn server_cpu(pid: u32, tck: f64) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it. The
    // first field after it is field 3, so utime (14) and stime (15) are the 12th and 13th.
    let (_, rest) = stat
        .rsplit_once(')')
        .with_context(|| format!("unexpected {path}: {stat:?}"))?;
    let mut fields = rest.split_whitespace().skip(11);
    let mut tick = || -> anyhow::Result<f64> {
        let f = fields
            .next()
            .with_context(|| format!("{path} is too short"))?;
        Ok(f.parse::<u64>()
            .with_context(|| format!("bad CPU time {f:?} in {path}"))? as f64)
    };
    let (utime, stime) = (tick()?, tick()?);
    Ok((utime + stime) / tck)
}

/// `getconf CLK_TCK`, or 100 (the usual value) when it cannot be had.
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// Seconds of a getrusage time.
pub fn secs(t: nix::sys::time::TimeVal) -> f64 {
    t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6
}

/// CPU seconds (user + system) this process has used.
pub fn self_cpu() -> anyhow::Result<f64> {
    let u = getrusage(UsageWho::RUSAGE_SELF)?;
    Ok(secs(u.user_time()) + secs(u.system_time()))
}

/// CPU seconds of all waited-for descendants so far.
pub fn children_cpu() -> anyhow::Result<f64> {
    let u = getrusage(UsageWho::RUSAGE_CHILDREN)?;
    Ok(secs(u.user_time()) + secs(u.system_time()))
}

/// The first three fields of /proc/loadavg.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}
