//! The control plane: its own thread and runtime, never a data worker's.

use std::sync::Arc;

use crate::server::{graceful_shutdown, Server};

/// Runs the control plane on the calling thread until ringlb shuts down.
pub fn run_control_plane(server: Arc<Server>) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the control plane runtime: {e}"))?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM received"),
            _ = int.recv() => log::info!("SIGINT received"),
        }
        let timeout = server.model.lock().config.runtime.shutdown_timeout;
        // A second signal exits at once.
        let forced = tokio::select! {
            closed = graceful_shutdown(&server, timeout) => closed,
            _ = term.recv() => { log::warn!("second signal: exiting now"); 0 }
            _ = int.recv() => { log::warn!("second signal: exiting now"); 0 }
        };
        log::info!("ringlb stopped ({forced} connection(s) closed at the shutdown timeout)");
        Ok(())
    })
}
