//! Scenarios on synthetic time: drains, removals, slow start, panic,
//! outlier ejection, checks, reloads, `ctl` then reload, geo spill.

use std::sync::Arc;

use super::harness::*;
use crate::health::state::WEIGHT_SCALE;
use crate::protocol::{AddReply, DrainReply, RemoveReply, Reply, WeightReply};

const A: &str = "10.0.0.1:80";
const B: &str = "10.0.0.2:80";
const C: &str = "10.0.0.3:80";
const D: &str = "10.0.0.4:80";

fn two(pool_extra: &str) -> String {
    one_pool(pool_extra, &[(A, ""), (B, "")])
}

fn sas(addrs: &[&str]) -> Vec<std::net::SocketAddr> {
    addrs.iter().map(|a| sa(a)).collect()
}

/// Checked every second, one failure or pass flips a backend, no jitter.
const CHECKED: &str =
    "[pool.health_check]\nkind = \"tcp\"\ninterval = \"1s\"\njitter = \"0s\"\nfall = 1\nrise = 1\ntimeout = \"500ms\"\n";

// === drains and removals ===

#[test]
fn drain_takes_a_backend_out_at_once_and_closes_what_is_left_at_the_timeout() {
    let mut w = World::new(&two("drain_timeout = \"1s\""));
    w.open("p", A, 2);
    let reply = w.ctl(drain("p", A));
    assert_eq!(
        reply,
        Reply::Drain(DrainReply {
            remaining: 2,
            drain_timeout_ms: 1000
        })
    );
    assert_eq!(w.in_table("p"), sas(&[B]), "a drained backend takes no new connection");
    assert_eq!(w.state("p", A), "draining");
    w.run_for(900);
    assert!(
        !w.closing("p", A) && w.close_checks == 0,
        "its connections may finish until the timeout"
    );
    w.run_for(200);
    assert!(w.closing("p", A), "past the timeout its connections are closed");
    assert_eq!(w.close_checks, 1, "workers are told once");
    assert!(w.logged("drain timeout passed; closing 2 connection(s)"));
}

#[test]
fn a_drain_with_nothing_open_sends_no_close_check() {
    let mut w = World::new(&two("drain_timeout = \"1s\""));
    assert!(w.ctl(drain("p", A)).is_ok());
    w.run_for(2000);
    assert_eq!(w.close_checks, 0);
    assert_eq!(w.in_table("p"), sas(&[B]));
}

#[test]
fn enable_after_a_drain_timeout_brings_it_back_and_stops_the_close() {
    let mut w = World::new(&two("drain_timeout = \"1s\""));
    w.open("p", A, 1);
    assert!(w.ctl(drain("p", A)).is_ok());
    w.run_for(1100);
    assert!(w.closing("p", A));
    assert_eq!(w.ctl(enable("p", A)), Reply::Enable(crate::protocol::EnableReply {}));
    assert!(!w.closing("p", A), "enabled: new connections to it are not closed");
    assert_eq!(w.in_table("p"), sas(&[A, B]));
    assert_eq!(w.state("p", A), "active");
}

#[test]
fn remove_during_a_drain_keeps_the_entry_until_its_connections_close() {
    let mut w = World::new(&two("drain_timeout = \"10s\""));
    w.open("p", A, 3);
    assert!(w.ctl(drain("p", A)).is_ok());
    assert_eq!(w.ctl(remove("p", A)), Reply::Remove(RemoveReply { remaining: 3 }));
    w.run_for(500);
    assert!(
        w.listed("p", A),
        "still listed: its connections hold its Arc and counters"
    );
    assert!(w.backend("p", A).remove_when_drained);
    // A second remove finds nothing: it is already leaving.
    assert!(matches!(w.ctl(remove("p", A)), Reply::Error(e) if e.contains("has no backend")));
    w.close_all("p", A);
    w.advance(100);
    assert!(!w.listed("p", A), "gone from the snapshot once drained");
    assert!(w.model.pools[0].backends.iter().all(|b| b.config.addr != sa(A)));
    assert!(w.logged("removed (drained)"));
}

