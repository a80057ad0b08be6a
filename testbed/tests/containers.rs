//! Busybox containers on a real containerd with real runc: output, exit codes, users, read-only
//! roots, bind mounts, cgroups, deadlines and clean-up. Each test starts its own containerd; a
//! machine without the test bed skips them (fails them under `RELAY_REQUIRE_TESTBED=1`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use testbed::{Containerd, Run, layout};

/// `nobody` in the busybox root filesystem.
const NOBODY: u32 = 65534;

fn run(containerd: &Containerd, run: Run) -> testbed::Output {
    containerd
        .run(&run)
        .unwrap_or_else(|e| panic!("{run:?}: {e:#}"))
}

#[test]
fn output_and_exit_codes_come_back() {
    let Some(c) = Containerd::start_or_skip() else {
        return;
    };
    let out = run(&c, Run::new("echo", ["echo", "hello from busybox"]));
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(out.stdout_text(), "hello from busybox\n");
    assert_eq!(out.stderr_text(), "");

    let script = "echo out; echo \"$GREETING\" >&2; exit 42";
    let out = run(
        &c,
        Run::new("exit42", ["sh", "-c", script]).env("GREETING", "to stderr"),
    );
    assert_eq!(
        (
            out.code,
            out.stdout_text().as_str(),
            out.stderr_text().as_str()
        ),
        (42, "out\n", "to stderr\n"),
        "{out}"
    );

    // Killed by a signal: 128 + SIGKILL, as a shell would report it. The shell is the
    // namespace's init, which ignores signals from inside; the kernel's SIGKILL at the CPU time
    // hard limit (1 s) is one it cannot ignore.
    let script = "ulimit -t 1; while :; do :; done";
    let out = run(&c, Run::new("killed", ["sh", "-c", script]));
    assert_eq!(out.code, 137, "{out}");
}

#[test]
fn nobody_cannot_write_a_read_only_root() {
    let Some(c) = Containerd::start_or_skip() else {
        return;
    };
    let locked = |id: &str, args: &[&str]| {
        Run::new(id, args.iter().copied())
            .user(NOBODY, NOBODY)
            .read_only()
            .tmpfs("/tmp")
    };

    let out = run(&c, locked("ids", &["sh", "-c", "id -u; id -g"]));
    assert_eq!(out.stdout_text(), "65534\n65534\n", "{out}");

    let out = run(&c, locked("touch-root", &["touch", "/probe"]));
    assert_ne!(out.code, 0, "{out}");
    assert!(out.stderr_text().contains("Read-only file system"), "{out}");

    let out = run(
        &c,
        locked(
            "touch-tmp",
            &["sh", "-c", "echo data > /tmp/f && cat /tmp/f"],
        ),
    );
    assert_eq!(
        (out.code, out.stdout_text().as_str()),
        (0, "data\n"),
        "{out}"
    );

    // Controls: the same write succeeds as root on a writable root, and fails for nobody on a
    // writable root for lack of permission, not because the file system is read-only.
    let out = run(&c, Run::new("touch-as-root", ["touch", "/probe"]));
    assert_eq!(out.code, 0, "{out}");
    let out = run(
        &c,
        Run::new("touch-as-nobody", ["touch", "/probe"]).user(NOBODY, NOBODY),
    );
    assert_ne!(out.code, 0, "{out}");
    assert!(out.stderr_text().contains("Permission denied"), "{out}");
}

#[test]
fn a_bind_mounted_host_binary_runs_inside() {
    let Some(c) = Containerd::start_or_skip() else {
        return;
    };
    // The static busybox of the host stands for any static program the product mounts in.
    let mounted = |id: &str, args: &[&str]| {
        Run::new(id, args.iter().copied())
            .user(NOBODY, NOBODY)
            .read_only()
            .bind(layout::busybox(), "/relay/lib/busybox", true)
    };

    let out = run(
        &c,
        mounted(
            "host-binary",
            &["/relay/lib/busybox", "echo", "from the host"],
        ),
    );
    assert_eq!(
        (out.code, out.stdout_text().as_str()),
        (0, "from the host\n"),
        "{out}"
    );

    let out = run(
        &c,
        mounted("overwrite", &["sh", "-c", "echo x > /relay/lib/busybox"]),
    );
    assert_ne!(out.code, 0, "{out}");
    assert!(out.stderr_text().contains("Read-only file system"), "{out}");

    // runc made the mount point in the run's copy of the root filesystem, not in the cache.
    assert!(!layout::busybox_rootfs().join("relay").exists());
}

