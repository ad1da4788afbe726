//! Sessions on a failover and backup tiers: `on_down = "close"`,
//! `on_up = "close_backups"`, `backup = true`, panic over the primaries.

use super::harness::*;
use crate::protocol::Reply;

const A: &str = "10.0.0.1:80";
const B: &str = "10.0.0.2:80";
const C: &str = "10.0.0.3:80";
const K: &str = "10.0.0.9:80";

fn sas(addrs: &[&str]) -> Vec<std::net::SocketAddr> {
    addrs.iter().map(|a| sa(a)).collect()
}

/// Checked every second, one failure or pass flips a backend, no jitter.
const CHECKED: &str =
    "[pool.health_check]\nkind = \"tcp\"\ninterval = \"1s\"\njitter = \"0s\"\nfall = 1\nrise = 1\ntimeout = \"500ms\"\n";

fn pool(extra: &str, backends: &[(&str, &str)]) -> String {
    one_pool(&format!("{extra}\n{CHECKED}"), backends)
}

// === on_down ===

#[test]
fn on_down_close_closes_a_failed_backends_connections_at_the_rebuild() {
    let mut w = World::new(&pool("on_down = \"close\"", &[(A, ""), (B, "")]));
    w.open("p", A, 3);
    w.open("p", B, 2);
    w.advance(1000);
    w.check_round(&[A]);
    assert_eq!(w.in_table("p"), sas(&[B]));
    assert!(w.closing("p", A), "its connections are told to close");
    assert!(!w.closing("p", B));
    assert_eq!(w.close_checks, 1, "workers are told at once");
    assert_eq!(w.backend("p", A).sessions_closed.down, 3, "counted for the metrics");
    assert!(w.logged("backend 10.0.0.1:80 is down: closing its 3 open connection(s)"));
    // Still down: nothing more is closed or counted.
    w.advance(1000);
    w.check_round(&[A]);
    assert_eq!(w.close_checks, 1);
    assert_eq!(w.backend("p", A).sessions_closed.down, 3);
    // Back up: new connections to it must not be closed by a later check.
    w.close_all("p", A);
    w.advance(1000);
    w.check_round(&[]);
    assert_eq!(w.in_table("p"), sas(&[A, B]));
    assert!(
        !w.closing("p", A),
        "a backend back in the table keeps its new connections"
    );
}

#[test]
fn on_down_keep_is_the_default_and_closes_nothing() {
    let mut w = World::new(&pool("", &[(A, ""), (B, "")]));
    w.open("p", A, 3);
    w.advance(1000);
    w.check_round(&[A]);
    assert_eq!(w.in_table("p"), sas(&[B]));
    assert!(!w.closing("p", A));
    assert_eq!(w.close_checks, 0);
    assert_eq!(w.backend("p", A).sessions_closed.down, 0);
}

#[test]
fn on_down_close_covers_ejection_and_disable_but_not_drain() {
    let text = one_pool(
        "on_down = \"close\"\n[pool.outlier]\nconsecutive_failures = 3\nejection_time = \"1s\"\nmax_ejection_percent = 50\n",
        &[(A, ""), (B, ""), (C, "")],
    );
    let mut w = World::new(&text);
    w.open("p", A, 1);
    w.open("p", B, 4);
    w.open("p", C, 2);
    // Ejection.
    w.connect_failures("p", A, 3);
    w.advance(100);
    assert_eq!(w.state("p", A), "ejected");
    assert!(w.closing("p", A));
    assert_eq!(w.backend("p", A).sessions_closed.down, 1);
    // ctl disable: closed at once, not at the drain timeout.
    assert!(w.ctl(disable("p", B)).is_ok());
    assert!(w.closing("p", B), "disable closes at once with on_down = close");
    assert_eq!(w.backend("p", B).sessions_closed.down, 4);
    assert_eq!(w.close_checks, 2);
    // A drain keeps its connections until the deadline.
    assert!(w.ctl(enable("p", B)).is_ok());
    assert!(w.ctl(drain("p", C)).is_ok());
    assert!(!w.closing("p", C), "a drain is not a failure");
    assert_eq!(w.backend("p", C).sessions_closed.down, 0);
}

#[test]
fn panic_mode_keeps_the_connections_of_backends_still_in_the_table() {
    let mut w = World::new(&pool("on_down = \"close\"", &[(A, ""), (B, "")]));
    w.open("p", A, 1);
    w.open("p", B, 1);
    w.advance(1000);
    // Both down: 0% healthy < 50%, panic keeps both in the table.
    w.check_round(&[A, B]);
    assert!(w.model.pools[0].panic);
    assert_eq!(w.in_table("p"), sas(&[A, B]));
    assert!(!w.closing("p", A) && !w.closing("p", B));
}

// === backup tiers ===