#[test]
fn remove_keeps_its_earlier_drain_deadline() {
    let mut w = World::new(&two("drain_timeout = \"1s\""));
    w.open("p", A, 1);
    assert!(w.ctl(drain("p", A)).is_ok());
    w.run_for(600);
    assert!(w.ctl(remove("p", A)).is_ok());
    w.run_for(500);
    assert!(
        w.closing("p", A),
        "the deadline set by the drain (1 s) holds, not 1 s from the remove"
    );
}

#[test]
fn re_adding_a_draining_backend_takes_its_entry_over() {
    let mut w = World::new(&two(""));
    w.open("p", A, 1);
    let shared = w.backend("p", A).shared.clone();
    assert!(w.ctl(remove("p", A)).is_ok());
    let reply = w.ctl(add("p", A, Some(4)));
    assert_eq!(
        reply,
        Reply::Add(AddReply {
            addr: A.into(),
            weight: 4
        })
    );
    assert_eq!(w.model.pools[0].backends.len(), 2, "one entry per address");
    let b = w.backend("p", A);
    assert!(Arc::ptr_eq(&shared, &b.shared), "same counters, same open connection");
    assert_eq!(
        (b.state_label(w.now), b.remove_when_drained, b.config.weight),
        ("active", false, 4)
    );
    assert_eq!(w.weight_of("p", A), 4 * w.weight_of("p", B));
}

#[test]
fn refusing_to_drain_the_last_backend_changes_nothing_and_force_does_it() {
    let mut w = World::new(&one_pool("", &[(A, "")]));
    let before = w.publishes;
    match w.ctl(drain("p", A)) {
        Reply::Error(e) => assert!(e.contains("nothing changed") && e.contains("--force"), "{e}"),
        other => panic!("accepted: {other:?}"),
    }
    assert_eq!(w.publishes, before, "nothing published");
    assert_eq!(w.state("p", A), "active");
    let forced = crate::protocol::Request::Drain {
        pool: "p".into(),
        addr: A.into(),
        force: true,
    };
    assert!(w.ctl(forced).is_ok());
    assert!(w.in_table("p").is_empty(), "forced: the pool takes nothing");
    assert!(w.logged("forced by operator"));
}

#[test]
fn unknown_pool_backend_and_bad_addresses_are_errors_that_say_which() {
    let mut w = World::new(&two(""));
    let err = |r: Reply| match r {
        Reply::Error(e) => e,
        other => panic!("accepted: {other:?}"),
    };
    assert_eq!(err(w.ctl(drain("nosuch", A))), "no pool named \"nosuch\"");
    assert_eq!(err(w.ctl(drain("p", C))), format!("pool \"p\" has no backend {C}"));
    assert!(err(w.ctl(enable("p", "nonsense"))).contains("\"nonsense\" is not an ip:port"));
    assert!(err(w.ctl(add("p", A, None))).contains("already has backend"));
    assert!(err(w.ctl(add("p", C, Some(-1)))).contains("weight"));
}

// === weights ===

#[test]
fn weight_changes_the_table_share_and_replies_old_and_new() {
    let mut w = World::new(&two(""));
    assert_eq!(w.weight_of("p", A), w.weight_of("p", B));
    let reply = w.ctl(weight("p", A, 3));
    assert_eq!(
        reply,
        Reply::Weight(WeightReply {
            old_weight: 1,
            weight: 3
        })
    );
    assert_eq!(w.weight_of("p", A), 3 * w.weight_of("p", B));
    assert_eq!(
        w.weight_of("p", B),
        WEIGHT_SCALE,
        "full weight 1 is WEIGHT_SCALE table units"
    );
}

#[test]
fn weight_zero_on_the_last_weighted_backend_is_refused() {
    let mut w = World::new(&two(""));
    assert!(w.ctl(weight("p", A, 0)).is_ok());
    assert_eq!(w.in_table("p"), sas(&[B]));
    assert!(!w.ctl(weight("p", B, 0)).is_ok());
    assert_eq!(w.in_table("p"), sas(&[B]));
}

// === slow start ===

