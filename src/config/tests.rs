//! Tests of config parsing and validation.

use super::*;
use std::time::Duration;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(text, Path::new("test.toml"))
}

fn errors(text: &str) -> Vec<String> {
    parse(text).unwrap_err().0.iter().map(|e| e.to_string()).collect()
}

const GOOD: &str = r#"
[runtime]
workers = 2
io_engine = "epoll"

[[listener]]
name = "web"
bind = "127.0.0.1:8080"
pool = "web"
hash_key = "src_ip"
connect_timeout = "150ms"

[[pool]]
name = "web"
[[pool.backend]]
addr = "127.0.0.1:9001"
[[pool.backend]]
addr = "[::1]:9002"
weight = 3
"#;

#[test]
fn good_config_with_defaults() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.runtime.workers, 2);
    assert_eq!(c.runtime.io_engine, IoEngineChoice::Epoll);
    let l = &c.listeners[0];
    assert_eq!(l.hash_key, HashKey::SrcIp);
    assert_eq!(l.connect_timeout, Duration::from_millis(150));
    assert_eq!(l.idle_timeout, Duration::from_secs(300));
    assert_eq!(l.backlog, 4096);
    assert_eq!(l.connect_attempts, 3);
    assert_eq!(l.relay, RelayMode::Auto);
    assert_eq!(l.max_connections, 0);
    assert!(l.rate_limit.is_none());
    let p = &c.pools[0];
    assert_eq!(p.table_size, 65537);
    assert_eq!(p.backends[0].weight, 1);
    assert_eq!(p.backends[1].weight, 3);
    assert_eq!(c.summary(), "1 listener(s), 1 pool(s), 2 backend(s), 2 worker(s)");
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let e = errors(&GOOD.replace("hash_key = \"src_ip\"", "hash_kye = \"src_ip\""));
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("test.toml: line 10, column 1: unknown field `hash_kye`"),
        "{e:?}"
    );
}

#[test]
fn toml_error_without_a_message_still_says_what_is_wrong() {
    // Found by fuzzing: toml reports a control character in a comment with an empty message.
    assert_eq!(
        errors("# demo\u{0}config\n[runtime]\n"),
        vec!["test.toml: line 1, column 7: invalid character '\\0' (control characters are not allowed)"]
    );
}

#[test]
fn bad_address_names_pool_and_backend() {
    let e = errors(&GOOD.replace("[::1]:9002", "localhost:9002"));
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("test.toml: pool \"web\": backend 2: addr: \"localhost:9002\""),
        "{e:?}"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
[[listener]]
name = "a"
bind = "127.0.0.1:80"
pool = "missing"
[[listener]]
name = "a"
bind = "127.0.0.1:80"
pool = "p"
idle_timeout = "10"
[[pool]]
name = "p"
table_size = 65536
[[pool.backend]]
addr = "127.0.0.1:1"
weight = 0
[[pool]]
name = "p"
[[pool.backend]]
addr = "127.0.0.1:2"
"#;
    let e = errors(text).join("\n");
    for needle in [
        "pool \"p\": table_size: 65536 is not prime",
        "pool \"p\": backend: every backend has weight 0",
        "pool \"p\": name: duplicate pool name",
        "listener \"a\": pool: no pool named \"missing\"",
        "listener \"a\": name: duplicate listener name",
        "listener \"a\": bind: 127.0.0.1:80 is already used by listener \"a\"",
        "listener \"a\": idle_timeout: \"10\" has no unit",
    ] {
        assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
    }
}

#[test]
fn bad_enums_and_ranges() {
    let e = errors(
        &GOOD
            .replace("io_engine = \"epoll\"", "io_engine = \"kqueue\"")
            .replace("workers = 2", "workers = 0"),
    );
    let e = e.join("\n");
    assert!(
        e.contains("runtime.io_engine: \"kqueue\": expected auto, uring or epoll"),
        "{e}"
    );
    assert!(e.contains("runtime.workers: 0 is out of range"), "{e}");
}

