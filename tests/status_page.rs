//! The status page (`/`, `/status.json`) beside `/metrics`, checked over real HTTP and in
//! a real browser (headless Chromium driven through chromedriver), and `ctl top`
//! checked against `ctl stats`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// ringlb with a control socket, a metrics/status address and one pool of `backends`
/// (weights given) with fast TCP health checks.
struct Lb {
    _lb: Ringlb,
    _dir: TempDir,
    sock: PathBuf,
    listen: SocketAddr,
    http: SocketAddr,
}

fn start(backends: &[(SocketAddr, u32)]) -> Lb {
    let dir = TempDir::new("status");
    let sock = dir.0.join("ctl.sock");
    let listen = lb_addr();
    let http = lb_addr();
    let mut body = format!(
        "[[listener]]\nname = \"web\"\nbind = \"{listen}\"\npool = \"web\"\nconnect_timeout = \"1s\"\n\n[[pool]]\nname = \"web\"\ntable_size = 65537\n\n[pool.health_check]\ninterval = \"200ms\"\ntimeout = \"200ms\"\njitter = \"0s\"\nfall = 2\nrise = 2\n\n"
    );
    for (addr, w) in backends {
        body.push_str(&format!("[[pool.backend]]\naddr = \"{addr}\"\nweight = {w}\n"));
    }
    let cfg =
        config_with_control("auto", &sock, &body).replace("[control]\n", &format!("[control]\nmetrics = \"{http}\"\n"));
    let mut lb = Ringlb::start(&cfg, listen);
    lb.wait_listening(http);
    Lb {
        _lb: lb,
        _dir: dir,
        sock,
        listen,
        http,
    }
}

/// One HTTP/1.1 request; (status line, headers, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (String, String, String) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.unwrap_or("");
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

fn status_json(addr: SocketAddr) -> Value {
    let (status, _, body) = http(addr, "GET", "/status.json", None);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    serde_json::from_str(&body).unwrap()
}

