//! Which pod and container a cgroup belongs to, from the cgroup's path alone.
//!
//! The kubelet names pod cgroups and the container runtime names container cgroups below them. The
//! shapes differ by cgroup driver and runtime:
//!
//! | driver   | pod cgroup                                                   | container cgroup              |
//! |----------|--------------------------------------------------------------|-------------------------------|
//! | cgroupfs | `kubepods/pod<uid>`, `kubepods/{burstable,besteffort}/pod<uid>` | `<id>` (containerd, docker), `crio-<id>` |
//! | systemd  | `kubepods-pod<uid_>.slice`, `kubepods-{burstable,besteffort}-pod<uid_>.slice` | `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` |
//!
//! `<uid_>` is the pod UID with `-` escaped as `_` (a `-` in a slice name means "child of").
//! With the systemd driver the slice name carries its whole ancestry, so a kubelet with
//! `--cgroup-root=/kubelet.slice` makes `kubelet-kubepods-burstable-pod<uid_>.slice`.
//! A runtime whose systemd cgroup manager is not really systemd (containerd or CRI-O nested in a
//! container, or a cgroup v1 controller systemd does not manage) creates the OCI `slice:prefix:id`
//! name as one literal directory: `.../containerd.service/kubepods-besteffort-pod<uid_>.slice:cri-containerd:<id>`
//! (kubernetes/kubernetes#106514).
//!
//! Anything before the pod cgroup is ignored: the cgroupfs mount point
//! (`/sys/fs/cgroup/unified/`, `/sys/fs/cgroup/memory/`), a `--cgroup-root`, the
//! `0::` of a `/proc/<pid>/cgroup` line. Anything below the container cgroup belongs to that
//! container too: crun puts the process in a `container` child of the systemd scope on cgroup v2,
//! and a container may make cgroups of its own. When a path holds more than one pod cgroup
//! (Kubernetes nested in a pod), the outermost wins, for the same reason.
//!
//! The pod cgroup itself, CRI-O's `crio-conmon-<id>` monitor and anything else that is not a
//! container's cgroup give `None`. Pod UIDs are accepted in the two forms the kubelet uses: an
//! API server UUID (`8-4-4-4-12` lowercase hex) and a static pod's 32-hex config hash. Container
//! ids are 64 lowercase hex, as containerd, CRI-O and docker make them.

/// A pod's quality-of-service class, which decides where the kubelet puts its cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// The pod and container a container cgroup belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerCgroup {
    /// The pod's UID as the kubelet knows it, with dashes (`metadata.uid` for API pods).
    pub pod_uid: String,
    /// The runtime's container id, without a `containerd://` style scheme.
    pub container_id: String,
    pub qos: Qos,
}

/// The pod and container of a container cgroup path, or `None` when `path` is not the cgroup of a
/// container in a Kubernetes pod (or is below one). See the module documentation for the shapes.
pub fn parse_container_cgroup(path: &str) -> Option<ContainerCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, segment) in segments.iter().enumerate() {
        // The literal `slice:prefix:id` directory is pod and container in one segment.
        if let Some(found) = parse_systemd_literal(segment) {
            return Some(found);
        }
        let parents = &segments[..i];
        let Some((pod_uid, qos)) =
            parse_cgroupfs_pod(segment, parents).or_else(|| parse_pod_slice(segment))
        else {
            continue;
        };
        // The outermost pod cgroup decides: what it holds is either a container or not ours.
        let container_id = segments.get(i + 1).and_then(|s| parse_container(s))?;
        return Some(ContainerCgroup {
            pod_uid,
            container_id: container_id.to_owned(),
            qos,
        });
    }
    None
}

/// `pod<uid>` directly under `kubepods` (guaranteed) or under `kubepods/burstable|besteffort`.
fn parse_cgroupfs_pod(segment: &str, parents: &[&str]) -> Option<(String, Qos)> {
    let uid = segment.strip_prefix("pod")?;
    let qos = match parents {
        [.., "kubepods"] => Qos::Guaranteed,
        [.., "kubepods", "burstable"] => Qos::Burstable,
        [.., "kubepods", "besteffort"] => Qos::BestEffort,
        _ => return None,
    };
    is_pod_uid(uid).then(|| (uid.to_owned(), qos))
}

/// `[<ancestry>-]kubepods[-burstable|-besteffort]-pod<uid_>.slice`.
fn parse_pod_slice(segment: &str) -> Option<(String, Qos)> {
    let name = segment.strip_suffix(".slice")?;
    let (parent, escaped_uid) = name.rsplit_once("-pod")?;
    let qos = if slice_is(parent, "kubepods") {
        Qos::Guaranteed
    } else if slice_is(parent, "kubepods-burstable") {
        Qos::Burstable
    } else if slice_is(parent, "kubepods-besteffort") {
        Qos::BestEffort
    } else {
        return None;
    };
    // A systemd unit name cannot hold the UID's own dashes: they are escaped as `_`.
    if escaped_uid.contains('-') {
        return None;
    }
    let uid = escaped_uid.replace('_', "-");
    is_pod_uid(&uid).then_some((uid, qos))
}