#[test]
fn slow_start_ramps_an_enabled_backend_in_steps_to_full_weight() {
    let mut w = World::new(&two("slow_start = \"10s\""));
    let full = w.weight_of("p", A);
    assert!(w.ctl(disable("p", A)).is_ok());
    assert!(w.ctl(enable("p", A)).is_ok());
    let mut seen = vec![w.weight_of("p", A)];
    assert_eq!(seen[0], full / 10, "one step of ten at first");
    for _ in 0..110 {
        w.advance(100);
        let now = w.weight_of("p", A);
        if now != *seen.last().unwrap() {
            seen.push(now);
        }
    }
    assert_eq!(seen.first(), Some(&(full / 10)));
    assert_eq!(seen.last(), Some(&full), "full weight after the window");
    assert!(seen.windows(2).all(|p| p[0] < p[1]), "only ever up: {seen:?}");
    assert!(seen.len() >= 9, "in steps, each reaching the table: {seen:?}");
    assert_eq!(w.weight_of("p", B), full, "the other backend is not ramped");
    assert_eq!(
        w.model.pools[0].next_slow_start_step, None,
        "no rebuilds after the ramp"
    );
}

// === panic ===

#[test]
fn panic_mode_balances_over_all_enabled_below_the_threshold_and_ends_above_it() {
    let text = one_pool(CHECKED, &[(A, ""), (B, ""), (C, ""), (D, "")]);
    let mut w = World::new(&text);
    w.advance(1000);
    w.check_round(&[B]);
    assert_eq!(
        w.in_table("p"),
        sas(&[A, C, D]),
        "75% healthy: no panic, the down one is out"
    );
    w.advance(1000);
    w.check_round(&[B, C, D]);
    assert!(w.model.pools[0].panic);
    assert_eq!(
        w.in_table("p"),
        sas(&[A, B, C, D]),
        "25% healthy < 50%: every enabled backend"
    );
    assert!(w.logged("panic mode: only 1 of 4 enabled backends healthy"));
    w.advance(1000);
    w.check_round(&[C]);
    assert!(!w.model.pools[0].panic);
    assert_eq!(w.in_table("p"), sas(&[A, B, D]));
    assert!(w.logged("panic mode over"));
}

// === outlier ejection ===

const OUTLIER: &str = "[pool.outlier]\nconsecutive_failures = 3\nejection_time = \"1s\"\nmax_ejection_time = \"5s\"\nmax_ejection_percent = 50\n";

#[test]
fn outlier_ejection_doubles_on_repeat_and_resets_after_a_quiet_span() {
    let mut w = World::new(&one_pool(OUTLIER, &[(A, ""), (B, ""), (C, "")]));
    let eject = |w: &mut World| {
        w.connect_failures("p", A, 3);
        w.advance(100);
        assert_eq!(w.state("p", A), "ejected");
        assert!(!w.in_table("p").contains(&sa(A)));
    };
    // How long until it is back in the table, in 100 ms ticks.
    let time_out = |w: &mut World| {
        let mut ms = 0;
        while !w.in_table("p").contains(&sa(A)) {
            w.advance(100);
            ms += 100;
            assert!(ms <= 10_000, "never came back");
        }
        ms
    };
    eject(&mut w);
    assert_eq!(time_out(&mut w), 1000, "first ejection: ejection_time");
    eject(&mut w);
    assert_eq!(time_out(&mut w), 2000, "second: doubled");
    eject(&mut w);
    assert_eq!(time_out(&mut w), 4000, "third: doubled again");
    eject(&mut w);
    assert_eq!(time_out(&mut w), 5000, "capped at max_ejection_time");
    w.run_for(5000);
    eject(&mut w);
    assert_eq!(time_out(&mut w), 1000, "a quiet max_ejection_time later it starts over");
    assert_eq!(w.backend("p", A).outlier.ejections_total(), 5);
}

#[test]
fn max_ejection_percent_keeps_backends_in_and_says_so() {
    let mut w = World::new(&two(OUTLIER));
    w.connect_failures("p", A, 3);
    w.advance(100);
    assert_eq!(w.state("p", A), "ejected");
    w.connect_failures("p", B, 3);
    w.advance(100);
    assert_eq!(w.state("p", B), "active", "the last one is never ejected");
    assert!(w.logged("max_ejection_percent (50%) keeps it in"));
    assert_eq!(w.in_table("p"), sas(&[B]));
}

