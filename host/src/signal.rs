//! Shutdown signals. SIGTERM is how Kubernetes (and a container runtime, to
//! PID 1) asks us to stop; SIGINT is Ctrl-C locally. Both start a graceful
//! shutdown; a second one of either exits at once.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Installed handlers for SIGTERM and SIGINT.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers. Signals that arrive from now on are kept until
    /// [`Signals::next`] looks. As PID 1 a process gets no default handling
    /// of SIGTERM, so without this a container would ignore it.
    pub fn install() -> std::io::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next signal; returns its name.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    /// From now on, the next signal ends the process at once.
    pub fn exit_on_next(mut self) {
        tokio::spawn(async move {
            let name = self.next().await;
            tracing::warn!(signal = name, "second signal: exiting without waiting");
            std::process::exit(130);
        });
    }
}
