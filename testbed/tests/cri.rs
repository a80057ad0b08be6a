//! Pods on a real containerd through CRI, as a kubelet would run them: exact stdout and stderr
//! back from the CRI log, pod cgroups in the v2 tree, bind mounts, users, exit codes and clean-up.
//! Each test starts its own containerd; a machine without the test bed skips them (fails them
//! under `RELAY_REQUIRE_TESTBED=1`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use testbed::{
    cri::{ContainerSpec, ContainerState, Cri, PodSpec},
    layout,
};

const WAIT: Duration = Duration::from_secs(30);

/// `nobody` in the busybox root filesystem.
const NOBODY: u32 = 65534;

/// A program for busybox `sh` that writes `stdout` to fd 1 and `stderr` to fd 2 exactly,
/// interleaved: the bytes come from files bind-mounted into the container.
fn writer(dir: &Path, stdout: &[&[u8]], stderr: &[&[u8]]) -> (ContainerSpec, Vec<u8>, Vec<u8>) {
    let mut script = String::from("set -e\n");
    for i in 0..stdout.len().max(stderr.len()) {
        if let Some(chunk) = stdout.get(i) {
            fs::write(dir.join(format!("out{i}")), chunk).unwrap();
            script.push_str(&format!("cat /data/out{i}\n"));
        }
        if let Some(chunk) = stderr.get(i) {
            fs::write(dir.join(format!("err{i}")), chunk).unwrap();
            script.push_str(&format!("cat /data/err{i} >&2\n"));
        }
    }
    let spec = ContainerSpec::new("writer", ["sh", "-c", &script]).bind(dir, "/data", true);
    (spec, stdout.concat(), stderr.concat())
}

#[test]
fn logs_come_back_byte_for_byte() {
    let started = Instant::now();
    let Some(cri) = Cri::start_or_skip() else {
        return;
    };
    let ready = started.elapsed();
    let data = tempfile::tempdir().unwrap();
    let long: Vec<u8> = (0..200 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let mut long_line = long.clone();
    long_line.push(b'\n');
    let binary: Vec<u8> = (0..=255u8).filter(|&b| b != b'\n').collect();
    let (spec, stdout, stderr) = writer(
        data.path(),
        &[
            b"first line\n",
            b"\n\nafter two empty lines\n",
            &long_line,
            b"a carriage return\ronly within a line\n",
            &binary,
            b"\nno newline at the end",
        ],
        &[
            b"to stderr\n",
            b"partial ",
            b"then the rest\n",
            &long,
            b"\n  leading spaces and a tab\t\n",
        ],
    );

    let started = Instant::now();
    let pod = cri.run_pod(&PodSpec::new("logs")).unwrap();
    let pod_started = started.elapsed();
    let container = pod.create_container(&spec).unwrap();
    let created = started.elapsed();
    container.start().unwrap();
    let container_started = started.elapsed();
    eprintln!(
        "containerd ready with images {ready:?}, RunPodSandbox {pod_started:?}, \
         CreateContainer {:?}, StartContainer {:?}",
        created - pod_started,
        container_started - created
    );
    let out = container.output(WAIT).unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr_text());
    assert_same("stdout", &out.stdout, &stdout);
    assert_same("stderr", &out.stderr, &stderr);
    // The log is where a kubelet would have it, split as the runtime splits long lines.
    let log = String::from_utf8_lossy(&fs::read(container.log_path()).unwrap()).into_owned();
    assert_eq!(
        container.log_path(),
        pod.log_directory().join("writer/0.log")
    );
    assert!(
        log.lines().any(|l| l.contains(" stdout P ")),
        "{}",
        log.chars().take(300).collect::<String>()
    );
    pod.stop_and_remove().unwrap();
}

#[test]
fn containers_get_their_cgroup_under_the_pod() {
    let Some(cri) = Cri::start_or_skip() else {
        return;
    };
    let spec = PodSpec::new("cgroups");
    let pod = cri.run_pod(&spec).unwrap();
    let container = pod
        .create_container(&ContainerSpec::new("sleeper", ["sleep", "600"]))
        .unwrap();
    container.start().unwrap();
    assert_eq!(container.state().unwrap(), ContainerState::Running);

    let cgroup = container.cgroup_v2_path().unwrap();
    assert!(cgroup.is_dir(), "{}", cgroup.display());
    let pod_cgroup = Path::new("/sys/fs/cgroup/unified")
        .join("kubepods/burstable")
        .join(format!("pod{}", spec.uid));
    assert_eq!(cgroup, pod_cgroup.join(container.id()));
    // The container's process is in it, as the kernel sees it.
    let pid = container.pid().unwrap();
    let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let expected = format!("0::/kubepods/burstable/pod{}/{}", spec.uid, container.id());
    assert!(own.lines().any(|l| l == expected), "{own}");
    let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        container.cgroup_id().unwrap(),
        fs::metadata(&cgroup).unwrap().ino()
    );

    pod.stop_and_remove().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(!cgroup.exists());
    assert!(!pod_cgroup.exists(), "{}", pod_cgroup.display());
    assert!(
        !Path::new("/sys/fs/cgroup/memory")
            .join(&spec.cgroup_parent[1..])
            .exists()
    );
}

