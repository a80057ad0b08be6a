//! The stop request: SIGTERM (Kubernetes, systemd) or SIGINT (a terminal's Ctrl-C).

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal as unix_signal};

/// Resolves once SIGTERM or SIGINT arrived after this call.
///
/// The handlers are installed by the call itself, not at the first poll, so a signal sent right
/// after it is caught rather than ending the process. Call it inside a tokio runtime.
///
/// When a signal cannot be watched (no signal driver, which only a misbuilt runtime lacks), it
/// says so and waits for the other alone rather than stopping at once.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    let watch = |kind: SignalKind, name: &'static str| {
        let signal = unix_signal(kind);
        async move {
            match signal {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, signal = name, "Cannot watch the signal.");
                    std::future::pending::<()>().await;
                }
            }
        }
    };
    let term = watch(SignalKind::terminate(), "SIGTERM");
    let int = watch(SignalKind::interrupt(), "SIGINT");
    async move {
        tokio::select! {
            () = term => {}
            () = int => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    #[tokio::test]
    async fn sigterm_resolves_it() {
        // Installed by the call: tokio's handler takes the SIGTERM below instead of the default
        // action (which would end the test process).
        let stop = tokio::spawn(super::signal());
        assert!(!stop.is_finished());
        let pid = std::process::id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(5), stop)
            .await
            .expect("SIGTERM ends the wait")
            .unwrap();
    }
}
