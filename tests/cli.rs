//! The binary as a user runs it: init, run, status, id, SIGHUP (good and broken config),
//! SIGTERM, and a second `run` on the same home.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bitdust::actors::status::NodeStatus;
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
    node.wait_running();
    for field in ["actor", "id", "from", "event", "to"] {
        assert!(
            transition_line.get(field).is_some(),
            "transition lacks {field}: {transition_line}"
        );
    }

    let shown = status(&home);
    assert_eq!(shown.node_id, node_id);
    assert_eq!(shown.name.as_deref(), Some("alice"));
    assert!(
        shown
            .machines
            .iter()
            .any(|m| m.actor == "identity" && m.state == "Ready"),
        "{shown:#?}"
    );
    let human = bitdust(&home, &["status"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("identity"));

    // A second node on the same home is refused and changes nothing.
    let second = bitdust(&home, &["run"]);
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already running"), "{err}");
    assert_eq!(status(&home).node_id, node_id);

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
    let id = id_card(&home);
    assert_eq!(id.revision, 2);
    assert_eq!(
        id.contacts.first().map(String::as_str),
        Some("tcp://192.0.2.1:7771")
    );

    // SIGHUP with a broken file: logged with the key, the running config stays.
    std::fs::write(
        &config_path,
        changed.replace("keepalive = \"10s\"", "keepalive = \"often\""),
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
    assert_eq!(status(&home).revision, Some(2));

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
        node.wait_running();
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

/// Starts `bitdust run --log-format json` with SIGHUP/SIGTERM/SIGINT blocked across the exec,
/// as a careful supervisor does: a signal sent during `execve` itself (before any code of the
/// program exists to catch it) then stays pending instead of killing the process. The node
/// must install its handlers first thing and unblock them; its JSON log lines come back on
/// the channel.
fn spawn_with_signals_blocked(
    home: &std::path::Path,
) -> (std::process::Child, mpsc::Receiver<serde_json::Value>) {
    spawn_node(home, || {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
                libc::sigaddset(&mut set, sig);
            }
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        Ok(())
    })
}

/// Starts `bitdust run --log-format json`, running `before_exec` in the child first.
fn spawn_node(
    home: &std::path::Path,
    before_exec: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> (std::process::Child, mpsc::Receiver<serde_json::Value>) {
    use std::os::unix::process::CommandExt as _;
    let mut command = Command::new(BIN);
    command
        .arg("--home")
        .arg(home)
        .args(["run", "--log-format", "json"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the callers' hooks make only async-signal-safe calls.
    unsafe {
        command.pre_exec(before_exec);
    }
    let mut child = command.spawn().expect("run");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let value =
                serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "raw": line }));
            if tx.send(value).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn wait_line(
    rx: &mpsc::Receiver<serde_json::Value>,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(v) if pred(&v) => return v,
            Ok(v) => seen.push(v),
            Err(_) => break,
        }
    }
    panic!("no log line for {what}; saw {seen:#?}");
}

fn wait_child(child: &mut std::process::Child) -> std::process::ExitStatus {
    wait_for("the node to exit", 20, || {
        child.try_wait().expect("try_wait")
    })
}

#[test]
fn sigterm_sent_at_spawn_stops_gracefully() {
    use std::os::unix::process::ExitStatusExt as _;
    let (_dir, home) = temp_home();
    init(&home, "early-term");
    let (mut child, logs) = spawn_with_signals_blocked(&home);
    // 0 ms after spawn: before the runtime, the config or the database exist.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_child(&mut child);
    assert_eq!(status.signal(), None, "killed by the signal: {status:?}");
    assert!(status.success(), "exit status {status:?}");
    // The graceful path ran after start-up: the stop was logged, the socket removed.
    wait_line(&logs, "shutting down", |v| {
        v["message"] == "shutting down" && v["signal"] == "SIGTERM"
    });
    wait_line(&logs, "stopped", |v| v["message"] == "node stopped");
    assert!(!home.join("control.sock").exists());
}

#[test]
fn sighup_sent_at_spawn_reloads_and_the_node_keeps_running() {
    let (_dir, home) = temp_home();
    init(&home, "early-hup");
    let (mut child, logs) = spawn_with_signals_blocked(&home);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    wait_line(&logs, "reload", |v| v["message"] == "config reloaded");
    // Still running and answering.
    assert_eq!(status(&home).name.as_deref(), Some("early-hup"));
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_child(&mut child).success());
}

