//! The periodic work: passive ejections and their ends, slow-start steps,
//! drain deadlines, removals, and retired listeners and pools leaving.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::health::state::may_eject;

use super::effects::Effects;
use super::log::StateChange;
use super::Model;

impl Model {
    /// The periodic work at `now`, then a rebuild of every dirty pool.
    pub fn tick(&mut self, now: Instant) -> Effects {
        let mut fx = self.tick_state(now);
        fx.merge(self.rebuild_dirty(now));
        fx
    }

    /// [`Model::tick`] without the rebuild: changed pools are only marked
    /// dirty, for [`Model::rebuild_dirty`].
    pub fn tick_state(&mut self, now: Instant) -> Effects {
        let mut fx = Effects::default();
        self.log_cap.roll(now, &mut fx);
        for i in 0..self.pools.len() {
            self.tick_pool(i, now, &mut fx);
        }
        let before = self.pools.len();
        self.pools
            .retain(|p| !(p.retired && p.backends.iter().all(|b| b.open_connections() == 0)));
        fx.publish |= self.pools.len() != before;
        for l in &mut self.listeners {
            if let Some(deadline) = l.retire_deadline {
                if now >= deadline && !l.stats.closing.swap(true, Ordering::SeqCst) && l.stats.active.current() > 0 {
                    fx.info(format!(
                        "listener \"{}\": drain timeout passed; closing its remaining connections",
                        l.config.name
                    ));
                    fx.check_close = true;
                }
            }
        }
        self.listeners.retain(|l| {
            l.retire_deadline.is_none() || l.stats.active.current() > 0 && !l.stats.closing.load(Ordering::SeqCst)
        });
        fx
    }

    fn tick_pool(&mut self, i: usize, now: Instant, fx: &mut Effects) {
        let mut changed = false;
        let pool = &mut self.pools[i];
        let name = pool.config.name.clone();
        let outlier = pool.config.outlier.clone();
        let total = pool.backends.len();
        let mut ejected = pool.backends.iter().filter(|b| b.outlier.is_ejected(now)).count();
        for be in &mut pool.backends {
            if be.outlier.tick(now) {
                be.reason = "ejection time over".into();
                pool.pending_log.push(StateChange {
                    kind: "back from ejection",
                    addr: be.config.addr,
                    reason: be.reason.clone(),
                    line: format!(
                        "pool \"{name}\": backend {} returns after its ejection time",
                        be.config.addr
                    ),
                });
                be.healthy_since = Some(now);
                ejected = ejected.saturating_sub(1);
                changed = true;
            }
            // Written by the workers on every failed connect, zeroed by a
            // success: read here, reset once acted on.
            let failures = be.shared.consecutive_failures.load(Ordering::Relaxed);
            if outlier.consecutive_failures > 0
                && failures >= outlier.consecutive_failures
                && !be.outlier.is_ejected(now)
            {
                let allowed = may_eject(ejected, total, outlier.max_ejection_share * 100.0);
                if let Some(until) = be
                    .outlier
                    .eject(now, outlier.ejection_time, outlier.max_ejection_time, allowed)
                {
                    be.reason = format!("{failures} consecutive connect failures");
                    pool.pending_log.push(StateChange {
                        kind: "ejected",
                        addr: be.config.addr,
                        reason: be.reason.clone(),
                        line: format!(
                            "pool \"{name}\": backend {} ejected for {:?}: {}",
                            be.config.addr,
                            until.saturating_duration_since(now),
                            be.reason
                        ),
                    });
                    ejected += 1;
                    changed = true;
                } else if !allowed {
                    fx.warn(format!(
                        "pool \"{name}\": backend {} has {failures} consecutive connect failures but max_ejection_percent ({}%) keeps it in",
                        be.config.addr,
                        outlier.max_ejection_share * 100.0
                    ));
                }
                be.shared.consecutive_failures.store(0, Ordering::Relaxed);
            }
            if let Some(deadline) = be.drain_deadline {
                let open = be.open_connections();
                if now >= deadline && !be.shared.closing.swap(true, Ordering::SeqCst) && open > 0 {
                    fx.info(format!(
                        "pool \"{name}\": backend {}: drain timeout passed; closing {open} connection(s)",
                        be.config.addr
                    ));
                    fx.check_close = true;
                }
            }
        }
        let before = pool.backends.len();
        pool.backends.retain(|b| {
            let gone = b.remove_when_drained && b.open_connections() == 0;
            if gone {
                fx.info(format!("pool \"{name}\": backend {} removed (drained)", b.config.addr));
            }
            !gone
        });
        changed |= pool.backends.len() != before;
        if pool.next_slow_start_step.is_some_and(|t| now >= t) {
            changed = true;
        }
        if changed && !pool.retired {
            pool.dirty = true;
        }
    }
}