#[test]
fn connect_failures_below_the_threshold_eject_nothing() {
    let mut w = World::new(&two(OUTLIER));
    w.connect_failures("p", A, 2);
    w.advance(100);
    assert_eq!(w.state("p", A), "active");
    assert_eq!(w.in_table("p"), sas(&[A, B]));
}

// === active checks ===

#[test]
fn check_results_only_mark_the_pool_and_one_rebuild_covers_them_all() {
    let backends: Vec<String> = (1..=6).map(|i| format!("10.0.1.{i}:80")).collect();
    let list: Vec<(&str, &str)> = backends.iter().map(|b| (b.as_str(), "")).collect();
    let mut w = World::new(&one_pool(CHECKED, &list));
    w.advance(1000);
    assert_eq!(w.due(), 6);
    let before = (w.publishes, w.published_pool("p").generation);
    for b in &backends[..4] {
        let fx = w.answer(b, Some(false));
        assert!(
            fx.rebuild_soon && !fx.publish,
            "a result wakes the ticker, it does not publish"
        );
        w.apply(fx);
    }
    assert_eq!(
        (w.publishes, w.published_pool("p").generation),
        before,
        "no rebuild per result"
    );
    let fx = w.model.rebuild_dirty(w.now);
    w.apply(fx);
    assert_eq!(w.publishes, before.0 + 1, "one publish");
    assert_eq!(w.published_pool("p").generation, before.1 + 1, "one rebuild");
    assert!(w.model.pools[0].panic, "4 of 6 down: panic");
    // Four changes in one rebuild: one summary line, not four.
    assert!(w.logged("4 backend(s) down (10.0.1.1:80, 10.0.1.2:80, 10.0.1.3:80 and 1 more"));
}

#[test]
fn checks_that_could_not_run_leave_the_backend_as_it_was() {
    let text = one_pool(
        "[pool.health_check]\nkind = \"tcp\"\ninterval = \"1s\"\njitter = \"0s\"\nfall = 2\nrise = 2\n",
        &[(A, "")],
    );
    let mut w = World::new(&text);
    for _ in 0..10 {
        w.advance(1000);
        assert_eq!(w.due(), 1, "a check is due every interval, not-run or not");
        let fx = w.answer(A, None);
        assert!(!fx.rebuild_soon);
        w.apply(fx);
    }
    assert_eq!(w.state("p", A), "active");
    assert_eq!(
        w.logs.iter().filter(|l| l.text.contains("not run: EMFILE")).count(),
        1,
        "warned once"
    );
    for _ in 0..2 {
        w.advance(1000);
        w.due();
        let fx = w.answer(A, Some(false));
        w.apply(fx);
    }
    assert_eq!(w.state("p", A), "down", "real failures still count");
}

#[test]
fn a_late_result_for_a_removed_and_re_added_backend_is_ignored() {
    let mut w = World::new(&one_pool(CHECKED, &[(A, ""), (B, "")]));
    w.advance(1000);
    w.due();
    let stale = w.checks.iter().find(|j| j.target == sa(A)).unwrap().clone();
    w.checks.clear();
    assert!(w.ctl(remove("p", A)).is_ok());
    w.advance(100);
    assert!(w.ctl(add("p", A, None)).is_ok());
    let result = crate::model::health::CheckResult {
        passed: Some(false),
        latency: std::time::Duration::ZERO,
        detail: "late".into(),
    };
    let fx = w.model.record_check(&stale, result, w.now);
    assert!(!fx.rebuild_soon);
    assert_eq!(w.state("p", A), "active", "the new incarnation is not marked down");
}