#[test]
fn large_output_does_not_block() {
    let Some(c) = Containerd::start_or_skip() else {
        return;
    };
    let script = "yes out | head -c 1000000; yes err | head -c 300000 >&2";
    let out = run(&c, Run::new("chatty", ["sh", "-c", script]));
    assert_eq!(out.code, 0, "exit code {}", out.code);
    assert_eq!(out.stdout.len(), 1_000_000);
    assert_eq!(out.stderr.len(), 300_000);
    assert!(out.stdout.starts_with(b"out\nout\n"));
    assert!(out.stderr.starts_with(b"err\nerr\n"));
}

#[test]
fn the_container_lands_in_its_cgroup() {
    let Some(c) = Containerd::start_or_skip() else {
        return;
    };
    let cgroup = format!("/relay-testbed/cgroup-test-{}", std::process::id());
    let out = run(
        &c,
        Run::new("cgroup", ["cat", "/proc/self/cgroup"]).cgroup(&cgroup),
    );
    let text = out.stdout_text();
    // Hybrid layout: the v2 tree (line `0::`) and every v1 hierarchy (say memory).
    assert!(text.lines().any(|l| l == format!("0::{cgroup}")), "{out}");
    assert!(
        text.lines()
            .any(|l| l.ends_with(&format!(":memory:{cgroup}"))),
        "{out}"
    );
    // runc removes the cgroup with the container.
    assert!(
        !Path::new("/sys/fs/cgroup/unified")
            .join(&cgroup[1..])
            .exists()
    );
}

#[test]
fn a_container_past_its_deadline_is_killed_and_removed() {
    let Some(c) = Containerd::start_or_skip() else {
        return;
    };
    let started = Instant::now();
    let err = c
        .run(&Run::new("sleeper", ["sleep", "600"]).timeout(Duration::from_secs(1)))
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("did not exit within"),
        "{err:#}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let listed = c.ctr().args(["containers", "list", "-q"]).output().unwrap();
    assert!(listed.status.success());
    assert_eq!(String::from_utf8_lossy(&listed.stdout), "");
    // The id is free again.
    let out = run(&c, Run::new("sleeper", ["true"]));
    assert_eq!(out.code, 0, "{out}");
}

#[test]
fn a_container_that_cannot_start_is_an_error() {
    let Some(c) = Containerd::start_or_skip() else {
        return;
    };
    let err = c
        .run(&Run::new("missing", ["/no/such/program"]))
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("/no/such/program"), "{err}");
    assert!(err.contains("no such file or directory"), "{err}");
}

#[test]
fn dropping_containerd_removes_what_is_left() {
    let Some(c) = Containerd::start_or_skip() else {
        return;
    };
    // A detached container the test bed knows nothing about, started with ctr's own flags.
    let rootfs = tempfile::tempdir().unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", layout::busybox_rootfs().display()))
        .arg(rootfs.path())
        .status()
        .unwrap();
    assert!(copied.success());
    let id = format!("leftover-{}", std::process::id());
    let started = c
        .ctr()
        .args(["run", "--detach", "--rootfs", "--runc-binary"])
        .arg(layout::runc())
        .args(["--cgroup", &format!("/relay-testbed/{id}")])
        .arg(rootfs.path())
        .args([&id, "/bin/sleep", "600"])
        .output()
        .unwrap();
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let tasks = c.ctr().args(["tasks", "list"]).output().unwrap();
    let tasks = String::from_utf8_lossy(&tasks.stdout);
    let pid: u32 = tasks
        .lines()
        .find(|l| l.starts_with(&id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no task {id} in\n{tasks}"));
    let address = c.address().to_owned();
    assert!(!processes_mentioning(&address).is_empty());

    drop(c);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the container's process {pid} survived"
    );
    assert_eq!(processes_mentioning(&address), Vec::<String>::new());
    assert!(!address.exists());
}

/// Command lines of the processes that name `path` (containerd, its shims).
fn processes_mentioning(path: &Path) -> Vec<String> {
    let needle = path.to_str().unwrap();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(needle).then_some(cmdline)
        })
        .collect()
}