/// Shortens the control socket's read deadline in `home`'s config.
fn set_control_timeout(home: &std::path::Path, value: &str) {
    let path = home.join("config.toml");
    let config = std::fs::read_to_string(&path).expect("config");
    let changed = config.replace(
        "control_timeout = \"5s\"",
        &format!("control_timeout = \"{value}\""),
    );
    assert_ne!(changed, config, "the default file has control_timeout");
    std::fs::write(&path, changed).expect("write config");
}

#[test]
fn a_silent_control_client_is_disconnected_and_status_still_answers() {
    use std::io::Read as _;
    let (_dir, home) = temp_home();
    init(&home, "silent");
    set_control_timeout(&home, "1s");
    let mut node = Node::start(&home);
    node.wait_log("ready", |v| transition(v, "identity", "Loading", "Ready"));
    node.wait_running();
    let mut silent =
        std::os::unix::net::UnixStream::connect(home.join("control.sock")).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    // While it sits there saying nothing, others are served.
    assert_eq!(status(&home).name.as_deref(), Some("silent"));
    let mut reply = String::new();
    // The node gives up on it: a short error line, then end of stream (not our read timeout).
    silent
        .read_to_string(&mut reply)
        .expect("the node closes the connection");
    assert!(reply.contains("no request within 1000 ms"), "{reply}");
    node.signal(libc::SIGTERM);
    assert!(node.wait_exit().success());
}

/// Raises this test process's descriptor limit, so that it can hold a thousand sockets.
fn raise_own_fd_limit(want: u64) -> bool {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return false;
        }
        limit.rlim_cur = limit.rlim_max.min(want.max(limit.rlim_cur));
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur >= want
    }
}

#[test]
fn a_thousand_silent_control_clients_do_not_lock_out_status() {
    if !raise_own_fd_limit(1400) {
        eprintln!("skipping: this process cannot hold 1400 descriptors");
        return;
    }
    let (_dir, home) = temp_home();
    init(&home, "crowd");
    // A deadline longer than the test: only dropping the silent clients can make room.
    set_control_timeout(&home, "120s");
    let mut node = Node::start(&home);
    node.wait_log("ready", |v| transition(v, "identity", "Loading", "Ready"));
    node.wait_running();
    let socket = home.join("control.sock");
    let mut silent = Vec::new();
    for _ in 0..1000 {
        silent.push(std::os::unix::net::UnixStream::connect(&socket).expect("connect"));
    }
    // All thousand are still connected on our side and no read deadline has passed: status
    // gets through because the node drops the clients silent longest.
    assert_eq!(status(&home).name.as_deref(), Some("crowd"));
    // The first client is one of those dropped: end of stream, not a reply.
    {
        use std::io::Read as _;
        let first = &mut silent[0];
        first
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        assert_eq!(first.read(&mut buf).expect("closed by the node"), 0);
    }
    let warnings = node
        .logs_so_far()
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("accept failed"))
        })
        .count();
    assert_eq!(warnings, 0, "descriptors ran out");
    drop(silent);
    node.signal(libc::SIGTERM);
    assert!(node.wait_exit().success());
}

#[test]
fn running_out_of_descriptors_logs_one_warning_and_status_recovers() {
    let (_dir, home) = temp_home();
    init(&home, "starved");
    // No eviction (more slots than descriptors) and a short read deadline.
    set_control_timeout(&home, "2s");
    let path = home.join("config.toml");
    let config = std::fs::read_to_string(&path).expect("config");
    std::fs::write(
        &path,
        config.replace("control_clients = 64", "control_clients = 10000"),
    )
    .expect("write config");
    // A hard limit of 96 descriptors: the node cannot raise past it.
    let (mut child, logs) = spawn_node(&home, || {
        let limit = libc::rlimit {
            rlim_cur: 96,
            rlim_max: 96,
        };
        // SAFETY: setrlimit is async-signal-safe.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
        Ok(())
    });
    wait_line(&logs, "running", |v| v["message"] == "node running");
    let socket = home.join("control.sock");
    let mut silent = Vec::new();
    for _ in 0..150 {
        match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(s) => silent.push(s),
            Err(_) => break,
        }
    }
    // The node ran out and kept failing accepts (every 100 ms) until deadlines freed
    // descriptors; status gets through once they do.
    let status = wait_for("status", 30, || try_status(&home));
    let status: NodeStatus = serde_json::from_value(status).expect("status reads as NodeStatus");
    assert_eq!(status.name.as_deref(), Some("starved"));
    drop(silent);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_child(&mut child).success());
    // The log ends with the process: read all of it.
    let warnings: Vec<_> = logs
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("accept failed"))
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("Too many open files")),
        "{warnings:#?}"
    );
}