#[test]
fn exit_codes_users_and_mounts() {
    let Some(cri) = Cri::start_or_skip() else {
        return;
    };
    let pod = cri.run_pod(&PodSpec::new("misc")).unwrap();
    let run = |spec: ContainerSpec| {
        let c = pod.create_container(&spec).unwrap();
        c.start().unwrap();
        c.output(WAIT).unwrap()
    };

    let out = run(ContainerSpec::new("exit42", ["sh", "-c"])
        .args(["echo \"$GREETING\"; exit 42"])
        .env("GREETING", "hello"));
    assert_eq!(
        (out.code, out.stdout_text().as_str()),
        (42, "hello\n"),
        "{out}"
    );

    let out = run(
        ContainerSpec::new("nobody", ["sh", "-c", "id -u; id -g; touch /probe"])
            .user(NOBODY, NOBODY)
            .read_only_rootfs(),
    );
    assert_eq!(out.stdout_text(), "65534\n65534\n", "{out}");
    assert_ne!(out.code, 0, "{out}");
    assert!(out.stderr_text().contains("Read-only file system"), "{out}");

    let out = run(
        ContainerSpec::new("host-binary", ["/relay/busybox", "echo", "from the host"]).bind(
            layout::busybox(),
            "/relay/busybox",
            true,
        ),
    );
    assert_eq!(
        (out.code, out.stdout_text().as_str()),
        (0, "from the host\n"),
        "{out}"
    );

    let c = pod
        .create_container(&ContainerSpec::new("stopped", ["sleep", "600"]))
        .unwrap();
    c.start().unwrap();
    // containerd writes the log while the container runs; `wait` returns once it closed it.
    assert_eq!(processes_holding(c.log_path()).len(), 1);
    c.stop(Duration::ZERO).unwrap();
    assert_eq!(c.wait(WAIT).unwrap(), 137);
    assert_eq!(processes_holding(c.log_path()), Vec::<u32>::new());
    c.remove().unwrap();

    // containerd's CRI logger reads lines as Go's bufio.ReadLine does, which drops the \r of a
    // \r\n: the CRI log of containerd 1.6 does not keep CRLF line endings.
    let out = run(ContainerSpec::new(
        "crlf",
        ["printf", "a\\r\\nb\\r\\n\\rc\\r"],
    ));
    assert_eq!(out.stdout, b"a\nb\n\rc\r", "{out}");
}

#[test]
fn everything_is_removed_on_drop_even_after_a_panic() {
    let Some(cri) = Cri::start_or_skip() else {
        return;
    };
    let address = cri.address().to_owned();
    let spec = PodSpec::new("panics");
    let pod_cgroup = Path::new("/sys/fs/cgroup/unified").join(&spec.cgroup_parent[1..]);
    let mut pid = None;
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let pod = cri.run_pod(&spec).unwrap();
        let c = pod
            .create_container(&ContainerSpec::new("sleeper", ["sleep", "600"]))
            .unwrap();
        c.start().unwrap();
        pid = Some(c.pid().unwrap());
        panic!("a test failing while its pod runs (expected)");
    }));
    assert!(unwound.is_err());
    let pid = pid.unwrap();
    // The pod went with the unwinding.
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(!pod_cgroup.exists());
    assert_eq!(cri.pod_ids().unwrap(), Vec::<String>::new());

    // A pod still running when the Cri goes: containerd removes it; then nothing is left.
    let spec = PodSpec::new("left");
    let pod = cri.run_pod(&spec).unwrap();
    let c = pod
        .create_container(&ContainerSpec::new("sleeper", ["sleep", "600"]))
        .unwrap();
    c.start().unwrap();
    let pid = c.pid().unwrap();
    let dir = cri.directory().to_owned();
    assert!(pod.log_directory().starts_with(&dir));
    std::mem::forget(pod);
    drop(cri);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(
        !Path::new("/sys/fs/cgroup/unified")
            .join(&spec.cgroup_parent[1..])
            .exists()
    );
    assert!(!dir.exists(), "{}", dir.display());
    assert_eq!(processes_mentioning(&address), Vec::<String>::new());
}

/// Asserts `got == expected`, showing where they differ rather than 200 KiB of bytes.
fn assert_same(what: &str, got: &[u8], expected: &[u8]) {
    if got == expected {
        return;
    }
    let at = got
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(expected.len()));
    let around = |b: &[u8]| {
        String::from_utf8_lossy(&b[at.saturating_sub(20)..(at + 20).min(b.len())]).into_owned()
    };
    panic!(
        "{what} differs at byte {at} (got {} bytes, expected {}): got {:?}, expected {:?}",
        got.len(),
        expected.len(),
        around(got),
        around(expected)
    );
}

/// The processes that have `path` open.
fn processes_holding(path: &Path) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let mut fds = fs::read_dir(e.path().join("fd")).ok()?;
            fds.any(|fd| fd.is_ok_and(|fd| fs::read_link(fd.path()).is_ok_and(|t| t == path)))
                .then_some(pid)
        })
        .collect()
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