#[test]
fn duplicate_backend_and_port_zero() {
    let e = errors(&GOOD.replace("[::1]:9002", "127.0.0.1:9001")).join("\n");
    assert!(e.contains("backend 2: addr: 127.0.0.1:9001 is listed twice"), "{e}");
    let e = errors(&GOOD.replace("127.0.0.1:8080", "127.0.0.1:0")).join("\n");
    assert!(e.contains("listener \"web\": bind: \"127.0.0.1:0\": port 0"), "{e}");
}

#[test]
fn control_backend_request_uses_same_rules() {
    assert!(validate_backend_request("127.0.0.1:9", Some(2)).is_ok());
    let e = validate_backend_request("nope", None).unwrap_err().to_string();
    assert!(e.contains("<control>: backend: addr: \"nope\""), "{e}");
    let e = validate_backend_request("127.0.0.1:9", Some(-1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("weight: -1 is out of range"), "{e}");
}

#[test]
fn proxy_protocol_on_listeners_and_checks() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.listeners[0].proxy_protocol, ProxyProtocol::Off, "off unless asked");
    let on = GOOD.replace(
        "hash_key = \"src_ip\"",
        "hash_key = \"src_ip\"\nproxy_protocol = \"v2\"",
    );
    assert_eq!(parse(&on).unwrap().listeners[0].proxy_protocol, ProxyProtocol::V2);

    let e = errors(&GOOD.replace("hash_key = \"src_ip\"", "proxy_protocol = \"v3\"")).join("\n");
    assert!(e.contains("proxy_protocol: \"v3\": expected off, v1 or v2"), "{e}");
    let udp = GOOD.replace("hash_key = \"src_ip\"", "protocol = \"udp\"\nproxy_protocol = \"v1\"");
    let e = errors(&udp).join("\n");
    assert!(e.contains("proxy_protocol: v1 has no UDP form: use \"v2\""), "{e}");
    // v2 on UDP: a header on every datagram.
    let udp = GOOD.replace("hash_key = \"src_ip\"", "protocol = \"udp\"\nproxy_protocol = \"v2\"");
    assert_eq!(parse(&udp).unwrap().listeners[0].proxy_protocol, ProxyProtocol::V2);

    // Checks of PROXY-only backends open with the "our own connection" header.
    let check = |extra: &str| {
        let text = GOOD.replace(
            "name = \"web\"\n[[pool.backend]]",
            &format!("name = \"web\"\n[pool.health_check]\n{extra}\n[[pool.backend]]"),
        );
        parse(&text).map(|c| c.pools[0].health_check.kind.clone())
    };
    assert_eq!(
        check("send_proxy = \"v1\"").unwrap(),
        CheckKind::SendExpect {
            send: b"PROXY UNKNOWN\r\n".to_vec(),
            expect: Vec::new()
        }
    );
    let CheckKind::SendExpect { send, expect } =
        check("kind = \"send_expect\"\nsend = \"PING\\r\\n\"\nexpect = \"+PONG\"\nsend_proxy = \"v2\"").unwrap()
    else {
        panic!("send_expect expected");
    };
    assert_eq!(&send[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(&send[16..], b"PING\r\n");
    assert_eq!(expect, b"+PONG");
    let e = check("kind = \"none\"\nsend_proxy = \"v1\"").unwrap_err().0[0].to_string();
    assert!(
        e.contains("send_proxy: only applies to kind = \"tcp\" or \"send_expect\""),
        "{e}"
    );
}

#[test]
fn validation_takes_the_prefixes_file_as_text_and_reads_nothing() {
    let text = "[geo]\nprefixes_file = \"nowhere/regions.csv\"\n[[listener]]\nname = \"w\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool]]\nname = \"p\"\n[[pool.backend]]\naddr = \"127.0.0.1:2\"\nregion = \"eu\"\n";
    let file: file::ConfigFile = toml::from_str(text).unwrap();
    let given = validate::PrefixesFile {
        path: "nowhere/regions.csv".into(),
        text: Ok("10.1.0.0/16,eu\n".into()),
    };
    let config = validate(file, Path::new("t.toml"), Some(given)).unwrap();
    assert_eq!(config.geo.names.count(), 2, "default and eu");
    let file: file::ConfigFile = toml::from_str(text).unwrap();
    let unreadable = validate::PrefixesFile {
        path: "nowhere/regions.csv".into(),
        text: Err("No such file or directory".into()),
    };
    let err = validate(file, Path::new("t.toml"), Some(unreadable))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("t.toml")
            && err.contains("geo.prefixes_file")
            && err.contains("nowhere/regions.csv: No such file"),
        "{err}"
    );
}

