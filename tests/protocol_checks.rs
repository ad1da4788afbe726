//! Health checks that speak the protocol (`kind = "http" | "postgres" | "mysql" |
//! "redis"`) through the real binary, against real PostgreSQL, MariaDB and Redis
//! servers from the distribution's packages, started here in temp dirs on free ports
//! and killed at the end even when a test fails. A test whose server binary is missing
//! prints why and returns; nothing else makes it skip.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

// === servers ===

/// A server process, stopped on drop: `stop_signal`, then SIGKILL after 5s.
struct Server {
    name: &'static str,
    child: Child,
    stop_signal: i32,
    log: PathBuf,
}

impl Server {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it now (immediately for PostgreSQL: SIGQUIT), waiting up to 5s.
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped.
            unsafe { libc::kill(self.pid(), self.stop_signal) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log_text());
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `cmd` as `user` when running as root (the servers refuse root, or should not run
/// as it), via setpriv so that the child is the server itself (signals reach it).
fn as_user(user: &str, program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={user}"),
            &format!("--regid={user}"),
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn chown_to(user: &str, dir: &Path) {
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", &format!("{user}:"), dir.to_str().unwrap()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "chown {user} {}", dir.display());
    }
}

/// Waits until `addr` accepts a TCP connection (the servers' own readiness).
fn wait_accepting(addr: SocketAddr, within: Duration, server: &mut Server) {
    let deadline = Instant::now() + within;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("{} exited: {status}\n{}", server.name, server.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "{} did not listen on {addr}:\n{}",
            server.name,
            server.log_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn find_binary(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

fn skip(why: &str) {
    eprintln!("SKIPPED: {why}");
}

// === ringlb ===

/// The state and reason `ctl backends` shows for `addr` in `pool`.
fn seen(lb: &Controlled, pool: &str, addr: SocketAddr) -> (String, String) {
    let (code, v) = ctl_json(&lb.sock, &["backends", pool]);
    assert_eq!(code, 0, "{v}");
    let b = v["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == addr.to_string())
        .cloned()
        .unwrap_or_default();
    let last = b["last_check"]["detail"].as_str().unwrap_or("").to_string();
    (
        b["state"].as_str().unwrap_or("?").to_string(),
        format!("{} | last check: {last}", b["reason"].as_str().unwrap_or("")),
    )
}

/// Waits until `ctl backends` shows `addr` in `pool` in `state` with a reason
/// containing `reason`; panics with what it showed last.
fn expect_state(
    lb: &Controlled,
    pool: &str,
    addr: SocketAddr,
    state: &str,
    reason: &str,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let mut last = (String::new(), String::new());
    let ok = wait_until(within, || {
        last = seen(lb, pool, addr);
        last.0 == state && last.1.contains(reason)
    });
    assert!(
        ok,
        "pool {pool}: {addr} should be {state} with a reason containing {reason:?}; it is {} ({})",
        last.0, last.1
    );
    started.elapsed()
}

/// Short checks, so that a test takes a few seconds: up after 2 passes, down after 2
/// failures at 150ms.
fn check_block(kind_lines: &str) -> String {
    format!("[pool.health_check]\n{kind_lines}\ninterval = \"150ms\"\ntimeout = \"1s\"\nrise = 2\nfall = 2\njitter = \"10ms\"\n")
}

/// A ringlb config with one listener per pool (`pool name`, its check lines, its
/// backends as `(addr, check_addr)`).
/// A pool for [`start_lb`]: name, check lines, backends as `(addr, check_addr)`.
type PoolSpec<'a> = (&'a str, String, Vec<(SocketAddr, Option<SocketAddr>)>);

fn start_lb(pools: &[PoolSpec<'_>]) -> (Controlled, Vec<SocketAddr>) {
    let mut body = String::new();
    let mut listens = Vec::new();
    for (name, check, backends) in pools {
        let listen = lb_addr();
        listens.push(listen);
        body.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"{listen}\"\npool = \"{name}\"\nconnect_timeout = \"500ms\"\n\n[[pool]]\nname = \"{name}\"\n{}\n[pool.outlier]\nconsecutive_failures = 0\n",
            check_block(check)
        ));
        for (addr, check_addr) in backends {
            body.push_str(&format!("[[pool.backend]]\naddr = \"{addr}\"\n"));
            if let Some(c) = check_addr {
                body.push_str(&format!("check_addr = \"{c}\"\n"));
            }
        }
    }
    let lb = start_controlled("auto", &body, listens[0]);
    for l in &listens[1..] {
        assert!(
            wait_until(Duration::from_secs(10), || is_listening(*l)),
            "{l} listening"
        );
    }
    (lb, listens)
}

// === PostgreSQL ===

fn pg_bin(name: &str) -> Option<PathBuf> {
    let dirs = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    let mut versions: Vec<PathBuf> = dirs.filter_map(|d| d.ok().map(|d| d.path())).collect();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .map(|v| v.join("bin").join(name))
        .find(|p| p.exists())
}

struct Pg {
    server: Server,
    data: PathBuf,
    port: u16,
}

impl Pg {
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn start(name: &'static str, data: &Path, port: u16, settings: &[&str]) -> Pg {
        let log = data.parent().unwrap().join(format!("{name}.log"));
        let mut cmd = as_user("postgres", &pg_bin("postgres").unwrap());
        cmd.arg("-D")
            .arg(data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"]);
        cmd.arg("-c")
            .arg(format!("unix_socket_directories={}", data.parent().unwrap().display()));
        for s in settings {
            cmd.args(["-c", s]);
        }
        let logf = std::fs::File::create(&log).unwrap();
        cmd.stdout(logf.try_clone().unwrap()).stderr(logf).stdin(Stdio::null());
        let mut server = Server {
            name,
            child: cmd.spawn().expect("start postgres"),
            stop_signal: libc::SIGQUIT,
            log,
        };
        wait_accepting(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(30),
            &mut server,
        );
        Pg {
            server,
            data: data.to_path_buf(),
            port,
        }
    }

    /// `psql -Atc sql` over the Unix socket.
    fn psql(&self, sql: &str) -> Command {
        let mut c = as_user("postgres", Path::new("/usr/bin/psql"));
        c.arg("-h").arg(self.data.parent().unwrap()).args([
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-Atc",
            sql,
        ]);
        c
    }

    fn query(&self, sql: &str) -> Option<String> {
        let out = self.psql(sql).stdin(Stdio::null()).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// A Patroni-like REST endpoint for one PostgreSQL: `GET /primary` is 200 while the
/// server answers `pg_is_in_recovery()` with `f`, else 503; `/replica` the reverse.
/// It asks the real server on every request, as Patroni does.
fn patroni(pg_dir: PathBuf, pg_port: u16) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut line = String::new();
            let _ = BufReader::new(conn.try_clone().unwrap()).read_line(&mut line);
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut c = as_user("postgres", Path::new("/usr/bin/psql"));
            c.arg("-h").arg(&pg_dir).args([
                "-p",
                &pg_port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Atc",
                "select pg_is_in_recovery()",
            ]);
            let role = match c.stdin(Stdio::null()).output() {
                Ok(o) if o.status.success() && o.stdout.starts_with(b"f") => Some("master"),
                Ok(o) if o.status.success() => Some("replica"),
                _ => None,
            };
            let ok = matches!(
                (path.as_str(), role),
                ("/primary", Some("master")) | ("/replica", Some("replica"))
            );
            let body = format!("{{\"role\": \"{}\"}}", role.unwrap_or("unknown"));
            let status = if ok { "200 OK" } else { "503 Service Unavailable" };
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    addr
}

#[test]
fn postgres_checks_tell_ready_from_refusing_and_patroni_checks_follow_a_promotion() {
    let (Some(initdb), Some(basebackup)) = (pg_bin("initdb"), pg_bin("pg_basebackup")) else {
        return skip("PostgreSQL is not installed (apt-get install postgresql)");
    };
    let dir = TempDir::new("pg");
    chown_to("postgres", &dir.0);
    let primary_data = dir.0.join("primary");
    run(as_user("postgres", &initdb)
        .arg("-D")
        .arg(&primary_data)
        .args(["-A", "trust", "-U", "postgres", "--no-sync"]));
    // Few connections, none reserved, so that a handful of sessions fill it (53300).
    let limits = [
        "max_connections=5",
        "superuser_reserved_connections=0",
        "fsync=off",
        // A killed client's session ends within this, not when its query does.
        "client_connection_check_interval=100ms",
    ];
    let primary = Pg::start("postgres primary", &primary_data, free_port(), &limits);
    // A user that must authenticate with SCRAM: its check is answered with an
    // authentication request.
    run(&mut primary.psql("create role app login password 'secret'"));
    let hba = primary_data.join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("host all app 127.0.0.1/32 scram-sha-256\n{rules}")).unwrap();
    run(&mut primary.psql("select pg_reload_conf()"));
    let standby_data = dir.0.join("standby");
    run(as_user("postgres", &basebackup)
        .arg("-h")
        .arg(&dir.0)
        .args([
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "-D",
        ])
        .arg(&standby_data));
    let mut standby_settings = limits.to_vec();
    standby_settings.push("hot_standby=on");
    let standby = Pg::start("postgres standby", &standby_data, free_port(), &standby_settings);
    assert!(
        wait_until(Duration::from_secs(20), || standby
            .query("select pg_is_in_recovery()")
            .as_deref()
            == Some("t")),
        "the standby is in recovery and answers"
    );
    let patroni_primary = patroni(dir.0.clone(), primary.port);
    let patroni_standby = patroni(dir.0.clone(), standby.port);

    let (lb, listens) = start_lb(&[
        (
            "pg",
            "kind = \"postgres\"\nuser = \"postgres\"\ndatabase = \"postgres\"".into(),
            vec![(primary.addr(), None), (standby.addr(), None)],
        ),
        (
            "auth",
            "kind = \"postgres\"\nuser = \"app\"".into(),
            vec![(primary.addr(), None)],
        ),
        (
            "rw",
            "kind = \"http\"\npath = \"/primary\"".into(),
            vec![
                (primary.addr(), Some(patroni_primary)),
                (standby.addr(), Some(patroni_standby)),
            ],
        ),
        (
            "ro",
            "kind = \"http\"\nmethod = \"GET\"\npath = \"/replica\"\nexpect_status = [200]\nexpect_body = \"replica\""
                .into(),
            vec![
                (primary.addr(), Some(patroni_primary)),
                (standby.addr(), Some(patroni_standby)),
            ],
        ),
    ]);
    const RW: usize = 2;
    const RO: usize = 3;
    let t = Duration::from_secs(10);
    expect_state(
        &lb,
        "pg",
        primary.addr(),
        "active",
        "postgres ready for query as postgres",
        t,
    );
    expect_state(
        &lb,
        "auth",
        primary.addr(),
        "active",
        "postgres asks user app for SASL (SCRAM) authentication",
        t,
    );
    expect_state(
        &lb,
        "pg",
        standby.addr(),
        "active",
        "postgres ready for query as postgres",
        t,
    );
    expect_state(&lb, "rw", primary.addr(), "active", "http 200 from /primary", t);
    expect_state(
        &lb,
        "rw",
        standby.addr(),
        "down",
        "http 503 from /primary (want 2xx)",
        t,
    );
    expect_state(
        &lb,
        "ro",
        standby.addr(),
        "active",
        "http 200 from /replica, body has",
        t,
    );
    expect_state(
        &lb,
        "ro",
        primary.addr(),
        "down",
        "http 503 from /replica (want 200)",
        t,
    );
    // A client of the rw listener reaches the primary (its port, asked through ringlb).
    let through = |listen: SocketAddr| -> String {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &listen.port().to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Atc",
            ])
            .arg("show port")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(wait_until(t, || through(listens[RW]) == primary.port.to_string()));
    assert!(wait_until(t, || through(listens[RO]) == standby.port.to_string()));

    // The checks end their sessions cleanly, with Terminate or by leaving during
    // authentication: nothing about them in the server's log.
    let log = primary.server.log_text();
    for noise in [
        "incomplete startup packet",
        "invalid length of startup packet",
        "unexpected EOF",
        "Connection reset by peer",
        "password authentication failed",
        "expected password response",
    ] {
        assert!(!log.contains(noise), "{noise:?} in the primary's log:\n{log}");
    }

    // Fill the primary's connection slots: the check gets 53300 and says so.
    // More than the slots: the checks and the Patroni-like endpoint take slots
    // for a moment too, and a holder that finds none exits.
    let mut holders: Vec<Child> = (0..8)
        .map(|_| {
            primary
                .psql("select pg_sleep(60)")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    expect_state(
        &lb,
        "pg",
        primary.addr(),
        "down",
        "postgres 53300: sorry, too many clients already",
        t,
    );
    for h in &mut holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    expect_state(&lb, "pg", primary.addr(), "active", "postgres ready for query", t);

    // Failover: the primary stops, the standby is promoted; the rw pool follows.
    let primary_addr = primary.addr();
    let primary_port = primary.port;
    drop(primary);
    let promoted = Instant::now();
    run(&mut standby.psql("select pg_promote()"));
    expect_state(&lb, "rw", standby.addr(), "active", "http 200 from /primary", t);
    let took = promoted.elapsed();
    expect_state(&lb, "rw", primary_addr, "down", "http 503 from /primary", t);
    expect_state(&lb, "pg", primary_addr, "down", "connection refused", t);
    assert!(
        wait_until(t, || through(listens[RW]) == standby.port.to_string()),
        "{}",
        through(listens[RW])
    );
    eprintln!("rw pool on the promoted standby {took:?} after pg_promote()");

    // The old primary comes back in recovery without hot standby: PostgreSQL refuses
    // connections with 57P03, and the postgres check says so.
    std::fs::write(primary_data.join("standby.signal"), "").unwrap();
    chown_to("postgres", &primary_data);
    let mut not_accepting = limits.to_vec();
    not_accepting.push("hot_standby=off");
    let old = Pg::start("postgres old primary", &primary_data, primary_port, &not_accepting);
    expect_state(
        &lb,
        "pg",
        old.addr(),
        "down",
        "postgres 57P03: the database system is not accepting connections",
        t,
    );
    // The check ended its sessions cleanly: no protocol complaints in the logs.
    for log in [old.server.log_text(), standby.server.log_text()] {
        assert!(
            !log.contains("incomplete startup packet")
                && !log.contains("invalid length of startup packet")
                && !log.contains("unexpected EOF")
                && !log.contains("Connection reset by peer"),
            "{log}"
        );
    }
}

// === Redis ===

fn redis_server() -> Option<PathBuf> {
    find_binary(&["/usr/bin/redis-server", "/usr/local/bin/redis-server"])
}

fn start_redis(name: &'static str, dir: &Path, port: u16, extra: &[&str]) -> Server {
    let log = dir.join(format!("{name}.log").replace(' ', "-"));
    let mut cmd = as_user("redis", &redis_server().unwrap());
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
    ])
    .arg(dir)
    .args(["--logfile", log.to_str().unwrap(), "--daemonize", "no"])
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let mut s = Server {
        name,
        child: cmd.spawn().expect("start redis-server"),
        stop_signal: libc::SIGTERM,
        log,
    };
    wait_accepting(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(10),
        &mut s,
    );
    s
}

/// One command, one reply line (enough for the simple replies used here).
fn redis(addr: SocketAddr, command: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{command}\r\nQUIT\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn redis_role_checks_follow_the_master_through_a_promotion() {
    if redis_server().is_none() {
        return skip("redis-server is not installed (apt-get install redis-server)");
    }
    let dir = TempDir::new("redis");
    chown_to("redis", &dir.0);
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let a = SocketAddr::from(([127, 0, 0, 1], pa));
    let b = SocketAddr::from(([127, 0, 0, 1], pb));
    let locked = SocketAddr::from(([127, 0, 0, 1], pc));
    let _ma = start_redis("redis a", &dir.0, pa, &[]);
    let _mb = start_redis("redis b", &dir.0, pb, &["--replicaof", "127.0.0.1", &pa.to_string()]);
    let _mc = start_redis("redis with a password", &dir.0, pc, &["--requirepass", "secret"]);
    let (lb, listens) = start_lb(&[
        (
            "rw",
            "kind = \"redis\"\nrole = \"master\"".into(),
            vec![(a, None), (b, None)],
        ),
        (
            "ro",
            "kind = \"redis\"\nrole = \"replica\"".into(),
            vec![(a, None), (b, None)],
        ),
        (
            "auth",
            "kind = \"redis\"\nnoauth_is_up = true".into(),
            vec![(locked, None)],
        ),
        ("strict", "kind = \"redis\"".into(), vec![(locked, None)]),
    ]);
    let t = Duration::from_secs(10);
    expect_state(&lb, "rw", a, "active", "redis role is master", t);
    expect_state(
        &lb,
        "rw",
        b,
        "down",
        &format!("redis role is slave of 127.0.0.1:{pa}"),
        t,
    );
    expect_state(&lb, "ro", b, "active", "redis role is slave", t);
    expect_state(&lb, "ro", a, "down", "redis role is master, want replica", t);
    expect_state(&lb, "auth", locked, "active", "redis requires AUTH", t);
    expect_state(
        &lb,
        "strict",
        locked,
        "down",
        "redis -NOAUTH Authentication required",
        t,
    );
    // Clients of the rw listener reach the master.
    let port_through = |listen: SocketAddr| redis(listen, "CONFIG GET port");
    assert!(
        wait_until(t, || port_through(listens[0]).contains(&format!("\r\n{pa}\r\n"))),
        "{}",
        port_through(listens[0])
    );

    // Promote b, demote a: the pools follow without Sentinel.
    assert!(redis(b, "REPLICAOF NO ONE").starts_with("+OK"));
    let promoted = Instant::now();
    assert!(redis(a, &format!("REPLICAOF 127.0.0.1 {pb}")).starts_with("+OK"));
    expect_state(&lb, "rw", b, "active", "redis role is master", t);
    let took = promoted.elapsed();
    expect_state(&lb, "rw", a, "down", "want master", t);
    expect_state(
        &lb,
        "ro",
        a,
        "active",
        &format!("redis role is slave of 127.0.0.1:{pb}"),
        t,
    );
    // The table is rebuilt and published just after the state change.
    assert!(
        wait_until(t, || port_through(listens[0]).contains(&format!("\r\n{pb}\r\n"))),
        "{}",
        port_through(listens[0])
    );
    // What an operator reads: the REASON column says what each server answered.
    let (_, text, _) = ctl_text(&lb.sock, &["backends", "rw"]);
    let line = |addr: SocketAddr| {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{addr} ")))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        line(b).contains("2 consecutive passed checks: redis role is master"),
        "{text}"
    );
    assert!(
        line(a).contains(&format!(
            "2 consecutive failed checks: redis role is slave of 127.0.0.1:{pb}"
        )),
        "{text}"
    );
    eprintln!("rw pool on the promoted replica {took:?} after REPLICAOF NO ONE");
}

/// The failover the issue asks for, against real Redis: a pool that follows the
/// writable server (`role = "master"`) with `on_down = "close"`. When the master
/// is demoted, ringlb closes the sessions still open on it within fall x interval
/// (+ one rebuild tick and slack), so clients do not go on writing to a read-only
/// replica, and their reconnections reach the new master.
#[test]
fn redis_failover_closes_the_demoted_masters_sessions_and_clients_reconnect_to_the_new_one() {
    if redis_server().is_none() {
        return skip("redis-server is not installed (apt-get install redis-server)");
    }
    let dir = TempDir::new("redis-failover");
    chown_to("redis", &dir.0);
    let (pa, pb) = (free_port(), free_port());
    let a = SocketAddr::from(([127, 0, 0, 1], pa));
    let b = SocketAddr::from(([127, 0, 0, 1], pb));
    let _ma = start_redis("redis a", &dir.0, pa, &[]);
    let _mb = start_redis("redis b", &dir.0, pb, &["--replicaof", "127.0.0.1", &pa.to_string()]);
    let listen = lb_addr();
    let body = format!(
        "[[listener]]\nname = \"rw\"\nbind = \"{listen}\"\npool = \"rw\"\nconnect_timeout = \"500ms\"\n\n\
         [[pool]]\nname = \"rw\"\npanic_threshold = 0\non_down = \"close\"\n{}\n[pool.outlier]\nconsecutive_failures = 0\n\
         [[pool.backend]]\naddr = \"{a}\"\n[[pool.backend]]\naddr = \"{b}\"\n",
        check_block("kind = \"redis\"\nrole = \"master\"")
    );
    let lb = start_controlled("auto", &body, listen);
    let t = Duration::from_secs(10);
    expect_state(&lb, "rw", a, "active", "redis role is master", t);
    expect_state(&lb, "rw", b, "down", "redis role is slave", t);

    // Five application sessions, held open, all on the master.
    let mut sessions: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut s = TcpStream::connect(listen).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"CONFIG GET port\r\n").unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).unwrap();
            let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(reply.contains(&format!("\r\n{pa}\r\n")), "session on a: {reply:?}");
            s
        })
        .collect();

    // The failover: b promoted, a demoted. Without on_down = "close" the sessions
    // stay on a (now a read-only replica) and the reads below time out.
    assert!(redis(b, "REPLICAOF NO ONE").starts_with("+OK"));
    let flipped = Instant::now();
    assert!(redis(a, &format!("REPLICAOF 127.0.0.1 {pb}")).starts_with("+OK"));
    let mut closed_after = Vec::new();
    for s in &mut sessions {
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!(
                "a session on the demoted master was not closed: {other:?} after {:?}",
                flipped.elapsed()
            ),
        }
        closed_after.push(flipped.elapsed());
    }
    let last_closed = *closed_after.iter().max().unwrap();
    // fall (2) x interval (150 ms) + the rebuild tick (100 ms) + slack for a loaded machine.
    assert!(last_closed < Duration::from_secs(3), "closed after {closed_after:?}");
    // Reconnecting clients reach the new master.
    let mut reached = None;
    while flipped.elapsed() < t {
        if redis(listen, "CONFIG GET port").contains(&format!("\r\n{pb}\r\n")) {
            reached = Some(flipped.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let reached = reached.expect("no connection reached the new master within 10 s");
    let metrics_reason = ctl_text(&lb.sock, &["backends", "rw"]).1;
    eprintln!(
        "failover: 5 sessions on the demoted master closed {:?}..{last_closed:?} after the role change; first new connection on the new master after {reached:?}\n{metrics_reason}",
        closed_after.iter().min().unwrap()
    );
}

// === MariaDB / MySQL ===

fn mariadbd() -> Option<PathBuf> {
    find_binary(&["/usr/sbin/mariadbd", "/usr/sbin/mysqld"])
}

struct Maria {
    server: Server,
    socket: PathBuf,
}

/// A fresh MariaDB in `dir` on `bind:port`, with users `check` (no password, any host)
/// and `pw` (a password), `max_connections`, `max_connect_errors`. `netns` runs it in
/// that network namespace.
fn start_mariadb(
    dir: &Path,
    bind: &str,
    port: u16,
    max_connections: u32,
    max_connect_errors: u32,
    netns: Option<&str>,
) -> Maria {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    chown_to("mysql", dir);
    let mut install = Command::new("mariadb-install-db");
    install
        .arg(format!("--datadir={}", data.display()))
        .args(["--skip-test-db", "--auth-root-authentication-method=socket"]);
    if is_root() {
        install.arg("--user=mysql");
    }
    run(&mut install);
    let socket = dir.join("mysqld.sock");
    let log = dir.join("mariadb.log");
    let args: Vec<String> = vec![
        "--no-defaults".into(),
        format!("--datadir={}", data.display()),
        format!("--port={port}"),
        format!("--bind-address={bind}"),
        format!("--socket={}", socket.display()),
        format!("--pid-file={}", dir.join("mysqld.pid").display()),
        format!("--log-error={}", log.display()),
        format!("--max-connections={max_connections}"),
        format!("--max-connect-errors={max_connect_errors}"),
        "--innodb-buffer-pool-size=16M".into(),
        "--skip-log-bin".into(),
    ];
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args([
                "netns",
                "exec",
                ns,
                "setpriv",
                "--reuid=mysql",
                "--regid=mysql",
                "--init-groups",
                "--",
            ]);
            c.arg(mariadbd().unwrap());
            c
        }
        None => as_user("mysql", &mariadbd().unwrap()),
    };
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut server = Server {
        name: "mariadb",
        child: cmd.spawn().expect("start mariadbd"),
        stop_signal: libc::SIGTERM,
        log,
    };
    // Ready when the socket answers (works from outside a namespace too).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new("mariadb")
            .arg(format!("--socket={}", socket.display()))
            .args(["-u", "root", "-e", "select 1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            break;
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("mariadbd exited: {status}\n{}", server.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "mariadb did not start:\n{}",
            server.log_text()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let m = Maria { server, socket };
    m.sql("CREATE USER 'check'@'%'; CREATE USER 'pw'@'%' IDENTIFIED BY 'secret'; GRANT USAGE ON *.* TO 'check'@'%';");
    m
}

impl Maria {
    fn sql(&self, sql: &str) -> String {
        run(Command::new("mariadb")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-u", "root", "-N", "-B", "-e", sql]))
    }
}

/// The first packet a MariaDB sends a new TCP connection: its greeting, or an error.
fn mysql_greeting(addr: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    p
}

#[test]
fn mysql_checks_log_in_and_report_errors_with_their_codes() {
    if mariadbd().is_none() {
        return skip("MariaDB is not installed (apt-get install mariadb-server)");
    }
    let dir = TempDir::new("maria");
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // 10 is MariaDB's least max_connections.
    let maria = start_mariadb(&dir.0, "127.0.0.1", port, 10, 100, None);
    let (lb, listens) = start_lb(&[
        ("my", "kind = \"mysql\"\nuser = \"check\"".into(), vec![(addr, None)]),
        ("anon", "kind = \"mysql\"".into(), vec![(addr, None)]),
        ("pw", "kind = \"mysql\"\nuser = \"pw\"".into(), vec![(addr, None)]),
    ]);
    let t = Duration::from_secs(10);
    expect_state(&lb, "my", addr, "active", "accepted user check", t);
    expect_state(
        &lb,
        "anon",
        addr,
        "active",
        "Access denied for user 'ringlb-health-check'",
        t,
    );
    expect_state(&lb, "pw", addr, "active", "Access denied for user 'pw'", t);
    // A client through ringlb reaches the real server.
    let through = run(Command::new("mariadb").args([
        "-h",
        "127.0.0.1",
        "-P",
        &listens[0].port().to_string(),
        "-u",
        "check",
        "-N",
        "-e",
        "select @@port",
    ]));
    assert_eq!(through.trim(), port.to_string());

    // Fill the connections (max_connections, plus the one MariaDB keeps for SUPER):
    // the greeting becomes "1040 Too many connections".
    let mut holders: Vec<Child> = (0..11)
        .map(|_| {
            Command::new("mariadb")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-P",
                    &port.to_string(),
                    "-u",
                    "check",
                    "-e",
                    "select sleep(60)",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    expect_state(&lb, "my", addr, "down", "mysql 1040 Too many connections", t);
    for h in &mut holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    expect_state(&lb, "my", addr, "active", "accepted user check", t);
    // A handshake ended early is logged so (and counted against the host).
    let log = maria.server.log_text();
    assert!(
        !log.contains("closed normally without authentication"),
        "the checks end their sessions cleanly:\n{log}"
    );
}

/// A network namespace of this test's own, deleted on drop, whose lo also holds
/// `10.213.0.1` and `10.213.0.2`: connections between them are local but not from
/// 127.0.0.1, which MariaDB exempts from its per-host connect-error count.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Option<Netns> {
        let name = format!("rlb-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        let ns = Netns(name);
        // Names for the two addresses, for processes started with `ip netns exec`
        // (it mounts /etc/netns/NAME/hosts over /etc/hosts): MariaDB keeps a host in
        // its cache, and counts its errors, only when the name lookup gives an
        // answer; without DNS in the namespace it would be a temporary failure.
        let etc = ns.etc();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("hosts"),
            "127.0.0.1 localhost\n10.213.0.1 lb.test\n10.213.0.2 other.test\n",
        )
        .unwrap();
        // On lo: the kernel has no dummy devices everywhere (containers).
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", "10.213.0.1/32", "dev", "lo"],
            &["addr", "add", "10.213.0.2/32", "dev", "lo"],
        ] {
            run(Command::new("ip").args(["-n", &ns.0]).args(args));
        }
        Some(ns)
    }

    fn etc(&self) -> PathBuf {
        PathBuf::from(format!("/etc/netns/{}", self.0))
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on an open namespace descriptor; it changes only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = std::fs::remove_dir_all(self.etc());
    }
}

#[test]
fn mysql_checks_do_not_get_ringlb_blocked_by_max_connect_errors() {
    if mariadbd().is_none() {
        return skip("MariaDB is not installed (apt-get install mariadb-server)");
    }
    if !is_root() {
        return skip("needs root for a network namespace (MariaDB never blocks loopback clients)");
    }
    let Some(ns) = Netns::new("my") else {
        return skip("could not create a network namespace (ip netns add)");
    };
    let dir = TempDir::new("maria-mce");
    let port = 3306;
    let server = SocketAddr::from(([10, 213, 0, 1], port));
    let maria = start_mariadb(&dir.0, "10.213.0.1", port, 20, 3, Some(&ns.0));
    // The server blocks a host that ends handshakes early, here after 3: greetings
    // read and dropped from 10.213.0.2 block it (the test would not show
    // anything if they did not).
    let blocked = ns.run(move || {
        for _ in 0..4 {
            // One at a time: the server counts an abort when it sees the close.
            thread::sleep(Duration::from_millis(100));
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::from(([10, 213, 0, 2], 0)).into()).unwrap();
            s.connect(&server.into()).unwrap();
            let mut s: TcpStream = s.into();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
        }
        thread::sleep(Duration::from_millis(300));
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([10, 213, 0, 2], 0)).into()).unwrap();
        s.connect(&server.into()).unwrap();
        let mut s: TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 512];
        let n = s.read(&mut buf).unwrap();
        buf.truncate(n);
        buf
    });
    assert!(
        String::from_utf8_lossy(&blocked).contains("is blocked because of many connection errors"),
        "{}",
        String::from_utf8_lossy(&blocked)
    );