/// Whether slice name `parent` is `name` or a descendant's spelling of it (`kubelet-kubepods`).
fn slice_is(parent: &str, name: &str) -> bool {
    parent
        .strip_suffix(name)
        .is_some_and(|ancestry| ancestry.is_empty() || ancestry.ends_with('-'))
}

/// `<pod slice>:<runtime prefix>:<id>`, the OCI systemd cgroups path made a directory as is.
fn parse_systemd_literal(segment: &str) -> Option<ContainerCgroup> {
    let mut parts = segment.split(':');
    let (Some(slice), Some(prefix), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let (pod_uid, qos) = parse_pod_slice(slice)?;
    if !matches!(prefix, "cri-containerd" | "crio" | "docker") || !is_container_id(id) {
        return None;
    }
    Some(ContainerCgroup {
        pod_uid,
        container_id: id.to_owned(),
        qos,
    })
}

/// The container id of a container cgroup directly below a pod cgroup.
fn parse_container(segment: &str) -> Option<&str> {
    let id = match segment.strip_suffix(".scope") {
        Some(unit) => ["cri-containerd-", "crio-", "docker-"]
            .iter()
            .find_map(|prefix| unit.strip_prefix(prefix))?,
        None => segment.strip_prefix("crio-").unwrap_or(segment),
    };
    // `crio-conmon-<id>` fails here: `conmon-<id>` is not an id.
    is_container_id(id).then_some(id)
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(is_lower_hex)
}

/// A UUID as the API server writes it (`8-4-4-4-12` lowercase hex), or a static pod's 32-hex
/// config hash, which the kubelet uses as that pod's UID.
fn is_pod_uid(s: &str) -> bool {
    if s.len() == 32 {
        return s.bytes().all(is_lower_hex);
    }
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| g.bytes().all(is_lower_hex))
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2cde702b-a0cf-438d-a228-fb164e54434b";
    const UID_: &str = "2cde702b_a0cf_438d_a228_fb164e54434b";
    const STATIC_UID: &str = "36b6d6be73b1065af369b3985edafa09";
    const ID: &str = "0765f197c9158576f202e50498b488cd0d2b022fb2462b0a629f214bb51cd57d";

    fn expect(uid: &str, qos: Qos) -> Option<ContainerCgroup> {
        Some(ContainerCgroup {
            pod_uid: uid.to_owned(),
            container_id: ID.to_owned(),
            qos,
        })
    }

    #[test]
    fn cgroupfs_driver() {
        let cases = [
            (
                format!("/kubepods/burstable/pod{UID}/{ID}"),
                expect(UID, Qos::Burstable),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/{ID}"),
                expect(UID, Qos::BestEffort),
            ),
            (
                format!("/kubepods/pod{UID}/{ID}"),
                expect(UID, Qos::Guaranteed),
            ),
            // CRI-O with cgroupfs prefixes the id.
            (
                format!("/kubepods/burstable/pod{UID}/crio-{ID}"),
                expect(UID, Qos::Burstable),
            ),
            // Static pod: the kubelet's UID is the config hash.
            (
                format!("/kubepods/burstable/pod{STATIC_UID}/{ID}"),
                expect(STATIC_UID, Qos::Burstable),
            ),
            // Mount points, cgroup v1 controllers, --cgroup-root, trailing slash.
            (
                format!("/sys/fs/cgroup/unified/kubepods/burstable/pod{UID}/{ID}"),
                expect(UID, Qos::Burstable),
            ),
            (
                format!("/sys/fs/cgroup/memory/kubepods/pod{UID}/{ID}/"),
                expect(UID, Qos::Guaranteed),
            ),
            (
                format!("/kubelet/kubepods/besteffort/pod{UID}/{ID}"),
                expect(UID, Qos::BestEffort),
            ),
            // The real kubelet 1.20 of the test bed (testbed::node): cgroupfs driver, its own
            // cgroupRoot, runc's v2 directory on a hybrid host.
            (
                format!(
                    "/sys/fs/cgroup/unified/relay-node-Ab12cD/kubepods/besteffort/pod{UID}/{ID}"
                ),
                expect(UID, Qos::BestEffort),
            ),
            (
                format!("kubepods/besteffort/pod{UID}/{ID}"),
                expect(UID, Qos::BestEffort),
            ),
            // A /proc/<pid>/cgroup line.
            (
                format!("0::/kubepods/besteffort/pod{UID}/{ID}"),
                expect(UID, Qos::BestEffort),
            ),
            // Cgroups a container makes below its own are still that container's.
            (
                format!("/kubepods/pod{UID}/{ID}/nested/deeper"),
                expect(UID, Qos::Guaranteed),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(parse_container_cgroup(&path), want, "{path}");
        }
    }

    #[test]
    fn systemd_driver() {
        let cases = [
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                expect(UID, Qos::Burstable),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"
                ),
                expect(UID, Qos::BestEffort),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{ID}.scope"),
                expect(UID, Qos::Guaranteed),
            ),
            (
                format!("kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                expect(UID, Qos::Guaranteed),
            ),
            // crun's `container` child of the scope (cgroup v2).
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope/container"),
                expect(UID, Qos::Guaranteed),
            ),
            // --cgroup-root=/kubelet.slice (kind).
            (
                format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                expect(UID, Qos::Burstable),
            ),
            (
                format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                expect(UID, Qos::Guaranteed),
            ),
            // Under a node container's own scope, seen from the host.
            (
                format!(
                    "/sys/fs/cgroup/system.slice/docker-{ID}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                expect(UID, Qos::BestEffort),
            ),
            (
                format!(
                    "/sys/fs/cgroup/systemd/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/docker-{ID}.scope"
                ),
                expect(STATIC_UID, Qos::Burstable),
            ),
            // The OCI `slice:prefix:id` made one directory, nested under the runtime's service.
            (
                format!(
                    "/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{ID}"
                ),
                expect(UID, Qos::BestEffort),
            ),
            (
                format!(
                    "/sys/fs/cgroup/systemd/system.slice/containerd.service/kubepods-burstable-pod{STATIC_UID}.slice:cri-containerd:{ID}"
                ),
                expect(STATIC_UID, Qos::Burstable),
            ),
            (
                format!("/system.slice/crio.service/kubepods-pod{UID_}.slice:crio:{ID}"),
                expect(UID, Qos::Guaranteed),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(parse_container_cgroup(&path), want, "{path}");
        }
    }

    #[test]
    fn outermost_pod_wins() {
        let other = "ffffffff-ffff-ffff-ffff-ffffffffffff";
        let path = format!("/kubepods/pod{UID}/{ID}/kubelet/kubepods/besteffort/pod{other}/{ID}");
        assert_eq!(parse_container_cgroup(&path), expect(UID, Qos::Guaranteed));
    }

    #[test]
    fn not_a_container_cgroup() {
        let short_id = &ID[..63];
        let upper_id = ID.to_uppercase();
        let cases = [
            String::new(),
            "/".to_owned(),
            "/kubepods".to_owned(),
            "/kubepods/burstable".to_owned(),
            "/kubepods.slice/kubepods-burstable.slice".to_owned(),
            "/system.slice/containerd.service".to_owned(),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/user.slice/user-1000.slice/{ID}"),
            // The pod cgroup itself.
            format!("/kubepods/burstable/pod{UID}"),
            format!("/kubepods/burstable/pod{UID}/"),
            format!("/kubepods/pod{UID}"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"),
            format!("/kubepods.slice/kubepods-pod{UID_}.slice"),
            // CRI-O's container monitor.
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"
            ),
            format!("/kubepods/burstable/pod{UID}/crio-conmon-{ID}"),
            // Not below a pod cgroup the kubelet made.
            format!("/pod{UID}/{ID}"),
            format!("/burstable/pod{UID}/{ID}"),
            format!("/kubepods/guaranteed/pod{UID}/{ID}"),
            format!("/kubepods/burstable/extra/pod{UID}/{ID}"),
            format!("/other.slice/other-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            format!("/kubepods.slice/mykubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            format!(
                "/kubepods.slice/kubepods-guaranteed-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            // Malformed pod UIDs.
            format!("/kubepods/pod/{ID}"),
            format!("/kubepods/pod{UID_}/{ID}"),
            format!("/kubepods/pod{}/{ID}", UID.to_uppercase()),
            format!("/kubepods/pod{}/{ID}", &UID[..35]),
            format!("/kubepods/pod{}x/{ID}", &UID[..35]),
            format!("/kubepods/pod{UID}0/{ID}"),
            format!("/kubepods/pod2cde702ba0cf-438d-a228-fb164e54434b/{ID}"),
            format!("/kubepods.slice/kubepods-pod{UID}.slice/cri-containerd-{ID}.scope"),
            format!("/kubepods.slice/kubepods-pod.slice/cri-containerd-{ID}.scope"),
            // Malformed container ids and scopes.
            format!("/kubepods/pod{UID}/{short_id}"),
            format!("/kubepods/pod{UID}/{ID}0"),
            format!("/kubepods/pod{UID}/{upper_id}"),
            format!("/kubepods/pod{UID}/{}", ID.replacen('0', "g", 1)),
            format!("/kubepods/pod{UID}/docker-{ID}"),
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}"),
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/containerd-{ID}.scope"),
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/{ID}.scope"),
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{short_id}.scope"),
            // The literal form with a wrong shape.
            format!("/system.slice/containerd.service/kubepods-pod{UID_}.slice:cri-containerd"),
            format!("/system.slice/containerd.service/kubepods-pod{UID_}.slice:containerd:{ID}"),
            format!(
                "/system.slice/containerd.service/kubepods-pod{UID_}.slice:cri-containerd:{ID}:x"
            ),
            format!("/system.slice/containerd.service/other.slice:cri-containerd:{ID}"),
        ];
        for path in cases {
            assert_eq!(parse_container_cgroup(&path), None, "{path}");
        }
    }
}
