//! `[control] state_file` through the real binary: drains and disables
//! survive a restart, a corrupt, foreign or rule-breaking file is logged and
//! ignored whole, and a restart keeps what a reload keeps.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;

struct Setup {
    dir: TempDir,
    backends: Vec<Backend>,
    listen: SocketAddr,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: TempDir::new("state"),
            backends: ["a", "b", "c"]
                .iter()
                .map(|t| Backend::start(t, Behaviour::TagEcho))
                .collect(),
            listen: lb_addr(),
        }
    }

    fn sock(&self) -> std::path::PathBuf {
        self.dir.0.join("ctl.sock")
    }

    fn state(&self) -> std::path::PathBuf {
        self.dir.0.join("state.json")
    }

    /// The config listing `backends` (indexes into self.backends).
    fn config(&self, engine: &str, backends: &[usize]) -> String {
        let mut c = format!(
            "[runtime]\nworkers = 2\nio_engine = \"{engine}\"\nshutdown_timeout = \"2s\"\n\n[control]\nsocket = \"{}\"\nstate_file = \"{}\"\n\n[[listener]]\nname = \"t\"\nbind = \"{}\"\npool = \"p\"\n\n[[pool]]\nname = \"p\"\n",
            self.sock().display(),
            self.state().display(),
            self.listen
        );
        for &i in backends {
            c.push_str(&format!("[[pool.backend]]\naddr = \"{}\"\n", self.backends[i].addr));
        }
        c
    }

    fn start(&self, engine: &str, backends: &[usize]) -> Ringlb {
        Ringlb::start_logged(&self.config(engine, backends), self.listen, &[("RUST_LOG", "info")])
    }

    fn state_of(&self, i: usize) -> String {
        backend_info(&self.sock(), "p", self.backends[i].addr)["state"]
            .as_str()
            .unwrap_or("?")
            .to_string()
    }

    /// Tags of the backends that 60 new connections reached.
    fn reached(&self) -> std::collections::BTreeSet<String> {
        (0..60).map(|_| read_tag(self.listen, None).unwrap()).collect()
    }
}

fn stop(mut lb: Ringlb) -> String {
    lb.signal(libc::SIGTERM);
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), Some(0));
    lb.log_text()
}

fn file_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn survives_a_restart(engine: &str) {
    let s = Setup::new();
    let lb = s.start(engine, &[0, 1, 2]);
    assert!(!s.state().exists(), "nothing is written before a change");
    let sock = s.sock();
    assert_eq!(ctl_json(&sock, &["drain", "p", &s.backends[0].addr.to_string()]).0, 0);
    assert_eq!(ctl_json(&sock, &["disable", "p", &s.backends[1].addr.to_string()]).0, 0);
    let written = file_json(&s.state());
    assert_eq!(written["format"], "ringlb-state");
    assert_eq!(written["backends"].as_array().unwrap().len(), 2, "{written}");
    // A weight set with ctl is not kept: a reload would put the file's back.
    assert_eq!(
        ctl_json(&sock, &["weight", "p", &s.backends[2].addr.to_string(), "5"]).0,
        0
    );
    assert_eq!(file_json(&s.state()), written);
    let log = stop(lb);
    assert!(log.contains("none yet"), "{log}");

    let lb = s.start(engine, &[0, 1, 2]);
    assert_eq!(s.state_of(0), "draining");
    assert_eq!(s.state_of(1), "disabled");
    assert_eq!(s.state_of(2), "active");
    assert_eq!(backend_info(&sock, "p", s.backends[2].addr)["weight"], 1);
    // What a client sees: only the backend in service answers.
    assert_eq!(s.reached(), ["c".to_string()].into());
    assert!(
        lb.log_text().contains("restored 2 operator state(s)"),
        "{}",
        lb.log_text()
    );

    // Enable is written too, and survives the next restart.
    assert_eq!(ctl_json(&sock, &["enable", "p", &s.backends[0].addr.to_string()]).0, 0);
    assert_eq!(file_json(&s.state())["backends"].as_array().unwrap().len(), 1);
    stop(lb);
    let lb = s.start(engine, &[0, 1, 2]);
    assert_eq!(s.state_of(0), "active");
    assert_eq!(s.state_of(1), "disabled");
    assert_eq!(s.reached(), ["a".to_string(), "c".to_string()].into());
    stop(lb);
}

