//! A new, validated config applied to the running model: pools, backends
//! and listeners changed in place, added or retired, operator states kept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{addresses_overlap, pool_rule_problems, CheckKind, Config, ListenerConfig, PoolMember};
use crate::health::state::{ActiveCheck, AdminState};
use crate::protocol::ReloadReply;

use super::effects::Effects;
use super::{CmdResult, Model};

/// A listener of the new config that needs new sockets.
#[derive(Debug, Clone)]
pub struct ToBind {
    /// Its settings.
    pub config: ListenerConfig,
    /// A live listener this reload retires holds an overlapping address
    /// (a port moved or kept under a new name): ringlb holds the port
    /// itself, so the bind must not wait for it to be free.
    pub ours: bool,
}

impl Model {
    /// The listeners of `new` that are not live ones kept in place
    /// ([`ListenerConfig::same_listener`]): the shell binds them before
    /// [`Model::reload`], so a bind failure never half-applies a reload.
    pub fn listeners_to_bind(&self, new: &Config) -> Vec<ToBind> {
        new.listeners
            .iter()
            .filter(|l| !self.live_listeners().any(|s| s.config.same_listener(l)))
            .map(|l| ToBind {
                config: l.clone(),
                ours: self
                    .live_listeners()
                    .any(|s| s.config.protocol == l.protocol && addresses_overlap(s.config.bind, l.bind)),
            })
            .collect()
    }

    /// The pool rules ([`pool_rule_problems`]) applied to each pool of
    /// `new` as [`Model::apply_config`] would leave it: the operator states
    /// of backends that stay are kept, so a drained or disabled one is not
    /// in service (a new or re-added one is). A file whose kept backends are
    /// all drained or disabled would otherwise leave the pool taking
    /// nothing, which `ctl` refuses without `--force`.
    pub fn reload_rule_problems(&self, new: &Config) -> Vec<String> {
        let mut problems = Vec::new();
        for pc in &new.pools {
            let Some(i) = self.pool_index(&pc.name) else { continue };
            let members: Vec<PoolMember> = pc
                .backends
                .iter()
                .map(|bc| {
                    let kept = self.pools[i]
                        .backends
                        .iter()
                        .find(|b| b.config.addr == bc.addr && !b.remove_when_drained);
                    PoolMember {
                        weight: bc.weight,
                        in_service: kept.is_none_or(|b| b.admin == AdminState::Enabled),
                    }
                })
                .collect();
            for (key, problem) in pool_rule_problems(&members, pc.table_size) {
                problems.push(format!(
                    "pool \"{}\": {key}: {problem} (drained and disabled states are kept on reload: enable one first)",
                    pc.name
                ));
            }
        }
        problems
    }

    /// A reload of `new` (validated, its new listeners bound by the shell):
    /// refused, changing nothing, when [`Model::reload_rule_problems`]
    /// finds any; otherwise [`Model::apply_config`], with its changes and
    /// the new config generation as the reply.
    pub fn reload(&mut self, new: Config, now: Instant) -> CmdResult<ReloadReply> {
        let problems = self.reload_rule_problems(&new);
        if !problems.is_empty() {
            let file = self
                .config
                .source
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(format!("{file}: {}; nothing changed", problems.join("; ")));
        }
        let (changes, mut fx) = self.apply_config(new, now);
        let generation = self.config_generation;
        if changes.is_empty() {
            fx.info(format!("reload (config generation {generation}): no changes"));
        } else {
            fx.info(format!(
                "reload (config generation {generation}): {}",
                changes.join("; ")
            ));
        }
        Ok((
            ReloadReply {
                changes,
                config_generation: generation,
            },
            fx,
        ))
    }

    /// Applies a new, already validated config: pools and backends in place,
    /// listeners updated in place or retired (their slots in
    /// [`Effects::stop_listeners`]), new listeners registered (in
    /// [`Effects::start_listeners`], for the sockets the shell bound).
    /// Returns the changes, one line each.
    ///
    /// The file wins for membership and weights: backends not in the file
    /// (including ones added by `ctl add`) are drained and removed, and
    /// weights set by `ctl weight` revert to the file's. Operator states
    /// (drained, disabled) of backends that stay are kept: they are about a
    /// machine, not about the config.
    pub fn apply_config(&mut self, new: Config, now: Instant) -> (Vec<String>, Effects) {
        let mut fx = Effects::default();
        let mut changes = Vec::new();
        self.apply_pools(&new, now, &mut changes);
        for i in 0..self.pools.len() {
            self.rebuild_into(i, now, &mut fx);
        }
        self.apply_listeners(&new, now, &mut changes, &mut fx);
        if new.runtime.workers != self.config.runtime.workers || new.runtime.io_engine != self.config.runtime.io_engine
        {
            changes.push("runtime.workers / runtime.io_engine changed: takes effect on restart only".into());
        }
        if new.runtime.pin_workers != self.config.runtime.pin_workers {
            changes.push("runtime.pin_workers changed: takes effect on restart only".into());
        }
        if new.control.socket != self.config.control.socket || new.control.metrics != self.config.control.metrics {
            changes.push("control.socket / control.metrics changed: takes effect on restart only".into());
        }
        let mut kept = new;
        kept.runtime.workers = self.config.runtime.workers;
        kept.runtime.io_engine = self.config.runtime.io_engine;
        kept.runtime.pin_workers = self.config.runtime.pin_workers;
        kept.control.socket = self.config.control.socket.clone();
        kept.control.metrics = self.config.control.metrics;
        self.config = kept;
        self.config_generation += 1;
        fx.publish = true;
        (changes, fx)
    }

