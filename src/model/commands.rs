//! The `ctl` verbs that change the model: drain, disable, enable, weight,
//! add, remove. Each checks the pool rules on the pool as it would leave
//! it, then changes it and rebuilds its table, or refuses and changes
//! nothing.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::config::{pool_rule_problems, validate_backend_request, PoolMember};
use crate::health::state::AdminState;
use crate::protocol::{AddReply, DrainReply, EnableReply, RemoveReply, Reply, Request, WeightReply};

use super::effects::Effects;
use super::{CmdResult, Model};

impl Model {
    /// Carries out a request that changes the model (`drain`, `disable`,
    /// `enable`, `weight`, `add`, `remove`): its reply (an error changes
    /// nothing and asks for nothing) and effects. `None` for the verbs the
    /// model does not answer alone (status, backends, stats, route: read
    /// by the shell; reload: the shell reads the file first).
    pub fn command(&mut self, req: &Request, now: Instant) -> Option<(Reply<'static>, Effects)> {
        fn done<T>(r: CmdResult<T>, wrap: fn(T) -> Reply<'static>) -> (Reply<'static>, Effects) {
            match r {
                Ok((reply, fx)) => (wrap(reply), fx),
                Err(e) => (Reply::Error(e), Effects::default()),
            }
        }
        Some(match req {
            Request::Drain { pool, addr, force } => {
                done(self.drain(pool, addr, AdminState::Draining, *force, now), Reply::Drain)
            }
            Request::Disable { pool, addr, force } => {
                done(self.drain(pool, addr, AdminState::Disabled, *force, now), Reply::Drain)
            }
            Request::Enable { pool, addr } => done(self.enable(pool, addr, now), Reply::Enable),
            Request::Weight {
                pool,
                addr,
                weight,
                force,
            } => done(self.set_weight(pool, addr, *weight, *force, now), Reply::Weight),
            Request::Add {
                pool,
                addr,
                weight,
                force,
            } => done(self.add_backend(pool, addr, *weight, *force, now), Reply::Add),
            Request::Remove { pool, addr, force } => done(self.remove_backend(pool, addr, *force, now), Reply::Remove),
            Request::Status {}
            | Request::Backends { .. }
            | Request::Stats {}
            | Request::Route { .. }
            | Request::WhatIf { .. }
            | Request::Takeover { .. }
            | Request::Reload {} => return None,
        })
    }