#[test]
fn initial_state_down_waits_for_rise_passes() {
    let text = one_pool(
        "panic_threshold = 0\n[pool.health_check]\nkind = \"tcp\"\ninterval = \"1s\"\njitter = \"0s\"\nrise = 2\ninitial_state = \"down\"\n",
        &[(A, "")],
    );
    let mut w = World::new(&text);
    assert!(w.in_table("p").is_empty());
    w.advance(1000);
    w.check_round(&[]);
    assert!(w.in_table("p").is_empty(), "one pass of two");
    w.advance(1000);
    w.check_round(&[]);
    assert_eq!(w.in_table("p"), sas(&[A]));
}

#[test]
fn the_same_seed_schedules_the_same_checks() {
    let text = one_pool(
        "[pool.health_check]\nkind = \"tcp\"\ninterval = \"1s\"\njitter = \"500ms\"\n",
        &[(A, ""), (B, ""), (C, "")],
    );
    let (w1, w2) = (World::new(&text), World::new(&text));
    let due = |w: &World| -> Vec<std::time::Duration> {
        w.model.pools[0].backends.iter().map(|b| b.next_check - w.t0).collect()
    };
    assert_eq!(due(&w1), due(&w2));
    assert!(due(&w1).iter().all(|d| *d < std::time::Duration::from_millis(500)));
    assert!(due(&w1).windows(2).any(|p| p[0] != p[1]), "spread: {:?}", due(&w1));
}

// === reloads ===

fn listeners(specs: &[(&str, &str, &str)]) -> String {
    let mut text = String::new();
    for (name, bind, proto) in specs {
        text.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"{bind}\"\nprotocol = \"{proto}\"\npool = \"p\"\n\n"
        ));
    }
    text.push_str(&format!(
        "[[pool]]\nname = \"p\"\ntable_size = {TABLE}\n[[pool.backend]]\naddr = \"{A}\"\n"
    ));
    text
}

#[test]
fn reload_keeps_updates_moves_adds_and_retires_listeners() {
    let mut w = World::new(&listeners(&[
        ("keep", "127.0.0.1:1001", "tcp"),
        ("move", "127.0.0.1:1002", "tcp"),
        ("gone", "127.0.0.1:1003", "udp"),
    ]));
    assert_eq!(w.started.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![0, 1, 2]);
    let new = listeners(&[
        ("keep", "127.0.0.1:1001", "tcp"),
        ("move", "127.0.0.1:1012", "tcp"),
        ("new", "127.0.0.1:1004", "tcp"),
    ]);
    let to_bind: Vec<String> = w
        .model
        .listeners_to_bind(&config(&new))
        .into_iter()
        .map(|b| b.config.name)
        .collect();
    assert_eq!(to_bind, ["move", "new"], "only new sockets are bound");
    let reply = w.reload(&new).unwrap();
    assert_eq!(reply.config_generation, 2);
    for line in [
        "listener \"move\" on 127.0.0.1:1002 removed",
        "listener \"gone\" on 127.0.0.1:1003 removed",
        "listener \"move\" on 127.0.0.1:1012 added",
        "listener \"new\" on 127.0.0.1:1004 added",
    ] {
        assert!(
            reply.changes.iter().any(|c| c == line),
            "{line:?} not in {:?}",
            reply.changes
        );
    }
    assert_eq!(
        w.stopped,
        vec![1, 2],
        "the moved and the removed listener stop accepting"
    );
    assert_eq!(w.started[3..], [(3, "move".to_string()), (4, "new".to_string())]);
    assert_eq!(w.published_listeners(), ["keep", "move", "new"]);
    assert_eq!(
        w.published.listeners[0].as_ref().unwrap().config.name,
        "keep",
        "kept in its slot"
    );
}

#[test]
fn a_retired_listener_closes_its_connections_at_the_drain_timeout_then_leaves() {
    let text = |extra: &str| {
        format!(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1001\"\npool = \"p\"\n{extra}\n[[pool]]\nname = \"p\"\ntable_size = {TABLE}\ndrain_timeout = \"1s\"\n[[pool.backend]]\naddr = \"{A}\"\n"
        )
    };
    let mut w = World::new(&text(
        "[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1002\"\npool = \"p\"\n",
    ));
    w.model.listeners[1].stats.active.opened.add(2);
    w.reload(&text("")).unwrap();
    assert_eq!(w.published_listeners(), ["a"]);
    w.run_for(900);
    assert_eq!(w.close_checks, 0);
    w.run_for(200);
    assert_eq!(w.close_checks, 1);
    assert!(
        w.model.listeners.iter().all(|l| l.config.name != "b"),
        "left once told to close"
    );
}