#[test]
fn protocol_checks_parse_with_defaults_and_bad_keys_are_named() {
    let check = |extra: &str| {
        let text = GOOD.replace(
            "name = \"web\"\n[[pool.backend]]",
            &format!("name = \"web\"\n[pool.health_check]\n{extra}\n[[pool.backend]]"),
        );
        parse(&text).map(|c| c.pools[0].health_check.kind.clone())
    };
    let problems = |extra: &str| -> String {
        check(extra)
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        check("kind = \"http\"\npath = \"/primary\"\nport = 8008").unwrap(),
        CheckKind::Http(HttpCheck {
            method: "GET".into(),
            path: "/primary".into(),
            host: None,
            expect_status: StatusMatch::Class(2),
            expect_body: None,
        })
    );
    let CheckKind::Http(h) = check(
        "kind = \"http\"\nmethod = \"OPTIONS\"\npath = \"/replica\"\nhost = \"db1\"\nexpect_status = [200, 204]\nexpect_body = \"running\"",
    )
    .unwrap() else {
        panic!("http")
    };
    assert_eq!(h.method, "OPTIONS");
    assert_eq!(h.host.as_deref(), Some("db1"));
    assert_eq!(h.expect_status, StatusMatch::Codes(vec![200, 204]));
    assert_eq!(h.expect_body.as_deref(), Some(&b"running"[..]));
    assert!(
        matches!(check("kind = \"http\"\npath = \"/\"\nexpect_status = \"3xx\"").unwrap(), CheckKind::Http(h) if h.expect_status == StatusMatch::Class(3))
    );
    assert_eq!(
        check("kind = \"postgres\"\nuser = \"app\"").unwrap(),
        CheckKind::Postgres(PostgresCheck {
            user: "app".into(),
            database: None
        })
    );
    assert_eq!(
        check("kind = \"mysql\"").unwrap(),
        CheckKind::Mysql(MysqlCheck { user: None })
    );
    assert_eq!(
        check("kind = \"redis\"\nrole = \"replica\"").unwrap(),
        CheckKind::Redis(RedisCheck {
            role: Some(RedisRole::Replica),
            noauth_is_up: false
        })
    );

    // Each problem names the file, the key and what is wrong.
    for (extra, want) in [
        ("kind = \"http\"", "test.toml: pool \"web\": health_check.path: missing: kind = \"http\" needs the request path"),
        ("kind = \"http\"\npath = \"primary\"", "health_check.path: \"primary\": expected a path starting with /"),
        ("kind = \"http\"\npath = \"/\"\nexpect_status = \"2xy\"", "health_check.expect_status: \"2xy\": expected a list of statuses such as [200, 204] or a class such as \"2xx\""),
        ("kind = \"http\"\npath = \"/\"\nexpect_status = [200, 700]", "health_check.expect_status: 700: a status is 100 to 599"),
        ("kind = \"http\"\npath = \"/\"\nexpect_status = []", "health_check.expect_status: []: expected a list"),
        ("kind = \"http\"\npath = \"/\"\nmethod = \"GE T\"", "health_check.method: \"GE T\": expected an HTTP method"),
        ("kind = \"http\"\npath = \"/\"\nmethod = \"HEAD\"\nexpect_body = \"ok\"", "health_check.expect_body: a HEAD reply has no body"),
        ("kind = \"postgres\"", "health_check.user: missing: kind = \"postgres\" needs the user"),
        ("kind = \"postgres\"\nuser = \"\"", "health_check.user: \"\": must be 1 to 1024 bytes without NUL"),
        ("kind = \"redis\"\nrole = \"primary\"", "health_check.role: \"primary\": expected master or replica"),
        ("kind = \"redis\"\nrole = \"master\"\nnoauth_is_up = true", "health_check.noauth_is_up: cannot be combined with role"),
        ("kind = \"redis\"\npath = \"/\"", "health_check.path: only applies to kind = \"http\" (this check is kind = \"redis\")"),
        ("kind = \"tcp\"\nuser = \"x\"", "health_check.user: only applies to kind = \"postgres\" or kind = \"mysql\" (this check is kind = \"tcp\")"),
        ("kind = \"mysql\"\ndatabase = \"x\"", "health_check.database: only applies to kind = \"postgres\""),
        ("kind = \"http\"\npath = \"/\"\nrole = \"master\"", "health_check.role: only applies to kind = \"redis\""),
        ("kind = \"gopher\"", "\"gopher\": expected tcp, send_expect, udp_send_expect, http, postgres, mysql, redis or none"),
    ] {
        let got = problems(extra);
        assert!(got.contains(want), "{extra:?}:\n{got}\nshould contain\n{want}");
    }
}