    // ringlb in the namespace, its checks from 10.213.0.1, many more than 3, with and
    // without a user: the server never blocks it.
    let ctl_dir = TempDir::new("maria-mce-lb");
    let sock = ctl_dir.0.join("ctl.sock");
    let mut body = String::new();
    for (name, user) in [("my", "user = \"check\"\n"), ("anon", ""), ("pw", "user = \"pw\"\n")] {
        body.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:{}\"\npool = \"{name}\"\n[[pool]]\nname = \"{name}\"\n[pool.health_check]\nkind = \"mysql\"\n{user}interval = \"50ms\"\njitter = \"5ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\n[[pool.backend]]\naddr = \"{server}\"\n",
            free_port()
        ));
    }
    let config = ctl_dir.file("ringlb.toml", &config_with_control("auto", &sock, &body));
    let mut lb = ns.run(move || {
        Command::new(ringlb_bin())
            .args(["run", "-c"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    });
    let checks_for = Duration::from_secs(3);
    let started = Instant::now();
    let mut reasons = Vec::new();
    while started.elapsed() < checks_for {
        thread::sleep(Duration::from_millis(500));
        reasons.clear();
        for pool in ["my", "anon", "pw"] {
            let (code, v) = ctl_json(&sock, &["backends", pool]);
            if code == 0 {
                let b = &v["pools"][0]["backends"][0];
                reasons.push(format!("{pool}: {} {}", b["state"], b["last_check"]["detail"]));
            }
        }
    }
    let _ = lb.kill();
    let _ = lb.wait();
    assert_eq!(reasons.len(), 3, "ctl answered: {reasons:?}");
    assert!(
        reasons[0].contains("\"active\"") && reasons[0].contains("accepted user check"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("\"active\"") && reasons[1].contains("Access denied"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("\"active\"") && reasons[2].contains("Access denied"),
        "{reasons:?}"
    );
    let connections = maria.sql("SHOW GLOBAL STATUS LIKE 'Connections'");
    let aborted = maria.sql("SHOW GLOBAL STATUS LIKE 'Aborted_connects'");
    eprintln!("{connections}; {aborted}");
    // And a new connection from ringlb's address still gets the greeting.
    let greeting = ns.run(move || mysql_greeting(server));
    assert_eq!(greeting[0], 10, "{}", String::from_utf8_lossy(&greeting));
}

// === validation ===

#[test]
fn a_bad_protocol_check_is_refused_by_check_and_by_reload_with_file_key_and_problem() {
    let (_hold, refusing) = refusing_addr();
    let (lb, _) = start_lb(&[("db", "kind = \"tcp\"".into(), vec![(refusing, None)])]);
    let good = std::fs::read_to_string(&lb.lb.config).unwrap();
    let bad = good.replace(
        "kind = \"tcp\"",
        "kind = \"redis\"\nrole = \"primary\"\npath = \"/primary\"",
    );
    assert_ne!(good, bad);
    std::fs::write(&lb.lb.config, &bad).unwrap();
    let file = lb.lb.config.display().to_string();
    let wants = [
        format!("{file}: pool \"db\": health_check.role: \"primary\": expected master or replica"),
        format!(
            "{file}: pool \"db\": health_check.path: only applies to kind = \"http\" (this check is kind = \"redis\")"
        ),
    ];
    // ringlb check: exit 1 and both problems.
    let out = ringlb_cmd(&["check", "-c", &file]);
    let said = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    for want in &wants {
        assert!(said.contains(want.as_str()), "check should say {want:?}:\n{said}");
    }
    // Reload: refused with the same words; the running config stays.
    let (code, v) = ctl_json(&lb.sock, &["reload"]);
    assert_ne!(code, 0, "{v}");
    let text = v.to_string().replace("\\\"", "\"");
    for want in &wants {
        assert!(text.contains(want.as_str()), "reload should say {want:?}:\n{text}");
    }
    assert_eq!(ctl_json(&lb.sock, &["status"]).1["config_generation"], 1);
}

// === HTTP details ===

/// An HTTP endpoint that answers every request with `status` and `body` and
/// records each request's head.
fn http_endpoint(
    status: &'static str,
    body: &'static str,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut head = String::new();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            log.lock().unwrap().push(head);
            let _ =
                conn.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
        }
    });
    (addr, seen)
}