#[test]
fn reload_changes_pools_and_backends_while_operator_states_survive() {
    let base = |weights: (u32, u32), extra: &str| {
        one_pool(
            "drain_timeout = \"1s\"",
            &[
                (A, &format!("weight = {}", weights.0)),
                (B, &format!("weight = {}", weights.1)),
            ],
        ) + extra
    };
    let mut w = World::new(&base((1, 1), ""));
    w.open("p", B, 1);
    assert!(w.ctl(drain("p", A)).is_ok());
    assert!(w.ctl(weight("p", B, 5)).is_ok());
    let pool_q = "\n[[pool]]\nname = \"q\"\ntable_size = 1021\n[[pool.backend]]\naddr = \"10.0.9.9:80\"\n";
    let reply = w.reload(&base((2, 3), pool_q)).unwrap();
    assert!(
        reply.changes.iter().any(|c| c == "pool \"q\" added"),
        "{:?}",
        reply.changes
    );
    assert!(reply
        .changes
        .iter()
        .any(|c| c.contains("backend 10.0.0.2:80 weight 5 -> 3")));
    assert_eq!(
        w.state("p", A),
        "draining",
        "drained by the operator: kept across the reload"
    );
    assert_eq!(w.backend("p", A).config.weight, 2, "the file's weight");
    assert_eq!(w.in_table("p"), sas(&[B]));
    assert_eq!(w.backend("p", B).config.weight, 3, "ctl weight reverts to the file's");
    assert_eq!(w.in_table("q"), sas(&["10.0.9.9:80"]));
    // B leaves the file: drained, kept while its connection is open.
    let only_a_and_c = one_pool("drain_timeout = \"1s\"", &[(A, ""), (C, "")]);
    let reply = w.reload(&only_a_and_c).unwrap();
    assert!(reply.changes.iter().any(|c| c == "pool \"q\" removed (draining)"));
    assert!(reply
        .changes
        .iter()
        .any(|c| c.contains("backend 10.0.0.2:80 removed (draining)")));
    assert_eq!(w.in_table("p"), sas(&[C]));
    assert!(w.listed("p", B));
    w.run_for(1100);
    assert!(w.closing("p", B), "removed by the file: closed at its drain timeout");
    w.close_all("p", B);
    w.advance(100);
    assert!(!w.listed("p", B));
    assert!(
        w.published.pools.iter().all(|p| p.name != "q"),
        "the retired pool leaves once empty"
    );
    assert_eq!(w.model.config_generation, 3);
}

#[test]
fn ctl_add_then_reload_the_file_wins_for_membership() {
    let file = two("");
    let mut w = World::new(&file);
    assert!(w.ctl(add("p", C, Some(2))).is_ok());
    assert_eq!(w.in_table("p"), sas(&[A, B, C]));
    let reply = w.reload(&file).unwrap();
    assert!(
        reply
            .changes
            .iter()
            .any(|c| c.contains("backend 10.0.0.3:80 removed (draining)")),
        "{reply:?}"
    );
    assert_eq!(w.in_table("p"), sas(&[A, B]));
    // Added again by the file while still draining: the same entry comes back.
    w.open("p", C, 1);
    let with_c = one_pool("", &[(A, ""), (B, ""), (C, "weight = 7")]);
    let reply = w.reload(&with_c).unwrap();
    assert!(reply
        .changes
        .iter()
        .any(|c| c.contains("10.0.0.3:80 added back (was draining)")));
    assert_eq!(w.backend("p", C).config.weight, 7);
    assert_eq!(w.in_table("p"), sas(&[A, B, C]));
}