#[test]
fn balance_keys_parse_with_their_defaults() {
    let p = &parse(GOOD).unwrap().pools[0];
    assert_eq!(p.balance, Balance::Maglev);
    assert_eq!(p.hash_balance_factor, None);
    assert_eq!(p.on_down, OnDown::Keep);
    assert_eq!(p.on_up, OnUp::Keep);
    assert!(!p.backends[0].backup);
    let text = GOOD.replace(
        "name = \"web\"\n[[pool.backend]]\naddr = \"127.0.0.1:9001\"\n",
        "name = \"web\"\nbalance = \"maglev\"\nhash_balance_factor = 125\non_down = \"close\"\non_up = \"close_backups\"\n[[pool.backend]]\naddr = \"127.0.0.1:9001\"\nbackup = true\n",
    );
    let p = &parse(&text).unwrap().pools[0];
    assert_eq!(p.hash_balance_factor, Some(125));
    assert_eq!(p.on_down, OnDown::Close);
    assert_eq!(p.on_up, OnUp::CloseBackups);
    assert!(p.backends[0].backup && !p.backends[1].backup);
    for (v, want) in [("least_conn", Balance::LeastConn), ("random_two", Balance::RandomTwo)] {
        let text = GOOD.replace(
            "name = \"web\"\n[[pool.backend]]",
            &format!("name = \"web\"\nbalance = \"{v}\"\n[[pool.backend]]"),
        );
        assert_eq!(parse(&text).unwrap().pools[0].balance, want);
    }
}

#[test]
fn bad_balance_keys_name_file_pool_key_and_problem() {
    let with = |lines: &str| {
        errors(&GOOD.replace(
            "name = \"web\"\n[[pool.backend]]",
            &format!("name = \"web\"\n{lines}\n[[pool.backend]]"),
        ))
    };
    assert_eq!(
        with("balance = \"leastconn\""),
        vec!["test.toml: pool \"web\": balance: \"leastconn\": expected \"maglev\", \"least_conn\" or \"random_two\""]
    );
    assert_eq!(
        with("hash_balance_factor = 100"),
        vec!["test.toml: pool \"web\": hash_balance_factor: 100 is out of range: a percent of the average load above 100 (101..=10000, e.g. 125)"]
    );
    assert_eq!(
        with("balance = \"least_conn\"\nhash_balance_factor = 125"),
        vec!["test.toml: pool \"web\": hash_balance_factor: only applies to balance = \"maglev\" (this pool has balance = \"least_conn\")"]
    );
    assert_eq!(
        with("on_down = \"shutdown\""),
        vec!["test.toml: pool \"web\": on_down: \"shutdown\": expected \"keep\" or \"close\""]
    );
    assert_eq!(
        with("on_up = \"close\""),
        vec!["test.toml: pool \"web\": on_up: \"close\": expected \"keep\" or \"close_backups\""]
    );
}