    /// Pools of `new`: added, changed in place (backends added, taken back,
    /// re-weighted, removed by draining), or retired.
    fn apply_pools(&mut self, new: &Config, now: Instant, changes: &mut Vec<String>) {
        for pc in &new.pools {
            let Some(i) = self.pool_index(&pc.name) else {
                let pool = self.new_pool(pc, now);
                self.pools.push(pool);
                changes.push(format!("pool \"{}\" added", pc.name));
                continue;
            };
            let mut backends = std::mem::take(&mut self.pools[i].backends);
            let mut next = Vec::new();
            for bc in &pc.backends {
                // A backend still draining from a removal is taken
                // back (one entry per address, see take_back).
                match backends.iter().position(|b| b.config.addr == bc.addr) {
                    Some(j) => {
                        let mut b = backends.remove(j);
                        if b.remove_when_drained {
                            changes.push(format!(
                                "pool \"{}\": backend {} added back (was draining)",
                                pc.name, bc.addr
                            ));
                            b.take_back(bc.clone(), "back in the config file", now);
                        } else if b.config.weight != bc.weight {
                            changes.push(format!(
                                "pool \"{}\": backend {} weight {} -> {}",
                                pc.name, bc.addr, b.config.weight, bc.weight
                            ));
                        }
                        if pc.health_check != self.pools[i].config.health_check {
                            let up = pc.health_check.kind == CheckKind::None || b.active.is_up();
                            b.active = ActiveCheck::new(pc.health_check.rise, pc.health_check.fall, up);
                        }
                        b.config = bc.clone();
                        next.push(b);
                    }
                    None => {
                        changes.push(format!("pool \"{}\": backend {} added", pc.name, bc.addr));
                        next.push(self.new_backend(pc, bc.clone(), now));
                    }
                }
            }
            for mut b in backends {
                if !b.remove_when_drained {
                    changes.push(format!(
                        "pool \"{}\": backend {} removed (draining)",
                        pc.name, b.config.addr
                    ));
                }
                b.remove_when_drained = true;
                b.start_draining(AdminState::Draining, pc.drain_timeout, now);
                next.push(b);
            }
            let old = &self.pools[i].config;
            if (
                old.table_size,
                old.drain_timeout,
                old.slow_start,
                &old.health_check,
                &old.outlier,
            ) != (
                pc.table_size,
                pc.drain_timeout,
                pc.slow_start,
                &pc.health_check,
                &pc.outlier,
            ) || old.panic_threshold != pc.panic_threshold
            {
                changes.push(format!("pool \"{}\" settings updated", pc.name));
            }
            self.pools[i].config = pc.clone();
            self.pools[i].backends = next;
        }
        for p in &mut self.pools {
            if !p.retired && !new.pools.iter().any(|pc| pc.name == p.config.name) {
                changes.push(format!("pool \"{}\" removed (draining)", p.config.name));
                p.retired = true;
                for b in &mut p.backends {
                    b.start_draining(AdminState::Draining, p.config.drain_timeout, now);
                }
            }
        }
    }

    /// Listeners of `new`: the same listener is updated in place; a live
    /// one not in `new` is retired (stopped now, its connections closed at
    /// its pool's drain timeout); the rest are registered as new.
    fn apply_listeners(&mut self, new: &Config, now: Instant, changes: &mut Vec<String>, fx: &mut Effects) {
        let mut to_add = Vec::new();
        for lc in &new.listeners {
            match self
                .listeners
                .iter_mut()
                .find(|l| l.retire_deadline.is_none() && l.config.same_listener(lc))
            {
                Some(l) => {
                    if *l.config != *lc {
                        changes.push(format!("listener \"{}\" updated", lc.name));
                        if !l.limits.matches(lc) {
                            // New limits start with fresh buckets and counts;
                            // connections admitted under the old ones release there.
                            l.limits = Arc::new(crate::admission::limits::ListenerLimits::new(lc));
                        }
                        l.config = Arc::new(lc.clone());
                    }
                }
                None => to_add.push(lc.clone()),
            }
        }
        for l in &mut self.listeners {
            let stays = new.listeners.iter().any(|lc| lc.same_listener(&l.config));
            if !stays && l.retire_deadline.is_none() {
                let drain = self
                    .config
                    .pool(&l.config.pool)
                    .map_or(Duration::from_secs(30), |p| p.drain_timeout);
                changes.push(format!("listener \"{}\" on {} removed", l.config.name, l.config.bind));
                fx.stop_listeners.push(l.slot);
                l.retire_deadline = Some(now + drain);
            }
        }
        for lc in to_add {
            changes.push(format!("listener \"{}\" on {} added", lc.name, lc.bind));
            self.add_listener(lc, fx);
        }
    }
}