    /// Refuses a control command that would leave pool `p` breaking the
    /// pool rules the file is held to ([`pool_rule_problems`]), checked on
    /// the pool as the command would leave it: `change` is the backend it
    /// touches and what that backend becomes (`None`: it leaves the pool),
    /// or a new backend (index past the end). `force` lets an operator who
    /// means it leave a pool with nothing usable; it never bypasses
    /// `table_size`, which the table could not be built past.
    fn check_pool_rules(
        &self,
        p: usize,
        change: (usize, Option<PoolMember>),
        force: bool,
        fx: &mut Effects,
    ) -> Result<(), String> {
        let pool = &self.pools[p];
        let (target, after) = change;
        let members: Vec<PoolMember> = pool
            .backends
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                if i == target {
                    return after;
                }
                (!b.remove_when_drained).then_some(PoolMember {
                    weight: b.config.weight,
                    in_service: b.admin == AdminState::Enabled,
                })
            })
            .chain((target >= pool.backends.len()).then_some(after).flatten())
            .collect();
        let name = &pool.config.name;
        let problems = pool_rule_problems(&members, pool.config.table_size);
        let (forceable, hard): (Vec<_>, Vec<_>) = problems.into_iter().partition(|(key, _)| *key == "backend");
        if let Some((key, problem)) = hard.first() {
            return Err(format!("pool \"{name}\": {key}: {problem}; nothing changed"));
        }
        match forceable.first() {
            None => Ok(()),
            Some((key, problem)) if force => {
                fx.warn(format!("pool \"{name}\": {key}: {problem}: forced by operator"));
                Ok(())
            }
            Some((key, problem)) => Err(format!(
                "pool \"{name}\": {key}: {problem}; nothing changed (ringlb ctl --force, or \"force\": true, does it anyway)"
            )),
        }
    }

    /// `drain POOL ADDR` (`admin` Draining) / `disable POOL ADDR` (Disabled).
    pub fn drain(
        &mut self,
        pool: &str,
        addr: &str,
        admin: AdminState,
        force: bool,
        now: Instant,
    ) -> CmdResult<DrainReply> {
        let mut fx = Effects::default();
        let (p, b) = self.find(pool, addr)?;
        let weight = self.pools[p].backends[b].config.weight;
        let after = PoolMember {
            weight,
            in_service: false,
        };
        self.check_pool_rules(p, (b, Some(after)), force, &mut fx)?;
        let timeout = self.pools[p].config.drain_timeout;
        let be = &mut self.pools[p].backends[b];
        be.start_draining(admin, timeout, now);
        be.reason = format!(
            "{} by operator",
            if admin == AdminState::Disabled {
                "disabled"
            } else {
                "drained"
            }
        );
        let remaining = be.open_connections();
        fx.info(format!(
            "pool \"{pool}\": backend {addr} {}: {remaining} connection(s) may finish within {timeout:?}",
            be.reason
        ));
        self.rebuild_into(p, now, &mut fx);
        let reply = DrainReply {
            remaining,
            drain_timeout_ms: timeout.as_millis() as u64,
        };
        Ok((reply, fx))
    }

    /// `enable POOL ADDR`.
    pub fn enable(&mut self, pool: &str, addr: &str, now: Instant) -> CmdResult<EnableReply> {
        let mut fx = Effects::default();
        let (p, b) = self.find(pool, addr)?;
        let be = &mut self.pools[p].backends[b];
        be.admin = AdminState::Enabled;
        be.drain_deadline = None;
        be.shared.closing.store(false, Ordering::SeqCst);
        be.healthy_since = Some(now);
        be.reason = "enabled by operator".into();
        fx.info(format!("pool \"{pool}\": backend {addr} enabled by operator"));
        self.rebuild_into(p, now, &mut fx);
        Ok((EnableReply {}, fx))
    }

    /// `weight POOL ADDR W`.
    pub fn set_weight(
        &mut self,
        pool: &str,
        addr: &str,
        weight: i64,
        force: bool,
        now: Instant,
    ) -> CmdResult<WeightReply> {
        let mut fx = Effects::default();
        let checked = validate_backend_request(addr, Some(weight)).map_err(|e| e.to_string())?;
        let (p, b) = self.find(pool, addr)?;
        let after = PoolMember {
            weight: checked.weight,
            in_service: self.pools[p].backends[b].admin == AdminState::Enabled,
        };
        self.check_pool_rules(p, (b, Some(after)), force, &mut fx)?;
        let be = &mut self.pools[p].backends[b];
        let old = be.config.weight;
        be.config.weight = checked.weight;
        fx.info(format!(
            "pool \"{pool}\": backend {addr} weight {old} -> {} by operator",
            checked.weight
        ));
        self.rebuild_into(p, now, &mut fx);
        Ok((
            WeightReply {
                old_weight: old,
                weight: checked.weight,
            },
            fx,
        ))
    }

    /// `add POOL ADDR [--weight W]`.
    pub fn add_backend(
        &mut self,
        pool: &str,
        addr: &str,
        weight: Option<i64>,
        force: bool,
        now: Instant,
    ) -> CmdResult<AddReply> {
        let mut fx = Effects::default();
        let checked = validate_backend_request(addr, weight).map_err(|e| e.to_string())?;
        let p = self
            .pool_index(pool)
            .ok_or_else(|| format!("no pool named \"{pool}\""))?;
        if self.pools[p]
            .backends
            .iter()
            .any(|b| b.config.addr == checked.addr && !b.remove_when_drained)
        {
            return Err(format!("pool \"{pool}\" already has backend {}", checked.addr));
        }
        // A backend still draining from a removal is taken back in its place.
        let draining = self.pools[p]
            .backends
            .iter()
            .position(|b| b.config.addr == checked.addr && b.remove_when_drained);
        let after = PoolMember {
            weight: checked.weight,
            in_service: true,
        };
        let target = draining.unwrap_or(self.pools[p].backends.len());
        self.check_pool_rules(p, (target, Some(after)), force, &mut fx)?;
        let reply = AddReply {
            addr: checked.addr.to_string(),
            weight: checked.weight,
        };
        if let Some(be) = draining.map(|i| &mut self.pools[p].backends[i]) {
            // Still draining from a removal: it comes back as it is.
            let remaining = be.open_connections();
            be.take_back(checked.clone(), "re-added by operator", now);
            fx.info(format!(
                "pool \"{pool}\": backend {} re-added by operator (weight {}) while draining; its {remaining} open connection(s) continue",
                checked.addr, checked.weight
            ));
        } else {
            let cfg = self.pools[p].config.clone();
            let state = self.new_backend(&cfg, checked.clone(), now);
            self.pools[p].backends.push(state);
            fx.info(format!(
                "pool \"{pool}\": backend {} added by operator (weight {})",
                checked.addr, checked.weight
            ));
        }
        self.rebuild_into(p, now, &mut fx);
        Ok((reply, fx))
    }

    /// `remove POOL ADDR`: drains first, leaves once drained.
    pub fn remove_backend(&mut self, pool: &str, addr: &str, force: bool, now: Instant) -> CmdResult<RemoveReply> {
        let mut fx = Effects::default();
        let (p, b) = self.find(pool, addr)?;
        self.check_pool_rules(p, (b, None), force, &mut fx)?;
        let timeout = self.pools[p].config.drain_timeout;
        let be = &mut self.pools[p].backends[b];
        be.remove_when_drained = true;
        be.start_draining(AdminState::Draining, timeout, now);
        be.reason = "removing (draining first)".into();
        let remaining = be.open_connections();
        fx.info(format!(
            "pool \"{pool}\": backend {addr} removed by operator; draining {remaining} connection(s) first"
        ));
        self.rebuild_into(p, now, &mut fx);
        Ok((RemoveReply { remaining }, fx))
    }
}
