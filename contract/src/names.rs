//! The rules for names writers choose, shared by the service and its writers (the collector builds
//! stream names and log contexts from cgroups and pod labels).

/// Longest stream name.
pub const MAX_STREAM_NAME: usize = 64;
/// Longest segment of a log context.
pub const MAX_CONTEXT_SEGMENT: usize = 253;

fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// Whether `name` may name a stream: 1-64 characters of `[A-Za-z0-9._-]`.
pub fn valid_stream_name(name: &str) -> bool {
    (1..=MAX_STREAM_NAME).contains(&name.len()) && name.bytes().all(name_byte)
}

/// Whether `s` may be a segment of a log context: 1-253 characters of `[A-Za-z0-9._-]`, not `.`
/// or `..`.
pub fn valid_context_segment(s: &str) -> bool {
    (1..=MAX_CONTEXT_SEGMENT).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes().all(name_byte)
}

/// Whether `s` may name a pod: a DNS subdomain as Kubernetes requires of object names, 1-253
/// characters of `[a-z0-9.-]` beginning and ending with a letter or digit. Pod UIDs (lowercase
/// hex and `-`) pass too, which `pod=` also accepts.
pub fn valid_pod_name(s: &str) -> bool {
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    (1..=253).contains(&s.len())
        && edge(s.as_bytes().first())
        && edge(s.as_bytes().last())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

/// Whether `b` may appear in a stream name.
pub fn stream_name_byte(b: u8) -> bool {
    name_byte(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names() {
        for ok in [
            "hello-00001-deployment-7d9f8b6c5d-x2k4p",
            "a",
            "0765f197-c915-8576-f202-e50498b488cd",
            "a.b",
        ] {
            assert!(valid_pod_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a/b", &"a".repeat(254)] {
            assert!(!valid_pod_name(bad), "{bad}");
        }
    }

    #[test]
    fn names_and_segments() {
        assert!(valid_stream_name("stdout.1"));
        assert!(valid_stream_name("a_b-c.d"));
        assert!(!valid_stream_name(""));
        assert!(!valid_stream_name("a/b"));
        assert!(!valid_stream_name(&"x".repeat(65)));
        assert!(valid_context_segment("my-wf.1"));
        assert!(!valid_context_segment(".."));
        assert!(!valid_context_segment("a b"));
        assert!(!valid_context_segment(&"x".repeat(254)));
    }
}