#[test]
fn a_reload_leaving_only_drained_backends_is_refused_and_changes_nothing() {
    let file = two("");
    let mut w = World::new(&file);
    assert!(w.ctl(drain("p", A)).is_ok());
    let forced = crate::protocol::Request::Disable {
        pool: "p".into(),
        addr: B.into(),
        force: true,
    };
    assert!(w.ctl(forced).is_ok());
    let (publishes, generation) = (w.publishes, w.model.config_generation);
    let err = w.reload(&file).unwrap_err();
    assert!(
        err.contains("enable one first") && err.contains("nothing changed"),
        "{err}"
    );
    assert_eq!((w.publishes, w.model.config_generation), (publishes, generation));
    assert!(w.ctl(enable("p", B)).is_ok());
    assert!(w.reload(&file).is_ok(), "accepted once one is enabled");
}

#[test]
fn a_reload_that_changes_health_checks_keeps_a_down_backend_down() {
    let mut w = World::new(&one_pool(CHECKED, &[(A, ""), (B, ""), (C, "")]));
    w.advance(1000);
    w.check_round(&[A]);
    assert_eq!(w.state("p", A), "down");
    let slower = CHECKED.replace("interval = \"1s\"", "interval = \"2s\"");
    w.reload(&one_pool(&slower, &[(A, ""), (B, ""), (C, "")])).unwrap();
    assert_eq!(w.state("p", A), "down", "a new check config does not call it healthy");
    assert_eq!(w.in_table("p"), sas(&[B, C]));
}

// === geo ===

const GEO: &str = "[geo.prefixes]\n\"10.1.0.0/16\" = \"eu\"\n\"10.2.0.0/16\" = \"us\"\n\n";

fn geo_pool() -> String {
    format!(
        "{GEO}[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1000\"\npool = \"p\"\n\n[[pool]]\nname = \"p\"\ntable_size = {TABLE}\n# Spill-over, not panic mode, is what is tested here.\npanic_threshold = 0\n{CHECKED}\n[pool.geo]\neu = {{ eu = 100, us = 1 }}\nus = {{ us = 100, eu = 1 }}\ndefault = {{ eu = 1, us = 1 }}\n\n[[pool.backend]]\naddr = \"{A}\"\nregion = \"eu\"\n[[pool.backend]]\naddr = \"{B}\"\nregion = \"eu\"\n[[pool.backend]]\naddr = \"{C}\"\nregion = \"us\"\n"
    )
}

#[test]
fn geo_clients_reach_their_region_and_spill_when_it_is_down() {
    let mut w = World::new(&geo_pool());
    assert_eq!(
        w.geo_targets("p", "10.1.0.7"),
        sas(&[A, B, C]),
        "eu keeps a small share on us"
    );
    let share = |w: &World, addr: &str| {
        let p = w.published_pool("p");
        let g = p.geo.as_ref().unwrap();
        let region = p.table_for("10.1.0.7".parse().unwrap()).1.unwrap();
        let weights = &g.weights[g.by_region[region.0 as usize] as usize];
        let i = p.backends.iter().position(|b| b.addr == sa(addr)).unwrap();
        weights[i] as f64 / weights.iter().map(|&x| f64::from(x)).sum::<f64>()
    };
    assert!(share(&w, C) < 0.02, "us gets ~1/201 of eu clients: {}", share(&w, C));
    w.advance(1000);
    w.check_round(&[A, B]);
    assert_eq!(
        w.geo_targets("p", "10.1.0.7"),
        sas(&[C]),
        "eu down: eu clients spill to us"
    );
    assert_eq!(w.geo_targets("p", "10.2.0.7"), sas(&[C]));
    w.advance(1000);
    w.check_round(&[]);
    assert!(share(&w, C) < 0.02, "back: eu clients return to eu");
}

#[test]
fn geo_tables_follow_operator_drains() {
    let mut w = World::new(&geo_pool());
    assert!(w.ctl(drain("p", C)).is_ok());
    assert_eq!(
        w.geo_targets("p", "10.2.0.9"),
        sas(&[A, B]),
        "us drained: us clients go to eu"
    );
    assert_eq!(w.geo_targets("p", "192.0.2.1"), sas(&[A, B]), "default row too");
}

