//! Starting a worker thread: its loop on the process's engine, pinned to a
//! CPU when asked. Here, above both the engines and the worker context, so
//! that the context never imports the loops it is handed to.

use std::sync::Arc;

use crate::worker::{pinning_cpus, queue, IoEngine, Shared, WorkerHandle};

/// Starts worker `id`'s loop thread on the process's engine; it runs until
/// the process exits.
pub fn spawn_worker(id: usize, shared: Arc<Shared>, pin_to_cpu: bool) -> std::io::Result<WorkerHandle> {
    let (handle, inbox) = queue()?;
    std::thread::Builder::new()
        .name(format!("ringlb-w{id}"))
        .spawn(move || {
            if pin_to_cpu {
                pin_current_thread(id);
            }
            crate::stats::set_worker_slot(id);
            let result = match shared.engine {
                IoEngine::Uring => super::ring::run(id, shared.clone(), inbox),
                IoEngine::Epoll => super::readiness::run(id, shared.clone(), inbox),
            };
            if let Err(e) = result {
                log::error!("worker {id}: cannot start its {} loop: {e}", shared.engine);
            }
        })?;
    Ok(handle)
}

fn pin_current_thread(id: usize) {
    let cpus = pinning_cpus();
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(id % cpus, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            log::warn!(
                "worker {id}: could not pin to cpu {}: {}",
                id % cpus,
                std::io::Error::last_os_error()
            );
        }
    }
}