fn backend(s: &Value, addr: SocketAddr) -> &Value {
    s["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == addr.to_string())
        .unwrap()
}

/// `/status.json` has the listeners, the pool and each backend's share of the Maglev
/// table (weights 1:1:2), rates once traffic flows, and a killed backend's state and
/// reason; `/` is one self-contained page; nothing but GET is taken.
#[test]
fn status_json_has_shares_rates_and_states() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let c = Backend::start("c", Behaviour::TagEcho);
    let (a_addr, b_addr, c_addr) = (a.addr, b.addr, c.addr);
    let lb = start(&[(a.addr, 1), (b.addr, 1), (c.addr, 2)]);
    let s = status_json(lb.http);
    assert_eq!(s["listeners"][0]["name"], "web", "{s}");
    assert_eq!(s["listeners"][0]["bind"], lb.listen.to_string(), "{s}");
    let p = &s["pools"][0];
    assert_eq!(p["name"], "web");
    assert_eq!(p["panic"], false);
    assert_eq!(p["fingerprint"].as_str().map(str::len), Some(16), "{p}");
    for (addr, want) in [(a_addr, 0.25), (b_addr, 0.25), (c_addr, 0.5)] {
        let share = backend(&s, addr)["share"].as_f64().unwrap();
        assert!((share - want).abs() < 0.01, "{addr}: share {share}, want {want}: {s}");
        assert_eq!(backend(&s, addr)["state"], "active");
    }
    // ctl backends carries the same share.
    let (_, v) = ctl_json(&lb.sock, &["backends"]);
    let row = v["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["addr"] == c_addr.to_string())
        .unwrap()
        .clone();
    assert_eq!(row["table_share"], backend(&s, c_addr)["share"], "{v}");

    // Traffic for a while, then the rates say so (two samples at least 1 s apart).
    let load = Load::start(lb.listen, 2);
    thread::sleep(Duration::from_millis(1300));
    let _ = status_json(lb.http);
    thread::sleep(Duration::from_millis(1100));
    let s = status_json(lb.http);
    let (n, _, secs) = load.finish();
    let rate = s["listeners"][0]["rates"]["accepted"].as_f64().unwrap();
    let window = s["rate_window_seconds"].as_f64().unwrap();
    assert!((1.0..=2.5).contains(&window), "{s}");
    assert!(
        rate > 0.3 * n as f64 / secs,
        "accepted/s {rate} against {n} in {secs:.1}s: {s}"
    );
    let conn_rates: f64 = [a_addr, b_addr, c_addr]
        .iter()
        .map(|&x| backend(&s, x)["rates"]["connections"].as_f64().unwrap())
        .sum();
    assert!(conn_rates > 0.0, "{s}");

    // A killed backend goes down with its reason, and the others share its slots.
    c.kill();
    assert!(
        wait_until(Duration::from_secs(5), || backend(&status_json(lb.http), c_addr)
            ["state"]
            == "down"),
        "{}",
        status_json(lb.http)
    );
    let s = status_json(lb.http);
    let dead = backend(&s, c_addr);
    assert!(dead["reason"].as_str().unwrap().contains("refused"), "{dead}");
    assert_eq!(dead["last_check"]["ok"], false, "{dead}");
    assert_eq!(dead["share"], 0.0, "{dead}");
    for addr in [a_addr, b_addr] {
        let share = backend(&s, addr)["share"].as_f64().unwrap();
        assert!((share - 0.5).abs() < 0.01, "{addr}: {share}: {s}");
    }

    // The page: HTML, self-contained, small, and it polls /status.json.
    let (status, headers, page) = http(lb.http, "GET", "/", None);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(headers.contains("content-type: text/html"), "{headers}");
    assert!(
        headers.contains("content-security-policy: default-src 'none'"),
        "{headers}"
    );
    assert!(page.len() < 100 * 1024, "{} bytes", page.len());
    assert!(page.contains("status.json") && page.contains("name=\"viewport\""));
    for external in ["src=\"http", "href=\"http", "src=\"//", "href=\"//", "@import", "url("] {
        assert!(
            !page.contains(external),
            "the page loads something from outside: {external}"
        );
    }
    // Read-only.
    for method in ["POST", "PUT", "DELETE"] {
        let (status, headers, _) = http(lb.http, method, "/status.json", Some("{}"));
        assert!(status.starts_with("HTTP/1.1 405"), "{method}: {status}");
        assert!(headers.contains("allow: get, head"), "{headers}");
    }
    let (status, _, metrics) = http(lb.http, "GET", "/metrics", None);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(metrics.contains("ringlb_backend_up{pool=\"web\""), "{metrics}");
    drop((a, b));
}

/// `ctl top --once` shows the counters `ctl stats` and `ctl backends` show (no traffic
/// in between), each backend's state and share, in plain text when stdout is a pipe.
#[test]
fn ctl_top_once_agrees_with_ctl_stats() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let lb = start(&[(a.addr, 1), (b.addr, 3)]);
    for _ in 0..40 {
        read_tag(lb.listen, None).unwrap();
    }
    wait_until(Duration::from_secs(2), || {
        ctl_json(&lb.sock, &["stats"]).1["listeners"][0]["active"] == 0
    });
    let (_, stats) = ctl_json(&lb.sock, &["stats"]);
    let (_, backends) = ctl_json(&lb.sock, &["backends"]);
    let started = Instant::now();
    let (code, text, err) = ctl_text(&lb.sock, &["top", "--once", "--interval", "0.3"]);
    assert_eq!(code, 0, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!text.contains('\x1b'), "escape codes in piped output: {text:?}");
    let l = &stats["listeners"][0];
    let web = text.lines().find(|x| x.starts_with("web ")).expect("listener line");
    let cols: Vec<&str> = web.split_whitespace().collect();
    assert_eq!(cols[1], l["active"].to_string(), "{web}");
    assert_eq!(cols[2], l["accepted"].to_string(), "{web}\n{stats}");
    let refused: u64 = l["refused"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(cols[6], refused.to_string(), "{web}");
    assert_eq!(cols[3], "0", "no traffic during the sample: {web}");
    let p = &backends["pools"][0];
    assert!(
        text.contains(&format!("pool web: table generation {}", p["table_generation"])),
        "{text}"
    );
    for row in p["backends"].as_array().unwrap() {
        let line = text
            .lines()
            .find(|x| x.trim_start().starts_with(row["addr"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{row} not in {text}"));
        let share = format!("{:.1}%", row["table_share"].as_f64().unwrap() * 100.0);
        assert!(line.contains(row["state"].as_str().unwrap()), "{line}");
        assert!(line.contains(&share), "{share} not in {line}");
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[2], row["weight"].to_string(), "{line}");
        assert_eq!(cols[5], row["active"].to_string(), "{line}");
    }
    assert!(text.contains("25.0%") && text.contains("75.0%"), "{text}");
    // An unreachable socket is exit 2, as for every ctl command.
    let (code, _, err) = ctl_text(&lb._dir.0.join("nope.sock"), &["top", "--once"]);
    assert_eq!(code, 2, "{err}");
    drop((a, b));
}

// === the browser ===

/// Minimal WebDriver client (JSON over HTTP) for chromedriver.
struct Driver {
    child: Child,
    addr: SocketAddr,
    session: String,
}

impl Driver {
    /// Starts chromedriver and a headless Chromium session, or says why it can't.
    fn start(log: &std::path::Path) -> Result<Driver, String> {
        let chromedriver =
            which("chromedriver").ok_or("chromedriver is not installed (apt-get install chromium-driver)")?;
        let chromium = ["chromium", "chromium-browser", "google-chrome"]
            .iter()
            .find_map(|b| which(b))
            .ok_or("chromium is not installed (apt-get install chromium)")?;
        let port = free_port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting chromedriver: {e}"))?;
        let mut d = Driver {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            session: String::new(),
        };
        if !wait_until(Duration::from_secs(10), || d.raw("GET", "/status", None).is_ok()) {
            return Err("chromedriver did not answer within 10 s".into());
        }
        let profile = log.with_extension("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--window-size=1280,900", format!("--user-data-dir={}", profile.display())],
        }}}});
        let v = d.raw("POST", "/session", Some(&caps))?;
        d.session = v["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session: {v}"))?
            .to_string();
        Ok(d)
    }

    fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let mut c = TcpStream::connect(self.addr).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let body = body.map(Value::to_string).unwrap_or_default();
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .map_err(|e| e.to_string())?;
        // chromedriver keeps the connection open whatever the request says: read the
        // head, then Content-Length bytes.
        let mut raw = Vec::new();
        let mut buf = [0u8; 65536];
        let (head_end, len) = loop {
            let n = c.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("{method} {path}: connection closed"));
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| format!("no content-length: {head}"))?;
                break (end + 4, len);
            }
        };
        while raw.len() < head_end + len {
            let n = c.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&raw[head_end..]);
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if v["value"].get("error").is_some() {
            return Err(format!("{method} {path}: {}", v["value"]));
        }
        Ok(v)
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.raw(method, &path, body.as_ref()).unwrap()["value"].take()
    }

    fn script(&self, js: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({"script": js, "args": []})))
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.raw("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| format!("{d}/{name}"))
        .find(|p| std::path::Path::new(p).is_file())
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 byte {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | (u32::from(val(c)) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// Rows as the page shows them: (address, state shown, share shown, whole row text).
const ROWS_JS: &str = "return Array.from(document.querySelectorAll('tr[data-backend]')).map(r => [r.dataset.backend, r.querySelector('.st').innerText, r.querySelector('.share span').innerText, r.innerText]);";

fn rows(d: &Driver) -> Vec<(String, String, f64, String)> {
    d.script(ROWS_JS)
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let share = r[2]
                .as_str()
                .unwrap_or("")
                .trim_end_matches('%')
                .parse()
                .unwrap_or(-1.0);
            (
                r[0].as_str().unwrap_or("").to_string(),
                r[1].as_str().unwrap_or("").to_string(),
                share,
                r[3].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// In headless Chromium: the page shows the three backends with their shares of the
/// table while a load runs; a backend is killed and, without a reload of the page,
/// it turns down with its reason within a few seconds and the shares rebalance.
/// Screenshots (desktop and phone width) go to target/test-artifacts/.
#[test]
fn browser_watches_a_failover() {
    let dir = TempDir::new("browser");
    let driver = match Driver::start(&dir.0.join("chromedriver.log")) {
        Ok(d) => d,
        Err(e) => {
            let log = std::fs::read_to_string(dir.0.join("chromedriver.log")).unwrap_or_default();
            let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
            if std::env::var_os("CI").is_some() {
                panic!("the browser test cannot run in CI: {e}\n{tail}");
            }
            println!("SKIPPED browser_watches_a_failover: {e} (fails under CI=true)");
            return;
        }
    };
    let a = Backend::start("a", Behaviour::TagEcho);
    let b = Backend::start("b", Behaviour::TagEcho);
    let c = Backend::start("c", Behaviour::TagEcho);
    let (a_addr, b_addr, c_addr) = (a.addr, b.addr, c.addr);
    let lb = start(&[(a.addr, 1), (b.addr, 2), (c.addr, 1)]);
    let load = Load::start(lb.listen, 2);
    driver.cmd("POST", "/url", Some(json!({"url": format!("http://{}/", lb.http)})));

    // Loaded: three active rows with shares 25 / 50 / 25 and traffic moving.
    let accepted_rate = || {
        driver
            .script("return document.querySelector('tr[data-listener=\"web\"]').children[5].innerText;")
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let ok = wait_until(Duration::from_secs(10), || {
        let r = rows(&driver);
        let rate = accepted_rate();
        r.len() == 3 && r.iter().all(|x| x.1 == "active") && rate.ends_with("/s") && rate != "0/s"
    });
    let r = rows(&driver);
    assert!(
        ok,
        "page never showed three active backends with traffic: {r:?}, accepted {}",
        accepted_rate()
    );
    let share_of = |r: &[(String, String, f64, String)], addr: SocketAddr| {
        r.iter().find(|x| x.0 == addr.to_string()).map(|x| x.2).unwrap()
    };
    assert!((share_of(&r, a_addr) - 25.0).abs() < 0.2, "{r:?}");
    assert!((share_of(&r, b_addr) - 50.0).abs() < 0.2, "{r:?}");
    assert!((share_of(&r, c_addr) - 25.0).abs() < 0.2, "{r:?}");
    let live = driver.script("return document.getElementById('conn').innerText;");
    assert_eq!(live, "live", "connection indicator");
    driver.screenshot("status-page-before.png");

    // Kill c; the same page (no reload) shows it down with the reason, 0% of the
    // table, and a and b at one third and two thirds.
    let killed = Instant::now();
    c.kill();
    let ok = wait_until(Duration::from_secs(6), || {
        let r = rows(&driver);
        r.iter()
            .any(|x| x.0 == c_addr.to_string() && x.1 == "down" && x.3.contains("refused"))
            && (share_of(&r, a_addr) - 33.3).abs() < 0.2
    });
    let seen_after = killed.elapsed();
    let r = rows(&driver);
    let shot = driver.screenshot("status-page-failover.png");
    assert!(ok, "page did not show the failover within 6 s: {r:?}");
    assert!((share_of(&r, b_addr) - 66.7).abs() < 0.2, "{r:?}");
    assert_eq!(share_of(&r, c_addr), 0.0, "{r:?}");
    println!(
        "browser: backend down on the page {seen_after:?} after the kill; screenshot {}",
        shot.display()
    );

    // Phone width: nothing wider than the screen but the scrollable tables.
    driver.cmd("POST", "/window/rect", Some(json!({"width": 390, "height": 844})));
    thread::sleep(Duration::from_millis(1200));
    let overflow = driver.script("return document.documentElement.scrollWidth - window.innerWidth;");
    assert!(
        overflow.as_i64().unwrap_or(1) <= 0,
        "page wider than a phone: {overflow}"
    );
    driver.screenshot("status-page-phone.png");
    let (n, failed, _) = load.finish();
    assert!(n > 50, "load too light: {n}");
    println!("browser: {n} connections during the test, {failed} failed around the kill");
    drop((a, b));
}

/// The demo's addresses are fixed, so the tests that run it take turns.
static DEMO: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether a fixed address of config/demo.toml is taken (another demo running): an
/// error under CI, else the test says it skips.
fn demo_ports_busy(test: &str) -> bool {
    let busy: Vec<String> = [
        "127.0.0.1:18080",
        "127.0.0.1:18081",
        "127.0.0.1:18082",
        "127.0.0.1:19001",
        "127.0.0.1:19002",
        "127.0.0.1:19003",
        "127.0.0.2:19100",
        "127.0.0.3:19100",
        "127.0.0.2:19108",
        "127.0.0.3:19108",
    ]
    .into_iter()
    .filter(|a| std::net::TcpListener::bind(a).is_err())
    .map(String::from)
    .collect();
    if busy.is_empty() {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the demo's addresses {busy:?} are taken by another process"
    );
    println!("SKIPPED {test}: the demo's addresses {busy:?} are in use (another demo running?)");
    true
}

/// Plain `ringlb demo` (the README's first command) tells the failover story after
/// the spread: sessions opened on the primary are all closed by ringlb (its own
/// counter says so too), the clients reach the new primary, and the time it took is
/// printed and short.
#[test]
fn demo_tells_the_failover_story() {
    let _one_demo = DEMO.lock().unwrap_or_else(|e| e.into_inner());
    if demo_ports_busy("demo_tells_the_failover_story") {
        return;
    }
    let out_path = std::env::temp_dir().join(format!("ringlb-test-demo-story-{}.out", std::process::id()));
    let err_path = out_path.with_extension("err");
    let mut child = Command::new(ringlb_bin())
        .arg("demo")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "demo still running after 60 s: {}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    assert!(status.success(), "{status}: {out}\n{err}");
    // The spread comes first, as before.
    assert!(out.contains("127.0.0.1:19003"), "{out}");
    let line = |needle: &str| -> &str {
        out.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}: {out}"))
    };
    let number = |l: &str, before: &str, after: &str| -> f64 {
        let from = l.find(before).unwrap_or_else(|| panic!("{before:?} in {l}")) + before.len();
        let rest = &l[from..];
        rest[..rest.find(after).unwrap_or_else(|| panic!("{after:?} in {l}"))]
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{e}: {l}"))
    };
    let header = line("demo: failover: pool \"db\"");
    assert!(header.contains("GET /primary on :19108"), "{header}");
    let opened = number(line("client sessions open through"), "demo: ", "client sessions");
    assert!(opened >= 1.0, "{out}");
    assert!(
        line("client sessions open through").contains("all on 127.0.0.2:19100 (the primary)"),
        "{out}"
    );
    let closed_line = line("ringlb closed the");
    let closed = number(closed_line, "ringlb closed the", "sessions on 127.0.0.2:19100");
    assert_eq!(closed, opened, "ringlb's count of closed sessions: {out}");
    assert!(
        closed_line.contains(&format!("{opened} of {opened} clients saw the end")),
        "{out}"
    );
    let closed_at = number(closed_line, "demo: +", " s:");
    let reached = line("reach 127.0.0.3:19100, the new primary");
    let took = number(reached, "failover took", " s)");
    assert!(took > 0.0 && took < 5.0, "failover time {took} s: {out}");
    assert!(
        closed_at > 0.0 && closed_at < 5.0,
        "sessions closed at +{closed_at} s: {out}"
    );
    println!("demo: {opened} sessions closed at +{closed_at} s, failover took {took} s");
}

/// `ringlb demo --keep-running` prints the page's address, keeps a load going with
/// one backend failing and recovering on its cycle (a short one here), all visible on
/// /status.json, and stops cleanly on Ctrl-C (SIGINT), ringlb with it.
#[test]
fn demo_keep_running_until_ctrl_c() {
    // The demo's addresses are fixed (config/demo.toml).
    let page: SocketAddr = "127.0.0.1:18081".parse().unwrap();
    let listen: SocketAddr = "127.0.0.1:18080".parse().unwrap();
    let _one_demo = DEMO.lock().unwrap_or_else(|e| e.into_inner());
    if demo_ports_busy("demo_keep_running_until_ctrl_c") {
        return;
    }
    let out_path = std::env::temp_dir().join(format!("ringlb-test-demo-{}.out", std::process::id()));
    let mut child = Command::new(ringlb_bin())
        .args(["demo", "--connections", "40", "--keep-running", "--fail-every", "6"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
    let child = Kill(&mut child);
    let output = || std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(20), || output().contains("keeping it running")),
        "{}",
        output()
    );
    assert!(
        output().contains("status page on http://127.0.0.1:18081/"),
        "{}",
        output()
    );
    // Traffic keeps flowing, and 127.0.0.1:19002 goes down, then comes back.
    let state = |s: &Value| -> String { s["pools"][0]["backends"][1]["state"].as_str().unwrap_or("").to_string() };
    let mut seen_down = false;
    let mut seen_back = false;
    let mut max_rate: f64 = 0.0;
    let deadline = Instant::now() + Duration::from_secs(25);
    while Instant::now() < deadline && !(seen_down && seen_back) {
        let s = status_json(page);
        assert_eq!(s["pools"][0]["backends"][1]["addr"], "127.0.0.1:19002");
        max_rate = max_rate.max(s["listeners"][0]["rates"]["accepted"].as_f64().unwrap_or(0.0));
        let st = state(&s);
        if st == "down" || st == "ejected" {
            seen_down = true;
        } else if seen_down && st == "active" {
            seen_back = true;
        }
        thread::sleep(Duration::from_millis(250));
    }
    assert!(
        seen_down && seen_back,
        "down {seen_down}, back {seen_back}: {}",
        output()
    );
    assert!(max_rate >= 5.0, "the gentle load: {max_rate}/s");
    // Ctrl-C: the demo and its ringlb stop.
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGINT);
    }
    let started = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = child.0.try_wait() {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "demo still running 10 s after SIGINT"
        );
        thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}: {}", output());
    assert!(wait_until(Duration::from_secs(5), || !is_listening(listen) && !is_listening(page)));
    let _ = std::fs::remove_file(&out_path);
}

/// A geo pool's status has one table per distinct client-region row, each with every
/// backend's share of it; the page renders them.
#[test]
fn geo_pools_show_their_region_tables() {
    let eu = Backend::start("eu", Behaviour::TagEcho);
    let us = Backend::start("us", Behaviour::TagEcho);
    let dir = TempDir::new("status-geo");
    let sock = dir.0.join("ctl.sock");
    let (listen, page) = (lb_addr(), lb_addr());
    let body = format!(
        "[geo]\nprefixes = {{ \"10.1.0.0/16\" = \"eu\", \"10.2.0.0/16\" = \"us\" }}\n\n[[listener]]\nname = \"web\"\nbind = \"{listen}\"\npool = \"web\"\n\n[[pool]]\nname = \"web\"\ntable_size = 65537\n[pool.geo]\neu = {{ eu = 1000, us = 1 }}\nus = {{ us = 1000, eu = 1 }}\ndefault = {{ eu = 1, us = 1 }}\n\n[[pool.backend]]\naddr = \"{}\"\nregion = \"eu\"\n[[pool.backend]]\naddr = \"{}\"\nregion = \"us\"\n",
        eu.addr, us.addr
    );
    let cfg =
        config_with_control("auto", &sock, &body).replace("[control]\n", &format!("[control]\nmetrics = \"{page}\"\n"));
    let mut lb = Ringlb::start(&cfg, listen);
    lb.wait_listening(page);
    let s = status_json(page);
    let p = &s["pools"][0];
    assert_eq!(p["backends"][0]["region"], "eu", "{p}");
    assert_eq!(p["backends"][1]["region"], "us", "{p}");
    // The default region's table is the pool's main share: half each.
    assert!((p["backends"][0]["share"].as_f64().unwrap() - 0.5).abs() < 0.01, "{p}");
    let table = |region: &str| -> Vec<f64> {
        p["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["client_regions"].as_array().unwrap().iter().any(|r| r == region))
            .unwrap_or_else(|| panic!("no table for {region}: {p}"))["shares"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_f64().unwrap())
            .collect()
    };
    assert!(table("eu")[0] > 0.99 && table("eu")[1] < 0.01, "{p}");
    assert!(table("us")[1] > 0.99 && table("us")[0] < 0.01, "{p}");
    assert!((table("default")[0] - 0.5).abs() < 0.01, "{p}");
    assert_eq!(p["regions"].as_array().unwrap().len(), 3, "{p}");
    drop((eu, us));
}

/// Loopback by default; `[control] metrics` on another address logs a warning that the
/// page is readable by anyone who reaches it (and it is still read-only).
#[test]
fn metrics_off_loopback_logs_a_warning() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let listen = lb_addr();
    let port = free_port();
    let body = format!(
        "[runtime]\nworkers = 1\n\n[control]\nmetrics = \"0.0.0.0:{port}\"\n\n[[listener]]\nname = \"web\"\nbind = \"{listen}\"\npool = \"web\"\n\n[[pool]]\nname = \"web\"\ntable_size = 1021\n[[pool.backend]]\naddr = \"{}\"\n",
        a.addr
    );
    let mut lb = Ringlb::start_logged(&body, listen, &[("RUST_LOG", "warn")]);
    let page = SocketAddr::from(([127, 0, 0, 1], port));
    lb.wait_listening(page);
    let log = lb.log_text();
    assert!(
        log.contains(&format!("control.metrics 0.0.0.0:{port} is not a loopback address")),
        "{log}"
    );
    let (status, _, _) = http(page, "POST", "/", Some("{}"));
    assert!(status.starts_with("HTTP/1.1 405"), "{status}");
    drop(a);
}