#[test]
fn backups_take_nothing_while_a_primary_is_usable_then_everything() {
    let mut w = World::new(&pool(
        "",
        &[(A, ""), (B, ""), (K, "backup = true"), (C, "backup = true")],
    ));
    assert_eq!(w.in_table("p"), sas(&[A, B]), "backups wait");
    assert!(!w.published_pool("p").backup_tier);
    w.advance(1000);
    w.check_round(&[A]);
    assert_eq!(w.in_table("p"), sas(&[B]), "one primary is enough");
    w.advance(1000);
    w.check_round(&[A, B]);
    assert_eq!(w.in_table("p"), sas(&[K, C]), "no primary: the backups");
    assert!(w.published_pool("p").backup_tier);
    assert!(!w.model.pools[0].panic, "the backups are healthy: no panic");
    assert!(w.logged("no primary backend is healthy; the backup backends take the connections"));
    w.advance(1000);
    w.check_round(&[A, B, K]);
    assert_eq!(w.in_table("p"), sas(&[C]), "a backup down is out of the backup table");
    w.advance(1000);
    w.check_round(&[A, K]);
    assert_eq!(w.in_table("p"), sas(&[B]), "a primary back: the backups stop");
    assert!(!w.published_pool("p").backup_tier);
}

#[test]
fn the_backup_table_is_the_backups_own_maglev_table() {
    let mut w = World::new(&pool("", &[(A, ""), (K, "backup = true"), (C, "backup = true")]));
    w.advance(1000);
    w.check_round(&[A]);
    let p = w.published_pool("p");
    let t = p.table.as_ref().expect("a backup table");
    // The same table a pool of only the backups builds: deterministic.
    let ids = [(K.to_string(), 1000u32), (C.to_string(), 1000u32)];
    let alone = crate::maglev::MaglevTable::build(&ids, TABLE).unwrap();
    for h in 0..TABLE as u64 {
        let got = p.backends[t.lookup(h) as usize].addr;
        let want = sa(&ids[alone.lookup(h) as usize].0);
        assert_eq!(got, want, "hash {h}");
    }
}

#[test]
fn the_panic_threshold_counts_the_primaries_only() {
    // Two primaries of four backends: one primary down is 50% of the
    // primaries (not 75% of the pool): at a 60% threshold that panics.
    let mut w = World::new(&pool(
        "panic_threshold = 60",
        &[(A, ""), (B, ""), (K, "backup = true"), (C, "backup = true")],
    ));
    w.advance(1000);
    w.check_round(&[A]);
    assert!(w.model.pools[0].panic, "1 of 2 primaries healthy < 60%");
    assert_eq!(
        w.in_table("p"),
        sas(&[A, B]),
        "panic over the primaries, backups still out"
    );
}

#[test]
fn nothing_healthy_at_all_panics_over_the_primaries() {
    let mut w = World::new(&pool("", &[(A, ""), (K, "backup = true")]));
    w.advance(1000);
    w.check_round(&[A, K]);
    assert!(w.model.pools[0].panic);
    assert_eq!(w.in_table("p"), sas(&[A]));
    assert!(!w.published_pool("p").backup_tier);
}

#[test]
fn disabling_the_last_primary_is_allowed_when_a_backup_serves() {
    let mut w = World::new(&pool("", &[(A, ""), (K, "backup = true")]));
    assert!(matches!(w.ctl(disable("p", A)), Reply::Drain(_)));
    assert_eq!(w.in_table("p"), sas(&[K]));
}

// === on_up ===

#[test]
fn on_up_close_backups_closes_the_backups_when_a_primary_returns() {
    let mut w = World::new(&pool(
        "on_down = \"close\"\non_up = \"close_backups\"",
        &[(A, ""), (K, "backup = true")],
    ));
    w.advance(1000);
    w.check_round(&[A]);
    assert_eq!(w.in_table("p"), sas(&[K]));
    w.open("p", K, 5);
    w.close_all("p", A);
    w.advance(1000);
    w.check_round(&[]);
    assert_eq!(w.in_table("p"), sas(&[A]));
    assert!(w.closing("p", K), "the backup's connections are told to close");
    assert_eq!(w.backend("p", K).sessions_closed.primary_up, 5);
    assert_eq!(w.backend("p", K).sessions_closed.down, 0, "not counted as down");
    assert!(w.logged("a primary is back: closing 5 open connection(s) on backup 10.0.0.9:80"));
    // The next failover uses the backup again, and its new connections stay.
    w.close_all("p", K);
    w.advance(1000);
    w.check_round(&[A]);
    assert_eq!(w.in_table("p"), sas(&[K]));
    assert!(!w.closing("p", K));
}

#[test]
fn without_on_up_the_backups_keep_their_connections() {
    let mut w = World::new(&pool("", &[(A, ""), (K, "backup = true")]));
    w.advance(1000);
    w.check_round(&[A]);
    w.open("p", K, 5);
    w.advance(1000);
    w.check_round(&[]);
    assert_eq!(w.in_table("p"), sas(&[A]));
    assert!(!w.closing("p", K));
    assert_eq!(w.close_checks, 0);
}