#[test]
fn http_checks_honour_port_method_host_and_expectations() {
    let (health, requests) = http_endpoint("204 No Content", "");
    let (running, _) = http_endpoint("200 OK", "{\"state\": \"running\", \"role\": \"replica\"}");
    // The service port itself is something else: only `port` leads to the endpoint.
    let service = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let port_line = |p: SocketAddr| format!("port = {}", p.port());
    let (lb, _) = start_lb(&[
        (
            "port",
            format!(
                "kind = \"http\"\n{}\nmethod = \"OPTIONS\"\npath = \"/health?x=1\"\nexpect_status = [200, 204]",
                port_line(health)
            ),
            vec![(service, None)],
        ),
        (
            "class",
            format!(
                "kind = \"http\"\n{}\npath = \"/health\"\nhost = \"db1.example\"\nexpect_status = \"2xx\"",
                port_line(health)
            ),
            vec![(service, None)],
        ),
        (
            "list",
            format!(
                "kind = \"http\"\n{}\npath = \"/health\"\nexpect_status = [200]",
                port_line(health)
            ),
            vec![(service, None)],
        ),
        (
            "body",
            format!(
                "kind = \"http\"\n{}\npath = \"/read-only\"\nexpect_body = \"\\\"role\\\": \\\"master\\\"\"",
                port_line(running)
            ),
            vec![(service, None)],
        ),
    ]);
    let t = Duration::from_secs(10);
    expect_state(&lb, "port", service, "active", "http 204 from /health?x=1", t);
    expect_state(&lb, "class", service, "active", "http 204 from /health", t);
    expect_state(&lb, "list", service, "down", "http 204 from /health (want 200)", t);
    expect_state(
        &lb,
        "body",
        service,
        "down",
        "http 200 from /read-only, body does not contain \"\\\"role\\\": \\\"master\\\"\"",
        t,
    );
    let heads = requests.lock().unwrap().clone();
    let options = heads
        .iter()
        .find(|h| h.starts_with("OPTIONS "))
        .expect("an OPTIONS request");
    assert!(options.starts_with("OPTIONS /health?x=1 HTTP/1.1\r\n"), "{options}");
    assert!(
        options.contains(&format!("Host: 127.0.0.1:{}\r\n", health.port())),
        "{options}"
    );
    assert!(options.contains("Connection: close\r\n"), "{options}");
    assert!(
        heads
            .iter()
            .any(|h| h.starts_with("GET /health HTTP/1.1\r\n") && h.contains("Host: db1.example\r\n")),
        "{heads:?}"
    );
}