#[test]
fn checks_start_on_time_from_the_queue_and_new_backends_are_found() {
    use crate::model::health::{CheckResult, FULL_CHECK_SCAN_EVERY};
    use std::time::Duration;
    let backends: Vec<(String, &str)> = (0..200)
        .map(|i| (format!("127.0.1.{}:{}", i % 250, 1000 + i), ""))
        .collect();
    let refs: Vec<(&str, &str)> = backends.iter().map(|(a, e)| (a.as_str(), *e)).collect();
    let text = one_pool(
        "[pool.health_check]\nkind = \"tcp\"\ninterval = \"1s\"\njitter = \"500ms\"\n",
        &refs,
    );
    let mut w = World::new(&text);
    let step = Duration::from_millis(10);
    let (t0, mut t) = (w.t0, w.t0);
    let mut checks = 0;
    let mut added_at = None;
    while t < t0 + Duration::from_secs(10) {
        t += step;
        if added_at.is_none() && t >= t0 + Duration::from_secs(5) {
            w.now = t;
            assert!(w.ctl(add("p", "127.0.2.1:9", None)).is_ok());
            added_at = Some(t);
        }
        let jobs = w.model.due_checks(t).checks;
        let mut seen = std::collections::HashSet::new();
        for job in jobs {
            assert!(seen.insert(job.epoch), "one check per backend at a time");
            let b = &w.model.pools[0].backends[job.index];
            assert_eq!(b.epoch, job.epoch);
            let is_new = b.config.addr.port() == 9;
            // Past the first round, every check comes off the queue on the
            // scan after it fell due, not at the next full scan.
            if t > t0 + Duration::from_secs(2) && !is_new {
                assert!(t - b.next_check < step, "late by {:?}", t - b.next_check);
            }
            if is_new && b.last_check.is_none() {
                // Not queued yet: the next full scan finds it.
                let late = t - b.next_check.max(added_at.unwrap());
                assert!(late <= FULL_CHECK_SCAN_EVERY + step, "new backend late by {late:?}");
            }
            let result = CheckResult {
                passed: Some(true),
                latency: Duration::from_millis(1),
                detail: "ok".into(),
            };
            let _ = w.model.record_check(&job, result, t);
            checks += 1;
        }
    }
    // 200 backends at 1 s + up to 0.5 s jitter for 10 s: 6-10 rounds each.
    assert!((200 * 6..=200 * 10 + 10).contains(&checks), "{checks} checks");
    let new = w.model.pools[0]
        .backends
        .iter()
        .find(|b| b.config.addr.port() == 9)
        .unwrap();
    assert!(new.last_check.is_some(), "the added backend was checked");
}

#[test]
fn a_protocol_checks_answer_is_the_reason_and_follows_the_server() {
    let text = one_pool(
        "[pool.health_check]\nkind = \"tcp\"\ninterval = \"1s\"\njitter = \"0s\"\nfall = 2\nrise = 2\n",
        &[(A, "")],
    );
    let mut w = World::new(&text);
    let step = |w: &mut World, ok: bool, detail: &str| -> String {
        w.advance(1000);
        assert_eq!(w.due(), 1);
        let fx = w.answer_with(A, Some(ok), detail);
        w.apply(fx);
        w.model.pools[0].backends[0].reason.clone()
    };
    assert_eq!(step(&mut w, true, "ok"), "configured", "a tcp check has nothing to add");
    assert_eq!(
        step(&mut w, true, "redis role is master"),
        "check passed: redis role is master"
    );
    let slave = "redis role is slave of 10.0.0.2:6379 (connected), want master";
    assert_eq!(
        step(&mut w, false, slave),
        "check passed: redis role is master",
        "one failure of fall 2"
    );
    assert_eq!(
        step(&mut w, false, slave),
        format!("2 consecutive failed checks: {slave}")
    );
    assert_eq!(
        step(&mut w, false, "connection refused"),
        "2 consecutive failed checks: connection refused",
        "still down: the reason follows the server"
    );
    step(&mut w, true, "redis role is master");
    assert_eq!(
        step(&mut w, true, "redis role is master"),
        "2 consecutive passed checks: redis role is master"
    );
}
