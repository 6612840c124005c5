//! The binary as a user runs it: init, run, status, id, SIGHUP (good and broken config),
//! SIGTERM, and a second `run` on the same home.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn init_run_status_reload_and_graceful_stop() {
    let (_dir, home) = temp_home();
    let node_id = init(&home, "alice");

    let card = bitdust(&home, &["id"]);
    let card = String::from_utf8_lossy(&card.stdout).trim().to_string();
    assert!(
        card.starts_with("bitdust1:") && !card.contains(' '),
        "card: {card}"
    );

    let mut node = Node::start(&home);
    node.wait_log("identity ready", |v| {
        transition(v, "identity", "Loading", "Ready")
    });
    let transition_line = node.wait_log("first transition", |v| v["message"] == "transition");
    for field in ["actor", "id", "from", "event", "to"] {
        assert!(
            transition_line.get(field).is_some(),
            "transition lacks {field}: {transition_line}"
        );
    }

    let status = status_json(&home);
    assert_eq!(status["node_id"], node_id.as_str());
    assert_eq!(status["name"], "alice");
    let machines = status["machines"].as_array().expect("machines");
    assert!(
        machines
            .iter()
            .any(|m| m["actor"] == "identity" && m["state"] == "Ready"),
        "{status:#}"
    );
    let human = bitdust(&home, &["status"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("identity"));

    // A second node on the same home is refused and changes nothing.
    let second = bitdust(&home, &["run"]);
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already running"), "{err}");
    assert_eq!(status_json(&home)["node_id"], node_id.as_str());

    // SIGHUP with new contacts: the identity is re-signed with the next revision.
    let config_path = home.join("config.toml");
    let config = std::fs::read_to_string(&config_path).expect("config");
    let changed = config.replace("contacts = []", "contacts = [\"tcp://192.0.2.1:7771\"]");
    assert_ne!(changed, config);
    std::fs::write(&config_path, &changed).expect("write config");
    node.signal(libc::SIGHUP);
    node.wait_log("reload", |v| v["message"] == "config reloaded");
    node.wait_log("re-signed", |v| {
        transition(v, "identity", "Resigning", "Ready")
    });
    let id = id_json(&home);
    assert_eq!(id["revision"], 2);
    assert_eq!(id["contacts"][0], "tcp://192.0.2.1:7771");

    // SIGHUP with a broken file: logged with the key, the running config stays.
    std::fs::write(
        &config_path,
        changed.replace("keepalive = \"30s\"", "keepalive = \"often\""),
    )
    .expect("write config");
    node.signal(libc::SIGHUP);
    let failed = node.wait_log("reload failure", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("config reload failed"))
    });
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("network.keepalive") && error.contains("config.toml"),
        "{error}"
    );
    assert_eq!(status_json(&home)["revision"], 2);

    // SIGTERM: machines close, exit status 0, the control socket is gone.
    node.signal(libc::SIGTERM);
    let status = node.wait_exit();
    assert!(status.success(), "exit status {status:?}");
    node.wait_log("identity closed", |v| {
        transition(v, "identity", "Ready", "Closed")
    });
    node.wait_log("stopped", |v| v["message"] == "node stopped");
    assert!(!home.join("control.sock").exists());
    let after = bitdust(&home, &["status"]);
    assert!(!after.status.success());
    assert!(String::from_utf8_lossy(&after.stderr).contains("no node is running"));
}

#[test]
fn sigint_stops_and_a_restart_works() {
    let (_dir, home) = temp_home();
    init(&home, "bob");
    for _ in 0..2 {
        let mut node = Node::start(&home);
        node.wait_log("ready", |v| transition(v, "identity", "Loading", "Ready"));
        node.signal(libc::SIGINT);
        assert!(node.wait_exit().success());
    }
}

#[test]
fn bad_config_at_start_names_key_and_file() {
    let (_dir, home) = temp_home();
    init(&home, "carol");
    let config_path = home.join("config.toml");
    let config = std::fs::read_to_string(&config_path).expect("config");
    std::fs::write(
        &config_path,
        config.replace("[backup]", "[backup]\ncolour = \"blue\""),
    )
    .expect("write");
    let out = bitdust(&home, &["run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("backup.colour") && err.contains("config.toml"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
}

#[test]
fn init_refuses_an_existing_home_and_commands_need_one() {
    let (_dir, home) = temp_home();
    init(&home, "dave");
    let again = bitdust(&home, &["init"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already a bitdust home"));

    let (_dir2, empty) = temp_home();
    let id = bitdust(&empty, &["id"]);
    assert!(!id.status.success());
    assert!(String::from_utf8_lossy(&id.stderr).contains("bitdust init"));
}

#[test]
fn human_logs_show_transitions() {
    let (_dir, home) = temp_home();
    init(&home, "erin");
    let mut child = Command::new(BIN)
        .arg("--home")
        .arg(&home)
        .arg("run")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut found = None;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("transition") && line.contains("to=\"Ready\"") => {
                found = Some(line);
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    let line = found.expect("a human transition line");
    assert!(line.contains("actor=\"identity\""), "{line}");
    assert!(
        !line.contains('\u{1b}'),
        "no colour codes when not on a terminal: {line}"
    );
    assert!(!line.trim_start().starts_with('{'), "not JSON: {line}");
    assert!(status.success());
}

#[test]
fn no_secret_reaches_the_log_even_at_trace_level() {
    use base64::Engine as _;
    let (_dir, home) = temp_home();
    init(&home, "frank");
    let mut child = Command::new(BIN)
        .arg("--home")
        .arg(&home)
        .args(["run", "--log-format", "json"])
        .env("RUST_LOG", "trace")
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    wait_for("node up", 20, || {
        let out = bitdust(&home, &["status", "--json"]);
        out.status.success().then_some(())
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().expect("wait").success());
    let log = reader.join().expect("reader");
    assert!(log.contains("transition"), "the log was captured");
    for key in ["keys/signing.key", "keys/noise.key"] {
        let secret = std::fs::read(home.join(key)).expect("key");
        let forms = [
            hex::encode(&secret),
            base64::engine::general_purpose::STANDARD.encode(&secret),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&secret),
            format!("{:?}", secret),
        ];
        for form in forms {
            assert!(!log.contains(&form), "{key} appears in the log");
        }
    }
}