#[test]
fn drains_and_disables_survive_a_restart_uring() {
    survives_a_restart("uring");
}

#[test]
fn drains_and_disables_survive_a_restart_epoll() {
    survives_a_restart("epoll");
}

#[test]
fn a_corrupt_or_foreign_state_file_is_logged_and_ignored() {
    let s = Setup::new();
    let cases: [(&str, &str); 4] = [
        (
            "{\"format\":\"ringlb-state\",\"version\":1,\"backends\":[{\"pool\":\"p\",",
            "not valid JSON",
        ),
        ("{\"servers\": []}", "not a ringlb state file"),
        (
            "{\"format\":\"ringlb-state\",\"version\":99,\"backends\":[]}",
            "version 99",
        ),
        ("\u{0}\u{1}binary", "not valid JSON"),
    ];
    for (text, why) in cases {
        std::fs::write(s.state(), text).unwrap();
        let lb = s.start("epoll", &[0, 1, 2]);
        for i in 0..3 {
            assert_eq!(s.state_of(i), "active");
        }
        let log = stop(lb);
        assert!(log.contains(why) && log.contains("ignored"), "{why}: {log}");
    }
    // The next change replaces the corrupt file with a good one.
    let lb = s.start("epoll", &[0, 1, 2]);
    assert_eq!(
        ctl_json(&s.sock(), &["drain", "p", &s.backends[0].addr.to_string()]).0,
        0
    );
    assert_eq!(file_json(&s.state())["backends"][0]["state"], "draining");
    stop(lb);
}

#[test]
fn a_state_file_is_never_applied_in_part() {
    let s = Setup::new();
    // Every backend drained or disabled: the pool rules refuse it (as ctl
    // and reload do), so none of it is applied, not the first two entries.
    let entries: Vec<serde_json::Value> = s
        .backends
        .iter()
        .map(|b| serde_json::json!({"pool": "p", "addr": b.addr.to_string(), "state": "disabled"}))
        .collect();
    let doc = serde_json::json!({"format": "ringlb-state", "version": 1, "backends": entries});
    std::fs::write(s.state(), doc.to_string()).unwrap();
    let lb = s.start("epoll", &[0, 1, 2]);
    for i in 0..3 {
        assert_eq!(s.state_of(i), "active");
    }
    assert_eq!(s.reached().len(), 3);
    let log = stop(lb);
    assert!(
        log.contains("would break the pool rules") && log.contains("ignored"),
        "{log}"
    );
}

#[test]
fn a_restart_keeps_what_a_reload_keeps() {
    let s = Setup::new();
    let lb = s.start("epoll", &[0, 1, 2]);
    let sock = s.sock();
    assert_eq!(ctl_json(&sock, &["drain", "p", &s.backends[0].addr.to_string()]).0, 0);
    assert_eq!(ctl_json(&sock, &["disable", "p", &s.backends[2].addr.to_string()]).0, 0);
    stop(lb);
    // The file no longer lists backend c: as on a reload, its state goes
    // with it, and the rest is restored.
    let lb = s.start("epoll", &[0, 1]);
    assert_eq!(s.state_of(0), "draining");
    assert_eq!(s.state_of(1), "active");
    assert_eq!(s.reached(), ["b".to_string()].into());
    let log = lb.log_text();
    assert!(
        log.contains("restored 1 operator state(s)") && log.contains("dropped as a reload drops them"),
        "{log}"
    );
    // A reload that removes a drained backend writes the file without it.
    std::fs::write(&lb.config, s.config("epoll", &[1])).unwrap();
    assert_eq!(ctl_json(&sock, &["reload"]).0, 0);
    assert_eq!(file_json(&s.state())["backends"].as_array().unwrap().len(), 0);
    stop(lb);
}

#[test]
fn check_names_a_state_file_in_a_missing_directory() {
    let s = Setup::new();
    let text = s
        .config("epoll", &[0])
        .replace(&s.state().display().to_string(), "/nonexistent-ringlb-dir/state.json");
    let path = s.dir.file("bad.toml", &text);
    let out = ringlb_cmd(&["check", "-c", path_str(&path)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("control.state_file") && stderr.contains("/nonexistent-ringlb-dir"),
        "{stderr}"
    );
}
