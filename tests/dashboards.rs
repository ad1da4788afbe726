//! config/grafana-dashboard.json and config/prometheus-alerts.yml: every query names
//! metrics and labels a live ringlb exports; the rules and the dashboard's queries
//! parse (promtool check rules) and the alerts fire as their unit tests say
//! (promtool test rules config/prometheus-alerts.test.yml).

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

fn config_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config").join(name)
}

/// The /metrics text of a ringlb with a TCP listener (connection limit, rate limit)
/// and a UDP listener, so that every family has samples.
fn live_metrics() -> String {
    let a = Backend::start("a", Behaviour::TagEcho);
    let dir = TempDir::new("dash");
    let sock = dir.0.join("ctl.sock");
    let (listen, udp, metrics) = (lb_addr(), lb_addr(), lb_addr());
    let body = format!(
        "[[listener]]\nname = \"web\"\nbind = \"{listen}\"\npool = \"web\"\nmax_connections = 100\n\n[listener.rate_limit]\nper_source_rate = 100\nmax_sources = 1000\n\n\
         [[listener]]\nname = \"dns\"\nbind = \"{udp}\"\nprotocol = \"udp\"\npool = \"dns\"\nmax_flows = 1000\n\n\
         [[pool]]\nname = \"web\"\ntable_size = 1021\n[pool.health_check]\ninterval = \"200ms\"\n[[pool.backend]]\naddr = \"{}\"\nmax_connections = 50\n\n\
         [[pool]]\nname = \"dns\"\ntable_size = 1021\n[[pool.backend]]\naddr = \"127.0.0.1:9\"\n",
        a.addr
    );
    let cfg = config_with_control("auto", &sock, &body)
        .replace("[control]\n", &format!("[control]\nmetrics = \"{metrics}\"\n"));
    let mut lb = Ringlb::start(&cfg, listen);
    lb.wait_listening(metrics);
    read_tag(listen, None).unwrap();
    let mut c = std::net::TcpStream::connect(metrics).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// Metric names with samples in `text`, and every label name used.
fn exported(text: &str) -> (HashSet<String>, HashSet<String>) {
    let mut names = HashSet::new();
    let mut labels: HashSet<String> = ["instance", "job"].into_iter().map(String::from).collect();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name_end = line.find(['{', ' ']).unwrap();
        names.insert(line[..name_end].to_string());
        if let Some(rest) = line[name_end..].strip_prefix('{') {
            for pair in rest.split('}').next().unwrap().split(',') {
                labels.insert(pair.split('=').next().unwrap().to_string());
            }
        }
    }
    (names, labels)
}

/// `ringlb_*` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("ringlb_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Label names in `by (...)`, `on (...)`, `without (...)` and selectors `{a="x",b=~"y"}`.
fn label_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for kw in ["by (", "on (", "without (", "ignoring ("] {
        for part in expr.split(kw).skip(1) {
            for l in part.split(')').next().unwrap().split(',') {
                out.insert(l.trim().to_string());
            }
        }
    }
    for part in expr.split('{').skip(1) {
        let selector = part.split('}').next().unwrap();
        for m in selector.split(',') {
            let name = m.split(['=', '!']).next().unwrap().trim();
            if !name.is_empty() {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// Every `expr` of the dashboard's panels (rows' nested panels too), with its panel title.
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((p["title"].as_str().unwrap_or("").to_string(), e.to_string()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(config_file("prometheus-alerts.yml")).unwrap();
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).expect("prometheus-alerts.yml parses as YAML");
    let mut out = Vec::new();
    for g in rules["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let name = r["alert"].as_str().expect("every rule is an alert").to_string();
            let expr = r["expr"].as_str().expect("expr").to_string();
            assert!(r["labels"]["severity"].as_str().is_some(), "{name}: no severity label");
            assert!(r["annotations"]["summary"].as_str().is_some(), "{name}: no summary");
            out.push((name, expr));
        }
    }
    out
}

/// Grafana's variables replaced by what Prometheus would see.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$instance", ".*")
        .replace("$listener", ".*")
        .replace("$pool", ".*")
}

/// Whether promtool is here; under CI it must be (the test fails rather than skips).
fn promtool() -> Option<&'static str> {
    let ok = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing (Debian package prometheus; .ci/run installs it)"
        );
        println!("SKIPPED the promtool checks: promtool is not installed (apt-get install prometheus)");
    }
    ok.then_some("promtool")
}

/// Every metric and label the dashboard and the alert rules use is one a live
/// ringlb exports (histograms by their _bucket/_sum/_count series).
#[test]
fn queries_use_only_exported_metrics_and_labels() {
    let text = live_metrics();
    let (names, labels) = exported(&text);
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(config_file("grafana-dashboard.json")).unwrap()).unwrap();
    let mut exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    exprs.extend(alert_exprs());
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (title, expr) in &exprs {
        let metrics = metric_names(expr);
        if metrics.is_empty() {
            problems.push(format!("{title}: no ringlb metric in {expr}"));
        }
        for m in metrics {
            if !names.contains(&m) {
                problems.push(format!("{title}: {m} is not exported"));
            }
            used.insert(m);
        }
        for l in label_names(&substitute(expr)) {
            if !labels.contains(&l) {
                problems.push(format!("{title}: label {l} is not exported"));
            }
        }
    }
    assert!(problems.is_empty(), "{}\n\nexported: {names:?}", problems.join("\n"));
    // The golden signals the issue names are all there.
    for m in [
        "ringlb_listener_connections_accepted_total",
        "ringlb_listener_connections_refused_total",
        "ringlb_backend_connect_duration_seconds_bucket",
        "ringlb_listener_connections_max",
        "ringlb_listener_flows_max",
        "ringlb_listener_sources_tracked",
        "ringlb_backend_state",
        "ringlb_pool_panic",
        "ringlb_pool_table_build_failures_total",
        "ringlb_config_last_reload_successful",
    ] {
        assert!(used.contains(m), "nothing uses {m}");
    }
}

/// The dashboard is a well-formed Grafana dashboard: unique panel ids, panels on the
/// 24-column grid, a datasource and a query on every panel, only defined variables.
#[test]
fn dashboard_is_well_formed() {
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(config_file("grafana-dashboard.json")).unwrap()).unwrap();
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let vars: HashSet<String> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    let mut ids = HashSet::new();
    for p in dash["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(ids.insert(p["id"].as_u64().unwrap()), "panel id twice: {title}");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && g["h"].as_u64().unwrap() > 0,
            "{title}: off the grid: {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let e = t["expr"].as_str().unwrap();
            for word in e.split('$').skip(1) {
                let name: String = word
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    name.starts_with("__") || vars.contains(&name),
                    "{title}: ${name} is not a variable"
                );
            }
        }
    }
}

/// promtool: the alert rules parse, their unit tests pass (each alert fires on the
/// series ringlb exports and stays quiet otherwise), and every dashboard query parses.
#[test]
fn promtool_checks_rules_and_queries() {
    let Some(promtool) = promtool() else { return };
    let run = |args: &[&str]| {
        let out = Command::new(promtool)
            .args(args)
            .current_dir(config_file(""))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        text
    };
    let text = run(&["check", "rules", "prometheus-alerts.yml"]);
    assert!(text.contains("SUCCESS: 9 rules found"), "{text}");
    run(&["test", "rules", "prometheus-alerts.test.yml"]);

    // The dashboard's queries as recording rules: promtool parses each.
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(config_file("grafana-dashboard.json")).unwrap()).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, e)) in dashboard_exprs(&dash).iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&substitute(e)).unwrap()
        ));
    }
    let dir = TempDir::new("promtool");
    let file = dir.file("dashboard-rules.yml", &rules);
    run(&["check", "rules", file.to_str().unwrap()]);
}

/// The series behind RinglbConfigReloadRejected follow real reloads: a rejected one
/// sets ringlb_config_last_reload_successful to 0 and counts, a good one sets it back.
#[test]
fn reload_metrics_follow_rejections() {
    let a = Backend::start("a", Behaviour::TagEcho);
    let dir = TempDir::new("reload-metrics");
    let sock = dir.0.join("ctl.sock");
    let (listen, metrics) = (lb_addr(), lb_addr());
    let body = format!(
        "[[listener]]\nname = \"web\"\nbind = \"{listen}\"\npool = \"web\"\n\n[[pool]]\nname = \"web\"\ntable_size = 1021\n[[pool.backend]]\naddr = \"{}\"\n",
        a.addr
    );
    let cfg = config_with_control("auto", &sock, &body)
        .replace("[control]\n", &format!("[control]\nmetrics = \"{metrics}\"\n"));
    let mut lb = Ringlb::start(&cfg, listen);
    lb.wait_listening(metrics);
    let scrape = || {
        let mut c = std::net::TcpStream::connect(metrics).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        text
    };
    let value = |text: &str, name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in {text}"))
            .to_string()
    };
    let t = scrape();
    assert_eq!(value(&t, "ringlb_config_last_reload_successful"), "1");
    assert_eq!(value(&t, "ringlb_config_reloads_rejected_total"), "0");
    assert!(
        t.contains("ringlb_pool_table_build_failures_total{pool=\"web\"} 0"),
        "{t}"
    );
    std::fs::write(&lb.config, cfg.replace("table_size = 1021", "table_size = 1000")).unwrap();
    let (code, v) = ctl_json(&sock, &["reload"]);
    assert_eq!(code, 1, "a non-prime table_size is rejected: {v}");
    let t = scrape();
    assert_eq!(value(&t, "ringlb_config_last_reload_successful"), "0");
    assert_eq!(value(&t, "ringlb_config_reloads_rejected_total"), "1");
    std::fs::write(&lb.config, &cfg).unwrap();
    let (code, v) = ctl_json(&sock, &["reload"]);
    assert_eq!(code, 0, "{v}");
    let t = scrape();
    assert_eq!(value(&t, "ringlb_config_last_reload_successful"), "1");
    assert_eq!(value(&t, "ringlb_config_reloads_rejected_total"), "1");
}
